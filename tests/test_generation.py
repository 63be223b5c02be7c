"""Greedy generation: batched continuations (length groups in lockstep, one shared unembedding per step) equal
one plain forward pass per new token, prompt by prompt."""

import pytest
import torch

from surgery.arch import layout_of
from surgery.generation import greedy_continuations
from surgery.tokens import encode_prompt

PROMPTS = ["The capital of France is", "Paris is the capital of", "The city of", "France is",
           "The capital of Italy is the city of", "Rome is"]


def plain_greedy(model, tokenizer, prompt: str, n: int) -> str:
    """``n`` greedy tokens, each from a forward pass over the whole sequence (no cache, no batch)."""
    ids = encode_prompt(tokenizer, prompt, layout_of(model).n_ctx)
    new = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True)


def test_batched_continuations_equal_plain_greedy_decoding(family_model, tiny_tokenizer):
    """Prompts of four lengths, budgets of 1 to 6 tokens, waves of at most 3 rows (groups split across waves)
    and of all rows: every continuation is the plain one."""
    budgets = [6, 3, 5, 1, 4, 6]
    expected = [plain_greedy(family_model, tiny_tokenizer, p, n) for p, n in zip(PROMPTS, budgets)]
    assert len(set(expected)) > 1
    for batch_size in (1, 3, 32):
        assert greedy_continuations(family_model, tiny_tokenizer, PROMPTS, budgets, batch_size=batch_size) == expected


@pytest.mark.realmodel
@pytest.mark.slow
def test_gemma_batched_continuations_equal_hf_generate(gemma):
    """Gemma 3 270M, 24 bundled capital prompts of several token lengths in one wave: every continuation is the
    one transformers' own greedy ``generate`` gives for that prompt alone."""
    from surgery.facts import load_facts
    from surgery.model_io import REPO_ROOT

    facts = load_facts(REPO_ROOT / "assets" / "facts" / "capital.jsonl")[:24]
    model, tokenizer = gemma.model, gemma.tokenizer
    n_ctx = layout_of(model).n_ctx
    lengths = {len(encode_prompt(tokenizer, f.prompt, n_ctx)) for f in facts}
    assert len(lengths) > 1  # several length groups step in lockstep
    got = greedy_continuations(model, tokenizer, [f.prompt for f in facts], 6)
    for fact, text in zip(facts, got):
        ids = torch.tensor([encode_prompt(tokenizer, fact.prompt, n_ctx)])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                                 pad_token_id=tokenizer.pad_token_id)
        assert text == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True), fact.prompt
