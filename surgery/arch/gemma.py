"""Gemma, Gemma 2 and Gemma 3 text (``Gemma3ForCausalLM``).

Like the Llama family (see :mod:`surgery.arch.llama`: ``nn.Linear`` ``[out, in]``, rotary positions, grouped
key/value heads, gated MLP), with these differences:

* every RMSNorm scales by ``(1 + w)``, computed in fp32, eps in ``eps``;
* the embedding module multiplies by ``sqrt(d_model)`` itself (``*ScaledWordEmbedding``), so its output is what
  block 0 receives; ``lm_head`` is tied to the unscaled table;
* Gemma 2/3 put a norm *after* each sub-layer as well as before: ``x + post_attention_layernorm(attn(
  input_layernorm(x)))``, then ``x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))``. With the
  post-norm's statistics frozen from the run, it is a per-coordinate scale, so each head's share stays additive;
* Gemma 3 adds q/k norms (pattern only) and alternates sliding-window and global layers with two rotary tables
  (``layer_types``); the library replays each layer's own mask and rotary table as the model computed them;
* Gemma 2 (and Gemma 3 where configured) soft-caps the final logits, ``cap * tanh(logits / cap)``: attribution
  then decomposes the logit *before* capping (capping is monotonic, so ranks and verdicts are unaffected).
"""

from __future__ import annotations

from .base import Adapter, NormSpec
from .llama import _LLAMA_PATHS, check_decoder


def _check_gemma(config) -> list[str]:
    problems = check_decoder(config)
    if getattr(config, "use_bidirectional_attention", False):
        problems.append("it uses bidirectional attention (an embedding model, not a causal LM)")
    return problems


_GEMMA_NORM = NormSpec("rms", eps_attr="eps", weight_offset=1.0)

GEMMA = Adapter(
    family="Gemma",
    model_types=("gemma",),
    examples="Gemma 2B/7B",
    norm=_GEMMA_NORM,
    **{**_LLAMA_PATHS, "check_config": _check_gemma},
)

_POST_NORM_PATHS = {
    **_LLAMA_PATHS,
    "ln2": "pre_feedforward_layernorm",
    "attn_post_norm": "post_attention_layernorm",
    "mlp_post_norm": "post_feedforward_layernorm",
    "softcap_attr": "final_logit_softcapping",
    "check_config": _check_gemma,
}

GEMMA2 = Adapter(family="Gemma 2", model_types=("gemma2",), examples="Gemma 2", norm=_GEMMA_NORM, **_POST_NORM_PATHS)

GEMMA3 = Adapter(
    family="Gemma 3",
    model_types=("gemma3_text",),
    examples="Gemma 3 text (Gemma3ForCausalLM, e.g. gemma-3-270m, 1b)",
    norm=_GEMMA_NORM,
    qk_norms=("self_attn.q_norm", "self_attn.k_norm"),
    **_POST_NORM_PATHS,
)
