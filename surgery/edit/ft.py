"""FT-L (Zhu et al. 2020, "Modifying Memories in Transformer Models"; ROME's "FT+L" baseline): fine-tune one
block's MLP output projection on the facts under an L∞ bound on the change.

Loss: the mean over facts of each target's mean NLL over all its pieces (teacher-forced: prompt + the answer's
earlier pieces). Adam (lr ``lr``) on the whole weight ``W``; after every step each weight is clamped into
``[W₀ − ε, W₀ + ε]`` (``norm_constraint`` ε), so ‖W − W₀‖∞ ≤ ε always; at most ``steps`` steps, stopping early once
every piece of every target is the top-1 token where it is predicted. Defaults: ROME's GPT-2 XL FT+L hyper-parameters
(``hparams/FT/gpt2-xl_constr.json``): lr 5e-4, ε 5e-4, 25 steps, no weight decay.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..arch import layout_of
from ..core.errors import NonFiniteError
from ..evaluation.facts import Fact
from .mlp_out import all_top1, answer_logits, out_projection, projection_replaced, teacher_forced

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FtHparams:
    lr: float = 5e-4
    norm_constraint: float = 5e-4  # ε of the L∞ bound, in the weights' own units
    steps: int = 25

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FtOutcome:
    weight: Tensor  # the new projection weight, stored layout and dtype
    steps: int
    loss: float
    fixed: int


def fine_tune(
    model: nn.Module,
    tokenizer,
    facts: Sequence[Fact],
    layer: int,
    hp: FtHparams = FtHparams(),
    progress: Callable[..., None] | None = None,
    check: Callable[[str], None] | None = None,
) -> FtOutcome:
    """FT-L on block ``layer``'s output projection (see the module docstring); ``model`` is not modified.
    ``progress(step, total, loss)`` after each step, ``check(where)`` before each (a deadline)."""
    layout = layout_of(model)
    device = next(model.parameters()).device
    answers = [teacher_forced(tokenizer, f, layout.n_ctx, device) for f in facts]
    _, stored, _ = out_projection(model, layer)
    w0 = stored.detach().float()
    w = w0.clone().requires_grad_(True)  # [d_model, d_mlp]
    optimizer = torch.optim.Adam([w], lr=hp.lr)
    steps = 0
    while True:
        if check is not None:
            check(f"FT-L step {steps + 1}")
        optimizer.zero_grad(set_to_none=True)
        loss, fixed = torch.zeros((), device=device), 0
        with projection_replaced(model, layer, w):
            for answer in answers:
                logits = answer_logits(model, answer)  # (P, V)
                loss = loss + F.cross_entropy(logits, answer.labels) / len(answers)
                fixed += all_top1(logits.detach(), answer.labels)
        if not torch.isfinite(loss.detach()):
            raise NonFiniteError(f"FT-L's loss became {float(loss.detach())} at step {steps}")
        if fixed == len(answers) or steps >= hp.steps:
            break
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # the L∞ bound: each weight within ε of where it started
            w.copy_(torch.maximum(torch.minimum(w, w0 + hp.norm_constraint), w0 - hp.norm_constraint))
        steps += 1
        if progress is not None:
            progress(steps, hp.steps, float(loss.detach()))
    log.debug("FT-L: %d steps, loss %.4f, %d/%d facts said", steps, float(loss.detach()), fixed, len(answers))
    weight = layout.mlp_out_stored(w.detach().to(stored.dtype))
    return FtOutcome(weight, steps, float(loss.detach()), fixed)
