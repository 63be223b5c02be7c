"""The Diagnose tab: a prompt, its target and competitor, the verdict, the logit lens, the per-head attribution
and the top heads; below it the causal check (activation patching). Its Markdown and table helpers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import gradio as gr
import pandas as pd

from surgery.arch import Layout
from surgery.diagnosis.diagnose import Diagnosis
from surgery.evaluation.facts import Fact
from surgery.patching.activations import ActivationPatching
from surgery.serve.registry import ServedModel

if TYPE_CHECKING:
    from .callbacks import SurgeryApp

TOP_HEADS = 12
PROMOTES_TARGET, PROMOTES_COMPETITOR = "promotes the target", "promotes the competitor"
# "France" -> "Poland": one token in the demo, GPT-2 and Gemma vocabularies
DEFAULT_CORRUPT = "The capital of Poland is"


@dataclass
class DiagnoseTab:
    """The Diagnose tab's components that the page (the model picker) reads or updates."""

    prompt: gr.Textbox
    target: gr.Textbox
    competitor: gr.Textbox
    examples: gr.Dataset
    outputs: list  # what the diagnose event fills: verdict, lens, heatmap, bars, raw
    patching: list  # what activation patching fills: summary, positions, heads, raw


# ----------------------------------------------------------------------------------------------------------------
# Result -> Markdown and table rows.
# ----------------------------------------------------------------------------------------------------------------


def top_heads(d: Diagnosis, k: int, layout: Layout) -> pd.DataFrame:
    """The ``k`` heads with the largest |target − competitor| attribution (:meth:`Diagnosis.top_heads`), for a
    bar chart (the chart orders them from the strongest push towards the target to the strongest push towards
    the competitor)."""
    heads = d.top_heads(k)
    return pd.DataFrame(
        {
            "head": [layout.label(a.layer, a.head) for a in heads],
            "target − competitor": [a.target - a.competitor for a in heads],
            "pushes": [PROMOTES_TARGET if a.target > a.competitor else PROMOTES_COMPETITOR for a in heads],
            "target": [a.target for a in heads],
            "competitor": [a.competitor for a in heads],
        }
    )


def verdict_markdown(d: Diagnosis) -> str:
    """The verdict sentence, headed by what the model actually answers."""
    v = d.divergence
    after = f" after {v.before!r}" if v is not None and v.before else ""  # read at the answer's first missed piece
    head = (
        f"**{d.verdict.capitalize()}** · the model answers **{d.prediction.text!r}**{after}; "
        f"target {d.target.text!r} is rank {d.target.rank} ({d.target.logit:.2f}) vs "
        f"{d.competitor.text!r} ({d.competitor.logit:.2f})"
    )
    return f"{head}\n\n{d.summary()}"


def activation_markdown(r: ActivationPatching, kind: str, layout: Layout) -> str:
    """Both runs' logit differences and the units restoring the most of it."""
    layer, pos, value = r.grids[kind].best()
    clean, corrupt = r.clean_tokens[pos], r.corrupt_tokens[pos]
    token = repr(clean) if clean == corrupt else f"{clean!r}→{corrupt!r}"
    h_layer, head, h_value = r.grids["head"].best()
    what = {"resid": "block output", "attn": "attention output", "mlp": "MLP output"}[kind]
    return (
        f"`d = logit({r.target.text!r}) − logit({r.competitor.text!r})` ({r.competitor_source}): clean "
        f"**{r.logit_diff_clean:+.3f}**, corrupted **{r.logit_diff_corrupt:+.3f}**. Restoring the most: the "
        f"{what} of **{layout.label(layer)}** at {token} (**{value:.2f}** of the difference) and head "
        f"**{layout.label(h_layer, head)}** at every position (**{h_value:.2f}**). 1 = the clean run's "
        f"difference, 0 = the corrupted run's."
    )


# ----------------------------------------------------------------------------------------------------------------
# The examples: the served model's fact panel.
# ----------------------------------------------------------------------------------------------------------------


def first_fact(served: ServedModel) -> Fact:
    """What the Diagnose and generation boxes start with: the panel's first fact (France without one)."""
    return served.facts[0] if served.facts else Fact("The capital of France is", " Paris")


def example_label(fact: Fact) -> str:
    """'France → Paris' for 'The capital of France is' / ' Paris' (the last word of the prompt otherwise)."""
    words = fact.prompt.strip().removesuffix(" is").split()
    return f"{words[-1] if words else fact.prompt} → {fact.target.strip()}"


def example_fields(served: ServedModel) -> dict:
    """The Diagnose tab's examples: the model's fact panel, one click each (``gr.Dataset`` arguments)."""
    facts = served.facts
    return {
        "samples": [[f.prompt, f.target] for f in facts],
        "sample_labels": [example_label(f) for f in facts],
        "label": f"The {len(facts)} capitals of the fact panel (click one to diagnose it)",
        "visible": bool(facts),
    }


def examples_update(served: ServedModel) -> gr.Dataset:
    return gr.Dataset(**example_fields(served))


def pick_example(sample) -> tuple[str, str, str]:
    return sample[0], sample[1], ""


# ----------------------------------------------------------------------------------------------------------------
# The tab.
# ----------------------------------------------------------------------------------------------------------------


def diagnose_tab(app: SurgeryApp, served: ServedModel, demo: gr.Blocks, picker: gr.Dropdown) -> DiagnoseTab:
    with gr.Row():
        with gr.Column(scale=2):
            first = first_fact(served)
            prompt = gr.Textbox(label="Prompt", value=first.prompt, max_lines=4)
            with gr.Row():
                target = gr.Textbox(
                    label="Target (the right answer)",
                    value=first.target,
                    info="words usually start with a space: ' Paris'",
                )
                competitor = gr.Textbox(label="Competitor (optional)", placeholder="default: the model's answer")
            run = gr.Button("Diagnose", variant="primary")
            examples = gr.Dataset(
                components=[prompt, target], samples_per_page=12, elem_id="examples", **example_fields(served)
            )
        with gr.Column(scale=3):
            verdict = gr.Markdown("Press **Diagnose**.", elem_classes="verdict", elem_id="verdict")
            lens = gr.Plot(
                label="Logit lens: target vs competitor after each layer", show_label=False, elem_id="lens-plot"
            )
    with gr.Row():
        heatmap = gr.Plot(
            label="Per-head direct logit attribution: target − competitor",
            show_label=False,
            elem_id="head-heatmap",
            scale=3,
        )
        bars = gr.BarPlot(
            x="head",
            y="target − competitor",
            color="pushes",
            sort="-y",
            x_label_angle=-40,
            color_map={PROMOTES_TARGET: "#2563eb", PROMOTES_COMPETITOR: "#dc2626"},
            tooltip=["head", "target", "competitor", "target − competitor"],
            title=f"Top {TOP_HEADS} heads by |target − competitor|",
            show_label=False,
            elem_id="top-heads",
            height=440,
            scale=2,
        )
    with gr.Accordion("Full diagnosis (JSON)", open=False):
        raw = gr.JSON(label="diagnosis")
    outputs = [verdict, lens, heatmap, bars, raw]
    inputs = [prompt, target, competitor, picker]
    gr.on(
        [run.click, prompt.submit, target.submit, competitor.submit],
        app.diagnose,
        inputs,
        outputs,
        api_name="diagnose",
        concurrency_limit=4,
        concurrency_id="diagnose",
    )
    # The page opens on the first example already diagnosed, rather than on empty charts.
    demo.load(app.diagnose, inputs, outputs, api_visibility="private", concurrency_limit=4, concurrency_id="diagnose")
    examples.click(
        pick_example,
        examples,
        [prompt, target, competitor],
        queue=False,
        api_visibility="private",
    ).then(app.diagnose, inputs, outputs, api_visibility="private", concurrency_limit=4, concurrency_id="diagnose")
    patching = activation_patching_view(app, prompt, target, competitor, picker)
    return DiagnoseTab(
        prompt=prompt, target=target, competitor=competitor, examples=examples, outputs=outputs, patching=patching
    )


def activation_patching_view(app: SurgeryApp, prompt, target, competitor, picker) -> list:
    with gr.Accordion("Causal check: activation patching", open=False, elem_id="activation-patching"):
        gr.Markdown(
            "Run the prompt above (clean) and a corrupted prompt of the same token length, then run the "
            "corrupted one again with one activation taken from the clean run — every block at every "
            "position, and every head at all positions. Each cell is the fraction of the clean run's "
            "lead of the target over the competitor that this one activation restores. The target and "
            "competitor are the ones above (default competitor: the corrupted run's answer).",
            elem_classes="muted",
        )
        with gr.Row():
            corrupt = gr.Textbox(
                label="Corrupted prompt",
                value=DEFAULT_CORRUPT,
                scale=3,
                info="same number of tokens as the prompt: swap a word for one of the same length",
            )
            kind = gr.Radio(
                [("block output", "resid"), ("attention output", "attn"), ("MLP output", "mlp")],
                value="resid",
                label="Block × position grid",
                scale=2,
            )
            go = gr.Button("Patch activations", scale=1)
        summary = gr.Markdown(elem_id="activation-summary")
        with gr.Row():
            positions = gr.Plot(label="Block × position", show_label=False, elem_id="patching-positions")
            heads = gr.Plot(label="Block × head", show_label=False, elem_id="patching-heads")
        raw = gr.JSON(visible=False)
    gr.on(
        [go.click, corrupt.submit],
        app.patch_activations,
        [prompt, corrupt, target, competitor, kind, picker],
        [summary, positions, heads, raw],
        api_name="patch_activations",
        concurrency_limit=1,
        concurrency_id="patching",
    )
    return [summary, positions, heads, raw]
