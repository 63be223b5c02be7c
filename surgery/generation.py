"""Greedy generation, and judging an answer by what the model says.

A fact counts as said when the greedy continuation of its prompt starts with the whole target and the target
ends at a word boundary (:func:`judge`: " Paris." and " Paris is" say " Paris"; " Parisian" and " Pa" do not).
That strict figure is the headline of every evaluation. Beside it, a lenient one: the whole target appears, at
word boundaries, within the first :data:`LENIENT_WORDS` generated words ("Lyon is a city in" -> " the south of
France" says " France" a little later).

Speed by design (:func:`greedy_continuations`): prompts of the same token length run together, so there is no
padding and every row equals its unbatched run; each step feeds one token per row through the KV cache; a group
stops as soon as every row is decided (:func:`decided`) or has spent its token budget. Groups of different lengths
step in lockstep, up to ``batch_size`` rows in all, and share one unembedding of their last positions per step.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .arch import apply_softcap, layout_of
from .errors import InputError
from .tokens import encode_prompt, encode_target

LENIENT_WORDS = 6  # the lenient figure looks for the whole answer within this many generated words
EXTRA_TOKENS = 12  # tokens generated past the target's own length when judging (room for the lenient figure)
BATCH_SIZE = 32

_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class Judgement:
    """What a continuation says about a target. ``strict``: it starts with the whole target, which ends at a word
    boundary; ``lenient``: the whole target appears at word boundaries within the first ``LENIENT_WORDS`` words."""

    strict: bool
    lenient: bool


def _boundary_after(text: str, end: int) -> bool:
    """Whether ``text[end]`` (if any) starts a new word: not a letter or digit right after the answer."""
    return end >= len(text) or not (text[end].isalnum() or text[end] == "_")


def _boundary_before(text: str, start: int) -> bool:
    return start == 0 or not (text[start - 1].isalnum() or text[start - 1] == "_")


def _lenient_window(continuation: str, words: int) -> tuple[str, bool]:
    """The continuation up to the end of its ``words``-th word, and whether that many words are complete (a word
    is complete once something that is not part of it follows)."""
    matches = list(_WORD.finditer(continuation))
    if len(matches) > words:
        return continuation[: matches[words - 1].end()], True
    if len(matches) == words and matches[-1].end() < len(continuation):
        return continuation[: matches[-1].end()], True
    return continuation, False


def judge(continuation: str, target: str, words: int = LENIENT_WORDS) -> Judgement:
    """Judge ``continuation`` (the generated text only) against ``target`` (e.g. ``" Paris"``); leading
    whitespace is ignored on both, case is not."""
    said, answer = continuation.lstrip(), target.strip()
    if not answer:
        return Judgement(False, False)
    strict = said.startswith(answer) and _boundary_after(said, len(answer))
    window, _ = _lenient_window(said, words)
    lenient = strict
    start = window.find(answer)
    while not lenient and start >= 0:
        end = start + len(answer)
        lenient = _boundary_before(window, start) and _boundary_after(said, end) and end <= len(window)
        start = window.find(answer, start + 1)
    return Judgement(strict, lenient)


def decided(continuation: str, target: str, words: int = LENIENT_WORDS) -> bool:
    """Whether generating more could change :func:`judge`'s verdict on ``continuation``."""
    said, answer = continuation.lstrip(), target.strip()
    strict_open = answer.startswith(said) or (said.startswith(answer) and len(said) == len(answer))
    if strict_open:
        return False
    if judge(continuation, target, words).lenient:
        return True
    _, complete = _lenient_window(said, words)
    return complete


def greedy_continuations(model: nn.Module, tokenizer, prompts: Sequence[str],
                         max_new_tokens: int | Sequence[int], targets: Sequence[str] | None = None,
                         words: int = LENIENT_WORDS, batch_size: int = BATCH_SIZE) -> list[str]:
    """The greedy continuation (new text only) of each prompt, at most ``max_new_tokens`` tokens each (one number,
    or one per prompt) and never past the context or an end-of-text token.

    With ``targets`` (one per prompt), a row stops as soon as :func:`decided` says its verdict is settled, so a
    judged continuation is only as long as it needs to be. Works on a base model and on a patched view alike.
    """
    prompts = list(prompts)
    if targets is not None and len(targets) != len(prompts):
        raise InputError("give one target per prompt")
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(prompts) or any(not isinstance(b, int) or b < 1 for b in budgets):
        raise InputError(f"max_new_tokens must be a positive integer, not {max_new_tokens!r}")
    n_ctx = layout_of(model).n_ctx
    encoded = [encode_prompt(tokenizer, p, n_ctx) for p in prompts]
    for ids in encoded:
        if len(ids) >= n_ctx:
            raise InputError(f"the prompt fills the whole context ({n_ctx} tokens): nothing can be generated")
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        groups.setdefault(len(ids), []).append(i)
    chunks = [rows[start : start + batch_size] for _, rows in sorted(groups.items())
              for start in range(0, len(rows), batch_size)]
    waves: list[list[list[int]]] = []  # chunks run in lockstep, at most batch_size rows in all
    for chunk in chunks:
        if waves and sum(map(len, waves[-1])) + len(chunk) <= batch_size:
            waves[-1].append(chunk)
        else:
            waves.append([chunk])
    out = [""] * len(prompts)
    for wave in waves:
        texts = _generate_wave(model, tokenizer, [[encoded[i] for i in chunk] for chunk in wave],
                               [[min(budgets[i], n_ctx - len(encoded[i])) for i in chunk] for chunk in wave],
                               None if targets is None else [[targets[i] for i in chunk] for chunk in wave], words)
        for chunk, chunk_texts in zip(wave, texts):
            for i, text in zip(chunk, chunk_texts):
                out[i] = text
    return out


@dataclass
class _Group:
    """Prompts of one token length decoded together (no padding), with their own KV cache."""

    input_ids: Tensor  # (B, T) at the first step, then (B, 1): the tokens not yet in the cache
    budgets: list[int]
    targets: list[str] | None
    new: list[list[int]] = field(default_factory=list)
    done: list[bool] = field(default_factory=list)
    past: object = None


def _generate_wave(model: nn.Module, tokenizer, encoded: list[list[list[int]]], budgets: list[list[int]],
                   targets: list[list[str]] | None, words: int) -> list[list[str]]:
    """Greedy decoding of groups of prompts of one token length each, in lockstep, until every row is done.

    Each group runs the decoder on its own (no padding: every row equals its unbatched run); the last positions
    of all groups are unembedded together, so a step reads the unembedding once, not once per group (Gemma:
    671 MB, most of a step's time for a few rows).
    """
    layout = layout_of(model)
    decoder = model.get_submodule(layout.adapter.base)
    unembed = model.get_submodule(layout.adapter.unembed)
    cap = layout.softcap(model.config)
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    groups = [_Group(torch.tensor(ids, device=device), b, None if targets is None else targets[g],
                     [[] for _ in ids], [False] * len(ids)) for g, (ids, b) in enumerate(zip(encoded, budgets))]
    with torch.no_grad():
        for _ in range(max(max(b) for b in budgets)):
            live = [g for g in groups if not all(g.done)]
            if not live:
                break
            last, open_rows = [], []
            for g in live:
                out = decoder(input_ids=g.input_ids, past_key_values=g.past, use_cache=True)
                g.past = out.past_key_values
                rows = [row for row, done in enumerate(g.done) if not done]
                open_rows.append(rows)
                last.append(out.last_hidden_state[rows, -1])  # (open rows, d), after the final norm
            # Only the rows still open are unembedded; a finished row is fed a token nobody reads (0).
            picked = iter(apply_softcap(unembed(torch.cat(last)), cap).argmax(-1).tolist())  # open rows, in order
            for g, rows in zip(live, open_rows):
                tokens = [0] * len(g.done)
                for row in rows:
                    token = tokens[row] = next(picked)
                    if token == eos:
                        g.done[row] = True
                        continue
                    g.new[row].append(token)
                    if len(g.new[row]) >= g.budgets[row]:
                        g.done[row] = True
                    elif g.targets is not None:
                        g.done[row] = decided(tokenizer.decode(g.new[row], skip_special_tokens=True),
                                              g.targets[row], words)
                g.input_ids = torch.tensor(tokens, device=device)[:, None]
    return [[tokenizer.decode(ids, skip_special_tokens=True) for ids in g.new] for g in groups]


def judge_budget(tokenizer, target: str) -> int:
    """Tokens to generate when judging ``target``: its own length plus :data:`EXTRA_TOKENS`."""
    return len(encode_target(tokenizer, target)) + EXTRA_TOKENS


def said(model: nn.Module, tokenizer, prompts: Sequence[str], targets: Sequence[str],
         words: int = LENIENT_WORDS, batch_size: int = BATCH_SIZE) -> list[tuple[str, Judgement]]:
    """For each prompt, its greedy continuation (generated until decided) and the :class:`Judgement` of it."""
    texts = greedy_continuations(model, tokenizer, prompts, [judge_budget(tokenizer, t) for t in targets],
                                 targets, words, batch_size)
    return [(text, judge(text, target, words)) for text, target in zip(texts, targets)]


def generate(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 20) -> str:
    """The greedy continuation of ``prompt`` (the new text only), at most ``max_new_tokens`` tokens and never past
    the context window. Works on a base model and on a :func:`~surgery.patch.patched_model` view alike."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive integer, not {max_new_tokens!r}")
    return greedy_continuations(model, tokenizer, [prompt], max_new_tokens)[0]
