import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import make_non_finite_model, make_tiny_model

import surgery.edit.training as training
from surgery.arch import SITES, layout_of
from surgery.core.errors import InputError, NonFiniteError, SurgeryFailed, SurgeryTimeout
from surgery.diagnosis.diagnose import diagnose_batch
from surgery.edit.training import SurgeryConfig, choose_layer, operate
from surgery.edit.upper_stack import UpperStack, freeze_inputs
from surgery.evaluation.facts import Fact
from surgery.evaluation.scoring import next_token_logits, text_log_probs
from surgery.io.edit_file import edited_model

FAST = dict(lr=1e-2, kl_weight=50.0)  # the tiny random model needs bigger steps than the documented defaults


@pytest.fixture(scope="module")
def facts(tiny_panel):
    return list(tiny_panel.facts)


@pytest.fixture(scope="module")
def wv_result(tiny_model, tiny_tokenizer, facts, tiny_panel):
    return operate(tiny_model, tiny_tokenizer, facts, SurgeryConfig(site="wv", layer=1, **FAST), panel=tiny_panel)


def test_the_tiny_facts_need_fixing(tiny_model, tiny_tokenizer, facts):
    top = next_token_logits(tiny_model, tiny_tokenizer, [f.prompt for f in facts]).argmax(-1).tolist()
    correct = [tiny_tokenizer.decode([t]) == f.target.strip() for t, f in zip(top, facts)]
    assert correct == [False, True, False]  # France and Italy wrong, Japan right


def test_upper_stack_reproduces_the_model(tiny_model, tiny_tokenizer, facts, tiny_panel):
    """Captured block inputs + blocks layer.. + ln_f + unembedding == a plain forward pass."""
    for layer in range(3):
        frozen = freeze_inputs(tiny_model, tiny_tokenizer, facts, tiny_panel.unrelated_text, layer, 512)
        stack = UpperStack(tiny_model, layer)
        with torch.no_grad():
            logits = stack.fact_logits(frozen, {})
            lp = stack.text_log_probs(frozen, {})
        plain = next_token_logits(tiny_model, tiny_tokenizer, [f.prompt for f in facts])
        assert torch.allclose(logits, plain, atol=1e-5)
        assert torch.allclose(lp, text_log_probs(tiny_model, tiny_tokenizer, tiny_panel.unrelated_text), atol=1e-5)


def test_wv_fixes_the_facts_and_touches_only_the_v_slice(tiny_model, wv_result):
    r = wv_result.report
    assert r.comparison.facts_after == 3 and r.comparison.facts_before == 1
    assert [(f.correct_before, f.correct_after) for f in r.comparison.facts] == [
        (False, True),
        (True, True),
        (False, True),
    ]
    assert 0 < r.steps < r.epochs
    view = edited_model(tiny_model, wv_result.edit)
    layout = layout_of(tiny_model)
    base_w, new_w = tiny_model.transformer.h[1].attn.c_attn.weight, view.transformer.h[1].attn.c_attn.weight
    qk = slice(0, 2 * layout.d_model)
    assert torch.equal(base_w[:, qk], new_w[:, qk])  # Q and K bitwise
    assert torch.equal(tiny_model.transformer.h[1].attn.c_attn.bias, view.transformer.h[1].attn.c_attn.bias)
    assert not torch.equal(base_w[:, layout.qkv_columns("v")], new_w[:, layout.qkv_columns("v")])
    base_params, view_params = dict(tiny_model.named_parameters()), dict(view.named_parameters())
    for name, p in base_params.items():
        if name != "transformer.h.1.attn.c_attn.weight":
            assert torch.equal(p, view_params[name]), name
    w = r.weights
    assert w.qk_unchanged and w.others_unchanged and w.params_in_site == layout.d_model**2
    assert w.params_changed > 0 and w.delta_l2 > 0 and w.max_abs_delta > 0
    assert list(wv_result.edit.values) == ["transformer.h.1.attn.c_attn.weight"]


def test_report_is_json(wv_result):
    d = json.loads(json.dumps(wv_result.report.to_dict(), allow_nan=False))
    assert d["facts_fixed"] == "3/3" and d["facts_before"] == "1/3"
    assert d["weights"]["qk_unchanged"] is True and d["layer"] == 1 and d["layer_reason"] == "given"
    assert {"before", "after", "correct_before", "correct_after", "verdict"} <= set(d["facts"][0])
    assert d["panel_before"]["general"]["total"] == 2 and d["kl_unrelated"] >= 0
    assert d["config"]["lr"] == FAST["lr"]


@pytest.mark.parametrize("site", [s for s in SITES if s != "wv"])
def test_every_site_fixes_and_leaves_the_base_untouched(tiny_model, tiny_tokenizer, facts, tiny_panel, site):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    result = operate(tiny_model, tiny_tokenizer, facts, SurgeryConfig(site=site, layer=2, **FAST), panel=tiny_panel)
    assert result.report.comparison.facts_after == 3
    assert result.report.weights.others_unchanged and result.report.weights.qk_unchanged is None
    assert result.edit.numel == layout_of(tiny_model).site_size(tiny_model, site, 2)
    for name, value in tiny_model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert not any(p.requires_grad for p in tiny_model.parameters())


@pytest.mark.parametrize("term", ["topk", "hidden", "sampled"])
def test_every_preserve_term_fixes_and_leaves_the_base_untouched(tiny_model, tiny_tokenizer, facts, tiny_panel, term):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    # the hidden term is a relative squared drift, not a KL: on the tiny model it needs a smaller weight
    config = SurgeryConfig(
        site="wv", layer=1, preserve_term=term, **{**FAST, **({"kl_weight": 5.0} if term == "hidden" else {})}
    )
    result = operate(tiny_model, tiny_tokenizer, facts, config, panel=tiny_panel)
    assert result.report.comparison.facts_after == 3
    assert result.report.config["preserve_term"] == term
    assert result.report.weights.others_unchanged
    for name, value in tiny_model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_topk_term_is_the_bucketed_kl_when_the_subset_covers_the_vocabulary(
    tiny_model, tiny_tokenizer, facts, tiny_panel, monkeypatch
):
    """With top-k + subset covering the vocabulary the estimated normaliser is exact: the term is KL over the
    base's top-k tokens plus one bucket, computed from the full distributions; it is 0 at the base values."""
    import surgery.edit.preservation as preservation

    monkeypatch.setattr(preservation, "TOP_K", 8)  # the tiny vocabulary has 39 tokens
    frozen = freeze_inputs(tiny_model, tiny_tokenizer, facts, tiny_panel.unrelated_text, 1, 512)
    stack = UpperStack(tiny_model, 1)
    slices = layout_of(tiny_model).site_slices("wv", 1, tiny_model)
    base = dict(stack.block.named_parameters())
    values = {s.name: s.read(base[s.name[len(stack.prefix) :]]).detach().clone() for s in slices}
    base_params = stack.block_params(slices, values)
    term = preservation.TextPreservation("topk", stack, frozen, base_params, seed=0)
    assert term.n_sub == tiny_model.config.vocab_size  # the tiny vocabulary is below SUBSET
    with torch.no_grad():
        assert abs(float(term(base_params))) < 1e-6
        values = {
            n: v + 0.05 * torch.randn_like(v, generator=torch.Generator().manual_seed(1)) for n, v in values.items()
        }
        params = stack.block_params(slices, values)
        ref, lp = stack.text_log_probs(frozen, base_params), stack.text_log_probs(frozen, params)
        top_lp, top = ref.topk(8, -1)
        lq = lp.gather(-1, top)
        p_rest, q_rest = 1 - top_lp.exp().sum(-1), 1 - lq.exp().sum(-1)
        want = (top_lp.exp() * (top_lp - lq)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())
        assert torch.allclose(term(params), want.mean(), rtol=1e-4, atol=1e-7)


def test_deterministic_for_a_seed(tiny_model, tiny_tokenizer, facts, tiny_panel, wv_result):
    again = operate(tiny_model, tiny_tokenizer, facts, SurgeryConfig(site="wv", layer=1, **FAST), panel=tiny_panel)
    name = "transformer.h.1.attn.c_attn.weight"
    assert torch.equal(again.edit.values[name], wv_result.edit.values[name])
    assert again.report.steps == wv_result.report.steps


def test_progress_callback(tiny_model, tiny_tokenizer, facts, tiny_panel):
    calls = []
    result = operate(
        tiny_model,
        tiny_tokenizer,
        facts,
        SurgeryConfig(site="layer", layer=1, **FAST),
        panel=tiny_panel,
        progress=lambda step, total, loss: calls.append((step, total, loss)),
    )
    assert [c[0] for c in calls] == list(range(1, result.report.steps + 1))
    assert all(total == SurgeryConfig().epochs and loss > 0 for _, total, loss in calls)


def test_budget_exhausted_is_a_clear_failure(tiny_model, tiny_tokenizer, facts, tiny_panel):
    with pytest.raises(SurgeryFailed, match=r"not fixed within the budget: 1/3 facts correct after 2 epochs"):
        operate(
            tiny_model, tiny_tokenizer, facts, SurgeryConfig(site="wv", layer=1, lr=1e-5, epochs=2), panel=tiny_panel
        )


def test_a_surgery_past_its_time_limit_stops_mid_training(tiny_model, tiny_tokenizer, facts, tiny_panel, monkeypatch):
    """A fake clock that advances one second per training step: with max_seconds=2.5 the check before step 4
    stops the surgery with SurgeryTimeout (a SurgeryFailed), and no result comes back; without a limit (the
    default) the same clock never stops it."""
    clock = [0.0]
    monkeypatch.setattr(training.time, "monotonic", lambda: clock[0])

    def tick(step, total, loss):
        clock[0] += 1.0

    slow = dict(site="wv", layer=1, lr=1e-5, epochs=6)  # far from converging: it would run all 6 steps
    with pytest.raises(SurgeryTimeout, match=r"time limit of 2.5 s \(training block 1, step 4\); nothing was kept"):
        operate(
            tiny_model, tiny_tokenizer, facts, SurgeryConfig(**slow, max_seconds=2.5), panel=tiny_panel, progress=tick
        )
    assert issubclass(SurgeryTimeout, SurgeryFailed)
    clock[0] = 0.0
    with pytest.raises(SurgeryFailed, match="after 6 epochs") as failed:  # the step budget, not the clock
        operate(tiny_model, tiny_tokenizer, facts, SurgeryConfig(**slow), panel=tiny_panel, progress=tick)
    assert not isinstance(failed.value, SurgeryTimeout) and clock[0] == 6.0


def test_a_surgery_past_its_time_limit_before_training(tiny_model, tiny_tokenizer, facts, tiny_panel, monkeypatch):
    """The clock passes the limit right after the start: the first check, inside the generation that judges the
    facts before anything is trained, stops the surgery there."""
    clock = iter([0.0] + [10.0] * 1000)  # the start, then every check
    monkeypatch.setattr(training.time, "monotonic", lambda: next(clock))
    with pytest.raises(SurgeryTimeout, match=r"limit of 5 s \(while judging and diagnosing the facts\)"):
        operate(tiny_model, tiny_tokenizer, facts, SurgeryConfig(site="wv", layer=1, max_seconds=5), panel=tiny_panel)


def test_a_surgery_past_its_time_limit_stops_inside_the_evaluation(
    tiny_model, tiny_tokenizer, facts, tiny_panel, monkeypatch
):
    """The limit passes once the edit is trained: the evaluation's generations stop at their next token (the
    deadline is checked inside them), so the evaluation never finishes; without a limit it does."""
    clock = [0.0]
    monkeypatch.setattr(training.time, "monotonic", lambda: clock[0])
    real_compare, finished = training.compare, []

    def compare_after_the_limit(*args, **kwargs):
        clock[0] = 100.0
        result = real_compare(*args, **kwargs)
        finished.append(True)
        return result

    monkeypatch.setattr(training, "compare", compare_after_the_limit)
    config = SurgeryConfig(site="wv", layer=1, **FAST)
    with pytest.raises(SurgeryTimeout, match=r"limit of 50 s \(while evaluating the edit\); nothing was kept"):
        operate(tiny_model, tiny_tokenizer, facts, replace(config, max_seconds=50), panel=tiny_panel)
    assert finished == []
    clock[0] = 0.0
    assert operate(tiny_model, tiny_tokenizer, facts, config, panel=tiny_panel).edit is not None
    assert finished == [True]


def test_a_loss_that_diverges_stops_and_keeps_nothing(tiny_model, tiny_tokenizer, facts, tiny_panel):
    """A step so large that the forward overflows: one line naming the step, no edit returned, the base untouched."""
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    with pytest.raises(SurgeryFailed, match=r"training diverged: the loss became nan at step 1; try a lower"):
        operate(tiny_model, tiny_tokenizer, facts, SurgeryConfig(site="wv", layer=1, lr=1e30), panel=tiny_panel)
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())


def test_non_finite_model_is_refused_before_training(tiny_tokenizer, facts, tiny_panel):
    """A NaN weight set in memory: refused by the diagnosis operate runs first. Activations that overflow only on the
    preservation text ("cat" embedded at 3e38, untied from the unembedding): refused at step 0, not reported as a
    divergence that a lower learning rate would cure."""
    config = SurgeryConfig(site="wv", layer=1, **FAST)
    nan_model = make_non_finite_model(len(tiny_tokenizer), float("nan"))
    with pytest.raises(NonFiniteError, match=r"NaN or inf after L2 \(transformer\.h\.1\)"):
        operate(nan_model, tiny_tokenizer, facts, config, panel=tiny_panel)
    model = make_tiny_model(len(tiny_tokenizer), tie_word_embeddings=False)
    with torch.no_grad():
        model.transformer.wte.weight[tiny_tokenizer.convert_tokens_to_ids("cat")] = 3e38
    with pytest.raises(NonFiniteError, match=r"the loss is nan before any training step at block 1 .*preservation nan"):
        operate(model, tiny_tokenizer, facts, config, unrelated=["the cat sat on the mat ."], panel=tiny_panel)


def test_auto_layer_is_the_most_common_prescribed_layer(demo):
    """On the demo model (six routing failures; the tiny random model holds none under the routing rule)."""
    from surgery.evaluation.panels import DEMO_PANEL, load_panel

    panel = load_panel(DEMO_PANEL)
    facts = list(panel.facts)
    diagnoses = diagnose_batch(demo.model, demo.tokenizer, [f.prompt for f in facts], [f.target for f in facts])
    routing = [d.prescribed_layer for d in diagnoses if d.verdict == "routing"]
    assert routing, "the demo facts hold routing failures"
    layer, reason, verdicts = choose_layer(demo.model, demo.tokenizer, facts)
    assert layer == max(set(routing), key=routing.count) and verdicts == [d.verdict for d in diagnoses]
    assert reason.startswith("auto: block") and "routing" in reason
    result = operate(demo.model, demo.tokenizer, facts, SurgeryConfig(site="wv"), panel=panel)
    assert result.report.layer == layer and result.report.layer_reason == reason


def test_auto_layer_without_routing_failures(tiny_model, tiny_tokenizer, monkeypatch):
    class D:
        verdict, prompt, prescribed_layer = "absence", "The capital of France is", 0

    monkeypatch.setattr(training, "diagnose_batch", lambda *a, **k: [D()])
    with pytest.raises(InputError, match="absence.*--layer N"):
        choose_layer(tiny_model, tiny_tokenizer, [Fact("The capital of France is", " Paris")])


def test_nothing_to_fix(tiny_model, tiny_tokenizer, tiny_panel):
    with pytest.raises(InputError, match="nothing to fix"):
        operate(
            tiny_model,
            tiny_tokenizer,
            [Fact("The capital of Japan is", " Tokyo")],
            SurgeryConfig(layer=1),
            panel=tiny_panel,
        )


def test_bad_input(tiny_model, tiny_tokenizer, facts, tiny_panel):
    with pytest.raises(InputError, match="no facts"):
        operate(tiny_model, tiny_tokenizer, [], SurgeryConfig(layer=1), panel=tiny_panel)
    with pytest.raises(InputError, match="out of range"):
        operate(tiny_model, tiny_tokenizer, facts, SurgeryConfig(layer=3), panel=tiny_panel)
    with pytest.raises(InputError, match="vocabulary"):
        operate(
            tiny_model,
            tiny_tokenizer,
            [Fact("The capital of France is", " Zanzibar")],
            SurgeryConfig(layer=1),
            panel=tiny_panel,
        )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(site="qk"), "unknown site 'qk'"),
        (dict(layer=-1), "block index"),
        (dict(lr=0.0), "learning rate"),
        (dict(lr=float("nan")), "learning rate"),
        (dict(epochs=0), "epochs"),
        (dict(kl_weight=-1.0), "kl_weight"),
        (dict(max_seconds=0), "max_seconds"),
        (dict(max_seconds=float("inf")), "max_seconds"),
        (dict(max_seconds=True), "max_seconds"),
        (dict(preserve_term="l2"), "unknown preserve_term 'l2'"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(InputError, match=message):
        SurgeryConfig(**kwargs)


def test_config_round_trips():
    config = SurgeryConfig(site="mlp", layer=4, lr=3e-4)
    assert SurgeryConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(InputError, match="unknown surgery option"):
        SurgeryConfig.from_dict({"sight": "wv"})


def test_any_model_gets_evaluated_without_a_fitting_panel(tiny_model, tiny_tokenizer, facts):
    """A custom-vocabulary GPT-2 (not the demo model) has no bundled panel in its vocabulary: operate still runs
    on the facts and the given unrelated text, and the report says which probes could not be scored."""
    unrelated = ["the cat sat on the mat . the dog was in the sea ."]
    r = operate(
        tiny_model, tiny_tokenizer, facts, SurgeryConfig(site="wv", layer=1, **FAST), unrelated=unrelated
    ).report
    assert r.comparison.facts_after == 3
    assert r.config["panel"] == "english"
    assert any(n.startswith("not scored: general:") for n in r.notes)
    assert r.comparison.unavailable and r.to_dict()["unavailable"] == r.comparison.unavailable
    assert r.final_kl > 0  # the preservation term ran on the given text


def test_evaluation_reports_generalization_and_specificity(tiny_model, tiny_tokenizer, tiny_panel):
    from dataclasses import replace

    panel = replace(
        tiny_panel,
        relation=(Fact("The capital of Spain is", " Madrid"),),
        neighbourhood=(Fact("the cat sat on the", " mat"),),
    )
    facts = [
        Fact("The capital of France is", " Paris", ("the capital of France is",)),
        Fact("The capital of Italy is", " Rome"),
    ]
    r = operate(tiny_model, tiny_tokenizer, facts, SurgeryConfig(site="wv", layer=1, **FAST), panel=panel).report
    e = r.to_dict()["evaluation"]
    assert [e["efficacy"][k] for k in ("before", "after", "total")] == [0, 2, 2]
    assert e["paraphrase"]["total"] == 1 and e["relation"]["total"] == 1
    assert e["specificity"]["total"] == len(panel.side_effects) + 1
    assert e["relation"]["fixed"] + e["relation"]["broken"] <= 1
    rel_before = r.comparison.panel_before.relation.results[0]
    assert e["relation"]["before"] == int(rel_before.correct)
    assert any(row[0].startswith("unedited facts") for row in r.rows())


def test_preserved_prompts_keep_what_the_model_says(tiny_model, tiny_tokenizer, facts, tiny_panel):
    """The panel's ``preserve`` prompts join the preservation term: after a repair that carries over to them
    without it, their next-token distribution moves less with it. An edited prompt is never preserved."""
    keep = [Fact("The capital of Spain is", " Madrid"), Fact("the cat sat on the", " mat")]
    prompts = [p.prompt for p in keep]
    base = F.log_softmax(next_token_logits(tiny_model, tiny_tokenizer, prompts).float(), -1)

    def drift(preserve):
        r = operate(
            tiny_model,
            tiny_tokenizer,
            facts,
            SurgeryConfig(site="wv", layer=1, **FAST),
            panel=tiny_panel,
            preserve=preserve,
        )
        after = F.log_softmax(next_token_logits(edited_model(tiny_model, r.edit), tiny_tokenizer, prompts).float(), -1)
        return r.report.config["preserved_prompts"], float((base.exp() * (base - after)).sum(-1).mean())

    (n_without, without), (n_with, with_) = drift([]), drift(keep + [facts[0]])
    assert (n_without, n_with) == (0, 2)  # the edited fact's prompt is left out
    assert with_ < without, (with_, without)


def test_a_preserve_prompt_that_cannot_be_encoded_is_named_in_the_notes(tiny_model, tiny_tokenizer, facts, tiny_panel):
    """A preserve prompt this tokenizer cannot encode (a word outside the tiny vocabulary) is left out of the
    preservation term, and the report says so instead of counting it silently."""
    keep = [Fact("The capital of Spain is", " Madrid"), Fact("The capital of Zanzibarqux is", " Zq")]
    r = operate(
        tiny_model, tiny_tokenizer, facts, SurgeryConfig(site="wv", layer=1, **FAST), panel=tiny_panel, preserve=keep
    )
    assert r.report.config["preserved_prompts"] == 1
    (note,) = [n for n in r.report.notes if n.startswith("not preserved")]
    assert "1 preserve prompt(s)" in note and "Zanzibarqux" in note


def test_mini_batches_give_the_full_batch_step(tiny_model, tiny_tokenizer, facts, tiny_panel):
    """Facts split into mini-batches (gradient accumulated) train exactly as one batch, up to float order."""
    from surgery.edit.upper_stack import freeze_fact_batches

    config = SurgeryConfig(site="wv", layer=1, **FAST)
    one = training.train_site(
        tiny_model,
        freeze_fact_batches(tiny_model, tiny_tokenizer, facts, tiny_panel.unrelated_text, 1, 512, 64),
        "wv",
        1,
        config,
    )
    batches = freeze_fact_batches(tiny_model, tiny_tokenizer, facts, tiny_panel.unrelated_text, 1, 512, 1)
    assert [len(b.targets) for b in batches] == [1, 1, 1] and batches[1].text is None
    split = training.train_site(tiny_model, batches, "wv", 1, config)
    assert split.steps == one.steps and split.fixed == one.fixed == 3
    for name, value in one.values.items():
        torch.testing.assert_close(split.values[name], value, atol=1e-5, rtol=0)
    with pytest.raises(InputError, match="batch_size"):
        SurgeryConfig(batch_size=0)


@pytest.mark.slow
def test_surgery_exact_with_blocks_offloaded_to_disk(demo, tmp_path):
    """A model spread by device_map (accelerate big-model inference), blocks 1 and 3 on disk: an edit of block 2
    trains exactly as in memory (same edit, same steps), and its untouched tensors are still checked. The edited
    block itself must be held in memory: one clear error otherwise."""
    from test_census import offload_map

    from surgery.core.errors import EditError
    from surgery.evaluation.panels import DEMO_PANEL, load_panel
    from surgery.io.loading import load_model

    panel = load_panel(DEMO_PANEL)
    facts = list(panel.facts)
    blocks = layout_of(demo.model).adapter.blocks
    off = load_model(
        demo.source, device_map=offload_map(demo.model, blocks, on_disk={1, 3}), offload_folder=tmp_path / "offload"
    )
    assert any(p.device.type == "meta" for p in off.model.parameters())  # really offloaded
    config = SurgeryConfig(site="wv", layer=2)
    a = operate(demo.model, demo.tokenizer, facts, config, panel=panel)
    b = operate(off.model, off.tokenizer, facts, config, panel=panel)
    assert a.report.steps == b.report.steps and b.report.comparison.facts_after == len(facts)
    for name, value in a.edit.values.items():
        torch.testing.assert_close(b.edit.values[name], value, atol=1e-5, rtol=0)
    assert b.report.weights.others_unchanged and b.report.weights.qk_unchanged
    with pytest.raises(EditError, match="offloaded"):
        operate(off.model, off.tokenizer, facts, SurgeryConfig(site="wv", layer=1), panel=panel)


def test_a_fact_is_fixed_only_when_every_piece_leads():
    """Two facts: one of two pieces, one of one. The first is fixed only once both of its pieces lead by the
    margin; a right first piece alone does not count."""
    logits = torch.zeros(3, 5)
    targets, rows = torch.tensor([1, 2, 3]), torch.tensor([0, 0, 1])
    logits[0, 1] = logits[2, 3] = 1.0  # piece 0 of fact 0 and fact 1 lead; piece 1 of fact 0 does not
    assert training._n_fixed(logits, targets, rows, 2, 0.1) == 1
    logits[1, 2] = 0.05
    assert (
        training._n_fixed(logits, targets, rows, 2, 0.1) == 1 and training._n_fixed(logits, targets, rows, 2, 0.0) == 2
    )
    logits[1, 2] = 0.5
    assert training._n_fixed(logits, targets, rows, 2, 0.1) == 2


def test_default_lr_follows_the_weights_scale(tiny_model, tiny_tokenizer, facts, tiny_panel):
    """lr None: lr_scale x RMS of the site's base values (reported as lr_start); a given lr is used as it is."""
    from surgery.edit.training import site_lr

    values = {"w": torch.full((4, 4), 0.5)}
    assert site_lr(values, SurgeryConfig()) == pytest.approx(SurgeryConfig().lr_scale * 0.5)
    assert site_lr(values, SurgeryConfig(lr=3e-4)) == 3e-4
    r = operate(
        tiny_model,
        tiny_tokenizer,
        facts,
        SurgeryConfig(site="wv", layer=1, epochs=2),
        panel=tiny_panel,
        require_all=False,
    ).report
    assert r.config["lr"] is None and r.config["lr_start"] > 0
    assert r.tried == [
        {
            "layer": 1,
            "steps": r.steps,
            "lr": r.config["lr_start"],
            "backoffs": r.tried[0]["backoffs"],
            "fixed": r.tried[0]["fixed"],
            "total": len(facts),
        }
    ]


def test_candidate_layers_prescribed_first_then_beside():
    from types import SimpleNamespace

    from surgery.edit.training import candidate_layers

    def d(prescribed, override=5, verdict="routing"):
        return SimpleNamespace(verdict=verdict, prescribed_layer=prescribed, override={"layer": override, "head": 0})

    diagnoses = [d(3), d(3), d(1), d(2, verdict="absence")]
    assert candidate_layers(diagnoses, 3) == [3, 1, 2]
    assert candidate_layers([d(4)], 4) == [4, 3]  # block 5 holds the override: never tried
    assert candidate_layers([d(0, override=3)], 0) == [0, 1]


def test_auto_layer_tries_the_next_block_when_the_budget_runs_out(demo):
    """One epoch cannot fix the demo's capitals: --layer auto goes on to the next candidate, with its own
    budget, keeps the best, and the report lists every block it tried."""
    from surgery.evaluation.panels import DEMO_PANEL, load_panel

    panel = load_panel(DEMO_PANEL)
    r = operate(
        demo.model,
        demo.tokenizer,
        list(panel.facts),
        SurgeryConfig(site="wv", epochs=1),
        panel=panel,
        require_all=False,
    ).report
    layers = [t["layer"] for t in r.tried]
    assert layers == [2, 1] and r.layer in layers  # the prescribed block, then the one below (3 holds the override)
    assert all(t["steps"] == 1 for t in r.tried)
    assert any(n.startswith("blocks tried:") for n in r.notes)
    assert r.to_dict()["tried"] == r.tried
