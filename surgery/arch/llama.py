"""Llama-like decoders: Llama 2/3 (TinyLlama, SmolLM), Mistral, Qwen2/2.5, Qwen3.

All of them: RMSNorm ``y = x / sqrt(mean x^2 + eps) * w`` (eps in ``variance_epsilon``) before attention
(``input_layernorm``) and before the MLP (``post_attention_layernorm`` — despite its name a *pre*-MLP norm);
rotary positions (no position embedding is added to the residual); separate ``nn.Linear`` projections, weights
``[out, in]``: ``q_proj`` ``[H * d_head, d_model]``, ``k_proj``/``v_proj`` ``[G * d_head, d_model]`` with G key/value
heads (grouped-query attention: query head h reads kv head ``h // (H / G)``), ``o_proj`` ``[d_model, H * d_head]``
(head h owns its *columns* ``h * d_head : (h + 1) * d_head``); a gated MLP ``down(act(gate(x)) * up(x))``;
untied or tied ``lm_head``. Biases: Qwen2 has Q/K/V biases; Llama's ``attention_bias``/``mlp_bias`` add them to
every attention or MLP projection (``o_proj``'s bias is then the attention output bias). Qwen3 adds per-head
RMSNorms on queries and keys (``q_norm``, ``k_norm``), which shape the attention pattern only. Sliding windows
(Mistral, Qwen2) change masks, which the library never builds itself: it replays the masks the model made.
"""

from __future__ import annotations

from .base import Adapter, Dims, NormSpec


def _dims(config) -> Dims:
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    return Dims(
        n_layer=config.num_hidden_layers,
        n_head=n_head,
        n_kv_head=getattr(config, "num_key_value_heads", None) or n_head,
        d_model=config.hidden_size,
        d_head=head_dim,
        d_mlp=config.intermediate_size,
        d_vocab=config.vocab_size,
        n_ctx=config.max_position_embeddings,
    )


def check_decoder(config) -> list[str]:
    """Assumptions shared by the rotary families: grouped heads divide evenly; the MLP is the gated one."""
    problems = []
    n_head, n_kv = (
        config.num_attention_heads,
        getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
    )
    if n_head % n_kv:
        problems.append(f"{n_head} query heads cannot share {n_kv} key/value heads evenly")
    if (getattr(config, "pretraining_tp", 1) or 1) != 1:
        problems.append(f"pretraining_tp = {config.pretraining_tp} (sliced tensor-parallel projections)")
    return problems


_LLAMA_PATHS = dict(
    base="model",
    embed="model.embed_tokens",
    pos_embed=None,
    blocks="model.layers",
    ln1="input_layernorm",
    attn="self_attn",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    ln2="post_attention_layernorm",
    mlp="mlp",
    mlp_projections=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    mlp_out="mlp.down_proj",
    final_norm="model.norm",
    unembed="lm_head",
    linear="linear",
    read_dims=_dims,
    shape_keys=(
        "model_type",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "hidden_size",
        "head_dim",
        "intermediate_size",
        "vocab_size",
    ),
    check_config=check_decoder,
)

LLAMA = Adapter(
    family="Llama",
    model_types=("llama", "mistral", "qwen2"),
    examples="Llama 2/3, TinyLlama, SmolLM, Mistral, Qwen2/2.5",
    norm=NormSpec("rms", eps_attr="variance_epsilon"),
    **_LLAMA_PATHS,
)

QWEN3 = Adapter(
    family="Qwen3",
    model_types=("qwen3",),
    examples="Qwen3",
    norm=NormSpec("rms", eps_attr="variance_epsilon"),
    qk_norms=("self_attn.q_norm", "self_attn.k_norm"),
    **_LLAMA_PATHS,
)
