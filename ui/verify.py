"""The Verify tab: the facts and panels on the original and on a corrected model (this session's edit, a Hub id
or a folder), and weight patching of this session's edit. Its Markdown helpers."""

from __future__ import annotations

from typing import TYPE_CHECKING

import gradio as gr

from surgery.arch import Layout
from surgery.evaluation.verify import Verification
from surgery.patching.weights import WeightPatching

from .common import SIDE_BY_SIDE_COLUMNS, evaluation_markdown, side_by_side_rows

if TYPE_CHECKING:
    from .callbacks import SurgeryApp


def verification_outputs(v: Verification, label: str) -> tuple[str, list[list[str]], str, dict]:
    """Verdict line, side-by-side rows, evaluation table and JSON of a verification (the rules of
    ``surgery verify``: :func:`surgery.evaluation.verify.verify`)."""
    c, reasons = v.comparison, v.reasons
    n = len(c.facts)
    verdict = (
        f"**✓ Verified — {label}**: the corrected model says {c.facts_after}/{n} facts (original "
        f"{c.facts_before}/{n}), no panel regressed."
        if not reasons
        else f"**✗ Not verified — {label}**: " + "; ".join(reasons) + "."
    )
    return (
        verdict,
        side_by_side_rows(c),
        evaluation_markdown(c.rows(), c),
        {"verified": not reasons, "reasons": reasons, "corrected": label, **c.to_dict()},
    )


def weight_markdown(w: WeightPatching, layout: Layout) -> str:
    """Which changed component of the edit moves the facts, as weight patching scores it."""
    n = w.facts_total
    text = f"Facts right: original **{w.recipient_correct}/{n}**, this session's edit **{w.donor_correct}/{n}**. "
    best = w.best()
    if best is None:
        return text + "The edit changed no component's weights."
    name = f"{layout.label(best.layer, best.head)} {best.name}"
    return text + (
        f"Copying **{name}** alone into the original raises the target logit most "
        f"({best.mean_target_logit_change:+.3f} on average; {best.facts_correct}/{n} facts right on "
        f"that hybrid). {len(w.components)} changed components scored, {w.skipped_identical} left out "
        "(identical in both models)."
    )


def verify_tab(app: SurgeryApp, edits: gr.State, picker: gr.Dropdown) -> list:
    gr.Markdown(
        "The facts, their paraphrases and the evaluation panels on the original and on a corrected model, "
        "side by side: this session's edit of the picked model, or any Hub id or folder (e.g. a model "
        "pushed from here).",
        elem_classes="muted",
    )
    with gr.Row():
        source = gr.Textbox(label="Corrected model", placeholder="blank: this session's edit; or user/model", scale=4)
        go = gr.Button("Verify", variant="primary", scale=1)
    verdict = gr.Markdown(elem_classes="verdict", elem_id="verify-verdict")
    with gr.Row():
        facts = gr.Dataframe(
            headers=SIDE_BY_SIDE_COLUMNS, label="Original vs corrected", interactive=False, wrap=True, scale=3
        )
        with gr.Column(scale=2, min_width=320):
            panels = gr.Markdown(elem_id="verify-evaluation")
    raw = gr.JSON(visible=False)
    go.click(
        app.verify,
        [source, edits, picker],
        [verdict, facts, panels, raw],
        api_name="verify",
        concurrency_limit=1,
        concurrency_id="verify",
    )

    gr.Markdown(
        "### Which weights carry the fix? (weight patching)\nEach component this session's edit changed "
        "— the trained site, or one head's V or O slice — is copied alone from the corrected model into "
        "the original, and the edit's facts are scored on that hybrid.",
        elem_classes="muted",
    )
    with gr.Row():
        granularity = gr.Radio(
            [("each site", "site"), ("each head's V and O slices", "head")], value="site", label="Components", scale=3
        )
        patch = gr.Button("Patch weights", scale=1)
    summary = gr.Markdown(elem_id="weight-summary")
    chart = gr.Plot(label="Weight patching", show_label=False, elem_id="weight-chart")
    weights = gr.JSON(visible=False)
    patch.click(
        app.patch_weights,
        [granularity, edits, picker],
        [summary, chart, weights],
        api_name="patch_weights",
        concurrency_limit=1,
        concurrency_id="patching",
    )
    return [verdict, facts, panels, raw, summary, chart, weights]
