"""The surgery commands end to end: sites, operate, verify, compare-sites, apply-patch (push: test_hub.py)."""

import json

import pytest
import torch
from conftest import DEMO_DIR, ROOT, make_tiny_model
from safetensors.torch import load_file

from surgery.arch import SITES, layout_of
from surgery.cli import build_parser, main
from surgery.cli.compare_sites import format_table
from surgery.edit.training import SurgeryConfig, operate
from surgery.evaluation.facts import load_facts
from surgery.io.loading import load_model

FAST = ["--lr", "0.03"]  # the tiny random model needs bigger steps than the documented default


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def facts_file(tmp_path_factory, tiny_panel):
    path = tmp_path_factory.mktemp("facts") / "facts.json"
    path.write_text(json.dumps([f.to_dict() for f in tiny_panel.facts]))
    return path


@pytest.fixture(scope="module")
def operated(tmp_path_factory, tiny_model_dir, facts_file, tiny_panel_file):
    out = tmp_path_factory.mktemp("cli") / "fixed"
    code = main(
        [
            "operate",
            "--model",
            str(tiny_model_dir),
            "--facts",
            str(facts_file),
            "--panels",
            str(tiny_panel_file),
            "--site",
            "wv",
            "--layer",
            "0",
            *FAST,
            "--out",
            str(out),
            "--json",
        ]
    )
    assert code == 0
    return out


def test_sites_json(capsys, tiny_model_dir, tiny_model):
    code, out, _ = run_cli(capsys, "sites", "--model", tiny_model_dir, "--layer", 1, "--json")
    layout = layout_of(tiny_model)
    assert code == 0 and json.loads(out) == {s: layout.site_size(tiny_model, s, 1) for s in SITES}
    code, out, _ = run_cli(capsys, "sites", "--model", tiny_model_dir, "--layer", 1)
    assert code == 0 and "1,024" in out and "value projection" in out


def test_operate_writes_a_verified_fix(capsys, operated, tiny_model_dir, tiny_panel_file, facts_file):
    report = json.loads((operated / "report.json").read_text())
    assert report["facts_fixed"] == "3/3" and report["site"] == "wv"
    assert report["layer_reason"] == "given" and report["layer"] == 0  # --layer auto: the demo model test below
    assert report["weights"]["qk_unchanged"] is True and report["weights"]["others_unchanged"] is True
    code, out, _ = run_cli(
        capsys,
        "verify",
        "--base",
        tiny_model_dir,
        "--corrected",
        operated,
        "--panels",
        tiny_panel_file,
        "--facts",
        facts_file,
    )
    assert code == 0 and out.rstrip().endswith("VERIFIED")
    code, out, _ = run_cli(
        capsys, "verify", "--base", tiny_model_dir, "--corrected", tiny_model_dir, "--panels", tiny_panel_file, "--json"
    )  # facts default to the panel's
    verdict = json.loads(out)
    assert code == 1 and verdict["verified"] is False and "2/3 edited facts not said" in verdict["reasons"][0]


def test_verify_fails_on_a_regression(capsys, tmp_path, operated, tiny_model_dir, tiny_panel_file, tiny_panel):
    """A panel probe the fix answers differently makes verify fail even though the facts are right."""
    from surgery.evaluation.scoring import answer
    from surgery.io.loading import load_model

    fixed = load_model(operated)
    prompts = [
        "the cat sat on the",
        "one two",
        "the sky is",
        "the sea is",
        "a big red dog and a small blue",
        "the dog sat on the",
        "three two",
        "the cat was in the",
        "one",
        "red",
    ]
    changed = [
        p
        for p in prompts
        if answer(fixed.model, fixed.tokenizer, p) != answer(load_model(tiny_model_dir).model, fixed.tokenizer, p)
    ]
    if not changed:
        pytest.skip("the tiny fix changed none of the candidate probes")
    base = load_model(tiny_model_dir)
    panel = tiny_panel.to_dict()
    panel["general"] = [{"prompt": changed[0], "target": answer(base.model, base.tokenizer, changed[0])}]
    path = tmp_path / "panel.json"
    path.write_text(json.dumps(panel))
    code, out, _ = run_cli(capsys, "verify", "--base", tiny_model_dir, "--corrected", operated, "--panels", path)
    assert code == 1 and "general probes broken: 1 of 1 said right before are wrong after (allowed 0" in out


def test_apply_patch_reproduces_the_fix_bitwise(capsys, tmp_path, operated, tiny_model_dir):
    code, out, _ = run_cli(
        capsys,
        "apply-patch",
        "--base",
        tiny_model_dir,
        "--patch",
        operated / "patch.safetensors",
        "--out",
        tmp_path / "rebuilt",
    )
    assert code == 0 and "written to" in out
    a, b = load_file(str(operated / "model.safetensors")), load_file(str(tmp_path / "rebuilt" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_compare_sites(capsys, tiny_model_dir, facts_file, tiny_panel_file):
    code, out, _ = run_cli(
        capsys,
        "compare-sites",
        "--model",
        tiny_model_dir,
        "--facts",
        facts_file,
        "--panels",
        tiny_panel_file,
        "--layer",
        "2",
        *FAST,
        "--json",
    )
    table = json.loads(out)
    assert code == 0 and table["layer"] == 2 and [r["site"] for r in table["sites"]] == list(SITES)
    assert all(r["ok"] and r["facts_after"] == 3 for r in table["sites"])
    assert table["sites"][0]["qk_unchanged"] is True
    lines = format_table(table["sites"]).splitlines()  # what the command prints without --json
    assert "params" in lines[0] and "ΔL2" in lines[0] and "time" in lines[0]
    assert [line.split()[0] for line in lines[1:]] == list(SITES)
    failed = format_table([{"site": "wv", "ok": False, "error": "not fixed"}, *table["sites"][1:]])
    assert [line.split()[:3] for line in failed.splitlines()[1:2]] == [["wv", "failed:", "not"]]


@pytest.fixture
def bad_files(tmp_path):
    files = {
        "empty": "",
        "malformed": '[{"prompt": "The capital',
        "no_target": '[{"prompt": "The capital of"}]',
        "empty_list": "[]",
    }
    for name, text in files.items():
        (tmp_path / f"{name}.json").write_text(text)
    (tmp_path / "latin1.json").write_bytes('[{"prompt": "Caf\xe9 is", "target": " Paris"}]'.encode("latin-1"))
    (tmp_path / "latin1.txt").write_bytes("Caf\xe9 au lait.\n\nMore text.".encode("latin-1"))
    (tmp_path / "folder.json").mkdir()
    return tmp_path


@pytest.mark.parametrize(
    "case, extra, message",
    [
        ("empty", [], "is empty"),
        ("malformed", [], "not valid JSON"),
        ("no_target", [], "has no 'target'"),
        ("empty_list", [], "is empty"),
        ("good", ["--site", "qk"], "unknown site 'qk'"),
        ("good", ["--layer", "7"], "layer 7 is out of range"),
        ("good", ["--layer", "top"], "--layer must be a block index"),
        ("good", ["--epochs", "0"], "epochs must be at least 1"),
        ("latin1", [], "cannot read facts file BAD/latin1.json: not UTF-8 text (invalid continuation byte"),
        ("folder", [], "folder BAD/folder.json holds no .jsonl facts files"),
        ("good", ["--unrelated", "BAD/latin1.txt"], "cannot read --unrelated file BAD/latin1.txt: not UTF-8 text"),
        ("good", ["--unrelated", "BAD/folder.json"], "cannot read --unrelated file BAD/folder.json: Is a directory"),
        ("good", ["--panels", "BAD/latin1.json"], "cannot read panel file BAD/latin1.json: not UTF-8 text"),
        ("good", ["--panels", "BAD/folder.json"], "cannot read panel file BAD/folder.json: Is a directory"),
    ],
)
def test_operate_bad_input(capsys, bad_files, tiny_model_dir, tiny_panel_file, facts_file, case, extra, message):
    facts = facts_file if case == "good" else bad_files / f"{case}.json"
    out = bad_files / "out"
    extra = [a.replace("BAD", str(bad_files)) for a in extra]
    message = message.replace("BAD", str(bad_files))
    code, stdout, err = run_cli(
        capsys,
        "operate",
        "--model",
        tiny_model_dir,
        "--facts",
        facts,
        "--panels",
        tiny_panel_file,
        "--out",
        out,
        *extra,
    )
    assert code == 2 and stdout == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not out.exists() and not [p for p in bad_files.iterdir() if p.name.startswith(".")]


def test_operate_on_an_overflowing_model(capsys, tmp_path, overflow_model_dir, facts_file, tiny_panel_file):
    """Finite weights whose forward pass overflows: one line before any training, nothing written."""
    out = tmp_path / "out"
    args = ["--facts", facts_file, "--panels", tiny_panel_file, "--out", out]
    code, stdout, err = run_cli(capsys, "operate", "--model", overflow_model_dir, *args)
    assert code == 2 and stdout == "" and err.count("\n") == 1 and "NaN or inf after L2" in err
    assert list(tmp_path.iterdir()) == []


def test_operate_that_diverges(capsys, tmp_path, tiny_model_dir, facts_file, tiny_panel_file):
    """A loss that becomes NaN during training: one line, exit 2, no output folder (nor a hidden partial one)."""
    out = tmp_path / "out"
    args = ["--facts", facts_file, "--panels", tiny_panel_file, "--layer", "1", "--lr", "1e30", "--out", out]
    code, stdout, err = run_cli(capsys, "operate", "--model", tiny_model_dir, *args)
    assert code == 2 and stdout == "" and "Traceback" not in err  # stderr: the progress line, then the error
    assert err.splitlines()[-1].startswith("error: training diverged: the loss became nan at step 1")
    assert list(tmp_path.iterdir()) == []


def test_operate_refuses_an_existing_out(capsys, tmp_path, tiny_model_dir, facts_file, tiny_panel_file):
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = run_cli(
        capsys, "operate", "--model", tiny_model_dir, "--facts", facts_file, "--panels", tiny_panel_file, "--out", out
    )
    assert code == 2 and "already exists; pass --overwrite" in err and list(out.iterdir()) == []


def test_operate_without_a_fitting_panel(capsys, tmp_path, tiny_model_dir, facts_file):
    """A custom-vocabulary GPT-2: no bundled panel is in its vocabulary, yet operate runs on the facts and the
    given unrelated text, and the report says which probes could not be scored (it used to refuse)."""
    text = tmp_path / "unrelated.txt"
    text.write_text("the cat sat on the mat . the dog was in the sea .\n\na big red dog and a small blue cat\n")
    code, _, err = run_cli(
        capsys,
        "operate",
        "--model",
        tiny_model_dir,
        "--facts",
        facts_file,
        "--unrelated",
        text,
        "--layer",
        "1",
        "--lr",
        "1e-2",
        "--kl-weight",
        "50",
        "--out",
        tmp_path / "out",
    )
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["facts_fixed"] == "3/3" and report["unavailable"]
    assert any(n.startswith("not scored: general") for n in report["notes"])


def test_apply_patch_for_another_base(capsys, tmp_path, operated, tiny_tokenizer):
    other = tmp_path / "other"
    make_tiny_model(len(tiny_tokenizer), seed=5).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    code, _, err = run_cli(
        capsys, "apply-patch", "--base", other, "--patch", operated / "patch.safetensors", "--out", tmp_path / "rebuilt"
    )
    assert code == 2 and "another base model" in err and not (tmp_path / "rebuilt").exists()
    code, _, err = run_cli(
        capsys, "apply-patch", "--base", other, "--patch", operated / "report.json", "--out", tmp_path / "rebuilt"
    )
    assert code == 2 and "not a readable safetensors" in err


def test_help_lists_the_surgery_commands():
    out = build_parser().format_help()
    for name in ("sites", "operate", "verify", "compare-sites", "apply-patch", "push"):
        assert name in out


# --------------------------------------------------------------------------------------------------
# The "done when" of the surgery issue, on the committed demo model.
# --------------------------------------------------------------------------------------------------

DEMO_FACTS = ROOT / "assets" / "examples" / "demo_facts.json"
FAILING = ["France", "Japan", "Germany", "China", "Russia", "England"]


@pytest.mark.slow
def test_demo_model_end_to_end(capsys, tmp_path):
    out = tmp_path / "fixed"
    code, stdout, _ = run_cli(
        capsys,
        "operate",
        "--model",
        DEMO_DIR,
        "--facts",
        DEMO_FACTS,
        "--site",
        "wv",
        "--layer",
        "auto",
        "--out",
        out,
        "--json",
    )
    assert code == 0
    r = json.loads(stdout)
    facts = {f["prompt"].split()[-2]: f for f in r["facts"]}
    assert all(not facts[c]["correct_before"] and facts[c]["correct_after"] for c in FAILING)
    assert all(facts[c]["correct_before"] and facts[c]["correct_after"] for c in ("Italy", "Spain"))
    assert r["facts_before"] == "2/8" and r["facts_fixed"] == "8/8"
    assert r["layer_reason"].startswith("auto:")
    for panel in ("general", "side_effects"):  # every probe answered as before
        before = [p["correct"] for p in r["panel_before"][panel]["results"]]
        assert [p["correct"] for p in r["panel_after"][panel]["results"]] == before, panel
    assert r["weights"]["qk_unchanged"] is True and r["weights"]["others_unchanged"] is True

    code, stdout, _ = run_cli(capsys, "verify", "--base", DEMO_DIR, "--corrected", out)
    assert code == 0 and stdout.rstrip().endswith("VERIFIED")
    code, stdout, _ = run_cli(capsys, "verify", "--base", DEMO_DIR, "--corrected", DEMO_DIR)
    assert code == 1 and "NOT VERIFIED:\n  - 6/8 edited facts not said" in stdout

    code, _, _ = run_cli(
        capsys, "apply-patch", "--base", DEMO_DIR, "--patch", out / "patch.safetensors", "--out", tmp_path / "rebuilt"
    )
    a, b = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "rebuilt" / "model.safetensors"))
    assert code == 0 and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    code, stdout, _ = run_cli(capsys, "compare-sites", "--model", DEMO_DIR, "--facts", DEMO_FACTS, "--json")
    table = json.loads(stdout)
    assert [s["site"] for s in table["sites"]] == list(SITES) and table["layer"] == r["layer"]
    assert all(s["ok"] and s["facts_after"] == 8 for s in table["sites"]), table
    assert code == 0


def test_operate_with_rome_writes_what_wv_writes(capsys, tmp_path, operated):
    """``--method rome`` on the demo model: the same output files as a wv repair, the report says the method; the
    key statistics are cached under --stats-dir."""
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps(json.loads(DEMO_FACTS.read_text())[:2]))  # France, Japan: both answered " the"
    out, stats = tmp_path / "fixed", tmp_path / "keystats"
    args = ["operate", "--model", DEMO_DIR, "--facts", facts, "--method", "rome", "--stat-tokens", 500]
    code, stdout, _ = run_cli(capsys, *args, "--stats-dir", stats, "--out", out, "--json")
    assert code == 0
    report = json.loads(stdout)
    assert report["method"] == "rome" and report["site"] == "mlp_out" and report["layer_reason"].startswith("auto:")
    assert report["facts_fixed"] == "2/2" and report["weights"]["others_unchanged"] is True
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in operated.iterdir())
    assert set(load_file(out / "patch.safetensors")) == {f"transformer.h.{report['layer']}.mlp.c_proj.weight"}
    assert len(list(stats.iterdir())) == 1
    card = (out / "README.md").read_text()
    assert "Method: ROME (Meng et al. 2022)" in card and "- method-rome" in card

    code, stdout, err = run_cli(capsys, *args, "--site", "mlp", "--out", tmp_path / "other")
    assert code == 2 and err == "error: --site mlp is for --method wv; --method rome edits the MLP output projection\n"


def test_operate_with_memit_on_the_papers_fixed_layers(capsys, tmp_path):
    """``--method memit --layers 1,2`` on the demo model: one patch holding both blocks' projections; the report
    and the card name the blocks; ``--layers`` with a one-block method is refused before loading anything."""
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps(json.loads(DEMO_FACTS.read_text())[:2]))
    out = tmp_path / "fixed"
    args = ["operate", "--model", DEMO_DIR, "--facts", facts, "--stat-tokens", 300, "--stats-dir", tmp_path / "ks"]
    code, stdout, _ = run_cli(capsys, *args, "--method", "memit", "--layers", "1,2", "--out", out, "--json")
    assert code == 0
    report = json.loads(stdout)
    assert report["method"] == "memit" and report["layer"] == 2 and report["config"]["layers"] == [1, 2]
    assert report["layer_reason"] == "given: blocks 1, 2 (--layers)" and report["weights"]["others_unchanged"]
    names = {f"transformer.h.{i}.mlp.c_proj.weight" for i in (1, 2)}
    assert set(load_file(out / "patch.safetensors")) == names
    card = (out / "README.md").read_text()
    assert "blocks 1, 2" in card and "Method: MEMIT (Meng et al. 2023) on the blocks' MLP output projections" in card

    code, _, err = run_cli(capsys, *args, "--method", "rome", "--layers", "1,2", "--out", tmp_path / "other")
    assert code == 2 and err == "error: --layers is for --method memit or alphaedit; --method rome edits one block\n"


def test_operate_with_memit_on_the_traced_blocks(capsys, tmp_path):
    """``--layers trace``: the blocks come from causal tracing of the facts' subjects (on the 4-block demo model,
    a span of 5 is all 4) and the report says so and keeps the trace (MEMIT does not fix these two there: the
    CLI says so and names the blocks, the report comes from the library); facts naming no subject are refused in
    one line."""
    chosen = json.loads(DEMO_FACTS.read_text())[:2]
    named = [f | {"subject": f["prompt"].split(" of ")[1][:-3]} for f in chosen]  # "France", "Japan"
    facts, bare = tmp_path / "facts.json", tmp_path / "bare.json"
    facts.write_text(json.dumps(named))
    bare.write_text(json.dumps(chosen))
    args = ["operate", "--model", DEMO_DIR, "--stat-tokens", 300, "--stats-dir", tmp_path / "ks", "--method", "memit"]
    code, _, err = run_cli(capsys, *args, "--facts", facts, "--layers", "trace", "--out", tmp_path / "a")
    assert code == 2 and "at site mlp_out of blocks 0, 1, 2, 3 with memit" in err and not (tmp_path / "a").exists()
    code, _, err = run_cli(capsys, *args, "--facts", bare, "--layers", "trace", "--out", tmp_path / "b")
    assert code == 2 and err.startswith("error: causal tracing needs facts that name their subject")

    g = load_model(str(DEMO_DIR))
    config = SurgeryConfig(method="memit", layers="trace", stat_tokens=300)
    result = operate(g.model, g.tokenizer, load_facts(facts), config, require_all=False, cache_dir=tmp_path / "ks")
    report = result.report.to_dict()
    trace = report["config"]["storage_trace"]
    assert trace["blocks"] == report["config"]["layers"] == [0, 1, 2, 3] == list(result.edit.layers)
    assert trace["facts"] == 2 and len(trace["effects"]) == 1 and trace["drop"] != 0
    assert report["layer"] == 3 and report["layer_reason"].startswith("blocks 0, 1, 2, 3: causal tracing of 2 fact")


def test_reproduce_on_the_demo_model_writes_its_report_and_refuses_an_existing_folder(capsys, tmp_path):
    """``reproduce`` end to end (one site, to stay fast): the diagnosis, the repair and both plots are written, the
    JSON report agrees with the printed table, and a second run into the same folder is refused, the folder kept."""
    out = tmp_path / "repro"
    code, printed, _ = run_cli(capsys, "reproduce", "--model", DEMO_DIR, "--sites", "wv", "--out", out)
    assert code == 0
    written = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert written == ["heads.png", "lens.png", "report.json", "report.md"]
    report = json.loads((out / "report.json").read_text())
    (wv,) = report["sites"]
    assert wv["site"] == "wv" and wv["ok"]
    assert report["layer"] == wv["report"]["layer"]
    assert f"| wv | {wv['report']['facts_fixed']} |" in printed
    assert any(d["verdict"] == "routing" for d in report["diagnoses"])
    before = (out / "report.json").read_bytes()
    code, _, err = run_cli(capsys, "reproduce", "--model", DEMO_DIR, "--sites", "wv", "--out", out)
    assert code != 0 and "exists" in err and "Traceback" not in err
    assert (out / "report.json").read_bytes() == before
