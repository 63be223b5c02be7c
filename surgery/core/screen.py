"""The exact greedy token of ``x @ W.T`` without the whole float32 product: a bfloat16 screen, then float32 only
where the screen cannot decide.

Greedy generation needs one number per row from the vocabulary product, its argmax, and on a large vocabulary
(Gemma: 262,144 x 640) that product is the largest of a decoding step. On a CPU with native bfloat16 products
(AVX-512 BF16, AMX) the same product in bfloat16 takes about a third of the time (``bench/README.md``). Its error is
bounded: rounding ``x`` and each row ``u_t`` to bfloat16 (unit roundoff ``2**-8``), accumulating in float32 and
rounding the result to bfloat16 move a logit by at most ``slack(d) * |u_t| * |x|``. So every token whose screened
logit is below the screened maximum by more than twice that bound cannot be the argmax; the few that are left are
scored again in float32 and the largest wins, the lowest token id on a tie, as ``torch.argmax`` picks. The answer
is the full float32 product's argmax, up to the rounding of one float32 dot product against another (two logits
within ~1e-6 of each other, where the full product's own answer depends on the kernel).

Pure functions over tensors; who uses the screen decides when it pays (:func:`bf16_is_native`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

UNIT_ROUNDOFF = 2.0**-8  # bfloat16 keeps 8 significant bits: rounding to nearest errs by at most 2**-8, relatively
MAX_CANDIDATES = 64  # per row, on average: past this the screen has not paid, and the rows take the full product


def slack(d: int) -> float:
    """The bound on ``|screened - exact| / (|u| |x|)`` for a dot product of length ``d``: ``x`` and ``u`` rounded to
    bfloat16 (``2u + u**2``), a float32 sum of ``d`` terms (``d * 2**-24``, taken twice for safety) and the result
    rounded to bfloat16 (``u`` of a value at most ``|u| |x| (1 + u)**2``); ``4u`` covers the bfloat16 terms."""
    return 4 * UNIT_ROUNDOFF + 2 * d * 2.0**-24


def bf16_is_native(device: torch.device) -> bool:
    """Whether bfloat16 products are native on ``device`` (a CPU with AVX-512 BF16 or AMX): elsewhere they are
    emulated and the screen would cost more than the product it saves."""
    if device.type != "cpu":
        return False
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes: assume not
        return False


@dataclass(frozen=True)
class Screen:
    """A float32 matrix ``weight`` (V, d), its bfloat16 copy and the largest norm of its rows: what
    :func:`screened_argmax` needs, made once per batch of decoding steps (:meth:`of`)."""

    weight: Tensor  # Float[Tensor, "V d"]
    coarse: Tensor  # BFloat16[Tensor, "V d"]
    row_norm: float  # max_t |u_t|

    @classmethod
    def of(cls, weight: Tensor) -> Screen:
        weight = weight.detach()
        return cls(weight, weight.to(torch.bfloat16), float(weight.norm(dim=-1).max()))


def screened_argmax(screen: Screen, x: Tensor) -> Tensor:
    """``(x @ screen.weight.T).argmax(-1)`` for float32 rows ``x`` (n, d) -> (n,), computed through the bfloat16
    screen. Rows that are not finite, or a batch whose screen leaves too many candidates, take the full product."""
    weight = screen.weight
    if not bool(torch.isfinite(x).all()):
        return (x @ weight.T).argmax(-1)
    coarse = (x.to(torch.bfloat16) @ screen.coarse.T).float()  # (n, V)
    bound = slack(x.shape[-1]) * screen.row_norm * x.norm(dim=-1)  # (n,): |coarse - exact| <= bound, every token
    floor = coarse.max(-1).values - 2 * bound  # a token below it loses to the screened maximum's own exact logit
    rows, tokens = (coarse >= floor[:, None]).nonzero(as_tuple=True)  # (k,), (k,): the candidates
    if rows.numel() > MAX_CANDIDATES * x.shape[0]:
        return (x @ weight.T).argmax(-1)
    exact = (x[rows] * weight[tokens]).sum(-1)  # (k,) float32 logits of the candidates
    n = x.shape[0]
    best = torch.full((n,), float("-inf"), dtype=exact.dtype, device=x.device).scatter_reduce(0, rows, exact, "amax")
    winners = exact == best[rows]
    top = torch.full((n,), weight.shape[0], dtype=torch.long, device=x.device)
    return top.scatter_reduce(0, rows[winners], tokens[winners], "amin")  # the lowest id among equal maxima
