"""Where GPT-2's weights live and how they are laid out — written down, never inferred from shapes.

This is the only module that knows:

* GPT-2 uses ``Conv1D`` (``transformers.pytorch_utils.Conv1D``), whose ``weight`` is ``[in_features, out_features]``
  and computes ``y = x @ weight + bias``. So an input dimension is a *row* and an output dimension a *column*
  (the transpose of ``nn.Linear``). The V slice of GPT-2 small is square (768 x 768): a wrong transpose would
  pass every shape check silently, which is why this is written down rather than guessed.
* ``attn.c_attn`` maps ``d_model -> 3 * d_model`` and its output columns are ``[Q | K | V]``, each ``d_model`` wide;
  inside each of them head ``h`` owns columns ``h * d_head : (h + 1) * d_head``.
* ``attn.c_proj`` (W_O) maps the concatenated heads ``d_model -> d_model``; head ``h`` owns *rows*
  ``h * d_head : (h + 1) * d_head``.
* ``mlp.c_fc`` is ``[d_model, d_mlp]`` and ``mlp.c_proj`` is ``[d_mlp, d_model]``.
* ``lm_head.weight`` is an ``nn.Linear`` weight ``[d_vocab, d_model]`` (tied to ``transformer.wte`` in GPT-2).
* ``transformer.wte.weight`` / ``transformer.wpe.weight`` are ``nn.Embedding`` tables ``[d_vocab | n_ctx, d_model]``.

Sites (what surgery may train) are defined here too, as parameter names plus an optional column slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from .errors import InputError

# Module-path templates (HF names), formatted with the block index.
BLOCK = "transformer.h.{}"
LN_1 = "transformer.h.{}.ln_1"
ATTN = "transformer.h.{}.attn"
C_ATTN = "transformer.h.{}.attn.c_attn"
ATTN_C_PROJ = "transformer.h.{}.attn.c_proj"
LN_2 = "transformer.h.{}.ln_2"
MLP = "transformer.h.{}.mlp"
MLP_C_FC = "transformer.h.{}.mlp.c_fc"
MLP_C_PROJ = "transformer.h.{}.mlp.c_proj"
LN_F = "transformer.ln_f"
WTE = "transformer.wte"
WPE = "transformer.wpe"
LM_HEAD = "lm_head"

QKV_INDEX = {"q": 0, "k": 1, "v": 2}
SITES = ("wv", "attn", "mlp", "layer")
SITE_DESCRIPTIONS = {
    "wv": "value projection only: the V columns of attn.c_attn.weight",
    "attn": "attention: attn.c_attn and attn.c_proj, weights and biases",
    "mlp": "MLP: mlp.c_fc and mlp.c_proj, weights and biases",
    "layer": "the whole block: attention, MLP and both LayerNorms",
}


@dataclass(frozen=True)
class GPT2Layout:
    """Dimensions of a GPT-2 model, all read from its config (nothing hard-coded)."""

    n_layer: int
    n_head: int
    d_model: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int

    @classmethod
    def from_config(cls, config) -> "GPT2Layout":
        d_model = config.n_embd
        return cls(
            n_layer=config.n_layer,
            n_head=config.n_head,
            d_model=d_model,
            d_head=d_model // config.n_head,
            d_mlp=config.n_inner if config.n_inner is not None else 4 * d_model,
            d_vocab=config.vocab_size,
            n_ctx=config.n_positions,
        )

    @classmethod
    def of(cls, model: nn.Module) -> "GPT2Layout":
        return cls.from_config(model.config)

    # --- column / row bookkeeping -------------------------------------------------------------
    def qkv_columns(self, part: Literal["q", "k", "v"]) -> slice:
        """Columns of ``c_attn.weight`` (and entries of ``c_attn.bias``) holding Q, K or V."""
        i = QKV_INDEX[part]
        return slice(i * self.d_model, (i + 1) * self.d_model)

    def head_slice(self, head: int) -> slice:
        """Positions of head ``head`` inside a ``d_model``-wide Q/K/V block or W_O's rows."""
        return slice(head * self.d_head, (head + 1) * self.d_head)

    def check_layer(self, layer: int) -> int:
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < self.n_layer:
            raise InputError(f"layer {layer!r} is out of range: this model has blocks 0..{self.n_layer - 1}")
        return layer

    # --- weight views (read-only use; they share storage with the model) ----------------------
    def w_o(self, model: nn.Module, layer: int) -> Tensor:
        """W_O per head: ``c_proj.weight`` rows split by head. Float[Tensor, "n_head d_head d_model"]."""
        w = model.get_submodule(ATTN_C_PROJ.format(layer)).weight  # [d_model(in = concat heads), d_model(out)]
        return w.view(self.n_head, self.d_head, self.d_model)

    def w_qkv(self, model: nn.Module, layer: int, part: Literal["q", "k", "v"]) -> Tensor:
        """W_Q/W_K/W_V per head. Float[Tensor, "n_head d_model d_head"]."""
        w = model.get_submodule(C_ATTN.format(layer)).weight[:, self.qkv_columns(part)]  # [d_model, d_model]
        return w.view(self.d_model, self.n_head, self.d_head).permute(1, 0, 2)

    def b_qkv(self, model: nn.Module, layer: int, part: Literal["q", "k", "v"]) -> Tensor:
        """Q/K/V bias per head. Float[Tensor, "n_head d_head"]."""
        b = model.get_submodule(C_ATTN.format(layer)).bias[self.qkv_columns(part)]
        return b.view(self.n_head, self.d_head)

    def w_u(self, model: nn.Module) -> Tensor:
        """Unembedding ``lm_head.weight``. Float[Tensor, "d_vocab d_model"]."""
        return model.get_submodule(LM_HEAD).weight

    def w_e(self, model: nn.Module) -> Tensor:
        """Token embedding ``wte.weight``. Float[Tensor, "d_vocab d_model"]."""
        return model.get_submodule(WTE).weight

    def w_pos(self, model: nn.Module) -> Tensor:
        """Position embedding ``wpe.weight``. Float[Tensor, "n_ctx d_model"]."""
        return model.get_submodule(WPE).weight

    # --- surgery sites ------------------------------------------------------------------------
    def site_slices(self, site: str, layer: int) -> list["ParamSlice"]:
        """What a site trains in block ``layer``: parameter names, each whole or restricted to columns."""
        self.check_layer(layer)
        if site == "wv":
            return [ParamSlice(C_ATTN.format(layer) + ".weight", self.qkv_columns("v"))]
        attn = [
            ParamSlice(f"{C_ATTN.format(layer)}.{p}") for p in ("weight", "bias")
        ] + [ParamSlice(f"{ATTN_C_PROJ.format(layer)}.{p}") for p in ("weight", "bias")]
        mlp = [ParamSlice(f"{MLP_C_FC.format(layer)}.{p}") for p in ("weight", "bias")] + [
            ParamSlice(f"{MLP_C_PROJ.format(layer)}.{p}") for p in ("weight", "bias")
        ]
        lns = [ParamSlice(f"{ln.format(layer)}.{p}") for ln in (LN_1, LN_2) for p in ("weight", "bias")]
        if site == "attn":
            return attn
        if site == "mlp":
            return mlp
        if site == "layer":
            return lns[:2] + attn + lns[2:] + mlp
        raise InputError(f"unknown site {site!r}: choose one of {', '.join(SITES)}")

    def site_size(self, model: nn.Module, site: str, layer: int) -> int:
        """Number of trainable parameters of a site (e.g. wv of GPT-2 small: 768 * 768 = 589,824)."""
        params = dict(model.named_parameters())
        return sum(s.numel(params[s.name]) for s in self.site_slices(site, layer))


@dataclass(frozen=True)
class ParamSlice:
    """A trainable part of one parameter: all of it, or the columns ``cols`` of a 2-D Conv1D weight."""

    name: str
    cols: slice | None = None

    def numel(self, param: Tensor) -> int:
        if self.cols is None:
            return param.numel()
        return param.shape[0] * len(range(*self.cols.indices(param.shape[1])))

    def read(self, param: Tensor) -> Tensor:
        """The trained part of ``param`` (a view)."""
        return param if self.cols is None else param[:, self.cols]

    def write(self, param: Tensor, value: Tensor) -> Tensor:
        """A new tensor equal to ``param`` with the trained part replaced by ``value`` (``param`` untouched)."""
        if self.cols is None:
            return value
        out = param.clone()
        out[:, self.cols] = value
        return out

    def to_dict(self) -> dict:
        cols = None if self.cols is None else [self.cols.start, self.cols.stop]
        return {"name": self.name, "cols": cols}

    @classmethod
    def from_dict(cls, d: dict) -> "ParamSlice":
        cols = d.get("cols")
        return cls(d["name"], None if cols is None else slice(int(cols[0]), int(cols[1])))


def count_parameters(model: nn.Module) -> int:
    """All distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def causal_mask(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Additive causal mask for calling GPT-2 blocks directly. Float[Tensor, "1 1 n n"] (0 or -inf-like)."""
    mask = torch.full((n, n), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)
    return mask[None, None]
