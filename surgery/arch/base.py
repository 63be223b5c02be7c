"""The one interface every model family is described through: an :class:`Adapter` (where things are) and a
:class:`Layout` (the dimensions of one model, and read-only per-head views of its weights).

A family is written down *declaratively*: module paths relative to a block, how its norms compute, whether its
projections are ``Conv1D`` (``[in, out]``) or ``nn.Linear`` (``[out, in]``), and which config entries fix every
shape. Nothing is inferred from tensor shapes: the V slice of GPT-2 small is square, so a wrong transpose would
pass every shape check silently. Every assumption is *checked* against the config and the modules when a layout
is built, and a model that breaks one is refused in one line (:class:`~surgery.core.errors.UnsupportedModelError`);
there is no fallback that computes something else.

Block anatomy shared by every supported family (pre-norm residual blocks)::

    a = attn(ln1(x))              a = o_proj(z), z = the heads concatenated
    x = x + post_attn(a)          post_attn = identity, or an RMSNorm (Gemma 2/3)
    m = mlp(ln2(x))
    x = x + post_mlp(m)           post_mlp = identity, or an RMSNorm (Gemma 2/3)
    logits = cap(unembed(final_norm(x)))     cap = identity, or tanh soft-capping (Gemma 2/3 when configured)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from ..core.errors import InputError

SITES = ("wv", "attn", "mlp", "layer")
SITE_DESCRIPTIONS = {
    "wv": "value projection only (v_proj; GPT-2: the V columns of attn.c_attn)",
    "attn": "attention: the Q/K/V/O projections with their biases and q/k norms",
    "mlp": "MLP: every projection of the block's MLP, with biases",
    "layer": "the whole block: attention, MLP and every norm of the block",
}


@dataclass(frozen=True)
class NormSpec:
    """How a family's norms compute, so that a norm's scale can be frozen from a run and folded into a direction.

    ``layer``: ``y = (x - mean x) / sqrt(var x + eps) * w + b``. ``rms``: ``y = x / sqrt(mean x^2 + eps) *
    (offset + w)`` (Gemma's ``(1 + w)`` has offset 1).
    """

    kind: Literal["layer", "rms"]
    eps_attr: str = "eps"
    weight_offset: float = 0.0

    def gain(self, norm: nn.Module) -> Tensor:
        """The elementwise scale ``offset + w``. Float[Tensor, "d"]."""
        return norm.weight.float() + self.weight_offset

    def bias(self, norm: nn.Module) -> Tensor | None:
        return getattr(norm, "bias", None) if self.kind == "layer" else None

    def eps(self, norm: nn.Module) -> float:
        return float(getattr(norm, self.eps_attr))

    def sigma(self, norm: nn.Module, x: Tensor) -> Tensor:
        """The normalizer of ``x`` as the norm computes it. (..., d) -> (..., 1)."""
        x = x.float()
        if self.kind == "layer":
            return (x.var(-1, unbiased=False, keepdim=True) + self.eps(norm)).sqrt()
        return (x.pow(2).mean(-1, keepdim=True) + self.eps(norm)).sqrt()

    def frozen_scale(self, norm: nn.Module, x: Tensor) -> Tensor:
        """``gain / sigma(x)``: with it frozen, an RMSNorm is the linear map ``c -> c * scale``. (..., d)."""
        if self.kind != "rms":
            raise ValueError("only an RMSNorm is a per-coordinate scale once its statistics are frozen")
        return self.gain(norm) / self.sigma(norm, x)

    def fold(self, norm: nn.Module, u: Tensor) -> Tensor:
        """``gain * u``, centred for LayerNorm: how an input moves ``norm(.) . u`` before the division by the
        norm's scale. ``u``: (..., d), float."""
        gu = self.gain(norm) * u.float()
        return gu - gu.mean(-1, keepdim=True) if self.kind == "layer" else gu

    def direction(self, norm: nn.Module, x: Tensor, u: Tensor) -> Tensor:
        """``v`` with ``norm(x) . u = sum_c c . v (+ bias . u)`` for any split ``x = sum_c c``, the statistics frozen
        from ``x``. ``x``: (B, d), ``u``: (B, k, d) -> (B, k, d). LayerNorm's centring is folded into ``v``."""
        return self.fold(norm, u) / self.sigma(norm, x)[:, None]


@dataclass(frozen=True)
class Dims:
    """What fixes every shape. H = query heads, G = key/value heads (G < H: grouped-query attention)."""

    n_layer: int
    n_head: int
    n_kv_head: int
    d_model: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int


@dataclass(frozen=True)
class Adapter:
    """One family: module paths (block-relative ones are formatted under ``blocks.{layer}``) and conventions.

    ``linear``: ``conv1d`` (GPT-2: weight ``[in, out]``, ``y = x @ W + b``) or ``linear`` (``nn.Linear``: weight
    ``[out, in]``). ``qkv``: the fused projection (output columns ``[Q | K | V]``) or None; ``q``/``k``/``v``: the
    separate projections. ``attn_post_norm``/``mlp_post_norm``: norms applied to a sub-layer's output before it is
    added to the residual (Gemma 2/3). ``softcap_attr``: config entry of the final logit soft-capping, if any.
    """

    family: str
    model_types: tuple[str, ...]
    examples: str
    base: str  # the decoder (``model.base_model``): embeddings, blocks, final norm
    embed: str
    pos_embed: str | None
    blocks: str
    ln1: str
    attn: str
    o: str
    ln2: str
    mlp: str
    mlp_projections: tuple[str, ...]
    mlp_out: str  # the MLP's output projection (its input: the keys of ROME-style editors)
    final_norm: str
    unembed: str
    norm: NormSpec
    linear: Literal["conv1d", "linear"]
    read_dims: Callable[[object], Dims]
    shape_keys: tuple[str, ...]
    qkv: str | None = None
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qk_norms: tuple[str, ...] = ()
    attn_post_norm: str | None = None
    mlp_post_norm: str | None = None
    softcap_attr: str | None = None
    check_config: Callable[[object], list[str]] = field(default=lambda config: [])

    def block(self, layer: int) -> str:
        return f"{self.blocks}.{layer}"

    def path(self, role: str, layer: int) -> str:
        """Full module path of a block-relative role (``"o"``, ``"mlp"``, ``"ln1"``, ...) in block ``layer``."""
        return f"{self.blocks}.{layer}.{getattr(self, role)}"


@dataclass(frozen=True)
class ParamSlice:
    """A part of one parameter: all of it, the columns ``cols`` of a 2-D weight, the rows ``rows`` (of a 2-D weight
    or a 1-D bias), or both (the block ``[rows, cols]``). Bounds are in the tensor as stored (Conv1D ``[in, out]``,
    ``nn.Linear`` ``[out, in]``): which rows or columns mean what is the adapter's business, never this class's."""

    name: str
    cols: slice | None = None
    rows: slice | None = None

    def _index(self) -> tuple:
        rows = slice(None) if self.rows is None else self.rows
        return (rows,) if self.cols is None else (rows, self.cols)

    def numel(self, param: Tensor) -> int:
        return self.read(param).numel()

    def read(self, param: Tensor) -> Tensor:
        """The part of ``param`` (a view: writing into it writes into ``param``)."""
        return param if self.cols is None and self.rows is None else param[self._index()]

    def write(self, param: Tensor, value: Tensor) -> Tensor:
        """A new tensor equal to ``param`` with the part replaced by ``value`` (``param`` untouched)."""
        if self.cols is None and self.rows is None:
            return value
        out = param.clone()
        out[self._index()] = value
        return out

    def to_dict(self) -> dict:
        d = {"name": self.name, "cols": _bounds(self.cols)}
        if self.rows is not None:  # absent when unused: patch files written before rows existed read the same
            d["rows"] = _bounds(self.rows)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ParamSlice:
        return cls(d["name"], _slice(d.get("cols")), _slice(d.get("rows")))


def _bounds(s: slice | None) -> list[int] | None:
    return None if s is None else [s.start, s.stop]


def _slice(bounds) -> slice | None:
    return None if bounds is None else slice(int(bounds[0]), int(bounds[1]))


QKV_INDEX = {"q": 0, "k": 1, "v": 2}


@dataclass(frozen=True)
class Layout:
    """One model's dimensions and where its weights are, per its family's :class:`Adapter`.

    Per-head weight views follow TransformerLens' shapes: ``W_Q/W_K/W_V`` ``(H, d_model, d_head)`` (K and V
    repeated for the query heads that share them under grouped-query attention), ``W_O`` ``(H, d_head, d_model)``.
    """

    adapter: Adapter
    dims: Dims

    # Dimensions as attributes, as the rest of the library reads them.
    @property
    def n_layer(self) -> int:
        return self.dims.n_layer

    @property
    def n_head(self) -> int:
        return self.dims.n_head

    @property
    def n_kv_head(self) -> int:
        return self.dims.n_kv_head

    @property
    def d_model(self) -> int:
        return self.dims.d_model

    @property
    def d_head(self) -> int:
        return self.dims.d_head

    @property
    def d_mlp(self) -> int:
        return self.dims.d_mlp

    @property
    def d_vocab(self) -> int:
        return self.dims.d_vocab

    @property
    def n_ctx(self) -> int:
        return self.dims.n_ctx

    @property
    def family(self) -> str:
        return self.adapter.family

    # --- labels ---------------------------------------------------------------------------------
    def label(self, layer: int | None, head: int | None = None, path: bool = False) -> str:
        """How a block or head is named everywhere (CLI, reports, app): ``"L17 H3"`` — blocks 1-indexed as in the
        reference write-up, heads 0-indexed — or ``"embeddings"`` for ``layer=None``; ``path=True`` adds the
        family's own module path: ``"L17 H3 (model.layers.16, head 3)"``, ``"L17 (transformer.h.16)"``."""
        return block_label(layer, head, self.adapter.blocks if path else None)

    # --- bookkeeping ------------------------------------------------------------------------------
    def check_layer(self, layer: int) -> int:
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < self.n_layer:
            raise InputError(f"layer {layer!r} is out of range: this model has blocks 0..{self.n_layer - 1}")
        return layer

    def check_head(self, head: int) -> int:
        if not isinstance(head, int) or isinstance(head, bool) or not 0 <= head < self.n_head:
            raise InputError(f"head {head!r} is out of range: this model has heads 0..{self.n_head - 1}")
        return head

    def head_slice(self, head: int) -> slice:
        """Positions of query head ``head`` in ``z`` (the W_O input: heads concatenated)."""
        return slice(head * self.d_head, (head + 1) * self.d_head)

    def kv_head(self, head: int) -> int:
        """The key/value head query head ``head`` reads (transformers' ``repeat_kv``: ``h // (H / G)``)."""
        return head // (self.n_head // self.n_kv_head)

    def qkv_columns(self, part: str) -> slice:
        """GPT-2 only: columns of the fused ``c_attn.weight`` holding Q, K or V."""
        i = QKV_INDEX[part]
        return slice(i * self.d_model, (i + 1) * self.d_model)

    def shape_config(self, config) -> dict:
        """The config entries that fix every tensor shape (recorded in edit files)."""
        return {k: getattr(config, k, None) for k in self.adapter.shape_keys}

    def softcap(self, config) -> float | None:
        attr = self.adapter.softcap_attr
        return getattr(config, attr, None) if attr else None

    # --- weights (read-only views sharing storage with the model) -----------------------------
    def _in_out(self, module: nn.Module) -> Tensor:
        """A projection's weight as ``[in, out]`` whatever the family stores."""
        return module.weight if self.adapter.linear == "conv1d" else module.weight.T

    def w_o(self, model: nn.Module, layer: int) -> Tensor:
        """W_O per head. Float[Tensor, "H d_head d_model"]."""
        w = self._in_out(model.get_submodule(self.adapter.path("o", layer)))  # [H * dh, d]
        return w.unflatten(0, (self.n_head, self.d_head))

    def b_o(self, model: nn.Module, layer: int) -> Tensor | None:
        """The attention output bias (added once, after the heads are summed), or None. Float[Tensor, "d"]."""
        return model.get_submodule(self.adapter.path("o", layer)).bias

    def _qkv_in_out(self, model: nn.Module, layer: int, part: str) -> tuple[Tensor, Tensor | None, int]:
        a = self.adapter
        if a.qkv is not None:
            module = model.get_submodule(a.path("qkv", layer))
            cols = self.qkv_columns(part)
            bias = None if module.bias is None else module.bias[cols]
            return self._in_out(module)[:, cols], bias, self.n_head
        module = model.get_submodule(a.path(part, layer))
        return self._in_out(module), module.bias, self.n_head if part == "q" else self.n_kv_head

    def w_qkv(self, model: nn.Module, layer: int, part: str) -> Tensor:
        """W_Q/W_K/W_V per query head. Float[Tensor, "H d_model d_head"] (K, V repeated under GQA)."""
        w, _, n = self._qkv_in_out(model, layer, part)  # [d, n * dh]
        per_head = w.unflatten(1, (n, self.d_head)).permute(1, 0, 2)  # (n, d, dh)
        return per_head.repeat_interleave(self.n_head // n, 0) if n != self.n_head else per_head

    def b_qkv(self, model: nn.Module, layer: int, part: str) -> Tensor | None:
        """Q/K/V bias per query head, or None. Float[Tensor, "H d_head"]."""
        _, b, n = self._qkv_in_out(model, layer, part)
        if b is None:
            return None
        per_head = b.view(n, self.d_head)
        return per_head.repeat_interleave(self.n_head // n, 0) if n != self.n_head else per_head

    def w_u(self, model: nn.Module) -> Tensor:
        """Unembedding. Float[Tensor, "d_vocab d_model"]."""
        return model.get_submodule(self.adapter.unembed).weight

    def w_e(self, model: nn.Module) -> Tensor:
        """Token embedding table (before any embedding scale). Float[Tensor, "d_vocab d_model"]."""
        return model.get_submodule(self.adapter.embed).weight

    def embed_tokens(self, model: nn.Module, token_ids: Tensor) -> Tensor:
        """What block 0 receives for ``token_ids`` apart from position: the embedding module's own output
        (Gemma's scale by sqrt(d_model) included). (n,) -> (n, d)."""
        return model.get_submodule(self.adapter.embed)(token_ids)

    def mean_position(self, model: nn.Module) -> Tensor | None:
        """The mean learned position embedding (GPT-2), or None for rotary models. Float[Tensor, "d"]."""
        if self.adapter.pos_embed is None:
            return None
        return model.get_submodule(self.adapter.pos_embed).weight.mean(0)

    # --- surgery sites ------------------------------------------------------------------------
    def site_slices(self, site: str, layer: int, model: nn.Module | None = None) -> list[ParamSlice]:
        """What a site trains in block ``layer``: parameter names, each whole or restricted to columns.

        ``wv`` is the value projection's weight only (GPT-2: the V columns of ``c_attn.weight``; its bias, like
        GPT-2's fused ``c_attn`` bias, stays untouched). The others are every parameter of the attention, the MLP
        or the block, in the model's own order (needs ``model`` to know which biases exist).
        """
        self.check_layer(layer)
        a = self.adapter
        if site == "wv":
            if a.qkv is not None:
                return [ParamSlice(a.path("qkv", layer) + ".weight", self.qkv_columns("v"))]
            return [ParamSlice(a.path("v", layer) + ".weight")]
        if site not in SITES:
            raise InputError(f"unknown site {site!r}: choose one of {', '.join(SITES)}")
        if model is None:
            raise ValueError("site_slices needs the model for sites other than wv")
        prefix = {"attn": a.path("attn", layer), "mlp": a.path("mlp", layer), "layer": a.block(layer)}[site] + "."
        return [ParamSlice(name) for name, _ in model.named_parameters() if name.startswith(prefix)]

    def mlp_out_slices(self, layer: int) -> list[ParamSlice]:
        """What a key-value editor (ROME, FT-L) changes in block ``layer``: the MLP output projection's weight, whole
        (GPT-2 ``mlp.c_proj.weight`` ``[d_mlp, d_model]``; the others ``mlp.down_proj.weight`` ``[d_model, d_mlp]``);
        its bias, if any, stays untouched."""
        self.check_layer(layer)
        return [ParamSlice(self.adapter.path("mlp_out", layer) + ".weight")]

    def mlp_out_matrix(self, weight: Tensor) -> Tensor:
        """The output projection's weight as the map ``W`` with ``out = W k (+ b)``: ``[d_model, d_mlp]`` whatever the
        family stores (Conv1D ``[in, out]`` is transposed; a view, not a copy)."""
        return weight.T if self.adapter.linear == "conv1d" else weight

    def mlp_out_stored(self, matrix: Tensor) -> Tensor:
        """The inverse of :meth:`mlp_out_matrix`: ``[d_model, d_mlp]`` back to the family's stored layout."""
        return matrix.T.contiguous() if self.adapter.linear == "conv1d" else matrix.contiguous()

    def site_size(self, model: nn.Module, site: str, layer: int) -> int:
        """Number of trainable parameters of a site (e.g. wv of GPT-2 small: 768 * 768 = 589,824)."""
        params = dict(model.named_parameters())
        return sum(s.numel(params[s.name]) for s in self.site_slices(site, layer, model))

    def qk_slices(self, model: nn.Module, layer: int) -> list[ParamSlice]:
        """Everything that shapes block ``layer``'s attention pattern: Q/K weights, biases and norms."""
        a = self.adapter
        if a.qkv is not None:
            qk = slice(self.qkv_columns("q").start, self.qkv_columns("k").stop)
            return [ParamSlice(a.path("qkv", layer) + ".weight", qk), ParamSlice(a.path("qkv", layer) + ".bias")]
        params = dict(model.named_parameters())
        names = [f"{a.path(p, layer)}.{w}" for p in ("q", "k") for w in ("weight", "bias")]
        names += [f"{a.block(layer)}.{n}.weight" for n in a.qk_norms]
        return [ParamSlice(n) for n in names if n in params]


def block_label(layer: int | None, head: int | None = None, blocks: str | None = None) -> str:
    """The one place a block's or head's label is spelled (:meth:`Layout.label` and every report use it):
    ``"L17 H3"`` (blocks 1-indexed, heads 0-indexed), ``"embeddings"`` for ``layer=None``; given the blocks'
    module path (``"model.layers"``) it adds the module: ``"L17 H3 (model.layers.16, head 3)"``."""
    if layer is None:
        return "embeddings"
    name = f"L{layer + 1}" if head is None else f"L{layer + 1} H{head}"
    if blocks is None:
        return name
    where = f"{blocks}.{layer}" if head is None else f"{blocks}.{layer}, head {head}"
    return f"{name} ({where})"


def count_parameters(model: nn.Module) -> int:
    """All distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def apply_softcap(logits: Tensor, cap: float | None) -> Tensor:
    """Gemma's final logit soft-capping ``cap * tanh(logits / cap)`` (monotonic: ranks unchanged)."""
    return logits if cap is None else torch.tanh(logits / cap) * cap
