"""Many facts in one edit, chosen by a census: the split, the panel, and one edit against one per fact."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_census

from surgery.cli import main
from surgery.core.errors import InputError
from surgery.edit.many_facts import RepairConfig, census_panel, repair_from_census, split_routing
from surgery.edit.training import SurgeryConfig
from surgery.evaluation.facts import Fact


def _facts(n_relations=2, n=6):
    return [
        Fact(f"p{r}-{i}", f" t{i}", relation=f"rel{r}", subject=f"s{i}") for r in range(n_relations) for i in range(n)
    ]


def _records(facts, verdict_of):
    return [{"prompt": f.prompt, "target": f.target, "verdict": verdict_of(f), "prescribed_layer": 1} for f in facts]


def test_split_is_per_relation_seeded_and_skips_what_is_not_routing():
    facts = _facts() + [Fact("amb", " x", relation="rel0", subject="s", ambiguous="generic first token")]
    records = _records(facts, lambda f: "correct" if f.prompt.endswith("-5") else "routing")
    edit, held = split_routing(records, facts, RepairConfig(edit_fraction=0.4, seed=3))
    assert len(edit) == 4 and len(held) == 6  # 5 routing per relation: 2 edited, 3 held out, each relation
    assert {f.relation for f in edit} == {"rel0", "rel1"}
    assert not {f.prompt for f in edit} & {f.prompt for f in held}
    assert all(not f.prompt.endswith("-5") and f.prompt != "amb" for f in edit + held)
    assert split_routing(records, facts, RepairConfig(edit_fraction=0.4, seed=3)) == (edit, held)  # seeded
    edit2, held2 = split_routing(records, facts, RepairConfig(edit_fraction=0.4, max_edit=1, seed=3))
    assert len(edit2) == 1 and len(held2) == 9
    with pytest.raises(InputError, match="no routing failure"):
        split_routing(_records(facts, lambda f: "absence"), facts, RepairConfig())
    # said a little later (not a failure) or missing only a generic first piece: routing verdicts, never edited
    later = [dict(r, says_later=r["prompt"] == "p0-0") for r in records]
    later = [dict(r, divergence={"generic_first_piece": r["prompt"] == "p1-0"}) for r in later]
    edit3, held3 = split_routing(later, facts, RepairConfig(edit_fraction=0.4, seed=3))
    assert len(edit3) + len(held3) == 8 and not {"p0-0", "p1-0"} & {f.prompt for f in edit3 + held3}


def test_census_panel_judges_on_held_out_and_what_the_model_knew(tiny_panel):
    facts = _facts(3)
    # a whole relation the model knows, and one fact of an edited relation
    records = _records(facts, lambda f: "correct" if f.relation == "rel2" or f.prompt == "p0-5" else "routing")
    edit, held = split_routing(records, [f for f in facts if f.relation != "rel2"], RepairConfig())
    panel = census_panel(tiny_panel, edit, held, records, facts, RepairConfig(specificity_facts=7))
    assert [p.prompt for p in panel.facts] == [f.prompt for f in edit]
    assert [p.prompt for p in panel.relation] == [f.prompt for f in held]
    # every correct fact is a side-effect probe, those of the edited relations too: an edit of some capitals must
    # not break the capitals the model knew
    assert sorted(p.prompt for p in panel.side_effects) == ["p0-5"] + [f"p2-{i}" for i in range(6)]
    few = census_panel(tiny_panel, edit, held, records, facts, RepairConfig(specificity_facts=3))
    assert len(few.side_effects) == 3
    # the correct facts not scored, of the edited relations (rel0's p0-5; rel2 is not edited), join the panel's
    # preserve prompts; none is both kept and scored
    kept = {p.prompt for p in few.preserve} - {p.prompt for p in tiny_panel.preserve}
    assert kept == {"p0-5"} - {p.prompt for p in few.side_effects}
    unscored = census_panel(tiny_panel, edit, held, records, facts, RepairConfig(specificity_facts=0))
    assert {p.prompt for p in unscored.preserve} - {p.prompt for p in tiny_panel.preserve} == {"p0-5"}
    none = census_panel(tiny_panel, edit, held, records, facts, RepairConfig(specificity_facts=3, preserve_facts=0))
    assert none.preserve == tiny_panel.preserve
    assert panel.general == tiny_panel.general and panel.unrelated_text == tiny_panel.unrelated_text


def _repair(demo, demo_census, surgery: SurgeryConfig, config: RepairConfig, cache_dir=None):
    panel, facts, records = demo_census
    return repair_from_census(demo.model, demo.tokenizer, records, facts, panel, surgery, config, cache_dir=cache_dir)


@pytest.mark.slow
def test_one_edit_for_the_demo_models_routing_failures(demo, demo_census, tmp_path, capsys):
    panel, facts, records = demo_census
    assert sum(r["verdict"] == "routing" for r in records) == 6
    result = _repair(demo, demo_census, SurgeryConfig(site="wv"), RepairConfig(edit_fraction=0.5, per_fact=1))
    assert (result.edited, result.held_out) == (3, 3)
    e = result.report.comparison.evaluation()
    assert [e["efficacy"][k] for k in ("before", "after", "total")] == [0, 3, 3]
    assert e["relation"]["total"] == 3 and e["relation"]["before"] == 0  # held-out failures, never trained on
    cmp = result.to_dict()["one_edit_vs_one_per_fact"]
    assert cmp["per_fact"]["facts"] == 1 and cmp["one_edit"]["params_changed"] > 0

    # The CLI on a census folder written the way `census` writes it.
    census, fact_file = write_census(tmp_path, facts, records)
    out = tmp_path / "repair"
    assert (
        main(
            [
                "repair-census",
                "--model",
                str(demo.source),
                "--census",
                str(census),
                "--facts",
                str(fact_file),
                "--out",
                str(out),
                "--per-fact",
                "0",
            ]
        )
        == 0
    )
    written = json.loads((out / "report.json").read_text())
    assert written["edited"] == 3 and (out / "patch.safetensors").is_file()
    assert "One edit for 3 routing failures" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("method,layers", [("ft", None), ("memit", None), ("memit", (0, 1)), ("alphaedit", "trace")])
def test_a_peer_editor_makes_the_census_edit(demo, demo_census, tmp_path, method, layers):
    """``--method`` reaches the census repair: the edit is the peer's (MLP output projections, MEMIT's of several
    blocks, or of ``--layers``), the edited facts keep their subjects (where the peers read their keys), and the
    report says so."""
    panel, facts, records = demo_census
    config = RepairConfig(edit_fraction=0.5, per_fact=0)
    edit, held = split_routing(records, facts, config)
    built = census_panel(panel, edit, held, records, facts, config)
    assert [p.subject for p in built.facts] == [f.subject for f in edit] and all(p.subject for p in built.facts)
    before = {k: v.clone() for k, v in demo.model.state_dict().items()}
    surgery = SurgeryConfig(method=method, stat_tokens=2_000, layers=layers)
    result = _repair(demo, demo_census, surgery, config, tmp_path / "stats")
    assert result.report.method == method and result.report.site == "mlp_out"
    if method == "ft":
        assert len(result.edit.layers) == 1
    elif layers in (None, "trace"):  # MEMIT, AlphaEdit by default: traced; the demo model's 4 blocks (fewer than
        # MEMIT's span of 5) are all of them, and the report says so
        assert tuple(result.edit.layers) == (0, 1, 2, 3) and "causal tracing of 3 fact(s)" in result.layer_reason
    else:
        assert tuple(result.edit.layers) == layers and "(--layers)" in result.layer_reason
    assert result.edit.layers[-1] == result.layer
    assert all(torch.equal(v, demo.model.state_dict()[k]) for k, v in before.items())  # the base is not mutated
    assert result.to_dict()["report"]["method"] == method
