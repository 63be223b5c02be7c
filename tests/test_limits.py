"""surgery.serve.limits: the limits read from SURGERY_* variables, their checks, and a Hub model's weight size
read from the Hub's metadata without a token (HfApi mocked: offline)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from surgery.core.errors import InputError, ModelLoadError
from surgery.evaluation.facts import Fact
from surgery.serve.limits import VARIABLES, Limits, hub_weight_bytes


def test_unset_variables_give_the_defaults_and_each_variable_sets_its_limit():
    assert Limits.from_env({}) == Limits() == Limits.from_env({name: " " for name in VARIABLES.values()})
    env = {
        "SURGERY_MAX_FACTS": "4",
        "SURGERY_MAX_PROMPT_TOKENS": "32",
        "SURGERY_MAX_STEPS": "50",
        "SURGERY_MAX_SECONDS": "90.5",
        "SURGERY_MAX_NEW_TOKENS": "16",
        "SURGERY_QUEUE_SIZE": "8",
        "SURGERY_SESSION_TTL": "600",
        "SURGERY_MAX_SESSIONS": "10",
        "SURGERY_ALLOWED_MODELS": " ada/fixed, ,bob/other,ada/fixed ",
        "SURGERY_MAX_MODEL_BYTES": "5e8",
    }
    assert Limits.from_env(env) == Limits(
        max_facts=4,
        max_prompt_tokens=32,
        max_steps=50,
        max_seconds=90.5,
        max_new_tokens=16,
        queue_size=8,
        session_ttl=600.0,
        max_sessions=10,
        allowed_models=("ada/fixed", "bob/other"),
        max_model_bytes=500_000_000,
    )
    assert set(VARIABLES) == {f for f in Limits.__dataclass_fields__}  # every limit has its variable


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("SURGERY_MAX_FACTS", "many", "SURGERY_MAX_FACTS must be a positive whole number, not 'many'"),
        ("SURGERY_MAX_FACTS", "2.5", "SURGERY_MAX_FACTS must be a positive whole number, not '2.5'"),
        ("SURGERY_MAX_FACTS", "0", "SURGERY_MAX_FACTS must be a positive number, not 0"),
        ("SURGERY_MAX_SECONDS", "-1", "SURGERY_MAX_SECONDS must be a positive number, not -1.0"),
        ("SURGERY_MAX_SECONDS", "inf", "SURGERY_MAX_SECONDS must be a positive number, not inf"),
        ("SURGERY_MAX_MODEL_BYTES", "2GB", "SURGERY_MAX_MODEL_BYTES must be a positive whole number, not '2GB'"),
    ],
)
def test_a_malformed_variable_is_one_clear_error(name, value, message):
    with pytest.raises(InputError) as e:
        Limits.from_env({name: value})
    assert str(e.value) == message


def test_facts_are_checked_for_number_and_tokens(tiny_tokenizer):
    limits = Limits(max_facts=2, max_prompt_tokens=5)
    ok = [Fact("The capital of France is", "Paris", ("the capital of France is",))]
    limits.check_facts(ok * 2, tiny_tokenizer)  # 5 words each: at the limit
    with pytest.raises(InputError, match=r"^3 facts given: at most 2 per surgery here \(SURGERY_MAX_FACTS\)$"):
        limits.check_facts(ok * 3, tiny_tokenizer)
    for fact, what in [
        (Fact("The capital of France is the", "Paris"), "prompt"),
        (Fact("The capital of France is", "the the the the the the"), "target"),
        (Fact("The capital of France is", "Paris", ("the capital city of France is",)), "paraphrase"),
    ]:
        with pytest.raises(InputError, match=rf"^the {what} .* is 6 tokens long: at most 5 here"):
            limits.check_facts([fact], tiny_tokenizer)
    assert Limits(max_new_tokens=8).check_new_tokens(8) == 8
    with pytest.raises(InputError, match=r"9 new tokens asked for: at most 8 here \(SURGERY_MAX_NEW_TOKENS\)"):
        Limits(max_new_tokens=8).check_new_tokens(9)


class Hub:
    """Stands in for HfApi: model_info returns ``siblings`` or raises ``error``, recording its arguments."""

    calls: list = []
    siblings: list = []
    error: Exception | None = None

    def model_info(self, repo_id, **kwargs):
        Hub.calls.append((repo_id, kwargs))
        if Hub.error is not None:
            raise Hub.error
        return SimpleNamespace(siblings=Hub.siblings)


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub

    Hub.calls, Hub.siblings, Hub.error = [], [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", Hub)
    return Hub


def sibling(name, size):
    return SimpleNamespace(rfilename=name, size=size)


def test_a_hub_models_weight_size_is_read_without_a_token(hub):
    hub.siblings = [
        sibling("model-00001-of-00002.safetensors", 1_500),
        sibling("model-00002-of-00002.safetensors", 500),
        sibling("pytorch_model.bin", 2_000),
        sibling("q4.gguf", 300),
        sibling("tokenizer.json", 9_999),
        sibling("README.md", 1),
    ]
    assert hub_weight_bytes("ada/fixed") == 4_300
    assert hub.calls == [("ada/fixed", {"files_metadata": True, "token": False})]


def test_a_hub_model_whose_size_is_unknown_is_refused(hub):
    hub.siblings = [sibling("README.md", 1)]
    with pytest.raises(ModelLoadError, match="lists no weight files"):
        hub_weight_bytes("ada/empty")
    hub.siblings = [sibling("model.safetensors", None)]
    with pytest.raises(ModelLoadError, match="did not give the size"):
        hub_weight_bytes("ada/unsized")
    hub.error = RuntimeError("404 Client Error: Repository Not Found\nmore detail")
    with pytest.raises(ModelLoadError, match=r"^cannot read ada/gone's size from the Hub: 404 Client Error: .*Found$"):
        hub_weight_bytes("ada/gone")


def test_a_visitors_model_must_be_allowed_and_small_enough(hub):
    limits = Limits(allowed_models=("ada/small", "ada/big"), max_model_bytes=1_000)
    with pytest.raises(InputError, match=r"'bob/x' is not a model this app loads.*\(ada/small, ada/big\)"):
        limits.check_visitor_model("bob/x")
    assert hub.calls == []  # refused without asking the Hub
    hub.siblings = [sibling("model.safetensors", 1_000)]
    limits.check_visitor_model("ada/small")  # at the limit
    hub.siblings = [sibling("model.safetensors", 1_001)]
    with pytest.raises(InputError, match=r"ada/big holds .* GB of weights: .*\(SURGERY_MAX_MODEL_BYTES\)"):
        limits.check_visitor_model("ada/big")
    with pytest.raises(InputError, match=r"allows \(none\)"):
        Limits().check_visitor_model("ada/small")
