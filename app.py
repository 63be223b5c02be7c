"""Transformer Surgery — the Gradio app (the Hugging Face Space): ``python app.py``.

The UI only. :func:`build_demo` composes the page: a model picker and four tabs — Diagnose, Heads, Surgery,
Verify — each built by its module in ``ui/`` (:mod:`ui.diagnose`, :mod:`ui.heads`, :mod:`ui.surgery`,
:mod:`ui.verify`), whose events call the methods of :class:`ui.callbacks.SurgeryApp`: each adapts UI values to
one call into the ``surgery`` library and its result back to components. Nothing happens at import: the models are
listed and the configured one loaded by :func:`build_demo`, and the environment (``SURGERY_MODEL``, the limits'
``SURGERY_*`` variables, ``GRADIO_SERVER_NAME``/``PORT``, ``SPACE_ID``) is read only by :func:`main`.

The picker offers the configured model and the other supported models this machine has
(:func:`surgery.serve.registry.local_models`); each is loaded once, on first use, into a
:class:`surgery.serve.registry.ModelRegistry` shared by every session, and never modified. Every callback takes the
picker's value last and works on that model. A session's edits live in its ``gr.State`` as a
:class:`surgery.serve.sessions.SessionEdits` — at most one :class:`~surgery.serve.sessions.SessionEdit` (edit +
report + its own download folder) per model, handed out only for the model it was made on — and that session's
requests run on an edited *view* of the base (:func:`surgery.io.edit_file.edited_model`), so sessions never see
each other's edits and an edit never reaches another model. Surgery runs through the queue one at a time (its own
concurrency group); diagnosis, generation, patching and verification have their own groups, so they stay responsive
while someone operates.

What one visitor may do is bounded by :class:`surgery.serve.limits.Limits` (facts, tokens, steps, seconds, new
tokens, queue size, sessions and their time-to-live, the Hub models Verify may load): the README's table.
"""

from __future__ import annotations

import html
import logging
import os
import shutil
import signal
import sys

import gradio as gr
import torch

from surgery.core.errors import InputError
from surgery.evaluation.panels import Panel
from surgery.serve.limits import Limits
from surgery.serve.registry import ModelRegistry, local_models, start_registry
from surgery.serve.sessions import StartUp, app_work_dir
from ui.callbacks import SurgeryApp
from ui.diagnose import diagnose_tab
from ui.heads import heads_tab
from ui.picker import ModelView, model_line, picker_dropdown, single_model_registry
from ui.surgery import surgery_tab
from ui.tools import add_agent_tools
from ui.verify import verify_tab

DEFAULT_MODEL = "gpt2"
THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="rose", neutral_hue="slate")
CSS = """
.block.banner { border: 1px solid #f59e0b; background: #fffbeb; border-radius: 8px; padding: 2px 14px; }
.block.banner p { color: #78350f !important; }
.block.verdict { border-left: 4px solid var(--color-accent); padding: 0 14px; font-size: 1.05rem; }
.muted p { color: var(--body-text-color-subdued); font-size: 0.92rem; }
"""
INTRO = """# Transformer Surgery
*Diagnose why a language model answers wrong, edit one site of one layer, verify and ship the fix.*"""


def build_demo(
    model_name: str | os.PathLike | None = None,
    *,
    registry: ModelRegistry | None = None,
    startup: StartUp | None = None,
    device=None,
    panel: Panel | None = None,
    login: bool = False,
    allow_local_models: bool = True,
    work_dir: str | None = None,
    limits: Limits | None = None,
) -> gr.Blocks:
    """The whole app as a ``gr.Blocks`` (not launched).

    ``model_name``: the configured model — a Hub id, a folder, a ``.gguf`` file or ``gemma3-270m`` (default
    ``gpt2``) — loaded now and listed first in the picker, followed by the other supported models this machine
    has (:func:`surgery.serve.registry.local_models`), each loaded on first use. When it cannot be loaded (e.g. the Hub
    is unreachable) the bundled demo model is served first and a banner says so. ``registry``: the models to
    serve instead (tests); ``startup``: one already loaded model to serve alone (tests), judged by ``panel``
    (default: its bundled panel). ``login``: show "Sign in with Hugging Face" (needs a Space with
    ``hf_oauth: true``: elsewhere Gradio can only mock it with a locally saved HF token, and refuses to start
    without one). ``allow_local_models``: let Verify read local folders (off on a public Space). ``work_dir``:
    where per-session files go (default: temp). ``limits``: what one visitor may do (default: :class:`Limits`'s
    defaults); a session's edits are kept ``limits.session_ttl`` seconds after its last surgery, and its files
    removed when its state is deleted, expires or is discarded beyond ``limits.max_sessions``.
    """
    if registry is None:
        if startup is not None:
            registry = single_model_registry(startup, panel)
        else:
            registry = start_registry(model_name or DEFAULT_MODEL, device=device, others=local_models())
    app = SurgeryApp(registry, allow_local_models=allow_local_models, work_dir=work_dir, limits=limits)
    served = app.served()
    # delete_cache: downloads copied into Gradio's cache are removed after a few hours (a Space runs for weeks).
    with gr.Blocks(title="Transformer Surgery", delete_cache=(3600, 4 * 3600)) as demo:
        gr.Markdown(INTRO)
        if app.fallback_reason:
            reason = app.fallback_reason.split("; offline, use the bundled demo model")[0]  # the banner says it
            gr.Markdown(
                f"⚠️ **Running the bundled demo model** — {html.escape(reason)}. It is a small "
                "GPT-2 trained to reproduce the reference failure (six capitals answered with *the*).",
                elem_classes="banner",
                elem_id="fallback-banner",
            )
        with gr.Row(equal_height=True):
            picker = picker_dropdown(registry, served)
            line = gr.Markdown(model_line(served), elem_classes="muted", elem_id="model-line")
        edits = gr.State(None, time_to_live=app.limits.session_ttl, delete_callback=app.sessions.end)
        with gr.Tabs():
            with gr.Tab("Diagnose", id="diagnose"):
                diag = diagnose_tab(app, served, demo, picker)
            with gr.Tab("Heads", id="heads") as tab:
                heads = heads_tab(app, tab, picker)
            with gr.Tab("Surgery", id="surgery"):
                surg = surgery_tab(app, served, edits, picker, login)
            with gr.Tab("Verify", id="verify"):
                ver = verify_tab(app, edits, picker)
        add_agent_tools(app)  # the MCP tools (served when launched with mcp_server=True)

        # Switching models: results of the previous model are cleared at once, then the new model is loaded (on
        # first use) and every tab set up for it, then its first example is diagnosed.
        stale = diag.patching + heads + surg.generated + ver
        model_view = ModelView.of_page(line, diag, surg).values()
        picker.change(
            lambda: [None] * len(stale),
            None,
            stale,
            queue=False,
            api_visibility="private",
        ).then(
            app.select_model,
            [picker, edits],
            model_view,
            api_visibility="private",
            concurrency_limit=4,
            concurrency_id="select",
            show_progress_on=line,
        ).success(
            app.diagnose,
            [diag.prompt, diag.target, diag.competitor, picker],
            diag.outputs,
            api_visibility="private",
            concurrency_limit=4,
            concurrency_id="diagnose",
        )
    demo.queue(default_concurrency_limit=2, max_size=app.limits.queue_size)
    return demo


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP request otherwise
    on_space = bool(os.environ.get("SPACE_ID"))
    oauth = on_space and bool(os.environ.get("OAUTH_CLIENT_ID"))  # set by the Space when hf_oauth: true
    try:
        limits = Limits.from_env(os.environ)
    except InputError as e:  # a malformed SURGERY_* variable: one line, before anything is loaded
        sys.exit(f"error: {e}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # Sessions' files go into this process's own folder, removed when it stops (Ctrl-C or SIGTERM, which Gradio's
    # launch loop sees as Ctrl-C); one left by a killed process is removed by the next start (app_work_dir).
    work_dir = app_work_dir()
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        demo = build_demo(
            os.environ.get("SURGERY_MODEL", DEFAULT_MODEL),
            device=device,
            login=oauth,
            allow_local_models=not on_space,
            limits=limits,
            work_dir=str(work_dir),
        )
        demo.launch(
            server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
            server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
            theme=THEME,
            css=CSS,
            footer_links=["api", "gradio"],
            mcp_server=os.environ.get("SURGERY_MCP", "1") != "0",  # the tools of ui/tools.py at /gradio_api/mcp
        )
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
