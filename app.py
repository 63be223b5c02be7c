"""Transformer Surgery — the Gradio app (the Hugging Face Space): ``python app.py``.

The UI only. :func:`build_demo` lays out four tabs — Diagnose, Heads, Surgery, Verify — whose callbacks are the
methods of :class:`SurgeryApp`: each adapts UI values to one call into the ``surgery`` library and its result
back to components. Nothing happens at import: the model is loaded by :func:`build_demo`, and the environment
(``SURGERY_MODEL``, ``GRADIO_SERVER_NAME``/``PORT``, ``SPACE_ID``) is read only by :func:`main`.

Many users share one base model that is never modified. A session's edit lives in its ``gr.State`` as a
:class:`surgery.sessions.SessionEdit` (patch + report + its own download folder) and that session's requests run
on a patched *view* of the base (:func:`surgery.patch.patched_model`), so sessions never see each other's edits.
Surgery runs through the queue one at a time (its own concurrency group); diagnosis, generation and
verification have their own groups, so they stay responsive while someone operates.
"""

from __future__ import annotations

import functools
import html
import json
import logging
import os
import tempfile
from pathlib import Path

import gradio as gr
import pandas as pd
import torch

from surgery import plots
from surgery.diagnosis import Diagnosis, diagnose
from surgery.errors import InputError, SurgeryError
from surgery.evaluation import score_probes
from surgery.export import write_output
from surgery.generation import generate
from surgery.hub import push_folder
from surgery.arch import SITES, count_parameters, layout_of
from surgery.model_io import load_model
from surgery.panels import Panel, Probe, panel_for_model, probes_from_json
from surgery.report import Comparison, compare, format_rows, regressions
from surgery.sessions import SessionEdit, StartUp, load_or_demo, write_downloads
from surgery.static_heads import StaticHeadCache, head_table
from surgery.training import SurgeryConfig, choose_layer, operate

try:  # On a ZeroGPU Space, surgery and generation get a GPU for the duration of the call.
    import spaces

    gpu = spaces.GPU
except ImportError:  # Elsewhere a no-op with the same call forms: @gpu and @gpu(duration=...).

    def gpu(fn=None, **_kwargs):
        return fn if fn is not None else (lambda f: f)



DEFAULT_MODEL = "gpt2"
MAX_PROMPT_CHARS = 1000
MAX_NEW_TOKENS = 64
TOP_HEADS = 12
PROMOTES_TARGET, PROMOTES_COMPETITOR = "promotes the target", "promotes the competitor"
HEAD_COLUMNS = ["head", "module", "QK overlap", "QK norm", "OV norm", "copying score",
                "key response: proper nouns", "key response: function words"]
THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="rose", neutral_hue="slate")
CSS = """
.block.banner { border: 1px solid #f59e0b; background: #fffbeb; border-radius: 8px; padding: 2px 14px; }
.block.banner p { color: #78350f !important; }
.block.verdict { border-left: 4px solid var(--color-accent); padding: 0 14px; font-size: 1.05rem; }
.muted p { color: var(--body-text-color-subdued); font-size: 0.92rem; }
"""


# ----------------------------------------------------------------------------------------------------------------
# User errors become one gr.Error line (in the UI and for API clients), never a traceback.
# ----------------------------------------------------------------------------------------------------------------


def user_errors(fn):
    """Convert :class:`surgery.errors.SurgeryError` raised by a callback into ``gr.Error``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SurgeryError as e:
            raise gr.Error(html.escape(str(e), quote=False), print_exception=False) from None

    return wrapper


def check_prompt(prompt, what: str = "prompt") -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"the {what} is empty: type some text for the model to continue")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InputError(f"the {what} is {len(prompt):,} characters long; keep it under {MAX_PROMPT_CHARS:,}")
    return prompt


def parse_facts(facts) -> list[Probe]:
    """Facts from the JSON editor (a string), a list of ``{"prompt","target"}`` or table rows."""
    if isinstance(facts, str):
        if not facts.strip():
            raise InputError("no facts given: add at least one {\"prompt\", \"target\"} to fix")
        try:
            facts = json.loads(facts)
        except json.JSONDecodeError as e:
            raise InputError(f"the facts are not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if isinstance(facts, pd.DataFrame):
        facts = facts.values.tolist()
    if isinstance(facts, list) and facts and isinstance(facts[0], (list, tuple)):  # table rows; blank rows skipped
        facts = [{"prompt": r[0], "target": r[1] if len(r) > 1 else None} for r in facts
                 if any(str(c or "").strip() for c in r)]
    probes = probes_from_json(facts, "facts")
    for p in probes:
        check_prompt(p.prompt, "fact prompt")
    return probes


def parse_layer(layer) -> int | None:
    """``"auto"``/blank/None -> None (the prescribed layer); ``"5"`` or 5 -> 5."""
    if layer is None or str(layer).strip().lower() in ("", "auto"):
        return None
    try:
        return int(str(layer).strip())
    except ValueError:
        raise InputError(f"layer must be a block index (0, 1, ...) or auto, not {layer!r}") from None


def head_label(layer: int, head: int) -> str:
    return f"L{layer + 1} H{head}"


# ----------------------------------------------------------------------------------------------------------------
# Work that runs on the GPU when there is one (on ZeroGPU inside @spaces.GPU, possibly in another process: the
# arguments are plain objects, no closures).
# ----------------------------------------------------------------------------------------------------------------


class TrainingProgress:
    """The library's ``progress(step, total, loss)`` callback, shown on a ``gr.Progress`` bar."""

    def __init__(self, progress, site: str):
        self.progress, self.site = progress, site

    def __call__(self, step: int, total: int, loss: float) -> None:
        self.progress((step, total), desc=f"training {self.site}: step {step}/{total}, loss {loss:.3f}",
                      unit="steps")


@gpu(duration=120)
def run_surgery(model, tokenizer, facts, config, panel, progress):
    return operate(model, tokenizer, facts, config, panel=panel, progress=progress)


@gpu(duration=30)
def run_generation(models, tokenizer, prompt, max_new_tokens):
    return [generate(m, tokenizer, prompt, max_new_tokens=max_new_tokens) for m in models]


# ----------------------------------------------------------------------------------------------------------------
# The callbacks.
# ----------------------------------------------------------------------------------------------------------------


class SurgeryApp:
    """The app's event functions, all serving one shared base model (never modified)."""

    def __init__(self, startup: StartUp, *, panel: Panel | None = None, allow_local_models: bool = True,
                 work_dir: str | None = None):
        self.base = startup.loaded
        self.fallback_reason = startup.fallback_reason
        self.allow_local_models = allow_local_models
        self.work_dir = work_dir
        self.layout = layout_of(self.base.model)
        self.panel = panel if panel is not None else bundled_panel(self.base.model)
        self.head_cache = StaticHeadCache()

    @property
    def device(self) -> torch.device:
        return next(self.base.model.parameters()).device

    @property
    def facts(self) -> list[Probe]:
        return list(self.panel.facts) if self.panel else []

    # --- Diagnose --------------------------------------------------------------------------------------------

    @user_errors
    def diagnose(self, prompt: str, target: str, competitor: str = ""):
        """Why does the model (not) answer ``target`` after ``prompt``? Returns the verdict sentence, the
        logit-lens chart, the layer×head heatmap, the top heads and the whole diagnosis as JSON."""
        check_prompt(prompt)
        d = diagnose(self.base.model, self.base.tokenizer, prompt, target, (competitor or "").strip() or None)
        return (verdict_markdown(d), plots.cumulative_logit_plot(d), plots.attribution_heatmap(d),
                top_heads(d, TOP_HEADS), d.to_dict())

    # --- Surgery ---------------------------------------------------------------------------------------------

    @user_errors
    def operate(self, facts: str, site: str, layer, edit: SessionEdit | None, progress=gr.Progress()):
        """Train one site so that the facts come out right. The edit is kept in this session only."""
        probes = parse_facts(facts)
        config = SurgeryConfig(site=site, layer=parse_layer(layer))

        progress(0, desc="diagnosing the facts, capturing the frozen layers")
        result = run_surgery(self.base.model, self.base.tokenizer, probes, config, self.panel,
                             TrainingProgress(progress, site))
        progress(1, desc="writing the patch and the report")
        folder = Path(tempfile.mkdtemp(prefix="surgery-session-", dir=self.work_dir))
        files = write_downloads(folder, self.base, result)
        if edit is not None:
            edit.discard()
        new = SessionEdit(result=result, facts=probes, folder=folder, files=list(files))
        report = result.report
        facts_rows = [[f.prompt, f.target, f.before, f.after, "✓" if f.correct_after else "✗"]
                      for f in report.comparison.facts]
        return (operation_markdown(report), format_rows(report.rows(), markdown=True), facts_rows,
                [str(p) for p in new.files], result.to_dict(), new)

    @user_errors
    def generate(self, prompt: str, max_new_tokens: int, edit: SessionEdit | None):
        """Greedy continuations of ``prompt``: the original model, and this session's corrected model."""
        check_prompt(prompt)
        n = max(1, min(int(max_new_tokens or 20), MAX_NEW_TOKENS))
        if edit is None:
            (original,) = run_generation([self.base.model], self.base.tokenizer, prompt, n)
            return original, "(no surgery in this session yet)"
        original, corrected = run_generation([self.base.model, edit.model(self.base.model)],
                                             self.base.tokenizer, prompt, n)
        return original, corrected

    @user_errors
    def push(self, repo_name: str, private: bool, edit: SessionEdit | None,
             oauth_token: gr.OAuthToken | None = None, profile: gr.OAuthProfile | None = None):
        """Push this session's corrected model (model folder, patch, report, model card) to the signed-in user's
        own namespace."""
        if oauth_token is None or profile is None:
            raise gr.Error("Sign in with Hugging Face first: the model is pushed to your own account, with your "
                           "permission.", print_exception=False)
        if edit is None:
            raise InputError("nothing to push yet: perform surgery first")
        name = (repo_name or "").strip().split("/")[-1]
        if not name:
            raise InputError("give the new model repository a name, e.g. gpt2-capitals-fixed")
        folder = edit.folder / "model"
        if not folder.exists():
            write_output(folder, self.base, edit.result)
        url = push_folder(folder, f"{profile.username}/{name}", token=oauth_token.token, private=bool(private))
        return f"Pushed to [{profile.username}/{name}]({url})."

    # --- Verify ----------------------------------------------------------------------------------------------

    @user_errors
    def verify(self, corrected: str, edit: SessionEdit | None):
        """The facts and the panels on the original and on a corrected model, side by side. ``corrected``: a Hub
        id or a folder, or blank for this session's edit."""
        source = (corrected or "").strip()
        if source:
            if not self.allow_local_models and not _looks_like_hub_id(source):
                raise InputError("give a Hub model id (user/name); local folders are not read on the Space")
            other = load_model(source, device=self.device)
            if other.tokenizer.get_vocab() != self.base.tokenizer.get_vocab():
                raise InputError(f"{source} uses another vocabulary than the base model: it is not a fix of it")
            model, label = other.model, source
        elif edit is not None:
            model, label = edit.model(self.base.model), "this session's edit"
        else:
            raise InputError("nothing to verify yet: perform surgery in this session, or give a Hub id or a folder")
        if self.panel is None:
            raise InputError("no bundled evaluation panel fits this model, so there is nothing to verify against")
        facts = self.facts + ([f for f in edit.facts if f not in self.facts] if edit is not None and not source else [])
        comparison = compare(self.base.model, model, self.base.tokenizer, facts, self.panel)
        return verification_outputs(comparison, label)

    # --- Heads -----------------------------------------------------------------------------------------------

    @user_errors
    def heads(self):
        """Static, input-free views of every head (the table is computed once and cached)."""
        table = head_table(self.base.model, self.base.tokenizer, cache=self.head_cache)
        rows = [[s.label, f"{self.layout.adapter.block(s.layer)} head {s.head}", *(_round(v) for v in (
                    s.qk_overlap, s.qk_norm, s.ov_norm, s.copying_score, s.key_response.get("proper_noun"),
                    s.key_response.get("function_word")))] for s in table]
        return plots.qk_overlap_heatmap(table), plots.key_response_plot(table), rows


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def bundled_panel(model) -> Panel | None:
    """The bundled evaluation panel for ``model``, or None when none fits (the facts are then typed in)."""
    try:
        return panel_for_model(model)
    except SurgeryError:
        return None


def _looks_like_hub_id(name: str) -> bool:
    return not name.startswith((".", "/", "~")) and name.count("/") <= 1 and not Path(name).exists()


# ----------------------------------------------------------------------------------------------------------------
# Result -> Markdown.
# ----------------------------------------------------------------------------------------------------------------


def top_heads(d: Diagnosis, k: int) -> pd.DataFrame:
    """The ``k`` heads with the largest |target − competitor| attribution, for a bar chart (the chart orders
    them from the strongest push towards the target to the strongest push towards the competitor)."""
    heads = sorted((a for a in d.dla if a.head is not None), key=lambda a: -abs(a.target - a.competitor))[:k]
    return pd.DataFrame({
        "head": [head_label(a.layer, a.head) for a in heads],
        "target − competitor": [a.target - a.competitor for a in heads],
        "pushes": [PROMOTES_TARGET if a.target > a.competitor else PROMOTES_COMPETITOR for a in heads],
        "target": [a.target for a in heads],
        "competitor": [a.competitor for a in heads],
    })


def verdict_markdown(d: Diagnosis) -> str:
    """The verdict sentence, headed by what the model actually answers."""
    head = (f"**{d.verdict.capitalize()}** · the model answers **{d.prediction.text!r}**; "
            f"target {d.target.text!r} is rank {d.target.rank} ({d.target.logit:.2f}) vs "
            f"{d.competitor.text!r} ({d.competitor.logit:.2f})")
    note = f"\n\n*The target is {len(d.target_tokens)} tokens; only its first token is diagnosed.*" \
        if d.multi_token_target else ""
    return f"{head}\n\n{d.summary()}{note}"


def operation_markdown(report) -> str:
    c = report.comparison
    n = len(c.facts)
    return (f"**Surgery done** on `{report.site}` of block {report.layer} (L{report.layer + 1}) — "
            f"{report.params_in_site:,} parameters ({100 * report.fraction:.2f}% of the model), "
            f"{report.steps} steps in {report.train_time_s:.1f} s. Facts correct: **{c.facts_before}/{n} → "
            f"{c.facts_after}/{n}**.\n\n*Layer: {report.layer_reason}.*")


def verification_outputs(c: Comparison, label: str):
    """Verdict line, facts rows, panel table and JSON of a verification (the rules of ``surgery verify``)."""
    reasons = regressions(c)
    n = len(c.facts)
    verdict = (f"**✓ Verified — {label}**: {c.facts_after}/{n} facts correct (original {c.facts_before}/{n}), "
               "no panel regressed." if not reasons else
               f"**✗ Not verified — {label}**: " + "; ".join(reasons) + ".")
    facts = [[f.prompt, f.target, f.before, f.after, "✓" if f.correct_after else "✗"] for f in c.facts]
    return verdict, facts, format_rows(c.rows(), markdown=True), {"verified": not reasons, "reasons": reasons,
                                                                   "corrected": label, **c.to_dict()}


# ----------------------------------------------------------------------------------------------------------------
# The page.
# ----------------------------------------------------------------------------------------------------------------

INTRO = """# Transformer Surgery
*Diagnose why a GPT-2 model answers wrong, edit one site of one layer, verify and ship the fix.*"""


def build_demo(model_name: str | os.PathLike | None = None, *, startup: StartUp | None = None, device=None,
               panel: Panel | None = None, login: bool = False, allow_local_models: bool = True,
               work_dir: str | None = None) -> gr.Blocks:
    """The whole app as a ``gr.Blocks`` (not launched).

    ``model_name``: Hub id or folder (default ``gpt2``); when it cannot be loaded (e.g. the Hub is unreachable)
    the bundled demo model is served and a banner says so. ``startup``: an already loaded model instead (tests).
    ``panel``: the evaluation panel (default: the bundled one that fits the model, if any).
    ``login``: show "Sign in with Hugging Face" (needs a Space with ``hf_oauth: true``: elsewhere Gradio can only
    mock it with a locally saved HF token, and refuses to start without one). ``allow_local_models``: let
    Verify read local folders (off on a public Space). ``work_dir``: where per-session files go (default: temp).
    """
    if startup is None:
        startup = load_or_demo(model_name or DEFAULT_MODEL, device=device)
    app = SurgeryApp(startup, panel=panel, allow_local_models=allow_local_models, work_dir=work_dir)
    # delete_cache: downloads copied into Gradio's cache are removed after a few hours (a Space runs for weeks).
    with gr.Blocks(title="Transformer Surgery", delete_cache=(3600, 4 * 3600)) as demo:
        gr.Markdown(INTRO)
        if app.fallback_reason:
            reason = app.fallback_reason.split("; offline, use the bundled demo model")[0]  # the banner says it
            gr.Markdown(f"⚠️ **Running the bundled demo model** — {html.escape(reason)}. It is a small "
                        "GPT-2 trained to reproduce the reference failure (six capitals answered with *the*).",
                        elem_classes="banner", elem_id="fallback-banner")
        gr.Markdown(model_line(app), elem_classes="muted")
        edit = gr.State(None, delete_callback=lambda e: e.discard() if e is not None else None)
        with gr.Tabs():
            with gr.Tab("Diagnose", id="diagnose"):
                diagnose_tab(app, demo)
            with gr.Tab("Heads", id="heads") as tab:
                heads_tab(app, tab)
            with gr.Tab("Surgery", id="surgery"):
                surgery_tab(app, edit, login)
            with gr.Tab("Verify", id="verify"):
                verify_tab(app, edit)
    demo.queue(default_concurrency_limit=2)
    return demo


def model_line(app: SurgeryApp) -> str:
    lay, loaded = app.layout, app.base
    name = "bundled demo model" if loaded.is_demo else (loaded.source if not Path(loaded.source).is_absolute()
                                                          else Path(loaded.source).name)
    return (f"Model: **{name}** · {count_parameters(loaded.model) / 1e6:.1f}M parameters · {lay.n_layer} layers × "
            f"{lay.n_head} heads · running on {app.device.type.upper()}. Layers are shown 1-indexed as "
            f"in the reference write-up (L10 = `{lay.adapter.block(9)}`).")


def diagnose_tab(app: SurgeryApp, demo: gr.Blocks) -> None:
    with gr.Row():
        with gr.Column(scale=2):
            first = app.facts[0] if app.facts else Probe("The capital of France is", " Paris")
            prompt = gr.Textbox(label="Prompt", value=first.prompt, max_lines=4)
            with gr.Row():
                target = gr.Textbox(label="Target (the right answer)", value=first.target,
                                    info="GPT-2 words start with a space: ' Paris'")
                competitor = gr.Textbox(label="Competitor (optional)", placeholder="default: the model's answer")
            run = gr.Button("Diagnose", variant="primary")
            examples_slot = gr.Column()
        with gr.Column(scale=3):
            verdict = gr.Markdown("Press **Diagnose**.", elem_classes="verdict", elem_id="verdict")
            lens = gr.Plot(label="Logit lens: target vs competitor after each layer", show_label=False,
                           elem_id="lens-plot")
    with gr.Row():
        heatmap = gr.Plot(label="Per-head direct logit attribution: target − competitor", show_label=False,
                          elem_id="head-heatmap", scale=3)
        bars = gr.BarPlot(x="head", y="target − competitor", color="pushes", sort="-y", x_label_angle=-40,
                          color_map={PROMOTES_TARGET: "#2563eb", PROMOTES_COMPETITOR: "#dc2626"},
                          tooltip=["head", "target", "competitor", "target − competitor"],
                          title=f"Top {TOP_HEADS} heads by |target − competitor|", show_label=False,
                          elem_id="top-heads", height=440, scale=2)
    with gr.Accordion("Full diagnosis (JSON)", open=False):
        raw = gr.JSON(label="diagnosis")
    outputs = [verdict, lens, heatmap, bars, raw]
    gr.on([run.click, prompt.submit, target.submit, competitor.submit], app.diagnose,
          [prompt, target, competitor], outputs,
          api_name="diagnose", concurrency_limit=4, concurrency_id="diagnose")
    # The page opens on the first example already diagnosed, rather than on empty charts.
    demo.load(app.diagnose, [prompt, target, competitor], outputs, api_visibility="private",
              concurrency_limit=4, concurrency_id="diagnose")
    if app.facts:
        with examples_slot:
            gr.Examples([[f.prompt, f.target, ""] for f in app.facts], [prompt, target, competitor], outputs,
                        app.diagnose, cache_examples=False, run_on_click=True, api_visibility="private",
                        label=f"The {len(app.facts)} capitals of the fact panel (click one to diagnose it)",
                        examples_per_page=12, example_labels=[example_label(f) for f in app.facts])


def example_label(fact: Probe) -> str:
    """'France → Paris' for 'The capital of France is' / ' Paris' (the last word of the prompt otherwise)."""
    words = fact.prompt.strip().removesuffix(" is").split()
    return f"{words[-1] if words else fact.prompt} → {fact.target.strip()}"


def heads_tab(app: SurgeryApp, tab: gr.Tab) -> None:
    gr.Markdown("Input-free views of every attention head, from the weights alone (computed when this tab is "
                "first opened): how much each head's query and key read the same input dimensions (QK overlap), "
                "and how strongly its keys respond to each class of token.", elem_classes="muted")
    with gr.Row():
        overlap = gr.Plot(label="QK overlap per head", show_label=False, scale=3)
        keys = gr.Plot(label="Key response by token class, per layer", show_label=False, scale=2)
    table = gr.Dataframe(headers=HEAD_COLUMNS, label="Every head (click a column to sort)", interactive=False,
                         max_height=420)
    tab.select(app.heads, None, [overlap, keys, table], api_name="heads", concurrency_limit=1,
               concurrency_id="heads")


def site_choices(app: SurgeryApp) -> list[tuple[str, str]]:
    total = count_parameters(app.base.model)
    out = []
    for site in SITES:
        n = app.layout.site_size(app.base.model, site, 0)
        out.append((f"{site} · {n:,} params ({100 * n / total:.2f}%)", site))
    return out


def layer_choices(app: SurgeryApp) -> list[tuple[str, str]]:
    prescribed = prescribed_layer(app)
    auto = (f"auto — prescribed: L{prescribed + 1} ({app.layout.adapter.block(prescribed)})" if prescribed is not None
            else "auto — prescribed by the diagnosis")
    return [(auto, "auto")] + [(f"L{l + 1} ({app.layout.adapter.block(l)})", str(l)) for l in range(app.layout.n_layer)]


def prescribed_layer(app: SurgeryApp) -> int | None:
    try:
        return choose_layer(app.base.model, app.base.tokenizer, app.facts)[0] if app.facts else None
    except SurgeryError:
        return None


def facts_note(app: SurgeryApp) -> str:
    """Which panel facts the base model gets wrong (surgery should fix them) and right (the edit must keep them)."""
    if not app.facts:
        return "No bundled fact panel fits this model: write the facts to fix as JSON."
    try:
        scores = score_probes(app.base.model, app.base.tokenizer, app.facts)
    except SurgeryError as e:  # a panel that does not fit this tokenizer: say so instead of failing to start
        return f"The fact panel does not fit this model: {html.escape(str(e), quote=False)}."
    wrong = [r for r in scores.results if not r.correct]
    right = [r for r in scores.results if r.correct]
    text = f"The base model gets **{len(wrong)} of {scores.total}** panel facts wrong"
    if wrong:
        text += ": " + ", ".join(f"{r.target.strip()} (answers {r.answer.strip()!r})" for r in wrong)
    if right:
        text += ". Right now, and kept in the facts so the edit must not break them: " + \
            ", ".join(r.target.strip() for r in right)
    return text + "."


def facts_table(facts_json: str):
    try:
        return [[p.prompt, p.target] for p in parse_facts(facts_json)]
    except SurgeryError:
        return gr.skip()


def table_to_json(rows) -> str:
    try:
        return json.dumps([p.to_dict() for p in parse_facts(rows)], indent=1)
    except SurgeryError:
        return gr.skip()


def surgery_tab(app: SurgeryApp, edit: gr.State, login: bool) -> None:
    default_json = json.dumps([p.to_dict() for p in app.facts], indent=1)
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            gr.Markdown(facts_note(app), elem_classes="muted")
            with gr.Tabs():
                with gr.Tab("Facts (table)"):
                    table = gr.Dataframe(value=[[p.prompt, p.target] for p in app.facts] or None,
                                         headers=["prompt", "target"], datatype=["str", "str"],
                                         interactive=True, row_count=len(app.facts) or 1, show_label=False,
                                         column_widths=["70%", "30%"])
                with gr.Tab("Facts (JSON)"):
                    facts = gr.Code(value=default_json, language="json", interactive=True, show_label=False,
                                    elem_id="facts-json")
        with gr.Column(scale=2):
            site = gr.Radio(site_choices(app), value="wv", label="Site (trainable parameters)",
                            info="wv trains only the value projection of one layer: Q, K and everything "
                                 "else stay bitwise identical")
            layer = gr.Dropdown(layer_choices(app), value="auto", label="Layer")
            go = gr.Button("Perform surgery", variant="primary", elem_id="operate")
    summary = gr.Markdown("The shared model is never changed: your edit lives in your session only.",
                          elem_classes="verdict", elem_id="surgery-summary", min_height=64)
    with gr.Column(visible=False) as results:
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=420):
                metrics = gr.Markdown()
            outcome = gr.Dataframe(headers=["prompt", "target", "before", "after", "fixed"], label="Facts",
                                   interactive=False, wrap=True, scale=3)
        downloads = gr.File(label="Downloads: patch.safetensors (only the changed weights) and report.json",
                            file_count="multiple", interactive=False)
        report = gr.JSON(visible=False)
    table.input(table_to_json, table, facts, api_visibility="private", queue=False)
    facts.input(facts_table, facts, table, api_visibility="private", queue=False)
    go.click(app.operate, [facts, site, layer, edit], [summary, metrics, outcome, downloads, report, edit],
             api_name="operate", concurrency_limit=1, concurrency_id="surgery", show_progress_on=summary,
             ).success(lambda: gr.Column(visible=True), None, results, api_visibility="private", queue=False)

    gr.Markdown("### Original vs corrected\nThe same greedy continuation from the shared original model and "
                "from this session's corrected model.")
    with gr.Row():
        gen_prompt = gr.Textbox(label="Prompt", value=app.facts[0].prompt if app.facts else "", scale=4)
        tokens = gr.Slider(1, MAX_NEW_TOKENS, value=8, step=1, label="New tokens", scale=2)
        gen = gr.Button("Generate", scale=1)
    with gr.Row():
        original = gr.Textbox(label="Original model", lines=2, elem_id="gen-original")
        corrected = gr.Textbox(label="Corrected model (this session)", lines=2, elem_id="gen-corrected")
    gr.on([gen.click, gen_prompt.submit], app.generate, [gen_prompt, tokens, edit], [original, corrected],
          api_name="generate", concurrency_limit=2, concurrency_id="generate")

    gr.Markdown("### Ship it\nPush the corrected model (model folder, patch, report and model card) to a new "
                "repository in your own Hugging Face account." + ("" if login else
                " Signing in works on the Space; locally, use `python -m surgery push` with `HF_TOKEN`."))
    with gr.Row():
        if login:
            gr.LoginButton(scale=1)
        repo = gr.Textbox(label="Repository name", value=f"{Path(app.base.source).name}-surgery", scale=3)
        private = gr.Checkbox(label="private", value=False, scale=1)
        push = gr.Button("Push to Hub", scale=1)
    pushed = gr.Markdown()
    push.click(app.push, [repo, private, edit], pushed, api_name="push", concurrency_limit=1, concurrency_id="push")


def verify_tab(app: SurgeryApp, edit: gr.State) -> None:
    gr.Markdown("The fact panel and the side-effect panels on the original and on a corrected model, side by "
                "side: this session's edit, or any Hub id or folder (e.g. a model pushed from here).",
                elem_classes="muted")
    with gr.Row():
        source = gr.Textbox(label="Corrected model", placeholder="blank: this session's edit; or user/model",
                            scale=4)
        go = gr.Button("Verify", variant="primary", scale=1)
    verdict = gr.Markdown(elem_classes="verdict", elem_id="verify-verdict")
    with gr.Row():
        facts = gr.Dataframe(headers=["prompt", "target", "original", "corrected", "correct"], label="Facts",
                             interactive=False, wrap=True, scale=3)
        with gr.Column(scale=2, min_width=320):
            panels = gr.Markdown()
    raw = gr.JSON(visible=False)
    go.click(app.verify, [source, edit], [verdict, facts, panels, raw], api_name="verify",
             concurrency_limit=1, concurrency_id="verify")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP request otherwise
    on_space = bool(os.environ.get("SPACE_ID"))
    oauth = on_space and bool(os.environ.get("OAUTH_CLIENT_ID"))  # set by the Space when hf_oauth: true
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    demo = build_demo(os.environ.get("SURGERY_MODEL", DEFAULT_MODEL), device=device, login=oauth,
                      allow_local_models=not on_space)
    demo.launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")), theme=THEME, css=CSS,
                footer_links=["api", "gradio"])


if __name__ == "__main__":
    main()
