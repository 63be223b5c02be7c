"""Activation patching: which activations of a clean run carry the answer into a corrupted one?

Two prompts of the same token length (e.g. clean "The capital of France is", corrupted "The capital of Poland is")
are run once each. Then the corrupted prompt is run again with one activation replaced by its value in the clean
run, for every unit of one kind (definitions in ``docs/patching.md``):

* ``resid`` — a block's output hidden state (the residual stream after the block) at one position;
* ``attn`` — what a block's attention adds to the residual (the output projection's output; Gemma 2/3: the
  ``post_attention_layernorm`` output) at one position;
* ``mlp`` — what a block's MLP adds to the residual (Gemma 2/3: the ``post_feedforward_layernorm`` output) at one
  position;
* ``head`` — one head's ``z`` (its slice of the output projection's input, before W_O) at *every* position.

The metric is the fraction of the clean-minus-corrupted logit difference the patch restores: with
``d(run) = logit(target) - logit(competitor)`` at the last position,
``restored = (d(patched) - d(corrupt)) / (d(clean) - d(corrupt))``: 0 = the corrupted run's value, 1 = the clean
run's. The competitor is the corrupted run's own top answer unless given (its runner-up if that is the target).

Batched: row ``i`` of a batch of copies of the corrupted prompt patches unit ``i``, so one forward pass scores
``batch_size`` units. Replacing is ``torch.where(mask, clean, corrupt)``: every value outside a row's unit is the
corrupted run's own, bitwise. The model is never modified: hooks live inside :func:`surgery.core.hooks.hooked`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..arch import Layout, apply_softcap, layout_of, unembed
from ..core.errors import InputError, require_positive_int
from ..core.hooks import hooked, main_output
from ..core.tokens import encode_prompt, encode_target, token_text

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

KINDS = ("resid", "attn", "mlp", "head")
KIND_DESCRIPTIONS = {
    "resid": "block output (residual stream after the block), one position",
    "attn": "attention output as added to the residual, one position",
    "mlp": "MLP output as added to the residual, one position",
    "head": "one head's z (input of the attention output projection), all positions",
}
MIN_DENOMINATOR = 1e-6  # |d(clean) - d(corrupt)| below this: nothing to restore


@dataclass(frozen=True)
class ActivationPatchingConfig:
    """``kinds``: which grids to compute (:data:`KINDS`); ``batch_size``: patched runs per forward pass."""

    kinds: tuple[str, ...] = KINDS
    batch_size: int = 32
    prepend_bos: bool = False

    def __post_init__(self) -> None:
        require_positive_int("batch_size", self.batch_size)
        object.__setattr__(self, "kinds", tuple(dict.fromkeys(self.kinds)))  # in order, each once
        if not self.kinds:
            raise InputError(f"no patching kinds given: choose from {', '.join(KINDS)}")
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown:
            raise InputError(f"unknown patching kind {unknown[0]!r}: choose from {', '.join(KINDS)}")

    def to_dict(self) -> dict:
        return {**asdict(self), "kinds": list(self.kinds)}


@dataclass(frozen=True)
class PatchUnit:
    """One activation to take from the clean run: ``kind`` in block ``layer``, at ``position`` (None = every
    position), restricted to query head ``head`` (``head`` kind only)."""

    kind: str
    layer: int
    head: int | None = None
    position: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"unknown patching kind {self.kind!r}: choose from {', '.join(KINDS)}")
        if self.head is not None and self.kind != "head":
            raise InputError(f"a {self.kind} unit has no heads: give head only with kind 'head'")


@dataclass
class Answer:
    text: str
    token_id: int


@dataclass
class PatchingGrid:
    """One kind's results: ``restored[layer][j]`` with j a position (resid, attn, mlp) or a head (head)."""

    kind: str
    axis: str  # "position" or "head"
    restored: list[list[float]]
    logit_diff: list[list[float]]  # d(patched)

    def best(self) -> tuple[int, int, float]:
        """(layer, j, restored) of the cell restoring the most."""
        return max(((l, j, v) for l, row in enumerate(self.restored) for j, v in enumerate(row)), key=lambda t: t[2])

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ActivationPatching:
    """Activation patching of one clean/corrupted pair. Layers and heads 0-indexed; positions 0-indexed tokens."""

    clean_prompt: str
    corrupt_prompt: str
    clean_tokens: list[str]
    corrupt_tokens: list[str]
    target: Answer
    competitor: Answer
    competitor_source: str  # "given", "corrupted top" or "corrupted runner-up" (the top was the target)
    logit_diff_clean: float  # d(clean)
    logit_diff_corrupt: float  # d(corrupt)
    grids: dict[str, PatchingGrid]
    n_layer: int
    n_head: int
    blocks: str  # module path of the blocks, for naming them
    config: ActivationPatchingConfig = field(default_factory=ActivationPatchingConfig)

    def to_dict(self) -> dict:
        return {
            "clean_prompt": self.clean_prompt,
            "corrupt_prompt": self.corrupt_prompt,
            "clean_tokens": self.clean_tokens,
            "corrupt_tokens": self.corrupt_tokens,
            "target": asdict(self.target),
            "competitor": asdict(self.competitor),
            "competitor_source": self.competitor_source,
            "logit_diff_clean": self.logit_diff_clean,
            "logit_diff_corrupt": self.logit_diff_corrupt,
            "metric": "restored = (d(patched) - d(corrupt)) / (d(clean) - d(corrupt)), "
            "d = logit(target) - logit(competitor) at the last position",
            "grids": {k: g.to_dict() for k, g in self.grids.items()},
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "blocks": self.blocks,
            "config": self.config.to_dict(),
        }


# --------------------------------------------------------------------------------------------------
# Where each kind lives (module paths from the family's adapter) and the pure metric.
# --------------------------------------------------------------------------------------------------


def unit_module(layout: Layout, kind: str, layer: int) -> tuple[str, str]:
    """(module path, "forward" or "pre") of the hook that reads or replaces ``kind`` in block ``layer``.

    attn/mlp: the module whose output the residual receives — the post-norm where the family has one.
    """
    a = layout.adapter
    if kind == "resid":
        return a.block(layer), "forward"
    if kind == "attn":
        return a.path("attn_post_norm" if a.attn_post_norm else "o", layer), "forward"
    if kind == "mlp":
        return a.path("mlp_post_norm" if a.mlp_post_norm else "mlp", layer), "forward"
    if kind == "head":
        return a.path("o", layer), "pre"
    raise ValueError(f"unknown kind {kind!r}")


def restored_fraction(d_patched: Tensor | float, d_clean: float, d_corrupt: float) -> Tensor | float:
    """``(d_patched - d_corrupt) / (d_clean - d_corrupt)``: 0 = no effect, 1 = the clean run's difference."""
    return (d_patched - d_corrupt) / (d_clean - d_corrupt)


def grid_units(layout: Layout, kind: str, n_pos: int) -> list[PatchUnit]:
    """Every unit of ``kind`` in grid order: layer-major, then position (or head)."""
    if kind == "head":
        return [PatchUnit(kind, l, head=h) for l in range(layout.n_layer) for h in range(layout.n_head)]
    return [PatchUnit(kind, l, position=p) for l in range(layout.n_layer) for p in range(n_pos)]


# --------------------------------------------------------------------------------------------------
# Runs (hooks only; the model is never modified).
# --------------------------------------------------------------------------------------------------


def _with_main(output, new: Tensor):
    return (new, *output[1:]) if isinstance(output, tuple) else new


def capture_activations(
    model: nn.Module, input_ids: Tensor, kinds: Sequence[str]
) -> tuple[dict[tuple[str, int], Tensor], Tensor]:
    """Every block's activations of ``kinds`` for one prompt: ``{(kind, layer): Float[Tensor, "T D"]}`` with D =
    d_model, or H * d_head for ``head`` (z, heads concatenated), and the decoder's final-normed output at the
    last position, Float[Tensor, "1 d"]. ``input_ids``: Long[Tensor, "1 T"]."""
    layout = layout_of(model)
    store: dict[tuple[str, int], Tensor] = {}
    hooks: dict[str, dict] = {"forward": {}, "pre": {}}

    def keep(key, pre):
        def fn(module, args, output=None):
            store[key] = (args[0] if pre else main_output(output))[0].detach()

        return fn

    for kind in kinds:
        for layer in range(layout.n_layer):
            path, how = unit_module(layout, kind, layer)
            hooks[how][path] = keep((kind, layer), how == "pre")
    with torch.no_grad(), hooked(model, **hooks):
        last = model.get_submodule(layout.adapter.base)(input_ids=input_ids, use_cache=False).last_hidden_state
    return store, last[:, -1]


def logit_diffs(model: nn.Module, last: Tensor, token_ids: Tensor) -> Tensor:
    """``logit(token_ids[0]) - logit(token_ids[1])`` from final-normed last positions ``last`` (B, d) -> (B,)."""
    layout = layout_of(model)
    logits = apply_softcap(last.float() @ layout.w_u(model)[token_ids].float().T, layout.softcap(model.config))
    return logits[:, 0] - logits[:, 1]  # logits: (B, 2)


def patched_logit_diffs(
    model: nn.Module,
    input_ids: Tensor,
    token_ids: Tensor,
    clean: dict[tuple[str, int], Tensor],
    rows: Sequence[Sequence[PatchUnit]],
    batch_size: int = 32,
) -> Tensor:
    """``logit(token_ids[0]) - logit(token_ids[1])`` at the last position of ``input_ids`` (1, T), once per row,
    each row run with its units' activations taken from ``clean`` (:func:`capture_activations` of the clean
    prompt). A row may patch several units, or none (the unpatched run). Float[Tensor, "len(rows)"].
    """
    layout = layout_of(model)
    decoder = model.get_submodule(layout.adapter.base)
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        hooks = _replacement_hooks(layout, clean, chunk, input_ids.shape[1])
        with torch.no_grad(), hooked(model, **hooks):
            ids = input_ids.expand(len(chunk), -1)  # (B, T)
            hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state[:, -1]  # (B, d), final-normed
            out.append(logit_diffs(model, hidden, token_ids))
    return torch.cat(out) if out else torch.empty(0)


def _replacement_hooks(
    layout: Layout, clean: dict[tuple[str, int], Tensor], rows: Sequence[Sequence[PatchUnit]], n_pos: int
) -> dict[str, dict]:
    """One hook per (kind, layer) some row patches: ``where(mask, clean, corrupt)`` with ``mask`` (B, T, D) true
    on each row's unit."""
    masks: dict[tuple[str, int], Tensor] = {}
    for i, units in enumerate(rows):
        for u in units:
            key = (u.kind, layout.check_layer(u.layer))
            value = clean[key]  # (T, D)
            mask = masks.setdefault(key, torch.zeros(len(rows), *value.shape, dtype=torch.bool, device=value.device))
            pos = slice(None) if u.position is None else u.position
            if u.position is not None and not 0 <= u.position < n_pos:
                raise InputError(f"position {u.position} is out of range: the prompt has {n_pos} tokens")
            cols = (
                slice(None) if u.head is None else layout.head_slice(layout.check_head(u.head))
            )  # head None: every head
            mask[i, pos, cols] = True
    hooks: dict[str, dict] = {"forward": {}, "pre": {}}
    for (kind, layer), mask in masks.items():
        path, how = unit_module(layout, kind, layer)
        value = clean[(kind, layer)]
        if how == "pre":

            def replace_input(module, args, mask=mask, value=value):
                return (torch.where(mask, value, args[0]), *args[1:])

            hooks["pre"][path] = replace_input
        else:

            def replace_output(module, args, output, mask=mask, value=value):
                return _with_main(output, torch.where(mask, value, main_output(output)))

            hooks["forward"][path] = replace_output
    return hooks


# --------------------------------------------------------------------------------------------------
# Public entry point.
# --------------------------------------------------------------------------------------------------


def encode_pair(
    tokenizer, clean: str, corrupt: str, n_ctx: int, prepend_bos: bool = False
) -> tuple[list[int], list[int]]:
    """Token ids of both prompts; :class:`InputError` unless they have the same number of tokens."""
    a = encode_prompt(tokenizer, clean, n_ctx, prepend_bos=prepend_bos)
    b = encode_prompt(tokenizer, corrupt, n_ctx, prepend_bos=prepend_bos)
    if len(a) != len(b):
        raise InputError(
            f"the clean and corrupted prompts must have the same number of tokens (clean {len(a)}, "
            f"corrupted {len(b)}): activations are swapped position by position, so change words "
            f"for words of the same token length"
        )
    return a, b


@dataclass
class PreparedPair:
    """A clean/corrupted pair ready to patch: token ids (1, T) each, the (target, competitor) ids (2,), the two
    unpatched differences, and the clean run's activations of the kinds asked for."""

    clean_ids: Tensor
    corrupt_ids: Tensor
    token_ids: Tensor
    target: Answer
    competitor: Answer
    competitor_source: str
    logit_diff_clean: float
    logit_diff_corrupt: float
    clean_acts: dict[tuple[str, int], Tensor]

    def restored(self, model: nn.Module, rows: Sequence[Sequence[PatchUnit]], batch_size: int = 32) -> Tensor:
        """Fraction restored by each row's patch (:func:`restored_fraction`). Float[Tensor, "len(rows)"]."""
        d = patched_logit_diffs(model, self.corrupt_ids, self.token_ids, self.clean_acts, rows, batch_size)
        return restored_fraction(d, self.logit_diff_clean, self.logit_diff_corrupt)


def prepare_pair(
    model: nn.Module,
    tokenizer,
    clean: str,
    corrupt: str,
    target: str,
    competitor: str | int | None = None,
    kinds: Sequence[str] = KINDS,
    prepend_bos: bool = False,
) -> PreparedPair:
    """Encode both prompts, pick the competitor, run each once (keeping the clean run's activations of ``kinds``).

    ``target``/``competitor`` are answer texts (first token used), or for the competitor a token id; the
    competitor defaults to the corrupted run's top answer (its runner-up when that is the target). Raises
    :class:`InputError` for prompts of different token lengths, or when the two runs give the same difference
    (nothing to restore).
    """
    layout = layout_of(model)
    device = layout.w_u(model).device
    clean_ids, corrupt_ids = encode_pair(tokenizer, clean, corrupt, layout.n_ctx, prepend_bos)
    t_id = encode_target(tokenizer, target)[0]
    clean_t = torch.tensor([clean_ids], device=device)
    corrupt_t = torch.tensor([corrupt_ids], device=device)
    given = isinstance(competitor, int) or bool(competitor)
    if given:
        c_id = competitor if isinstance(competitor, int) else encode_target(tokenizer, competitor, "competitor")[0]
        if c_id == t_id:
            raise InputError(f"the competitor {competitor!r} starts with the same token as the target {target!r}")
    clean_acts, clean_last = capture_activations(model, clean_t, kinds)  # one run of each prompt
    with torch.no_grad():
        corrupt_last = model.get_submodule(layout.adapter.base)(input_ids=corrupt_t, use_cache=False).last_hidden_state[
            :, -1
        ]  # (1, d)
        if given:
            source = "given"
        else:
            top2 = unembed(model, corrupt_last[0]).topk(2).indices.tolist()
            c_id, source = (top2[1], "corrupted runner-up") if top2[0] == t_id else (top2[0], "corrupted top")
        token_ids = torch.tensor([t_id, c_id], device=device)
        d_clean = float(logit_diffs(model, clean_last, token_ids)[0])
        d_corrupt = float(logit_diffs(model, corrupt_last, token_ids)[0])
    if abs(d_clean - d_corrupt) < MIN_DENOMINATOR:
        raise InputError(
            f"the clean and corrupted prompts give the same logit difference ({d_clean:+.4f}): there is "
            f"nothing to restore; pick prompts whose answers differ"
        )
    return PreparedPair(
        clean_t,
        corrupt_t,
        token_ids,
        Answer(token_text(tokenizer, t_id), t_id),
        Answer(token_text(tokenizer, c_id), c_id),
        source,
        d_clean,
        d_corrupt,
        clean_acts,
    )


def patch_activations(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    clean: str,
    corrupt: str,
    target: str,
    competitor: str | None = None,
    config: ActivationPatchingConfig = ActivationPatchingConfig(),
) -> ActivationPatching:
    """Patch every unit of ``config.kinds`` from the ``clean`` prompt's run into the ``corrupt`` prompt's run, one
    unit per batch row (see :func:`prepare_pair` for the competitor and the errors raised)."""
    layout = layout_of(model)
    pair = prepare_pair(model, tokenizer, clean, corrupt, target, competitor, config.kinds, config.prepend_bos)
    n_pos = pair.clean_ids.shape[1]
    grids = {}
    for kind in config.kinds:
        units = grid_units(layout, kind, n_pos)
        log.info("patching %d %s units, %d per pass", len(units), kind, config.batch_size)
        d = patched_logit_diffs(
            model, pair.corrupt_ids, pair.token_ids, pair.clean_acts, [[u] for u in units], config.batch_size
        )
        restored = restored_fraction(d, pair.logit_diff_clean, pair.logit_diff_corrupt)
        shape = (layout.n_layer, layout.n_head if kind == "head" else n_pos)
        grids[kind] = PatchingGrid(
            kind, "head" if kind == "head" else "position", restored.view(shape).tolist(), d.view(shape).tolist()
        )
    return ActivationPatching(
        clean_prompt=clean,
        corrupt_prompt=corrupt,
        clean_tokens=[token_text(tokenizer, i) for i in pair.clean_ids[0].tolist()],
        corrupt_tokens=[token_text(tokenizer, i) for i in pair.corrupt_ids[0].tolist()],
        target=pair.target,
        competitor=pair.competitor,
        competitor_source=pair.competitor_source,
        logit_diff_clean=pair.logit_diff_clean,
        logit_diff_corrupt=pair.logit_diff_corrupt,
        grids=grids,
        n_layer=layout.n_layer,
        n_head=layout.n_head,
        blocks=layout.adapter.blocks,
        config=config,
    )
