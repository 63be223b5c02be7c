"""The Surgery tab: the facts to fix, the method, site and layer, the edit's results; then original vs corrected on any
prompt, and pushing the corrected model to the Hub. Its Markdown and choice helpers."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import gradio as gr

from surgery.arch import SITES, Layout, count_parameters
from surgery.core.errors import SurgeryError
from surgery.edit.editors import METHOD_DESCRIPTIONS, METHODS
from surgery.edit.training import TRACE
from surgery.serve.registry import ServedModel
from surgery.serve.sessions import SessionEdit

from .common import (
    SIDE_BY_SIDE_COLUMNS,
    Components,
    evaluation_markdown,
    parse_facts,
    side_by_side_rows,
)

if TYPE_CHECKING:
    from .callbacks import SurgeryApp

NO_EDIT_YET = "The shared model is never changed: your edit lives in your session only."
METHOD_NAMES = {"wv": "wv", "rome": "ROME", "ft": "FT-L", "memit": "MEMIT", "alphaedit": "AlphaEdit"}
SITE_INFO = "wv trains only the value projection of one layer: Q, K and everything else stay bitwise identical"
SITE_INFO_OTHERS = "for method wv only: {name} edits the MLP output projection{s}, whatever the site"


@dataclass
class SurgeryResults(Components):
    """What the Surgery tab shows of an edit: components, or their values (:func:`surgery_results`)."""

    summary: object
    metrics: object
    outcome: object
    downloads: object
    report: object


@dataclass
class SurgeryTab:
    """The Surgery tab's components that the page (the model picker) reads or updates."""

    method: gr.Dropdown
    site: gr.Radio
    layer: gr.Dropdown
    note: gr.Markdown
    table: gr.Dataframe
    facts: gr.Code
    gen_prompt: gr.Textbox
    repo: gr.Textbox
    results: SurgeryResults
    results_box: gr.Column
    generated: list  # cleared when the model changes: the two continuations and the push message


# ----------------------------------------------------------------------------------------------------------------
# Choices and notes for the served model.
# ----------------------------------------------------------------------------------------------------------------


def site_choices(served: ServedModel) -> list[tuple[str, str]]:
    total = count_parameters(served.model)
    out = []
    for site in SITES:
        n = served.layout.site_size(served.model, site, 0)
        out.append((f"{site} · {n:,} params ({100 * n / total:.2f}%)", site))
    return out


def method_choices() -> list[tuple[str, str]]:
    """Every editor of :data:`~surgery.edit.editors.METHODS`, named with its one-line description."""
    return [(f"{m} — {METHOD_DESCRIPTIONS[m].replace(' (--site)', '')}", m) for m in METHODS]


def site_for_method(method: str) -> gr.Radio:
    """The site selector for ``method``: a choice for ``wv``; greyed out for the other methods, which ignore it
    (:meth:`~ui.callbacks.SurgeryApp.operate`)."""
    if method == "wv":
        return gr.Radio(interactive=True, info=SITE_INFO)
    many = method in ("memit", "alphaedit")
    name = METHOD_NAMES.get(method, method)
    return gr.Radio(value="wv", interactive=False, info=SITE_INFO_OTHERS.format(name=name, s="s" if many else ""))


def layer_choices(served: ServedModel) -> list[tuple[str, str]]:
    prescribed, layout = served.prescribed_layer, served.layout
    auto = (
        f"auto — prescribed: {layout.label(prescribed, path=True)}"
        if prescribed is not None
        else "auto — prescribed by the diagnosis"
    )
    trace = ("trace — MEMIT, AlphaEdit: the blocks storing the subjects (causal tracing; facts need a subject)", TRACE)
    blocks = [(layout.label(layer, path=True), str(layer)) for layer in range(layout.n_layer)]
    return [(auto, "auto"), trace, *blocks]


def facts_note(served: ServedModel) -> str:
    """Which panel facts the base model gets wrong (surgery should fix them) and right (the edit must keep them)."""
    if not served.facts:
        return "No bundled fact fits this model's vocabulary: write the facts to fix as JSON."
    try:
        scores = served.fact_scores
    except SurgeryError as e:  # a panel that does not fit this tokenizer: say so instead of failing to start
        return f"The fact panel does not fit this model: {html.escape(str(e), quote=False)}."
    wrong = [r for r in scores.results if not r.correct]
    right = [r for r in scores.results if r.correct]
    text = f"The base model gets **{len(wrong)} of {scores.total}** panel facts wrong"
    if wrong:
        text += ": " + ", ".join(f"{r.target.strip()} (answers {r.answer.strip()!r})" for r in wrong)
    if right:
        text += ". Right now, and kept in the facts so the edit must not break them: " + ", ".join(
            r.target.strip() for r in right
        )
    return text + "."


def fact_row(fact) -> list[str]:
    """A fact as a row of the facts table: prompt, target, subject (blank when it names none)."""
    return [fact.prompt, fact.target, fact.subject or ""]


def facts_rows(served: ServedModel) -> list[list[str]] | None:
    return [fact_row(p) for p in served.facts] or None


def facts_json(served: ServedModel) -> str:
    return json.dumps([p.to_dict() for p in served.facts], indent=1)


def repo_name(served: ServedModel) -> str:
    return f"{Path(served.key).name}-surgery"


def facts_table(facts_json: str):
    try:
        return [fact_row(p) for p in parse_facts(facts_json)]
    except SurgeryError:
        return gr.skip()


def table_to_json(rows) -> str:
    try:
        return json.dumps([p.to_dict() for p in parse_facts(rows)], indent=1)
    except SurgeryError:
        return gr.skip()


# ----------------------------------------------------------------------------------------------------------------
# An edit -> Markdown and table rows.
# ----------------------------------------------------------------------------------------------------------------


def operation_markdown(report, layout: Layout) -> str:
    c = report.comparison
    n = len(c.facts)
    blocks = report.config.get("layers") or [report.layer]
    if len(blocks) > 1:  # MEMIT, AlphaEdit: one update spread over several blocks
        where = f"blocks {', '.join(map(str, blocks))} ({' – '.join(layout.label(b) for b in blocks)})"
    else:
        where = f"`{report.block}` ({layout.label(report.layer)})" if report.block else f"block {report.layer}"
    how = "" if report.method == "wv" else f" with **{METHOD_NAMES.get(report.method, report.method)}**"
    para = c.evaluation()["paraphrase"]
    paraphrases = (
        f" Paraphrases: {para['before']}/{para['total']} → **{para['after']}/{para['total']}**."
        if para["total"]
        else ""
    )
    return (
        f"**Surgery done**{how} on `{report.site}` of {where} — "
        f"{report.params_in_site:,} parameters ({100 * report.fraction:.2f}% of the model), "
        f"{report.steps} steps in {report.train_time_s:.1f} s. Facts said: **{c.facts_before}/{n} → "
        f"{c.facts_after}/{n}**.{paraphrases}\n\n*Layer: {report.layer_reason}.*"
    )


def surgery_results(edit: SessionEdit | None, layout: Layout) -> SurgeryResults:
    """What the Surgery tab shows for an edit (summary, evaluation table, side-by-side rows, downloads, report
    JSON), or its empty state."""
    if edit is None:
        return SurgeryResults(summary=NO_EDIT_YET, metrics="", outcome=None, downloads=None, report=None)
    report = edit.result.report
    return SurgeryResults(
        summary=operation_markdown(report, layout),
        metrics=evaluation_markdown(report.rows(), report.comparison),
        outcome=side_by_side_rows(report.comparison),
        downloads=[str(p) for p in edit.files],
        report=edit.result.to_dict(),
    )


# ----------------------------------------------------------------------------------------------------------------
# The tab.
# ----------------------------------------------------------------------------------------------------------------


def surgery_tab(app: SurgeryApp, served: ServedModel, edits: gr.State, picker: gr.Dropdown, login: bool) -> SurgeryTab:
    facts_list = served.facts
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            note = gr.Markdown(facts_note(served), elem_classes="muted")
            with gr.Tabs():
                with gr.Tab("Facts (table)"):
                    table = gr.Dataframe(
                        value=facts_rows(served),
                        headers=["prompt", "target", "subject (optional)"],
                        datatype=["str", "str", "str"],
                        interactive=True,
                        row_count=len(facts_list) or 1,
                        show_label=False,
                        column_widths=["55%", "25%", "20%"],
                    )
                with gr.Tab("Facts (JSON)"):
                    facts = gr.Code(
                        value=facts_json(served),
                        language="json",
                        interactive=True,
                        show_label=False,
                        elem_id="facts-json",
                    )
        with gr.Column(scale=2):
            method = gr.Dropdown(
                method_choices(),
                value="wv",
                label="Method",
                info="wv: our repair of one site. The others edit the MLP output projection of the layer (ROME, "
                "FT-L) or of 5 blocks (MEMIT, AlphaEdit: with layer auto, where causal tracing finds the facts' "
                "subjects stored; else the 5 ending at the layer); ROME, MEMIT and AlphaEdit first compute key "
                "statistics from text, once per model and block",
                elem_id="method",
            )
            site = gr.Radio(
                site_choices(served),
                value="wv",
                label="Site (trainable parameters)",
                info=SITE_INFO,
            )
            layer = gr.Dropdown(layer_choices(served), value="auto", label="Layer")
            go = gr.Button("Perform surgery", variant="primary", elem_id="operate")
    summary = gr.Markdown(NO_EDIT_YET, elem_classes="verdict", elem_id="surgery-summary", min_height=64)
    with gr.Column(visible=False) as results_box:
        gr.Markdown(
            "**Original vs corrected** on the edited facts and their paraphrases (never trained on), and "
            "the evaluation of the edit: efficacy, generalization (paraphrases, unedited facts of the same "
            "relation) and specificity (neighbourhood prompts, side effects, perplexity, KL).",
            elem_classes="muted",
        )
        with gr.Row(equal_height=False):
            outcome = gr.Dataframe(
                headers=SIDE_BY_SIDE_COLUMNS,
                label="Original vs corrected",
                interactive=False,
                wrap=True,
                scale=3,
                elem_id="side-by-side",
            )
            with gr.Column(scale=2, min_width=420):
                metrics = gr.Markdown(elem_id="surgery-evaluation")
        downloads = gr.File(
            label="Downloads: patch.safetensors (only the changed weights) and report.json",
            file_count="multiple",
            interactive=False,
        )
        report = gr.JSON(visible=False)
    results = SurgeryResults(summary=summary, metrics=metrics, outcome=outcome, downloads=downloads, report=report)
    method.change(site_for_method, method, site, api_visibility="private", queue=False)
    table.input(table_to_json, table, facts, api_visibility="private", queue=False)
    facts.input(facts_table, facts, table, api_visibility="private", queue=False)

    gr.Markdown(
        "### Original vs corrected, any prompt\nThe same greedy continuation from the shared original "
        "model and from this session's corrected model (filled in after surgery with the first fact)."
    )
    with gr.Row():
        gen_prompt = gr.Textbox(label="Prompt", value=facts_list[0].prompt if facts_list else "", scale=4)
        tokens = gr.Slider(
            1, app.limits.max_new_tokens, value=min(8, app.limits.max_new_tokens), step=1, label="New tokens", scale=2
        )
        gen = gr.Button("Generate", scale=1)
    with gr.Row():
        original = gr.Textbox(label="Original model", lines=2, elem_id="gen-original")
        corrected = gr.Textbox(label="Corrected model (this session)", lines=2, elem_id="gen-corrected")
    gr.on(
        [gen.click, gen_prompt.submit],
        app.generate,
        [gen_prompt, tokens, edits, picker],
        [original, corrected],
        api_name="generate",
        concurrency_limit=2,
        concurrency_id="generate",
    )
    go.click(
        app.operate,
        [facts, site, layer, method, edits, picker],
        [*results.values(), edits],
        api_name="operate",
        concurrency_limit=1,
        concurrency_id="surgery",
        show_progress_on=summary,
    ).success(
        lambda: gr.Column(visible=True),
        None,
        results_box,
        api_visibility="private",
        queue=False,
    ).then(
        app.generate,
        [gen_prompt, tokens, edits, picker],
        [original, corrected],
        api_visibility="private",
        concurrency_limit=2,
        concurrency_id="generate",
    )

    gr.Markdown(
        "### Ship it\nPush the corrected model (model folder, edit file, report and model card) to a new "
        "repository in your own Hugging Face account."
        + ("" if login else " Signing in works on the Space; locally, use `python -m surgery push` with `HF_TOKEN`.")
    )
    with gr.Row():
        if login:
            gr.LoginButton(scale=1)
        repo = gr.Textbox(label="Repository name", value=repo_name(served), scale=3)
        private = gr.Checkbox(label="private", value=False, scale=1)
        push = gr.Button("Push to Hub", scale=1)
    pushed = gr.Markdown()
    push.click(
        app.push, [repo, private, edits, picker], pushed, api_name="push", concurrency_limit=1, concurrency_id="push"
    )
    return SurgeryTab(
        method=method,
        site=site,
        layer=layer,
        note=note,
        table=table,
        facts=facts,
        gen_prompt=gen_prompt,
        repo=repo,
        results=results,
        results_box=results_box,
        generated=[original, corrected, pushed],
    )
