import copy

import pytest
import torch

from surgery.arch import layout_of
from surgery.core.errors import InputError
from surgery.core.tokens import encode_prompt
from surgery.evaluation.generation import LENIENT_WORDS, Judgement, decided, greedy_continuations, judge, said

PROMPTS = [
    "The capital of France is",
    "one two",
    "the cat sat on the mat . the dog",
    "the sky is",
    "The capital of Japan is",
    "a big red dog and",
]


@pytest.mark.parametrize(
    "continuation, target, expected",
    [
        (" Paris.", " Paris", (True, True)),
        (" Paris is a city", " Paris", (True, True)),
        ("Paris", " Paris", (True, True)),  # leading whitespace ignored on both sides
        (" Parisian food", " Paris", (False, False)),  # not at a word boundary
        (" Pa", " Paris", (False, False)),  # the first token alone is not the answer
        (" Tir", " Tirana", (False, False)),
        (" Dazaibakt", " D", (False, False)),
        (" paris", " Paris", (False, False)),  # case counts
        (" New York City", " New York", (True, True)),
        (" New Yorker", " New York", (False, False)),
        (" the south of France", " France", (False, True)),
        (" one two three four five France", " France", (False, True)),  # the 6th word: still lenient
        (" one two three four five six France", " France", (False, False)),  # the 7th: too late
        (" the Parisian Paris", " Paris", (False, True)),  # a later occurrence at word boundaries counts
        (" Paris", " ", (False, False)),  # an empty answer is never said
    ],
)
def test_judge(continuation, target, expected):
    assert LENIENT_WORDS == 6
    assert judge(continuation, target) == Judgement(*expected)


@pytest.mark.parametrize(
    "continuation, target, expected",
    [
        ("", " Paris", False),  # nothing yet
        (" Pa", " Paris", False),  # may still become " Paris"
        (" Paris", " Paris", False),  # may still become " Parisian"
        (" Paris ", " Paris", True),
        (" Paris.", " Paris", True),
        (" Lyon", " Paris", False),  # the answer may still come within the window
        (" Parisian", " Paris", False),
        (" the Paris", " Paris", False),  # a lenient match at the end may grow into " the Parisian"
        (" the Paris is", " Paris", True),
        (" a b c d e", " Paris", False),  # the 5th word may go on, a 6th may follow
        (" a b c d e f", " Paris", False),  # the 6th word may still go on (" f" -> " fine"): not complete
        (" a b c d e f ", " Paris", True),  # six complete words without the answer: settled
    ],
)
def test_decided(continuation, target, expected):
    assert decided(continuation, target) is expected


def test_decided_never_settles_a_verdict_that_more_text_changes():
    # Every prefix that decided() calls settled must judge as the whole text does.
    for text, target in [
        (" Parisian food in the south of France", " Paris"),
        (" the Paris of the east", " Paris"),
        (" Paris, of course", " Paris"),
        (" a b c d e France g", " France"),
        (" Tiranaa Tirana", " Tirana"),
    ]:
        for end in range(len(text) + 1):
            if decided(text[:end], target):
                assert judge(text[:end], target) == judge(text, target), (text[:end], target)


def _reference(model, tokenizer, prompt: str, new_tokens: int) -> str:
    """transformers' own greedy decoding of one prompt, the new text only."""
    ids = torch.tensor([encode_prompt(tokenizer, prompt, layout_of(model).n_ctx)])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_greedy_continuations_equal_generate_on_every_family(family_model, tiny_tokenizer):
    # prompts of several lengths, some of one length (batched together through the KV cache)
    batched = greedy_continuations(family_model, tiny_tokenizer, PROMPTS, 6, batch_size=2)
    assert batched == [greedy_continuations(family_model, tiny_tokenizer, [p], 6)[0] for p in PROMPTS]
    assert batched == [_reference(family_model, tiny_tokenizer, p, 6) for p in PROMPTS]
    # rows of one batch that stop at different steps leave the batch and its cache; the others go on unchanged
    budgets = [1, 6, 3, 5, 2, 4]
    shrinking = greedy_continuations(family_model, tiny_tokenizer, PROMPTS, budgets)
    assert shrinking == [
        greedy_continuations(family_model, tiny_tokenizer, [p], b)[0] for p, b in zip(PROMPTS, budgets)
    ]
    assert all(full.startswith(cut) for full, cut in zip(batched, shrinking))
    vocab = tiny_tokenizer.get_vocab()
    targets = [" " + (text.split()[0] if text.split() and text.split()[0] in vocab else "Paris") for text in batched]
    assert said(family_model, tiny_tokenizer, PROMPTS, targets) == [
        said(family_model, tiny_tokenizer, [p], [t])[0] for p, t in zip(PROMPTS, targets)
    ]


def test_lockstep_waves_equal_one_group_at_a_time_on_every_family(family_model, tiny_tokenizer):
    # prompts of several lengths in one wave (one unembedding a step for all of them), in waves of 1 and 3 rows,
    # and each alone: the same texts, first tokens and ranks
    from surgery.evaluation.generation import continuations

    ids = [tiny_tokenizer.convert_tokens_to_ids(w) for w in ("Paris", "three", "sat", "blue", "Tokyo", "cat")]
    targets = [" Paris", " three", None, " blue", None, " cat"]
    budgets = [4, 6, 3, 5, 2, 6]
    waves = [
        continuations(family_model, tiny_tokenizer, PROMPTS, budgets, targets, ids, batch_size=size)
        for size in (128, 3, 1)
    ]
    alone = [
        continuations(family_model, tiny_tokenizer, [p], [b], [t], [i])
        for p, b, t, i in zip(PROMPTS, budgets, targets, ids)
    ]
    for got in waves:
        assert got.texts == [a.texts[0] for a in alone]
        assert got.first_top == [a.first_top[0] for a in alone]
        assert got.first_rank == [a.first_rank[0] for a in alone]
        assert got.ids == [a.ids[0] for a in alone]


def test_a_memo_answers_the_rows_it_holds_and_only_for_its_model(family_model, tiny_tokenizer, monkeypatch):
    from surgery.evaluation import generation
    from surgery.evaluation.memo import EvaluationMemo

    memo = EvaluationMemo(family_model)
    plain = generation.continuations(family_model, tiny_tokenizer, PROMPTS[:4], [3, 4, 5, 6], first_ids=[5, 6, 7, 8])
    first = generation.continuations(
        family_model, tiny_tokenizer, PROMPTS[:4], [3, 4, 5, 6], first_ids=[5, 6, 7, 8], memo=memo
    )
    assert first == plain and len(memo) == 4
    rows = []
    wave = generation._generate_wave
    monkeypatch.setattr(
        generation, "_generate_wave", lambda m, t, groups, *a: rows.append(groups) or wave(m, t, groups, *a)
    )
    again = generation.continuations(
        family_model, tiny_tokenizer, PROMPTS, [3, 4, 5, 6, 2, 2], first_ids=[5, 6, 7, 8, 9, 9], memo=memo
    )
    assert again.texts[:4] == plain.texts and again.first_rank[:4] == plain.first_rank
    assert sum(len(g) for groups in rows for g in groups) == 2  # only the two rows it did not hold
    # another budget, target or first token asked is another row; another model finds nothing
    rows.clear()
    generation.continuations(family_model, tiny_tokenizer, PROMPTS[:1], 4, memo=memo)
    assert len(rows) == 1
    rows.clear()
    other = copy.deepcopy(family_model)  # the same weights, another object (as an edited view is)
    generation.continuations(other, tiny_tokenizer, PROMPTS[:1], 3, first_ids=[5], memo=memo)
    assert len(rows) == 1 and len(memo) == 7


def test_greedy_continuations_equal_generate_on_the_demo_model(demo, demo_panels):
    prompts = [p["prompt"] for p in demo_panels["facts"] + demo_panels["general"]][:12]
    batched = greedy_continuations(demo.model, demo.tokenizer, prompts, 8)
    assert batched == [_reference(demo.model, demo.tokenizer, p, 8) for p in prompts]


def test_said_stops_once_decided_and_judges_the_continuation(tiny_model, tiny_tokenizer):
    full = greedy_continuations(tiny_model, tiny_tokenizer, PROMPTS, 12)
    vocab = tiny_tokenizer.get_vocab()
    targets = [
        " " + (text.split()[0] if text.split() and text.split()[0] in vocab else "Paris") for text in full
    ]  # what the model says first
    targets[1] = " Tokyo Tokyo Tokyo"  # (almost surely) not said
    out = said(tiny_model, tiny_tokenizer, PROMPTS, targets)
    for (text, verdict), whole, target in zip(out, full, targets):
        assert whole.startswith(text)  # the same greedy path, cut once decided
        assert verdict == judge(text, target) == judge(whole, target)
    assert out[0][1].strict and not out[1][1].strict


def test_greedy_continuations_refuse_bad_budgets(tiny_model, tiny_tokenizer):
    for budget in (0, [3], -1):
        with pytest.raises(InputError):
            greedy_continuations(tiny_model, tiny_tokenizer, PROMPTS[:2], budget)
    with pytest.raises(InputError):
        greedy_continuations(tiny_model, tiny_tokenizer, PROMPTS[:2], 3, targets=[" Paris"])


def test_greedy_continuations_stop_at_the_context(tiny_model, tiny_tokenizer):
    prompt = " ".join(["the"] * 30)  # 30 of the tiny GPT-2's 32 positions
    text = greedy_continuations(tiny_model, tiny_tokenizer, [prompt], 10)[0]
    assert len(tiny_tokenizer(text)["input_ids"]) <= 2


def test_first_step_gives_the_first_token_figures(family_model, tiny_tokenizer):
    # top-1 and the target's rank from the generation's first step equal those of one padded next-token pass
    from surgery.evaluation.facts import Fact
    from surgery.evaluation.generation import continuations
    from surgery.evaluation.scoring import target_scores

    probes = [Fact(p, t) for p, t in zip(PROMPTS, [" Paris", " three", " sat", " blue", " Tokyo", " cat"])]
    ids = [tiny_tokenizer.convert_tokens_to_ids(p.target.strip()) for p in probes]
    got = continuations(family_model, tiny_tokenizer, PROMPTS, 3, first_ids=ids)
    s = target_scores(family_model, tiny_tokenizer, probes)
    assert got.first_top == s.top.tolist() and got.first_rank == s.ranks.tolist()
    assert got.texts == greedy_continuations(family_model, tiny_tokenizer, PROMPTS, 3)


@pytest.mark.realmodel
@pytest.mark.slow
def test_gemma_batched_continuations_equal_hf_generate(gemma):
    """Gemma 3 270M, 24 bundled capital prompts of several token lengths: every batched continuation is the one
    transformers' own greedy ``generate`` gives for that prompt alone."""
    from surgery.evaluation.facts import load_facts
    from surgery.io.loading import REPO_ROOT

    facts = load_facts(REPO_ROOT / "assets" / "facts" / "capital.jsonl")[:24]
    model, tokenizer = gemma.model, gemma.tokenizer
    n_ctx = layout_of(model).n_ctx
    lengths = {len(encode_prompt(tokenizer, f.prompt, n_ctx)) for f in facts}
    assert len(lengths) > 1  # several length groups
    got = greedy_continuations(model, tokenizer, [f.prompt for f in facts], 6)
    for fact, text in zip(facts, got):
        ids = torch.tensor([encode_prompt(tokenizer, fact.prompt, n_ctx)])
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=6,
                pad_token_id=tokenizer.pad_token_id,
            )
        assert text == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True), fact.prompt
