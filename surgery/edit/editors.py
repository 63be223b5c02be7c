"""The editors the field uses, beside our ``wv`` repair: ROME and FT-L, each changing one block's MLP output
projection, and MEMIT and AlphaEdit, changing those of several blocks at once (``operate --method
rome|ft|memit|alphaedit``; ``docs/editors.md``).

:func:`edit_mlp_out` runs one of them on block ``layer`` (MEMIT, AlphaEdit: on ``layers``, ``layer`` the last) and
returns the projections' new weights; ``operate`` wraps them in the same :class:`~surgery.io.edit_file.Edit` (site
``mlp_out``: each projection's weight, whole) and the same evaluation as a ``wv`` repair.
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
from .memit import AlphaEditHparams, MemitHparams, apply_alphaedit, apply_memit
from .rome import RomeHparams, apply_rome, says_all

METHODS = ("wv", "rome", "ft", "memit", "alphaedit")
METHOD_DESCRIPTIONS = {
    "wv": "our repair: train one site (--site) of one block with a KL preservation term",
    "rome": "ROME (Meng et al. 2022): a rank-one update of the MLP output projection per fact",
    "ft": "FT-L (Zhu et al. 2020): fine-tune the MLP output projection under an L-infinity bound",
    "memit": "MEMIT (Meng et al. 2023): one least-squares update of the MLP output projections of several blocks",
    "alphaedit": "AlphaEdit (Fang et al. 2025): MEMIT's update kept in the null space of the preserved keys",
}
# A norm after the MLP (Gemma 2/3's post_feedforward_layernorm, layout key mlp_post_norm): what each editor does
# about it (docs/editors.md, "The norm after the MLP"); families without one edit exactly as the papers.
POST_NORM_NOTES = {
    "rome": "post-MLP norm: v* scaled to the length of W k* + b (the norm gives it the same output)",
    "memit": "post-MLP norm: each block's share of z - h mapped back through the norm at the current sigma",
}
POST_NORM_NOTES["alphaedit"] = POST_NORM_NOTES["memit"]
MULTI_BLOCK = ("memit", "alphaedit")  # the editors that spread one update over several blocks (--layers)
EDIT_SITE = "mlp_out"  # the Edit's site of the editors: the MLP output projections' weights


@dataclass
class TrainOutcome:
    """What one edit's optimisation did: the new values (slice name -> tensor), its effort, its final loss."""

    values: dict[str, Tensor]
    steps: int
    loss: float
    ce: float
    kl: float
    fixed: int
    lr: float = 0.0  # the learning rate the run started with
    backoffs: int = 0  # steps undone because the preservation term jumped (each halved the learning rate)


@dataclass
class MethodOutcome(TrainOutcome):
    """What a key-value editor did: a :class:`TrainOutcome` with the editor's hyper-parameters and notes."""

    hparams: dict = field(default_factory=dict)
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
    layers: Sequence[int] = (),
) -> MethodOutcome:
    """Run ``method`` on block ``layer``'s MLP output projection for ``facts`` (``memit``, ``alphaedit``: on the
    blocks ``layers``, default ``(layer,)``); ``model`` is not modified. The key statistics of ROME, MEMIT and
    AlphaEdit come from :func:`~surgery.edit.keystats.key_statistics` (``stat_tokens`` tokens, cached under
    ``cache_dir``)."""
    if method in MULTI_BLOCK:
        return _spread(
            model, tokenizer, facts, tuple(layers) or (layer,), method, stat_tokens, check, cache_dir, stats_progress
        )
    (name,) = [s.name for s in layout_of(model).mlp_out_slices(layer)]
    post = bool(layout_of(model).adapter.mlp_post_norm)
    if method == "rome":
        stats = key_statistics(
            model, tokenizer, layer, max_tokens=stat_tokens, cache_dir=cache_dir, progress=stats_progress
        )
        hp = RomeHparams()
        weight, done = apply_rome(model, tokenizer, facts, layer, stats, hp, check, post_norm=post)
        matrix = layout_of(model).mlp_out_matrix(weight)
        last = done[-1]
        positions = sorted({d.position_is for d in done})
        notes = [
            f"ROME: k* read at {' / '.join(positions)} of each prompt (the prompt alone, no prefixed contexts); "
            f"C from {stats.n_tokens:,} tokens of {stats.corpus}"
        ]
        if post:
            notes.append(POST_NORM_NOTES["rome"])
        return MethodOutcome(
            {name: weight},
            sum(d.steps for d in done),
            last.nll + hp.kl_factor * last.kl,
            last.nll,
            last.kl,
            says_all(model, tokenizer, facts, {layer: matrix}),
            hp.v_lr,
            hparams={**hp.to_dict(), "stat_tokens": stats.n_tokens, "stat_corpus": stats.corpus, **_post(post)},
            notes=notes,
        )
    if method == "ft":
        hp = FtHparams()
        out = fine_tune(model, tokenizer, facts, layer, hp, progress, check)
        return MethodOutcome(
            {name: out.weight}, out.steps, out.loss, out.loss, 0.0, out.fixed, hp.lr, hparams=hp.to_dict()
        )
    raise ValueError(f"edit_mlp_out runs rome, ft, memit or alphaedit, not {method!r}")


def _post(post: bool) -> dict:
    """The hyper-parameter entry of a post-norm family's adaptation (none for the other families)."""
    return {"post_norm": "adapted"} if post else {}


def _spread(
    model: nn.Module,
    tokenizer,
    facts: Sequence[Fact],
    layers: tuple[int, ...],
    method: str,
    stat_tokens: int,
    check: Callable[[str], None] | None,
    cache_dir: str | os.PathLike | None,
    stats_progress: Callable[..., None] | None,
) -> MethodOutcome:
    """MEMIT or AlphaEdit on ``layers`` (see :func:`edit_mlp_out`)."""
    layout = layout_of(model)
    post = bool(layout.adapter.mlp_post_norm)
    stats = {
        layer: key_statistics(
            model, tokenizer, layer, max_tokens=stat_tokens, cache_dir=cache_dir, progress=stats_progress
        )
        for layer in layers
    }
    notes = []
    if method == "memit":
        hp = MemitHparams()
        weights, targets = apply_memit(model, tokenizer, facts, layers, stats, hp, check, post_norm=post)
    else:
        hp = AlphaEditHparams()
        weights, targets, dims = apply_alphaedit(model, tokenizer, facts, layers, stats, hp, check, post_norm=post)
        notes.append(
            "AlphaEdit: the null space of C (eigenvalues below "
            f"{hp.nullspace_threshold:g} x the largest) has "
            + ", ".join(f"{dims[layer]}/{layout.d_mlp} dimensions at block {layer}" for layer in layers)
        )
    positions = sorted({t.position_is for t in targets})
    some = stats[layers[-1]]
    notes.insert(
        0,
        f"{method}: blocks {', '.join(map(str, layers))}; z read after block {layers[-1]} at "
        f"{' / '.join(positions)} of each prompt (the prompt alone, no prefixed contexts); "
        f"C from {some.n_tokens:,} tokens of {some.corpus}",
    )
    if post:
        notes.append(POST_NORM_NOTES[method])
    nll = sum(t.nll for t in targets) / len(targets)
    kl = sum(t.kl for t in targets) / len(targets)
    name = {layer: layout.mlp_out_slices(layer)[0].name for layer in layers}
    matrices = {layer: layout.mlp_out_matrix(w) for layer, w in weights.items()}
    return MethodOutcome(
        {name[layer]: w for layer, w in weights.items()},
        sum(t.steps for t in targets),
        nll + hp.kl_factor * kl,
        nll,
        kl,
        says_all(model, tokenizer, facts, matrices),
        hp.v_lr,
        hparams={
            **hp.to_dict(),
            "layers": list(layers),
            "stat_tokens": some.n_tokens,
            "stat_corpus": some.corpus,
            **_post(post),
        },
        notes=notes,
    )
