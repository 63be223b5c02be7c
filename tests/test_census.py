"""Census: records, resume after an interruption, summary/report/plots, the CLI, and two processes (torchrun)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from surgery.census.report import legacy_verdict, outcome, summarize
from surgery.census.run import CENSUS_FILE, RUN_FILE, CensusConfig, model_fingerprint, run_census
from surgery.cli import main
from surgery.core.errors import InputError, NonFiniteError, OutputError
from surgery.diagnosis.diagnose import DiagnosisConfig
from surgery.evaluation.facts import Fact

ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = ROOT / "assets" / "demo-model"
CAPITALS = {
    "France": " Paris",
    "Japan": " Tokyo",
    "Germany": " Berlin",
    "China": " Beijing",
    "Russia": " Moscow",
    "England": " London",
    "Italy": " Rome",
    "Spain": " Madrid",
    "Portugal": " Lisbon",
}
EXPECTED = {
    **{c: "routing" for c in ("France", "Japan", "Germany", "China", "Russia", "England")},
    "Italy": "correct",
    "Spain": "correct",
    "Portugal": "absence",
}


def demo_facts() -> list[Fact]:
    facts = [Fact(f"The capital of {c} is", t, relation="capital", subject=c) for c, t in CAPITALS.items()]
    facts.append(Fact("the sky is", " blue", relation="colour", subject="sky"))
    facts.append(
        Fact("The capital of Xanadu is", " Paris", relation="capital", subject="Xanadu")
    )  # a word the demo lacks
    facts.append(
        Fact("The capital of Italy is", " the", relation="capital", subject="Italy", ambiguous="generic first token")
    )
    return facts


def write_facts(path: Path, facts: list[Fact]) -> Path:
    path.write_text("".join(json.dumps(f.to_dict()) + "\n" for f in facts))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def demo_census(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("census")
    result = run_census(demo.model, demo.tokenizer, demo_facts(), out, CensusConfig(batch_size=4), model_name="demo")
    return out, result


def test_census_verdicts_and_records(demo_census):
    out, result = demo_census
    assert (result.selected, result.skipped_ambiguous, result.already_done, result.diagnosed) == (11, 1, 0, 11)
    records = {r["subject"]: r for r in read_jsonl(out / CENSUS_FILE)}
    assert [r["subject"] for r in read_jsonl(out / CENSUS_FILE)] == list(CAPITALS) + ["sky", "Xanadu"]
    for country, verdict in EXPECTED.items():
        r = records[country]
        assert r["verdict"] == verdict, country
        assert len(r["lens_ranks"]) == len(r["lens_margin"]) == 5  # embeddings + 4 blocks
        if verdict == "routing":
            assert r["override"]["layer"] == 3 and r["prediction"].strip() == "the"
            assert r["best_lens_rank"] == 1 and r["best_lens_layer"] == 2
    assert records["Xanadu"]["verdict"] is None and "vocabulary" in records["Xanadu"]["error"]
    for key in (
        "prompt",
        "target",
        "relation",
        "verdict",
        "prescribed_layer",
        "override",
        "lens_ranks",
        "divergence",
        "said",
        "says_answer",
        "says_later",
    ):
        assert key in records["France"]
    # What the model says, beside the first-token verdict: France is "routing" but says " the city of Paris"
    france, italy, russia = records["France"], records["Italy"], records["Russia"]
    assert france["said"].startswith("the city of Paris") and not france["says_answer"] and france["says_later"]
    assert italy["says_answer"] and not italy["says_later"] and not russia["says_later"]  # " the city of Berlin"
    assert france["divergence"] == {
        "piece_index": 0,
        "piece": "Paris",
        "pieces": ["Paris"],
        "position": 4,
        "before": "",
        "diverges": True,
        "forced": False,
        "generic_first_piece": False,
        "missed_after": None,
    }
    assert italy["divergence"]["diverges"] is False


def test_summary_report_and_plots(demo_census):
    out, result = demo_census
    summary = json.loads((out / "summary.json").read_text())
    assert summary == result.summary
    assert summary["verdicts"]["capital"] == {"routing": 6, "absence": 1, "correct": 2}
    assert summary["verdicts"]["all"]["correct"] == 3  # the sky is blue
    # five of the six routing capitals are said a little later ("the city of Paris"): not failures; Russia is
    assert summary["outcomes"]["capital"] == {
        "says": 2,
        "says_later": 5,
        "generic_first_piece": 0,
        "routing": 1,
        "absence": 1,
        "correct": 0,
    }
    assert summary["outcomes"]["all"]["says"] == 3 and summary["divergence_piece"] == {"0": 7}
    assert summary["facts"]["unusable"] == {"capital": 1} and summary["facts"]["skipped_ambiguous"] == 1
    assert summary["prescribed_layers"]["all"] == [0, 0, 1, 0]  # the routing outcomes: the facts to repair
    assert sum(map(sum, summary["override_heads"])) == 1 and sum(summary["override_heads"][3]) == 1
    assert sum(summary["best_lens_rank"]["all"].values()) == 10
    assert summary["rule_change"]["all"] == {}  # the demo's verdicts are the same under the old rule
    report = (out / "report.md").read_text()
    for png in ("verdicts_per_relation.png", "prescribed_layers.png", "override_heads.png"):
        assert f"]({png})" in report
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| capital | 9 |" in report and "## What the model says" in report
    assert "| capital | 9 | 2 (22%) | 5 (56%) | 0 (0%) | 1 (11%) | 1 (11%) | 0 (0%) |" in report


def test_interrupted_census_resumes(demo, demo_census, tmp_path):
    class Stop(Exception):
        pass

    def stop_after_first_batch(done, total):
        raise Stop

    facts = demo_facts()
    with pytest.raises(Stop):
        run_census(
            demo.model,
            demo.tokenizer,
            facts,
            tmp_path,
            CensusConfig(batch_size=4),
            model_name="demo",
            progress=stop_after_first_batch,
        )
    assert len(read_jsonl(tmp_path / CENSUS_FILE)) == 4  # the finished batch is on disk
    with open(tmp_path / CENSUS_FILE, "a") as f:
        f.write('{"prompt": "half a li')  # a process killed while writing
    seen = []
    result = run_census(
        demo.model,
        demo.tokenizer,
        facts,
        tmp_path,
        CensusConfig(batch_size=4),
        model_name="demo",
        progress=lambda done, total: seen.append((done, total)),
    )
    assert (result.already_done, result.diagnosed) == (4, 7)
    assert seen == [(4, 7), (7, 7)]
    reference, _ = demo_census
    assert (tmp_path / CENSUS_FILE).read_text() == (reference / CENSUS_FILE).read_text()
    again = run_census(demo.model, demo.tokenizer, facts, tmp_path, CensusConfig(batch_size=4), model_name="demo")
    assert again.diagnosed == 0 and again.already_done == 11


def test_limit_and_ambiguous(demo, tmp_path):
    facts = demo_facts()
    result = run_census(demo.model, demo.tokenizer, facts, tmp_path / "a", CensusConfig(limit=2), model_name="demo")
    assert result.selected == 2 and len(read_jsonl(tmp_path / "a" / CENSUS_FILE)) == 2
    result = run_census(
        demo.model, demo.tokenizer, facts, tmp_path / "b", CensusConfig(include_ambiguous=True), model_name="demo"
    )
    assert result.selected == 12 and result.skipped_ambiguous == 0
    with pytest.raises(InputError, match="ambiguous"):
        run_census(demo.model, demo.tokenizer, facts[-1:], tmp_path / "c", model_name="demo")


def test_refuses_a_census_of_another_model_or_rule(demo, tmp_path):
    facts = demo_facts()[:2]
    run_census(demo.model, demo.tokenizer, facts, tmp_path, model_name="demo")
    with pytest.raises(InputError, match="another model"):
        run_census(demo.model, demo.tokenizer, facts, tmp_path, model_name="other")
    with pytest.raises(InputError, match="another diagnosis"):
        run_census(
            demo.model,
            demo.tokenizer,
            facts,
            tmp_path,
            CensusConfig(diagnosis=DiagnosisConfig(routing_rank=5)),
            model_name="demo",
        )


def test_fingerprint_follows_every_weight(demo):
    """Deterministic, equal for a copy, different when one number of one weight changes (tied weights count once)."""
    import copy

    import torch

    reference = model_fingerprint(demo.model)
    assert model_fingerprint(demo.model) == reference and len(reference) == 64
    twin = copy.deepcopy(demo.model)
    assert model_fingerprint(twin) == reference
    with torch.no_grad():
        twin.get_output_embeddings().weight[5, 3] += 1e-3  # tied: the embedding changes with it
    assert model_fingerprint(twin) != reference


def test_resumes_only_with_the_same_weights(demo, tmp_path):
    """Other weights under the same name were accepted and their records mixed in: now refused, naming both
    fingerprints; a run file from before fingerprints is refused too (it cannot vouch for its records)."""
    import copy

    import torch

    facts = demo_facts()[:2]
    run_census(demo.model, demo.tokenizer, facts[:1], tmp_path, model_name="demo")
    info = json.loads((tmp_path / RUN_FILE).read_text())
    assert info["fingerprint"] == model_fingerprint(demo.model)
    twin = copy.deepcopy(demo.model)
    with torch.no_grad():
        twin.get_submodule("transformer.h.1.mlp.c_proj").weight[0, 0] += 1e-3
    census = (tmp_path / CENSUS_FILE).read_text()
    with pytest.raises(InputError, match=f"other weights .*fingerprint {info['fingerprint'][:12]} there, "):
        run_census(twin, demo.tokenizer, facts, tmp_path, model_name="demo")
    assert (tmp_path / CENSUS_FILE).read_text() == census  # nothing mixed in
    del info["fingerprint"]
    (tmp_path / RUN_FILE).write_text(json.dumps(info))
    with pytest.raises(InputError, match="before census-run.json recorded the weights' fingerprint.*new --out"):
        run_census(demo.model, demo.tokenizer, facts, tmp_path, model_name="demo")


def test_refuses_a_folder_that_is_not_a_census(demo, tmp_path):
    """A census wrote report.md and plots into any folder; a non-empty folder without census-run.json is refused
    and left as it was; an empty one is used (and marked as this tool's output)."""
    (tmp_path / "report.md").write_text("my notes\n")
    with pytest.raises(OutputError, match="not empty and holds no census"):
        run_census(demo.model, demo.tokenizer, demo_facts()[:1], tmp_path, model_name="demo")
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"] and (
        tmp_path / "report.md"
    ).read_text() == "my notes\n"
    (tmp_path / "empty").mkdir()
    run_census(demo.model, demo.tokenizer, demo_facts()[:1], tmp_path / "empty", model_name="demo")
    assert (tmp_path / "empty" / ".transformer-surgery").is_file() and (tmp_path / "empty" / "report.md").is_file()


@pytest.mark.parametrize("value", [float("nan"), 3e38])
def test_non_finite_activations_leave_no_census(tiny_tokenizer, tmp_path, value):
    """A NaN weight set in memory or an overflowing forward: refused, no record written, and no empty census.jsonl
    (nor run file, nor the folder) left behind to resume."""
    from conftest import make_non_finite_model

    model = make_non_finite_model(len(tiny_tokenizer), value)
    facts = [Fact("The capital of France is", " Paris", "capital", "France")]
    with pytest.raises(NonFiniteError, match="NaN or inf after L2"):
        run_census(model, tiny_tokenizer, facts, tmp_path / "new", model_name="tiny")
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(NonFiniteError):
        run_census(model, tiny_tokenizer, facts, tmp_path / "empty", model_name="tiny")
    assert list((tmp_path / "empty").iterdir()) == []


def test_cli_census_refusals_are_one_line(capsys, tmp_path, overflow_model_dir):
    """An overflowing model, and a corrupt or non-UTF-8 census-run.json: one line on stderr, exit 2."""
    facts = write_facts(tmp_path / "facts.jsonl", demo_facts()[:2])

    def census(model, out) -> str:
        code = main(["census", "--model", str(model), "--facts", str(facts), "--out", str(out), "--device", "cpu"])
        out_, err = capsys.readouterr()
        assert code == 2 and out_ == "" and err.count("\n") == 1 and "Traceback" not in err
        return err

    assert "NaN or inf after L2" in census(overflow_model_dir, tmp_path / "overflow")
    assert not (tmp_path / "overflow").exists()
    for name, data in [("corrupt", b'{"model": "demo", '), ("latin1", '{"model": "d\xe9mo"}'.encode("latin-1"))]:
        (tmp_path / name).mkdir()
        (tmp_path / name / RUN_FILE).write_bytes(data)
        assert f"{RUN_FILE} is unreadable" in census(DEMO_DIR, tmp_path / name)
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / RUN_FILE).write_text("[]")
    assert "not a census run file" in census(DEMO_DIR, tmp_path / "list")


def _next_word(loaded, text: str) -> str:
    import torch

    ids = loaded.tokenizer(text)["input_ids"]
    return loaded.tokenizer.decode([int(loaded.model(torch.tensor([ids])).logits[0, -1].argmax())]).strip()


def test_generic_first_piece_counted_apart(demo, tmp_path):
    """France -> " Rome ...": the demo model misses " Rome"; fed " Rome", it goes on to one word, not another. With
    the other word, the first piece is generic and counted apart; with its own word, it is routing or absence."""
    prompt = "The capital of France is"
    then = _next_word(demo, f"{prompt} Rome")
    other = next(w for w in ("city", "sky", "Paris") if w != then)
    facts = [
        Fact(prompt, f" Rome {other}", relation="capital", subject="France"),
        Fact(prompt, f" Rome {then}", relation="other", subject="France"),
    ]
    result = run_census(demo.model, demo.tokenizer, facts, tmp_path, CensusConfig(batch_size=2), model_name="demo")
    generic, goes_on = read_jsonl(tmp_path / CENSUS_FILE)
    assert generic["divergence"]["generic_first_piece"] and generic["divergence"]["missed_after"] == 1
    assert not goes_on["divergence"]["generic_first_piece"] and goes_on["divergence"]["diverges"]
    assert result.summary["outcomes"]["capital"]["generic_first_piece"] == 1
    assert result.summary["outcomes"]["other"]["generic_first_piece"] == 0
    assert result.summary["outcomes"]["other"][goes_on["verdict"]] == 1


def test_outcomes_counted_apart():
    base = {
        "relation": "capital",
        "lens_ranks": [9, 9, 9],
        "lens_margin": [-1, -1, -1],
        "best_lens_rank": 2,
        "prescribed_layer": 0,
        "override": {"layer": 1, "head": 0},
    }
    diverges = {"piece_index": 1, "diverges": True, "generic_first_piece": False}
    records = [
        {**base, "verdict": "routing", "says_answer": False, "says_later": True, "divergence": diverges},
        {
            **base,
            "verdict": "routing",
            "says_answer": False,
            "says_later": False,
            "divergence": {"piece_index": 0, "diverges": True, "generic_first_piece": True},
        },
        {**base, "verdict": "routing", "says_answer": False, "says_later": False, "divergence": diverges},
        {**base, "verdict": "absence", "says_answer": None, "says_later": None, "divergence": diverges},
        {
            **base,
            "verdict": "correct",
            "lens_ranks": [9, 9, 1],
            "says_answer": True,
            "says_later": False,
            "divergence": {"piece_index": 0, "diverges": False, "generic_first_piece": False},
        },
    ]
    assert [outcome(r) for r in records] == ["says_later", "generic_first_piece", "routing", "absence", "says"]
    s = summarize(records, n_layer=2, n_head=1)
    assert s["outcomes"]["capital"] == {
        "says": 1,
        "says_later": 1,
        "generic_first_piece": 1,
        "routing": 1,
        "absence": 1,
        "correct": 0,
    }
    assert s["verdicts"]["capital"] == {"routing": 3, "absence": 1, "correct": 1}  # the diagnosis, unchanged
    assert s["divergence_piece"] == {"0": 1, "1": 3}
    assert s["prescribed_layers"]["all"] == [1, 0] and s["override_heads"] == [[0], [1]]  # routing outcomes only


def test_legacy_rule_and_moves():
    # L = 8: the old rule took a lead at block 1; the new one needs the top 3 from block 4 on
    r = {
        "relation": "capital",
        "verdict": "absence",
        "lens_ranks": [900, 5000, 800, 700, 600, 500, 400, 300, 200],
        "lens_margin": [-1, 0.5, -1, -1, -1, -1, -1, -1, -1],
        "best_lens_rank": 300,
        "prescribed_layer": 0,
        "override": {"layer": 7, "head": 0},
    }
    assert legacy_verdict(r) == "routing"
    assert legacy_verdict({**r, "lens_margin": [-1] * 9}) == "absence"
    assert legacy_verdict({**r, "lens_margin": [-1] * 9, "lens_ranks": [1] * 8 + [1]}) == "correct"
    s = summarize([r], n_layer=8, n_head=2)
    assert s["rule_change"]["capital"] == {"routing -> absence": 1}


def test_cli_census(tmp_path, capsys):
    facts = write_facts(tmp_path / "facts.jsonl", demo_facts())
    out = tmp_path / "out"
    assert (
        main(
            [
                "census",
                "--model",
                str(DEMO_DIR),
                "--facts",
                str(facts),
                "--out",
                str(out),
                "--batch-size",
                "3",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "| capital | 9 |" in printed and "1 ambiguous skipped" in printed
    assert "5 say the answer a little later, 0 miss a generic first piece" in printed
    assert "| capital | 9 | 2 (22%) | 5 (56%) |" in printed
    assert len(read_jsonl(out / CENSUS_FILE)) == 11
    mapped = tmp_path / "mapped"  # accelerate big-model inference (everything fits: all on the CPU here)
    assert (
        main(
            [
                "census",
                "--model",
                str(DEMO_DIR),
                "--facts",
                str(facts),
                "--out",
                str(mapped),
                "--batch-size",
                "3",
                "--device-map",
                "auto",
                "--offload-folder",
                str(tmp_path / "off"),
            ]
        )
        == 0
    )
    assert (mapped / CENSUS_FILE).read_text() == (out / CENSUS_FILE).read_text()
    capsys.readouterr()
    assert main(["census", "--model", str(DEMO_DIR), "--facts", str(tmp_path / "nope.jsonl"), "--out", str(out)]) == 2
    assert "no such facts file" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    """torchrun with 2 CPU processes (gloo) writes the same census.jsonl as one process (records as sets)."""
    facts = write_facts(tmp_path / "facts.jsonl", demo_facts())
    args = [
        "-m",
        "surgery",
        "census",
        "--model",
        str(DEMO_DIR),
        "--facts",
        str(facts),
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--include-ambiguous",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, *args, "--out", str(tmp_path / "one")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            *args,
            "--out",
            str(tmp_path / "two"),
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr
    lines_one = (tmp_path / "one" / CENSUS_FILE).read_text().splitlines()
    lines_two = (tmp_path / "two" / CENSUS_FILE).read_text().splitlines()
    assert len(lines_one) == 12
    assert sorted(lines_one) == sorted(lines_two)
    assert lines_one == lines_two  # merged in the order of the facts
    assert not list((tmp_path / "two").glob("census.part-*"))
    assert json.loads((tmp_path / "one" / "summary.json").read_text()) == json.loads(
        (tmp_path / "two" / "summary.json").read_text()
    )


def offload_map(model, blocks: str, on_disk: set[int]) -> dict[str, str]:
    """A device_map keeping everything on the CPU except the blocks ``on_disk`` (offloaded to disk)."""
    placement = {}

    def walk(prefix: str, module) -> None:
        for name, child in module.named_children():
            path = prefix + name
            if path == blocks:
                placement.update({f"{path}.{i}": "disk" if i in on_disk else "cpu" for i in range(len(child))})
            elif blocks.startswith(path + "."):
                walk(path + ".", child)
            else:
                placement[path] = "cpu"

    walk("", model)
    return placement


@pytest.mark.parametrize("family", ["gpt2", "gemma3"])
def test_diagnosis_exact_with_blocks_offloaded_to_disk(family, tiny_tokenizer, tmp_path):
    """A model loaded with device_map (accelerate big-model inference), two of three blocks on disk: the same
    diagnosis as the model in memory, within 1e-5."""
    from conftest import make_family_model

    from surgery.arch import layout_of
    from surgery.diagnosis.diagnose import diagnose_batch
    from surgery.io.loading import load_model

    make_family_model(family, len(tiny_tokenizer)).save_pretrained(tmp_path / "model")
    tiny_tokenizer.save_pretrained(tmp_path / "model")
    plain = load_model(tmp_path / "model")
    placement = offload_map(plain.model, layout_of(plain.model).adapter.blocks, on_disk={1, 2})
    offloaded = load_model(tmp_path / "model", device_map=placement, offload_folder=tmp_path / "offload")
    assert any(p.device.type == "meta" for p in offloaded.model.parameters())  # really offloaded
    assert model_fingerprint(offloaded.model) == model_fingerprint(plain.model)  # read through accelerate
    prompts = ["The capital of France is", "the cat sat on the", "The capital of Japan is"]
    targets = [" Paris", " mat", " Tokyo"]
    for a, b in zip(
        diagnose_batch(plain.model, plain.tokenizer, prompts, targets),
        diagnose_batch(offloaded.model, offloaded.tokenizer, prompts, targets),
    ):
        assert (a.verdict, a.override, a.prescribed_layer, a.prediction.token_id) == (
            b.verdict,
            b.override,
            b.prescribed_layer,
            b.prediction.token_id,
        )
        assert [e.target_rank for e in a.logit_lens] == [e.target_rank for e in b.logit_lens]
        for x, y in zip(a.logit_lens, b.logit_lens):
            assert abs(x.target_logit - y.target_logit) <= 1e-5 and abs(x.competitor_logit - y.competitor_logit) <= 1e-5
        for x, y in zip(a.dla, b.dla):
            assert x.name == y.name and abs(x.target - y.target) <= 1e-5 and abs(x.competitor - y.competitor) <= 1e-5


@pytest.mark.slow
@pytest.mark.realmodel
def test_gemma_capitals_routing(gemma):
    """On Gemma 3 270M, "The capital of X is" -> " the" is routing for the seven reference countries, Japan correct."""
    loaded = gemma
    countries = ["France", "Germany", "China", "Russia", "England", "Italy", "Spain", "Japan"]
    facts = [Fact(f"The capital of {c} is", CAPITALS[c], relation="capital", subject=c) for c in countries]
    from surgery.census.run import diagnose_facts

    records = {r["subject"]: r for r in diagnose_facts(loaded.model, loaded.tokenizer, facts, DiagnosisConfig())}
    for c in countries[:-1]:
        assert records[c]["verdict"] == "routing" and records[c]["prediction"] == " the", c
    assert records["Japan"]["verdict"] == "correct"


def test_records_do_not_depend_on_the_batch_size(demo, demo_census, tmp_path):
    # the default batch (128: every demo fact in one pass) gives the records of batches of 4, field for field
    out, _ = demo_census
    run_census(demo.model, demo.tokenizer, demo_facts(), tmp_path, CensusConfig(), model_name="demo")
    assert CensusConfig().batch_size >= len(demo_facts()) > 4
    assert read_jsonl(tmp_path / CENSUS_FILE) == read_jsonl(out / CENSUS_FILE)
