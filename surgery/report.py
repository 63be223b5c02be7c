"""What an edit did, before and after: facts, panels, KL and weight statistics, as one dataclass.

The same before/after rows feed the CLI, ``report.json``, the model card and ``verify``. The edit is judged as the
model-editing field reports it (ROME, MEMIT, EasyEdit), on prompts never trained on except the first:

* **efficacy**: the edited facts, now answered right (the only thing optimized);
* **paraphrase generalization**: the same facts in other wordings (each fact's ``paraphrases``);
* **relation generalization**: facts of the same relation that were *not* edited (the panel's ``relation``
  probes): how many the repair carried to, and whether the ones already right stayed right;
* **specificity**: the neighbourhood probes (answers that are function words or other entities) and the
  side-effect probes keep their answers;
* KL on the unrelated text and perplexity on the held-out passage.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from typing import Sequence

from torch import nn

from .evaluation import PanelResult, ProbeScores, evaluate_panel, mean_kl, score_probes
from .panels import Panel, Probe, fit_panel
from .patch import WeightStats

PERPLEXITY_TOLERANCE = 0.05  # verify: at most 5% relative perplexity increase counts as "no regression"


@dataclass
class FactOutcome:
    """One fact: the model's answer before and after the edit."""

    prompt: str
    target: str
    before: str
    after: str
    correct_before: bool
    correct_after: bool
    verdict: str | None = None  # diagnosis of the base model: routing / absence / correct

    def to_dict(self) -> dict:
        return asdict(self)


def fact_outcomes(before: ProbeScores, after: ProbeScores, verdicts: list[str] | None = None) -> list[FactOutcome]:
    """Pair the before and after scores of the same facts."""
    verdicts = verdicts or [None] * before.total
    return [
        FactOutcome(b.prompt, b.target, b.answer, a.answer, b.correct, a.correct, v)
        for b, a, v in zip(before.results, after.results, verdicts)
    ]


@dataclass
class Comparison:
    """Base and edited model side by side: facts, panels and KL (what ``verify`` and a report both show)."""

    facts: list[FactOutcome]
    panel_before: PanelResult
    panel_after: PanelResult
    kl_unrelated: float  # mean KL(base || edited) of next-token distributions on the unrelated text (NaN: none)
    paraphrases: list[FactOutcome] = field(default_factory=list)  # each fact's other wordings
    unavailable: list[str] = field(default_factory=list)  # panels or probes this tokenizer could not score

    @property
    def facts_before(self) -> int:
        return sum(f.correct_before for f in self.facts)

    @property
    def facts_after(self) -> int:
        return sum(f.correct_after for f in self.facts)

    def evaluation(self) -> dict:
        """Efficacy, generalization and specificity as counts ``{"before", "after", "total"}`` (module docstring);
        relation generalization also counts the unedited facts the repair ``fixed`` and those it ``broke``."""
        def counts(before: int, after: int, total: int, **extra) -> dict:
            return {"before": before, "after": after, "total": total, **extra}

        b, a = self.panel_before, self.panel_after
        rel = list(zip(b.relation.results, a.relation.results))
        spec_b = b.neighbourhood.correct + b.side_effects.correct
        spec_a = a.neighbourhood.correct + a.side_effects.correct
        return {
            "efficacy": counts(self.facts_before, self.facts_after, len(self.facts)),
            "paraphrase": counts(sum(p.correct_before for p in self.paraphrases),
                                 sum(p.correct_after for p in self.paraphrases), len(self.paraphrases)),
            "relation": counts(b.relation.correct, a.relation.correct, a.relation.total,
                               fixed=sum(not x.correct and y.correct for x, y in rel),
                               broken=sum(x.correct and not y.correct for x, y in rel)),
            "specificity": counts(spec_b, spec_a, a.neighbourhood.total + a.side_effects.total,
                                  neighbourhood=counts(b.neighbourhood.correct, a.neighbourhood.correct,
                                                       a.neighbourhood.total),
                                  side_effects=counts(b.side_effects.correct, a.side_effects.correct,
                                                      a.side_effects.total),
                                  answers_unchanged=sum(x.answer == y.answer for x, y in zip(
                                      b.neighbourhood.results + b.side_effects.results,
                                      a.neighbourhood.results + a.side_effects.results))),
            "kl_unrelated": _finite(self.kl_unrelated),
            "perplexity": {"before": _finite(b.perplexity), "after": _finite(a.perplexity)},
        }

    def rows(self) -> list[tuple[str, str, str]]:
        """``(metric, before, after)`` rows for tables; lists the panel could not fill are left out."""
        b, a, n = self.panel_before, self.panel_after, len(self.facts)
        rows = [("facts correct (efficacy)", f"{self.facts_before}/{n}", f"{self.facts_after}/{n}")]
        e = self.evaluation()
        if e["paraphrase"]["total"]:
            p = e["paraphrase"]
            rows.append(("paraphrases (generalization)", f"{p['before']}/{p['total']}", f"{p['after']}/{p['total']}"))
        if a.relation.total:
            r = e["relation"]
            rows.append(("unedited facts (relation)", f"{r['before']}/{r['total']}",
                         f"{r['after']}/{r['total']} (+{r['fixed']} fixed, -{r['broken']} broken)"))
        for label, key in (("general", "general"), ("neighbourhood (specificity)", "neighbourhood"),
                           ("side effects (specificity)", "side_effects")):
            sb, sa = getattr(b, key), getattr(a, key)
            if sa.total:
                rows.append((label, f"{sb.correct}/{sb.total}", f"{sa.correct}/{sa.total}"))
        if math.isfinite(b.perplexity):
            rows.append(("perplexity", f"{b.perplexity:.2f}", f"{a.perplexity:.2f}"))
        if math.isfinite(self.kl_unrelated):
            rows.append(("mean KL on unrelated text", "0", f"{self.kl_unrelated:.2e}"))
        return rows

    def to_dict(self) -> dict:
        return {
            "facts_before": self.facts_before, "facts_after": self.facts_after, "facts_total": len(self.facts),
            "facts": [f.to_dict() for f in self.facts],
            "evaluation": self.evaluation(),
            "paraphrases": [p.to_dict() for p in self.paraphrases],
            "panel_before": self.panel_before.to_dict(), "panel_after": self.panel_after.to_dict(),
            "kl_unrelated": _finite(self.kl_unrelated),
            "unavailable": self.unavailable,
        }


def _finite(x: float) -> float | None:
    """JSON has no NaN: a metric that could not be measured is null."""
    return x if math.isfinite(x) else None


def compare(base: nn.Module, edited: nn.Module, tokenizer, facts: Sequence[Probe], panel: Panel,
            unrelated: Sequence[str] | None = None, verdicts: list[str] | None = None,
            before: ProbeScores | None = None, after: ProbeScores | None = None) -> Comparison:
    """Score ``base`` and ``edited`` on the facts (and their paraphrases: each fact's own, else the panel's for
    the same prompt), the panel fitted to ``tokenizer``, and their KL on the unrelated text (default: the panel's).
    Scores already computed can be passed as ``before``/``after``."""
    from .arch import layout_of

    facts = list(facts)
    fitted = fit_panel(panel, tokenizer, layout_of(base).n_ctx)
    panel = fitted.panel
    before = before if before is not None else score_probes(base, tokenizer, facts)
    after = after if after is not None else score_probes(edited, tokenizer, facts)
    unrelated = list(unrelated) if unrelated is not None else list(panel.unrelated_text)
    paraphrases = [Probe(text, f.target) for f in facts for text in (f.paraphrases or panel.paraphrases_of(f.prompt))]
    exclude = frozenset(f.prompt for f in facts)
    return Comparison(
        facts=fact_outcomes(before, after, verdicts),
        panel_before=evaluate_panel(base, tokenizer, panel, exclude),
        panel_after=evaluate_panel(edited, tokenizer, panel, exclude),
        kl_unrelated=mean_kl(base, edited, tokenizer, unrelated) if unrelated else float("nan"),
        paraphrases=fact_outcomes(score_probes(base, tokenizer, paraphrases), score_probes(edited, tokenizer, paraphrases)),
        unavailable=list(fitted.unavailable),
    )


def regressions(c: Comparison, perplexity_tolerance: float = PERPLEXITY_TOLERANCE) -> list[str]:
    """Why an edit fails verification (empty: it passes). Passing means every fact is correct after, the
    general, neighbourhood and side-effect counts are not lower, and perplexity rose by at most
    ``perplexity_tolerance`` (relative). Paraphrase and relation generalization are reported, not required."""
    reasons = []
    wrong = [f for f in c.facts if not f.correct_after]
    if wrong:
        reasons.append(f"{len(wrong)}/{len(c.facts)} facts still wrong after (e.g. {wrong[0].prompt!r} -> "
                       f"{wrong[0].after!r}, expected {wrong[0].target!r})")
    b, a = c.panel_before, c.panel_after
    for name in ("general", "neighbourhood", "side_effects"):
        nb, na = getattr(b, name).correct, getattr(a, name).correct
        if na < nb:
            reasons.append(f"{name.replace('_', '-')} probes regressed: {nb} -> {na} of {getattr(a, name).total}")
    if math.isfinite(b.perplexity) and not a.perplexity <= b.perplexity * (1 + perplexity_tolerance):
        reasons.append(f"perplexity rose from {b.perplexity:.3f} to {a.perplexity:.3f} "
                       f"(more than {100 * perplexity_tolerance:g}%)")
    return reasons


@dataclass
class SurgeryReport:
    """Everything about one edit: where, how long, and what changed (layers 0-indexed)."""

    site: str
    layer: int
    layer_reason: str  # "given" or why --layer auto chose it
    params_in_site: int
    params_total: int
    steps: int  # optimizer steps taken (stops early once every fact is top-1)
    epochs: int  # the budget: one epoch = one full-batch step over all facts and the unrelated text
    final_loss: float
    final_ce: float
    final_kl: float
    train_time_s: float
    wall_time_s: float  # whole operate(): diagnosis, capture, training and evaluation
    comparison: Comparison
    weights: WeightStats
    config: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    block: str = ""  # module path of the edited block, e.g. "transformer.h.9" or "model.layers.9"
    tried: list[dict] = field(default_factory=list)  # each block trained: layer, steps, lr, backoffs, fixed, total

    @property
    def fraction(self) -> float:
        return self.params_in_site / self.params_total

    def rows(self) -> list[tuple[str, str, str]]:
        w = self.weights
        rows = self.comparison.rows() + [
            ("parameters trained", "", f"{self.params_in_site:,} ({100 * self.fraction:.2f}% of the model)"),
            ("parameters changed", "", f"{w.params_changed:,}"),
            ("ΔL2 / max |Δ|", "", f"{w.delta_l2:.4f} / {w.max_abs_delta:.4f}"),
            ("other tensors unchanged (bitwise)", "", str(w.others_unchanged).lower()),
        ]
        if w.qk_unchanged is not None:
            rows.append(("Q/K unchanged (bitwise)", "", str(w.qk_unchanged).lower()))
        return rows

    def to_dict(self) -> dict:
        c = self.comparison
        n = len(c.facts)
        return {
            "site": self.site, "layer": self.layer, "layer_reason": self.layer_reason,
            "params_in_site": self.params_in_site, "params_total": self.params_total, "fraction": self.fraction,
            "steps": self.steps, "epochs": self.epochs,
            "final_loss": self.final_loss, "final_ce": self.final_ce, "final_kl": self.final_kl,
            "train_time_s": self.train_time_s, "wall_time_s": self.wall_time_s,
            "facts_fixed": f"{c.facts_after}/{n}", "facts_before": f"{c.facts_before}/{n}",
            **{k: v for k, v in c.to_dict().items() if k not in ("facts_before", "facts_after")},
            "weights": self.weights.to_dict(), "config": self.config, "notes": self.notes, "tried": self.tried,
        }


def format_rows(rows: list[tuple[str, str, str]], markdown: bool = False) -> str:
    """A before/after table as aligned text or as Markdown."""
    if markdown:
        lines = ["| | before | after |", "|---|---|---|"]
        cell = lambda text: text.replace("|", "\\|")  # noqa: E731
        return "\n".join(lines + [f"| {cell(m)} | {cell(b)} | {cell(a)} |" for m, b, a in rows])
    width = max(len(m) for m, _, _ in rows)
    lines = [f"{'':<{width}}  {'before':>12}  after"]
    return "\n".join(lines + [f"{m:<{width}}  {b:>12}  {a}" for m, b, a in rows])


def format_facts(facts: list[FactOutcome]) -> str:
    """One line per fact: prompt, target, answer before -> after."""
    def mark(ok: bool) -> str:
        return "ok " if ok else "NO "

    return "\n".join(
        f"  {f.prompt!r:<40} {f.target!r:<12} before {mark(f.correct_before)}{f.before!r:<12} "
        f"after {mark(f.correct_after)}{f.after!r}"
        for f in facts
    )
