import json
from types import SimpleNamespace

import pytest

from surgery.core.errors import InputError
from surgery.core.tokens import encode_prompt, encode_target
from surgery.evaluation.facts import Fact, load_facts
from surgery.evaluation.panels import (
    DEMO_PANEL,
    ENGLISH_PANEL,
    GPT2_PANEL,
    Panel,
    fit_panel,
    load_panel,
    panel_for_model,
    panel_path_for_model,
)

REFERENCE_COUNTRIES = ["France", "Japan", "Germany", "China", "Russia", "England", "Italy", "Spain"]


def test_gpt2_panel_has_the_reference_shape():
    panel = load_panel(GPT2_PANEL)
    assert [f.prompt for f in panel.facts] == [f"The capital of {c} is" for c in REFERENCE_COUNTRIES]
    assert len(panel.general) == 15 and len(panel.side_effects) == 10
    assert panel.perplexity_text.strip() and panel.unrelated_text
    for probe in panel.facts + panel.general + panel.side_effects + panel.absence:
        assert probe.target.startswith(" "), probe  # GPT-2 words carry their leading space


def test_gpt2_panel_in_the_real_gpt2_vocabulary(gpt2_tokenizer):
    panel = load_panel(GPT2_PANEL)
    for probe in panel.facts + panel.general + panel.side_effects:
        encode_prompt(gpt2_tokenizer, probe.prompt, 1024)
        assert len(encode_target(gpt2_tokenizer, probe.target)) == 1, probe  # whole answer is trained and scored
    assert len(gpt2_tokenizer(panel.perplexity_text)["input_ids"]) > 100


def test_demo_panel_loads_and_fits_the_demo_vocabulary(demo, demo_panels):
    panel = load_panel(DEMO_PANEL)
    assert panel.to_dict()["general"] == demo_panels["general"]
    assert [f.prompt.split()[-2] for f in panel.facts] == REFERENCE_COUNTRIES
    for probe in panel.facts + panel.general + panel.side_effects:
        encode_prompt(demo.tokenizer, probe.prompt, demo.model.config.n_positions)
        encode_target(demo.tokenizer, probe.target)


def test_panel_is_chosen_per_model():
    demo = SimpleNamespace(config=SimpleNamespace(surgery_panels="demo", vocab_size=500, model_type="gpt2"))
    gpt2 = SimpleNamespace(config=SimpleNamespace(vocab_size=50257, model_type="gpt2"))
    other = SimpleNamespace(config=SimpleNamespace(vocab_size=123, model_type="llama"))
    assert panel_path_for_model(demo) == DEMO_PANEL
    assert panel_path_for_model(gpt2) == GPT2_PANEL
    assert panel_for_model(gpt2).name == "gpt2"
    assert panel_path_for_model(other) == ENGLISH_PANEL  # any other model: plain English, fitted per tokenizer


def test_panel_round_trips(tiny_panel):
    assert Panel.from_dict(json.loads(json.dumps(tiny_panel.to_dict()))) == tiny_panel
    english = load_panel(ENGLISH_PANEL)
    assert Panel.from_dict(json.loads(json.dumps(english.to_dict()))) == english


def test_panel_needs_some_probes(tiny_panel):
    d = tiny_panel.to_dict()
    with pytest.raises(InputError, match="at least one of 'general'"):
        Panel.from_dict({**d, "general": [], "side_effects": [], "neighbourhood": []})
    assert Panel.from_dict({**d, "general": []}).side_effects  # one list is enough: evaluation uses what it has


def test_english_panel_shape():
    panel = load_panel(ENGLISH_PANEL)
    assert [f.prompt for f in panel.facts] == [f"The capital of {c} is" for c in REFERENCE_COUNTRIES]
    assert all(len(f.paraphrases) >= 2 for f in panel.facts)  # each fact in at least two other wordings
    assert not {p.prompt for p in panel.relation} & {f.prompt for f in panel.facts}  # relation: never edited
    assert len(panel.relation) >= 20 and panel.neighbourhood and panel.general and panel.side_effects
    targets = {p.target for p in panel.neighbourhood}
    assert {" the", " a"} <= targets  # function-word answers catch an edit that merely suppresses " the"
    assert {f.target for f in panel.facts} & targets  # ... and other entities ("The Eiffel Tower ..." -> " Paris")


def test_english_panel_in_the_real_gpt2_vocabulary(gpt2_tokenizer):
    fitted = fit_panel(load_panel(ENGLISH_PANEL), gpt2_tokenizer, 1024)
    assert fitted.unavailable == ()  # byte-level BPE encodes any English text
    assert len(fitted.panel.relation) == len(load_panel(ENGLISH_PANEL).relation)


def test_fit_panel_drops_what_a_vocabulary_cannot_encode(tiny_tokenizer):
    """The tiny word-level vocabulary has the reference prompts' words but few of the English panel's."""
    english = load_panel(ENGLISH_PANEL)
    fitted = fit_panel(english, tiny_tokenizer, 32)
    kept = fitted.panel
    assert [f.prompt for f in kept.facts] == [
        "The capital of France is",
        "The capital of Japan is",
        "The capital of Italy is",
        "The capital of Spain is",
    ]
    france = kept.facts[0]
    assert "The capital of France is the city of" in france.paraphrases  # every word is in the tiny vocabulary
    assert "France's capital is" not in france.paraphrases  # "France's" is not
    assert len(kept.general) < len(english.general)
    assert any(line.startswith("general:") for line in fitted.unavailable)
    assert any(line.startswith("perplexity") for line in fitted.unavailable)
    for probe in kept.facts + kept.general + kept.side_effects + kept.neighbourhood + kept.relation:
        encode_prompt(tiny_tokenizer, probe.prompt, 32)  # everything kept encodes
        encode_target(tiny_tokenizer, probe.target)


def test_facts_carry_paraphrases(tmp_path):
    path = tmp_path / "facts.json"
    path.write_text(
        json.dumps(
            [
                {
                    "prompt": "The capital of France is",
                    "target": " Paris",
                    "paraphrases": ["The capital city of France is"],
                }
            ]
        )
    )
    assert load_facts(path)[0].paraphrases == ("The capital city of France is",)
    path.write_text(json.dumps([{"prompt": "The capital of France is", "target": " Paris", "paraphrases": [""]}]))
    with pytest.raises(InputError, match="paraphrases"):
        load_facts(path)


def test_load_facts(tmp_path, tiny_panel_file):
    path = tmp_path / "facts.json"
    path.write_text(json.dumps([{"prompt": "The capital of France is", "target": " Paris"}]))
    assert load_facts(path) == [Fact("The capital of France is", " Paris")]
    assert len(load_facts(tiny_panel_file)) == 3  # a panel file: its facts


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "is empty"),
        ("  \n", "is empty"),
        ('[{"prompt": ', "not valid JSON"),
        ("[]", "is empty"),
        ('{"a": 1}', "expected a list"),
        ('[{"prompt": "The capital of France is"}]', "entry 1 has no 'target'"),
        ('[{"prompt": "x", "target": " "}]', "entry 1 has no 'target'"),
        ('["The capital of France is"]', "entry 1 is not an object"),
    ],
)
def test_bad_facts_files(tmp_path, text, message):
    path = tmp_path / "facts.json"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        load_facts(path)


def test_missing_facts_file(tmp_path):
    with pytest.raises(InputError, match="no such facts file"):
        load_facts(tmp_path / "nope.json")
