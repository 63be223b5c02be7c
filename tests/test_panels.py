import json
from types import SimpleNamespace

import pytest

from surgery.errors import InputError
from surgery.panels import (DEMO_PANEL, GPT2_PANEL, Panel, Probe, load_facts, load_panel, panel_for_model,
                            panel_path_for_model)
from surgery.tokens import encode_prompt, encode_target

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
    demo = SimpleNamespace(config=SimpleNamespace(surgery_panels="demo", vocab_size=500))
    gpt2 = SimpleNamespace(config=SimpleNamespace(vocab_size=50257))
    other = SimpleNamespace(config=SimpleNamespace(vocab_size=123))
    assert panel_path_for_model(demo) == DEMO_PANEL
    assert panel_path_for_model(gpt2) == GPT2_PANEL
    assert panel_for_model(gpt2).name == "gpt2"
    with pytest.raises(InputError, match="--panels FILE"):
        panel_path_for_model(other)


def test_panel_round_trips(tiny_panel):
    assert Panel.from_dict(json.loads(json.dumps(tiny_panel.to_dict()))) == tiny_panel


def test_panel_needs_its_probes(tiny_panel):
    d = tiny_panel.to_dict()
    for key in ("general", "side_effects"):
        with pytest.raises(InputError, match="general"):
            Panel.from_dict({**d, key: []})
    with pytest.raises(InputError, match="perplexity_text"):
        Panel.from_dict({**d, "perplexity_text": " "})
    with pytest.raises(InputError, match="unrelated_text"):
        Panel.from_dict({**d, "unrelated_text": []})


def test_load_facts(tmp_path, tiny_panel_file):
    path = tmp_path / "facts.json"
    path.write_text(json.dumps([{"prompt": "The capital of France is", "target": " Paris"}]))
    assert load_facts(path) == [Probe("The capital of France is", " Paris")]
    assert len(load_facts(tiny_panel_file)) == 3  # a panel file: its facts


@pytest.mark.parametrize("text, message", [
    ("", "is empty"),
    ("  \n", "is empty"),
    ("[{\"prompt\": ", "not valid JSON"),
    ("[]", "is empty"),
    ("{\"a\": 1}", "expected a list"),
    ("[{\"prompt\": \"The capital of France is\"}]", "entry 1 has no 'target'"),
    ("[{\"prompt\": \"x\", \"target\": \" \"}]", "entry 1 has no 'target'"),
    ("[\"The capital of France is\"]", "entry 1 is not an object"),
])
def test_bad_facts_files(tmp_path, text, message):
    path = tmp_path / "facts.json"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        load_facts(path)


def test_missing_facts_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_facts(tmp_path / "nope.json")
