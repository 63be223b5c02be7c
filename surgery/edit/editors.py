"""The editors the field uses, beside our ``wv`` repair: ROME and FT-L, each changing one block's MLP output
projection (``operate --method rome|ft``; ``docs/editors.md``).

:func:`edit_mlp_out` runs one of them on block ``layer`` and returns the projection's new weight; ``operate`` wraps
it in the same :class:`~surgery.io.edit_file.Edit` (site ``mlp_out``: the projection's weight, whole) and the same
evaluation as a ``wv`` repair.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn

from ..arch import layout_of
from ..evaluation.facts import Fact
from .ft import FtHparams, fine_tune
from .keystats import key_statistics
from .rome import RomeHparams, apply_rome, says_all

METHODS = ("wv", "rome", "ft")
METHOD_DESCRIPTIONS = {
    "wv": "our repair: train one site (--site) of one block with a KL preservation term",
    "rome": "ROME (Meng et al. 2022): a rank-one update of the MLP output projection per fact",
    "ft": "FT-L (Zhu et al. 2020): fine-tune the MLP output projection under an L-infinity bound",
}
EDIT_SITE = "mlp_out"  # the Edit's site for ROME and FT-L: the MLP output projection's weight


@dataclass
class MethodOutcome:
    """What a key-value editor did: the new weight (``values``: slice name -> tensor), its effort and notes."""

    values: dict[str, Tensor]
    steps: int
    loss: float
    ce: float
    kl: float
    fixed: int
    lr: float
    hparams: dict
    notes: list[str] = field(default_factory=list)


def edit_mlp_out(
    model: nn.Module,
    tokenizer,
    facts: Sequence[Fact],
    layer: int,
    method: str,
    stat_tokens: int,
    progress: Callable[..., None] | None = None,
    check: Callable[[str], None] | None = None,
    cache_dir: str | os.PathLike | None = None,
    stats_progress: Callable[..., None] | None = None,
) -> MethodOutcome:
    """Run ``method`` (``rome`` or ``ft``) on block ``layer``'s MLP output projection for ``facts``; ``model`` is
    not modified. ROME's key statistics come from :func:`~surgery.edit.keystats.key_statistics` (``stat_tokens``
    tokens, cached under ``cache_dir``)."""
    (name,) = [s.name for s in layout_of(model).mlp_out_slices(layer)]
    if method == "rome":
        stats = key_statistics(
            model, tokenizer, layer, max_tokens=stat_tokens, cache_dir=cache_dir, progress=stats_progress
        )
        hp = RomeHparams()
        weight, done = apply_rome(model, tokenizer, facts, layer, stats, hp, check)
        matrix = layout_of(model).mlp_out_matrix(weight)
        last = done[-1]
        positions = sorted({d.position_is for d in done})
        notes = [
            f"ROME: k* read at {' / '.join(positions)} of each prompt (the prompt alone, no prefixed contexts); "
            f"C from {stats.n_tokens:,} tokens of {stats.corpus}"
        ]
        return MethodOutcome(
            {name: weight},
            sum(d.steps for d in done),
            last.nll + hp.kl_factor * last.kl,
            last.nll,
            last.kl,
            says_all(model, tokenizer, facts, layer, matrix),
            hp.v_lr,
            {**hp.to_dict(), "stat_tokens": stats.n_tokens, "stat_corpus": stats.corpus},
            notes,
        )
    if method == "ft":
        hp = FtHparams()
        out = fine_tune(model, tokenizer, facts, layer, hp, progress, check)
        return MethodOutcome({name: out.weight}, out.steps, out.loss, out.loss, 0.0, out.fixed, hp.lr, hp.to_dict())
    raise ValueError(f"edit_mlp_out runs rome or ft, not {method!r}")
