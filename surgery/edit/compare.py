"""Editors side by side: every method (or site) run with :func:`~surgery.edit.training.operate` on the same facts,
the same base model and the same evaluation (``compare-editors``, ``compare-sites``; ``docs/editors.md``).

The base model's evaluation does not depend on the edit, so it is computed once, before the first run, into one
:class:`~surgery.evaluation.memo.EvaluationMemo` that every run reads: each run's wall time is then its own work
(diagnosis, layer choice, the edit, the evaluation of the edited model), not the base's. A run that fails
(:class:`~surgery.core.errors.SurgeryFailed`: not fixed within its budget, diverged, out of time) is kept as a row
saying why; bad input common to every run (no facts, nothing to fix) raises as ``operate`` does.

Every figure of a row is read from the run's own :class:`~surgery.evaluation.report.SurgeryReport`
(:func:`report_figures`), so the table agrees with each run's ``report.json``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from torch import nn

from ..arch import layout_of
from ..core.errors import InputError, NonFiniteError, SurgeryFailed
from ..core.memory import PeakMemory, peak_memory
from ..evaluation.facts import Fact
from ..evaluation.memo import EvaluationMemo
from ..evaluation.panels import Panel, panel_for_model
from ..evaluation.report import SurgeryReport, compare
from ..evaluation.scoring import score_probes
from .editors import METHODS, MULTI_BLOCK
from .training import SurgeryConfig, SurgeryResult, operate, preservation_texts

log = logging.getLogger(__name__)

# progress_bar(desc, unit) -> (progress, close), as surgery.core.progress.progress_bar
ProgressBars = Callable[..., tuple[Callable[..., None], Callable[[], None]]]

# The lists a report judges, by their key in the figures and their label; "facts" is efficacy.
LISTS = {
    "facts": "efficacy",
    "paraphrase": "paraphrase",
    "relation": "unedited facts of the relation",
    "neighbourhood": "neighbourhood",
    "general": "general",
    "side_effects": "side effects",
}


def _counts(evaluation: dict) -> dict[str, dict]:
    """The judged counts of every list in :data:`LISTS` out of :meth:`Comparison.evaluation`."""
    spec = evaluation["specificity"]
    return {
        "facts": evaluation["efficacy"],
        "paraphrase": evaluation["paraphrase"],
        "relation": evaluation["relation"],
        "neighbourhood": spec["neighbourhood"],
        "general": evaluation["general"],
        "side_effects": spec["side_effects"],
    }


def evaluation_figures(e: dict) -> dict:
    """The evaluation's part of :func:`report_figures`, from :meth:`Comparison.evaluation` (the ``evaluation`` of
    a ``report.json``): the counts of every list of :data:`LISTS`, fluency, KL and perplexity."""
    row: dict = {}
    for name, c in _counts(e).items():
        row[f"{name}_before"], row[f"{name}_after"], row[f"{name}_total"] = c["before"], c["after"], c["total"]
        row[f"{name}_first_token_before"] = c["first_token"]["before"]
        row[f"{name}_first_token_after"] = c["first_token"]["after"]
        if "fixed" in c:
            row[f"{name}_fixed"], row[f"{name}_broken"] = c["fixed"], c["broken"]
    return row | {
        "fluency_before": e["fluency"]["before"],
        "fluency_after": e["fluency"]["after"],
        "kl_unrelated": e["kl_unrelated"],
        "perplexity_before": e["perplexity"]["before"],
        "perplexity_after": e["perplexity"]["after"],
    }


def report_figures(report: SurgeryReport) -> dict:
    """One flat row of a report's headline figures: for every list of :data:`LISTS`, ``{list}_before``,
    ``{list}_after`` and ``{list}_total`` (said, by generation, strict) with ``{list}_first_token_before/after``
    (the first-token diagnostic) and, where the report counts them, ``{list}_fixed``/``{list}_broken``; fluency
    (n-gram entropy), KL and perplexity; the weights (parameters in the site and changed, ΔL2, max |Δ|); the
    method, site, layer and why; steps and wall time."""
    w = report.weights
    return {
        "method": report.method,
        "site": report.site,
        "layer": report.layer,
        "layer_reason": report.layer_reason,
        **evaluation_figures(report.comparison.evaluation()),
        "params": report.params_in_site,
        "params_changed": w.params_changed,
        "params_total": report.params_total,
        "delta_l2": w.delta_l2,
        "max_abs_delta": w.max_abs_delta,
        "qk_unchanged": w.qk_unchanged,
        "steps": report.steps,
        "wall_time_s": report.wall_time_s,
    }


@dataclass
class ComparedRun:
    """One method (or site) of a comparison: its config, its result or why it failed, its peak memory.
    ``wall_time_s``: the report's (the whole ``operate``) or, for a failed run, until it failed."""

    name: str
    config: SurgeryConfig
    result: SurgeryResult | None
    error: str | None
    wall_time_s: float
    memory: PeakMemory

    @property
    def ok(self) -> bool:
        return self.result is not None

    def figures(self) -> dict:
        """:func:`report_figures` of the run's report (empty for a failed run)."""
        return report_figures(self.result.report) if self.ok else {}

    def to_dict(self) -> dict:
        head = {"name": self.name, "method": self.config.method, "ok": self.ok}
        if not self.ok:
            head |= {"error": self.error, "wall_time_s": self.wall_time_s}
        return head | self.figures() | {"peak_memory": self.memory.to_dict()}


@dataclass
class EditorComparison:
    """The runs of :func:`compare_configs` in order, the base model's figures (the ``_before`` of every list),
    how long the shared base evaluation took and the facts compared on."""

    runs: list[ComparedRun]
    base: dict
    base_evaluation_s: float
    facts: list[Fact] = field(default_factory=list)
    layer: int | None = None  # as requested: None is auto (each run's own layer choice)

    @property
    def failed(self) -> list[str]:
        return [r.name for r in self.runs if not r.ok]

    def to_dict(self) -> dict:
        memory = next((r.memory.how for r in self.runs), "")
        return {
            "facts": len(self.facts),
            "layer_requested": "auto" if self.layer is None else self.layer,
            "base": self.base,
            "base_evaluation_s": self.base_evaluation_s,
            "peak_memory_how": memory,
            "runs": [r.to_dict() for r in self.runs],
        }

    def to_markdown(self, title: str = "Editors compared") -> str:
        """The comparison as a Markdown page: the table, each run's layer and why, failures, and how to read it."""
        from .compare_report import comparison_markdown

        return comparison_markdown(self, title)

    def figure(self):
        """The headline figures per method as a :class:`matplotlib.figure.Figure` (Agg canvas, no pyplot)."""
        from .compare_report import comparison_figure

        return comparison_figure(self)


def base_figures(comparison_row: dict) -> dict:
    """The base model's figures out of a run's :func:`report_figures`: every ``_before`` figure and the totals."""
    keep = {k: v for k, v in comparison_row.items() if k.endswith(("_before", "_total")) and k != "params_total"}
    return {k.removesuffix("_before"): v for k, v in keep.items()}


def evaluate_base(
    model: nn.Module,
    tokenizer,
    facts: Sequence[Fact],
    panel: Panel,
    unrelated: Sequence[str] | None,
    memo: EvaluationMemo,
) -> None:
    """Fill ``memo`` with everything a run's evaluation computes on the base model (its answers to the facts, the
    paraphrases and the panel's probes, its fluency generations, its perplexity and its hidden states on the
    unrelated text), as :func:`operate` would ask for them. The base judged against itself costs nothing more but
    the unrelated text's forward pass."""
    texts, _ = preservation_texts(panel, tokenizer, layout_of(model).n_ctx, unrelated)
    before = score_probes(model, tokenizer, facts, memo)
    compare(model, model, tokenizer, facts, panel, texts, before=before, after=before, memo=memo)


def compare_configs(
    model: nn.Module,
    tokenizer,
    facts: Sequence[Fact],
    configs: Mapping[str, SurgeryConfig],
    panel: Panel | None = None,
    unrelated: Sequence[str] | None = None,
    memo: EvaluationMemo | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress_bars: ProgressBars | None = None,
    require_all: bool = False,
) -> EditorComparison:
    """Run :func:`operate` once per named config on the same ``facts``, base, ``panel`` and ``unrelated`` text,
    the base evaluated once (into ``memo``, default a fresh one). Without ``require_all`` (the default) a run that
    fixes only some facts is reported with its efficacy, as the field compares editors; with it, that run fails.
    A run that raises
    :class:`~surgery.core.errors.SurgeryFailed` or :class:`~surgery.core.errors.NonFiniteError` (an editor's
    optimization diverged) becomes a failed row; any other error (bad facts, nothing to fix, no routing failure
    for an auto layer) is the input's and raises. ``progress_bars(desc, unit=...)`` gives each run's
    ``(progress, close)`` (:func:`surgery.core.progress.progress_bar`); none by default. ``model`` is never
    modified."""
    facts = list(facts)
    if not facts:
        raise InputError('no facts given: give at least one {"prompt", "target"} to fix')
    if not configs:
        raise InputError("nothing to compare: give at least one method")
    panel = panel if panel is not None else panel_for_model(model)
    memo = memo if memo is not None else EvaluationMemo(model)
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    evaluate_base(model, tokenizer, facts, panel, unrelated, memo)
    base_s = time.perf_counter() - t0
    runs = []
    for name, config in configs.items():
        bars = [progress_bars(f"{name}"), progress_bars("key statistics", unit="token")] if progress_bars else []
        progress, stats_progress = (bars[0][0], bars[1][0]) if bars else (None, None)
        t = time.perf_counter()
        result, error = None, None
        with peak_memory(device) as memory:
            try:
                result = operate(
                    model,
                    tokenizer,
                    facts,
                    config,
                    unrelated=unrelated,
                    progress=progress,
                    panel=panel,
                    memo=memo,
                    cache_dir=cache_dir,
                    stats_progress=stats_progress,
                    require_all=require_all,
                )
            except (SurgeryFailed, NonFiniteError) as e:
                error = str(e)
                log.info("%s failed: %s", name, error)
            finally:
                for _, close in bars:
                    close()
        wall = result.report.wall_time_s if result is not None else time.perf_counter() - t
        runs.append(ComparedRun(name, config, result, error, wall, memory))
    ok = [r for r in runs if r.ok]
    base = base_figures(ok[0].figures()) if ok else {}
    layer = next(iter(configs.values())).layer
    return EditorComparison(runs, base, base_s, facts, layer)


def compare_editors(
    model: nn.Module,
    tokenizer,
    facts: Sequence[Fact],
    methods: Sequence[str] | None = None,
    config: SurgeryConfig = SurgeryConfig(),
    layers: Sequence[int] | None = None,
    **kwargs,
) -> EditorComparison:
    """Every editor of ``methods`` (default: all of :data:`~surgery.edit.editors.METHODS`) on the same facts:
    ``config`` with its ``method`` replaced (``wv`` runs ``config.site``; the other methods edit the MLP output
    projection, so their site is ``wv``'s default). ``layers`` (``--layers``, e.g. the papers' fixed layers) are
    the blocks of the multi-block editors (MEMIT, AlphaEdit) only; the one-block methods keep ``config.layer``.
    ``kwargs`` go to :func:`compare_configs`. Raises :class:`InputError` for an unknown or repeated method, or
    bad ``layers``."""
    return compare_configs(model, tokenizer, facts, editor_configs(methods, config, layers), **kwargs)


def editor_configs(
    methods: Sequence[str] | None, config: SurgeryConfig = SurgeryConfig(), layers: Sequence[int] | None = None
) -> dict[str, SurgeryConfig]:
    """Each method's :func:`method_config`, in order; :class:`InputError` for an unknown or repeated method, or
    ``layers`` that are bad or given without MEMIT or AlphaEdit among the methods. Cheap: the CLI checks its
    input with it before loading anything."""
    methods = list(METHODS if methods is None else methods)
    check_methods(methods)
    if layers is not None and not set(methods) & set(MULTI_BLOCK):
        raise InputError(f"--layers is for {' or '.join(MULTI_BLOCK)}, and none of the methods is")
    return {m: method_config(config, m, layers) for m in methods}


def method_config(config: SurgeryConfig, method: str, layers: Sequence[int] | None = None) -> SurgeryConfig:
    """``config`` for ``method`` in a comparison: ``wv`` keeps ``config.site``, the others edit the MLP output
    projection; ``layers``, when given, are the blocks of MEMIT and AlphaEdit (their last is then their block)."""
    site = config.site if method == "wv" else "wv"
    if layers is not None and method in MULTI_BLOCK:
        return replace(
            config, method=method, site=site, layer=None, layers=layers if isinstance(layers, str) else tuple(layers)
        )
    return replace(config, method=method, site=site)


def check_methods(methods: Sequence[str]) -> None:
    """Refuse, in one line, an empty list, an unknown method or one named twice."""
    if not methods:
        raise InputError(f"no method given: choose among {', '.join(METHODS)}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InputError(f"unknown method {unknown[0]!r}: choose among {', '.join(METHODS)}")
    repeated = sorted({m for m in methods if methods.count(m) > 1})
    if repeated:
        raise InputError(f"method {repeated[0]!r} is named twice")
