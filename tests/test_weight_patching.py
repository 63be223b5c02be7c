import copy
import json

import pytest
import torch
from conftest import DEMO_DIR, ROOT, make_family_model, make_tiny_model

from surgery.arch import ParamSlice, layout_of
from surgery.cli import main
from surgery.core.errors import InputError
from surgery.evaluation.facts import Fact, load_facts
from surgery.evaluation.panels import DEMO_PANEL, load_panel
from surgery.evaluation.scoring import next_token_logits, score_probes
from surgery.io.edit_file import Edit, base_config, edited_model
from surgery.patching import weights as wp
from surgery.patching.weights import (
    ablate_tensor,
    ablate_weights,
    check_same_architecture,
    components,
    head_slices,
    hybrid,
    patch_weights,
    score_facts,
)

FACTS = [
    Fact("The capital of France is", " Paris"),
    Fact("The capital of Japan is", " Tokyo"),
    Fact("The capital of Italy is", " Rome"),
]
DEMO_FACTS = ROOT / "assets" / "examples" / "demo_facts.json"


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    """A private tiny GPT-2: hybrids install transformers' output recorders on their recipient (as the first
    ``edited_model`` of any base does), which the shared ``tiny_model`` fixture must not carry."""
    return make_tiny_model(len(tiny_tokenizer))


def _logits(model, tokenizer, facts=FACTS):
    return next_token_logits(model, tokenizer, [f.prompt for f in facts])


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, state):
    return all(torch.equal(state[k], v) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------------------------------
# ParamSlice rows (surgery/arch/base.py).
# --------------------------------------------------------------------------------------------------


def test_param_slice_rows_read_write_and_round_trip():
    p = torch.arange(24.0).view(4, 6)
    rows = ParamSlice("w", rows=slice(1, 3))
    assert torch.equal(rows.read(p), p[1:3]) and rows.numel(p) == 12
    new = rows.write(p, torch.zeros(2, 6))
    assert torch.equal(p, torch.arange(24.0).view(4, 6))  # untouched
    assert torch.equal(new[1:3], torch.zeros(2, 6)) and torch.equal(new[[0, 3]], p[[0, 3]])
    block = ParamSlice("w", cols=slice(4, 6), rows=slice(0, 2))
    assert torch.equal(block.read(p), p[0:2, 4:6]) and block.numel(p) == 4
    bias = ParamSlice("b", rows=slice(2, 4))
    assert torch.equal(bias.read(torch.arange(6.0)), torch.tensor([2.0, 3.0]))
    for s in (rows, block, bias, ParamSlice("w"), ParamSlice("w", slice(1, 2))):
        assert ParamSlice.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_param_slice_old_dicts_still_load():
    """Edit files written before rows existed have no 'rows' entry; slices without rows write none."""
    assert ParamSlice.from_dict({"name": "w", "cols": [4, 6]}) == ParamSlice("w", slice(4, 6))
    assert ParamSlice("w", slice(4, 6)).to_dict() == {"name": "w", "cols": [4, 6]}


def test_patch_with_row_slice_saves_loads_and_touches_only_its_rows(model, tmp_path):
    name = "transformer.h.1.attn.c_proj.weight"
    s = ParamSlice(name, rows=slice(8, 16))
    value = torch.randn(8, 32)
    edit = Edit("o", 1, (s,), {name: value}, {"base_config": base_config(model)})
    edit.save(tmp_path / "p.safetensors")
    loaded = Edit.load(tmp_path / "p.safetensors")
    assert loaded.slices == (s,)
    state = _state(model)
    view = edited_model(model, loaded)
    assert _unchanged(model, state)
    new = view.get_parameter(name)
    assert torch.equal(new[8:16], value)
    assert torch.equal(new[:8], state[name][:8]) and torch.equal(new[16:], state[name][16:])


# --------------------------------------------------------------------------------------------------
# Components.
# --------------------------------------------------------------------------------------------------


def test_head_slices_are_the_layouts_per_head_weights(family_model):
    """A head's V and O slices hold exactly what Layout.w_qkv / w_o give for that head, in every family."""
    layout = layout_of(family_model)
    params = dict(family_model.named_parameters())
    conv1d = layout.adapter.linear == "conv1d"
    for head in range(layout.n_head):
        (v,) = head_slices(layout, 1, head, "v")
        (o,) = head_slices(layout, 1, head, "o")
        v_w, o_w = v.read(params[v.name]), o.read(params[o.name])
        assert torch.equal(v_w if conv1d else v_w.T, layout.w_qkv(family_model, 1, "v")[head])  # (d, dh)
        assert torch.equal(o_w if conv1d else o_w.T, layout.w_o(family_model, 1)[head])  # (dh, d)


def test_components_cover_sites_and_heads(model):
    layout = layout_of(model)
    sites = components(model, "site")
    assert [(c.name, c.layer) for c in sites[:4]] == [("wv", 0), ("attn", 0), ("mlp", 0), ("layer", 0)]
    assert len(sites) == 4 * layout.n_layer and all(c.head is None for c in sites)
    heads = components(model, "head")
    assert len(heads) == 2 * layout.n_layer * layout.n_head
    with pytest.raises(InputError, match="granularity"):
        components(model, "neuron")


# --------------------------------------------------------------------------------------------------
# Patching between two tiny models.
# --------------------------------------------------------------------------------------------------


def _donor_with(model, slices, seed=1):
    """A deep copy of ``model`` with noise added to ``slices``."""
    donor = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in slices:
            part = s.read(donor.get_parameter(s.name))
            part.add_(torch.randn(part.shape, generator=g) * 0.5)
    return donor


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_patching_the_changed_head_gives_the_donor(family, tiny_tokenizer):
    model = make_family_model(family, len(tiny_tokenizer))
    layout = layout_of(model)
    donor = _donor_with(model, head_slices(layout, 2, 1, "o"))
    state = _state(model)
    result = patch_weights(model, donor, tiny_tokenizer, FACTS, "head")
    assert _unchanged(model, state)
    assert [(c.name, c.layer, c.head) for c in result.components] == [("o", 2, 1)]
    assert result.skipped_identical == 2 * layout.n_layer * layout.n_head - 1
    (comp,) = [c for c in components(model, "head") if (c.name, c.layer, c.head) == ("o", 2, 1)]
    assert torch.equal(_logits(hybrid(model, donor, comp), tiny_tokenizer), _logits(donor, tiny_tokenizer))
    # sites: the head's O slice lies in the block's attn and layer sites
    sites = patch_weights(model, donor, tiny_tokenizer, FACTS, "site")
    assert [(c.name, c.layer) for c in sites.components] == [("attn", 2), ("layer", 2)]


def test_heads_sharing_a_value_head_share_one_hybrid(tiny_tokenizer, monkeypatch):
    model = make_family_model("llama", len(tiny_tokenizer))  # 4 query heads, 2 key/value heads
    layout = layout_of(model)
    donor = _donor_with(model, head_slices(layout, 0, 0, "v"))
    calls = []
    real = wp.edited_model
    monkeypatch.setattr(wp, "edited_model", lambda m, p: calls.append(p) or real(m, p))
    result = patch_weights(model, donor, tiny_tokenizer, FACTS, "head")
    assert [(c.name, c.head) for c in result.components] == [("v", 0), ("v", 1)]  # both read kv head 0
    assert result.components[0].mean_target_logit_change == result.components[1].mean_target_logit_change
    assert len(calls) == 1


def test_donor_and_recipient_scores(model, tiny_tokenizer):
    donor = _donor_with(model, layout_of(model).site_slices("mlp", 1, model))
    result = patch_weights(model, donor, tiny_tokenizer, FACTS)
    # weight patching scores the first token (its own diagnostic), as score_probes' first-token figure does
    assert result.recipient_correct == score_probes(model, tiny_tokenizer, FACTS).first_token_correct
    assert result.donor_correct == score_probes(donor, tiny_tokenizer, FACTS).first_token_correct
    d = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert set(d) >= {"recipient", "donor", "components"}
    assert set(d["components"][0]) >= {"name", "layer", "head", "facts_correct", "mean_target_logit_change"}
    assert d["components"][0]["head"] is None


def test_score_facts_agrees_with_score_probes(model, tiny_tokenizer):
    s = score_facts(model, tiny_tokenizer, FACTS)
    assert s.correct == [r.first_token_correct for r in score_probes(model, tiny_tokenizer, FACTS).results]
    logits = _logits(model, tiny_tokenizer)
    ids = [tiny_tokenizer.convert_tokens_to_ids(f.target.strip()) for f in FACTS]
    assert s.target_logits == pytest.approx([float(logits[i, t]) for i, t in enumerate(ids)])


def test_patching_a_model_into_itself_changes_nothing(model, tiny_tokenizer):
    result = patch_weights(model, copy.deepcopy(model), tiny_tokenizer, FACTS, "head")
    assert result.components == [] and result.skipped_identical == len(components(model, "head"))


def test_other_architectures_are_refused(model, tiny_tokenizer):
    for other in (make_tiny_model(len(tiny_tokenizer), n_layer=2), make_family_model("llama", len(tiny_tokenizer))):
        with pytest.raises(InputError, match="not the same architecture") as e:
            patch_weights(model, other, tiny_tokenizer, FACTS)
        assert "\n" not in str(e.value)
    check_same_architecture(model, copy.deepcopy(model))


def test_no_facts_refused(model, tiny_tokenizer):
    with pytest.raises(InputError, match="no facts"):
        patch_weights(model, model, tiny_tokenizer, [])


# --------------------------------------------------------------------------------------------------
# Ablation.
# --------------------------------------------------------------------------------------------------


def test_ablate_tensor_definitions():
    w = torch.tensor([[1.0, 2.0, 3.0], [5.0, 6.0, 7.0]])
    assert torch.equal(ablate_tensor(w, "zero", 0), torch.zeros(2, 3))
    assert torch.equal(ablate_tensor(w, "mean", 0), torch.tensor([[3.0, 4.0, 5.0]] * 2))  # rows = output units
    assert torch.equal(ablate_tensor(w, "mean", 1), torch.tensor([[2.0] * 3, [6.0] * 3]))  # columns = outputs
    assert torch.equal(ablate_tensor(torch.tensor([1.0, 3.0]), "mean", None), torch.tensor([2.0, 2.0]))
    with pytest.raises(InputError, match="ablation"):
        ablate_tensor(w, "noise", 0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_zero_ablation_equals_zeroed_weights(family, tiny_tokenizer):
    model = make_family_model(family, len(tiny_tokenizer))
    state = _state(model)
    result = ablate_weights(model, tiny_tokenizer, FACTS, "zero", "head")
    assert _unchanged(model, state)
    base = score_facts(model, tiny_tokenizer, FACTS)
    c = next(c for c in result.components if (c.name, c.layer, c.head) == ("o", 1, 2))
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for s in head_slices(layout_of(model), 1, 2, "o"):
            s.read(zeroed.get_parameter(s.name)).zero_()
    expected = score_facts(zeroed, tiny_tokenizer, FACTS)
    change = [a - b for a, b in zip(expected.target_logits, base.target_logits)]
    assert c.facts_correct == expected.facts_correct
    assert c.mean_target_logit_change == pytest.approx(sum(change) / len(change), abs=1e-5)


def test_bad_ablation_mode(model, tiny_tokenizer):
    with pytest.raises(InputError, match="ablation"):
        ablate_weights(model, tiny_tokenizer, FACTS, "noise")


# --------------------------------------------------------------------------------------------------
# The demo model and a real surgery.
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_surgery(demo):
    from surgery.edit.training import SurgeryConfig, operate

    facts = load_facts(DEMO_FACTS)
    result = operate(demo.model, demo.tokenizer, facts, SurgeryConfig(site="wv"), panel=load_panel(DEMO_PANEL))
    return facts, result.edit, edited_model(demo.model, result.edit)


def test_demo_corrected_v_slice_alone_restores_every_fixed_fact(demo, demo_surgery):
    facts, edit, donor = demo_surgery
    state = _state(demo.model)
    result = patch_weights(demo.model, donor, demo.tokenizer, facts)
    assert _unchanged(demo.model, state)
    before = score_probes(demo.model, demo.tokenizer, facts)
    after = score_probes(donor, demo.tokenizer, facts)
    assert (
        (result.recipient_correct, result.donor_correct)
        == (before.first_token_correct, after.first_token_correct)
        == (2, 8)
    )
    # Only the edited block's sites that hold its V slice differ: one hybrid each, the rest skipped.
    assert [(c.name, c.layer) for c in result.components] == [(s, edit.layer) for s in ("wv", "attn", "layer")]
    assert result.skipped_identical == 4 * layout_of(demo.model).n_layer - 3
    wv = result.components[0]
    fixed = [
        r.prompt for r, b in zip(after.results, before.results) if r.first_token_correct and not b.first_token_correct
    ]
    assert wv.facts_correct == 8 and wv.fixed == fixed and wv.broken == []
    assert wv.mean_target_logit_change > 0
    # The hybrid with the wv slice is the donor itself, bitwise.
    comp = next(c for c in components(demo.model) if (c.name, c.layer) == ("wv", edit.layer))
    assert torch.equal(
        _logits(hybrid(demo.model, donor, comp), demo.tokenizer, facts), _logits(donor, demo.tokenizer, facts)
    )


def test_demo_head_granularity_lists_the_edited_blocks_value_slices(demo, demo_surgery):
    facts, edit, donor = demo_surgery
    result = patch_weights(demo.model, donor, demo.tokenizer, facts, "head")
    n_head = layout_of(demo.model).n_head
    assert [(c.name, c.layer, c.head) for c in result.components] == [("v", edit.layer, h) for h in range(n_head)]


def test_demo_zero_ablation_finds_the_override_in_the_last_blocks_attention(demo):
    """Zeroing the attention that overrides the capitals (the last block's) is the largest gain, and fixes them."""
    facts = load_facts(DEMO_FACTS)
    result = ablate_weights(demo.model, demo.tokenizer, facts, "zero")
    best = result.best()
    assert best.layer == layout_of(demo.model).n_layer - 1 and best.name in ("wv", "attn", "layer")
    assert best.facts_correct > result.recipient_correct and best.broken == []


# --------------------------------------------------------------------------------------------------
# CLI.
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def donor_dir(demo, demo_surgery, tmp_path_factory):
    from surgery.io.export import save_model

    folder = tmp_path_factory.mktemp("demo-fixed")
    save_model(demo_surgery[2], demo.tokenizer, folder)
    return folder


@pytest.mark.slow
def test_cli_patch_weights_json(donor_dir, capsys):
    rc = main(
        [
            "patch-weights",
            "--recipient",
            str(DEMO_DIR),
            "--donor",
            str(donor_dir),
            "--facts",
            str(DEMO_FACTS),
            "--json",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    assert d["recipient"] == {"facts_correct": 2} and d["donor"] == {"facts_correct": 8}
    assert [c["name"] for c in d["components"]] == ["wv", "attn", "layer"]
    assert d["components"][0]["facts_correct"] == 8 and d["components"][0]["head"] is None


def test_cli_ablate_report(capsys):
    rc = main(
        [
            "patch-weights",
            "--recipient",
            str(DEMO_DIR),
            "--ablate",
            "zero",
            "--facts",
            str(DEMO_FACTS),
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "zero-ablated" in out and "L4 attn" in out


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "either --donor"),
        (["--donor", str(DEMO_DIR), "--ablate", "zero"], "either --donor"),
        (["--ablate", "half"], "--ablate must be"),
        (["--ablate", "zero", "--granularity", "neuron"], "--granularity must be"),
    ],
)
def test_cli_bad_input_is_one_line(capsys, args, message):
    rc = main(["patch-weights", "--recipient", str(DEMO_DIR), "--facts", str(DEMO_FACTS), "--device", "cpu", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and "\n" not in err


def test_cli_other_architecture_is_one_line(tiny_model_dir, capsys):
    rc = main(
        [
            "patch-weights",
            "--recipient",
            str(DEMO_DIR),
            "--donor",
            str(tiny_model_dir),
            "--facts",
            str(DEMO_FACTS),
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err


def test_crosscheck_with_the_corrected_model_as_donor(demo, demo_surgery):
    from surgery.patching.crosscheck import crosscheck

    _, edit, donor = demo_surgery
    r = crosscheck(demo.model, demo.tokenizer, "The capital of France is", " Paris", donor=donor)
    assert r.diagnosis.prescribed_layer == edit.layer
    assert [(c.name, c.layer) for c in r.weight_patching.components] == [
        (s, edit.layer) for s in ("wv", "attn", "layer")
    ]
    assert all(c.facts_correct == 1 for c in r.weight_patching.components)
    assert r.agree.donor_best_in_prescribed is True
    assert r.to_dict()["weight_patching"]["donor"] == {"facts_correct": 1}


def test_weight_patching_chart(demo, demo_surgery):
    from matplotlib.figure import Figure

    from surgery.patching.plots import weight_patching_chart

    facts, _, donor = demo_surgery
    fig = weight_patching_chart(patch_weights(demo.model, donor, demo.tokenizer, facts))
    assert isinstance(fig, Figure)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["L3 wv", "L3 attn", "L3 layer"]
