import json

import pytest
import torch
from conftest import count_hooks, make_non_finite_model

from bench.models import IdTokenizer  # space-separated token ids, for random full-size models
from surgery.arch import layout_of
from surgery.core.errors import InputError, NonFiniteError
from surgery.diagnosis.diagnose import (
    DiagnosisConfig,
    capture_last_position,
    classify,
    diagnose,
    diagnose_batch,
    find_override,
    prescribe_layer,
)

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
    handles = [
        tiny_model.transformer.h[l].attn.c_proj.register_forward_pre_hook(
            lambda m, a, l=l: zs.__setitem__(l, a[0][0, -1].clone())
        )
        for l in range(layout.n_layer)
    ]
    handles.append(
        tiny_model.transformer.ln_f.register_forward_pre_hook(lambda m, a: final.__setitem__("r", a[0][0, -1].clone()))
    )
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
        w = tiny_model.transformer.h[a.layer].attn.c_proj.weight[a.head * dh : (a.head + 1) * dh]  # rows of head
        vec = zs[a.layer][a.head * dh : (a.head + 1) * dh] @ w
        expected = float(((vec - vec.mean()) / sigma * ln.weight) @ u)
        assert a.target == pytest.approx(expected, abs=1e-5)


def test_top_heads_ranks_the_heads(tiny_model, tiny_tokenizer):
    d = diagnose(tiny_model, tiny_tokenizer, PROMPT, " Paris")
    heads = [a for a in d.dla if a.head is not None]

    def diff(a):
        return a.target - a.competitor

    top = d.top_heads(3)
    assert len(top) == 3 and all(a.head is not None for a in top)
    assert [abs(diff(a)) for a in top] == sorted((abs(diff(a)) for a in heads), reverse=True)[:3]
    assert [diff(a) for a in d.top_heads(3, toward="target")] == sorted(map(diff, heads), reverse=True)[:3]
    assert [diff(a) for a in d.top_heads(3, toward="competitor")] == sorted(map(diff, heads))[:3]
    assert len(d.top_heads(10_000)) == len(heads)
    with pytest.raises(ValueError, match="toward"):
        d.top_heads(3, toward="up")


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
        assert (
            b.verdict == one.verdict and b.override == one.override and b.competitor.token_id == one.competitor.token_id
        )
        for x, y in zip(b.dla, one.dla):
            assert x.target == pytest.approx(y.target, abs=1e-4)


# --- multi-token targets: teacher forcing to the divergence piece ---------------------------------


def _greedy(model, tokenizer, text: str, n: int) -> list[str]:
    """The model's next ``n`` greedy words after ``text`` (the tiny tokenizer: one word per token)."""
    ids = tokenizer(text)["input_ids"]
    words = []
    for _ in range(n):
        token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(token)
        words.append(tokenizer.convert_ids_to_tokens(token))
    return words


def _other_word(tokenizer, avoid: str) -> str:
    return next(w for w in ("Paris", "Rome", "blue", "cat") if w != avoid)


def _same_diagnosis(a, b):
    assert (a.verdict, a.override, a.prescribed_layer) == (b.verdict, b.override, b.prescribed_layer)
    assert (a.target.token_id, a.competitor.token_id, a.prediction.token_id) == (
        b.target.token_id,
        b.competitor.token_id,
        b.prediction.token_id,
    )
    assert [e.target_rank for e in a.logit_lens] == [e.target_rank for e in b.logit_lens]
    for x, y in zip(a.logit_lens, b.logit_lens):
        assert x.target_logit == pytest.approx(y.target_logit, abs=1e-5)
        assert x.competitor_logit == pytest.approx(y.competitor_logit, abs=1e-5)
    for x, y in zip(a.dla, b.dla):
        assert x.name == y.name
        assert x.target == pytest.approx(y.target, abs=1e-5) and x.competitor == pytest.approx(y.competitor, abs=1e-5)


def test_single_token_target_unchanged_by_teacher_forcing(tiny_model, tiny_tokenizer):
    """A one-token target takes the path it always did: the same numbers, bit for bit, as without teacher forcing."""
    forced = diagnose(tiny_model, tiny_tokenizer, PROMPT, " Paris").to_dict()
    off = DiagnosisConfig(teacher_force=False)
    plain = diagnose(tiny_model, tiny_tokenizer, PROMPT, " Paris", config=off).to_dict()
    assert forced == plain
    n = len(tiny_tokenizer(PROMPT)["input_ids"])
    assert forced["divergence"]["piece_index"] == 0 and forced["divergence"]["position"] == n - 1
    assert forced["divergence"]["forced"] is False and forced["divergence"]["pieces"] == [forced["target"]["text"]]
    assert forced["divergence"]["diverges"] == (forced["target"]["rank"] != 1)


@pytest.mark.parametrize("k", [1, 2])
def test_divergence_at_piece_k_equals_a_direct_diagnosis(tiny_model, tiny_tokenizer, k):
    """The model says the first k pieces and misses piece k: the same diagnosis as prompt + pieces[:k] -> piece k."""
    said = _greedy(tiny_model, tiny_tokenizer, PROMPT, k + 1)
    wrong = _other_word(tiny_tokenizer, said[k])
    target = "".join(f" {w}" for w in said[:k]) + f" {wrong} city"
    d = diagnose(tiny_model, tiny_tokenizer, PROMPT, target)
    direct = diagnose(tiny_model, tiny_tokenizer, PROMPT + "".join(f" {w}" for w in said[:k]), f" {wrong}")
    _same_diagnosis(d, direct)
    assert d.tokens == direct.tokens and d.prompt == PROMPT
    v = d.divergence
    assert (v.piece_index, v.piece.strip(), v.diverges, v.forced) == (k, wrong, True, True)
    assert not v.generic_first_piece
    assert v.pieces == [*said[:k], wrong, "city"] and v.position == len(tiny_tokenizer(PROMPT)["input_ids"]) + k - 1
    assert v.before == tiny_tokenizer.decode(tiny_tokenizer.convert_tokens_to_ids(said[:k]))
    assert d.verdict != "correct" and f"piece {k + 1} of {k + 2}" in d.summary() and repr(v.before) in d.summary()
    assert d.to_dict()["divergence"]["piece_index"] == k


def test_divergence_in_every_family(family_model, tiny_tokenizer):
    """Teacher forcing reads the family's own decoder and head (sliding windows, soft-caps, post-norms): a target
    diverging at piece 2, batched with a one-piece target, equals the direct diagnosis of prompt + two pieces."""
    said = _greedy(family_model, tiny_tokenizer, PROMPT, 3)
    target = f" {said[0]} {said[1]} {_other_word(tiny_tokenizer, said[2])}"
    forced, single = diagnose_batch(family_model, tiny_tokenizer, [PROMPT, "the cat sat on the"], [target, " mat"])
    _same_diagnosis(
        forced, diagnose(family_model, tiny_tokenizer, f"{PROMPT} {said[0]} {said[1]}", f" {target.split()[-1]}")
    )
    assert forced.divergence.piece_index == 2
    _same_diagnosis(
        single,
        diagnose(
            family_model, tiny_tokenizer, "the cat sat on the", " mat", config=DiagnosisConfig(teacher_force=False)
        ),
    )


def test_every_piece_predicted_diagnoses_the_first(tiny_model, tiny_tokenizer):
    said = _greedy(tiny_model, tiny_tokenizer, PROMPT, 3)
    d = diagnose(tiny_model, tiny_tokenizer, PROMPT, "".join(f" {w}" for w in said))
    direct = diagnose(tiny_model, tiny_tokenizer, PROMPT, f" {said[0]}")
    _same_diagnosis(d, direct)
    assert d.verdict == "correct" and d.divergence.piece_index == 0 and not d.divergence.diverges
    assert "predicts all 3 pieces" in d.summary()


def test_teacher_forcing_off_diagnoses_the_first_piece(tiny_model, tiny_tokenizer):
    said = _greedy(tiny_model, tiny_tokenizer, PROMPT, 2)
    target = f" {said[0]} {_other_word(tiny_tokenizer, said[1])}"
    d = diagnose(tiny_model, tiny_tokenizer, PROMPT, target, config=DiagnosisConfig(teacher_force=False))
    _same_diagnosis(d, diagnose(tiny_model, tiny_tokenizer, PROMPT, f" {said[0]}"))
    assert not d.divergence.forced and "teacher forcing off" in d.summary()


def test_batch_with_mixed_pieces_equals_one_at_a_time(tiny_model, tiny_tokenizer):
    prompts = [PROMPT, "The cat sat on the", "one", "The capital of Italy is the big city of", PROMPT]
    said = [_greedy(tiny_model, tiny_tokenizer, p, 3) for p in prompts]
    targets = [
        " Paris",  # one piece
        f" {said[1][0]} {_other_word(tiny_tokenizer, said[1][1])}",  # diverges at piece 1
        f" {said[2][0]} {said[2][1]} {_other_word(tiny_tokenizer, said[2][2])}",  # at piece 2
        " Rome city sea",  # most likely at piece 0
        "".join(f" {w}" for w in said[4]),  # every piece predicted
    ]
    batch = diagnose_batch(tiny_model, tiny_tokenizer, prompts, targets, batch_size=3)
    assert [b.divergence.piece_index for b in batch][1:3] == [1, 2] and not batch[4].divergence.diverges
    for p, t, b in zip(prompts, targets, batch):
        one = diagnose(tiny_model, tiny_tokenizer, p, t)
        _same_diagnosis(b, one)
        assert b.divergence == one.divergence


def test_competitor_checked_against_the_diagnosed_piece(tiny_model, tiny_tokenizer):
    said = _greedy(tiny_model, tiny_tokenizer, PROMPT, 2)
    wrong = _other_word(tiny_tokenizer, said[1])
    with pytest.raises(InputError, match="same token"):
        diagnose(tiny_model, tiny_tokenizer, PROMPT, f" {said[0]} {wrong}", competitor=f" {wrong}")
    d = diagnose(tiny_model, tiny_tokenizer, PROMPT, f" {said[0]} {wrong}", competitor=f" {said[0]}")
    assert d.competitor.text.strip() == said[0]  # piece 0 is not the diagnosed one: a fair competitor


def test_generic_first_piece(tiny_model, tiny_tokenizer):
    """A missed first piece is generic when, fed it, the model still misses a later piece; not when it goes on."""
    first = _greedy(tiny_model, tiny_tokenizer, PROMPT, 1)[0]
    x = _other_word(tiny_tokenizer, first)  # a first piece the model misses
    then = _greedy(tiny_model, tiny_tokenizer, f"{PROMPT} {x}", 1)[0]
    y = _other_word(tiny_tokenizer, then)
    generic = diagnose(tiny_model, tiny_tokenizer, PROMPT, f" {x} {y}")  # fed " x", the model misses " y" too
    v = generic.divergence
    assert (v.piece_index, v.diverges, v.generic_first_piece, v.missed_after) == (0, True, True, 1)
    assert "is generic" in generic.summary() and generic.to_dict()["divergence"]["generic_first_piece"] is True
    _same_diagnosis(generic, diagnose(tiny_model, tiny_tokenizer, PROMPT, f" {x}"))  # the same piece-0 diagnosis
    goes_on = diagnose(tiny_model, tiny_tokenizer, PROMPT, f" {x} {then}")  # fed " x", the model says the rest
    assert goes_on.divergence.diverges and not goes_on.divergence.generic_first_piece
    assert goes_on.divergence.missed_after is None and "generic" not in goes_on.summary()
    single = diagnose(tiny_model, tiny_tokenizer, PROMPT, f" {x}")
    assert single.divergence.diverges and not single.divergence.generic_first_piece  # one piece: nothing after it


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
    with pytest.raises(InputError, match="teacher_force"):
        DiagnosisConfig(teacher_force=1)


@pytest.mark.parametrize("value", [float("nan"), 3e38])
def test_non_finite_activations_are_refused(tiny_tokenizer, value):
    """A NaN weight set in memory, or a finite one that overflows: refused, never a verdict read off NaN logits."""
    model = make_non_finite_model(len(tiny_tokenizer), value)
    where = r"NaN or inf after L2 \(transformer\.h\.1\) on the prompt "
    with pytest.raises(NonFiniteError, match=where + "'The capital of France is'"):
        diagnose(model, tiny_tokenizer, PROMPT, " Paris")
    with pytest.raises(NonFiniteError, match=where + "'The capital of Japan is'"):
        diagnose_batch(model, tiny_tokenizer, ["The capital of Japan is", PROMPT], [" Tokyo", " Paris Paris"])


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
