"""MEMIT (Meng et al. 2023, "Mass-Editing Memory in a Transformer") and AlphaEdit (Fang et al. 2025, "AlphaEdit:
Null-Space Constrained Knowledge Editing for Language Models"): a batch of facts written into the MLP output
projections of several consecutive blocks ``layers`` at once (``docs/editors.md``).

With ``W_l`` ``[d_model, d_mlp]`` block ``l``'s projection (``out = W_l k + b``) and ``C_l = E[k kᵀ]`` its keys'
second moment on real text (:mod:`surgery.edit.keystats`):

1. For each fact ``i``, its key position (:func:`~surgery.edit.mlp_out.subject_position`) and its target ``z_i``
   (d_model): the residual stream after the *last* block of ``layers`` at that position that makes the model say the
   target: ``z_i = h_i + δ_i``, ``δ_i`` found by ROME's value optimization
   (:func:`~surgery.edit.rome.compute_value`, δ added to the block's output), on the unedited model.
2. For each ``l`` in ``layers``, first to last, on the model with the updates of the blocks before it:
   ``K`` (d_mlp, n) the facts' keys at block ``l``, ``R = (Z − H) / (blocks left, l included)`` with ``H``
   (d_model, n) the facts' residuals after the last block now, and ``W_l += ΔW_l``:

   * MEMIT: ``ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹``, ``λ = mom2_update_weight`` (15,000): the minimum of
     ``‖ΔW K − R‖² + λ tr(ΔW C ΔWᵀ)``, as the authors' code computes it (``C`` the mean, so ``λ C`` weighs the
     preserved keys as ``λ`` keys of text against the ``n`` new ones); plus ROME's ridge of 1e-6 x its mean diagonal.
   * AlphaEdit: ``ΔW = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + α I)⁻¹`` with ``P`` the projector on the eigenvectors of ``C``
     whose eigenvalues are below ``nullspace_threshold`` x the largest (the preserved keys' null space), ``K_p``
     the keys of earlier edit rounds (none in a single round) and ``α`` = ``l2``: every row of ``ΔW`` lies in the
     range of ``P``, so ``ΔW k ≈ 0`` for the keys of the text ``C`` was measured on.

Invariant (as in MEMIT): the model passed in is the same at the end as at the start; the updated projections are
run with :func:`~surgery.edit.mlp_out.projections_replaced`, never written into it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from ..arch import layout_of
from ..core.errors import SurgeryFailed
from ..core.hooks import hooked, main_output
from ..evaluation.facts import Fact
from .keystats import KeyStats
from .mlp_out import out_projection, projected, projections_replaced, subject_position
from .rome import RIDGE, compute_value

log = logging.getLogger(__name__)

# (K, R) -> ΔW for one block: K (d_mlp, n), R (d_model, n), ΔW (d_model, d_mlp), float64
Solver = Callable[[int, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class MemitHparams:
    """MEMIT's GPT-J defaults (``hparams/MEMIT/EleutherAI_gpt-j-6B.json``) for the targets ``z`` and the update;
    ``span``: how many blocks, ending at the chosen one, the update is spread over (GPT-J: blocks 3-8, 6)."""

    v_lr: float = 0.5
    v_steps: int = 25
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    stop_loss: float = 0.05
    mom2_update_weight: float = 15000.0
    span: int = 5

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class AlphaEditHparams(MemitHparams):
    """AlphaEdit's Llama 3 8B defaults (``hparams/AlphaEdit/llama3-8b.yaml``): MEMIT's but for ``v_lr``, plus the
    null space's threshold (relative here: see ``docs/editors.md``) and ``l2``, the ``α I`` of the solve."""

    v_lr: float = 0.1
    nullspace_threshold: float = 2e-2
    l2: float = 10.0


@dataclass
class MemitFact:
    """One fact's target: ``z`` (d_model, float64) at ``position`` (``position_is`` says which token), and how the
    optimization of ``δ`` ended."""

    prompt: str
    position: int
    position_is: str
    z: Tensor
    steps: int
    nll: float
    kl: float


def spread_layers(last: int, span: int) -> tuple[int, ...]:
    """The ``span`` blocks ending at ``last`` (clipped at block 0), ascending."""
    return tuple(range(max(0, last - span + 1), last + 1))


def memit_delta(keys: Tensor, resid: Tensor, second_moment: Tensor, weight: float) -> Tensor:
    """MEMIT's update ``ΔW = R Kᵀ (λ C + ε I + K Kᵀ)⁻¹`` in float64: ``keys`` K (d_mlp, n), ``resid`` R
    (d_model, n), ``second_moment`` C (d_mlp, d_mlp), ``weight`` λ; ``ε = RIDGE`` x the mean diagonal of ``λ C``
    (as ROME's: a unit no text ever fires would make the matrix singular). Returns ΔW (d_model, d_mlp)."""
    k, r = keys.double(), resid.double()
    c = weight * second_moment.to(k.device, torch.float64)
    ridge = RIDGE * float(c.diagonal().mean()) or RIDGE
    a = c + ridge * torch.eye(c.shape[0], dtype=c.dtype, device=c.device) + k @ k.T  # (d_mlp, d_mlp), symmetric
    return r @ torch.linalg.solve(a, k).T  # R (A⁻¹ K)ᵀ = R Kᵀ A⁻¹


def null_space_projector(second_moment: Tensor, threshold: float) -> Tensor:
    """AlphaEdit's ``P = U Uᵀ`` over the eigenvectors ``U`` of ``C`` (d_mlp, d_mlp) whose eigenvalues are below
    ``threshold`` x the largest: the directions the preserved keys (almost) never take. Float64 (d_mlp, d_mlp)."""
    c = second_moment.double()
    values, vectors = torch.linalg.eigh((c + c.T) / 2)  # ascending
    u = vectors[:, values < threshold * values[-1].clamp_min(0)]  # (d_mlp, r)
    return u @ u.T


def alphaedit_delta(
    keys: Tensor, resid: Tensor, projector: Tensor, l2: float, previous: Tensor | None = None
) -> Tensor:
    """AlphaEdit's update ``ΔW = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + α I)⁻¹`` in float64: ``keys`` K (d_mlp, n),
    ``resid`` R (d_model, n), ``projector`` P (d_mlp, d_mlp), ``l2`` α, ``previous`` ``K_p K_pᵀ`` (d_mlp, d_mlp) of
    earlier rounds or None. Solved transposed, ``(P (K Kᵀ + K_p K_pᵀ) + α I) ΔWᵀ = P K Rᵀ``, as P and the Gram
    matrices are symmetric. Returns ΔW (d_model, d_mlp)."""
    k, r = keys.double(), resid.double()
    p = projector.to(k.device, torch.float64)
    gram = k @ k.T if previous is None else k @ k.T + previous.to(k.device, torch.float64)
    a = p @ gram + l2 * torch.eye(p.shape[0], dtype=p.dtype, device=p.device)
    return torch.linalg.solve(a, p @ k @ r.T).T


def post_norm_target(model: nn.Module, layer: int, matrix: Tensor, keys: Tensor, resid: Tensor) -> Tensor:
    """For a family with a norm after the MLP (Gemma 2/3), block ``layer``'s wanted residual change ``R`` (d_model,
    n) as a change of its projection's output, for ``ΔW K = R'`` to be solved with. What the block adds to the
    residual is ``g ⊙ m / σ(m)`` (``m = W k + b``, ``W`` = ``matrix``, ``K`` = ``keys`` (d_mlp, n), ``g`` the norm's
    gain, ``σ`` its normalizer), not ``m``: the wanted output ``y = g ⊙ m / σ + r`` is mapped back through the norm
    at the current ``σ``, ``m' = σ u / rms(u)`` with ``u = y / g``, and ``R' = m' − m``. Dividing by ``rms(u)``
    projects ``y`` onto what the norm can produce (its outputs all have ``rms(y / g) = 1``: a direction, not a
    length), so a change larger than the norm can write becomes a rotation towards it; where ``g`` is 0 the block
    writes nothing, and ``u`` there is ``m / σ`` scaled to keep ``rms(u) = 1`` where the rest allows. Float64
    (d_model, n)."""
    a = layout_of(model).adapter
    norm = model.get_submodule(a.path("mlp_post_norm", layer))
    bias = out_projection(model, layer)[2]
    k, r = keys.double(), resid.double()
    m = projected(matrix, bias, k)  # (d_model, n)
    sigma = (m.pow(2).mean(0, keepdim=True) + a.norm.eps(norm)).sqrt()  # (1, n), as the norm computes it
    g = a.norm.gain(norm).to(k.device, torch.float64)[:, None]  # (d_model, 1)
    # Where the gain is 0 (Gemma 3 270M's GGUF has such dimensions in blocks 1, 3 and 4) the block writes nothing,
    # whatever m is there: the wanted change there is out of reach, and those entries of u only share the norm's
    # unit RMS with the others. They keep m's direction, scaled to fill what the others leave of it where they can.
    live = g != 0
    u = torch.where(live, (g * m / sigma + r) / torch.where(live, g, 1.0), 0.0)
    dead = torch.where(live, 0.0, m / sigma)
    room = (u.shape[0] - u.pow(2).sum(0, keepdim=True)).clamp(min=0)
    held = dead.pow(2).sum(0, keepdim=True)
    u = u + dead * torch.where(held > 0, room / torch.where(held > 0, held, 1.0), 0.0).sqrt()
    return sigma * u / u.pow(2).mean(0, keepdim=True).sqrt() - m


def compute_targets(
    model: nn.Module,
    tokenizer,
    facts: Sequence[Fact],
    last: int,
    hp: MemitHparams,
    check: Callable[[str], None] | None = None,
) -> list[MemitFact]:
    """Step 1: each fact's ``z`` after block ``last``, on the unedited model (see the module docstring)."""
    block = layout_of(model).adapter.block(last)
    n_ctx = layout_of(model).n_ctx
    out = []
    for i, fact in enumerate(facts):
        if check is not None:
            check(f"target of fact {i + 1} of {len(facts)}")
        position, what = subject_position(tokenizer, fact, n_ctx)
        z, steps, nll, kl = compute_value(model, tokenizer, fact, position, hp, {}, block)
        out.append(MemitFact(fact.prompt, position, what, z, steps, nll, kl))
    return out


def keys_and_residuals(
    model: nn.Module, tokenizer, targets: Sequence[MemitFact], layer: int, last: int, matrices: Mapping[int, Tensor]
) -> tuple[Tensor, Tensor]:
    """``(K (d_mlp, n), H (d_model, n))``, float64: each fact's key at block ``layer`` and its residual after block
    ``last``, at its key position, on the model with projections ``matrices`` (one pass per fact)."""
    device = next(model.parameters()).device
    key_path = out_projection(model, layer)[0]
    block = layout_of(model).adapter.block(last)
    keys, resids = [], []
    with projections_replaced(model, dict(matrices)):
        for t in targets:
            ids = torch.tensor([list(tokenizer(t.prompt)["input_ids"])], device=device)
            key, resid = _read_key_and_residual(model, ids, key_path, block, t.position)
            keys.append(key.double())
            resids.append(resid.double())
    return torch.stack(keys, 1), torch.stack(resids, 1)


def _read_key_and_residual(model: nn.Module, ids: Tensor, key_path: str, block: str, position: int):
    """The input of module ``key_path`` (d_mlp) and the output of ``block`` (d_model) at ``position`` of ``ids``."""
    got: dict[str, Tensor] = {}

    def grab_key(module, args):
        got["k"] = args[0][0, position].detach()

    def grab_resid(module, args, output):
        got["h"] = main_output(output)[0, position].detach()

    with torch.no_grad(), hooked(model, forward={block: grab_resid}, pre={key_path: grab_key}):
        model(input_ids=ids, logits_to_keep=1)
    return got["k"], got["h"]


def spread_update(
    model: nn.Module,
    tokenizer,
    facts: Sequence[Fact],
    layers: Sequence[int],
    hp: MemitHparams,
    solve: Solver,
    check: Callable[[str], None] | None = None,
    post_norm: bool = False,
) -> tuple[dict[int, Tensor], list[MemitFact]]:
    """Steps 1 and 2 with ``solve(layer, K, R) -> ΔW``. ``post_norm`` (families with a norm after the MLP): ``R``
    first mapped back through the norm (:func:`post_norm_target`); False: as the papers. Returns each block's new
    projection matrix (float64, ``[d_model, d_mlp]``) and each fact's target."""
    layers = sorted(layers)
    targets = compute_targets(model, tokenizer, facts, layers[-1], hp, check)
    z = torch.stack([t.z for t in targets], 1)  # (d_model, n)
    matrices = {layer: out_projection(model, layer)[1].detach().double() for layer in layers}
    run_with: dict[int, Tensor] = {}  # the blocks already updated, as the model runs them (float32)
    for i, layer in enumerate(layers):
        if check is not None:
            check(f"update of block {layer}")
        keys, now = keys_and_residuals(model, tokenizer, targets, layer, layers[-1], run_with)
        resid = (z - now) / (len(layers) - i)  # spread what is left equally over the blocks left
        if post_norm:
            resid = post_norm_target(model, layer, matrices[layer], keys, resid)
        delta = solve(layer, keys, resid)
        if not torch.isfinite(delta).all():
            raise SurgeryFailed(f"the update of block {layer} is not finite (are the keys all zeros?)")
        log.debug("block %d: ‖R‖ %.4g, ‖ΔW‖ %.4g", layer, float(resid.norm()), float(delta.norm()))
        matrices[layer] = matrices[layer] + delta
        run_with[layer] = matrices[layer].float()
    return matrices, targets


def apply_memit(
    model: nn.Module,
    tokenizer,
    facts: Sequence[Fact],
    layers: Sequence[int],
    stats: Mapping[int, KeyStats],
    hp: MemitHparams = MemitHparams(),
    check: Callable[[str], None] | None = None,
    post_norm: bool = False,
) -> tuple[dict[int, Tensor], list[MemitFact]]:
    """MEMIT on ``layers`` (``stats[l]``: block ``l``'s key statistics). Returns each block's new projection
    weight in the family's stored layout and dtype, and each fact's target. ``post_norm``: see
    :func:`spread_update`."""

    def solve(layer: int, k: Tensor, r: Tensor) -> Tensor:
        return memit_delta(k, r, stats[layer].second_moment, hp.mom2_update_weight)

    matrices, targets = spread_update(model, tokenizer, facts, layers, hp, solve, check, post_norm)
    return _stored(model, matrices), targets


def apply_alphaedit(
    model: nn.Module,
    tokenizer,
    facts: Sequence[Fact],
    layers: Sequence[int],
    stats: Mapping[int, KeyStats],
    hp: AlphaEditHparams = AlphaEditHparams(),
    check: Callable[[str], None] | None = None,
    previous: Mapping[int, Tensor] | None = None,
    post_norm: bool = False,
) -> tuple[dict[int, Tensor], list[MemitFact], dict[int, int]]:
    """AlphaEdit on ``layers``; ``previous[l]``: ``K_p K_pᵀ`` of block ``l``'s keys edited in earlier rounds (none:
    a single round); ``post_norm``: see :func:`spread_update`. Returns the new weights (stored layout and dtype),
    each fact's target, and each block's null-space dimension."""
    projectors = {layer: null_space_projector(stats[layer].second_moment, hp.nullspace_threshold) for layer in layers}
    previous = previous or {}

    def solve(layer: int, k: Tensor, r: Tensor) -> Tensor:
        return alphaedit_delta(k, r, projectors[layer], hp.l2, previous.get(layer))

    matrices, targets = spread_update(model, tokenizer, facts, layers, hp, solve, check, post_norm)
    dims = {layer: round(float(p.trace())) for layer, p in projectors.items()}
    return _stored(model, matrices), targets, dims


def _stored(model: nn.Module, matrices: Mapping[int, Tensor]) -> dict[int, Tensor]:
    """Each block's matrix ``[d_model, d_mlp]`` back in its weight's stored layout and dtype."""
    layout = layout_of(model)
    out = {}
    for layer, matrix in matrices.items():
        stored = out_projection(model, layer)[1]
        out[layer] = layout.mlp_out_stored(matrix.to(stored.dtype))
    return out
