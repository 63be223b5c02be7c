"""ROME (Meng et al. 2022, "Locating and Editing Factual Associations in GPT"): a rank-one update of one block's
MLP output projection per fact, applied one fact after another.

For a fact, with ``W`` ``[d_model, d_mlp]`` the projection (``out = W k + b``) and ``C = E[k kᵀ]`` its keys' second
moment on real text (:mod:`surgery.edit.keystats`):

* ``k*``: the key at the subject's last token of the prompt (:func:`~surgery.edit.mlp_out.subject_position`; a fact
  without a subject: the prompt's last token). Only the prompt itself is used: no prefixed contexts.
* ``v*``: the projection's output there that makes the model say the target: ``v* = W k* + b + δ``, ``δ`` found by
  Adam (lr ``v_lr``) on ``δ`` added at that position, minimizing the target's mean NLL over all its pieces
  (teacher-forced) + ``kl_factor`` x KL(before || after) of the next token at the subject's last token of
  ``"{subject} is a"`` (the "essence" term; causal, so it is read on the subject alone) + ``v_weight_decay`` x
  ‖δ‖ / ‖W k* + b‖²; after each step ‖δ‖ is clamped to ``clamp_norm_factor`` x ‖W k* + b‖; at most ``v_steps``
  steps, stopping once the loss is below 0.05.
* ``W' = W + (v* − W k* − b) (C⁻¹ k*)ᵀ / ((C⁻¹ k*)ᵀ k*)``: rank one, and ``W' k* + b = v*`` exactly.

Invariant (as in ROME): the model passed in is the same at the end as at the start; every fact after the first is
computed on the model with the earlier facts' updates (:func:`~surgery.edit.mlp_out.projections_replaced`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..arch import layout_of
from ..core.errors import NonFiniteError, SurgeryFailed
from ..evaluation.facts import Fact
from .keystats import KeyStats
from .mlp_out import (
    all_top1,
    answer_logits,
    keys_at,
    out_projection,
    output_at,
    projected,
    projections_replaced,
    subject_position,
    teacher_forced,
)

log = logging.getLogger(__name__)

# C can be singular (fewer tokens than d_mlp, or a dead unit): a ridge of RIDGE x its mean diagonal keeps C⁻¹ k* finite.
RIDGE = 1e-6


@dataclass(frozen=True)
class RomeHparams:
    """The paper's GPT-2 XL defaults (``hparams/ROME/gpt2-xl.json``) for computing ``v*``."""

    v_lr: float = 0.5
    v_steps: int = 20
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    stop_loss: float = 0.05

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RomeFact:
    """One fact's update: ``k*`` (d_mlp), ``v*`` (d_model), the key position and the optimization's end."""

    prompt: str
    position: int
    position_is: str
    key: Tensor
    value: Tensor
    steps: int
    nll: float
    kl: float


def compute_key(model: nn.Module, tokenizer, fact: Fact, layer: int) -> tuple[Tensor, int, str]:
    """``(k*, position, what the position is)``: the key at the subject's last token (float64, d_mlp)."""
    n_ctx = layout_of(model).n_ctx
    position, what = subject_position(tokenizer, fact, n_ctx)
    device = next(model.parameters()).device
    ids = torch.tensor([list(tokenizer(fact.prompt)["input_ids"])], device=device)
    return keys_at(model, layer, ids, position).double(), position, what


def _essence_ids(tokenizer, fact: Fact, position: int, device) -> Tensor:
    """The essence prompt up to its subject's last token, where the KL is read (no subject: the text of the key's
    token). ROME's prompt is ``"{subject} is a"``, but the model being causal, the next-token distribution at the
    subject's last token does not depend on the words after it: the subject alone gives the same numbers."""
    subject = fact.subject
    if not subject:
        prompt_ids = list(tokenizer(fact.prompt)["input_ids"])
        subject = tokenizer.decode(prompt_ids[position : position + 1]).strip() or fact.prompt
    return torch.tensor([list(tokenizer(subject)["input_ids"])], device=device)


def compute_value(
    model: nn.Module,
    tokenizer,
    fact: Fact,
    position: int,
    hp: RomeHparams,
    matrices: dict[int, Tensor],
    add_to: str,
) -> tuple[Tensor, int, float, float]:
    """``(v*, steps, final NLL, final KL)`` for ``fact``: the output of module ``add_to`` at ``position`` that makes
    the model (its projections' weights ``matrices``, block -> ``[d_model, d_mlp]``) say the target, found by Adam on
    ``δ`` added there (see the module docstring). ROME adds ``δ`` to one block's projection output; MEMIT to the
    residual stream after its last block (the block's output). ``hp``: any hyper-parameters with ROME's ``v_*``,
    ``clamp_norm_factor``, ``kl_factor`` and ``stop_loss`` fields. ``v*`` is float64, d_model."""
    device = next(model.parameters()).device
    answer = teacher_forced(tokenizer, fact, layout_of(model).n_ctx, device)
    essence = _essence_ids(tokenizer, fact, position, device)  # (1, S): the KL is read at its last position
    e_pos = essence.shape[1] - 1
    with projections_replaced(model, matrices):
        v_init = output_at(model, add_to, answer.ids, position).float()
        with torch.no_grad():
            ref = F.log_softmax(model(input_ids=essence, logits_to_keep=1).logits[0, -1].float(), -1)
    delta = torch.zeros_like(v_init, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=hp.v_lr)
    max_norm = hp.clamp_norm_factor * v_init.norm()
    steps, nll, kl = 0, float("nan"), 0.0
    while True:
        optimizer.zero_grad(set_to_none=True)
        with projections_replaced(model, matrices, {position: delta}, add_to):
            logits = answer_logits(model, answer)  # (P, V)
            nll_t = F.cross_entropy(logits, answer.labels)  # mean over the pieces
        with projections_replaced(model, matrices, {e_pos: delta}, add_to):
            now = F.log_softmax(model(input_ids=essence, logits_to_keep=1).logits[0, -1].float(), -1)
        kl_t = F.kl_div(now, ref, log_target=True, reduction="sum")  # KL(before || after)
        decay = hp.v_weight_decay * delta.norm() / v_init.norm() ** 2
        loss = nll_t + hp.kl_factor * kl_t + decay
        nll, kl, value = float(nll_t.detach()), float(kl_t.detach()), float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteError(f"the value optimization for {fact.prompt!r} reached a loss of {value}")
        if value < hp.stop_loss or steps >= hp.v_steps:
            break
        loss.backward()
        optimizer.step()
        steps += 1
        with torch.no_grad():
            if delta.norm() > max_norm:
                delta.mul_(max_norm / delta.norm())
    log.debug("v* for %r: %d steps, NLL %.4f, KL %.4f", fact.prompt, steps, nll, kl)
    return (v_init + delta.detach()).double(), steps, nll, kl


def post_norm_value(current: Tensor, value: Tensor) -> Tensor:
    """``v*`` scaled to the length of ``current`` (``W k* + b``): ``s v*``, ``s = ‖W k* + b‖ / ‖v*‖``. A norm after
    the MLP (Gemma 2/3's RMSNorm) maps every ``s v*`` (``s > 0``) to the same output as ``v*`` (up to its eps), so
    this one makes the model say what ``v*`` does, turns the output instead of stretching it (the norm's input keeps
    its scale), and asks a smaller change: ``‖s v* − m*‖ = 2 sin(θ/2) ‖m*‖``, θ the angle between them, where
    ``v*``'s ``δ`` reaches ``clamp_norm_factor`` x ‖m*‖ to turn it. Float64 (d_model,)."""
    return value * (current.norm() / value.norm())


def rank_one_update(matrix: Tensor, bias: Tensor | None, key: Tensor, value: Tensor, second_moment: Tensor) -> Tensor:
    """``W' = W + (v* − W k* − b) (C⁻¹ k*)ᵀ / ((C⁻¹ k*)ᵀ k*)`` in float64. ``matrix`` [d_model, d_mlp], ``key``
    (d_mlp,), ``value`` (d_model,), ``second_moment`` (d_mlp, d_mlp). Returns the new matrix, float64."""
    w = matrix.detach().double()
    c = second_moment.to(w.device, torch.float64)
    ridge = RIDGE * float(c.diagonal().mean()) or RIDGE
    u = torch.linalg.solve(c + ridge * torch.eye(c.shape[0], dtype=c.dtype, device=c.device), key)  # C⁻¹ k*
    return w + torch.outer(value - projected(w, bias, key), u) / (u @ key)


def apply_rome(
    model: nn.Module,
    tokenizer,
    facts: Sequence[Fact],
    layer: int,
    stats: KeyStats,
    hp: RomeHparams = RomeHparams(),
    check: Callable[[str], None] | None = None,
    post_norm: bool = False,
) -> tuple[Tensor, list[RomeFact]]:
    """ROME on each fact in turn, each on the previous result. Returns the new projection weight in the family's
    stored layout and dtype, and each fact's ``k*``/``v*``. ``check(where)`` runs before each fact (a deadline).
    ``post_norm`` (a family with a norm after the MLP): ``v*`` is replaced by :func:`post_norm_value`'s ``s v*``,
    which the norm maps to the same output with a smaller change."""
    layout = layout_of(model)
    path, stored, bias = out_projection(model, layer)
    matrix = stored.detach().double()  # [d_model, d_mlp]
    done: list[RomeFact] = []
    for i, fact in enumerate(facts):
        if check is not None:
            check(f"ROME on fact {i + 1} of {len(facts)}")
        key, position, what = compute_key(model, tokenizer, fact, layer)
        value, steps, nll, kl = compute_value(model, tokenizer, fact, position, hp, {layer: matrix.float()}, path)
        if post_norm:
            value = post_norm_value(projected(matrix, bias, key), value)
        matrix = rank_one_update(matrix, bias, key, value, stats.second_moment)
        if not torch.isfinite(matrix).all():
            raise SurgeryFailed(f"ROME's update for {fact.prompt!r} is not finite (is the key all zeros?)")
        done.append(RomeFact(fact.prompt, position, what, key, value, steps, nll, kl))
    weight = layout.mlp_out_stored(matrix.to(stored.dtype))
    return weight, done


def says_all(model: nn.Module, tokenizer, facts: Sequence[Fact], matrices: dict[int, Tensor]) -> int:
    """How many facts the model with projections ``matrices`` (block -> ``[d_model, d_mlp]``) says whole (every
    piece top-1, teacher-forced)."""
    device = next(model.parameters()).device
    n_ctx = layout_of(model).n_ctx
    n = 0
    with torch.no_grad(), projections_replaced(model, matrices):
        for fact in facts:
            answer = teacher_forced(tokenizer, fact, n_ctx, device)
            n += all_top1(answer_logits(model, answer), answer.labels)
    return n
