"""What every tab uses: user errors as one ``gr.Error`` line, input parsing, the GPU decorator, and the
side-by-side and evaluation formatting shared by the Surgery and Verify tabs."""

from __future__ import annotations

import functools
import html
import json
from dataclasses import fields

import gradio as gr
import pandas as pd
import torch

from surgery.core.errors import InputError, SurgeryError
from surgery.evaluation.facts import Fact, facts_from_json
from surgery.evaluation.report import Comparison, format_rows
from surgery.serve.registry import ServedModel

try:  # On a ZeroGPU Space, surgery and generation get a GPU for the duration of the call.
    import spaces

    gpu = spaces.GPU
except ImportError:  # Elsewhere a no-op with the same call forms: @gpu and @gpu(duration=...).

    def gpu(fn=None, **_kwargs):
        return fn if fn is not None else (lambda f: f)


MAX_PROMPT_CHARS = 1000
# answers: what each model says (greedy generation); then the corrected model's top-1 first token (diagnostic)
SIDE_BY_SIDE_COLUMNS = [
    "kind",
    "prompt",
    "target",
    "original answer",
    "corrected answer",
    "correct",
    "first token (corrected)",
]


class Components:
    """A dataclass mixin for a named group of components — or of their values: :meth:`values` lists the fields
    in declaration order, so a group of components (an event's outputs) and a group of updates (what its
    callback returns) built from the same class always line up."""

    def values(self) -> list:
        return [getattr(self, f.name) for f in fields(self)]


# ----------------------------------------------------------------------------------------------------------------
# User errors become one gr.Error line (in the UI and for API clients), never a traceback.
# ----------------------------------------------------------------------------------------------------------------


def user_errors(fn):
    """Convert :class:`surgery.core.errors.SurgeryError` raised by a callback into ``gr.Error``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SurgeryError as e:
            raise gr.Error(html.escape(str(e), quote=False), print_exception=False) from None

    return page_only(wrapper)


def page_only(fn):
    """Mark a callback of the page as not an MCP tool: Gradio's MCP server lists only functions whose
    ``_mcp_type`` is unset or ``"tool"``. The page's endpoints return charts and Markdown for people and keep a
    session's edit in ``gr.State``; agents get the typed tools of :mod:`ui.tools` instead."""
    fn._mcp_type = "page"
    # Gradio names tools after their function and makes the names unique over every endpoint, listed or not:
    # renamed, the page's callbacks leave the plain names (diagnose, operate, ...) to the agent tools.
    fn.__name__ = f"page_{fn.__name__}"
    return fn


def check_prompt(prompt, what: str = "prompt") -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"the {what} is empty: type some text for the model to continue")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InputError(f"the {what} is {len(prompt):,} characters long; keep it under {MAX_PROMPT_CHARS:,}")
    return prompt


def parse_facts(facts) -> list[Fact]:
    """Facts from the JSON editor (a string), a list of ``{"prompt", "target", "subject"?}`` or table rows
    (prompt, target and optionally the subject; a blank subject names none)."""
    if isinstance(facts, str):
        if not facts.strip():
            raise InputError('no facts given: add at least one {"prompt", "target"} to fix')
        try:
            facts = json.loads(facts)
        except json.JSONDecodeError as e:
            raise InputError(f"the facts are not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if isinstance(facts, pd.DataFrame):
        facts = facts.values.tolist()
    if isinstance(facts, list) and facts and isinstance(facts[0], (list, tuple)):  # table rows; blank rows skipped
        facts = [
            {"prompt": r[0], "target": r[1] if len(r) > 1 else None}
            | ({"subject": r[2]} if len(r) > 2 and str(r[2] or "").strip() else {})
            for r in facts
            if any(str(c or "").strip() for c in r)
        ]
    parsed = facts_from_json(facts, "facts")
    for fact in parsed:
        check_prompt(fact.prompt, "fact prompt")
    return parsed


def parse_layer(layer) -> int | None:
    """``"auto"``/blank/None -> None (the prescribed layer); ``"5"`` or 5 -> 5."""
    if layer is None or str(layer).strip().lower() in ("", "auto"):
        return None
    try:
        return int(str(layer).strip())
    except ValueError:
        raise InputError(f"layer must be a block index (0, 1, ...) or auto, not {layer!r}") from None


def parse_new_tokens(value, default: int = 20) -> int:
    """How many tokens to generate: a whole number of at least 1 (``8``, ``8.0``, ``"8"``; the app's limit is
    checked after, :meth:`surgery.serve.limits.Limits.check_new_tokens`); None or blank -> ``default``. Anything
    else (``"abc"``, ``2.5``, zero, negative) is an :class:`InputError` naming the value."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    n = None
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, float) and value.is_integer():
        n = int(value)
    elif isinstance(value, str):
        try:
            n = int(value.strip())
        except ValueError:
            pass
    if n is None or n < 1:
        raise InputError(f"new tokens must be a whole number of at least 1, not {value!r}")
    return n


def device_of(served: ServedModel) -> torch.device:
    return next(served.model.parameters()).device


def round_or_none(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


# ----------------------------------------------------------------------------------------------------------------
# A comparison of the original and a corrected model (Surgery and Verify tabs).
# ----------------------------------------------------------------------------------------------------------------


def side_by_side_rows(c: Comparison) -> list[list[str]]:
    """What the original and the corrected model say (:data:`SIDE_BY_SIDE_COLUMNS`): the facts, then each
    fact's paraphrases; ✓ when the corrected model says the whole answer, and its top-1 first token beside."""

    def row(kind: str, f) -> list[str]:
        first = f"{f.first_token_after!r} {'✓' if f.first_token_correct_after else '✗'}"
        return [kind, f.prompt, f.target, f.before, f.after, "✓" if f.correct_after else "✗", first]

    return [row("fact", f) for f in c.facts] + [row("paraphrase", p) for p in c.paraphrases]


def evaluation_markdown(rows: list[tuple[str, str, str]], c: Comparison) -> str:
    """The before/after table (efficacy, paraphrases, unedited facts, neighbourhood, side effects, perplexity,
    fluency, KL, ...; counts of what the model says, lenient and first-token counts beside), what the corrected
    model says wherever it is wrong, and what this tokenizer could not score."""
    text = (
        "*Counts of what each model **says** (greedy generation: the whole answer, at a word boundary); "
        "beside them the lenient count (the answer within the first few words) and the first-token count "
        "(top-1 next token only, a diagnostic).*\n\n" + format_rows(rows, markdown=True)
    )
    text += "\n\n" + wrong_markdown(c)
    if c.unavailable:
        text += "\n\n*Not scored with this tokenizer: " + "; ".join(c.unavailable) + ".*"
    return text


def wrong_markdown(c: Comparison) -> str:
    """What the corrected model says wherever it is wrong: facts and paraphrases not said, probes broken or
    changed (:meth:`~surgery.evaluation.report.Comparison.wrong_after`)."""
    wrong = c.wrong_after()
    if not wrong:
        return "**What the corrected model says:** every fact and paraphrase right, no probe broken or changed."

    def cell(text: str) -> str:
        return repr(text).replace("|", "\\|")

    lines = [
        "**What the corrected model says where it is wrong**",
        "",
        "| kind | | prompt | says | expected | original said |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {w.kind} | {w.why} | {cell(w.prompt)} | {cell(w.after)} | {cell(w.target)} | {cell(w.before)} |"
        for w in wrong
    ]
    return "\n".join(lines)
