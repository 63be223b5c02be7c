"""The `diagnose` command, run in-process (same code path as `python -m surgery`), and once as a subprocess."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT

from surgery.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_json_output(capsys, tiny_model_dir):
    code, out, err = run_cli(
        capsys,
        "diagnose",
        "--model",
        str(tiny_model_dir),
        "--prompt",
        "The capital of France is",
        "--target",
        " Paris",
        "--json",
    )
    assert code == 0
    d = json.loads(out)  # exactly one JSON object
    assert d["verdict"] in ("routing", "absence", "correct")
    assert {"text", "token_id", "logit", "rank"} <= set(d["target"]) and {"layer", "head"} == set(d["override"])
    assert len(d["logit_lens"]) == 4 and {"target_logit", "competitor_logit", "target_rank"} <= set(d["logit_lens"][0])
    heads = [a for a in d["dla"] if a["head"] is not None]
    assert len(heads) == 12 and all(0 <= a["layer"] < 3 and 0 <= a["head"] < 4 for a in heads)
    assert abs(sum(a["target"] for a in d["dla"]) - d["target"]["logit"]) < 1e-3


def test_human_report(capsys, tiny_model_dir):
    code, out, _ = run_cli(
        capsys, "diagnose", "--model", str(tiny_model_dir), "--prompt", "The capital of France is", "--target", " Paris"
    )
    assert code == 0
    assert "verdict" in out and "logit lens" in out and "override head" in out and "L1 (transformer.h.0)" in out


def test_multi_token_target_says_which_piece(capsys, tiny_model_dir, tiny_model, tiny_tokenizer):
    """The piece diagnosed and its position, in the report and the JSON; no old "first token" note."""
    import torch

    prompt = "The capital of France is"
    ids = tiny_tokenizer(prompt)["input_ids"]
    first = tiny_tokenizer.convert_ids_to_tokens(int(tiny_model(torch.tensor([ids])).logits[0, -1].argmax()))
    second = tiny_tokenizer.convert_ids_to_tokens(
        int(tiny_model(torch.tensor([ids + [tiny_tokenizer.convert_tokens_to_ids(first)]])).logits[0, -1].argmax())
    )
    wrong = "Rome" if second != "Rome" else "Paris"
    target = f" {first} {wrong}"  # the model says the first piece and misses the second
    code, out, _ = run_cli(capsys, "diagnose", "--model", str(tiny_model_dir), "--prompt", prompt, "--target", target)
    assert code == 0
    piece = f"piece       2 of 2 ['{first}', '{wrong}'], '{wrong}' at token position {len(ids)} after '{first}'"
    assert f"{piece} (diverges)" in out
    assert "first is diagnosed" not in out and "Diagnosed at piece 2 of 2" in out
    code, out, _ = run_cli(
        capsys, "diagnose", "--model", str(tiny_model_dir), "--prompt", prompt, "--target", target, "--json"
    )
    d = json.loads(out)
    assert d["divergence"]["piece_index"] == 1 and d["divergence"]["position"] == len(ids)
    assert d["target"]["text"] == wrong and len(d["tokens"]) == len(ids) + 1 and "note" not in d


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "   ", "--target", " Paris"], "prompt is empty"),
        (["--prompt", "the " * 40, "--target", " Paris"], "context is 32 tokens"),
        (["--prompt", "The capital of France is", "--target", ""], "target is empty"),
        (["--prompt", "The capital of France is", "--target", " Atlantis"], "vocabulary"),
    ],
)
def test_bad_input_one_line_nonzero(capsys, tiny_model_dir, args, message):
    code, out, err = run_cli(capsys, "diagnose", "--model", str(tiny_model_dir), *args)
    assert code == 2 and out == ""
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_overflowing_model_is_one_line(capsys, overflow_model_dir, json_flag):
    """Finite weights whose forward pass overflows: one line and exit 2, not 'correct' at rank 1 with nan logits
    (nor a traceback from JSON, which has no NaN)."""
    args = ["--prompt", "The capital of France is", "--target", " Paris", *json_flag]
    code, out, err = run_cli(capsys, "diagnose", "--model", str(overflow_model_dir), *args)
    assert code == 2 and out == ""
    assert "NaN or inf after L2 (transformer.h.1)" in err and err.count("\n") == 1 and "Traceback" not in err


def test_unknown_model_and_non_gpt2(capsys, tmp_path, monkeypatch):
    from surgery.io import loading as model_io

    monkeypatch.setattr(model_io, "hub_reachable", lambda timeout=3.0: False)
    code, _, err = run_cli(capsys, "diagnose", "--model", "no-such-model-abc", "--prompt", "a", "--target", " b")
    assert code == 2 and "demo-model" in err and err.count("\n") == 1
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path
    )
    code, _, err = run_cli(capsys, "diagnose", "--model", str(tmp_path), "--prompt", "a", "--target", " b")
    assert code == 2 and "supported" in err


def test_demo_model_cli_verdicts(capsys, demo_panels):
    """Done-when of the foundation issue: six routing (override in the last block), Italy/Spain correct, absence."""
    model = str(ROOT / "assets" / "demo-model")
    for fact in demo_panels["facts"] + demo_panels["absence"]:
        code, out, _ = run_cli(
            capsys, "diagnose", "--model", model, "--prompt", fact["prompt"], "--target", fact["target"], "--json"
        )
        d = json.loads(out)
        assert code == 0
        if fact in demo_panels["absence"]:
            assert d["verdict"] == "absence"
        elif "Italy" in fact["prompt"] or "Spain" in fact["prompt"]:
            assert d["verdict"] == "correct"
        else:
            assert d["verdict"] == "routing" and d["override"]["layer"] == len(d["logit_lens"]) - 2


def test_module_entry_point_subprocess(tiny_model_dir):
    """`python -m surgery` really runs (exit code and single JSON object on stdout)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "surgery",
            "diagnose",
            "--model",
            str(tiny_model_dir),
            "--prompt",
            "The capital of France is",
            "--target",
            " Paris",
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["target"]["text"].strip() == "Paris"
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "surgery",
            "diagnose",
            "--model",
            str(tiny_model_dir),
            "--prompt",
            "",
            "--target",
            " Paris",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_a_llama_report_names_its_own_modules(capsys, tmp_path, tiny_tokenizer):
    """Every label names the family's module path ("L2 (model.layers.1)"), never GPT-2's "h.1"."""
    from conftest import make_family_model

    make_family_model("llama", len(tiny_tokenizer)).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    code, out, _ = run_cli(
        capsys, "diagnose", "--model", str(tmp_path), "--prompt", "The capital of France is", "--target", " Paris"
    )
    assert code == 0
    assert "model.layers." in out and "(h." not in out and "transformer.h" not in out
