"""The bfloat16 screen of the vocabulary product (surgery.core.screen): its bound holds, its argmax is the float32
product's, and generation through it says the same on every family."""

import torch
from conftest import force_screen
from test_generation import PROMPTS

from surgery.arch import layout_of
from surgery.core.screen import MAX_CANDIDATES, Screen, screened_argmax, slack


def _weights(vocab: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(vocab, d, generator=g) * 0.05
    return w * torch.rand(vocab, 1, generator=g).mul(3).add(0.2)  # rows of different norms


def test_the_screens_error_is_within_its_bound():
    w = _weights(3000, 96, 0)
    x = torch.randn(40, 96, generator=torch.Generator().manual_seed(1)) * torch.logspace(-3, 3, 40)[:, None]
    exact = (x.double() @ w.double().T).float()
    coarse = (x.bfloat16() @ w.bfloat16().T).float()
    bound = slack(96) * w.norm(dim=-1)[None, :] * x.norm(dim=-1)[:, None]
    assert ((coarse - exact).abs() <= bound).all()
    assert ((coarse - exact).abs() > bound / 50).any()  # the bound is not vacuous: the screen does err


def test_screened_argmax_is_the_float32_products():
    w = _weights(5000, 64, 2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 64, generator=g) + 20 * w[torch.randint(0, 5000, (64,), generator=g)]  # clear winners
    x = torch.cat([x, torch.randn(64, 64, generator=g)])  # and rows with no clear winner
    assert torch.equal(screened_argmax(Screen.of(w), x), (x @ w.T).argmax(-1))


def test_a_winner_the_bfloat16_copy_cannot_tell_apart_is_found():
    # rows 7 and 8 are equal in bfloat16 and differ in float32: the screen keeps both, float32 picks the larger
    w = _weights(500, 32, 4)
    x = torch.randn(1, 32, generator=torch.Generator().manual_seed(5))
    w[7] = (10 * x[0] / x.norm()).bfloat16().float()  # representable in bfloat16
    w[8] = w[7] + x[0].sign() * w[7].abs() * 2.0**-12  # a larger logit, rounding back to row 7's values
    assert torch.equal(w[7].bfloat16(), w[8].bfloat16())
    assert screened_argmax(Screen.of(w), x).item() == (x @ w.T).argmax(-1).item() == 8
    w[9] = w[8]  # an exact tie: the lowest id, as torch.argmax picks
    assert screened_argmax(Screen.of(w), x).item() == (x @ w.T).argmax(-1).item() == 8


def test_rows_the_screen_cannot_decide_take_the_full_product():
    w = torch.ones(4 * MAX_CANDIDATES, 16)  # every token ties: all are candidates
    x = torch.randn(2, 16)
    assert torch.equal(screened_argmax(Screen.of(w), x), (x @ w.T).argmax(-1))
    bad = torch.tensor([[float("nan")] * 16, [1.0] * 16])
    assert torch.equal(screened_argmax(Screen.of(_weights(100, 16, 6)), bad), (bad @ _weights(100, 16, 6).T).argmax(-1))


def test_generation_through_the_screen_says_the_same_on_every_family(family_model, tiny_tokenizer, monkeypatch):
    from surgery.evaluation.generation import continuations

    ids = [tiny_tokenizer.convert_tokens_to_ids(w) for w in ("Paris", "three", "sat", "blue", "Tokyo", "cat")]
    budgets = [4, 6, 3, 5, 2, 6]
    plain = continuations(family_model, tiny_tokenizer, PROMPTS, budgets, first_ids=ids)
    with monkeypatch.context() as m:
        calls = force_screen(m)
        screened = continuations(family_model, tiny_tokenizer, PROMPTS, budgets, first_ids=ids)
    # the screen gave the tokens of every step after the first; not under a soft cap (Gemma 2), which can tie
    # saturated logits the screen would order
    assert bool(calls) == (layout_of(family_model).softcap(family_model.config) is None)
    assert (screened.texts, screened.ids) == (plain.texts, plain.ids)
    assert (screened.first_top, screened.first_rank) == (plain.first_top, plain.first_rank)
