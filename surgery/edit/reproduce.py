"""The reference experiment, end to end, on any supported model: diagnose the facts, trace one failure per layer and
per head, repair it at each of the four sites, and judge every repair as the model-editing field does.

:func:`reproduce` returns a :class:`Reproduction` (``to_dict`` for ``report.json``, ``to_markdown`` for
``report.md``); the CLI command ``reproduce`` also writes the trace's plots. The base model is never modified.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import nn

from ..arch import SITES, block_label, count_parameters, layout_of
from ..core.errors import InputError, SurgeryFailed
from ..diagnosis.diagnose import Diagnosis, diagnose_batch
from ..evaluation.facts import Fact
from ..evaluation.panels import Panel
from ..evaluation.report import SurgeryReport
from .training import SurgeryConfig, layer_from_diagnoses, operate

log = logging.getLogger(__name__)


@dataclass
class Trace:
    """Where the answer to one failing fact lives: per block, its logit-lens rank and logit against the
    competitor's; the block after which it first leads the lens; its strongest writer head; the override head."""

    prompt: str
    target: str
    competitor: str
    lens: list[dict]  # [{"block", "target_rank", "target_logit", "competitor_logit"}] (block None = embeddings)
    emerges_after: int | None  # first block after which the target is the lens' top-1
    strongest_writer: dict  # {"layer", "head", "target"}: the head writing the most target logit
    override: dict  # {"layer", "head", "margin"}: margin = competitor - target attribution

    @classmethod
    def of(cls, d: Diagnosis) -> Trace:
        heads = [a for a in d.dla if a.head is not None]
        writer = max(heads, key=lambda a: a.target)
        o = next(a for a in heads if a.layer == d.override["layer"] and a.head == d.override["head"])
        top = [e.layer for e in d.logit_lens if e.layer is not None and e.target_rank == 1 and e.layer < d.n_layer - 1]
        return cls(
            prompt=d.prompt,
            target=d.target.text,
            competitor=d.competitor.text,
            lens=[
                {
                    "block": e.layer,
                    "target_rank": e.target_rank,
                    "target_logit": e.target_logit,
                    "competitor_logit": e.competitor_logit,
                }
                for e in d.logit_lens
            ],
            emerges_after=top[0] if top else None,
            strongest_writer={"layer": writer.layer, "head": writer.head, "target": writer.target},
            override={"layer": o.layer, "head": o.head, "margin": o.competitor - o.target},
        )


@dataclass
class SiteOutcome:
    site: str
    ok: bool
    report: SurgeryReport | None = None
    error: str = ""

    def to_dict(self) -> dict:
        return {
            "site": self.site,
            "ok": self.ok,
            **({"report": self.report.to_dict()} if self.report else {}),
            **({"error": self.error} if self.error else {}),
        }


@dataclass
class Reproduction:
    model: str
    family: str
    params_total: int
    n_layer: int
    n_head: int
    n_kv_head: int
    diagnoses: list[Diagnosis]
    trace: Trace | None
    layer: int
    layer_reason: str
    sites: list[SiteOutcome]
    wall_time_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "family": self.family,
            "params_total": self.params_total,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_kv_head": self.n_kv_head,
            "diagnoses": [_diagnosis_row(d) for d in self.diagnoses],
            "trace": None if self.trace is None else vars(self.trace),
            "layer": self.layer,
            "layer_reason": self.layer_reason,
            "sites": [s.to_dict() for s in self.sites],
            "wall_time_s": self.wall_time_s,
            "notes": self.notes,
        }

    def to_markdown(self) -> str:
        """The tables of the README: diagnosis, the trace of one failure, the four sites, generalization."""
        n_ok = sum(d.verdict == "correct" for d in self.diagnoses)
        lines = [
            f"# The reference experiment on {self.model}",
            "",
            f"{self.family}, {self.params_total / 1e6:.0f}M parameters, {self.n_layer} blocks x {self.n_head} "
            f"query heads ({self.n_kv_head} key/value). Layers 1-indexed as in the reference write-up "
            f"(L1 = block 0). {n_ok}/{len(self.diagnoses)} facts answered right before surgery.",
            "",
            "## Diagnosis",
            "",
            "| prompt | answer | target rank | verdict | override | prescribed |",
            "|---|---|---|---|---|---|",
        ]
        for d in self.diagnoses:
            o = d.override
            lines.append(
                f"| {d.prompt} | {d.prediction.text!r} | {d.target.rank} | {d.verdict} | "
                f"{d.label(o['layer'], o['head'])} | {d.label(d.prescribed_layer)} |"
            )
        if self.trace is not None:
            t = self.trace
            lines += [
                "",
                f"## Trace: {t.prompt!r} -> {t.target!r} (competitor {t.competitor!r})",
                "",
                f"- the target first leads the logit lens after **{block_label(t.emerges_after)}**"
                if t.emerges_after is not None
                else "- the target never leads the logit lens before the output",
                f"- its strongest writer: **{block_label(t.strongest_writer['layer'], t.strongest_writer['head'])}** "
                f"(+{t.strongest_writer['target']:.2f} target logit)",
                f"- the override: **{block_label(t.override['layer'], t.override['head'])}** "
                f"(competitor - target {t.override['margin']:+.2f})",
                "",
                "| after | target rank | target logit | competitor logit |",
                "|---|---|---|---|",
            ]
            for e in t.lens:
                name = block_label(e["block"])
                lines.append(f"| {name} | {e['target_rank']} | {e['target_logit']:.2f} | {e['competitor_logit']:.2f} |")
        lines += [
            "",
            f"## Four sites at {block_label(self.layer)}",
            "",
            f"Layer: {self.layer_reason}.",
            "",
            "| site | params | facts | general | neighbourhood | side effects | perplexity | ΔL2 | max abs Δ | "
            "Q/K unchanged | steps | time |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s in self.sites:
            if not s.ok:
                lines.append(f"| {s.site} | failed: {s.error} |" + " |" * 10)
                continue
            r, c = s.report, s.report.comparison
            pb, pa = c.panel_before, c.panel_after
            lines.append(
                f"| {s.site} | {r.params_in_site:,} ({100 * r.fraction:.2f}%) | {c.facts_before}/{len(c.facts)} -> "
                f"{c.facts_after}/{len(c.facts)} | {_change(pb.general, pa.general)} | "
                f"{_change(pb.neighbourhood, pa.neighbourhood)} | {_change(pb.side_effects, pa.side_effects)} | "
                f"{pb.perplexity:.2f} -> {pa.perplexity:.2f} | {r.weights.delta_l2:.3f} | "
                f"{r.weights.max_abs_delta:.4f} | {_yes(r.weights.qk_unchanged)} | {r.steps} | {r.wall_time_s:.0f} s |"
            )
        lines += [
            "",
            "## Generalization and specificity (never trained on)",
            "",
            "| site | efficacy | paraphrases | unedited capitals (fixed / broken) | specificity "
            "| KL on unrelated text |",
            "|---|---|---|---|---|---|",
        ]
        for s in self.sites:
            if not s.ok:
                continue
            e = s.report.comparison.evaluation()
            p, rel, sp = e["paraphrase"], e["relation"], e["specificity"]
            kl = e["kl_unrelated"]
            lines.append(
                f"| {s.site} | {e['efficacy']['after']}/{e['efficacy']['total']} | "
                f"{p['before']}/{p['total']} -> {p['after']}/{p['total']} | "
                f"{rel['before']}/{rel['total']} -> {rel['after']}/{rel['total']} "
                f"(+{rel['fixed']} / -{rel['broken']}) | {sp['before']}/{sp['total']} -> "
                f"{sp['after']}/{sp['total']} | {'n/a' if kl is None else f'{kl:.2e}'} |"
            )
        lines += ["", *[f"- {n}" for n in self.notes]] if self.notes else []
        return "\n".join(lines) + "\n"


def _change(before, after) -> str:
    return f"{before.correct}/{before.total} -> {after.correct}/{after.total}" if after.total else "n/a"


def _yes(flag: bool | None) -> str:
    return "n/a" if flag is None else ("yes" if flag else "NO")


def _diagnosis_row(d: Diagnosis) -> dict:
    return {
        "prompt": d.prompt,
        "target": d.target.text,
        "answer": d.prediction.text,
        "target_rank": d.target.rank,
        "verdict": d.verdict,
        "override": d.override,
        "prescribed_layer": d.prescribed_layer,
    }


def reproduce(
    model: nn.Module,
    tokenizer,
    facts: Sequence[Fact],
    panel: Panel,
    name: str = "model",
    sites: Sequence[str] = SITES,
    config: SurgeryConfig = SurgeryConfig(),
    progress: Callable[[str], None] | None = None,
) -> Reproduction:
    """Diagnose ``facts``, trace the first routing failure, then repair all of them at each site of ``sites`` in the
    block chosen by the diagnosis (``config.layer`` when given), each judged on ``panel``. A site that cannot fix
    every fact within the budget is recorded as failed, not raised."""
    t0 = time.perf_counter()
    facts = list(facts)
    if not facts:
        raise InputError("no facts given")
    unknown = [s for s in sites if s not in SITES]
    if unknown:
        raise InputError(f"unknown site {unknown[0]!r}: choose from {', '.join(SITES)}")
    layout = layout_of(model)
    say = progress or (lambda text: log.info(text))
    say("diagnosing the facts")
    diagnoses = diagnose_batch(model, tokenizer, [f.prompt for f in facts], [f.target for f in facts])
    routing = [d for d in diagnoses if d.verdict == "routing"]
    if config.layer is None:
        layer, reason = layer_from_diagnoses(diagnoses)
    else:
        layer, reason = layout.check_layer(config.layer), "given"
    outcomes = []
    for site in sites:
        say(f"surgery at site {site} of {block_label(layer)}")
        try:
            result = operate(
                model,
                tokenizer,
                facts,
                SurgeryConfig(**{**config.to_dict(), "site": site, "layer": layer}),
                panel=panel,
            )
            outcomes.append(SiteOutcome(site, True, result.report))
        except SurgeryFailed as e:
            outcomes.append(SiteOutcome(site, False, error=str(e)))
    return Reproduction(
        model=name,
        family=layout.family,
        params_total=count_parameters(model),
        n_layer=layout.n_layer,
        n_head=layout.n_head,
        n_kv_head=layout.n_kv_head,
        diagnoses=diagnoses,
        trace=Trace.of(routing[0]) if routing else None,
        layer=layer,
        layer_reason=reason,
        sites=outcomes,
        wall_time_s=time.perf_counter() - t0,
    )
