"""Many facts in one edit, chosen by a census: which failures to edit, and what the edit does to the rest.

A census (``python -m surgery census``) says which facts are *routing* failures — the model holds the answer in
the later blocks, then loses it. :func:`split_routing` splits them, per relation and seeded, into facts to edit
and held-out facts never trained on. :func:`repair_from_census` makes one edit for all the edited facts at the
block most of them prescribe, and judges it with the usual evaluation (:mod:`surgery.evaluation.report`) on a panel
built from the census:

* efficacy: the edited facts; paraphrase generalization: their paraphrases;
* relation generalization: the held-out routing failures of the same relations (``relation`` probes);
* specificity: facts of the census the model already answers right (``side_effects``), of every relation, the
  edited relations included (a batch edit of some capitals must not break the capitals the model knew), and the
  English panel's neighbourhood probes, general probes, perplexity passage and unrelated text.

Other facts the model answers right, of the edited relations and never scored, join the panel's ``preserve``
prompts: ``wv``'s preservation term keeps what the model says after them, as the English panel's capitals do for
one relation (``docs/panels.md``).

It then edits a sample of the same facts one at a time, so that one edit for all can be compared with one edit
per fact: time, parameters changed, side effects. The base model is never modified.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from torch import nn

from ..arch import block_label
from ..census.report import outcome
from ..census.run import record_key
from ..core.errors import InputError, SurgeryFailed
from ..evaluation.facts import Fact
from ..evaluation.panels import Panel
from ..evaluation.report import SurgeryReport
from ..io.edit_file import Edit
from .editors import MULTI_BLOCK
from .training import TRACE, SurgeryConfig, operate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RepairConfig:
    """``edit_fraction`` of each relation's routing failures is edited (at most ``max_edit`` in all), the rest
    held out; ``specificity_facts``: how many of the census' correct facts (any relation) are scored as side
    effects; ``preserve_facts``: how many others, of the edited relations, the preservation term keeps (0: only
    the panel's own); ``per_fact``: how many of the edited facts are also edited one at a time for the
    comparison (0: none); ``seed`` fixes the split and the samples."""

    edit_fraction: float = 0.5
    max_edit: int | None = None
    specificity_facts: int = 64
    preserve_facts: int = 64
    per_fact: int = 4
    seed: int = 0

    def __post_init__(self):
        if not 0.0 < self.edit_fraction < 1.0:
            raise InputError(f"edit_fraction must be between 0 and 1 (exclusive), not {self.edit_fraction!r}")
        for name in ("max_edit", "specificity_facts", "preserve_facts", "per_fact"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise InputError(f"{name} must be a non-negative integer, not {value!r}")


def _panel_fact(fact: Fact) -> Fact:
    """``fact`` as a panel lists it: prompt, target, paraphrases and subject (where ROME, MEMIT and AlphaEdit read
    its key); a panel's facts name no relation."""
    return Fact(fact.prompt, fact.target, fact.paraphrases, subject=fact.subject)


def split_routing(
    records: Sequence[dict], facts: Sequence[Fact], config: RepairConfig
) -> tuple[list[Fact], list[Fact]]:
    """The census' routing failures among ``facts``, split per relation into (edited, held out), seeded.

    ``records``: census lines (``prompt``, ``target``, ``verdict``, and what the model says). A routing failure is
    the census' ``routing`` outcome (:func:`~surgery.census.report.outcome`): the facts the model says a little later
    ("Lyon is a city in" -> " the south of France") are not failures, and those missing only a generic first piece
    would teach the piece. Ambiguous facts are never used.
    """
    verdicts = {record_key(r): outcome(r) for r in records}
    by_relation: dict[str, list[Fact]] = defaultdict(list)
    for fact in facts:
        if fact.ambiguous is None and verdicts.get(fact.key) == "routing":
            by_relation[fact.relation].append(fact)
    if not by_relation:
        raise InputError("the census has no routing failure among these facts: nothing to edit")
    rng = random.Random(config.seed)
    edit, held = [], []
    for relation in sorted(by_relation):
        group = by_relation[relation][:]
        rng.shuffle(group)
        n = max(1, round(config.edit_fraction * len(group)))
        edit += group[:n]
        held += group[n:]
    if config.max_edit is not None and len(edit) > config.max_edit:
        rng.shuffle(edit)
        held += edit[config.max_edit :]
        edit = edit[: config.max_edit]
    return edit, held


def census_panel(
    base: Panel,
    edit: Sequence[Fact],
    held: Sequence[Fact],
    records: Sequence[dict],
    facts: Sequence[Fact],
    config: RepairConfig,
) -> Panel:
    """The panel an edit of ``edit`` is judged by (module docstring): ``base`` supplies the neighbourhood and
    general probes, the perplexity passage, the unrelated text and its own ``preserve`` prompts, to which correct
    facts of the edited relations that are not scored are added. No prompt is both kept and scored."""
    correct = {record_key(r) for r in records if r["verdict"] == "correct"}
    others = [f for f in facts if f.key in correct and f.ambiguous is None]
    random.Random(config.seed).shuffle(others)
    scored = others[: config.specificity_facts]
    judged = {f.prompt for f in [*edit, *held, *scored, *base.general, *base.neighbourhood]}
    edited_relations = {f.relation for f in edit}
    kept = [f for f in others[config.specificity_facts :] if f.relation in edited_relations and f.prompt not in judged]
    return replace(
        base,
        name=f"census ({base.name} neighbourhood)",
        facts=tuple(_panel_fact(f) for f in edit),
        relation=tuple(_panel_fact(f) for f in held),
        side_effects=tuple(_panel_fact(f) for f in scored),
        absence=(),
        preserve=tuple(p for p in base.preserve if p.prompt not in judged)
        + tuple(_panel_fact(f) for f in kept[: config.preserve_facts]),
    )


@dataclass
class PerFactEdits:
    """The same facts edited one at a time: how each single edit fared, for the comparison with one edit."""

    facts: int
    fixed: int
    total_time_s: float
    params_changed: int  # summed over the separate edits
    side_effects_before: int
    side_effects_after: list[int]  # per edit
    side_effects_total: int
    failed: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(vars(self))


@dataclass
class CensusRepair:
    edited: int
    held_out: int
    layer: int
    layer_reason: str
    report: SurgeryReport
    per_fact: PerFactEdits | None
    edit: Edit | None = None

    def to_dict(self) -> dict:
        one = self.report
        c = one.comparison
        d = {
            "edited": self.edited,
            "held_out": self.held_out,
            "layer": self.layer,
            "layer_reason": self.layer_reason,
            "evaluation": c.evaluation(),
            "report": one.to_dict(),
        }
        if self.per_fact is not None:
            p = self.per_fact
            n = max(p.facts, 1)
            d["one_edit_vs_one_per_fact"] = {
                "one_edit": {
                    "facts": self.edited,
                    "time_s": one.wall_time_s,
                    "params_changed": one.weights.params_changed,
                    "side_effects_after": c.panel_after.side_effects.correct,
                    "side_effects_total": c.panel_after.side_effects.total,
                },
                "per_fact": {
                    **p.to_dict(),
                    "time_s_per_fact": p.total_time_s / n,
                    "projected_time_s_for_all": p.total_time_s / n * self.edited,
                    "projected_params_changed_for_all": p.params_changed / n * self.edited,
                },
            }
        return d


def repair_from_census(
    model: nn.Module,
    tokenizer,
    records: Sequence[dict],
    facts: Sequence[Fact],
    base: Panel,
    surgery: SurgeryConfig = SurgeryConfig(),
    config: RepairConfig = RepairConfig(),
    progress: Callable[[str], None] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> CensusRepair:
    """One edit for a census' routing failures (split by :func:`split_routing`), judged on :func:`census_panel`,
    and ``config.per_fact`` of them edited one at a time for comparison. The layer: the last of
    ``surgery.layers`` (MEMIT, AlphaEdit), else ``surgery.layer``, else for MEMIT and AlphaEdit the blocks causal
    tracing of the edited facts names (``operate``'s default for them), else the most common prescribed layer of
    the edited facts in the census (no second diagnosis). ``surgery.method`` picks the editor (``wv`` or a peer:
    ``rome``, ``ft``, ``memit``, ``alphaedit``, keyed at each fact's subject); ``cache_dir``: where the peers' key
    statistics are cached (``operate``'s)."""
    say = progress or log.info
    edit, held = split_routing(records, facts, config)
    panel = census_panel(base, edit, held, records, facts, config)
    prescribed = {record_key(r): r["prescribed_layer"] for r in records}
    traced = surgery.layers == TRACE or (
        surgery.method in MULTI_BLOCK and surgery.layers is None and surgery.layer is None
    )
    if traced:  # MEMIT, AlphaEdit (by default): the blocks causal tracing of the edited facts names, in operate
        layer, reason = None, "causal tracing of the edited facts (the report names the blocks)"
    elif surgery.layers is not None:  # MEMIT, AlphaEdit on given blocks (--layers): the last is the block
        layer, reason = surgery.layers[-1], f"given: blocks {', '.join(map(str, surgery.layers))} (--layers)"
    elif surgery.layer is None:
        counts = Counter(prescribed[f.key] for f in edit)
        layer, n = counts.most_common(1)[0]
        reason = f"census: block {layer} ({block_label(layer)}) is the prescribed layer of {n}/{len(edit)} edited facts"
    else:
        layer, reason = surgery.layer, "given"
    config_one = replace(surgery, layer=layer)
    where = "the traced blocks" if layer is None else block_label(layer)
    say(f"one {surgery.method} edit for {len(edit)} facts at {where} ({len(held)} held out)")
    result = operate(
        model,
        tokenizer,
        [_panel_fact(f) for f in edit],
        config_one,
        panel=panel,
        require_all=False,
        cache_dir=cache_dir,
    )
    report = result.report
    if layer is None:  # traced: the blocks are known now
        layer, reason = report.layer, report.layer_reason
        config_one = replace(config_one, layers=tuple(report.config["layers"]))  # one at a time: the same blocks
    per_fact = None
    if config.per_fact:
        sample = random.Random(config.seed + 1).sample(edit, min(config.per_fact, len(edit)))
        single = replace(panel, relation=(), facts=())
        results, failed, t0 = [], [], time.perf_counter()
        for fact in sample:
            say(f"one edit for {fact.prompt!r} alone")
            try:
                results.append(
                    operate(model, tokenizer, [_panel_fact(fact)], config_one, panel=single, cache_dir=cache_dir).report
                )
            except (SurgeryFailed, InputError) as e:
                failed.append(f"{fact.prompt!r}: {e}")
        c = report.comparison
        per_fact = PerFactEdits(
            facts=len(sample),
            fixed=sum(r.comparison.facts_after for r in results),
            total_time_s=time.perf_counter() - t0,
            params_changed=sum(r.weights.params_changed for r in results),
            side_effects_before=c.panel_before.side_effects.correct,
            side_effects_after=[r.comparison.panel_after.side_effects.correct for r in results],
            side_effects_total=c.panel_before.side_effects.total,
            failed=failed,
        )
    return CensusRepair(len(edit), len(held), layer, reason, report, per_fact, result.edit)
