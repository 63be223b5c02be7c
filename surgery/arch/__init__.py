"""Architecture adapters: the only place that knows module paths, weight layouts and where each norm sits.

:func:`layout_of` gives a model's :class:`Layout`, after checking every assumption its family's adapter makes
against the config and the modules; any model outside the supported families, or breaking one assumption, is
refused in one line (:class:`~surgery.core.errors.UnsupportedModelError`) — there is no fallback computation.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..core.errors import UnsupportedModelError
from .base import (
    SITE_DESCRIPTIONS,
    SITES,
    Adapter,
    Dims,
    Layout,
    NormSpec,
    ParamSlice,
    apply_softcap,
    block_label,
    count_parameters,
)
from .gemma import GEMMA, GEMMA2, GEMMA3
from .gpt2 import GPT2
from .llama import LLAMA, QWEN3

ADAPTERS: tuple[Adapter, ...] = (GPT2, LLAMA, QWEN3, GEMMA, GEMMA2, GEMMA3)
SUPPORTED = "; ".join(f"{a.family} ({a.examples})" for a in ADAPTERS)

# Config entries that rescale the residual stream, the embeddings or the logits in families we do not cover
# (Granite, MiniCPM, ...): an adapter that ignored them would attribute numbers that do not add up.
_MULTIPLIERS = (
    "embedding_multiplier",
    "residual_multiplier",
    "logits_scaling",
    "attention_multiplier",
    "scale_emb",
    "scale_depth",
    "logit_scale",
)

__all__ = [
    "ADAPTERS",
    "SITES",
    "SITE_DESCRIPTIONS",
    "SUPPORTED",
    "Adapter",
    "Dims",
    "Layout",
    "NormSpec",
    "ParamSlice",
    "adapter_for",
    "apply_softcap",
    "block_label",
    "check_supported",
    "count_parameters",
    "layout_of",
    "remember_layout",
    "unembed",
]


def adapter_for(config) -> Adapter:
    """The adapter of ``config``'s family, after checking the config against every assumption it makes.

    Raises :class:`UnsupportedModelError` (one line, naming the supported families) otherwise.
    """
    model_type = getattr(config, "model_type", None)
    adapter = next((a for a in ADAPTERS if model_type in a.model_types), None)
    if adapter is None:
        hint = " (use its text-only Gemma3ForCausalLM checkpoint)" if model_type == "gemma3" else ""
        raise UnsupportedModelError(f"a '{model_type}' model is not supported{hint}; supported: {SUPPORTED}")
    problems = list(adapter.check_config(config))
    if getattr(config, "is_encoder_decoder", False):
        problems.append("it is an encoder-decoder model")
    for name in _MULTIPLIERS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            problems.append(f"its config sets {name} = {value}")
    if problems:
        raise UnsupportedModelError(
            f"this {adapter.family} model breaks an assumption of its adapter: {'; '.join(problems)}; "
            f"supported: {SUPPORTED}"
        )
    return adapter


def check_supported(config) -> None:
    """Raise :class:`UnsupportedModelError` unless ``config`` describes a supported causal LM (no model needed)."""
    adapter = adapter_for(config)
    layout = Layout(adapter, adapter.read_dims(config))
    if layout.n_head % layout.n_kv_head:
        raise UnsupportedModelError(f"{layout.n_head} query heads cannot share {layout.n_kv_head} key/value heads")


# Where a model keeps its resolved layout: ``(id(model), layout)`` in its own ``__dict__``, so the cache lives and
# dies with the model (no module-level cache). The id makes a copy miss: ``copy.copy``/``deepcopy`` carry the entry
# over, but a copy's modules may differ (``edited_model`` swaps a block), so a copy resolves its own layout.
_LAYOUT_ATTR = "_surgery_layout"


def layout_of(model: nn.Module) -> Layout:
    """The :class:`Layout` of ``model``, its modules checked against the adapter (paths, shapes, no LM-head bias).

    Resolved once per model object: the module tree is walked on the first call only. The config is re-read on
    every call (attribute reads, cheap), so a config changed in place is checked again, never served stale.
    """
    adapter = adapter_for(model.config)
    layout = Layout(adapter, adapter.read_dims(model.config))
    cached = model.__dict__.get(_LAYOUT_ATTR)
    if cached is not None and cached[0] == id(model) and cached[1] == layout:
        return cached[1]
    _check_modules(model, layout)
    remember_layout(model, layout)
    return layout


def remember_layout(model: nn.Module, layout: Layout) -> None:
    """Record ``layout`` as ``model``'s resolved layout (for a view known to have its base's modules, e.g. an
    edited view: it then skips the module walk)."""
    model.__dict__[_LAYOUT_ATTR] = (id(model), layout)


def unembed(model: nn.Module, normed: Tensor) -> Tensor:
    """Logits from final-normed residuals, soft-capped where the family does. (..., d) -> (..., V)."""
    layout = layout_of(model)
    return apply_softcap(normed @ layout.w_u(model).T, layout.softcap(model.config))


def _check_modules(model: nn.Module, layout: Layout) -> None:
    a, d = layout.adapter, layout.dims
    modules = dict(model.named_modules())
    paths = [a.base, a.embed, a.final_norm, a.unembed] + ([a.pos_embed] if a.pos_embed else [])
    block_roles = ["ln1", "attn", "o", "ln2", "mlp", "mlp_out", "qkv", "q", "k", "v", "attn_post_norm", "mlp_post_norm"]
    for layer in (0, d.n_layer - 1):
        paths += [a.path(r, layer) for r in block_roles if getattr(a, r) is not None]
        paths += [f"{a.block(layer)}.{p}" for p in a.mlp_projections + a.qk_norms]
    missing = [p for p in paths if p not in modules]
    if missing:
        raise UnsupportedModelError(
            f"this model does not have the modules a {a.family} model has ({', '.join(missing[:3])}); "
            f"supported: {SUPPORTED}"
        )
    blocks = modules[a.blocks]
    if len(blocks) != d.n_layer:
        raise UnsupportedModelError(f"the config says {d.n_layer} blocks but the model has {len(blocks)}")
    o = modules[a.path("o", 0)].weight
    z_dim = o.shape[0] if a.linear == "conv1d" else o.shape[1]
    if z_dim != d.n_head * d.d_head:
        raise UnsupportedModelError(
            f"the attention output projection takes {z_dim} inputs, not heads x head_dim = {d.n_head * d.d_head}"
        )
    w_out = modules[a.path("mlp_out", 0)].weight
    if layout.mlp_out_matrix(w_out).shape != (d.d_model, d.d_mlp):
        raise UnsupportedModelError(
            f"the MLP output projection's weight is {tuple(w_out.shape)}, not the {a.linear} layout of "
            f"d_model {d.d_model} x d_mlp {d.d_mlp}"
        )
    if getattr(modules[a.unembed], "bias", None) is not None:
        raise UnsupportedModelError("the unembedding has a bias, which no supported family has")
    if not hasattr(modules[a.final_norm], a.norm.eps_attr):
        raise UnsupportedModelError(
            f"the final norm is a {type(modules[a.final_norm]).__name__}, not the "
            f"{a.norm.kind} norm a {a.family} model has"
        )
