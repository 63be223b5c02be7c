import json

import pytest
import torch
from conftest import DEMO_DIR, count_hooks, make_family_model

from surgery.arch import layout_of
from surgery.cli import main
from surgery.core.errors import InputError
from surgery.diagnosis.diagnose import diagnose
from surgery.patching.activations import (
    KINDS,
    ActivationPatchingConfig,
    PatchUnit,
    patch_activations,
    prepare_pair,
    unit_module,
)

CLEAN, CORRUPT = "The capital of France is", "The capital of Japan is"
FAMILIES = ("gpt2", "llama", "gemma2", "gemma3")  # Conv1D; rotary + GQA; post-norms + soft-capping; q/k norms


@pytest.fixture(scope="module", params=FAMILIES)
def model(request, tiny_tokenizer):
    return make_family_model(request.param, len(tiny_tokenizer))


@pytest.fixture(scope="module")
def result(model, tiny_tokenizer):
    return patch_activations(model, tiny_tokenizer, CLEAN, CORRUPT, " Paris")


def test_last_block_output_at_the_last_position_restores_exactly_one(model, result):
    """The last position's logits depend on nothing but its final residual: patching it is the clean run."""
    last = result.grids["resid"].restored[-1]
    assert last[-1] == pytest.approx(1.0, abs=1e-5)
    # ... and the last block's output at an earlier position is read by nothing downstream.
    assert last[:-1] == pytest.approx([0.0] * (len(last) - 1), abs=1e-5)


def test_patching_nothing_restores_nothing(model, tiny_tokenizer):
    pair = prepare_pair(model, tiny_tokenizer, CLEAN, CORRUPT, " Paris")
    assert pair.restored(model, [[]]).tolist() == pytest.approx([0.0], abs=1e-5)


def test_whole_components_restore_everything(model, tiny_tokenizer):
    """A block's output at every position fixes everything after it; all heads' z = the attention output."""
    layout = layout_of(model)
    pair = prepare_pair(model, tiny_tokenizer, CLEAN, CORRUPT, " Paris")
    resid = [[PatchUnit("resid", l)] for l in range(layout.n_layer)]
    assert pair.restored(model, resid).tolist() == pytest.approx([1.0] * layout.n_layer, abs=1e-4)
    every_write = [PatchUnit(k, l) for l in range(layout.n_layer) for k in ("attn", "mlp")]
    assert pair.restored(model, [every_write]).tolist() == pytest.approx([1.0], abs=1e-4)
    for layer in range(layout.n_layer):
        heads = [PatchUnit("head", layer, head=h) for h in range(layout.n_head)]
        both = pair.restored(model, [heads, [PatchUnit("attn", layer)]])
        assert float(both[0]) == pytest.approx(float(both[1]), abs=1e-4)


def test_batch_size_does_not_change_the_numbers(model, tiny_tokenizer, result):
    one = patch_activations(
        model, tiny_tokenizer, CLEAN, CORRUPT, " Paris", config=ActivationPatchingConfig(batch_size=1)
    )
    for kind in KINDS:
        assert torch.allclose(
            torch.tensor(one.grids[kind].restored), torch.tensor(result.grids[kind].restored), atol=1e-4
        )


def test_model_unchanged_and_no_hooks_left(model, tiny_tokenizer):
    before, hooks_before = {k: v.clone() for k, v in model.state_dict().items()}, count_hooks(model)
    patch_activations(model, tiny_tokenizer, CLEAN, CORRUPT, " Paris")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert count_hooks(model) == hooks_before


def test_grid_shapes_and_json(model, result):
    layout = layout_of(model)
    d = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert set(d["grids"]) == set(KINDS)
    for kind in ("resid", "attn", "mlp"):
        assert len(d["grids"][kind]["restored"]) == layout.n_layer
        assert all(len(row) == len(d["clean_tokens"]) == 5 for row in d["grids"][kind]["restored"])
    assert [len(row) for row in d["grids"]["head"]["restored"]] == [layout.n_head] * layout.n_layer
    assert d["competitor_source"] in ("corrupted top", "corrupted runner-up")
    # positions before the first difference see the same tokens in both prompts: nothing to restore there
    for kind in ("resid", "attn", "mlp"):
        assert all(row[:3] == pytest.approx([0.0] * 3, abs=1e-5) for row in result.grids[kind].restored)


def test_post_norm_families_patch_what_the_residual_receives(tiny_tokenizer):
    model = make_family_model("gemma2", len(tiny_tokenizer))
    layout = layout_of(model)
    assert unit_module(layout, "mlp", 1) == (layout.adapter.path("mlp_post_norm", 1), "forward")
    assert unit_module(layout, "attn", 1) == (layout.adapter.path("attn_post_norm", 1), "forward")
    assert unit_module(layout, "head", 1) == (layout.adapter.path("o", 1), "pre")


def test_prompts_of_different_lengths_are_refused(tiny_model, tiny_tokenizer):
    with pytest.raises(InputError, match="same number of tokens") as e:
        patch_activations(tiny_model, tiny_tokenizer, CLEAN, "The capital of the France is", " Paris")
    assert "\n" not in str(e.value)


def test_identical_runs_are_refused(tiny_model, tiny_tokenizer):
    with pytest.raises(InputError, match="nothing to restore"):
        patch_activations(tiny_model, tiny_tokenizer, CLEAN, CLEAN, " Paris")


def test_bad_config():
    with pytest.raises(InputError, match="unknown patching kind"):
        ActivationPatchingConfig(kinds=("resid", "neurons"))
    with pytest.raises(InputError, match="batch_size"):
        ActivationPatchingConfig(batch_size=0)


def test_given_competitor(tiny_model, tiny_tokenizer):
    r = patch_activations(
        tiny_model, tiny_tokenizer, CLEAN, CORRUPT, " Paris", " Tokyo", ActivationPatchingConfig(kinds=("resid",))
    )
    assert (r.competitor.text.strip(), r.competitor_source) == ("Tokyo", "given")
    assert list(r.grids) == ["resid"]


# --------------------------------------------------------------------------------------------------
# The demo model: the capital is read from the country and written at the last position by block 2's attention.
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_patching(demo):
    return patch_activations(
        demo.model, demo.tokenizer, "The capital of France is", "The capital of Poland is", " Paris"
    )


def test_demo_localizes_the_capital_to_the_prescribed_block(demo, demo_patching):
    r = demo_patching
    prescribed = diagnose(demo.model, demo.tokenizer, "The capital of France is", " Paris").prescribed_layer
    last, country = len(r.clean_tokens) - 1, r.clean_tokens.index("France")
    resid = r.grids["resid"].restored
    # The final residual at the last position is the clean run; exactly 1.
    assert resid[-1][last] == pytest.approx(1.0, abs=1e-5)
    # Below the prescribed block the country's position carries the answer; from it on, the last position does.
    assert all(resid[l][country] > 0.5 for l in range(prescribed))
    assert resid[prescribed][country] < 0.2 and resid[prescribed][last] > 0.95
    # The move is made by the prescribed block's attention at the last position: the largest restoring write.
    writes = {
        (kind, l, p): v
        for kind in ("attn", "mlp")
        for l, row in enumerate(r.grids[kind].restored)
        for p, v in enumerate(row)
    }
    assert max(writes, key=writes.get) == ("attn", prescribed, last)
    assert writes[("attn", prescribed, last)] > 0.9
    # ... and among single heads, one of the prescribed block's.
    assert r.grids["head"].best()[0] == prescribed


def test_demo_competitor_is_the_corrupted_answer(demo_patching):
    assert demo_patching.competitor.text.strip() == "Warsaw"
    assert demo_patching.logit_diff_clean > 0 > demo_patching.logit_diff_corrupt


# --------------------------------------------------------------------------------------------------
# CLI and figures.
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_json_and_heatmaps(tmp_path, capsys):
    out = tmp_path / "maps"
    rc = main(
        [
            "patch-activations",
            "--model",
            str(DEMO_DIR),
            "--prompt",
            "The capital of France is",
            "--corrupt",
            "The capital of Poland is",
            "--target",
            " Paris",
            "--json",
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    assert d["grids"]["resid"]["restored"][-1][-1] == pytest.approx(1.0, abs=1e-5)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{k}.png" for k in KINDS)
    assert all((out / f"{k}.png").stat().st_size > 1000 for k in KINDS)


def test_cli_report(capsys):
    rc = main(
        [
            "patch-activations",
            "--model",
            str(DEMO_DIR),
            "--prompt",
            "The capital of France is",
            "--corrupt",
            "The capital of Poland is",
            "--target",
            " Paris",
            "--kinds",
            "attn,head",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "France→Poland" in text and "most restored" in text and "resid" not in text


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--corrupt", "The capital of the Poland is"], "same number of tokens"),
        (["--corrupt", "The capital of Poland is", "--kinds", "neurons"], "unknown patching kind"),
        (["--corrupt", "The capital of Poland is", "--batch-size", "0"], "batch_size"),
    ],
)
def test_cli_bad_input_is_one_line(capsys, extra, message):
    rc = main(
        [
            "patch-activations",
            "--model",
            str(DEMO_DIR),
            "--prompt",
            "The capital of France is",
            "--target",
            " Paris",
            "--device",
            "cpu",
            *extra,
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and "\n" not in err


def test_heatmap_figures(demo_patching):
    from matplotlib.figure import Figure

    from surgery.patching.plots import patching_heatmap

    for kind in KINDS:
        fig = patching_heatmap(demo_patching, kind)
        assert isinstance(fig, Figure)
        labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
        assert ("France→Poland" in labels) == (kind != "head")


# --------------------------------------------------------------------------------------------------
# In the cross-check.
# --------------------------------------------------------------------------------------------------


def test_crosscheck_with_a_corrupted_prompt_on_the_demo(demo):
    from surgery.patching.crosscheck import crosscheck

    r = crosscheck(demo.model, demo.tokenizer, "The capital of France is", " Paris", corrupt="The capital of Poland is")
    p, a = r.patching, r.agree
    prescribed = r.diagnosis.prescribed_layer
    assert p.corrupt_answer.strip() == "Warsaw"
    # the prescribed block's attention carries the capital: all of the target's lead over Warsaw comes back
    assert p.attn_restored[prescribed] > 0.9 and a.prescribed_patching_confirmed is True
    # the override head carries the failure: patched into Poland's run it pulls toward the competitor
    assert p.override_restored > 0 and a.override_patching_confirmed is True
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert len(d["patching"]["attn_restored"]) == len(d["patching"]["mlp_restored"]) == r.diagnosis.n_layer
    assert d["agree"]["prescribed_patching_confirmed"] is True


def test_crosscheck_without_causal_checks_is_unchanged(tiny_model, tiny_tokenizer):
    from surgery.patching.crosscheck import crosscheck

    r = crosscheck(tiny_model, tiny_tokenizer, CLEAN, " Paris")
    assert r.patching is None and r.weight_patching is None
    d = r.to_dict()
    assert d["patching"] is None and d["weight_patching"] is None
    assert d["agree"]["prescribed_patching_confirmed"] is None and d["agree"]["donor_best_in_prescribed"] is None


def test_cli_crosscheck_corrupt(capsys):
    base = [
        "crosscheck",
        "--model",
        str(DEMO_DIR),
        "--prompt",
        "The capital of France is",
        "--target",
        " Paris",
        "--device",
        "cpu",
    ]
    assert main([*base, "--corrupt", "The capital of Poland is"]) == 0
    assert "activation patching into 'The capital of Poland is'" in capsys.readouterr().out
    assert main([*base, "--corrupt", "The capital of the Poland is"]) == 2
    err = capsys.readouterr().err.strip()
    assert "same number of tokens" in err and "\n" not in err


def test_bad_units(tiny_model, tiny_tokenizer):
    with pytest.raises(InputError, match="no heads"):
        PatchUnit("resid", 0, head=1)
    with pytest.raises(InputError, match="unknown patching kind"):
        PatchUnit("neurons", 0)
    pair = prepare_pair(tiny_model, tiny_tokenizer, CLEAN, CORRUPT, " Paris")
    for unit, message in (
        (PatchUnit("head", 0, head=9), "head 9"),
        (PatchUnit("attn", 0, position=5), "position 5"),
        (PatchUnit("mlp", 7), "layer 7"),
    ):
        with pytest.raises(InputError, match=message):
            pair.restored(tiny_model, [[unit]])


def test_one_head_at_one_position(tiny_model, tiny_tokenizer):
    """A head can be patched at one position; where the two prompts agree, that restores nothing."""
    pair = prepare_pair(tiny_model, tiny_tokenizer, CLEAN, CORRUPT, " Paris")
    per_position = pair.restored(tiny_model, [[PatchUnit("head", 1, head=2, position=p)] for p in range(5)])
    assert per_position.shape == (5,)
    assert per_position[:3].tolist() == pytest.approx([0.0] * 3, abs=1e-5)  # the prompts agree there
