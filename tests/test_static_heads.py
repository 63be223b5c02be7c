import copy
import gc
import json

import pytest
import torch

from surgery.arch import layout_of
from surgery.cli import main
from surgery.core.errors import InputError
from surgery.diagnosis.static_heads import (
    StaticHeadCache,
    StaticHeadConfig,
    copying_scores,
    head_table,
    overlap_k,
    product_frobenius,
    qk_overlap,
)
from surgery.diagnosis.token_classes import TOKEN_CLASSES, classify_token, token_classes

SMALL_K = StaticHeadConfig(top_k=4)  # the tiny model has d_model 32 (the default 100 is clipped to 8)


def _stats(table, layer, head):
    return next(s for s in table if (s.layer, s.head) == (layer, head))


def test_one_entry_per_head_in_order_and_json(tiny_model, tiny_tokenizer):
    layout = layout_of(tiny_model)
    table = head_table(tiny_model, tiny_tokenizer, SMALL_K)
    assert [(s.layer, s.head) for s in table] == [(l, h) for l in range(layout.n_layer) for h in range(layout.n_head)]
    entry = json.loads(json.dumps(table[5].to_dict(), allow_nan=False))
    assert entry["label"] == "L2 H1" and set(entry["key_response"]) == set(TOKEN_CLASSES)
    assert {"qk_overlap", "qk_norm", "ov_norm", "copying_score"} <= set(entry)


def test_w_q_equal_to_w_k_gives_maximal_overlap(tiny_model, tiny_tokenizer):
    model = copy.deepcopy(tiny_model)
    layout = layout_of(model)
    with torch.no_grad():
        layout.w_qkv(model, 1, "k")[2] = layout.w_qkv(model, 1, "q")[2]  # a view into c_attn: head 2 of block 1
    table = head_table(model, tiny_tokenizer, SMALL_K)
    assert _stats(table, 1, 2).qk_overlap == 1.0
    assert max(s.qk_overlap for s in table if (s.layer, s.head) != (1, 2)) < 1.0


def test_qk_overlap_counts_shared_top_rows():
    w_q = torch.zeros(1, 10, 2)
    w_k = torch.zeros(1, 10, 2)
    w_q[0, [0, 1, 2, 3]] = torch.tensor([4.0, 3.0, 2.0, 1.0])[:, None]
    w_k[0, [2, 3, 8, 9]] = torch.tensor([4.0, 3.0, 2.0, 1.0])[:, None]
    assert qk_overlap(w_q, w_k, 4).tolist() == [0.5]  # {0,1,2,3} ∩ {2,3,8,9}
    assert qk_overlap(w_q, w_k, 100).tolist() == [1.0]  # k beyond d_model: every row


def test_overlap_k_is_clipped_to_a_quarter_of_d_model(tiny_model, tiny_tokenizer):
    assert overlap_k(100, 768) == 100 and overlap_k(100, 128) == 32 and overlap_k(5, 2) == 1
    assert {s.qk_top_k for s in head_table(tiny_model, tiny_tokenizer)} == {8}  # d_model 32


def test_circuit_norms_equal_materialized_products(tiny_model, tiny_tokenizer):
    layout = layout_of(tiny_model)
    table = head_table(tiny_model, tiny_tokenizer, SMALL_K)
    for layer in range(layout.n_layer):
        w_q, w_k, w_v = (layout.w_qkv(tiny_model, layer, p) for p in "qkv")
        w_o = layout.w_o(tiny_model, layer)
        for head in range(layout.n_head):
            s = _stats(table, layer, head)
            assert s.qk_norm == pytest.approx(float((w_q[head] @ w_k[head].T).norm()), rel=1e-4)
            assert s.ov_norm == pytest.approx(float((w_v[head] @ w_o[head]).norm()), rel=1e-4)
    assert product_frobenius(w_q, w_k.transpose(1, 2)).shape == (layout.n_head,)


def test_key_response_matches_ln_1_recompute(tiny_model, tiny_tokenizer):
    """Mean ||k|| per class, with the block's own ln_1 (minus its bias) on embedding + mean position embedding."""
    layout = layout_of(tiny_model)
    table = head_table(tiny_model, tiny_tokenizer, SMALL_K)
    classes = token_classes(tiny_tokenizer)
    layer, head = 2, 3
    ln = tiny_model.get_submodule(f"transformer.h.{layer}.ln_1")
    e = tiny_model.transformer.wte.weight + tiny_model.transformer.wpe.weight.mean(0)
    keys = (ln(e) - ln.bias) @ layout.w_qkv(tiny_model, layer, "k")[head]  # (V, dh)
    for name in TOKEN_CLASSES:
        ids = classes.ids[name]  # the tiny vocabulary is smaller than the per-class sample: all tokens count
        expected = float(keys[ids].norm(dim=-1).mean()) if ids else None
        assert _stats(table, layer, head).key_response[name] == pytest.approx(expected, rel=1e-4)


def test_copying_score_matches_full_eigenvalues(tiny_model, tiny_tokenizer):
    """The d_head x d_head shortcut equals the eigenvalues of the full |S| x |S| token-to-logit OV circuit."""
    layout = layout_of(tiny_model)
    table = head_table(tiny_model, tiny_tokenizer, SMALL_K)
    classes = token_classes(tiny_tokenizer)
    ids = classes.ordinary()  # fewer than copy_sample: every non-special token
    layer, head = 1, 0
    ln, ln_f = tiny_model.get_submodule(f"transformer.h.{layer}.ln_1"), tiny_model.transformer.ln_f
    e = tiny_model.transformer.wte.weight[ids] + tiny_model.transformer.wpe.weight.mean(0)
    x = ln(e) - ln.bias  # (n, d)
    gu = ln_f.weight * tiny_model.lm_head.weight[ids]
    u = gu - gu.mean(-1, keepdim=True)  # (n, d)
    full = x @ layout.w_qkv(tiny_model, layer, "v")[head] @ layout.w_o(tiny_model, layer)[head] @ u.T  # (n, n)
    eig = torch.linalg.eigvals(full.double())
    expected = float(eig.sum().real / eig.abs().sum())
    assert _stats(table, layer, head).copying_score == pytest.approx(expected, abs=1e-4)


def test_copying_score_signs():
    w_v = torch.randn(1, 6, 3, dtype=torch.float64)
    w_o = w_v.transpose(1, 2)  # W_O = W_V^T: W_V^T W_V is positive definite
    eye = torch.eye(6, dtype=torch.float64)
    assert copying_scores(eye, w_v, w_o).item() == pytest.approx(1.0)
    assert copying_scores(-eye, w_v, w_o).item() == pytest.approx(-1.0)


def test_cache_reuses_and_never_keeps_the_model_alive(tiny_tokenizer, tiny_model):
    cache = StaticHeadCache()
    model = copy.deepcopy(tiny_model)
    first = head_table(model, tiny_tokenizer, SMALL_K, cache=cache)
    assert head_table(model, tiny_tokenizer, SMALL_K, cache=cache) is first
    assert head_table(model, tiny_tokenizer, StaticHeadConfig(top_k=2), cache=cache) is not first  # config in key
    assert head_table(tiny_model, tiny_tokenizer, SMALL_K, cache=cache) is not first  # another model object
    assert len(cache) == 3
    del model, first
    gc.collect()
    assert len(cache) == 1


def test_weights_untouched(tiny_model, tiny_tokenizer):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    head_table(tiny_model, tiny_tokenizer, SMALL_K)
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())


def test_config_validation():
    with pytest.raises(InputError):
        StaticHeadConfig(top_k=0)
    assert StaticHeadConfig.from_dict(StaticHeadConfig(seed=3).to_dict()) == StaticHeadConfig(seed=3)


# --- token classes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, marked, expected",
    [
        (" Paris", True, "proper_noun"),
        (" the", True, "function_word"),
        (" The", True, "function_word"),
        (".", True, "punctuation"),
        (" 1999", True, "number"),
        (" city", True, "common_word"),
        ("ing", True, None),
        (" ", True, None),
        ("\ufffd", True, None),
        (" mp3", True, None),
        ("Paris", False, "proper_noun"),
        ("one", False, "number"),
        ("capital", False, "common_word"),
    ],
)
def test_classify_token_rule(text, marked, expected):
    assert classify_token(text, marked) == expected


def test_token_classes_word_level(tiny_tokenizer):
    classes = token_classes(tiny_tokenizer)
    assert not classes.marks_word_start
    of = {tiny_tokenizer.convert_ids_to_tokens(i): name for name, ids in classes.ids.items() for i in ids}
    assert of["Paris"] == "proper_noun" and of["the"] == of["The"] == "function_word"
    assert of["."] == "punctuation" and of["one"] == "number" and of["city"] == "common_word"
    assert "[PAD]" not in of and "[UNK]" not in of


def test_token_classes_gpt2_real_tokenizer(gpt2_tokenizer):
    classes = token_classes(gpt2_tokenizer)
    assert classes.marks_word_start
    expected = {
        "ĠParis": "proper_noun",
        "Ġthe": "function_word",
        ".": "punctuation",
        "Ġ1999": "number",
        "Ġcity": "common_word",
    }
    for token, name in expected.items():
        assert gpt2_tokenizer.convert_tokens_to_ids(token) in classes.ids[name], token
    assert gpt2_tokenizer.convert_tokens_to_ids("ing") not in {i for ids in classes.ids.values() for i in ids}
    assert min(classes.counts().values()) > 100


def test_demo_model_table(demo):
    table = head_table(demo.model, demo.tokenizer)
    layout = layout_of(demo.model)
    assert len(table) == layout.n_layer * layout.n_head
    assert min(token_classes(demo.tokenizer).counts().values()) > 0  # every class exists in the demo vocabulary
    assert all(v is not None for s in table for v in s.key_response.values())


# --- CLI -------------------------------------------------------------------------------------------------------


def test_cli_heads_json(tiny_model_dir, capsys):
    assert main(["heads", "--model", str(tiny_model_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out) == 3 * 4 and out[0]["layer"] == 0 and out[0]["head"] == 0


def test_cli_heads_report_and_bad_option(tiny_model_dir, capsys):
    assert main(["heads", "--model", str(tiny_model_dir)]) == 0
    out = capsys.readouterr().out
    assert "L1 H0" in out and "transformer.h.9" in out
    assert main(["heads", "--model", str(tiny_model_dir), "--top-k", "0"]) == 2
    assert "top_k" in capsys.readouterr().err


@pytest.mark.slow
def test_gpt2_small_shape_full_table(gpt2_small_random, gpt2_tokenizer):
    """Smoke test of the full GPT-2-small-shaped table (timed by bench/, never here)."""
    table = head_table(gpt2_small_random, gpt2_tokenizer)
    assert len(table) == 144
    assert all(0.0 <= s.qk_overlap <= 1.0 and -1.0 <= s.copying_score <= 1.0 for s in table)
    json.dumps([s.to_dict() for s in table], allow_nan=False)


def test_every_family_gets_a_table_with_shared_kv_heads_shown_alike(family_model, tiny_tokenizer):
    """Rotary, grouped-query and post-norm models: one row per query head, finite measures, and query heads
    that read the same key/value head have the same key response (their K is the same)."""
    layout = layout_of(family_model)
    table = head_table(family_model, tiny_tokenizer)
    assert [(s.layer, s.head) for s in table] == [(l, h) for l in range(layout.n_layer) for h in range(layout.n_head)]
    for s in table:
        assert all(v == v for v in (s.qk_overlap, s.qk_norm, s.ov_norm, s.copying_score))  # no NaN
    group = layout.n_head // layout.n_kv_head
    if group > 1:
        for layer in range(layout.n_layer):
            rows = [s for s in table if s.layer == layer]
            assert rows[0].key_response == rows[group - 1].key_response  # same kv head
            assert rows[0].ov_norm != rows[group - 1].ov_norm  # but their own W_O


def test_key_response_on_rms_families_matches_the_modules(family_model, tiny_tokenizer):
    """RMSNorm families: the key input is the block's own pre-attention norm on what the embedding module gives
    (Gemma: scaled by sqrt(d_model)); no bias to leave out. Recomputed through the modules themselves."""
    layout = layout_of(family_model)
    if layout.adapter.norm.kind != "rms":
        pytest.skip("LayerNorm families are covered by test_key_response_matches_ln_1_recompute")
    table = head_table(family_model, tiny_tokenizer, SMALL_K)
    classes = token_classes(tiny_tokenizer)
    layer, head = 1, layout.n_head - 1
    block = family_model.get_submodule(layout.adapter.block(layer))
    with torch.no_grad():
        e = family_model.get_submodule(layout.adapter.embed)(torch.arange(len(tiny_tokenizer)))
        keys = block.get_submodule(layout.adapter.ln1)(e) @ layout.w_qkv(family_model, layer, "k")[head]
    for name in TOKEN_CLASSES:
        ids = classes.ids[name]
        expected = float(keys[ids].norm(dim=-1).mean()) if ids else None
        assert _stats(table, layer, head).key_response[name] == pytest.approx(expected, rel=1e-4)
