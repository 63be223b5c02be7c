"""The model picker: the line describing the served model, and :class:`ModelView` — every component that
switching models updates, named once, so the event's outputs and the callback's values cannot drift apart."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import gradio as gr

from surgery.arch import count_parameters
from surgery.evaluation.panels import Panel
from surgery.serve.registry import ModelChoice, ModelRegistry, ServedModel
from surgery.serve.sessions import SessionEdit, StartUp

from .common import Components, device_of
from .diagnose import DiagnoseTab, examples_update, first_fact
from .surgery import (
    SurgeryResults,
    SurgeryTab,
    facts_json,
    facts_note,
    facts_rows,
    layer_choices,
    repo_name,
    site_choices,
    surgery_results,
)


@dataclass
class ModelView(Components):
    """What switching models updates: the components (:meth:`of_page`) or their new values (:meth:`of_model`),
    in one field order (:meth:`~ui.common.Components.values`)."""

    line: object
    examples: object
    prompt: object  # the Diagnose tab's prompt, target and competitor
    target: object
    competitor: object
    site: object  # the Surgery tab's setup
    layer: object
    note: object
    table: object
    facts: object
    gen_prompt: object
    repo: object
    summary: object  # this session's edit of the model (SurgeryResults), or the empty state
    metrics: object
    outcome: object
    downloads: object
    report: object
    results_box: object  # the results' visibility

    @classmethod
    def of_page(cls, line: gr.Markdown, diagnose: DiagnoseTab, surgery: SurgeryTab) -> ModelView:
        """The page's components that a model switch updates."""
        return cls(
            line=line,
            examples=diagnose.examples,
            prompt=diagnose.prompt,
            target=diagnose.target,
            competitor=diagnose.competitor,
            site=surgery.site,
            layer=surgery.layer,
            note=surgery.note,
            table=surgery.table,
            facts=surgery.facts,
            gen_prompt=surgery.gen_prompt,
            repo=surgery.repo,
            **_results(surgery.results),
            results_box=surgery.results_box,
        )

    @classmethod
    def of_model(cls, served: ServedModel, edit: SessionEdit | None) -> ModelView:
        """The values for ``served``, showing this session's ``edit`` of it (if any)."""
        first = first_fact(served)
        return cls(
            line=model_line(served),
            examples=examples_update(served),
            prompt=first.prompt,
            target=first.target,
            competitor="",
            site=gr.Radio(choices=site_choices(served), value="wv"),
            layer=gr.Dropdown(choices=layer_choices(served), value="auto"),
            note=facts_note(served),
            table=facts_rows(served),
            facts=facts_json(served),
            gen_prompt=first.prompt,
            repo=repo_name(served),
            **_results(surgery_results(edit, served.layout)),
            results_box=gr.Column(visible=edit is not None),
        )


def _results(results: SurgeryResults) -> dict:
    """The results' fields by name (not ``asdict``, which would deep-copy components)."""
    return {f.name: getattr(results, f.name) for f in fields(results)}


def model_line(served: ServedModel) -> str:
    lay, loaded = served.layout, served.loaded
    name = (
        "bundled demo model"
        if loaded.is_demo
        else Path(served.key).name
        if Path(served.key).is_absolute()
        else served.key
    )
    last = lay.n_layer - 1
    return (
        f"Model: **{name}** ({loaded.model.config.model_type}) · {count_parameters(loaded.model) / 1e6:.1f}M "
        f"parameters · {lay.n_layer} layers × {lay.n_head} heads · running on "
        f"{device_of(served).type.upper()}. Layers are shown 1-indexed as in the reference write-up "
        f"({lay.label(last)} = `{lay.adapter.block(last)}`)."
    )


def picker_dropdown(registry: ModelRegistry, served: ServedModel) -> gr.Dropdown:
    return gr.Dropdown(
        [(c.label, c.key) for c in registry.choices],
        value=served.key,
        label="Model",
        info="each model is loaded once, on first use, and shared; your edits stay in your session, one per model",
        scale=1,
        min_width=280,
        elem_id="model-picker",
    )


def single_model_registry(startup: StartUp, panel: Panel | None = None) -> ModelRegistry:
    """A registry serving one already loaded model (tests, and embedding the app around a model in memory)."""
    loaded = startup.loaded
    key = "assets/demo-model" if loaded.is_demo else loaded.source
    choice = ModelChoice(key, "bundled demo model" if loaded.is_demo else Path(loaded.source).name, loaded.source)
    return ModelRegistry(
        [choice],
        loaded={key: loaded},
        panels={key: panel} if panel is not None else None,
        fallback_reason=startup.fallback_reason,
    )
