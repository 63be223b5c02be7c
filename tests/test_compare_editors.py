"""``compare-editors`` (surgery/cli/compare_editors.py) and its library (surgery/edit/compare.py): every editor on the
same facts and base; the table agrees with each method's own report; failures are rows; bad input writes nothing."""

import json
from dataclasses import replace

import pytest
from conftest import DEMO_DIR, ROOT

from surgery.cli import main
from surgery.core.errors import InputError, NonFiniteError
from surgery.core.memory import peak_memory
from surgery.edit import training
from surgery.edit.compare import LISTS, compare_editors, method_config
from surgery.edit.editors import METHODS, MULTI_BLOCK
from surgery.edit.training import SurgeryConfig
from surgery.evaluation.facts import load_facts
from surgery.evaluation.memo import EvaluationMemo

DEMO_FACTS = ROOT / "assets" / "examples" / "demo_facts.json"
FILES = ("compare.md", "compare.json", "compare.png")


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def demo_facts(tmp_path_factory):
    path = tmp_path_factory.mktemp("facts") / "facts.json"
    path.write_text(json.dumps(json.loads(DEMO_FACTS.read_text())[:2]))  # France, Japan: both answered " the"
    return path


@pytest.fixture(scope="module")
def stats_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("keystats")


@pytest.fixture(scope="module")
def compared(tmp_path_factory, demo_facts, stats_dir):
    out = tmp_path_factory.mktemp("compare") / "out"
    args = ["compare-editors", "--model", DEMO_DIR, "--facts", demo_facts, "--stat-tokens", 500]
    code = main([str(a) for a in [*args, "--stats-dir", stats_dir, "--out", out]])
    return code, out


def test_writes_the_three_files_with_one_row_per_method(compared):
    code, out = compared
    summary = json.loads((out / "compare.json").read_text())
    assert code == (1 if any(not r["ok"] for r in summary["runs"]) else 0)
    assert all((out / name).is_file() for name in FILES)
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r["name"] for r in summary["runs"]] == list(METHODS)
    assert summary["base_model"] == "demo-model" and summary["facts"] == 2
    table = (out / "compare.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| **")]
    assert [row.split("|")[1].strip() for row in rows] == [f"**{m}**" for m in METHODS]
    assert sum(line.startswith("| base model |") for line in table.splitlines()) == 1
    for r in summary["runs"]:  # each method that succeeded has its own folder, as operate writes it but the model
        folder = out / r["name"]
        assert folder.is_dir() == r["ok"]
        if r["ok"]:
            assert sorted(p.name for p in folder.iterdir()) == ["README.md", "patch.safetensors", "report.json"]


def test_figures_agree_with_each_methods_report(compared):
    _, out = compared
    summary = json.loads((out / "compare.json").read_text())
    ok = [r for r in summary["runs"] if r["ok"]]
    assert ok, summary
    for r in ok:
        report = json.loads((out / r["name"] / "report.json").read_text())
        e = report["evaluation"]
        lists = {"facts": e["efficacy"], "paraphrase": e["paraphrase"], "relation": e["relation"]}
        lists |= {"general": e["general"], **{k: e["specificity"][k] for k in ("neighbourhood", "side_effects")}}
        assert set(lists) == set(LISTS)
        for name, counts in lists.items():
            assert r[f"{name}_after"] == counts["after"] and r[f"{name}_total"] == counts["total"], name
            assert r[f"{name}_first_token_after"] == counts["first_token"]["after"], name
            assert summary["base"][name] == counts["before"], name  # the base row: the same for every method
        assert f"{r['facts_after']}/{r['facts_total']}" == report["facts_fixed"]
        assert report["method"] == r["method"] == r["name"]
        assert (r["layer"], r["layer_reason"], r["steps"]) == (report["layer"], report["layer_reason"], report["steps"])
        assert r["wall_time_s"] == report["wall_time_s"]
        assert r["params_changed"] == report["weights"]["params_changed"] > 0
        assert r["delta_l2"] == report["weights"]["delta_l2"] > 0
        assert r["kl_unrelated"] == e["kl_unrelated"] and r["fluency_after"] == e["fluency"]["after"]
        assert r["perplexity_after"] == e["perplexity"]["after"]
        assert r["peak_memory"]["peak_mib"] >= r["peak_memory"]["start_mib"] > 0
        table = (out / "compare.md").read_text()
        row = next(line for line in table.splitlines() if line.startswith(f"| **{r['name']}** |"))
        assert f"| {r['facts_after']}/2 ({r['facts_first_token_after']}) |" in row
        assert f"| {r['delta_l2']:.3f} |" in row and f"{r['params_changed']:,} of" in row


def test_an_unknown_method_is_refused_and_nothing_is_written(capsys, tmp_path, demo_facts):
    out = tmp_path / "sub" / "out"
    args = ["compare-editors", "--model", DEMO_DIR, "--facts", demo_facts, "--out", out]
    code, stdout, err = run_cli(capsys, *args, "--methods", "wv,memitx")
    assert code == 2 and err == f"error: unknown method 'memitx': choose among {', '.join(METHODS)}\n"
    assert stdout == "" and not out.exists() and list(tmp_path.iterdir()) == []
    code, _, err = run_cli(capsys, *args, "--methods", "wv,wv")
    assert code == 2 and "named twice" in err and list(tmp_path.iterdir()) == []
    code, _, err = run_cli(capsys, *args, "--methods", "wv,rome", "--layers", "0,1")
    assert code == 2 and err == "error: --layers is for memit or alphaedit, and none of the methods is\n"
    code, _, err = run_cli(capsys, *args, "--methods", "memit", "--layers", "1,0")
    assert code == 2 and "ascending" in err and list(tmp_path.iterdir()) == []


def test_blank_facts_and_an_unknown_model_are_refused(capsys, tmp_path, demo_facts):
    blank = tmp_path / "blank.json"
    blank.write_text("[]")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "compare-editors", "--model", DEMO_DIR, "--facts", blank, "--out", out)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    code, _, err = run_cli(
        capsys, "compare-editors", "--model", tmp_path / "no-model", "--facts", demo_facts, "--out", out
    )
    assert code == 2 and "no such model folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank.json"]


def test_a_failing_method_is_a_row(capsys, tmp_path, demo_facts, stats_dir):
    """With --require-all, wv held to one tiny step cannot fix the facts: its row says so, ROME's is complete."""
    out = tmp_path / "out"
    args = ["compare-editors", "--model", DEMO_DIR, "--facts", demo_facts, "--stat-tokens", 500]
    args += ["--stats-dir", stats_dir, "--methods", "wv,rome", "--require-all", "--epochs", 1, "--lr", 1e-9]
    code, stdout, _ = run_cli(capsys, *args, "--out", out, "--json")
    summary = json.loads(stdout)
    wv, rome = summary["runs"]
    assert code == 1 and not wv["ok"] and wv["error"].startswith("not fixed within the budget")
    assert rome["ok"] and rome["facts_after"] == 2
    assert json.loads((out / "compare.json").read_text()) == summary
    assert not (out / "wv").exists() and (out / "rome" / "report.json").is_file()
    table = (out / "compare.md").read_text()
    assert "| **wv** | failed: not fixed within the budget" in table and "| **rome** | " in table


def test_a_diverging_editor_is_a_failed_run_and_the_base_is_evaluated_once(monkeypatch, demo):
    """In the library: a NonFiniteError of one editor is its row; the others run; the memo holds the base's
    figures, so a second comparison with it computes nothing on the base (its answers are the memo's)."""

    def diverge(*args, **kwargs):
        raise NonFiniteError("FT-L's loss became nan at step 3")

    facts = load_facts(DEMO_FACTS)[:2]
    monkeypatch.setattr(training, "edit_mlp_out", diverge)
    memo = EvaluationMemo(demo.model)
    c = compare_editors(demo.model, demo.tokenizer, facts, ["wv", "ft"], SurgeryConfig(), memo=memo)
    assert [r.ok for r in c.runs] == [True, False] and c.failed == ["ft"]
    assert c.runs[1].error == "FT-L's loss became nan at step 3"
    assert c.base["facts"] == 0 and c.runs[0].figures()["facts_after"] == 2
    kept = len(memo)
    assert kept > 0
    c2 = compare_editors(demo.model, demo.tokenizer, facts, ["wv"], SurgeryConfig(), memo=memo)
    assert len(memo) == kept and c2.runs[0].figures() | {"wall_time_s": 0} == c.runs[0].figures() | {"wall_time_s": 0}
    d = c.to_dict()
    assert d["runs"][1] == {
        "name": "ft",
        "method": "ft",
        "ok": False,
        "error": c.runs[1].error,
        "wall_time_s": c.runs[1].wall_time_s,
        "peak_memory": c.runs[1].memory.to_dict(),
    }
    assert "| **ft** | failed: FT-L's loss became nan at step 3 |" in c.to_markdown()


def test_layers_go_to_the_multi_block_editors_only():
    """``--layers`` (the papers' fixed layers) are MEMIT's and AlphaEdit's blocks; wv, ROME and FT-L keep
    ``--layer``; a comparison without a multi-block editor refuses them."""
    config = SurgeryConfig(layer=4)
    configs = {m: method_config(config, m, (1, 2, 3)) for m in METHODS}
    assert {m: c.layers for m, c in configs.items()} == {m: (1, 2, 3) if m in MULTI_BLOCK else None for m in METHODS}
    assert {m: c.layer for m, c in configs.items()} == {m: None if m in MULTI_BLOCK else 4 for m in METHODS}
    assert all(c.method == m for m, c in configs.items()) and configs["wv"].site == config.site
    assert method_config(config, "memit") == replace(config, method="memit")
    with pytest.raises(InputError, match="--layers is for memit or alphaedit"):
        compare_editors(None, None, [], ["wv", "rome"], layers=(1, 2))
    with pytest.raises(InputError, match="ascending"):
        compare_editors(None, None, [], ["memit"], layers=(2, 1))


def test_methods_are_checked(demo):
    with pytest.raises(InputError, match="unknown method 'memitx'"):
        compare_editors(demo.model, demo.tokenizer, [], ["memitx"])
    with pytest.raises(InputError, match="no method given"):
        compare_editors(demo.model, demo.tokenizer, [], [])


def test_peak_memory_sees_an_allocation():
    import torch

    with peak_memory() as small:
        pass
    with peak_memory() as big:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del x
    assert big.increase_mib > 40 > small.increase_mib
