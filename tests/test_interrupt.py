"""surgery.core.interrupt: checks installed by callers run inside long loops (greedy generation, diagnosis)."""

import pytest

from surgery.core.interrupt import checking, checkpoint
from surgery.diagnosis.diagnose import diagnose_batch
from surgery.evaluation.generation import greedy_continuations


class Stop(Exception):
    pass


def test_checks_run_outermost_first_only_inside_their_block():
    calls = []
    checkpoint()  # nothing installed: nothing runs
    with checking(lambda: calls.append("outer")):
        checkpoint()
        with checking(lambda: calls.append("inner")):
            checkpoint()
        checkpoint()
    checkpoint()
    assert calls == ["outer", "outer", "inner", "outer"]


def test_a_check_that_raises_leaves_the_checks_as_they_were():
    def stop():
        raise Stop

    with pytest.raises(Stop), checking(stop):
        checkpoint()
    checkpoint()  # the failing check is gone


def _stop_after(n: int, calls: list):
    def check():
        calls.append(1)
        if len(calls) > n:
            raise Stop

    return check


def test_a_generation_stops_between_its_tokens(tiny_model, tiny_tokenizer):
    """One generation of 8 tokens checks before each token: a check that stops on its third call stops the
    generation after two tokens, where the same generation unchecked calls it 8 times in all."""
    calls: list = []
    with checking(lambda: calls.append(1)):
        texts = greedy_continuations(tiny_model, tiny_tokenizer, ["the cat"], 8)
    assert len(calls) == 8 and texts[0]
    calls.clear()
    with pytest.raises(Stop), checking(_stop_after(2, calls)):
        greedy_continuations(tiny_model, tiny_tokenizer, ["the cat"], 8)
    assert len(calls) == 3


def test_a_diagnosis_stops_between_its_batches(tiny_model, tiny_tokenizer):
    prompts, targets = (
        ["The capital of France is", "The capital of Japan is", "the cat sat on the"],
        [" Paris", " Tokyo", " mat"],
    )
    calls: list = []
    with checking(lambda: calls.append(1)):
        diagnose_batch(tiny_model, tiny_tokenizer, prompts, targets, batch_size=1)
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(Stop), checking(_stop_after(1, calls)):
        diagnose_batch(tiny_model, tiny_tokenizer, prompts, targets, batch_size=1)
    assert len(calls) == 2
