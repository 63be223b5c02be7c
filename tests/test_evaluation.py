import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model

from surgery.core.tokens import token_text
from surgery.evaluation.facts import Fact
from surgery.evaluation.generation import greedy_continuations
from surgery.evaluation.scoring import (
    BATCH_SIZE,
    answer,
    evaluate_panel,
    fluency,
    fluency_prompts,
    kl_divergence,
    mean_kl,
    next_token_logits,
    ngram_entropy,
    perplexity,
    score_lists,
    score_probes,
    text_log_probs,
)

PROMPTS = ["The capital of France is", "one two", "the cat sat on the mat . the dog"]


def _plain_logits(model, tokenizer, prompt):
    return model(torch.tensor([tokenizer(prompt)["input_ids"]])).logits[0, -1]


def test_batched_next_token_logits_equal_one_at_a_time(tiny_model, tiny_tokenizer):
    batched = next_token_logits(tiny_model, tiny_tokenizer, PROMPTS)  # right-padded, different lengths
    for i, prompt in enumerate(PROMPTS):
        assert torch.allclose(batched[i], _plain_logits(tiny_model, tiny_tokenizer, prompt), atol=1e-5)


def test_answer_and_scores(tiny_model, tiny_tokenizer):
    top = [int(_plain_logits(tiny_model, tiny_tokenizer, p).argmax()) for p in PROMPTS]
    assert answer(tiny_model, tiny_tokenizer, PROMPTS[0]) == token_text(tiny_tokenizer, top[0])
    right = Fact(PROMPTS[1], " " + token_text(tiny_tokenizer, top[1]))
    wrong_id = (top[2] + 3) % len(tiny_tokenizer) or 5
    wrong = Fact(PROMPTS[2], " " + token_text(tiny_tokenizer, wrong_id))
    scores = score_probes(tiny_model, tiny_tokenizer, [right, wrong])
    assert (scores.correct, scores.total) == (1, 2)
    assert [r.correct for r in scores.results] == [True, False]
    assert scores.results[0].target_rank == 1 and scores.results[1].target_rank > 1
    assert json.loads(json.dumps(scores.to_dict()))["correct"] == 1


def test_scores_over_several_batches_equal_one_probe_at_a_time(tiny_model, tiny_tokenizer):
    # more probes than one batch: scored batch by batch (memory bounded), each as if alone
    words = [w for w in (token_text(tiny_tokenizer, i).strip() for i in range(5, 200)) if w][: BATCH_SIZE + 7]
    probes = [Fact(PROMPTS[i % 3] + " the" * (i % 5), " " + w) for i, w in enumerate(words)]
    assert len(probes) > BATCH_SIZE
    many = score_probes(tiny_model, tiny_tokenizer, probes)
    alone = [score_probes(tiny_model, tiny_tokenizer, [p]).results[0] for p in probes]
    assert [(r.prompt, r.answer, r.target_rank) for r in many.results] == [
        (r.prompt, r.answer, r.target_rank) for r in alone
    ]


def test_perplexity_is_exp_of_the_mean_nll(tiny_model, tiny_tokenizer):
    text = "the cat sat on the mat . the dog sat on the mat ."
    ids = torch.tensor([tiny_tokenizer(text)["input_ids"]])
    loss = tiny_model(ids, labels=ids).loss
    assert perplexity(tiny_model, tiny_tokenizer, text) == pytest.approx(math.exp(float(loss)), rel=1e-5)


def test_text_log_probs_cover_every_real_position(tiny_model, tiny_tokenizer):
    texts = ["the cat sat on the mat", "one two three"]
    lp = text_log_probs(tiny_model, tiny_tokenizer, texts)
    assert lp.shape == (6 + 3, len(tiny_tokenizer))
    plain = F.log_softmax(tiny_model(torch.tensor([tiny_tokenizer(texts[1])["input_ids"]])).logits[0], -1)
    assert torch.allclose(lp[6:], plain, atol=1e-5)


def test_mean_kl(tiny_model, tiny_tokenizer, tiny_panel):
    texts = tiny_panel.unrelated_text
    assert mean_kl(tiny_model, tiny_model, tiny_tokenizer, texts) == pytest.approx(0.0, abs=1e-7)
    other = make_tiny_model(len(tiny_tokenizer), seed=1)
    assert mean_kl(tiny_model, other, tiny_tokenizer, texts) > 0.01


def test_mean_kl_in_chunks_equals_the_whole_distributions(tiny_model, tiny_tokenizer, tiny_panel):
    texts, other = tiny_panel.unrelated_text, make_tiny_model(len(tiny_tokenizer), seed=1)
    whole = float(
        kl_divergence(text_log_probs(tiny_model, tiny_tokenizer, texts), text_log_probs(other, tiny_tokenizer, texts))
    )
    for chunk in (1, 5, 10_000):  # one position at a time, a chunk that does not divide the text, all at once
        assert mean_kl(tiny_model, other, tiny_tokenizer, texts, chunk=chunk) == pytest.approx(whole, rel=1e-5)
    assert math.isnan(mean_kl(tiny_model, other, tiny_tokenizer, [""]))  # no text: no number


def test_evaluate_panel(tiny_model, tiny_tokenizer, tiny_panel):
    result = evaluate_panel(tiny_model, tiny_tokenizer, tiny_panel)
    assert result.general.total == 2 and result.side_effects.total == 2
    assert result.perplexity == pytest.approx(perplexity(tiny_model, tiny_tokenizer, tiny_panel.perplexity_text))
    assert json.loads(json.dumps(result.to_dict()))["panel"] == "tiny"


def _first_token_trap(model, tokenizer, prompt: str) -> Fact:
    """A target whose first token is the model's top-1 next token but which the model does not go on to say:
    its first generated word, then a word it does not generate next."""
    words = greedy_continuations(model, tokenizer, [prompt], 2)[0].split()
    other = next(w for w in ("Tokyo", "Rome", "Madrid") if w != words[1])
    return Fact(prompt, f" {words[0]} {other}")


def test_score_probes_judges_what_the_model_says(tiny_model, tiny_tokenizer):
    said_text = greedy_continuations(tiny_model, tiny_tokenizer, [PROMPTS[1]], 3)[0]
    right = Fact(PROMPTS[1], " " + said_text.split()[0])
    trap = _first_token_trap(tiny_model, tiny_tokenizer, PROMPTS[2])
    scores = score_probes(tiny_model, tiny_tokenizer, [right, trap])
    r, t = scores.results
    assert (r.correct, r.lenient, r.first_token_correct) == (True, True, True)
    assert said_text.startswith(r.said)
    # the first token is right, the answer is not: wrong by generation, right by the first-token diagnostic
    assert (t.correct, t.first_token_correct, t.target_rank) == (False, True, 1)
    assert t.answer.strip() == t.target.split()[0] and not t.said.lstrip().startswith(t.target.strip())
    assert (scores.correct, scores.lenient, scores.first_token_correct, scores.total) == (1, 1, 2, 2)
    d = json.loads(json.dumps(scores.to_dict()))
    assert (d["correct"], d["lenient"], d["first_token_correct"]) == (1, 1, 2)
    assert d["results"][1]["said"] == t.said


def test_score_lists_equal_each_list_alone(tiny_model, tiny_tokenizer, tiny_panel):
    lists = {"facts": list(tiny_panel.facts), "none": [], "general": list(tiny_panel.general)}
    split = score_lists(tiny_model, tiny_tokenizer, lists)
    assert list(split) == list(lists)
    for name, probes in lists.items():
        assert split[name].results == score_probes(tiny_model, tiny_tokenizer, probes).results


def test_ngram_entropy_is_roms_weighted_mean():
    # 2-grams (a,b) x3, (b,a) x2; 3-grams (a,b,a) x2, (b,a,b) x2
    h2 = -(0.6 * math.log2(0.6) + 0.4 * math.log2(0.4))
    assert ngram_entropy("a b a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert ngram_entropy("the the the the the the") == 0.0  # one 2-gram, one 3-gram
    assert ngram_entropy("") == 0.0 and ngram_entropy("one") == 0.0
    varied = "the cat sat on the mat, and the dog lay by the door of the old house."
    assert ngram_entropy(varied) > ngram_entropy("the cat sat. the cat sat. the cat sat. the cat sat.")


def test_fluency(tiny_model, tiny_tokenizer, tiny_panel):
    prompts = fluency_prompts(list(tiny_panel.facts) * 2, tiny_panel, general=1)
    assert prompts == [f.prompt for f in tiny_panel.facts] + ["the cat sat on the"]  # facts first, no repeats
    assert fluency_prompts(tiny_panel.facts, tiny_panel, general=5, edited=2) == [
        f.prompt for f in tiny_panel.facts[:2]
    ] + [p.prompt for p in tiny_panel.general]  # both capped
    f = fluency(tiny_model, tiny_tokenizer, prompts, tokens=10)
    assert f.texts == greedy_continuations(tiny_model, tiny_tokenizer, prompts, 10)
    assert f.entropies == [ngram_entropy(t) for t in f.texts]
    assert f.mean == pytest.approx(sum(f.entropies) / len(prompts))
    assert json.loads(json.dumps(f.to_dict()))["tokens"] == 10
