"""What an evaluation computes on a base model, kept so that it is computed once per model (issue 22).

Every repair judges the base model on the same panel: its greedy continuations of the facts, the paraphrases, the
panel's probes and the fluency prompts, its perplexity on the panel's passage and its final hidden states on the
unrelated text; and a repair diagnoses its facts on the base model. None of that depends on the edit, so an
:class:`EvaluationMemo` of one model keeps each figure the first time it is computed and hands it back afterwards:
the app keeps one per served model (:class:`~surgery.serve.registry.ServedModel`), so a visitor's repair never
regenerates the base model's answers.

The memo is an object its owner passes down (no module-level cache); it belongs to one model object and is
ignored when handed another one (an edited view, another model), so it can never answer for the wrong weights.
A continuation is kept by everything that decides it: the prompt, the token budget (cut at the context), the
target that may stop it early, the first token whose rank is asked, and the lenient window. It only fills.
"""

from __future__ import annotations

import threading
from typing import NamedTuple

from torch import Tensor, nn


class Row(NamedTuple):
    """One greedy continuation as :func:`~surgery.evaluation.generation.continuations` answers it."""

    text: str
    first_top: int
    first_rank: int
    ids: tuple[int, ...]


RowKey = tuple[str, int, "str | None", "int | None", int]  # prompt, budget, target, first id asked, lenient words


class EvaluationMemo:
    """The figures already computed on ``model``: continuations by :data:`RowKey`, perplexities and final hidden
    states by text. Thread-safe (sessions share a served model); a lookup for another model finds nothing."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._rows: dict[RowKey, Row] = {}
        self._perplexity: dict[str, float] = {}
        self._hidden: dict[tuple[str, ...], Tensor] = {}
        self._diagnoses: dict[tuple[tuple[str, str], ...], list] = {}
        self._traces: dict[tuple, object] = {}
        self._lock = threading.Lock()

    def serves(self, model: nn.Module) -> bool:
        """Whether this memo holds ``model``'s figures (the very object: a view of an edit is another)."""
        return model is self.model

    def rows(self, keys: list[RowKey]) -> list[Row | None]:
        with self._lock:
            return [self._rows.get(k) for k in keys]

    def keep_rows(self, keys: list[RowKey], rows: list[Row]) -> None:
        with self._lock:
            self._rows.update(zip(keys, rows))

    def perplexity(self, text: str, compute) -> float:
        """The perplexity of ``text``: kept, or ``compute()`` once."""
        return self._once(self._perplexity, text, compute)

    def hidden(self, texts: tuple[str, ...], compute) -> Tensor:
        """The final hidden states of ``texts`` (Float[Tensor, "N d"]): kept, or ``compute()`` once."""
        return self._once(self._hidden, texts, compute)

    def diagnoses(self, facts: tuple[tuple[str, str], ...], compute) -> list:
        """The diagnoses of ``facts`` ((prompt, target) pairs, in order): kept, or ``compute()`` once. A new list
        each call (the diagnoses themselves are shared: read them, do not change them)."""
        return list(self._once(self._diagnoses, facts, compute))

    def trace(self, key: tuple, compute):
        """A causal trace (:class:`~surgery.diagnosis.storage.StorageTrace`) of the facts and span in ``key``:
        kept, or ``compute()`` once (MEMIT and AlphaEdit compared on the same facts trace them once)."""
        return self._once(self._traces, key, compute)

    def _once(self, store: dict, key, compute):
        """``store[key]``, or ``compute()`` kept there; computed outside the lock (two threads asking at once may
        both compute it; the first value kept is the one every caller gets)."""
        with self._lock:
            if key in store:
                return store[key]
        value = compute()
        with self._lock:
            return store.setdefault(key, value)

    def __len__(self) -> int:
        return len(self._rows)


def memo_for(memo: EvaluationMemo | None, model: nn.Module) -> EvaluationMemo | None:
    """``memo`` when it holds ``model``'s figures, else None (nothing to look up or keep)."""
    return memo if memo is not None and memo.serves(model) else None
