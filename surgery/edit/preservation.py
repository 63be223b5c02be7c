"""The unrelated-text preservation term of a ``wv`` repair, and its cheaper stand-ins (issue 22).

``kl`` (the default): mean KL(base || edited) of the next-token distributions at every real position of the
unrelated text — the blocks above the edited one, the final norm and the whole-vocabulary unembedding at every
position, forward and backward. The stand-ins (``SurgeryConfig.preserve_term``):

- ``topk``: KL over the base model's top ``TOP_K`` tokens plus one bucket for the rest. Exactly, the bucket needs
  the edited model's log-normaliser, i.e. every logit — an exact top-k bucket saves nothing, forward or backward
  (the normaliser's gradient is the whole softmax). So the normaliser is *estimated*: the top-k logits plus the
  logits of a random subset of ``SUBSET`` vocabulary rows, drawn afresh each step (seeded), the subset's mass (the
  top-k left out) scaled to the ``V - k`` tokens it stands for. ``TOP_K + SUBSET`` unembedding rows instead of
  ``V``; exact when they cover the vocabulary.
- ``hidden``: no unembedding and no block above: the edited block's output on the unrelated text is kept where the
  base's was, as the mean over positions of ``|h_edited - h_base|^2 / |h_base|^2`` (scale-free, so one
  ``kl_weight`` serves any model — but it is a different quantity from a KL, with a different scale).
- ``sampled``: the exact KL at a random ``1 / SAMPLE_EVERY`` of the text's positions, drawn afresh each step from a
  generator seeded by ``config.seed`` (deterministic); the blocks above still run at every position (attention
  needs them), only the unembedding is cut.

The kept prompts' term (their own answers, a few positions) stays the exact KL under every option.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..arch import apply_softcap, layout_of, unembed
from ..evaluation.scoring import kl_divergence
from .upper_stack import FrozenInputs, UpperStack

PRESERVE_TERMS = ("kl", "topk", "hidden", "sampled")
TOP_K = 64
SUBSET = 4096
SAMPLE_EVERY = 4


class TextPreservation:
    """The unrelated-text term of one training run: built once with the base values (its references), then called
    with each step's parameters; returns a scalar to be weighted by ``kl_weight``."""

    def __init__(self, term: str, stack: UpperStack, frozen: FrozenInputs, base_params: dict[str, Tensor], seed: int):
        self.term, self.stack, self.frozen = term, stack, frozen
        model = stack.model
        layout = layout_of(model)
        self.generator = torch.Generator(device=frozen.text.hidden.device).manual_seed(seed)
        with torch.no_grad():
            if frozen.ref_log_probs is None and term in ("kl", "sampled"):
                frozen.ref_log_probs = stack.text_log_probs(frozen, base_params)
            if term == "hidden":
                self.ref_hidden = stack.text_block_output(frozen, base_params)  # (N, d)
                self.ref_norm2 = self.ref_hidden.float().pow(2).sum(-1).clamp_min(1e-12)  # (N,)
            if term == "topk":
                w_u = layout.w_u(model)  # (V, d)
                self.softcap = layout.softcap(model.config)
                self.w_u = w_u
                ref = stack.text_log_probs(frozen, base_params)  # (N, V)
                v = ref.shape[-1]
                k = min(TOP_K, v)
                self.top_lp, self.top = ref.topk(k, -1)  # (N, k) each
                rest = 1 - self.top_lp.exp().sum(-1)
                self.rest_p = rest.clamp_min(0)  # (N,)
                self.rest_lp = rest.clamp_min(1e-30).log()
                self.n_sub = min(SUBSET, v)

    def __call__(self, params: dict[str, Tensor]) -> Tensor:
        if self.term == "kl":
            return kl_divergence(self.frozen.ref_log_probs, self.stack.text_log_probs(self.frozen, params))
        if self.term == "sampled":
            ref = self.frozen.ref_log_probs
            n = ref.shape[0]
            pick = torch.randperm(n, generator=self.generator, device=ref.device)[: max(1, math.ceil(n / SAMPLE_EVERY))]
            h = self.stack.residual(self.frozen.text, params)[self.frozen.text_real][pick]  # (n', d)
            return kl_divergence(ref[pick], F.log_softmax(unembed(self.stack.model, h).float(), -1))
        if self.term == "hidden":
            h = self.stack.text_block_output(self.frozen, params).float()
            return ((h - self.ref_hidden.float()).pow(2).sum(-1) / self.ref_norm2).mean()
        return self._topk(params)

    def _topk(self, params: dict[str, Tensor]) -> Tensor:
        h = self.stack.residual(self.frozen.text, params)[self.frozen.text_real]  # (N, d)
        v, k = self.w_u.shape[0], self.top.shape[-1]
        z_top = apply_softcap(torch.einsum("nd,nkd->nk", h, self.w_u[self.top]), self.softcap).float()  # (N, k)
        if k == v:  # top-k is the whole vocabulary: no bucket
            return (self.top_lp.exp() * (self.top_lp - F.log_softmax(z_top, -1))).sum(-1).mean()
        # a fresh subset each step: a fixed one would leave the other tokens' logits free to grow unseen
        subset = torch.randperm(v, generator=self.generator, device=self.generator.device)[: self.n_sub]
        subset = subset.to(self.w_u.device)  # (S,)
        rest = ~(subset[None, :, None] == self.top[:, None, :]).any(-1)  # (N, S): not among that position's top-k
        log_scale = ((v - k) / rest.sum(-1).clamp_min(1).float()).log()  # (N,) subset mass -> the rest's (exact: 0)
        z_sub = apply_softcap(h @ self.w_u[subset].T, self.softcap).float()  # (N, S)
        rest_lz = torch.logsumexp(z_sub.masked_fill(~rest, float("-inf")), -1) + log_scale  # (N,)
        log_z = torch.logaddexp(torch.logsumexp(z_top, -1), rest_lz)  # the edited model's log-normaliser, estimated
        lq_top = z_top - log_z[:, None]  # (N, k)
        lq_rest = rest_lz - log_z  # (N,)
        kl = (self.top_lp.exp() * (self.top_lp - lq_top)).sum(-1) + self.rest_p * (self.rest_lp - lq_rest)
        return kl.mean()
