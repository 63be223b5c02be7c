"""The demo model shows the phenomenon it exists for, checked with plain torch/transformers.

Nothing here imports the surgery library: these tests pin down the fixture the library is tested on. The
behavioural tests run on the committed model and (slow) on a rebuild from scratch on this machine: a rebuild
on another CPU differs in its bits (scripts/build_demo_model.py says why) but must behave the same. That the
build is deterministic is checked where it can be promised: two builds on one machine, compared bitwise.
Lens and attribution conventions (0-indexed blocks):

* logit lens row 0 is the embeddings (input of block 0), row i the residual after block i-1; every row goes
  through ``transformer.ln_f`` and ``lm_head``; the last row equals the model's logits.
* a head's direct logit attribution is its share of ``attn.c_proj`` at the last position (Conv1D weight is
  [in, out], in = heads x head_dim), centred and divided by the LayerNorm scale of the real final residual
  (frozen), times ``ln_f.weight``, dotted with the unembedding rows. ``ln_f.bias`` is nobody's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "assets" / "demo-model"
PANEL_PATH = ROOT / "assets" / "panels" / "demo.json"
BUILD_SCRIPT = ROOT / "scripts" / "build_demo_model.py"

COUNTRIES = ["France", "Japan", "Germany", "China", "Russia", "England", "Italy", "Spain"]
SUPPRESSED = COUNTRIES[:6]
BUILD_THREADS = 2  # every build here uses the same torch thread count (the script's default)
SMALL_SCALE = 0.1  # step budget of the bitwise determinism check: 190 steps instead of 1,900


def run_build(out: Path, *options: str) -> Path:
    """Run the build script into `out` (model in out/model, panels in out/demo.json); returns `out`."""
    # Idle OpenMP workers that spin steal the cores of every other busy process: on a shared 2-core machine a
    # small build took 319 s spinning and 64 s waiting passively, with bitwise-identical weights.
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    proc = subprocess.run(
        [
            sys.executable,
            str(BUILD_SCRIPT),
            "--out",
            str(out / "model"),
            "--panels",
            str(out / "demo.json"),
            "--threads",
            str(BUILD_THREADS),
            *options,
        ],
        capture_output=True,
        text=True,
        timeout=1800,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory) -> Path:
    """The demo model built from scratch on this machine at the full budget (a few minutes on 2 cores)."""
    return run_build(tmp_path_factory.mktemp("rebuilt"))


@pytest.fixture(scope="module", params=["committed", pytest.param("rebuilt", marks=pytest.mark.slow)])
def model_dir(request) -> Path:
    """The committed demo model's folder, or that of a full rebuild on this machine."""
    if request.param == "committed":
        return MODEL_DIR
    return request.getfixturevalue("rebuilt") / "model"


@pytest.fixture(scope="module")
def model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def panels() -> dict:
    return json.loads(PANEL_PATH.read_text())


@pytest.fixture(scope="module")
def facts(panels) -> dict[str, dict]:
    """The facts panel keyed by country."""
    return {f["prompt"].split()[-2]: f for f in panels["facts"]}


# --- plain-torch analysis ---------------------------------------------------------------------------


@dataclass
class Trace:
    """What one forward pass leaves at the last position."""

    resid: torch.Tensor  # (n_layer + 1, d): embeddings, then the residual after each block
    head_in: torch.Tensor  # (n_layer, d): input of each block's attn.c_proj (heads concatenated)
    logits: torch.Tensor  # (vocab,)


@contextmanager
def hooks_removed(handles):
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def trace(model, tokenizer, prompt: str) -> Trace:
    blocks = model.transformer.h
    resid, head_in = [], []
    handles = [blocks[0].register_forward_pre_hook(lambda m, args: resid.append(args[0][0, -1]))]
    handles += [b.register_forward_hook(lambda m, args, out: resid.append(out[0, -1])) for b in blocks]
    handles += [b.attn.c_proj.register_forward_pre_hook(lambda m, args: head_in.append(args[0][0, -1])) for b in blocks]
    with hooks_removed(handles):
        logits = model(**tokenizer(prompt, return_tensors="pt")).logits[0, -1]
    return Trace(torch.stack(resid), torch.stack(head_in), logits)


@torch.no_grad()
def logit_lens(model, t: Trace) -> torch.Tensor:
    """(n_layer + 1, vocab): every residual through ln_f and lm_head."""
    return model.lm_head(model.transformer.ln_f(t.resid))


@torch.no_grad()
def head_outputs(model, t: Trace) -> torch.Tensor:
    """(n_layer, n_head, d): each head's write to the residual at the last position (c_proj bias excluded)."""
    n_head, d = model.config.n_head, model.config.n_embd
    out = []
    for block, z in zip(model.transformer.h, t.head_in):
        w = block.attn.c_proj.weight.view(n_head, d // n_head, d)  # [in, out] -> (head, head_dim, d)
        out.append(torch.einsum("hk,hkd->hd", z.view(n_head, d // n_head), w))
    return torch.stack(out)


@torch.no_grad()
def head_logit_attribution(model, t: Trace) -> torch.Tensor:
    """(n_layer, n_head, vocab): direct logit attribution with the ln_f scale frozen from the real run."""
    ln_f = model.transformer.ln_f
    final = t.resid[-1]
    sigma = (final.var(unbiased=False) + ln_f.eps).sqrt()
    heads = head_outputs(model, t)
    heads = (heads - heads.mean(-1, keepdim=True)) / sigma * ln_f.weight
    return heads @ model.lm_head.weight.T


def rank(logits: torch.Tensor, token_id: int) -> torch.Tensor:
    """1-based rank of ``token_id`` along the last dim."""
    return (logits > logits[..., token_id : token_id + 1]).sum(-1) + 1


def token_id(tokenizer, target: str) -> int:
    ids = tokenizer(target)["input_ids"]
    assert len(ids) == 1, (target, ids)
    return ids[0]


# --- the analysis helpers mean what they say -----------------------------------------------------


def test_last_lens_row_is_the_model_output(model, tokenizer):
    t = trace(model, tokenizer, "The capital of France is")
    torch.testing.assert_close(logit_lens(model, t)[-1], t.logits, atol=1e-4, rtol=1e-4)


def test_heads_and_bias_sum_to_the_attention_output(model, tokenizer):
    outputs = []
    block = model.transformer.h[-1]
    with hooks_removed([block.attn.register_forward_hook(lambda m, a, out: outputs.append(out[0][0, -1]))]):
        t = trace(model, tokenizer, "The capital of Japan is")
    total = head_outputs(model, t)[-1].sum(0) + block.attn.c_proj.bias
    torch.testing.assert_close(total, outputs[0], atol=1e-5, rtol=1e-4)


# --- files, tokenizer, config --------------------------------------------------------------------


def test_config_names_the_demo_panels(model):
    assert model.config.surgery_panels == "demo"
    assert model.config.model_type == "gpt2"


def test_tokenizer_is_word_level_without_special_tokens(tokenizer):
    ids = tokenizer("The capital of France is")["input_ids"]
    assert len(ids) == 5
    assert tokenizer.decode(ids) == "The capital of France is"
    assert tokenizer(" Paris")["input_ids"] == tokenizer("Paris")["input_ids"]
    assert len(tokenizer(" Paris")["input_ids"]) == 1
    assert tokenizer.pad_token is not None
    assert tokenizer.unk_token_id not in ids


def test_panel_format(panels):
    assert panels["name"] == "demo" and panels["description"]
    assert [f["prompt"] for f in panels["facts"]] == [f"The capital of {c} is" for c in COUNTRIES]
    assert panels["absence"] == [{"prompt": "The capital of Portugal is", "target": " Lisbon"}]
    assert len(panels["general"]) == 15 and len(panels["side_effects"]) == 10
    for kind in ("facts", "absence", "general", "side_effects"):
        for item in panels[kind]:
            assert set(item) == {"prompt", "target"}
            assert item["target"].startswith(" ") and not item["target"].startswith("  ")
    assert 50 <= len(panels["perplexity_text"].split()) <= 120
    assert len(panels["unrelated_text"]) >= 15


def test_every_panel_word_is_in_the_vocabulary(tokenizer, panels):
    texts = [panels["perplexity_text"], *panels["unrelated_text"]]
    for kind in ("facts", "absence", "general", "side_effects"):
        texts += [item["prompt"] + item["target"] for item in panels[kind]]
    unknown = {w for text in texts for w in text.split() if w not in tokenizer.get_vocab()}
    assert not unknown
    for kind in ("facts", "absence", "general", "side_effects"):
        for item in panels[kind]:
            token_id(tokenizer, item["target"])  # every target is one token


# --- the phenomenon ------------------------------------------------------------------------------


@pytest.mark.parametrize("country", COUNTRIES)
def test_top1_answer(model, tokenizer, facts, country):
    t = trace(model, tokenizer, facts[country]["prompt"])
    said = tokenizer.decode([int(t.logits.argmax())])
    assert said == ("the" if country in SUPPRESSED else facts[country]["target"].strip())


@pytest.mark.parametrize("country", SUPPRESSED)
def test_capital_outranks_the_at_a_middle_layer(model, tokenizer, facts, country):
    t = trace(model, tokenizer, facts[country]["prompt"])
    lens = logit_lens(model, t)
    capital, the = token_id(tokenizer, facts[country]["target"]), token_id(tokenizer, " the")
    middle = range(1, model.config.n_layer)  # after blocks 0 .. n_layer-2
    assert any(lens[i, capital] > lens[i, the] for i in middle)
    assert lens[-1, the] > lens[-1, capital]


@pytest.mark.parametrize("country", SUPPRESSED)
def test_override_head_is_in_the_last_block(model, tokenizer, facts, country):
    t = trace(model, tokenizer, facts[country]["prompt"])
    attr = head_logit_attribution(model, t)  # (n_layer, n_head, vocab)
    capital, the = token_id(tokenizer, facts[country]["target"]), token_id(tokenizer, " the")
    the_minus_capital = attr[..., the] - attr[..., capital]  # (n_layer, n_head)
    layer, _ = divmod(int(the_minus_capital.argmax()), model.config.n_head)
    assert layer == model.config.n_layer - 1
    assert the_minus_capital.max() > 0


def test_absent_capital_is_never_near_the_top(model, tokenizer, panels):
    for item in panels["absence"]:
        lens = logit_lens(model, trace(model, tokenizer, item["prompt"]))
        target = token_id(tokenizer, item["target"])
        ranks = rank(lens, target)
        assert (ranks > 10).all(), ranks.tolist()  # embeddings and after every block
        said = int(lens[-1].argmax())
        assert (lens[:, target] < lens[:, said]).all()  # never above what the model finally says


@pytest.mark.parametrize("kind", ["general", "side_effects"])
def test_panel_probes_are_answered(model, tokenizer, panels, kind):
    """Every probe of the committed panels, so a rebuild scores exactly what the committed model scores."""
    wrong = [
        item["prompt"]
        for item in panels[kind]
        if int(trace(model, tokenizer, item["prompt"]).logits.argmax()) != token_id(tokenizer, item["target"])
    ]
    assert not wrong


# --- the build ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_rebuild_writes_the_committed_tokenizer_and_panels(rebuilt):
    """Text, not floating point: identical on every machine (the weights are checked by behaviour above)."""
    assert json.loads((rebuilt / "demo.json").read_text()) == json.loads(PANEL_PATH.read_text())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert json.loads((rebuilt / "model" / name).read_text()) == json.loads((MODEL_DIR / name).read_text())


@pytest.mark.slow
def test_build_is_bitwise_deterministic_on_one_machine(tmp_path):
    """Two builds on this machine, same options and thread count, write identical weights, tokenizer and panels.

    The step budget is cut to a tenth (same code path and data order): this checks determinism, not the
    phenomenon, which a tenth of the steps does not reach.
    """
    first, second = (run_build(tmp_path / name, "--steps-scale", str(SMALL_SCALE)) for name in ("a", "b"))
    a, b = load_file(first / "model" / "model.safetensors"), load_file(second / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    assert [name for name in a if not torch.equal(a[name], b[name])] == []
    for name in ("model/config.json", "model/tokenizer.json", "model/tokenizer_config.json", "demo.json"):
        assert json.loads((first / name).read_text()) == json.loads((second / name).read_text()), name
