"""The frozen part and the trained part of a surgery run: block inputs captured once, blocks above run per step.

The blocks below the edited one never change during surgery, so their output — the residual stream entering
block ``layer`` — is captured once (a forward pre-hook that stops the pass there) for the fact prompts and the
unrelated text. Each training step then runs only :class:`UpperStack`: a private copy of block ``layer`` whose
site parameters are supplied per call, the base's blocks above it (read-only), ``ln_f`` and the unembedding at
the positions that matter (the last position of each fact prompt, every real position of the unrelated text).
Batches are right-padded: with a causal model the real positions never see the padding, so no mask is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .evaluation import encode_texts
from .hooks import hooked
from .layout import BLOCK, LM_HEAD, LN_F, GPT2Layout, causal_mask
from .panels import Probe
from .patch import copy_block
from .tokens import encode_prompt, encode_target, pad_right, real_positions


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass once block ``layer``'s input is known."""


def capture_block_input(model: nn.Module, input_ids: Tensor, layer: int, lengths: Tensor | None = None) -> Tensor:
    """Residual stream entering block ``layer`` (the frozen part's output). (B, T) -> Float[Tensor, "B T d"].

    The blocks from ``layer`` on are not run. ``input_ids`` may be right-padded, with ``lengths`` (B,).
    """
    mask = None if lengths is None else real_positions(lengths, input_ids.shape[1]).long()
    store = {}

    def grab(module, args):
        store["hidden"] = args[0].detach()
        raise _Captured

    with torch.no_grad(), hooked(model, pre={BLOCK.format(layer): grab}):
        try:
            model.transformer(input_ids=input_ids, attention_mask=mask, use_cache=False)
        except _Captured:
            pass
    return store["hidden"]


@dataclass
class FrozenInputs:
    """Everything the training steps need that does not change while training. d = d_model."""

    facts_hidden: Tensor  # Float[Tensor, "Bf Tf d"] residual input of block `layer`
    facts_last: Tensor  # Long[Tensor, "Bf"] last real position of each prompt
    targets: Tensor  # Long[Tensor, "Bf"] first token of each target
    text_hidden: Tensor | None  # Float[Tensor, "Bu Tu d"] (None without unrelated text)
    text_real: Tensor | None  # Bool[Tensor, "Bu Tu"] real (non-padding) positions
    ref_log_probs: Tensor | None = None  # Float[Tensor, "N V"] original next-token log-probs, N = real positions


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


def freeze_inputs(model: nn.Module, tokenizer, facts: Sequence[Probe], unrelated: Sequence[str], layer: int,
                  max_unrelated_tokens: int) -> FrozenInputs:
    """Capture block ``layer``'s inputs for the fact prompts and the unrelated text, once."""
    layout = GPT2Layout.of(model)
    device = next(model.parameters()).device
    prompts = [encode_prompt(tokenizer, f.prompt, layout.n_ctx) for f in facts]
    targets = torch.tensor([encode_target(tokenizer, f.target)[0] for f in facts], device=device)
    ids, lengths = pad_right(prompts, tokenizer.pad_token_id, device)
    frozen = FrozenInputs(capture_block_input(model, ids, layer, lengths), lengths - 1, targets, None, None)
    texts = _truncate_texts(encode_texts(tokenizer, unrelated, layout.n_ctx), max_unrelated_tokens)
    if texts:
        t_ids, t_lengths = pad_right(texts, tokenizer.pad_token_id, device)
        frozen.text_hidden = capture_block_input(model, t_ids, layer, t_lengths)
        frozen.text_real = real_positions(t_lengths, t_ids.shape[1])
    return frozen


class UpperStack:
    """Blocks ``layer .. n_layer-1``, ``ln_f`` and the unembedding, with block ``layer`` replaced by a private
    copy whose site parameters are given per call (``functional_call``: the copy itself is never written)."""

    def __init__(self, model: nn.Module, layer: int):
        self.model, self.layer = model, layer
        self.block = copy_block(model, layer).eval()
        self.prefix = BLOCK.format(layer) + "."
        self.ln_f = model.get_submodule(LN_F)
        self.lm_head = model.get_submodule(LM_HEAD)

    def block_params(self, slices, values: dict[str, Tensor]) -> dict[str, Tensor]:
        """Full tensors of the block's site parameters, the trained slices spliced into the base values."""
        base = dict(self.block.named_parameters())
        return {s.name[len(self.prefix):]: s.write(base[s.name[len(self.prefix):]], values[s.name]) for s in slices}

    def residual(self, hidden: Tensor, params: dict[str, Tensor]) -> Tensor:
        """Final residual (after ``ln_f``) from block ``layer``'s input. (B, T, d) -> (B, T, d)."""
        mask = causal_mask(hidden.shape[1], hidden.dtype, hidden.device)  # (1, 1, T, T)
        h = functional_call(self.block, params, (hidden,), {"attention_mask": mask})
        for i in range(self.layer + 1, len(self.model.transformer.h)):
            h = self.model.transformer.h[i](h, attention_mask=mask)
        return self.ln_f(h)

    def fact_logits(self, frozen: FrozenInputs, params: dict[str, Tensor]) -> Tensor:
        """Next-token logits at each fact prompt's last position. Float[Tensor, "Bf V"]."""
        h = self.residual(frozen.facts_hidden, params)
        rows = torch.arange(h.shape[0], device=h.device)
        return self.lm_head(h[rows, frozen.facts_last])

    def text_log_probs(self, frozen: FrozenInputs, params: dict[str, Tensor]) -> Tensor:
        """Next-token log-probabilities at the unrelated text's real positions. Float[Tensor, "N V"]."""
        h = self.residual(frozen.text_hidden, params)
        return F.log_softmax(self.lm_head(h[frozen.text_real]).float(), -1)
