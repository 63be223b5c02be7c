"""GPT-2 (gpt2, distilgpt2, gpt2-medium/large/xl): LayerNorm, learned positions, fused ``Conv1D`` projections.

* ``Conv1D`` (``transformers.pytorch_utils.Conv1D``) stores ``weight`` as ``[in_features, out_features]`` and
  computes ``y = x @ weight + bias``: an input dimension is a *row*, an output dimension a *column* (the transpose
  of ``nn.Linear``).
* ``attn.c_attn`` maps ``d_model -> 3 * d_model``; its output columns are ``[Q | K | V]``, each ``d_model`` wide,
  and inside each head ``h`` owns columns ``h * d_head : (h + 1) * d_head``.
* ``attn.c_proj`` (W_O) maps the concatenated heads ``d_model -> d_model``; head ``h`` owns *rows*
  ``h * d_head : (h + 1) * d_head``. Its bias is the attention output bias.
* ``mlp.c_fc`` is ``[d_model, d_mlp]``, ``mlp.c_proj`` ``[d_mlp, d_model]``.
* ``lm_head.weight`` is ``[d_vocab, d_model]`` (tied to ``transformer.wte``); ``transformer.wpe`` holds learned
  positions, added to the token embeddings before block 0.
"""

from __future__ import annotations

from .base import Adapter, Dims, NormSpec


def _dims(config) -> Dims:
    d_model = config.n_embd
    return Dims(
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_kv_head=config.n_head,
        d_model=d_model,
        d_head=d_model // config.n_head,
        d_mlp=config.n_inner if config.n_inner is not None else 4 * d_model,
        d_vocab=config.vocab_size,
        n_ctx=config.n_positions,
    )


def _check(config) -> list[str]:
    problems = []
    if getattr(config, "add_cross_attention", False):
        problems.append("it has cross-attention (an encoder-decoder GPT-2)")
    if config.n_embd % config.n_head:
        problems.append(f"n_embd {config.n_embd} is not a multiple of n_head {config.n_head}")
    return problems


GPT2 = Adapter(
    family="GPT-2",
    model_types=("gpt2",),
    examples="gpt2, distilgpt2, gpt2-medium/large/xl",
    base="transformer",
    embed="transformer.wte",
    pos_embed="transformer.wpe",
    blocks="transformer.h",
    ln1="ln_1",
    attn="attn",
    qkv="attn.c_attn",
    o="attn.c_proj",
    ln2="ln_2",
    mlp="mlp",
    mlp_projections=("mlp.c_fc", "mlp.c_proj"),
    mlp_out="mlp.c_proj",
    final_norm="transformer.ln_f",
    unembed="lm_head",
    norm=NormSpec("layer", eps_attr="eps"),
    linear="conv1d",
    read_dims=_dims,
    # The same keys as edit files written before other families existed, so those edits still apply.
    shape_keys=("model_type", "n_layer", "n_head", "n_embd", "n_inner", "vocab_size", "n_positions"),
    check_config=_check,
)
