import json

import pytest
import torch

from conftest import count_hooks
from bench.models import IdTokenizer  # space-separated token ids, for random full-size models
from surgery.diagnosis import (
    DiagnosisConfig,
    capture_last_position,
    classify,
    find_override,
    diagnose,
    diagnose_batch,
    prescribe_layer,
)
from surgery.errors import InputError
from surgery.arch import layout_of

PROMPT = "The capital of France is"


def _sum(d, which):
    return sum(getattr(a, which) for a in d.dla)


def test_attributions_sum_to_logits_tiny(tiny_model, tiny_tokenizer):
    d = diagnose(tiny_model, tiny_tokenizer, PROMPT, " Paris")
    logits = tiny_model(torch.tensor([tiny_tokenizer(PROMPT)["input_ids"]])).logits[0, -1]
    assert _sum(d, "target") == pytest.approx(float(logits[d.target.token_id]), abs=1e-4)
    assert _sum(d, "competitor") == pytest.approx(float(logits[d.competitor.token_id]), abs=1e-4)
    assert d.prediction.token_id == int(logits.argmax())


@pytest.mark.slow
def test_attributions_sum_to_logits_full_size(gpt2_small_random):
    ids = list(range(100, 140))  # 40 tokens
    tok = IdTokenizer()
    d = diagnose(gpt2_small_random, tok, " ".join(map(str, ids)), " 6342")
    logits = gpt2_small_random(torch.tensor([ids])).logits[0, -1]
    assert abs(_sum(d, "target") - float(logits[6342])) < 1e-3
    assert abs(_sum(d, "competitor") - float(logits[d.competitor.token_id])) < 1e-3
    assert len(d.dla) == 1 + 12 * (12 + 2) + 1


def test_components_and_names(tiny_model, tiny_tokenizer):
    d = diagnose(tiny_model, tiny_tokenizer, PROMPT, " Paris")
    layout = layout_of(tiny_model)
    heads = [a for a in d.dla if a.head is not None]
    assert len(heads) == layout.n_layer * layout.n_head
    assert d.dla[0].name == "embed" and d.dla[0].layer is None
    assert d.dla[-1].name == "ln_f.bias" and d.dla[-1].layer is None
    assert {a.name for a in d.dla if a.layer == 1 and a.head is None} == {"h.1.attn.bias", "h.1.mlp"}
    assert len(d.logit_lens) == layout.n_layer + 1


def test_head_attribution_independent_recompute(tiny_model, tiny_tokenizer):
    """Recompute each head's direct effect from a separately captured c_proj input, W_O rows and frozen ln_f."""
    layout = layout_of(tiny_model)
    ids = torch.tensor([tiny_tokenizer(PROMPT)["input_ids"]])
    d = diagnose(tiny_model, tiny_tokenizer, PROMPT, " Paris")
    zs, final = {}, {}
    handles = [tiny_model.transformer.h[l].attn.c_proj.register_forward_pre_hook(
        lambda m, a, l=l: zs.__setitem__(l, a[0][0, -1].clone())) for l in range(layout.n_layer)]
    handles.append(tiny_model.transformer.ln_f.register_forward_pre_hook(lambda m, a: final.__setitem__("r", a[0][0, -1].clone())))
    tiny_model(ids)
    for h in handles:
        h.remove()
    ln = tiny_model.transformer.ln_f
    r = final["r"]
    sigma = torch.sqrt(r.var(unbiased=False) + ln.eps)
    u = tiny_model.lm_head.weight[d.target.token_id]
    for a in d.dla:
        if a.head is None:
            continue
        dh = layout.d_head
        w = tiny_model.transformer.h[a.layer].attn.c_proj.weight[a.head * dh:(a.head + 1) * dh]  # rows of head
        vec = zs[a.layer][a.head * dh:(a.head + 1) * dh] @ w
        expected = float(((vec - vec.mean()) / sigma * ln.weight) @ u)
        assert a.target == pytest.approx(expected, abs=1e-5)


def test_lens_last_layer_is_the_output(tiny_model, tiny_tokenizer):
    d = diagnose(tiny_model, tiny_tokenizer, PROMPT, " Paris")
    logits = tiny_model(torch.tensor([tiny_tokenizer(PROMPT)["input_ids"]])).logits[0, -1]
    last = d.logit_lens[-1]
    assert last.target_logit == pytest.approx(float(logits[d.target.token_id]), abs=1e-5)
    assert last.target_rank == int((logits > logits[d.target.token_id]).sum()) + 1 == d.target.rank


def test_competitor_default_and_explicit(tiny_model, tiny_tokenizer):
    d = diagnose(tiny_model, tiny_tokenizer, PROMPT, " Paris")
    if d.target.rank == 1:
        assert d.competitor.rank == 2
    else:
        assert d.competitor.token_id == d.prediction.token_id
    d2 = diagnose(tiny_model, tiny_tokenizer, PROMPT, " Paris", competitor=" the")
    assert d2.competitor.token_id == tiny_tokenizer(" the", add_special_tokens=False)["input_ids"][0]
    with pytest.raises(InputError, match="same token"):
        diagnose(tiny_model, tiny_tokenizer, PROMPT, " Paris", competitor="Paris")


def test_batch_equals_one_at_a_time(tiny_model, tiny_tokenizer):
    prompts = [PROMPT, "The cat sat on the", "one", "The capital of Italy is the big city of"]
    targets = [" Paris", " mat", " two", " Rome"]
    batch = diagnose_batch(tiny_model, tiny_tokenizer, prompts, targets, batch_size=3)
    for p, t, b in zip(prompts, targets, batch):
        one = diagnose(tiny_model, tiny_tokenizer, p, t)
        assert b.verdict == one.verdict and b.override == one.override and b.competitor.token_id == one.competitor.token_id
        for x, y in zip(b.dla, one.dla):
            assert x.target == pytest.approx(y.target, abs=1e-4)


def test_multi_token_target_uses_first(tiny_model, tiny_tokenizer):
    d = diagnose(tiny_model, tiny_tokenizer, PROMPT, " Paris city")
    assert d.multi_token_target and d.target.text.strip() == "Paris"
    assert "first token" in d.to_dict()["note"]


def test_to_dict_is_json(tiny_model, tiny_tokenizer):
    d = diagnose(tiny_model, tiny_tokenizer, PROMPT, " Paris").to_dict()
    json.dumps(d, allow_nan=False)
    for key in ("prediction", "target", "competitor", "verdict", "logit_lens", "dla", "override", "prescribed_layer"):
        assert key in d
    assert set(d["target"]) >= {"text", "token_id", "logit", "rank"}
    assert set(d["dla"][1]) == {"name", "layer", "head", "target", "competitor"}


def test_classify_rules():
    # 9 residuals: embed, after blocks 0..7 (L = 8); the output is the last entry. Half-way: blocks 4, 5, 6 count.
    cfg = DiagnosisConfig(routing_rank=3, routing_from=0.5)
    assert cfg.routing_start(8) == 4
    assert classify(torch.tensor([1, 1, 1, 1, 9, 9, 3, 9, 30]), cfg) == "routing"  # top 3 after block 5
    assert classify(torch.tensor([1, 1, 1, 1, 2, 9, 9, 9, 30]), cfg) == "absence"  # only before block 4: noise
    assert classify(torch.tensor([9, 9, 9, 9, 9, 9, 9, 9, 2]), cfg) == "absence"  # the output does not count
    assert classify(torch.tensor([9, 9, 9, 9, 9, 9, 9, 9, 1]), cfg) == "correct"
    assert classify(torch.tensor([9, 9, 9, 9, 9, 9, 9, 9, 30]), DiagnosisConfig(routing_rank=9)) == "routing"
    # At least the block before the last counts, however shallow the model
    assert DiagnosisConfig(routing_from=0.9).routing_start(4) == 2
    assert classify(torch.tensor([50, 50, 50, 1, 30]), DiagnosisConfig(routing_from=0.9)) == "routing"


def test_prescribe_layer_rule():
    heads = torch.zeros(4, 2, 2)
    heads[1, 0] = torch.tensor([3.0, 0.0])  # block 1 writes target
    heads[3, 1] = torch.tensor([9.0, 0.0])  # block 3 writes more, but it is at/after the override
    attrs = {"heads": heads, "attn_bias": torch.zeros(4, 2), "mlp": torch.zeros(4, 2)}
    assert prescribe_layer(attrs, override_layer=3) == 1
    assert prescribe_layer(attrs, override_layer=0) == 0


def test_bad_input(tiny_model, tiny_tokenizer):
    with pytest.raises(InputError):
        diagnose(tiny_model, tiny_tokenizer, "  ", " Paris")
    with pytest.raises(InputError):
        diagnose(tiny_model, tiny_tokenizer, PROMPT, "")
    with pytest.raises(InputError, match="context"):
        diagnose(tiny_model, tiny_tokenizer, "the " * 40, " Paris")
    with pytest.raises(InputError):
        DiagnosisConfig(routing_rank=0)
    with pytest.raises(InputError, match="routing_from"):
        DiagnosisConfig(routing_from=1.0)


def test_diagnosis_does_not_touch_the_model(tiny_model, tiny_tokenizer):
    before, hooks_before = {k: v.clone() for k, v in tiny_model.state_dict().items()}, count_hooks(tiny_model)
    diagnose(tiny_model, tiny_tokenizer, PROMPT, " Paris")
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())
    assert count_hooks(tiny_model) == hooks_before


def test_capture_matches_hidden_states(tiny_model, tiny_tokenizer):
    ids = torch.tensor([tiny_tokenizer(PROMPT)["input_ids"]])
    cap = capture_last_position(tiny_model, ids, torch.tensor([ids.shape[1] - 1]))
    out = tiny_model.transformer(ids, output_hidden_states=True)
    assert torch.allclose(cap.embed[0], out.hidden_states[0][0, -1], atol=1e-6)
    resid = cap.embed + (cap.attn_out + cap.mlp_out).sum(0)
    assert torch.allclose(resid, cap.final_resid, atol=1e-5)


# --- the committed demo model: the reference phenomenon -------------------------------------------

def test_demo_model_verdicts(demo, demo_panels):
    facts = demo_panels["facts"]
    ds = diagnose_batch(demo.model, demo.tokenizer, [f["prompt"] for f in facts], [f["target"] for f in facts])
    last = demo.model.config.n_layer - 1
    for f, d in zip(facts, ds):
        if any(c in f["prompt"] for c in ("Italy", "Spain")):
            assert d.verdict == "correct", f["prompt"]
        else:
            assert d.verdict == "routing", f["prompt"]
            assert d.competitor.text.strip() == "the"
            assert d.override["layer"] == last
            assert d.prescribed_layer < last
        assert abs(sum(a.target for a in d.dla) - d.target.logit) < 1e-3
        assert abs(sum(a.competitor for a in d.dla) - d.competitor.logit) < 1e-3
    for f in demo_panels["absence"]:
        d = diagnose(demo.model, demo.tokenizer, f["prompt"], f["target"])
        assert d.verdict == "absence"


def test_override_acts_only_once_the_answer_is_held():
    heads = torch.zeros(4, 2, 2)  # (L, H, [target, competitor])
    heads[0, 1] = torch.tensor([0.0, 5.0])  # block 0 head 1 favours the competitor most...
    heads[3, 0] = torch.tensor([0.0, 2.0])  # ...block 3 head 0 less so
    assert find_override(heads) == (0, 1)  # without lens ranks: every head is a candidate
    ranks = torch.tensor([900, 800, 40, 3, 5])  # the target enters the top 10 in block 3's input (lens row 3)
    assert find_override(heads, ranks, near=10) == (3, 0)
    never = torch.tensor([900, 800, 400, 300, 50])
    assert find_override(heads, never, near=10) == (0, 1)  # never held: every head
    only_output = torch.tensor([900, 800, 400, 300, 1])
    assert find_override(heads, only_output, near=10) == (0, 1)  # the output row is not a block input
