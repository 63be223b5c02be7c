"""Every supported family, on a tiny random model of each (``family_model`` in conftest.py): attribution adds up,
each head's share matches a recomputation written here from the module weights alone, site sizes match the
config, the upper stack reproduces the model (sliding windows biting), surgery touches only its site and never
the base, edits round-trip bitwise, and what is outside the supported families is refused in one line.

The expected numbers are written from each family's Hugging Face modules directly (Conv1D ``[in, out]``,
``nn.Linear`` ``[out, in]``, where each norm sits), never through :mod:`surgery.arch`, so that a wrong adapter
cannot agree with itself.
"""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import SLIDING_FAMILIES, family_config, make_family_model
from transformers import AutoModelForCausalLM

from surgery.arch import SITES, adapter_for, check_supported, layout_of
from surgery.cli import main
from surgery.core.errors import UnsupportedModelError
from surgery.diagnosis.diagnose import accumulated_resid, capture_last_position, diagnose, diagnose_batch, logit_lens
from surgery.edit.training import SurgeryConfig, operate, train_site
from surgery.edit.upper_stack import UpperStack, freeze_inputs, kept_answers
from surgery.evaluation.facts import Fact
from surgery.io.edit_file import Edit, base_config, block_digest, edited_model, weight_stats
from surgery.io.export import write_output
from surgery.io.loading import LoadedModel, load_model

PROMPT = "The capital of France is a big red city in the sea and"  # 13 tokens: longer than every window (3)
FACT_PROMPTS = ["The capital of France is", "the cat sat on the mat . the dog sat on the"]  # padded batch
TEXTS = ["the cat sat on the mat . the dog was in the sea . one two three .", "a big red dog and a small blue cat"]
CANDIDATE_FACTS = [
    Fact("The capital of France is", " Paris"),
    Fact("The capital of Japan is", " Tokyo"),
    Fact("The capital of Italy is", " Rome"),
    Fact("The capital of Spain is", " Madrid"),
    Fact("the sky is", " blue"),
    Fact("the cat sat on the", " mat"),
]
LAYER = 1
# One fact, large steps: a random tiny model must be fixed by any site within the budget.
SURGERY = dict(layer=LAYER, lr=5e-2, epochs=150, kl_weight=1.0)
SUPPORTED_NAMES = ("GPT-2", "Llama", "Mistral", "Qwen2", "Qwen3", "Gemma", "Gemma 2", "Gemma 3")


# --------------------------------------------------------------------------------------------------
# Each family written down by hand, from its transformers modeling file.
# --------------------------------------------------------------------------------------------------


def family_of(model) -> str:
    return {"gemma3_text": "gemma3"}.get(model.config.model_type, model.config.model_type)


def is_gpt2(model) -> bool:
    return family_of(model) == "gpt2"


def has_post_norms(model) -> bool:
    return family_of(model) in ("gemma2", "gemma3")


def blocks(model):
    return model.transformer.h if is_gpt2(model) else model.model.layers


def block_prefix(model, layer: int) -> str:
    return f"transformer.h.{layer}." if is_gpt2(model) else f"model.layers.{layer}."


def o_proj(block, model):
    return block.attn.c_proj if is_gpt2(model) else block.self_attn.o_proj


def final_norm(model):
    return model.transformer.ln_f if is_gpt2(model) else model.model.norm


def dims(model) -> SimpleNamespace:
    c = model.config
    if is_gpt2(model):
        return SimpleNamespace(d=c.n_embd, H=c.n_head, G=c.n_head, dh=c.n_embd // c.n_head, m=c.n_inner or 4 * c.n_embd)
    return SimpleNamespace(
        d=c.hidden_size,
        H=c.num_attention_heads,
        G=c.num_key_value_heads,
        dh=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        m=c.intermediate_size,
    )


def rms_scale(norm, x: torch.Tensor, model) -> torch.Tensor:
    """An RMSNorm's per-coordinate scale frozen from its input ``x`` (d,): Llama ``w``, Gemma ``1 + w``."""
    gemma = family_of(model).startswith("gemma")
    eps = norm.eps if gemma else norm.variance_epsilon
    gain = 1.0 + norm.weight if gemma else norm.weight
    return gain / (x.pow(2).mean() + eps).sqrt()


def final_directions(model, resid: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """``v_t`` with ``final_norm(resid) . u_t = sum_c c . v_t`` (+ LayerNorm bias term), statistics frozen: (k, d)."""
    norm, u = final_norm(model), model.lm_head.weight[token_ids]  # (k, d)
    if is_gpt2(model):  # LayerNorm: centring moves onto the direction
        gu = norm.weight * u
        return (gu - gu.mean(-1, keepdim=True)) / (resid.var(unbiased=False) + norm.eps).sqrt()
    return rms_scale(norm, resid, model) * u


def softcap(model) -> float | None:
    return getattr(model.config, "final_logit_softcapping", None)


def expected_sites(model) -> dict[str, int]:
    """Parameters of each surgery site of one block, counted from the config."""
    n, c, f = dims(model), model.config, family_of(model)
    if f == "gpt2":
        attn = n.d * 3 * n.d + 3 * n.d + n.d * n.d + n.d  # c_attn [d, 3d] + bias, c_proj [d, d] + bias
        mlp = n.d * n.m + n.m + n.m * n.d + n.d  # c_fc, c_proj with biases
        return {"wv": n.d * n.d, "attn": attn, "mlp": mlp, "layer": attn + mlp + 2 * 2 * n.d}  # 2 LayerNorms
    q, kv, o = n.H * n.dh, n.G * n.dh, n.H * n.dh
    attn = n.d * q + 2 * n.d * kv + o * n.d
    if getattr(c, "attention_bias", False):  # Llama, Qwen3: every projection biased
        attn += q + 2 * kv + n.d
    if f == "qwen2":  # Q/K/V biases, none on o_proj
        attn += q + 2 * kv
    if f in ("qwen3", "gemma3"):  # q_norm, k_norm: one weight per head dimension each
        attn += 2 * n.dh
    mlp = 3 * n.d * n.m + (2 * n.m + n.d if getattr(c, "mlp_bias", False) else 0)
    norms = (4 if f in ("gemma2", "gemma3") else 2) * n.d
    return {"wv": n.d * kv, "attn": attn, "mlp": mlp, "layer": attn + mlp + norms}


def site_tensors(model, site: str, layer: int) -> set[str]:
    """Names of the tensors a site may change."""
    prefix = block_prefix(model, layer)
    if site == "wv":
        return {prefix + ("attn.c_attn.weight" if is_gpt2(model) else "self_attn.v_proj.weight")}
    sub = {"attn": "attn." if is_gpt2(model) else "self_attn.", "mlp": "mlp.", "layer": ""}[site]
    return {name for name, _ in model.named_parameters() if name.startswith(prefix + sub)}


def ids_of(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor([tokenizer(text)["input_ids"]])


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# --------------------------------------------------------------------------------------------------
# 1, 2, 8. Diagnosis.
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def diagnosis(family_model, tiny_tokenizer):
    return diagnose(family_model, tiny_tokenizer, PROMPT, " Paris")


def test_attributions_sum_to_the_real_logits(family_model, tiny_tokenizer, diagnosis):
    model, d = family_model, diagnosis
    pre_cap = {}
    with torch.no_grad():
        handle = model.lm_head.register_forward_hook(lambda m, a, out: pre_cap.update(logits=out[0, -1]))
        try:
            logits = model(**tiny_tokenizer(PROMPT, return_tensors="pt")).logits[0, -1]
        finally:
            handle.remove()
    cap, bends = softcap(model), []
    for token, part in ((d.target, "target"), (d.competitor, "competitor")):
        total = sum(getattr(a, part) for a in d.dla)
        real = float(logits[token.token_id])
        if cap is None:
            assert total == pytest.approx(real, abs=1e-3), part
        else:
            # Soft-capped (Gemma 2): attribution decomposes the logit *before* cap * tanh(. / cap), the sum of
            # linear shares; the capped logit is a monotonic function of that sum, not a sum of shares itself.
            assert total == pytest.approx(float(pre_cap["logits"][token.token_id]), abs=1e-3), part
            assert cap * torch.tanh(torch.tensor(total / cap)).item() == pytest.approx(real, abs=1e-3), part
            bends.append(abs(total - real))
        assert getattr(d.logit_lens[-1], f"{part}_logit") == pytest.approx(real, abs=1e-4), part
        assert token.logit == pytest.approx(real, abs=1e-4)
    if cap is not None:
        assert max(bends) > 1e-2  # the cap bends these logits: decomposing after it would be caught


def independent_head_attributions(model, tokenizer, prompt: str, token_ids: list[int]) -> torch.Tensor:
    """Each head's direct logit attribution, from plain hooks and the module weights. (L, H, k)."""
    n = dims(model)
    z, post_in, resid = {}, {}, {}
    handles = []
    for layer, block in enumerate(blocks(model)):
        handles.append(
            o_proj(block, model).register_forward_pre_hook(
                lambda m, args, layer=layer: z.__setitem__(layer, args[0][0, -1])
            )
        )
        if has_post_norms(model):  # what the post-norm receives: o_proj's output
            handles.append(
                block.post_attention_layernorm.register_forward_pre_hook(
                    lambda m, args, layer=layer: post_in.__setitem__(layer, args[0][0, -1])
                )
            )
    handles.append(final_norm(model).register_forward_pre_hook(lambda m, args: resid.update(r=args[0][0, -1])))
    try:
        with torch.no_grad():
            model(ids_of(tokenizer, prompt))
    finally:
        for h in handles:
            h.remove()
    v = final_directions(model, resid["r"], token_ids)  # (k, d)
    out = torch.zeros(len(blocks(model)), n.H, len(token_ids))
    for layer, block in enumerate(blocks(model)):
        w = o_proj(block, model).weight  # Conv1D [H*dh, d]; nn.Linear [d, H*dh]
        scale = (
            rms_scale(block.post_attention_layernorm, post_in[layer], model)
            if has_post_norms(model)
            else torch.ones(n.d)
        )
        for head in range(n.H):
            cols = slice(head * n.dh, (head + 1) * n.dh)
            w_head = w[cols, :] if is_gpt2(model) else w[:, cols].T  # (dh, d)
            out[layer, head] = ((z[layer][cols] @ w_head) * scale) @ v.T
    return out


def test_each_head_matches_an_independent_recomputation(family_model, tiny_tokenizer, diagnosis):
    model, d = family_model, diagnosis
    expected = independent_head_attributions(model, tiny_tokenizer, PROMPT, [d.target.token_id, d.competitor.token_id])
    heads = [a for a in d.dla if a.head is not None]
    assert len(heads) == expected.shape[0] * expected.shape[1]
    for a in heads:
        assert a.target == pytest.approx(float(expected[a.layer, a.head, 0]), abs=1e-4), a.name
        assert a.competitor == pytest.approx(float(expected[a.layer, a.head, 1]), abs=1e-4), a.name
    assert expected.abs().max() > 1e-2  # the heads write something: not a comparison of zeros


def test_a_padded_batch_diagnoses_as_one_prompt_at_a_time(family_model, tiny_tokenizer, diagnosis):
    """Right-padded rows (one longer than the windows, one shorter) give each prompt's own numbers."""
    short = diagnose(family_model, tiny_tokenizer, FACT_PROMPTS[0], " Paris")
    batch = diagnose_batch(family_model, tiny_tokenizer, [PROMPT, FACT_PROMPTS[0]], [" Paris", " Paris"])
    for alone, batched in ((diagnosis, batch[0]), (short, batch[1])):
        assert [a.name for a in batched.dla] == [a.name for a in alone.dla]
        for a, b in zip(alone.dla, batched.dla):
            assert (b.target, b.competitor) == pytest.approx((a.target, a.competitor), abs=1e-4), a.name
        assert [e.target_logit for e in batched.logit_lens] == pytest.approx(
            [e.target_logit for e in alone.logit_lens], abs=1e-4
        )


def test_the_slabbed_lens_counts_ranks_over_the_whole_vocabulary(family_model, tiny_tokenizer):
    """Slabs that do not divide the vocabulary and chunks of one prompt give the ranks and logits of the whole
    logits at once (the model's own unembedding and soft-cap), whichever slab holds each target."""
    model = family_model
    ids = ids_of(tiny_tokenizer, PROMPT).repeat(4, 1)  # (4, T): one prompt, four targets across the vocabulary
    n_vocab = model.config.vocab_size
    targets = torch.tensor([3, n_vocab // 3, n_vocab // 2 + 1, n_vocab - 1])
    with torch.no_grad():
        resid = accumulated_resid(capture_last_position(model, ids, torch.full((4,), ids.shape[1] - 1)))
        lens = logit_lens(model, resid, targets, chunk=3, slab=7)
        full = model.lm_head(final_norm(model)(resid))  # (S, 4, V), before the cap
        if softcap(model) is not None:
            full = softcap(model) * torch.tanh(full / softcap(model))
    assert torch.equal(lens.ids[:, 0], targets)
    assert torch.equal(lens.ids[:, 2], full[-1].argmax(-1))
    for k in range(3):
        picked = full.gather(-1, lens.ids[None, :, k : k + 1].expand(full.shape[0], -1, -1))  # (S, 4, 1)
        torch.testing.assert_close(lens.logits[..., k], picked[..., 0], atol=1e-5, rtol=1e-5)
    target_logits = full.gather(-1, targets[None, :, None].expand(full.shape[0], -1, -1))
    assert torch.equal(lens.target_ranks, (full > target_logits).sum(-1) + 1)
    comp = full[-1].gather(-1, lens.ids[:, 1:2])
    assert torch.equal(lens.competitor_rank, (full[-1] > comp).sum(-1) + 1)
    assert len(set(lens.target_ranks[-1].tolist())) > 1  # the four targets really rank differently


def test_diagnosis_json_names_the_key_value_heads(family_model, diagnosis):
    d = json.loads(json.dumps(diagnosis.to_dict(), allow_nan=False))
    n = dims(family_model)
    assert (d["n_head"], d["n_kv_head"], d["n_layer"]) == (n.H, n.G, 3)
    if not is_gpt2(family_model):
        assert d["n_kv_head"] == family_model.config.num_key_value_heads < d["n_head"]


# --------------------------------------------------------------------------------------------------
# 3. Sites.
# --------------------------------------------------------------------------------------------------


def test_site_sizes_from_the_config(family_model):
    layout, expected = layout_of(family_model), expected_sites(family_model)
    for layer in range(3):
        assert {s: layout.site_size(family_model, s, layer) for s in SITES} == expected
    prefix = block_prefix(family_model, 1)
    block_total = sum(p.numel() for name, p in family_model.named_parameters() if name.startswith(prefix))
    assert expected["layer"] == block_total


def test_sites_cli(capsys, family_model, family_dir):
    code = main(["sites", "--model", str(family_dir), "--layer", "1", "--json", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out) == expected_sites(family_model)


# --------------------------------------------------------------------------------------------------
# 4. The upper stack.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_upper_stack_reproduces_the_model(family_model, tiny_tokenizer, layer):
    """Captured block inputs + blocks layer.. (the site parameters supplied at their base values) + final norm
    + unembedding == plain unpadded forward passes, on right-padded batches longer than the sliding windows."""
    model = family_model
    with torch.no_grad():
        fact_logits = torch.stack([model(ids_of(tiny_tokenizer, p)).logits[0, -1] for p in FACT_PROMPTS])
        text_lp = torch.cat([F.log_softmax(model(ids_of(tiny_tokenizer, t)).logits[0], -1) for t in TEXTS])
    frozen = freeze_inputs(model, tiny_tokenizer, [Fact(p, " Paris") for p in FACT_PROMPTS], TEXTS, layer, 512)
    assert frozen.text_real.shape[0] == 2 and not frozen.text_real.all()  # padded
    stack, params = UpperStack(model, layer), dict(model.named_parameters())
    for site in ("wv", "layer"):  # a slice spliced into its weight (GPT-2's V columns); every block tensor
        slices = layout_of(model).site_slices(site, layer, model)
        values = {s.name: s.read(params[s.name]) for s in slices}
        with torch.no_grad():
            block_params = stack.block_params(slices, values)
            assert torch.allclose(stack.fact_logits(frozen, block_params), fact_logits, atol=1e-4), site
            assert torch.allclose(stack.text_log_probs(frozen, block_params), text_lp, atol=1e-4), site


def test_upper_stack_teacher_forces_every_piece_of_the_answer(family_model, tiny_tokenizer):
    """A several-token answer: the stack's logits for piece i are the plain model's next-token logits after the
    prompt and pieces 0..i-1, on a batch that mixes one-piece and three-piece answers (right-padded)."""
    model, layer = family_model, 1
    facts = [Fact(FACT_PROMPTS[0], " Paris is the"), Fact(FACT_PROMPTS[1], " Rome")]
    with torch.no_grad():
        full = model(ids_of(tiny_tokenizer, FACT_PROMPTS[0] + " Paris is")).logits[0]
        n = ids_of(tiny_tokenizer, FACT_PROMPTS[0]).shape[1]
        expected = torch.cat([full[n - 1 : n + 2], model(ids_of(tiny_tokenizer, FACT_PROMPTS[1])).logits[0, -1:]])
    frozen = freeze_inputs(model, tiny_tokenizer, facts, [], layer, 0)
    assert frozen.targets.tolist() == [tiny_tokenizer.convert_tokens_to_ids(w) for w in ("Paris", "is", "the", "Rome")]
    assert frozen.piece_rows.tolist() == [0, 0, 0, 1] and frozen.n_facts == 2
    with torch.no_grad():
        assert torch.allclose(UpperStack(model, layer).fact_logits(frozen, {}), expected, atol=1e-4)


def test_upper_stack_keeps_what_the_model_says_after_the_kept_prompts(family_model, tiny_tokenizer):
    """Kept prompts (the preservation term's same-relation prompts): each runs with what the model itself says
    after it (greedy), and the stack's log-probabilities at those positions are the plain model's, on a
    right-padded batch of prompts of different lengths."""
    model, layer = family_model, 1
    probes = [Fact(FACT_PROMPTS[0], " Paris is"), Fact(FACT_PROMPTS[1], " Rome")]
    kept = kept_answers(model, tiny_tokenizer, probes)
    assert [len(a) for _, a in kept] == [3, 2]  # as many tokens as each answer has pieces, and the one after
    expected = []
    with torch.no_grad():
        for ids, answer in kept:
            seq = torch.tensor([ids + answer])
            greedy = model(seq[:, :-1]).logits[0, len(ids) - 1 :].argmax(-1).tolist()
            assert greedy == answer  # the model's own greedy continuation
            expected.append(F.log_softmax(model(seq[:, :-1]).logits[0, len(ids) - 1 :], -1))
    frozen = freeze_inputs(model, tiny_tokenizer, probes[:1], [], layer, 0, kept)
    assert frozen.kept_at.sum() == 5 and not frozen.kept_at[1].all()  # 3 + 2 positions, padded
    with torch.no_grad():
        assert torch.allclose(UpperStack(model, layer).kept_log_probs(frozen, {}), torch.cat(expected), atol=1e-4)


@pytest.mark.parametrize("family", SLIDING_FAMILIES)
def test_the_sliding_windows_bite(tiny_tokenizer, family):
    """With the window opened to the whole context (and only then), the prompt's logits change: the windows the
    tests above run through are real."""
    model = make_family_model(family, len(tiny_tokenizer))
    logits = {}
    for window in (model.config.sliding_window, 64):
        config = copy.deepcopy(model.config)
        config.sliding_window = window
        rebuilt = AutoModelForCausalLM.from_config(config).eval()
        rebuilt.load_state_dict(model.state_dict())
        with torch.no_grad():
            logits[window] = rebuilt(ids_of(tiny_tokenizer, PROMPT)).logits[0, -1]
    assert torch.equal(logits[3], model(ids_of(tiny_tokenizer, PROMPT)).logits[0, -1])
    assert (logits[3] - logits[64]).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------
# 5, 6. Surgery, edits and export.
# --------------------------------------------------------------------------------------------------


def wrong_fact(model, tokenizer) -> Fact:
    """The first candidate fact the random model gets wrong."""
    with torch.no_grad():
        for fact in CANDIDATE_FACTS:
            top = int(model(ids_of(tokenizer, fact.prompt)).logits[0, -1].argmax())
            if top != tokenizer(fact.target)["input_ids"][0]:
                return fact
    raise AssertionError("the random model answers every candidate fact")


@pytest.fixture(scope="module")
def frozen_fact(family_model, tiny_tokenizer):
    """Block 1's inputs for one wrong fact and the unrelated texts, and the base's state before any training."""
    before = snapshot(family_model)
    frozen = freeze_inputs(family_model, tiny_tokenizer, [wrong_fact(family_model, tiny_tokenizer)], TEXTS, LAYER, 512)
    return SimpleNamespace(frozen=frozen, before=before)


@pytest.fixture(scope="module", params=SITES)
def trained(request, family_model, frozen_fact):
    """A few training steps at one site of block 1 (``train_site``: the steps ``operate`` runs), as an edit."""
    site, model = request.param, family_model
    config = SurgeryConfig(site=site, layer=LAYER, lr=1e-2, epochs=3)
    outcome = train_site(model, frozen_fact.frozen, site, LAYER, config)
    assert outcome.steps >= 1  # the fact was wrong: at least one step ran (early stop once it is fixed)
    slices = tuple(layout_of(model).site_slices(site, LAYER, model))
    edit = Edit(
        site,
        LAYER,
        slices,
        outcome.values,
        {"base_config": base_config(model), "base_block_sha256": block_digest(model, LAYER)},
    )
    return SimpleNamespace(model=model, site=site, edit=edit, before=frozen_fact.before)


def assert_only_the_site_changed(model, site: str, edit: Edit) -> None:
    """The view differs from the base in the site's tensors only (GPT-2 wv: the V columns only); Q/K untouched."""
    assert set(edit.values) == site_tensors(model, site, LAYER)
    assert edit.numel == expected_sites(model)[site]
    view = edited_model(model, edit)
    base, new = dict(model.named_parameters()), dict(view.named_parameters())
    assert base.keys() == new.keys()
    changed = {name for name in base if not torch.equal(base[name], new[name])}
    assert changed and changed <= site_tensors(model, site, LAYER)
    for name in base.keys() - changed:
        assert torch.equal(base[name], new[name]), name

    stats = weight_stats(model, edit, view)
    assert stats.others_unchanged and stats.params_changed > 0
    if site != "wv":
        assert stats.qk_unchanged is None
        return
    assert stats.qk_unchanged is True
    prefix = block_prefix(model, LAYER)
    if is_gpt2(model):  # c_attn's columns are [Q | K | V]: only V may move, and not the fused bias
        name, d = prefix + "attn.c_attn.weight", dims(model).d
        assert torch.equal(base[name][:, : 2 * d], new[name][:, : 2 * d])
        assert not torch.equal(base[name][:, 2 * d :], new[name][:, 2 * d :])
        qk = [prefix + "attn.c_attn.bias"]
    else:
        qk = [
            prefix + f"self_attn.{p}.{w}" for p in ("q_proj", "k_proj", "q_norm", "k_norm") for w in ("weight", "bias")
        ]
        qk = [name for name in qk if name in base]
        assert len(qk) == {"llama": 4, "qwen2": 4, "qwen3": 6, "gemma3": 4}.get(family_of(model), 2)
    for name in qk:
        assert torch.equal(base[name], new[name]), name


def test_training_touches_only_its_site(trained):
    assert_only_the_site_changed(trained.model, trained.site, trained.edit)
    assert_state_equal(trained.model.state_dict(), trained.before)  # the base is bitwise unchanged
    assert not any(p.requires_grad for p in trained.model.parameters())


@pytest.fixture(scope="module")
def operated(family_model, tiny_tokenizer, tiny_panel):
    """Full ``operate`` fixing one wrong fact at the whole block 1 (the site that converges in a few steps)."""
    before = snapshot(family_model)
    fact = wrong_fact(family_model, tiny_tokenizer)
    result = operate(
        family_model, tiny_tokenizer, [fact], SurgeryConfig(site="layer", **SURGERY), unrelated=TEXTS, panel=tiny_panel
    )
    return SimpleNamespace(model=family_model, before=before, result=result)


def test_operate_fixes_the_fact_and_touches_only_its_site(operated):
    model, result = operated.model, operated.result
    assert_state_equal(model.state_dict(), operated.before)
    assert result.report.comparison.facts_before == 0 and result.report.comparison.facts_after == 1
    assert_only_the_site_changed(model, "layer", result.edit)
    assert result.report.weights.to_dict() == weight_stats(model, result.edit).to_dict()
    assert result.report.block == block_prefix(model, LAYER)[:-1]


def test_operate_with_a_memo_of_the_base_reports_the_same_and_generates_nothing_of_the_base_again(
    operated, tiny_tokenizer, tiny_panel, monkeypatch
):
    # issue 22: the base model's figures are computed once per memo; a second operate with the same memo finds them
    # all (facts, paraphrases, panel probes, fluency, kept answers, perplexity, hidden states, the diagnosis) and
    # its report equals the memo-less one but for the wall times
    from surgery.edit import training
    from surgery.evaluation import generation, scoring
    from surgery.evaluation.memo import EvaluationMemo

    model, fact = operated.model, operated.result.report.comparison.facts[0]
    memo = EvaluationMemo(model)

    def run():
        config = SurgeryConfig(site="layer", **SURGERY)
        return operate(
            model, tiny_tokenizer, [Fact(fact.prompt, fact.target)], config, TEXTS, panel=tiny_panel, memo=memo
        )

    first = run()
    assert len(memo) > 0
    wave, perplexity, hidden = generation._generate_wave, scoring.perplexity, scoring.final_hidden
    generated_on = []
    monkeypatch.setattr(generation, "_generate_wave", lambda m, *a: generated_on.append(m) or wave(m, *a))
    monkeypatch.setattr(scoring, "perplexity", lambda m, *a: generated_on.append(m) or perplexity(m, *a))
    monkeypatch.setattr(scoring, "final_hidden", lambda m, *a: generated_on.append(m) or hidden(m, *a))
    diagnose = training.diagnose_batch
    monkeypatch.setattr(training, "diagnose_batch", lambda m, *a: generated_on.append(m) or diagnose(m, *a))
    second = run()
    assert generated_on and all(m is not model for m in generated_on)  # only the edited view is computed

    def without_times(result):
        return {k: v for k, v in result.report.to_dict().items() if k not in ("train_time_s", "wall_time_s")}

    assert without_times(first) == without_times(second) == without_times(operated.result)
    assert_state_equal(model.state_dict(), operated.before)


def test_edit_round_trips_bitwise(trained, tmp_path):
    model, edit = trained.model, trained.edit
    edit.save(tmp_path / "patch.safetensors")
    loaded = Edit.load(tmp_path / "patch.safetensors")
    assert (loaded.site, loaded.layer, loaded.slices) == (edit.site, edit.layer, edit.slices)
    assert_state_equal(edited_model(model, loaded).state_dict(), edited_model(model, edit).state_dict())
    assert_state_equal(model.state_dict(), trained.before)


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory, family_model, tiny_tokenizer):
    """The family's tiny model saved as a folder."""
    folder = tmp_path_factory.mktemp(f"base-{family_of(family_model)}")
    family_model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def written(operated, family_dir, tiny_tokenizer, tmp_path_factory):
    """``write_output``'s folder for the operated edit (base: the saved family folder)."""
    loaded = LoadedModel(operated.model, tiny_tokenizer, source=str(family_dir))
    return write_output(tmp_path_factory.mktemp("out") / "fixed", loaded, operated.result)


def test_written_output_is_the_corrected_model(operated, written):
    model, edit = operated.model, operated.result.edit
    assert_state_equal(load_model(written, device="cpu").model.state_dict(), edited_model(model, edit).state_dict())
    assert_state_equal(model.state_dict(), operated.before)


def test_apply_patch_cli_reproduces_the_fix(capsys, operated, family_dir, written, tmp_path):
    code = main(
        [
            "apply-patch",
            "--base",
            str(family_dir),
            "--patch",
            str(written / "patch.safetensors"),
            "--out",
            str(tmp_path / "rebuilt"),
            "--device",
            "cpu",
        ]
    )
    _, err = capsys.readouterr()
    assert code == 0, err
    assert_state_equal(
        AutoModelForCausalLM.from_pretrained(tmp_path / "rebuilt").state_dict(),
        edited_model(operated.model, operated.result.edit).state_dict(),
    )


# --------------------------------------------------------------------------------------------------
# 7. Refusals.
# --------------------------------------------------------------------------------------------------


def assert_one_line_naming_the_families(error: pytest.ExceptionInfo, *words: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for word in SUPPORTED_NAMES + words:
        assert word in message, word


def tiny_other(kind: str, vocab_size: int):
    from transformers import FalconConfig, GPTNeoXConfig, PhiConfig

    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=vocab_size)
    config = {
        "gpt_neox": lambda: GPTNeoXConfig(**common, intermediate_size=64),
        "falcon": lambda: FalconConfig(**common),
        "phi": lambda: PhiConfig(**common, intermediate_size=64),
    }[kind]()
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("kind", ["gpt_neox", "falcon", "phi"])
def test_other_architectures_are_refused(tiny_tokenizer, kind):
    model = tiny_other(kind, len(tiny_tokenizer))
    with pytest.raises(UnsupportedModelError) as error:
        layout_of(model)
    assert_one_line_naming_the_families(error, f"'{kind}'")
    with pytest.raises(UnsupportedModelError):
        diagnose(model, tiny_tokenizer, PROMPT, " Paris")


def test_a_bidirectional_gemma3_is_refused(tiny_tokenizer):
    config = family_config("gemma3", len(tiny_tokenizer))
    config.use_bidirectional_attention = True
    with pytest.raises(UnsupportedModelError) as error:
        layout_of(AutoModelForCausalLM.from_config(config))
    assert_one_line_naming_the_families(error, "bidirectional")


def test_a_config_with_a_multiplier_is_refused(tiny_tokenizer):
    model = make_family_model("llama", len(tiny_tokenizer))
    model.config.residual_multiplier = 0.5  # a Granite-style rescaling the Llama adapter does not compute
    with pytest.raises(UnsupportedModelError) as error:
        layout_of(model)
    assert_one_line_naming_the_families(error, "residual_multiplier = 0.5")


def test_configs_are_refused_before_a_model_is_built(tiny_tokenizer):
    uneven = family_config("llama", len(tiny_tokenizer))
    uneven.num_key_value_heads = 3  # 4 query heads cannot share 3 key/value heads
    with pytest.raises(UnsupportedModelError, match="3 key/value heads"):
        check_supported(uneven)
    with pytest.raises(UnsupportedModelError, match="Gemma3ForCausalLM") as error:  # the multimodal Gemma 3
        adapter_for(SimpleNamespace(model_type="gemma3"))
    assert_one_line_naming_the_families(error)
