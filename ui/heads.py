"""The Heads tab: input-free views of every attention head, from the weights alone."""

from __future__ import annotations

from typing import TYPE_CHECKING

import gradio as gr

from surgery.diagnosis.static_heads import HeadStats
from surgery.serve.registry import ServedModel

from .common import round_or_none

if TYPE_CHECKING:
    from .callbacks import SurgeryApp

HEAD_COLUMNS = [
    "head",
    "module",
    "QK overlap",
    "QK norm",
    "OV norm",
    "copying score",
    "key response: proper nouns",
    "key response: function words",
]


def head_rows(served: ServedModel, table: list[HeadStats]) -> list[list]:
    """One row of :data:`HEAD_COLUMNS` per head."""
    return [
        [
            s.label,
            f"{served.layout.adapter.block(s.layer)} head {s.head}",
            *(
                round_or_none(v)
                for v in (
                    s.qk_overlap,
                    s.qk_norm,
                    s.ov_norm,
                    s.copying_score,
                    s.key_response.get("proper_noun"),
                    s.key_response.get("function_word"),
                )
            ),
        ]
        for s in table
    ]


def heads_tab(app: SurgeryApp, tab: gr.Tab, picker: gr.Dropdown) -> list:
    gr.Markdown(
        "Input-free views of every attention head, from the weights alone (computed when this tab is "
        "opened, once per model): how much each head's query and key read the same input dimensions (QK "
        "overlap), and how strongly its keys respond to each class of token.",
        elem_classes="muted",
    )
    with gr.Row():
        overlap = gr.Plot(label="QK overlap per head", show_label=False, scale=3)
        keys = gr.Plot(label="Key response by token class, per layer", show_label=False, scale=2)
    table = gr.Dataframe(
        headers=HEAD_COLUMNS, label="Every head (click a column to sort)", interactive=False, max_height=420
    )
    tab.select(app.heads, picker, [overlap, keys, table], api_name="heads", concurrency_limit=1, concurrency_id="heads")
    return [overlap, keys, table]
