"""ROME and FT-L (surgery/edit/rome.py, ft.py, editors.py) on a tiny model of every family: only the MLP output
projection moves, ROME's update is rank one per fact and maps k* to v*, FT-L keeps its L∞ bound, and the edit
round-trips through the patch file."""

from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_PANEL
from test_families import CANDIDATE_FACTS, assert_state_equal, ids_of, snapshot

from surgery.arch import layout_of
from surgery.core.errors import InputError
from surgery.edit.ft import FtHparams, fine_tune
from surgery.edit.keystats import key_statistics
from surgery.edit.mlp_out import keys_at, module_output_at
from surgery.edit.rome import apply_rome
from surgery.edit.training import SurgeryConfig, operate
from surgery.io.edit_file import Edit, edited_model

TEXTS = TINY_PANEL["unrelated_text"] * 20
LAYER = 1


def wrong_facts(model, tokenizer, n: int):
    """The first ``n`` candidate facts the random model gets wrong."""
    out = []
    with torch.no_grad():
        for fact in CANDIDATE_FACTS:
            if (
                int(model(ids_of(tokenizer, fact.prompt)).logits[0, -1].argmax())
                != tokenizer(fact.target)["input_ids"][0]
            ):
                out.append(fact)
    assert len(out) >= n
    return out[:n]


def stats_of(model, tokenizer, tmp_path):
    return key_statistics(
        model, tokenizer, LAYER, texts=TEXTS, corpus="tiny", max_tokens=400, chunk_tokens=16, cache_dir=tmp_path
    )


def projection(model) -> str:
    (s,) = layout_of(model).mlp_out_slices(LAYER)
    return s.name


def matrix_of(model, weight: torch.Tensor) -> torch.Tensor:
    return layout_of(model).mlp_out_matrix(weight).double()


def test_rome_is_rank_one_per_fact_and_maps_the_key_to_its_value(family_model, tiny_tokenizer, tmp_path):
    model, before = family_model, snapshot(family_model)
    stats = stats_of(model, tiny_tokenizer, tmp_path)
    name = projection(model)
    w0 = matrix_of(model, model.get_parameter(name))
    facts = wrong_facts(model, tiny_tokenizer, 2)
    w1_stored, (one,) = apply_rome(model, tiny_tokenizer, facts[:1], LAYER, stats)
    w1 = matrix_of(model, w1_stored)
    s = torch.linalg.svdvals(w1 - w0)
    assert s[1] < 1e-5 * s[0]  # rank one (up to the float32 rounding of the stored weight)
    bias = model.get_submodule(name.rsplit(".", 1)[0]).bias
    out = w1 @ one.key + (0 if bias is None else bias.double())
    torch.testing.assert_close(out, one.value, rtol=1e-4, atol=1e-4)  # W' k* + b = v*

    # Two facts: the second update is made on the first's result, and is rank one as well.
    w2_stored, (first, second) = apply_rome(model, tiny_tokenizer, facts, LAYER, stats)
    w2 = matrix_of(model, w2_stored)
    torch.testing.assert_close(first.value, one.value)
    s = torch.linalg.svdvals(w2 - w1)
    assert s[1] < 1e-5 * s[0]
    torch.testing.assert_close(
        w2 @ second.key + (0 if bias is None else bias.double()), second.value, rtol=1e-4, atol=1e-4
    )
    assert_state_equal(model.state_dict(), before)  # the base is bitwise unchanged


def test_rome_reads_the_key_at_the_subjects_last_token(tiny_tokenizer):
    from surgery.edit.mlp_out import subject_position
    from surgery.evaluation.facts import Fact

    with_subject = Fact("The capital of France is", " Paris", relation="capital", subject="France")
    assert subject_position(tiny_tokenizer, with_subject, 32) == (3, "the subject's last token ('France')")
    assert subject_position(tiny_tokenizer, Fact("The capital of France is", " Paris"), 32)[0] == 4


def test_ft_keeps_its_linf_bound_and_its_projection(family_model, tiny_tokenizer):
    model, before = family_model, snapshot(family_model)
    name = projection(model)
    hp = FtHparams(lr=1e-2, norm_constraint=2e-3, steps=5)
    out = fine_tune(model, tiny_tokenizer, wrong_facts(model, tiny_tokenizer, 2), LAYER, hp)
    delta = (out.weight.double() - model.get_parameter(name).double()).abs()
    assert out.steps >= 1 and delta.max() <= hp.norm_constraint * (1 + 1e-5)
    assert delta.max() > hp.norm_constraint / 2  # the bound is reached: it is what holds the change
    assert_state_equal(model.state_dict(), before)


def operate_editor(method, n_facts, model, tokenizer, panel, cache_dir) -> SimpleNamespace:
    """``operate`` with ``method`` on block ``LAYER`` for the first ``n_facts`` facts ``model`` gets wrong, and the
    model's state before it (to check that nothing but the edit changed)."""
    before = snapshot(model)
    facts = wrong_facts(model, tokenizer, n_facts)
    config = SurgeryConfig(method=method, layer=LAYER, stat_tokens=300)
    result = operate(
        model,
        tokenizer,
        facts,
        config,
        unrelated=TEXTS[:2],
        panel=panel,
        require_all=False,
        cache_dir=cache_dir,
    )
    return SimpleNamespace(model=model, before=before, result=result, method=method)


@pytest.fixture(scope="module", params=["rome", "ft"])
def operated(request, family_model, tiny_tokenizer, tiny_panel, tmp_path_factory):
    keystats = tmp_path_factory.mktemp("keystats")
    return operate_editor(request.param, 1, family_model, tiny_tokenizer, tiny_panel, keystats)


def test_operate_edits_only_the_output_projection(operated, tmp_path):
    model, result = operated.model, operated.result
    name = projection(model)
    assert set(result.edit.values) == {name} and result.edit.site == "mlp_out"
    assert result.edit.metadata["method"] == operated.method
    view = edited_model(model, result.edit)
    base, new = dict(model.named_parameters()), dict(view.named_parameters())
    assert {n for n in base if not torch.equal(base[n], new[n])} == {name}
    assert result.report.weights.others_unchanged and result.report.weights.qk_unchanged is None
    d = result.to_dict()
    assert d["method"] == operated.method and d["site"] == "mlp_out" and d["layer"] == LAYER
    assert d["layer_reason"] == "given" and "hparams" in d["config"]
    assert d["facts_fixed"] in ("0/1", "1/1") and d["facts_total"] == 1 and "evaluation" in d  # as a wv repair

    result.edit.save(tmp_path / "patch.safetensors")
    loaded = Edit.load(tmp_path / "patch.safetensors")
    assert (loaded.site, loaded.layer, loaded.slices, loaded.metadata["method"]) == (
        "mlp_out",
        LAYER,
        result.edit.slices,
        operated.method,
    )
    assert_state_equal(edited_model(model, loaded).state_dict(), view.state_dict())
    assert_state_equal(model.state_dict(), operated.before)


def test_the_edit_keeps_the_keys_and_moves_the_output(operated, tiny_tokenizer):
    """In the edited model the keys are the base's (they come before the projection); the output there moved."""
    model, result = operated.model, operated.result
    fact = wrong_facts(model, tiny_tokenizer, 1)[0]
    ids = ids_of(tiny_tokenizer, fact.prompt)
    view = edited_model(model, result.edit)
    torch.testing.assert_close(keys_at(view, LAYER, ids, -1), keys_at(model, LAYER, ids, -1), rtol=0, atol=0)
    assert not torch.equal(module_output_at(view, LAYER, ids, -1), module_output_at(model, LAYER, ids, -1))


def test_unknown_methods_are_refused():
    with pytest.raises(InputError, match="unknown method 'pmet': choose one of wv, rome, ft, memit, alphaedit"):
        SurgeryConfig(method="pmet")
    with pytest.raises(InputError, match="--site mlp is for --method wv"):
        SurgeryConfig(method="rome", site="mlp")
    assert SurgeryConfig.from_dict({"site": "wv", "layer": 3}).method == "wv"  # configs of old reports still load


def test_the_essence_term_reads_the_subject_alone(family_model, tiny_tokenizer):
    """ROME's KL is read at the subject's last token of "{subject} is a": the model is causal, so the subject alone
    gives the same distribution there (what rome.py runs)."""
    with torch.no_grad():
        full = family_model(ids_of(tiny_tokenizer, "France is a")).logits[0, 0]
        alone = family_model(ids_of(tiny_tokenizer, "France")).logits[0, -1]
    torch.testing.assert_close(full, alone, rtol=1e-5, atol=1e-5)
