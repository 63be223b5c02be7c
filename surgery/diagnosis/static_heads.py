"""Input-free diagnostics of every attention head, from the weights alone.

For each (layer, head), 0-indexed, with the per-head weights of :class:`surgery.arch.Layout`
(W_Q, W_K, W_V: [d_model, d_head]; W_O: [d_head, d_model]; raw HF weights, no norm folding; under grouped-query
attention each query head is shown with the key/value head it reads, so heads sharing one have equal K/V
measures; rotary models: every measure is computed on the un-rotated weights, see ``docs/heads.md``):

* **QK overlap**: the ``k`` input dimensions (rows) of W_Q with the largest L2 norms, and likewise for W_K;
  overlap = |top-k(W_Q) ∩ top-k(W_K)| / k, in [0, 1]. 1.0 when W_Q = W_K. k is clipped to d_model // 4: at
  k = d_model every head would trivially score 1.0 (the demo model has d_model 64 < 100 * 4, GPT-2 small keeps
  k = 100 of 768 as in the reference).
* **QK norm** ``||W_Q W_K^T||_F`` and **OV norm** ``||W_V W_O||_F``, computed from d_head x d_head Gram
  matrices (``||A B^T||_F^2 = sum((A^T A) * (B^T B))``): the d_model x d_model circuits are never built.
* **Key response by token class**: mean over a class's tokens of ``||W_K^T x(e)||`` with
  ``x(e) = gamma_1 * normalize(e)``: block ``l``'s pre-attention norm (LayerNorm or RMSNorm) applied to the
  token embedding ``e = W_E[t]`` (plus the mean position embedding, by default) *without* its bias. The bias
  term ``beta_1 W_K + b_K`` is the same for every key, so it adds the same amount to every attention score of a
  query and cancels in the softmax. Classes come from :mod:`surgery.diagnosis.token_classes`; at most
  ``class_sample`` seeded tokens per class are used.
* **Copying score** over a seeded sample S of ``copy_sample`` non-special tokens: the OV circuit from a source token
  s to the logit of token t, ``M[s, t] = x(e_s) W_V W_O . (g_post * centre(gamma_f * u_t))`` (the final norm with
  its scale left out: a positive factor; ``g_post`` the gain of the attention post-norm in Gemma 2/3, 1 elsewhere;
  RMSNorm: no centring). ``b_V`` and ``beta_1`` are left out: attention weights sum to 1, so they act as a constant
  output bias, not as part of the token-to-token map. ``copying_score`` = sum(lambda) / sum(|lambda|) over the
  eigenvalues of M (as in "A Mathematical Framework for Transformer Circuits"), in [-1, 1]; +1 = the head promotes
  what it attends to. M = (X_S W_V)(W_O U_S^T) is |S| x |S|, but its non-zero eigenvalues are those of the
  d_head x d_head matrix W_O (U_S^T X_S) W_V, and ``U_S^T X_S`` is shared by all heads.

The table is cached per model in an explicit :class:`StaticHeadCache` that the caller owns (the app keeps
one; the library keeps none): a weak-keyed map, so caching a table never keeps a model alive, and an edited
view (a new module object) never reuses the base model's table.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..arch import block_label, layout_of
from ..core.errors import require_positive_int
from .token_classes import TOKEN_CLASSES, TokenClasses, token_classes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StaticHeadConfig:
    """Options of the static table. Sample sizes trade precision for speed; the seed fixes the samples."""

    top_k: int = 100  # input dimensions compared by the QK overlap (clipped to d_model // 4)
    copy_sample: int = 1000  # tokens in the copying-score sample (all, when the vocabulary is smaller)
    class_sample: int = 128  # tokens per class for the key response (all, when the class is smaller)
    mean_position: bool = True  # add the mean position embedding to each token embedding
    seed: int = 0

    def __post_init__(self):
        for name in ("top_k", "copy_sample", "class_sample"):
            require_positive_int(name, getattr(self, name))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> StaticHeadConfig:
        return cls(**d)


@dataclass
class HeadStats:
    """Static diagnostics of one head. ``layer``/``head`` are 0-indexed (``transformer.h.{layer}``)."""

    layer: int
    head: int
    qk_overlap: float
    qk_top_k: int  # the k of the overlap (top_k clipped to d_model // 4)
    qk_norm: float
    ov_norm: float
    copying_score: float
    key_response: dict[str, float | None] = field(default_factory=dict)  # class -> mean norm; None if empty

    @property
    def label(self) -> str:
        """1-indexed layer as in the reference write-up: "L10 H8" is transformer.h.9 head 8."""
        return block_label(self.layer, self.head)

    def to_dict(self) -> dict:
        return {**asdict(self), "label": self.label}


class StaticHeadCache:
    """Static tables per model, held weakly: an entry lives as long as its model (or tokenizer) does.

    Owned by whoever serves many requests (the app); pass it to :func:`head_table`. Keys are the model object
    and the config, so weights are assumed never to change in place — which the project guarantees (edits are
    edited views, i.e. new module objects).
    """

    def __init__(self) -> None:
        self._tables: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._classes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def table(self, model: nn.Module, key: tuple) -> list[HeadStats] | None:
        return self._tables.get(model, {}).get(key)

    def store(self, model: nn.Module, key: tuple, table: list[HeadStats]) -> None:
        self._tables.setdefault(model, {})[key] = table

    def classes(self, tokenizer) -> TokenClasses:
        """Token classes of ``tokenizer``, computed once per tokenizer object."""
        if tokenizer not in self._classes:
            self._classes[tokenizer] = token_classes(tokenizer)
        return self._classes[tokenizer]

    def __len__(self) -> int:
        return sum(len(v) for v in self._tables.values())


# --------------------------------------------------------------------------------------------------
# Pure maths over per-head weights.
# --------------------------------------------------------------------------------------------------


def overlap_k(top_k: int, d_model: int) -> int:
    """The k used by the QK overlap: ``top_k`` clipped to a quarter of d_model, so that it stays informative."""
    return max(1, min(top_k, d_model // 4))


def qk_overlap(w_q: Tensor, w_k: Tensor, k: int) -> Tensor:
    """|top-k rows of W_Q ∩ top-k rows of W_K| / k by row L2 norm. ``w_q``, ``w_k``: (H, d, dh) -> (H,)."""
    k = min(k, w_q.shape[1])
    top_q = w_q.norm(dim=-1).topk(k, dim=-1).indices  # (H, k) input dimensions
    top_k = w_k.norm(dim=-1).topk(k, dim=-1).indices
    hit = torch.zeros(w_q.shape[:2], dtype=torch.bool, device=w_q.device)  # (H, d)
    hit.scatter_(1, top_q, True)
    return hit.gather(1, top_k).sum(-1).float() / k


def product_frobenius(a: Tensor, b: Tensor) -> Tensor:
    """``||a @ b||_F`` per head from Gram matrices. ``a``: (H, m, r), ``b``: (H, r, n) -> (H,).

    ``||A B||_F^2 = tr(B^T A^T A B) = sum((A^T A) * (B B^T))``: r x r products only (r = d_head).
    """
    gram_a = a.transpose(1, 2) @ a  # (H, r, r)
    gram_b = b @ b.transpose(1, 2)  # (H, r, r)
    return (gram_a * gram_b).sum((1, 2)).clamp_min(0).sqrt()


def normalized_embeddings(model: nn.Module, token_ids: Tensor, mean_position: bool, eps: float) -> Tensor:
    """``normalize(e)`` of the given tokens' embeddings as the family's norms compute it, without the gain. (n, d).

    LayerNorm: ``(e - mean(e)) / sqrt(var(e) + eps)``; RMSNorm: ``e / sqrt(mean(e^2) + eps)``. ``e`` is what block 0
    receives for the token (Gemma: the embedding scaled by sqrt(d_model)), plus the mean learned position
    embedding where the model has one and ``mean_position`` is set. Block l's pre-attention norm input is then
    ``gain_1^l * normalize(e)`` (its bias left out, see the module docstring), so one normalization serves every
    block with that eps.
    """
    layout = layout_of(model)
    e = layout.embed_tokens(model, token_ids).float()  # (n, d)
    pos = layout.mean_position(model)
    if mean_position and pos is not None:
        e = e + pos.float()
    if layout.adapter.norm.kind == "layer":
        return F.layer_norm(e, e.shape[-1:], None, None, eps)
    return e * torch.rsqrt(e.pow(2).mean(-1, keepdim=True) + eps)


def key_response(x: Tensor, w_k: Tensor, groups: Tensor, n_groups: int) -> Tensor:
    """Mean ``||W_K^T x||`` per group. ``x``: (n, d), ``w_k``: (H, d, dh), ``groups``: Long (n,) -> (H, G).

    Empty groups give NaN.
    """
    n_head, d, dh = w_k.shape
    keys = x @ w_k.permute(1, 0, 2).reshape(d, n_head * dh)  # (n, H*dh)
    norms = keys.view(-1, n_head, dh).norm(dim=-1)  # (n, H)
    sums = torch.zeros(n_groups, n_head, dtype=x.dtype, device=x.device).index_add_(0, groups, norms)
    counts = torch.bincount(groups, minlength=n_groups).to(x.dtype)  # (G,)
    return (sums / counts[:, None]).T  # (H, G); 0/0 = NaN for empty groups


def copying_scores(u_x: Tensor, w_v: Tensor, w_o: Tensor) -> Tensor:
    """sum(lambda) / sum(|lambda|) over the eigenvalues of each head's OV circuit on a token sample. (H,).

    The circuit on n sampled tokens is M_h = (X W_V^h)(W_O^h U^T), n x n, with X the source inputs and U the
    output directions of the same tokens (rows). Its non-zero eigenvalues are those of the d_head x d_head
    matrix W_O^h (U^T X) W_V^h, so only ``u_x = U^T X`` (d, d) is needed. ``w_v``: (H, d, dh),
    ``w_o``: (H, dh, d).
    """
    small = torch.einsum("hed,df->hef", w_o, u_x) @ w_v  # (H, dh, d) @ (H, d, dh) -> (H, dh, dh)
    eig = torch.linalg.eigvals(small.double())  # (H, dh) complex
    return (eig.sum(-1).real / eig.abs().sum(-1).clamp_min(1e-30)).to(u_x.dtype)


def output_directions(model: nn.Module, token_ids: Tensor) -> Tensor:
    """``centre(gamma_f * u_t)``: how a head output moves token t's logit through the final norm (scale left out;
    RMSNorm: ``gain_f * u_t``, no centring). (n, d)."""
    layout = layout_of(model)
    return layout.adapter.norm.fold(model.get_submodule(layout.adapter.final_norm), layout.w_u(model)[token_ids])


def sample_ids(candidates: list[int], n: int, generator: torch.Generator, d_vocab: int) -> Tensor:
    """A seeded subset of ``n`` of the ``candidates`` below ``d_vocab`` (all when fewer), sorted. Long (<= n,)."""
    ids = torch.tensor([i for i in candidates if i < d_vocab], dtype=torch.long)  # rows the model has
    if len(ids) > n:
        ids = ids[torch.randperm(len(ids), generator=generator)[:n]].sort().values
    return ids


# --------------------------------------------------------------------------------------------------
# Public entry point.
# --------------------------------------------------------------------------------------------------


def head_table(
    model: nn.Module, tokenizer, config: StaticHeadConfig = StaticHeadConfig(), cache: StaticHeadCache | None = None
) -> list[HeadStats]:
    """Static diagnostics of every head, ordered by (layer, head). Reuses ``cache`` when given."""
    key = (config, len(tokenizer), getattr(tokenizer, "name_or_path", ""))
    if cache is not None and (table := cache.table(model, key)) is not None:
        return table
    classes = cache.classes(tokenizer) if cache is not None else token_classes(tokenizer)
    with torch.no_grad():
        table = _compute_table(model, classes, config)
    if cache is not None:
        cache.store(model, key, table)
    return table


def _compute_table(model: nn.Module, classes: TokenClasses, config: StaticHeadConfig) -> list[HeadStats]:
    layout = layout_of(model)
    a = layout.adapter
    device = layout.w_e(model).device
    gen = torch.Generator().manual_seed(config.seed)
    class_ids = [sample_ids(classes.ids[name], config.class_sample, gen, layout.d_vocab) for name in TOKEN_CLASSES]
    groups = torch.cat([torch.full((len(ids),), g) for g, ids in enumerate(class_ids)]).to(device)  # (n_cls,)
    class_tokens = torch.cat(class_ids).to(device)
    copy_tokens = sample_ids(classes.ordinary(), config.copy_sample, gen, layout.d_vocab).to(device)
    u = output_directions(model, copy_tokens).float()  # (n_copy, d)

    normalized: dict[float, tuple[Tensor, Tensor]] = {}  # ln eps -> (class inputs, U^T copy inputs)
    table: list[HeadStats] = []
    for layer in range(layout.n_layer):
        ln_1 = model.get_submodule(a.path("ln1", layer))
        eps = a.norm.eps(ln_1)
        if eps not in normalized:  # one eps everywhere in every supported family: normalized once
            n_cls = normalized_embeddings(model, class_tokens, config.mean_position, eps)  # (n_cls, d)
            n_copy = normalized_embeddings(model, copy_tokens, config.mean_position, eps)  # (n_copy, d)
            normalized[eps] = (n_cls, u.T @ n_copy)  # (n_cls, d), (d, d)
        n_cls, u_n = normalized[eps]
        gamma = a.norm.gain(ln_1)  # (d,): x = gamma * normalize(e)
        if a.attn_post_norm:  # the post-norm's gain scales each output coordinate: rows of U^T X
            u_n = a.norm.gain(model.get_submodule(a.path("attn_post_norm", layer)))[:, None] * u_n
        w_q, w_k, w_v = (layout.w_qkv(model, layer, part).float().contiguous() for part in "qkv")  # (H, d, dh)
        w_o = layout.w_o(model, layer).float().contiguous()  # (H, dh, d)
        overlap = qk_overlap(w_q, w_k, overlap_k(config.top_k, layout.d_model))
        qk = product_frobenius(w_q, w_k.transpose(1, 2))
        ov = product_frobenius(w_v, w_o)
        keys = key_response(n_cls * gamma, w_k, groups, len(TOKEN_CLASSES))  # (H, G)
        copy = copying_scores(u_n * gamma, w_v, w_o)  # U^T (gamma * N) = (U^T N) * gamma, column-wise
        for head in range(layout.n_head):
            table.append(
                HeadStats(
                    layer=layer,
                    head=head,
                    qk_overlap=float(overlap[head]),
                    qk_top_k=overlap_k(config.top_k, layout.d_model),
                    qk_norm=float(qk[head]),
                    ov_norm=float(ov[head]),
                    copying_score=float(copy[head]),
                    key_response={name: _finite_or_none(keys[head, g]) for g, name in enumerate(TOKEN_CLASSES)},
                )
            )
    log.info("static head table: %d heads, token classes %s", len(table), classes.counts())
    return table


def layer_key_response(table: list[HeadStats]) -> dict[str, list[float | None]]:
    """Key response per class averaged over each layer's heads: class -> [layer 0, layer 1, ...]."""
    n_layer = max(s.layer for s in table) + 1
    out: dict[str, list[float | None]] = {}
    for name in TOKEN_CLASSES:
        per_layer = []
        for layer in range(n_layer):
            values = [s.key_response[name] for s in table if s.layer == layer and s.key_response[name] is not None]
            per_layer.append(sum(values) / len(values) if values else None)
        out[name] = per_layer
    return out


def _finite_or_none(x: Tensor) -> float | None:
    value = float(x)
    return value if value == value else None  # NaN (an empty class) -> None, which JSON can hold
