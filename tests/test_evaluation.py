import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_model
from surgery.evaluation import (BATCH_SIZE, answer, evaluate_panel, kl_divergence, mean_kl, next_token_logits,
                                perplexity, score_probes, text_log_probs)
from surgery.panels import Probe
from surgery.tokens import token_text

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
    right = Probe(PROMPTS[1], " " + token_text(tiny_tokenizer, top[1]))
    wrong_id = (top[2] + 3) % len(tiny_tokenizer) or 5
    wrong = Probe(PROMPTS[2], " " + token_text(tiny_tokenizer, wrong_id))
    scores = score_probes(tiny_model, tiny_tokenizer, [right, wrong])
    assert (scores.correct, scores.total) == (1, 2)
    assert [r.correct for r in scores.results] == [True, False]
    assert scores.results[0].target_rank == 1 and scores.results[1].target_rank > 1
    assert json.loads(json.dumps(scores.to_dict()))["correct"] == 1


def test_scores_over_several_batches_equal_one_probe_at_a_time(tiny_model, tiny_tokenizer):
    # more probes than one batch: scored batch by batch (memory bounded), each as if alone
    words = [w for w in (token_text(tiny_tokenizer, i).strip() for i in range(5, 200)) if w][: BATCH_SIZE + 7]
    probes = [Probe(PROMPTS[i % 3] + " the" * (i % 5), " " + w) for i, w in enumerate(words)]
    assert len(probes) > BATCH_SIZE
    many = score_probes(tiny_model, tiny_tokenizer, probes)
    alone = [score_probes(tiny_model, tiny_tokenizer, [p]).results[0] for p in probes]
    assert [(r.prompt, r.answer, r.target_rank) for r in many.results] == [
        (r.prompt, r.answer, r.target_rank) for r in alone]


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
    whole = float(kl_divergence(text_log_probs(tiny_model, tiny_tokenizer, texts),
                                text_log_probs(other, tiny_tokenizer, texts)))
    for chunk in (1, 5, 10_000):  # one position at a time, a chunk that does not divide the text, all at once
        assert mean_kl(tiny_model, other, tiny_tokenizer, texts, chunk=chunk) == pytest.approx(whole, rel=1e-5)
    assert math.isnan(mean_kl(tiny_model, other, tiny_tokenizer, [""]))  # no text: no number


def test_evaluate_panel(tiny_model, tiny_tokenizer, tiny_panel):
    result = evaluate_panel(tiny_model, tiny_tokenizer, tiny_panel)
    assert result.general.total == 2 and result.side_effects.total == 2
    assert result.perplexity == pytest.approx(perplexity(tiny_model, tiny_tokenizer, tiny_panel.perplexity_text))
    assert json.loads(json.dumps(result.to_dict()))["panel"] == "tiny"
