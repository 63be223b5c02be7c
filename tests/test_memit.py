"""MEMIT and AlphaEdit (surgery/edit/memit.py) on a tiny model of every family: the closed forms against a direct
solve, AlphaEdit's null space, only the MLP output projections of the edited blocks move, and the multi-block edit
round-trips through the patch file."""

import pytest
import torch
from test_editors import TEXTS, operate_editor, wrong_facts
from test_families import assert_state_equal, has_post_norms, snapshot

from surgery.arch import layout_of
from surgery.cli.operate import parse_layers
from surgery.core.errors import InputError
from surgery.edit.editors import edit_mlp_out
from surgery.edit.keystats import key_statistics
from surgery.edit.memit import (
    AlphaEditHparams,
    MemitHparams,
    alphaedit_delta,
    apply_memit,
    keys_and_residuals,
    memit_delta,
    null_space_projector,
    spread_layers,
)
from surgery.edit.rome import RIDGE
from surgery.edit.training import SurgeryConfig, operate
from surgery.io.edit_file import Edit, edited_model

LAYERS = (0, 1)  # the default span (5 blocks) ending at block 1, clipped at block 0


def test_memit_delta_is_the_regularised_least_squares_solution():
    """ΔW = R Kᵀ (λC + εI + K Kᵀ)⁻¹ minimizes ‖ΔW K − R‖² + λ tr(ΔW C ΔWᵀ) + ε‖ΔW‖²: with C = L Lᵀ, the
    least-squares solution of ΔW [K, √λ L, √ε I] = [R, 0, 0]."""
    gen = torch.Generator().manual_seed(0)
    d_model, d_mlp, n, lam = 5, 8, 3, 2.5
    k = torch.randn(d_mlp, n, generator=gen, dtype=torch.float64)
    r = torch.randn(d_model, n, generator=gen, dtype=torch.float64)
    k0 = torch.randn(d_mlp, 50, generator=gen, dtype=torch.float64)
    c = k0 @ k0.T / 50
    chol = torch.linalg.cholesky(c)
    eps = RIDGE * lam * float(c.diagonal().mean())  # the ridge memit_delta adds, as ROME does
    a = torch.cat([k.T, lam**0.5 * chol.T, eps**0.5 * torch.eye(d_mlp, dtype=torch.float64)])  # (n + 2 d_mlp, d_mlp)
    b = torch.cat([r.T, torch.zeros(2 * d_mlp, d_model, dtype=torch.float64)])  # (n + 2 d_mlp, d_model)
    direct = torch.linalg.lstsq(a, b).solution.T  # (d_model, d_mlp)
    torch.testing.assert_close(memit_delta(k, r, c, lam), direct, rtol=1e-9, atol=1e-10)


def test_alphaedit_delta_is_the_papers_closed_form_and_spares_the_preserved_keys():
    gen = torch.Generator().manual_seed(1)
    d_model, d_mlp, n, alpha = 5, 8, 3, 0.5
    basis = torch.randn(d_mlp, 4, generator=gen, dtype=torch.float64)
    k0 = basis @ torch.randn(4, 200, generator=gen, dtype=torch.float64)  # preserved keys: rank 4 of 8
    c = k0 @ k0.T / 200
    p = null_space_projector(c, 1e-2)
    assert round(float(p.trace())) == 4  # the 4 directions the preserved keys never take
    k = torch.randn(d_mlp, n, generator=gen, dtype=torch.float64)
    r = torch.randn(d_model, n, generator=gen, dtype=torch.float64)
    kp = torch.randn(d_mlp, 2, generator=gen, dtype=torch.float64)  # keys of an earlier round
    eye = torch.eye(d_mlp, dtype=torch.float64)
    for previous in (None, kp @ kp.T):
        delta = alphaedit_delta(k, r, p, alpha, previous)
        gram = k @ k.T if previous is None else k @ k.T + previous
        paper = r @ k.T @ p @ torch.linalg.inv(gram @ p + alpha * eye)  # ΔW = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + αI)⁻¹
        torch.testing.assert_close(delta, paper, rtol=1e-8, atol=1e-10)
        assert delta.norm() > 0.1
        assert (delta @ k0).norm() < 1e-9 * delta.norm() * k0.norm()  # ΔW K₀ = 0: the preserved outputs stay


def test_spread_layers_and_the_layers_option():
    assert spread_layers(1, 5) == (0, 1) and spread_layers(8, 6) == (3, 4, 5, 6, 7, 8) and spread_layers(0, 5) == (0,)
    assert parse_layers("3,4,5") == (3, 4, 5) and parse_layers(None) is None
    with pytest.raises(InputError, match="--layers must be block indices"):
        parse_layers("3-5")
    assert SurgeryConfig(method="memit", layers=[0, 2]).layers == (0, 2)  # from a report's JSON list
    assert SurgeryConfig.from_dict({"method": "alphaedit", "layers": [1, 2]}).layers == (1, 2)
    with pytest.raises(InputError, match="--layers is for --method memit or alphaedit"):
        SurgeryConfig(method="rome", layers=(0, 1))
    with pytest.raises(InputError, match="ascending"):
        SurgeryConfig(method="memit", layers=(2, 1))
    with pytest.raises(InputError, match="disagree"):
        SurgeryConfig(method="memit", layer=2, layers=(0, 1))


def test_memit_without_regularisation_writes_z_after_the_last_block(family_model, tiny_tokenizer, tmp_path):
    """With λ → 0 the last block's update solves ΔW K = R exactly: the residual after it is each fact's target z
    (where the MLP output is added to the residual as it is; Gemma 2/3 normalize it first)."""
    model, before = family_model, snapshot(family_model)
    stats = {
        layer: key_statistics(
            model,
            tiny_tokenizer,
            layer,
            texts=TEXTS,
            corpus="tiny",
            max_tokens=400,
            chunk_tokens=16,
            cache_dir=tmp_path,
        )
        for layer in LAYERS
    }
    facts = wrong_facts(model, tiny_tokenizer, 3)
    weights, targets = apply_memit(model, tiny_tokenizer, facts, LAYERS, stats, MemitHparams(mom2_update_weight=1e-9))
    assert set(weights) == set(LAYERS)
    layout = layout_of(model)
    matrices = {layer: layout.mlp_out_matrix(w).float() for layer, w in weights.items()}
    _, after = keys_and_residuals(model, tiny_tokenizer, targets, LAYERS[-1], LAYERS[-1], matrices)
    _, base = keys_and_residuals(model, tiny_tokenizer, targets, LAYERS[-1], LAYERS[-1], {})
    z = torch.stack([t.z for t in targets], 1)
    assert (after - base).norm() > 0.1 * (z - base).norm()  # the residual moved
    if not has_post_norms(model):
        torch.testing.assert_close(after, z, rtol=1e-3, atol=1e-3)
    assert_state_equal(model.state_dict(), before)


def test_alphaedit_keeps_the_outputs_of_the_preserved_keys(family_model, tiny_tokenizer, tmp_path):
    """E‖ΔW k‖² over the text C was measured on = tr(ΔW C ΔWᵀ) ≤ threshold · λ_max(C) · ‖ΔW‖²: every row of ΔW
    lies in the null space of the preserved keys (up to the float32 rounding of the stored weights)."""
    model = family_model
    layout = layout_of(model)
    hp = AlphaEditHparams()
    done = edit_mlp_out(
        model,
        tiny_tokenizer,
        wrong_facts(model, tiny_tokenizer, 2),
        1,
        "alphaedit",
        400,
        cache_dir=tmp_path,
        layers=LAYERS,
    )
    assert "null space of C" in done.notes[1]
    for layer in LAYERS:
        (name,) = [s.name for s in layout.mlp_out_slices(layer)]
        c = key_statistics(model, tiny_tokenizer, layer, max_tokens=400, cache_dir=tmp_path).second_moment
        w0 = layout.mlp_out_matrix(model.get_parameter(name)).double()
        delta = layout.mlp_out_matrix(done.values[name]).double() - w0
        assert delta.norm() > 1e-4 * w0.norm()  # it did move
        moved = float(torch.trace(delta @ c @ delta.T))  # E‖ΔW k‖² on the preserved text
        bound = hp.nullspace_threshold * float(torch.linalg.eigvalsh(c)[-1]) * float(delta.norm()) ** 2
        assert moved <= 1.01 * bound + 1e-9


@pytest.fixture(scope="module", params=["memit", "alphaedit"])
def operated(request, family_model, tiny_tokenizer, tiny_panel, tmp_path_factory):
    keystats = tmp_path_factory.mktemp("keystats")
    return operate_editor(request.param, 2, family_model, tiny_tokenizer, tiny_panel, keystats)  # blocks 0, 1


def test_operate_edits_only_the_projections_of_the_blocks(operated, tmp_path):
    model, result = operated.model, operated.result
    layout = layout_of(model)
    names = {layout.mlp_out_slices(layer)[0].name for layer in LAYERS}
    edit = result.edit
    assert set(edit.values) == names and edit.layers == LAYERS and edit.layer == 1 and edit.site == "mlp_out"
    assert set(edit.metadata["base_blocks_sha256"]) == {"0", "1"} and edit.metadata["method"] == operated.method
    view = edited_model(model, edit)
    base, new = dict(model.named_parameters()), dict(view.named_parameters())
    assert {n for n in base if not torch.equal(base[n], new[n])} == names  # every other tensor bitwise the base's
    for name in names:
        assert torch.equal(new[name], edit.values[name])  # the view carries exactly the returned weights
    assert result.report.weights.others_unchanged
    d = result.to_dict()
    assert d["method"] == operated.method and d["layer"] == 1 and d["config"]["layers"] == [0, 1]
    assert d["layer_reason"].startswith("given; blocks 0, 1: the 5 blocks ending at block 1")
    assert d["config"]["hparams"]["layers"] == [0, 1]

    edit.save(tmp_path / "patch.safetensors")
    loaded = Edit.load(tmp_path / "patch.safetensors")
    assert (loaded.site, loaded.layer, loaded.layers, loaded.slices) == ("mlp_out", 1, LAYERS, edit.slices)
    assert loaded.metadata == edit.metadata
    assert_state_equal(edited_model(model, loaded).state_dict(), view.state_dict())
    assert_state_equal(model.state_dict(), operated.before)


def test_operate_with_the_papers_fixed_layers(family_model, tiny_tokenizer, tiny_panel, tmp_path):
    """``layers`` given: those blocks (not a contiguous span), the last one is the edit's ``layer``."""
    config = SurgeryConfig(method="memit", layers=(0, 2), stat_tokens=300)
    result = operate(
        family_model,
        tiny_tokenizer,
        wrong_facts(family_model, tiny_tokenizer, 1),
        config,
        unrelated=TEXTS[:2],
        panel=tiny_panel,
        require_all=False,
        cache_dir=tmp_path,
    )
    assert result.edit.layers == (0, 2) and result.edit.layer == 2
    assert result.report.layer_reason == "given: blocks 0, 2 (--layers)"
    layout = layout_of(family_model)
    assert set(result.edit.values) == {layout.mlp_out_slices(layer)[0].name for layer in (0, 2)}
