"""Smoke tests of the benchmark code on the tiny model: correctness only, never timing (bench/README.md)."""

import json

import pytest
import torch

from bench import diagnosis, report, training
from bench.measure import interleaved, peak_memory
from bench.models import IdTokenizer
from surgery.evaluation.facts import Fact


def test_interleaved_runs_every_case_in_every_round():
    calls = []
    out = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then a rotating order
    assert out["a"].wall.n == 3 and out["b"].cpu.n == 3
    assert out["a"].wall.min <= out["a"].wall.median <= out["a"].wall.max


def test_diagnosis_cases_run_and_agree_with_a_plain_forward(tiny_model):
    cases = diagnosis.make_cases(tiny_model, IdTokenizer(), None, length=8)
    assert set(cases) == {"hf", "ours"}
    logits = cases["hf"]().logits[0, -1]
    d = cases["ours"]()
    assert d.prediction.token_id == int(logits.argmax())
    assert d.target.token_id == diagnosis.target_id(tiny_model)


def test_transformer_lens_computes_the_same_numbers(tiny_model):
    pytest.importorskip("transformer_lens", reason="bench-only dependency (make bench installs it)")
    from bench.models import tl_bridge

    assert diagnosis.check_tl_matches(tiny_model, tl_bridge(tiny_model), length=8) < 1e-4


def test_surgery_step_cases_leave_the_base_model_untouched(tiny_model, tiny_tokenizer):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    job = training.Job(
        tiny_model,
        tiny_tokenizer,
        [Fact("The capital of France is", " Paris")],
        ["the cat sat on the mat . the dog sat on the red mat ."],
        None,
        1,
        "given",
    )
    cases = training.step_cases(job, steps=1)
    assert set(cases) == set(training.STEP_CASES)
    for name, fn in cases.items():
        samples = fn()
        assert len(samples) == 1 and all(t >= 0 for t in samples[0]), name
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())


@pytest.mark.slow
def test_peak_memory_sees_a_large_allocation():
    """A 200 MiB tensor allocated inside one call shows up as transient memory, not as resident memory."""
    mem = peak_memory("tests.test_bench:allocating_case", mib=200)
    assert 180 < mem.transient < 260 and mem.resident < 50


def allocating_case(mib: int):
    return lambda: torch.ones(mib * 2**20 // 4).sum()


def test_report_tables_show_the_ratios():
    t = {"wall": {"median": 0.2, "min": 0.1, "max": 0.3}, "cpu": {"median": 0.2, "min": 0.1, "max": 0.3}}
    row = {"length": 8, "time": {"hf": t, "ours": {**t, "wall": {"median": 0.1, "min": 0.1, "max": 0.1}}, "tl": t}}
    table = report.diagnosis_table({"rows": [row]})
    assert "**0.50×**" in table and "**2.00×**" in table


def test_transformer_lens_matches_on_a_gemma3_shaped_model(tiny_tokenizer):
    """The post-attention norm (its frozen scale on the head results) and Gemma's 1 + w gains, lean cache too."""
    pytest.importorskip("transformer_lens", reason="bench-only dependency (make bench installs it)")
    from conftest import make_family_model

    from bench.models import tl_bridge

    model = make_family_model("gemma3", len(tiny_tokenizer))
    bridge = tl_bridge(model)
    assert diagnosis.check_tl_matches(model, bridge, length=8) < 1e-4
    assert diagnosis.check_tl_matches(model, bridge, length=8, lean=True) < 1e-4


def test_operation_stages_time_each_call_and_put_the_library_back(tiny_model, tiny_tokenizer):
    import surgery.evaluation.scoring as evaluation
    from bench import operation

    original = evaluation.score_probes
    with operation.stages(tiny_model) as totals:
        assert evaluation.score_probes is not original
        evaluation.score_probes(tiny_model, tiny_tokenizer, [Fact("The capital of France is", " Paris")])
    assert evaluation.score_probes is original
    assert dict(totals).keys() == {("score_probes [base]",)}
    calls, seconds = totals[("score_probes [base]",)]
    assert calls == 1 and seconds >= 0


def test_sequential_edits_chain_rounds_and_leave_the_base_untouched(demo, tmp_path):
    from bench import sequential_edits
    from surgery.edit import editors
    from surgery.evaluation.facts import load_facts
    from surgery.evaluation.memo import EvaluationMemo
    from surgery.evaluation.panels import panel_for_model

    model, tokenizer = demo.model, demo.tokenizer
    facts = [f for f in load_facts("assets/examples/demo_facts.json")][2:6]  # the first two the model already says
    before = {k: v.clone() for k, v in model.state_dict().items()}
    statistics, alphaedit = editors.key_statistics, editors.apply_alphaedit
    chain = sequential_edits.run_chain(
        model,
        tokenizer,
        [facts[:2], facts[2:]],
        "alphaedit",
        panel_for_model(model),
        EvaluationMemo(model),
        layers=(0, 1),  # --layers: the blocks given, not the diagnosis' (block 2 and the two before it)
    )
    edited = [r for r in chain["rounds"] if "error" not in r]
    assert edited and all(list(r["layers"]) == [0, 1] and r["layer"] == 1 for r in edited)
    assert editors.key_statistics is statistics and editors.apply_alphaedit is alphaedit  # patches undone
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the base never mutated
    assert [r["round"] for r in chain["rounds"]] == [1, 2]
    assert [len(rs) for rs in chain["recheck"]] == [2, 2]
    assert chain["final"]["efficacy"]["total"] == 4
    assert "| **alphaedit** |" in sequential_edits.to_markdown(
        {
            "setup": {
                "model": "demo",
                "rounds": 2,
                "per_round": 2,
                "commit": "x",
                "date": "d",
                "machine": "m",
                "load_start": "0",
                "load_end": "0",
                "block": None,
                "seed": 0,
                "source": "f",
            },
            "chains": [chain],
        }
    )


def test_preservation_bench_times_each_term_and_tables_each_operate(monkeypatch, capsys):
    from bench import preservation

    argv = ["preservation", "demo", "--steps", "1", "--repeats", "1", "--terms", "kl,hidden"]
    monkeypatch.setattr("sys.argv", argv)
    assert preservation.main() == 0
    out = capsys.readouterr().out
    assert "| kl |" in out and "| hidden |" in out and "| naive-wv |" in out  # (a) a step time per term
    rows = [line for line in out.splitlines() if line.startswith("| kl ") or line.startswith("| hidden ")]
    assert len(rows) == 4  # (a) and (b): one row per term in each table
    monkeypatch.setattr("sys.argv", [*argv, "--kl-weight"])  # no weight: the step times alone
    assert preservation.main() == 0
    out = capsys.readouterr().out
    assert "| naive-wv |" in out and "(b) operate" not in out


def test_sequential_edits_draws_routing_failures_at_one_block_with_their_subjects(tmp_path):
    from bench import sequential_edits

    def record(i, block, verdict="routing", says=False, later=False, generic=False):
        return {"prompt": f"City{i} is a city in", "target": " X", "subject": f"City{i}", "verdict": verdict,
                "prescribed_layer": block, "says_answer": says, "says_later": later,
                "divergence": {"generic_first_piece": generic}}  # fmt: skip

    rows = [record(i, 3) for i in range(5)] + [record(9, 2), record(10, 3, "absence"), record(11, 3, says=True)]
    rows += [record(12, 3, later=True), record(13, 3, generic=True)]  # said a little later; a generic piece: kept out
    census = tmp_path / "census.jsonl"
    census.write_text("".join(json.dumps(r) + "\n" for r in rows))
    facts, block = sequential_edits.pick_facts(census, 4, seed=0, exclude={"City0 is a city in"})
    assert block == 3 and len(facts) == 4
    assert {f.prompt for f in facts} == {f"City{i} is a city in" for i in range(1, 5)}
    assert all(f.subject == f.prompt.split(" is")[0] for f in facts)  # the key-value editors' key position


@pytest.mark.slow
def test_batch_edits_tables_the_repair_census_runs_as_they_reported(demo, demo_census, tmp_path, capsys):
    """Experiment (b)'s table: one row per repair-census run, every figure read from the run's own report; runs that
    edited other facts are refused."""
    from conftest import write_census

    from bench import batch_edits
    from surgery.cli import main

    _, facts, records = demo_census
    census, fact_file = write_census(tmp_path, facts, records)
    common = ["repair-census", "--model", str(demo.source), "--census", str(census), "--facts", str(fact_file)]
    common += ["--per-fact", "0", "--stat-tokens", "2000", "--stats-dir", str(tmp_path / "stats")]
    for method, seed in (("ft", "0"), ("memit", "0"), ("ft", "1")):
        assert main([*common, "--method", method, "--seed", seed, "--out", str(tmp_path / f"{method}-{seed}")]) == 0
    capsys.readouterr()

    batch_edits.main([str(tmp_path / "ft-0"), str(tmp_path / "memit-0"), "--out", str(tmp_path / "table")])
    rows = json.loads((tmp_path / "table" / "batch.json").read_text())
    assert [r["method"] for r in rows] == ["ft", "memit"]
    for r in rows:
        report = json.loads((tmp_path / f"{r['method']}-0" / "report.json").read_text())
        assert r["facts_after"] == report["evaluation"]["efficacy"]["after"]
        assert r["side_effects_total"] == report["evaluation"]["specificity"]["side_effects"]["total"]
        assert r["params_changed"] == report["report"]["weights"]["params_changed"] > 0
    assert (tmp_path / "table" / "memit-0" / "report.json").read_bytes() == (
        tmp_path / "memit-0" / "report.json"
    ).read_bytes()
    markdown = (tmp_path / "table" / "batch.md").read_text()
    assert "| **ft** |" in markdown and "| **memit** |" in markdown and markdown == capsys.readouterr().out[:-1]
    with pytest.raises(SystemExit, match="not a repair-census output folder"):
        batch_edits.main([str(tmp_path / "census")])
    with pytest.raises(SystemExit, match="same facts"):
        batch_edits.main([str(tmp_path / "ft-0"), str(tmp_path / "ft-1")])


def test_screen_bench_times_each_case_both_ways_and_checks_they_agree(monkeypatch, capsys):
    # the screen forced on for the demo model (its vocabulary is below the size where it applies)
    from conftest import DEMO_DIR, force_screen  # here, not at the top: memory cases import this file elsewhere

    import surgery.evaluation.generation as generation
    from bench import screen

    calls = force_screen(monkeypatch)
    monkeypatch.setattr(screen, "ON", 0)  # the bench's "on" setting: every vocabulary
    monkeypatch.setattr("sys.argv", ["screen", "--model", str(DEMO_DIR), "--rounds", "1", "--census", "0", "--operate"])
    screen.main()
    rows = [
        line
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| evaluation") or line.startswith("| operate")
    ]
    assert len(rows) == 2 and all(row.endswith("| True |") for row in rows)  # the same answers, on and off
    assert calls  # the screen ran in the "on" rounds
    assert generation.SCREEN_MIN_PRODUCT == 0  # and left on, as the bench found it (monkeypatch puts it back)
