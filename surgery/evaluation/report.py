"""What an edit did, before and after: facts, panels, fluency, KL and weight statistics, as one dataclass.

The same before/after rows feed the CLI, ``report.json``, the model card and ``verify``. Every fact and probe is
judged by what the model says (its greedy continuation, :mod:`surgery.evaluation.generation`): the headline counts
are the strict verdict (the whole answer, at a word boundary); the lenient and first-token counts stand beside them,
labelled. The edit is judged as the model-editing field reports it (ROME, MEMIT, EasyEdit), on prompts never
trained on except the first:

* **efficacy**: the edited facts, now answered right (the only thing optimized);
* **paraphrase generalization**: the same facts in other wordings (each fact's ``paraphrases``);
* **relation generalization**: facts of the same relation that were *not* edited (the panel's ``relation``
  probes): how many the repair carried to, and whether the ones already right stayed right;
* **specificity**: the neighbourhood probes (answers that are function words or other entities) and the
  side-effect probes keep their answers;
* **fluency**: the n-gram entropy of greedy generations (ROME, MEMIT), before and after;
* KL on the unrelated text and perplexity on the held-out passage.

``wrong_after`` lists what the corrected model says wherever it is wrong or changed; ``regressions`` is the
verification rule (:data:`PROBE_TOLERANCE`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from torch import nn

from ..io.edit_file import WeightStats
from .facts import Fact
from .memo import EvaluationMemo
from .panels import Panel, fit_panel
from .scoring import (
    FLUENCY_TOKENS,
    Fluency,
    JudgedLists,
    PanelResult,
    ProbeResult,
    ProbeScores,
    fluency_prompts,
    judge_lists,
    panel_probes,
    panel_result,
)

PERPLEXITY_TOLERANCE = 0.05  # verify: at most 5% relative perplexity increase counts as "no regression"
PROBE_TOLERANCE = 0.05  # verify: a panel may break at most floor(5% of its probes) (0 below 20 probes)


def allowed_breaks(total: int, tolerance: float = PROBE_TOLERANCE) -> int:
    """How many probes of a list of ``total`` may go from right to wrong: floor(``tolerance`` x ``total``)."""
    return math.floor(tolerance * total + 1e-9)


@dataclass
class FactOutcome:
    """One fact (or probe): what the model says before and after the edit, judged.

    ``before``/``after``: the greedy continuations; ``correct_*``: the strict verdict (the headline);
    ``lenient_*``: the whole answer within the first few words; ``first_token_*``: the top-1 next token as text
    and ``first_token_correct_*`` whether it is the target's first token (the first-token diagnostic)."""

    prompt: str
    target: str
    before: str
    after: str
    correct_before: bool
    correct_after: bool
    verdict: str | None = None  # diagnosis of the base model: routing / absence / correct
    lenient_before: bool = False
    lenient_after: bool = False
    first_token_before: str = ""
    first_token_after: str = ""
    first_token_correct_before: bool = False
    first_token_correct_after: bool = False

    @property
    def broken(self) -> bool:
        """Said right before the edit, not after."""
        return self.correct_before and not self.correct_after

    def to_dict(self) -> dict:
        return asdict(self)


def fact_outcomes(
    before: ProbeScores, after: ProbeScores, verdicts: Sequence[str | None] | None = None
) -> list[FactOutcome]:
    """Pair the before and after scores of the same facts."""
    verdicts = verdicts or [None] * before.total
    return [_outcome(b, a, v) for b, a, v in zip(before.results, after.results, verdicts)]


def _outcome(b: ProbeResult, a: ProbeResult, verdict: str | None = None) -> FactOutcome:
    return FactOutcome(
        b.prompt,
        b.target,
        b.said,
        a.said,
        b.correct,
        a.correct,
        verdict,
        lenient_before=b.lenient,
        lenient_after=a.lenient,
        first_token_before=b.answer,
        first_token_after=a.answer,
        first_token_correct_before=b.first_token_correct,
        first_token_correct_after=a.first_token_correct,
    )


def judged_counts(outcomes: Sequence[FactOutcome], changes: bool = False) -> dict:
    """``{"before", "after", "total"}``: how many are said right (strict, the headline); with ``changes``, also
    how many the edit ``fixed`` and ``broke``; then the same under ``"lenient"`` and ``"first_token"``."""

    def tally(before: list[bool], after: list[bool]) -> dict:
        out = {"before": sum(before), "after": sum(after)}
        if changes:
            out["fixed"] = sum(not b and a for b, a in zip(before, after))
            out["broken"] = sum(b and not a for b, a in zip(before, after))
        return out

    strict = tally([o.correct_before for o in outcomes], [o.correct_after for o in outcomes])
    return {
        "before": strict.pop("before"),
        "after": strict.pop("after"),
        "total": len(outcomes),
        **strict,
        "lenient": tally([o.lenient_before for o in outcomes], [o.lenient_after for o in outcomes]),
        "first_token": tally(
            [o.first_token_correct_before for o in outcomes], [o.first_token_correct_after for o in outcomes]
        ),
    }


@dataclass
class WrongAnswer:
    """What the corrected model says where it is wrong: an edited fact or paraphrase it does not say, or a
    probe it broke (relation, general) or whose continuation changed (neighbourhood, side effects)."""

    kind: str  # fact / paraphrase / relation / general / neighbourhood / side_effects
    why: str  # "not said" / "broken" / "changed"
    prompt: str
    target: str
    before: str  # what the original said
    after: str  # what the corrected model says

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Comparison:
    """Base and edited model side by side: facts, panels, fluency and KL (what ``verify`` and a report show)."""

    facts: list[FactOutcome]
    panel_before: PanelResult
    panel_after: PanelResult
    kl_unrelated: float  # mean KL(base || edited) of next-token distributions on the unrelated text (NaN: none)
    paraphrases: list[FactOutcome] = field(default_factory=list)  # each fact's other wordings
    unavailable: list[str] = field(default_factory=list)  # panels or probes this tokenizer could not score
    fluency_before: Fluency | None = None  # None: not measured
    fluency_after: Fluency | None = None

    @property
    def facts_before(self) -> int:
        return sum(f.correct_before for f in self.facts)

    @property
    def facts_after(self) -> int:
        return sum(f.correct_after for f in self.facts)

    def outcomes(self, name: str) -> list[FactOutcome]:
        """The panel list ``name`` (general, neighbourhood, side_effects, relation) before and after, paired."""
        return fact_outcomes(getattr(self.panel_before, name), getattr(self.panel_after, name))

    def evaluation(self) -> dict:
        """Efficacy, generalization, specificity and general knowledge as :func:`judged_counts` (strict counts of
        what the model says first, then ``lenient`` and ``first_token``); relation and general also count what
        the edit ``fixed`` and ``broke``; fluency, KL and perplexity as ``{"before", "after"}`` or a number."""
        spec = self.outcomes("neighbourhood") + self.outcomes("side_effects")
        specificity = judged_counts(spec, changes=True)
        specificity["first_token"]["answers_unchanged"] = sum(o.first_token_before == o.first_token_after for o in spec)
        b, a = self.panel_before, self.panel_after
        return {
            "efficacy": judged_counts(self.facts),
            "paraphrase": judged_counts(self.paraphrases),
            "relation": judged_counts(self.outcomes("relation"), changes=True),
            "specificity": {
                **specificity,
                "neighbourhood": judged_counts(self.outcomes("neighbourhood"), changes=True),
                "side_effects": judged_counts(self.outcomes("side_effects"), changes=True),
                "answers_unchanged": sum(o.before == o.after for o in spec),
            },
            "general": judged_counts(self.outcomes("general"), changes=True),
            "kl_unrelated": _finite(self.kl_unrelated),
            "perplexity": {"before": _finite(b.perplexity), "after": _finite(a.perplexity)},
            "fluency": {
                "before": _mean(self.fluency_before),
                "after": _mean(self.fluency_after),
                "prompts": len(self.fluency_after.prompts) if self.fluency_after else 0,
                "tokens": self.fluency_after.tokens if self.fluency_after else 0,
            },
        }

    def wrong_after(self) -> list[WrongAnswer]:
        """What the corrected model says where it is wrong (:class:`WrongAnswer`): edited facts and paraphrases
        not said, relation and general probes broken, neighbourhood and side-effect probes whose continuation
        changed."""

        def wrong(kind: str, why: str, o: FactOutcome) -> WrongAnswer:
            return WrongAnswer(kind, why, o.prompt, o.target, o.before, o.after)

        out = [wrong("fact", "not said", f) for f in self.facts if not f.correct_after]
        out += [wrong("paraphrase", "not said", p) for p in self.paraphrases if not p.correct_after]
        for name in ("relation", "general"):
            out += [wrong(name, "broken", o) for o in self.outcomes(name) if o.broken]
        for name in ("neighbourhood", "side_effects"):
            out += [
                wrong(name, "broken" if o.broken else "changed", o) for o in self.outcomes(name) if o.before != o.after
            ]
        return out

    def rows(self) -> list[tuple[str, str, str]]:
        """``(metric, before, after)`` rows for tables: counts of what the model says (strict), each followed by
        its lenient and first-token counts; lists the panel could not fill are left out."""
        e = self.evaluation()

        def cells(c: dict) -> tuple[str, str]:
            return tuple(
                f"{c[t]}/{c['total']} (lenient {c['lenient'][t]}, first token {c['first_token'][t]})"
                for t in ("before", "after")
            )

        rows = [("facts said (efficacy)", *cells(e["efficacy"]))]
        if e["paraphrase"]["total"]:
            rows.append(("paraphrases (generalization)", *cells(e["paraphrase"])))
        if e["relation"]["total"]:
            r = e["relation"]
            before, after = cells(r)
            rows.append(("unedited facts (relation)", before, f"{after} +{r['fixed']} fixed, -{r['broken']} broken"))
        for label, c in (
            ("general", e["general"]),
            ("neighbourhood (specificity)", e["specificity"]["neighbourhood"]),
            ("side effects (specificity)", e["specificity"]["side_effects"]),
        ):
            if c["total"]:
                before, after = cells(c)
                rows.append((label, before, after + (f" -{c['broken']} broken" if c["broken"] else "")))
        b, a = self.panel_before, self.panel_after
        if math.isfinite(b.perplexity):
            rows.append(("perplexity", f"{b.perplexity:.2f}", f"{a.perplexity:.2f}"))
        fb, fa = e["fluency"]["before"], e["fluency"]["after"]
        if fb is not None and fa is not None:
            rows.append((f"fluency (n-gram entropy, {e['fluency']['tokens']} tokens)", f"{fb:.3f}", f"{fa:.3f}"))
        if math.isfinite(self.kl_unrelated):
            rows.append(("mean KL on unrelated text", "0", f"{self.kl_unrelated:.2e}"))
        return rows

    def to_dict(self) -> dict:
        return {
            "facts_before": self.facts_before,
            "facts_after": self.facts_after,
            "facts_total": len(self.facts),
            "facts": [f.to_dict() for f in self.facts],
            "evaluation": self.evaluation(),
            "paraphrases": [p.to_dict() for p in self.paraphrases],
            "panel_before": self.panel_before.to_dict(),
            "panel_after": self.panel_after.to_dict(),
            "kl_unrelated": _finite(self.kl_unrelated),
            "unavailable": self.unavailable,
            "wrong_after": [w.to_dict() for w in self.wrong_after()],
            "fluency_before": self.fluency_before.to_dict() if self.fluency_before else None,
            "fluency_after": self.fluency_after.to_dict() if self.fluency_after else None,
        }


def _finite(x: float) -> float | None:
    """JSON has no NaN: a metric that could not be measured is null."""
    return x if math.isfinite(x) else None


def _mean(f: Fluency | None) -> float | None:
    return None if f is None else _finite(f.mean)


def judged_lists(facts: Sequence[Fact], panel: Panel) -> dict[str, list[Fact]]:
    """What :func:`compare` judges each model on besides the facts: their paraphrases (each fact's own, else the
    panel's for the same prompt) and the probes of ``panel`` (already fitted to the tokenizer), the facts' own
    prompts left out."""
    paraphrases = [Fact(text, f.target) for f in facts for text in (f.paraphrases or panel.paraphrases_of(f.prompt))]
    return {"paraphrases": paraphrases, **panel_probes(panel, frozenset(f.prompt for f in facts))}


def compare(
    base: nn.Module,
    edited: nn.Module,
    tokenizer,
    facts: Sequence[Fact],
    panel: Panel,
    unrelated: Sequence[str] | None = None,
    verdicts: list[str] | None = None,
    before: ProbeScores | None = None,
    after: ProbeScores | None = None,
    fluency_tokens: int = FLUENCY_TOKENS,
    memo: EvaluationMemo | None = None,
) -> Comparison:
    """Judge ``base`` and ``edited`` by what they say on the facts (and their paraphrases: each fact's own, else
    the panel's for the same prompt) and the panel fitted to ``tokenizer``, and their fluency on the facts' prompts
    and a few of the panel's general ones (``fluency_tokens`` tokens each; 0 skips it) — all of one model in one
    batched generation —, and their KL on the unrelated text (default: the panel's). Fact scores already
    computed can be passed as ``before``/``after``; what ``memo`` (of ``base``) holds of the base model's figures
    is not computed again, and what is computed is kept there."""
    from ..arch import layout_of
    from .scoring import mean_kl

    facts = list(facts)
    fitted = fit_panel(panel, tokenizer, layout_of(base).n_ctx)
    panel = fitted.panel
    unrelated = list(unrelated) if unrelated is not None else list(panel.unrelated_text)
    lists = judged_lists(facts, panel)

    prompts = fluency_prompts(facts, panel) if fluency_tokens else []

    def judge_model(model: nn.Module, facts_scored: ProbeScores | None) -> JudgedLists:
        judged = judge_lists(
            model,
            tokenizer,
            lists if facts_scored is not None else {"facts": facts, **lists},
            prompts,
            fluency_tokens,
            memo=memo,
        )
        if facts_scored is not None:
            judged.scores["facts"] = facts_scored
        return judged

    jb, ja = judge_model(base, before), judge_model(edited, after)
    sb, sa = jb.scores, ja.scores
    return Comparison(
        facts=fact_outcomes(sb["facts"], sa["facts"], verdicts),
        panel_before=panel_result(base, tokenizer, panel, sb, memo),
        panel_after=panel_result(edited, tokenizer, panel, sa),
        kl_unrelated=mean_kl(base, edited, tokenizer, unrelated, memo=memo) if unrelated else float("nan"),
        paraphrases=fact_outcomes(sb["paraphrases"], sa["paraphrases"]),
        unavailable=list(fitted.unavailable),
        fluency_before=jb.fluency,
        fluency_after=ja.fluency,
    )


PANEL_LABELS = {
    "relation": "unedited facts of the relation",
    "general": "general probes",
    "neighbourhood": "neighbourhood probes",
    "side_effects": "side-effect probes",
}


def regressions(
    c: Comparison, perplexity_tolerance: float = PERPLEXITY_TOLERANCE, probe_tolerance: float = PROBE_TOLERANCE
) -> list[str]:
    """Why an edit fails verification, one reason per failed check (empty: it passes), all judged by what the
    model says (strict). Passing means: every edited fact is said after; no more paraphrases wrong than before;
    each of the relation, general, neighbourhood and side-effect lists broke at most
    :func:`allowed_breaks` probes (right before, wrong after: 0 for lists under 20 probes at the default 5%);
    perplexity rose by at most ``perplexity_tolerance`` (relative)."""
    reasons = []
    wrong = [f for f in c.facts if not f.correct_after]
    if wrong:
        reasons.append(
            f"{len(wrong)}/{len(c.facts)} edited facts not said after (e.g. {wrong[0].prompt!r} -> "
            f"{wrong[0].after!r}, expected {wrong[0].target!r})"
        )
    para_b, para_a = sum(p.correct_before for p in c.paraphrases), sum(p.correct_after for p in c.paraphrases)
    if para_a < para_b:
        reasons.append(f"paraphrases got worse: {para_b} -> {para_a} of {len(c.paraphrases)} said")
    for name, label in PANEL_LABELS.items():
        outcomes = c.outcomes(name)
        broken = [o for o in outcomes if o.broken]
        allowed = allowed_breaks(len(outcomes), probe_tolerance)
        if len(broken) > allowed:
            reasons.append(
                f"{label} broken: {len(broken)} of {len(outcomes)} said right before are wrong after "
                f"(allowed {allowed}; e.g. {broken[0].prompt!r} -> {broken[0].after!r}, expected "
                f"{broken[0].target!r})"
            )
    b, a = c.panel_before, c.panel_after
    if math.isfinite(b.perplexity) and not a.perplexity <= b.perplexity * (1 + perplexity_tolerance):
        reasons.append(
            f"perplexity rose from {b.perplexity:.3f} to {a.perplexity:.3f} (more than {100 * perplexity_tolerance:g}%)"
        )
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
    method: str = "wv"  # wv (our repair of `site`), rome or ft (site mlp_out: the MLP output projection)

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
            "method": self.method,
            "site": self.site,
            "layer": self.layer,
            "layer_reason": self.layer_reason,
            "params_in_site": self.params_in_site,
            "params_total": self.params_total,
            "fraction": self.fraction,
            "steps": self.steps,
            "epochs": self.epochs,
            "final_loss": self.final_loss,
            "final_ce": self.final_ce,
            "final_kl": self.final_kl,
            "train_time_s": self.train_time_s,
            "wall_time_s": self.wall_time_s,
            "facts_fixed": f"{c.facts_after}/{n}",
            "facts_before": f"{c.facts_before}/{n}",
            **{k: v for k, v in c.to_dict().items() if k not in ("facts_before", "facts_after")},
            "weights": self.weights.to_dict(),
            "config": self.config,
            "notes": self.notes,
            "tried": self.tried,
        }


def format_rows(rows: list[tuple[str, str, str]], markdown: bool = False) -> str:
    """A before/after table as aligned text or as Markdown."""
    if markdown:
        lines = ["| | before | after |", "|---|---|---|"]
        cell = lambda text: text.replace("|", "\\|")  # noqa: E731
        return "\n".join(lines + [f"| {cell(m)} | {cell(b)} | {cell(a)} |" for m, b, a in rows])
    width, before = max(len(m) for m, _, _ in rows), max(12, *(len(b) for _, b, _ in rows))
    lines = [f"{'':<{width}}  {'before':>{before}}  after"]
    return "\n".join(lines + [f"{m:<{width}}  {b:>{before}}  {a}" for m, b, a in rows])


def format_facts(facts: list[FactOutcome]) -> str:
    """One line per fact: prompt, target, what the model says before -> after (ok: the whole answer, at a word
    boundary), and the top-1 first token after (the first-token diagnostic)."""

    def mark(ok: bool) -> str:
        return "ok " if ok else "NO "

    return "\n".join(
        f"  {f.prompt!r:<40} {f.target!r:<12} before {mark(f.correct_before)}{f.before!r:<24} "
        f"after {mark(f.correct_after)}{f.after!r}  (first token {f.first_token_after!r})"
        for f in facts
    )


def format_wrong(wrong: list[WrongAnswer]) -> str:
    """What the corrected model says where it is wrong, one line each (empty string: nothing)."""
    return "\n".join(
        f"  {w.kind:<13} {w.why:<8} {w.prompt!r} -> {w.after!r} (expected {w.target!r}; before {w.before!r})"
        for w in wrong
    )
