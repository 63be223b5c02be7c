"""Weight patching: which component's weights make a donor model answer differently from a recipient?

Two models of the same architecture — typically a base (the recipient) and its corrected version from
``operate`` (the donor). One *component* at a time — a site of one block (``wv``, ``attn``, ``mlp``, ``layer``:
:meth:`surgery.arch.Layout.site_slices`), or with ``granularity="head"`` one head's V slice (``v``) or O slice
(``o``) — is copied from the donor into the recipient, and the facts are scored on that hybrid. Components whose
tensors are bitwise equal in both models are skipped, so a surgery output costs one hybrid per changed component.

The same machinery ablates a component of one model: its weights replaced by zeros (``zero``) or by their mean
over the component's output units (``mean``); exact definitions in ``docs/patching.md``.

Neither model is ever modified: a hybrid is :func:`surgery.io.edit_file.edited_model` of the recipient with a
:class:`~surgery.io.edit_file.Edit` holding the donor's (or the ablated) values, built against the recipient.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..arch import SITES, Layout, ParamSlice, layout_of
from ..core.errors import InputError
from ..evaluation.facts import Fact
from ..evaluation.scoring import target_scores
from ..io.edit_file import Edit, base_config, edited_model

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

GRANULARITIES = ("site", "head")
ABLATIONS = ("zero", "mean")
HEAD_PARTS = ("v", "o")


@dataclass(frozen=True)
class Component:
    """Weights copied (or ablated) together: a site of block ``layer`` (``head`` None), or the ``v``/``o`` slice of
    query head ``head``. Heads that share a key/value head (grouped-query attention) share their ``v`` slice."""

    name: str
    layer: int
    head: int | None
    slices: tuple[ParamSlice, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "layer": self.layer, "head": self.head, "slices": [s.to_dict() for s in self.slices]}


# --------------------------------------------------------------------------------------------------
# Components (where their weights are: the family's adapter says how each projection is stored).
# --------------------------------------------------------------------------------------------------


def _output_units(layout: Layout, name: str, units: slice) -> ParamSlice:
    """The output units ``units`` of a projection weight: Conv1D ``[in, out]`` columns, nn.Linear ``[out, in]`` rows."""
    return ParamSlice(name, cols=units) if layout.adapter.linear == "conv1d" else ParamSlice(name, rows=units)


def _input_units(layout: Layout, name: str, units: slice) -> ParamSlice:
    """The input units ``units`` of a projection weight: Conv1D rows, nn.Linear columns."""
    return ParamSlice(name, rows=units) if layout.adapter.linear == "conv1d" else ParamSlice(name, cols=units)


def head_slices(layout: Layout, layer: int, head: int, part: str) -> tuple[ParamSlice, ...]:
    """Weights of query head ``head``'s value (``v``: its key/value head's outputs of the value projection; GPT-2:
    those columns of the V third of ``c_attn``) or output (``o``: its inputs of the output projection). Weights
    only: biases belong to no single head (``o``'s bias is added once) or follow the ``wv`` site, which has none."""
    a = layout.adapter
    layout.check_layer(layer)
    layout.check_head(head)
    if part == "v":
        g, dh = layout.kv_head(head), layout.d_head
        if a.qkv is not None:  # fused [Q | K | V] outputs
            start = layout.qkv_columns("v").start + g * dh
            return (_output_units(layout, a.path("qkv", layer) + ".weight", slice(start, start + dh)),)
        return (_output_units(layout, a.path("v", layer) + ".weight", slice(g * dh, (g + 1) * dh)),)
    if part == "o":
        return (_input_units(layout, a.path("o", layer) + ".weight", layout.head_slice(head)),)
    raise InputError(f"unknown head part {part!r}: choose v or o")


def components(model: nn.Module, granularity: str = "site") -> list[Component]:
    """Every component of ``model``, block by block: the four sites, or each head's ``v`` and ``o`` slices."""
    layout = layout_of(model)
    if granularity == "site":
        return [
            Component(site, l, None, tuple(layout.site_slices(site, l, model)))
            for l in range(layout.n_layer)
            for site in SITES
        ]
    if granularity == "head":
        return [
            Component(part, l, h, head_slices(layout, l, h, part))
            for l in range(layout.n_layer)
            for h in range(layout.n_head)
            for part in HEAD_PARTS
        ]
    raise InputError(f"unknown granularity {granularity!r}: choose {' or '.join(GRANULARITIES)}")


# --------------------------------------------------------------------------------------------------
# New values of a component, and the hybrid model they make.
# --------------------------------------------------------------------------------------------------


def check_same_architecture(recipient: nn.Module, donor: nn.Module) -> None:
    """:class:`InputError` unless both models have the same family, shapes and parameter names."""
    a, b = base_config(recipient), base_config(donor)
    diff = [f"{k} {a.get(k)} vs {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if not diff:
        pa = {n: tuple(p.shape) for n, p in recipient.named_parameters()}
        pb = {n: tuple(p.shape) for n, p in donor.named_parameters()}
        diff = [f"{n} {pa.get(n)} vs {pb.get(n)}" for n in sorted(set(pa) | set(pb)) if pa.get(n) != pb.get(n)][:1]
    if diff:
        raise InputError(
            f"the donor is not the same architecture as the recipient ({diff[0]}, recipient vs donor): "
            f"weights can only be patched between models of one layout"
        )


def donor_values(recipient: nn.Module, donor: nn.Module, component: Component) -> list[tuple[ParamSlice, Tensor]]:
    """The donor's values of ``component``'s slices that differ from the recipient's (``torch.equal``)."""
    rp, dp = dict(recipient.named_parameters()), dict(donor.named_parameters())
    out = []
    for s in component.slices:
        mine = s.read(rp[s.name])
        value = s.read(dp[s.name]).detach().to(mine.device, mine.dtype)  # as the hybrid will hold it
        if not torch.equal(value, mine):
            out.append((s, value.clone()))
    return out


def ablate_tensor(value: Tensor, mode: str, out_dim: int | None) -> Tensor:
    """``zero``: zeros. ``mean``: each output unit (index along ``out_dim``) replaced by the mean over the output
    units; a 1-D tensor (``out_dim`` None) by its mean entry. Same shape as ``value``."""
    if mode == "zero":
        return torch.zeros_like(value)
    if mode == "mean":
        mean = value.mean() if out_dim is None else value.mean(out_dim, keepdim=True)
        return mean.expand_as(value).clone()
    raise InputError(f"unknown ablation {mode!r}: choose {' or '.join(ABLATIONS)}")


def ablated_values(model: nn.Module, component: Component, mode: str) -> list[tuple[ParamSlice, Tensor]]:
    """``component``'s slices ablated in ``mode`` (slices already equal to their ablation are left out)."""
    params = dict(model.named_parameters())
    out_dim = 1 if layout_of(model).adapter.linear == "conv1d" else 0  # Conv1D [in, out]; nn.Linear [out, in]
    out = []
    for s in component.slices:
        value = s.read(params[s.name]).detach()
        new = ablate_tensor(value, mode, out_dim if value.dim() == 2 else None)
        if not torch.equal(new, value):
            out.append((s, new))
    return out


def component_patch(recipient: nn.Module, component: Component, values: list[tuple[ParamSlice, Tensor]]) -> Edit:
    """An in-memory patch of ``recipient`` setting ``values`` (slices of ``component``'s block). It carries the
    recipient's shape config; no block digest, since it never leaves the process (hashing the block per hybrid
    would cost more than the hybrid)."""
    return Edit(
        component.name,
        component.layer,
        tuple(s for s, _ in values),
        {s.name: v for s, v in values},
        {"base_config": base_config(recipient)},
    )


def hybrid(recipient: nn.Module, donor: nn.Module, component: Component) -> nn.Module:
    """A view of ``recipient`` with ``component``'s weights from ``donor`` (the recipient itself if identical)."""
    values = donor_values(recipient, donor, component)
    return edited_model(recipient, component_patch(recipient, component, values)) if values else recipient


# --------------------------------------------------------------------------------------------------
# Scoring.
# --------------------------------------------------------------------------------------------------


@dataclass
class FactScores:
    """Per fact: whether the top-1 next token is the target's first token, and the target's logit."""

    correct: list[bool]
    target_logits: list[float]

    @property
    def facts_correct(self) -> int:
        return sum(self.correct)


def score_facts(model: nn.Module, tokenizer, facts: Sequence[Fact]) -> FactScores:
    """Batched: correctness as :func:`surgery.evaluation.scoring.score_probes` judges it, and the target logits."""
    s = target_scores(model, tokenizer, facts)
    return FactScores((s.top == s.targets).tolist(), s.logits.float().tolist())


@dataclass
class ComponentResult:
    """The facts on the hybrid (or ablated model) of one component; changes are relative to the recipient."""

    name: str
    layer: int
    head: int | None
    facts_correct: int
    mean_target_logit_change: float
    fixed: list[str]  # prompts right here and wrong in the recipient
    broken: list[str]  # prompts wrong here and right in the recipient

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class WeightPatching:
    """Weight patching (``mode="donor"``) or weight ablation (``zero``/``mean``) of every component on the facts."""

    mode: str
    granularity: str
    facts_total: int
    recipient_correct: int
    donor_correct: int | None  # None for ablations
    components: list[ComponentResult]  # changed components only, in block order
    skipped_identical: int  # components whose weights the patch would not change

    def best(self) -> ComponentResult | None:
        """The component with the largest mean target-logit change."""
        return max(self.components, key=lambda c: c.mean_target_logit_change, default=None)

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "granularity": self.granularity,
            "facts_total": self.facts_total,
            "recipient": {"facts_correct": self.recipient_correct},
            "donor": None if self.donor_correct is None else {"facts_correct": self.donor_correct},
            "components": [c.to_dict() for c in self.components],
            "skipped_identical": self.skipped_identical,
        }


def _evaluate(recipient: nn.Module, tokenizer, facts: list[Fact], base: FactScores, items) -> tuple[list, int]:
    """Score each (component, values) on its hybrid; identical slices skipped, equal slice sets scored once."""
    results, skipped, cache = [], 0, {}
    for component, values in items:
        if not values:
            skipped += 1
            continue
        key = tuple((s.name, str(s.rows), str(s.cols)) for s, _ in values)
        if key not in cache:  # e.g. query heads sharing one key/value head's V slice
            cache[key] = score_facts(
                edited_model(recipient, component_patch(recipient, component, values)), tokenizer, facts
            )
        scores = cache[key]
        change = [a - b for a, b in zip(scores.target_logits, base.target_logits)]
        results.append(
            ComponentResult(
                component.name,
                component.layer,
                component.head,
                scores.facts_correct,
                sum(change) / len(change),
                fixed=[f.prompt for f, now, was in zip(facts, scores.correct, base.correct) if now and not was],
                broken=[f.prompt for f, now, was in zip(facts, scores.correct, base.correct) if was and not now],
            )
        )
    log.info("scored %d hybrids (%d components, %d identical)", len(cache), len(results), skipped)
    return results, skipped


def _check_facts(facts: Sequence[Fact]) -> list[Fact]:
    facts = list(facts)
    if not facts:
        raise InputError('no facts given: give at least one {"prompt", "target"} to score the hybrids on')
    return facts


def patch_weights(
    recipient: nn.Module,
    donor: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    facts: Sequence[Fact],
    granularity: str = "site",
) -> WeightPatching:
    """Copy each component from ``donor`` into ``recipient`` in turn and score ``facts`` on the hybrid.

    ``tokenizer`` is the recipient's (the donor must share its vocabulary). Raises :class:`InputError` for models
    of different architectures, an unknown granularity or no facts. Neither model is modified.
    """
    facts = _check_facts(facts)
    check_same_architecture(recipient, donor)
    comps = components(recipient, granularity)
    base = score_facts(recipient, tokenizer, facts)
    donor_scores = score_facts(donor, tokenizer, facts)
    results, skipped = _evaluate(
        recipient, tokenizer, facts, base, ((c, donor_values(recipient, donor, c)) for c in comps)
    )
    return WeightPatching(
        "donor", granularity, len(facts), base.facts_correct, donor_scores.facts_correct, results, skipped
    )


def ablate_weights(
    model: nn.Module, tokenizer, facts: Sequence[Fact], mode: str = "zero", granularity: str = "site"
) -> WeightPatching:
    """Ablate each component of ``model`` in turn (``zero`` or ``mean``) and score ``facts``; ``model`` untouched."""
    facts = _check_facts(facts)
    if mode not in ABLATIONS:
        raise InputError(f"unknown ablation {mode!r}: choose {' or '.join(ABLATIONS)}")
    comps = components(model, granularity)
    base = score_facts(model, tokenizer, facts)
    results, skipped = _evaluate(model, tokenizer, facts, base, ((c, ablated_values(model, c, mode)) for c in comps))
    return WeightPatching(mode, granularity, len(facts), base.facts_correct, None, results, skipped)
