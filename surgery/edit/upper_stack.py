"""The frozen part and the trained part of a surgery run: block inputs captured once, blocks above run per step.

The blocks below the edited one never change during surgery, so their output — the residual stream entering
block ``layer`` — is captured once for the fact prompts and the unrelated text. So is everything else each
block from ``layer`` up receives from the decoder: its mask (causal, or sliding-window on the layers that have
one) and its rotary position table (Gemma 3 keeps one per layer type), exactly as the model itself built them —
the library never rebuilds a mask or a rotary table, so there is nothing to get subtly wrong. Each training step
then runs only :class:`UpperStack`: a private copy of block ``layer`` whose site parameters are supplied per
call, the base's blocks above it (read-only), the final norm and the unembedding at the positions that matter
(the position before each piece of each fact's answer, teacher-forced; every real position of the unrelated
text; and, for the kept prompts, the positions where the model says its own answer).
Batches are right-padded: with a causal model the real positions never see the padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..arch import layout_of, unembed
from ..core.errors import InputError
from ..core.hooks import hooked, main_output
from ..core.tokens import encode_prompt, encode_target, pad_right, real_positions
from ..evaluation.facts import Fact
from ..evaluation.generation import continuations
from ..evaluation.memo import EvaluationMemo
from ..evaluation.scoring import encode_texts
from ..io.edit_file import copy_block


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass once everything needed is known."""


@dataclass
class BlockInputs:
    """What blocks ``layer ..`` receive for one batch: the residual entering block ``layer`` and, per block,
    the other positional and keyword arguments the decoder passed (mask, rotary table, positions)."""

    hidden: Tensor  # Float[Tensor, "B T d"]
    calls: list[tuple[tuple, dict]] = field(default_factory=list)  # [(args after hidden, kwargs)] per block


def capture_block_inputs(model: nn.Module, input_ids: Tensor, layer: int, lengths: Tensor | None = None) -> BlockInputs:
    """Run the decoder once up to the final norm, recording what blocks ``layer ..`` are called with.

    ``input_ids`` (B, T) may be right-padded, with ``lengths`` (B,). The final norm and unembedding are not run.
    """
    layout = layout_of(model)
    a, n_layer = layout.adapter, layout.n_layer
    mask = None if lengths is None else real_positions(lengths, input_ids.shape[1]).long()
    out = BlockInputs(hidden=None)

    def grab(i):
        def fn(module, args, kwargs):
            if i == layer:
                out.hidden = (args[0] if args else kwargs["hidden_states"]).detach()
            rest = args[1:] if args else ()
            kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            out.calls.append((rest, kwargs))

        return fn

    def stop(module, args):
        raise _Captured

    pre_kwargs = {a.block(i): grab(i) for i in range(layer, n_layer)}
    with torch.no_grad(), hooked(model, pre={a.final_norm: stop}, pre_kwargs=pre_kwargs):
        try:
            model.get_submodule(a.base)(input_ids=input_ids, attention_mask=mask, use_cache=False)
        except _Captured:
            pass
    return out


def capture_block_input(model: nn.Module, input_ids: Tensor, layer: int, lengths: Tensor | None = None) -> Tensor:
    """Residual stream entering block ``layer``. (B, T) -> Float[Tensor, "B T d"]."""
    return capture_block_inputs(model, input_ids, layer, lengths).hidden


@dataclass
class FrozenInputs:
    """Everything the training steps need that does not change while training. d = d_model."""

    facts: BlockInputs  # residual input of block `layer` (Bf, Tf, d) and what each block above receives
    facts_last: Tensor  # Long[Tensor, "Bf"] last real position of each prompt
    targets: Tensor  # Long[Tensor, "P"] every piece of every target, fact by fact (P >= Bf)
    text: BlockInputs | None  # the unrelated text's (Bu, Tu, d) (None without unrelated text)
    text_real: Tensor | None  # Bool[Tensor, "Bu Tu"] real (non-padding) positions
    ref_log_probs: Tensor | None = None  # Float[Tensor, "N V"] original next-token log-probs, N = real positions
    piece_rows: Tensor | None = None  # Long[Tensor, "P"] the fact (row) each target piece belongs to
    piece_positions: Tensor | None = None  # Long[Tensor, "P"] the position whose next token is that piece
    kept: BlockInputs | None = None  # kept prompts, each followed by the model's own answer (Bk, Tk, d)
    kept_at: Tensor | None = None  # Bool[Tensor, "Bk Tk"] the positions whose next token is that answer's
    kept_ref_log_probs: Tensor | None = None  # Float[Tensor, "K V"] original log-probs there, K = kept positions

    @property
    def n_facts(self) -> int:
        return int(self.facts_last.shape[0])


def _truncate_texts(encoded: list[list[int]], budget: int) -> list[list[int]]:
    out, used = [], 0
    for ids in encoded:
        ids = ids[: budget - used]
        if len(ids) >= 2:
            out.append(ids)
            used += len(ids)
        if used >= budget:
            break
    return out


def freeze_inputs(
    model: nn.Module,
    tokenizer,
    facts: Sequence[Fact],
    unrelated: Sequence[str],
    layer: int,
    max_unrelated_tokens: int,
    kept: Sequence[tuple[list[int], list[int]]] = (),
) -> FrozenInputs:
    """Capture block ``layer``'s inputs for the fact prompts, the unrelated text and the kept prompts, once.

    Each fact runs as its prompt followed by its target's pieces but the last (teacher forcing): piece ``i`` is
    the next token at position ``len(prompt) - 1 + i``, so one forward pass trains every piece of the answer.
    ``kept``: ``(prompt ids, answer ids)`` pairs, the answer being what the model itself says; the preservation
    term keeps the next-token distribution at each of the answer's positions (:func:`kept_answers`).
    """
    layout = layout_of(model)
    device = next(model.parameters()).device
    prompts = [encode_prompt(tokenizer, f.prompt, layout.n_ctx) for f in facts]
    pieces = [encode_target(tokenizer, f.target) for f in facts]
    sequences = [p + t[:-1] for p, t in zip(prompts, pieces)]
    for f, seq in zip(facts, sequences):
        if len(seq) > layout.n_ctx:
            raise InputError(
                f"the prompt and answer of {f.prompt!r} are {len(seq) + 1} tokens; this model's "
                f"context is {layout.n_ctx} tokens"
            )
    rows = [row for row, t in enumerate(pieces) for _ in t]
    positions = [len(p) - 1 + i for p, t in zip(prompts, pieces) for i in range(len(t))]
    ids, lengths = pad_right(sequences, tokenizer.pad_token_id, device)
    frozen = FrozenInputs(
        capture_block_inputs(model, ids, layer, lengths),
        torch.tensor([len(p) - 1 for p in prompts], device=device),
        torch.tensor([i for t in pieces for i in t], device=device),
        None,
        None,
        piece_rows=torch.tensor(rows, device=device),
        piece_positions=torch.tensor(positions, device=device),
    )
    texts = _truncate_texts(encode_texts(tokenizer, unrelated, layout.n_ctx), max_unrelated_tokens)
    if texts:
        t_ids, t_lengths = pad_right(texts, tokenizer.pad_token_id, device)
        frozen.text = capture_block_inputs(model, t_ids, layer, t_lengths)
        frozen.text_real = real_positions(t_lengths, t_ids.shape[1])
    kept = [(p, a) for p, a in kept if a]
    if kept:
        k_ids, k_lengths = pad_right([p + a[:-1] for p, a in kept], tokenizer.pad_token_id, device)
        at = torch.zeros(k_ids.shape, dtype=torch.bool, device=device)
        for row, (p, a) in enumerate(kept):
            at[row, len(p) - 1 : len(p) - 1 + len(a)] = True
        frozen.kept = capture_block_inputs(model, k_ids, layer, k_lengths)
        frozen.kept_at = at
    return frozen


def encodable(model: nn.Module, tokenizer, probes: Sequence[Fact]) -> tuple[list[Fact], list[Fact]]:
    """``probes`` split into those this tokenizer encodes, prompt and answer within the context, and the rest."""
    n_ctx = layout_of(model).n_ctx

    def usable(p: Fact) -> bool:
        try:
            return len(encode_prompt(tokenizer, p.prompt, n_ctx)) + len(encode_target(tokenizer, p.target)) < n_ctx
        except InputError:
            return False

    ok = [usable(p) for p in probes]
    return [p for p, u in zip(probes, ok) if u], [p for p, u in zip(probes, ok) if not u]


def kept_answers(
    model: nn.Module, tokenizer, probes: Sequence[Fact], memo: EvaluationMemo | None = None
) -> list[tuple[list[int], list[int]]]:
    """For each probe, its prompt's ids and what the model says after it (greedy): as many tokens as the probe's
    target has pieces, and one more, the token after the answer, which decides whether the answer ends at a word
    boundary (" Abu Dhabi." against " Abu Dhabir.": what the strict judgement reads). The preservation term keeps
    those positions as they are, whatever the model says there.
    A probe this tokenizer cannot encode, or too long for the context, is left out (:func:`encodable`). What
    ``memo`` (of ``model``) holds is not generated again."""
    probes, _ = encodable(model, tokenizer, probes)
    if not probes:
        return []
    n_ctx = layout_of(model).n_ctx
    prompts = [encode_prompt(tokenizer, p.prompt, n_ctx) for p in probes]
    said = continuations(
        model,
        tokenizer,
        [p.prompt for p in probes],
        [len(encode_target(tokenizer, p.target)) + 1 for p in probes],
        memo=memo,
    ).ids
    return list(zip(prompts, said))


def freeze_fact_batches(
    model: nn.Module,
    tokenizer,
    facts: Sequence[Fact],
    unrelated: Sequence[str],
    layer: int,
    max_unrelated_tokens: int,
    batch_size: int,
    kept: Sequence[tuple[list[int], list[int]]] = (),
) -> list[FrozenInputs]:
    """:func:`freeze_inputs` for ``batch_size`` facts at a time (memory bounded by the batch); only the first
    batch carries the unrelated text and the kept prompts. :func:`surgery.edit.training.train_site` accumulates over
    them."""
    facts = list(facts)
    batches = [freeze_inputs(model, tokenizer, facts[:batch_size], unrelated, layer, max_unrelated_tokens, kept)]
    for start in range(batch_size, len(facts), batch_size):
        batches.append(freeze_inputs(model, tokenizer, facts[start : start + batch_size], [], layer, 0))
    return batches


class UpperStack:
    """Blocks ``layer .. n_layer-1``, the final norm and the unembedding, with block ``layer`` replaced by a private
    copy whose site parameters are given per call (``functional_call``: the copy itself is never written)."""

    def __init__(self, model: nn.Module, layer: int):
        self.model, self.layer = model, layer
        self.layout = layout_of(model)
        a = self.layout.adapter
        self.block = copy_block(model, layer).eval()
        self.prefix = a.block(layer) + "."
        self.above = [model.get_submodule(a.block(i)) for i in range(layer + 1, self.layout.n_layer)]
        self.final_norm = model.get_submodule(a.final_norm)

    def block_params(self, slices, values: dict[str, Tensor]) -> dict[str, Tensor]:
        """Full tensors of the block's site parameters, the trained slices spliced into the base values."""
        base = dict(self.block.named_parameters())
        return {s.name[len(self.prefix) :]: s.write(base[s.name[len(self.prefix) :]], values[s.name]) for s in slices}

    def residual(self, inputs: BlockInputs, params: dict[str, Tensor]) -> Tensor:
        """Final residual (after the final norm) from block ``layer``'s input. (B, T, d) -> (B, T, d)."""
        args, kwargs = inputs.calls[0]
        h = main_output(functional_call(self.block, params, (inputs.hidden, *args), kwargs))
        for block, (args, kwargs) in zip(self.above, inputs.calls[1:]):
            h = main_output(block(h, *args, **kwargs))
        return self.final_norm(h)

    def text_block_output(self, frozen: FrozenInputs, params: dict[str, Tensor]) -> Tensor:
        """The edited block's output (the residual leaving block ``layer``) at the unrelated text's real positions;
        no block above is run. Float[Tensor, "N d"]."""
        args, kwargs = frozen.text.calls[0]
        h = main_output(functional_call(self.block, params, (frozen.text.hidden, *args), kwargs))
        return h[frozen.text_real]

    def fact_logits(self, frozen: FrozenInputs, params: dict[str, Tensor]) -> Tensor:
        """Next-token logits at each target piece's position, teacher-forced (``frozen.targets`` are their labels).
        Float[Tensor, "P V"]; a single-token target has one row, at its prompt's last position."""
        h = self.residual(frozen.facts, params)
        return unembed(self.model, h[frozen.piece_rows, frozen.piece_positions])

    def text_log_probs(self, frozen: FrozenInputs, params: dict[str, Tensor]) -> Tensor:
        """Next-token log-probabilities at the unrelated text's real positions. Float[Tensor, "N V"]."""
        h = self.residual(frozen.text, params)
        return F.log_softmax(unembed(self.model, h[frozen.text_real]).float(), -1)

    def kept_log_probs(self, frozen: FrozenInputs, params: dict[str, Tensor]) -> Tensor:
        """Next-token log-probabilities where each kept prompt's own answer is said. Float[Tensor, "K V"]."""
        h = self.residual(frozen.kept, params)
        return F.log_softmax(unembed(self.model, h[frozen.kept_at]).float(), -1)
