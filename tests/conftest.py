"""Shared fixtures: a tiny random GPT-2 with a word-level tokenizer, a full-size random GPT-2, the demo model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = ROOT / "assets" / "demo-model"
GPT2_TOKENIZER_DIR = ROOT.parent / "shared" / "gpt2-tokenizer"

TINY_WORDS = (
    "The the capital of France Japan Italy Spain is Paris Tokyo Rome Madrid a an and city country big small "
    "red blue green sky sea one two three cat dog sat on mat . , in was"
).split()


def make_word_tokenizer(words=TINY_WORDS):
    """A real HF tokenizer (WordLevel, whitespace split) over ``words``; no special tokens added on encode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]")


def make_tiny_model(vocab_size: int, seed: int = 0, **overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = dict(n_layer=3, n_head=4, n_embd=32, n_positions=32, vocab_size=vocab_size)
    cfg.update(overrides)
    model = GPT2LMHeadModel(GPT2Config(**cfg))
    # Random init gives near-zero logits everywhere; larger weights make attributions and ranks non-trivial.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_word_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    return make_tiny_model(len(tiny_tokenizer))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_model, tiny_tokenizer):
    """The tiny model saved as a folder, loadable with from_pretrained."""
    d = tmp_path_factory.mktemp("tiny-model")
    tiny_model.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def gpt2_small_random():
    """GPT-2-small-shaped model with random weights (no download): 12 layers, 12 heads, d_model 768."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config()).eval().requires_grad_(False)


@pytest.fixture(scope="session")
def demo():
    """The committed demo model (a LoadedModel)."""
    from surgery.model_io import load_model

    return load_model(DEMO_DIR)


@pytest.fixture(scope="session")
def demo_panels():
    return json.loads((ROOT / "assets" / "panels" / "demo.json").read_text())


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    """GPT-2's real tokenizer from ../shared/gpt2-tokenizer; skips when absent. Never copied into the project."""
    if not (GPT2_TOKENIZER_DIR / "vocab.json").is_file():
        pytest.skip("../shared/gpt2-tokenizer is absent")
    from transformers import GPT2Tokenizer

    vocab = json.loads((GPT2_TOKENIZER_DIR / "vocab.json").read_text())
    merges_lines = (GPT2_TOKENIZER_DIR / "merges.txt").read_text().split("\n")[1:]
    merges = [tuple(line.split()) for line in merges_lines if line]
    return GPT2Tokenizer(vocab=vocab, merges=merges)


# A panel in the tiny vocabulary: the tiny model is random, so the panel only exercises the machinery.
TINY_PANEL = {
    "name": "tiny",
    "description": "probes in the tiny test vocabulary",
    "facts": [
        {"prompt": "The capital of France is", "target": " Paris"},
        {"prompt": "The capital of Japan is", "target": " Tokyo"},
        {"prompt": "The capital of Italy is", "target": " Rome"},
    ],
    "absence": [],
    "general": [{"prompt": "the cat sat on the", "target": " mat"}, {"prompt": "one two", "target": " three"}],
    "side_effects": [{"prompt": "the sky is", "target": " blue"}, {"prompt": "the sea is", "target": " blue"}],
    "perplexity_text": "the cat sat on the mat . the dog sat on the mat .",
    "unrelated_text": ["the cat sat on the mat . the dog was in the sea . one two three .",
                       "a big red dog and a small blue cat"],
}


@pytest.fixture(scope="session")
def tiny_panel():
    from surgery.panels import Panel

    return Panel.from_dict(TINY_PANEL)


@pytest.fixture(scope="session")
def tiny_panel_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-panel") / "panel.json"
    path.write_text(json.dumps(TINY_PANEL))
    return path
