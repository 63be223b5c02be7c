"""The app as a tool server for agents (MCP): five typed tools that return JSON, one per thing the page does.

Gradio serves a Blocks app's public endpoints as MCP tools when it is launched with ``mcp_server=True``
(``/gradio_api/mcp``). The page's own endpoints return charts and Markdown for people and keep a session's edit in
``gr.State``, which an MCP call does not carry from one call to the next; so they are kept out of the tool
list (:func:`ui.common.page_only`), and :func:`add_agent_tools` adds these instead. Each tool calls the page's
callback, so it refuses what the page refuses, within the same limits, with the same one-line messages, and it
is stateless: ``operate`` returns its whole report and keeps nothing on the server.
"""

from __future__ import annotations

import json
import warnings

import gradio as gr

from surgery.edit.editors import METHOD_DESCRIPTIONS, METHODS

from .callbacks import SurgeryApp


def _json(value) -> str:
    """Tools answer JSON text (Gradio would send a dict as its Python repr)."""
    return json.dumps(value, ensure_ascii=False)


def _quiet(*_args, **_kwargs) -> None:
    """A progress callback for calls that no one watches."""


def agent_tools(app: SurgeryApp) -> list:
    """The tool functions over ``app``: plain typed functions whose docstrings are what an agent reads."""

    def diagnose(prompt: str, target: str, competitor: str = "", model: str = "") -> str:
        """Diagnose why a language model does or does not answer `target` after `prompt`.

        Teacher-forces the target's tokens and looks at the first piece the model gets wrong (the divergence
        token). The verdict is one of: correct; routing (the answer is written strongly by some head in the
        middle layers and overridden later: a routing failure that a small edit can fix); absence (the answer is
        never promoted: the model does not know it). Also returns the logit lens (the target's rank after each
        block), the per-head attribution and the top heads.

        Args:
            prompt: the text the model continues, e.g. "The capital of France is".
            target: the expected continuation with its leading space, e.g. " Paris".
            competitor: optional: the token compared with the target (default: the model's own top answer).
            model: which model of the app's picker (blank: the default model).

        Returns:
            The whole diagnosis as JSON: verdict, divergence position and piece, lens ranks, top heads.
        """
        return _json(app.diagnose(prompt, target, competitor, model or None)[-1])

    def patch_activations(
        prompt: str, corrupted_prompt: str, target: str, competitor: str = "", grid: str = "resid", model: str = ""
    ) -> str:
        """Activation patching: which block outputs and which heads carry the model's answer?

        Runs `prompt` (clean) and `corrupted_prompt` (the same number of tokens, one word swapped, e.g. "The
        capital of Poland is"), then re-runs the corrupted prompt with one activation taken from the clean run,
        for every block at every position and every head. Each score is the fraction of the clean run's lead of
        the target over the competitor that this one activation restores (1 = all of it).

        Args:
            prompt: the clean prompt, e.g. "The capital of France is".
            corrupted_prompt: the corrupted prompt, the same token length as `prompt`.
            target: the clean answer with its leading space, e.g. " Paris".
            competitor: optional: the competing token (default: the corrupted run's answer).
            grid: which activation the block-by-position grid patches: "resid" (block output), "attn" or "mlp".
            model: which model of the app's picker (blank: the default model).

        Returns:
            The patching result as JSON: a short summary and the grids of restored fractions.
        """
        summary, _, _, result = app.patch_activations(prompt, corrupted_prompt, target, competitor, grid, model or None)
        return _json({"summary": summary, **result})

    def operate(facts: str, site: str = "wv", layer: str = "auto", model: str = "", method: str = "wv") -> str:
        """Repair facts the model answers wrong by editing its weights, and report the outcome.

        By default (method "wv") trains only the chosen site (the value projection `wv` of the block the diagnosis
        prescribes) with a loss on each whole answer and a term that keeps the model's outputs on unrelated text
        and on other facts of the relation unchanged. The other methods are the editors of the literature, applied
        to the MLP output projection of the same block (ROME, FT-L) or of 5 blocks (MEMIT, AlphaEdit: with layer
        "auto", those where causal tracing finds the facts' subjects stored, else the 5 ending at the layer). The
        outcome is judged by greedy generation: a fact is fixed when the corrected model says the
        whole answer. Nothing is kept on the server: the report is the result.

        Args:
            facts: a JSON list of facts, e.g. [{"prompt": "The capital of France is", "target": " Paris"}].
            site: what method "wv" trains: "wv" (value projection), "attn", "mlp" or "layer" (others ignore it).
            layer: "auto" (from the diagnosis), a 0-indexed block number, or "trace" (methods "memit" and
                "alphaedit": the blocks where causal tracing finds the facts' subjects stored; each fact then
                needs a "subject").
            model: which model of the app's picker (blank: the default model).
            method: the editor (default "wv"): METHODS_DOC.

        Returns:
            The surgery report as JSON: what was trained, efficacy before and after by generation (and the
            first-token figure beside it), what the corrected model says for each fact, and every panel.
        """
        *results, edits = app.operate(facts, site, layer, method, None, model or None, progress=_quiet)
        edits.discard()  # its files: this call's edit lives on in the report only
        return _json(results[-1])  # the report, as the Surgery tab's JSON

    def generate(prompt: str, max_new_tokens: int = 20, model: str = "") -> str:
        """Greedy continuation of `prompt` by the model (what it says).

        Args:
            prompt: the text to continue.
            max_new_tokens: how many tokens to generate (within the app's limit).
            model: which model of the app's picker (blank: the default model).

        Returns:
            The generated text.
        """
        original, _ = app.generate(prompt, max_new_tokens, None, model or None)
        return original

    def verify(corrected_model: str, model: str = "") -> str:
        """Verify a corrected model against the original: does it say the facts, and did any panel regress?

        Scores the original and the corrected model on the app's facts (with paraphrases) and panels (other
        facts of the relation, neighbourhood, general capability, side effects, perplexity), by greedy generation.
        Verified means every fact is said and no panel regressed beyond its stated tolerance.

        Args:
            corrected_model: the corrected model: a Hub id (user/name) that the app may load.
            model: the original model, from the app's picker (blank: the default model).

        Returns:
            The verification as JSON: verified (true/false), the reasons it failed, and every figure before and
            after.
        """
        if not (corrected_model or "").strip():
            raise gr.Error("give the corrected model's Hub id (user/name)", print_exception=False)
        return _json(app.verify(corrected_model, None, model or None)[-1])

    operate.__doc__ = operate.__doc__.replace("METHODS_DOC", _methods_doc())
    return [diagnose, patch_activations, operate, generate, verify]


def _methods_doc() -> str:
    """The methods and what each does, for the operate tool's docstring (the MCP schema's description)."""
    return "; ".join(f'"{m}", {METHOD_DESCRIPTIONS[m].replace(" (--site)", "")}' for m in METHODS)


def add_agent_tools(app: SurgeryApp) -> None:
    """Register :func:`agent_tools` as API endpoints (``/tool_diagnose``, ...) of the Blocks being built: the
    MCP server lists them as tools named ``diagnose``, ``patch_activations``, ``operate``, ``generate`` and
    ``verify``."""
    # Gradio warns that an endpoint with a gr.State input keeps its default between tool calls: those are the
    # page's endpoints, which are not tools (ui.common.page_only).
    warnings.filterwarnings("ignore", message="This MCP server includes a tool that has a gr.State input")
    limits = {"operate": ("surgery", 1), "patch_activations": ("patching", 1)}
    for fn in agent_tools(app):
        group, limit = limits.get(fn.__name__, (fn.__name__, 4))
        gr.api(fn, api_name=f"tool_{fn.__name__}", concurrency_limit=limit, concurrency_id=group)
