"""Greedy generation, and judging an answer by what the model says.

A fact counts as said when the greedy continuation of its prompt starts with the whole target and the target
ends at a word boundary (:func:`judge`: " Paris." and " Paris is" say " Paris"; " Parisian" and " Pa" do not).
That strict figure is the headline of every evaluation. Beside it, a lenient one: the whole target appears, at
word boundaries, within the first :data:`LENIENT_WORDS` generated words ("Lyon is a city in" -> " the south of
France" says " France" a little later).

Speed by design (:func:`greedy_continuations`): prompts of the same token length run together, so there is no
padding and every row computes what its unbatched run computes; groups of different lengths step in lockstep and
share one unembedding a step (the vocabulary product is the largest of a step on Gemma); each step feeds one
token per row through the KV cache; a row leaves the batch and its cache as soon as it is decided
(:func:`decided`) or has spent its token budget. After the first step (whose full logits give the first-token
figures), on a CPU with native bfloat16 products and a large vocabulary, each step's greedy token comes from a
bfloat16 screen of the unembedding checked in float32 (:mod:`surgery.core.screen`): the same tokens, about half
the time of the product.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..arch import layout_of, unembed
from ..core.errors import InputError
from ..core.interrupt import checkpoint
from ..core.screen import Screen, bf16_is_native, screened_argmax
from ..core.tokens import encode_prompt, encode_target
from .memo import EvaluationMemo, Row, memo_for

LENIENT_WORDS = 6  # the lenient figure looks for the whole answer within this many generated words
EXTRA_TOKENS = 12  # tokens generated past the target's own length when judging (room for the lenient figure)
BATCH_SIZE = 128  # rows generated together (no padding: a group per prompt length, the groups in lockstep)
# The bfloat16 screen of the unembedding (surgery.core.screen) is made for a wave whose vocabulary product is at
# least this large (vocabulary x width: Gemma 3 270M 168M, over it; SmolLM2 28M and GPT-2 39M, under it, where the
# screen measured no faster: bench/README.md) and that has steps left to repay it.
SCREEN_MIN_PRODUCT = 2**26
SCREEN_MIN_STEPS = 4

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
    # A match that ends the text so far may still grow into a longer word (" the Paris" -> " the Parisian"): a
    # letter appended in its place tells a settled match from one that may not be.
    if judge(continuation + "x", target, words).lenient:
        return True
    _, complete = _lenient_window(said, words)
    return complete


def greedy_continuations(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int | Sequence[int],
    targets: Sequence[str | None] | None = None,
    words: int = LENIENT_WORDS,
    batch_size: int = BATCH_SIZE,
) -> list[str]:
    """The greedy continuation (new text only) of each prompt, at most ``max_new_tokens`` tokens each (one number,
    or one per prompt) and never past the context or an end-of-text token.

    With ``targets`` (one per prompt), a row stops as soon as :func:`decided` says its verdict is settled, so a
    judged continuation is only as long as it needs to be; a row whose target is None runs to its budget. Works
    on a base model and on an edited view alike.
    """
    return continuations(model, tokenizer, prompts, max_new_tokens, targets, words=words, batch_size=batch_size).texts


@dataclass
class Continuations:
    """:func:`continuations`' answer, one entry per prompt: the generated text; the first step's top-1 token id,
    and the rank (1 = top) of the token id asked for at that step (0 where none was asked); the generated ids."""

    texts: list[str]
    first_top: list[int]
    first_rank: list[int]
    ids: list[list[int]] = field(default_factory=list)


def continuations(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int | Sequence[int],
    targets: Sequence[str | None] | None = None,
    first_ids: Sequence[int | None] | None = None,
    words: int = LENIENT_WORDS,
    batch_size: int = BATCH_SIZE,
    memo: EvaluationMemo | None = None,
) -> Continuations:
    """:func:`greedy_continuations`, and from the first step's logits (the next-token distribution after each
    prompt) the top-1 token and the rank of ``first_ids[i]`` (e.g. the target's first token): the first-token
    figures come free with the generation, no second pass over the prompts. With a ``memo`` of ``model``
    (:class:`~surgery.evaluation.memo.EvaluationMemo`), a row it holds is not generated again, and every row
    generated is kept in it."""
    prompts = list(prompts)
    if targets is not None and len(targets) != len(prompts):
        raise InputError("give one target per prompt")
    if first_ids is not None and len(first_ids) != len(prompts):
        raise InputError("give one first token id per prompt")
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(prompts) or any(not isinstance(b, int) or b < 1 for b in budgets):
        raise InputError(f"max_new_tokens must be a positive integer, not {max_new_tokens!r}")
    n_ctx = layout_of(model).n_ctx
    encoded = [encode_prompt(tokenizer, p, n_ctx) for p in prompts]
    for ids in encoded:
        if len(ids) >= n_ctx:
            raise InputError(f"the prompt fills the whole context ({n_ctx} tokens): nothing can be generated")
    budgets = [min(b, n_ctx - len(ids)) for b, ids in zip(budgets, encoded)]
    out = Continuations([""] * len(prompts), [0] * len(prompts), [0] * len(prompts), [[] for _ in prompts])
    memo = memo_for(memo, model)
    keys = [
        (p, b, None if targets is None else targets[i], None if first_ids is None else first_ids[i], words)
        for i, (p, b) in enumerate(zip(prompts, budgets))
    ]
    todo = list(range(len(prompts)))
    if memo is not None:
        todo = []
        for i, row in enumerate(memo.rows(keys)):
            if row is None:
                todo.append(i)
            else:
                out.texts[i], out.first_top[i], out.first_rank[i], out.ids[i] = row.text, *row[1:3], list(row.ids)
    groups: dict[int, list[int]] = {}
    for i in todo:
        groups.setdefault(len(encoded[i]), []).append(i)
    # Waves of at most ``batch_size`` rows: whole length groups, shortest first, a group larger than a wave split.
    waves: list[list[list[int]]] = [[]]
    for _, rows in sorted(groups.items()):
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            if sum(map(len, waves[-1])) + len(chunk) > batch_size:
                waves.append([])
            waves[-1].append(chunk)
    screen = unembedding_screen(model, [budgets[i] for i in todo])
    for wave in waves:
        rows = [i for chunk in wave for i in chunk]
        if not rows:
            continue
        got = _generate_wave(
            model,
            tokenizer,
            [[encoded[i] for i in chunk] for chunk in wave],
            [budgets[i] for i in rows],
            None if targets is None else [targets[i] for i in rows],
            None if first_ids is None else [first_ids[i] for i in rows],
            words,
            screen,
        )
        for i, text, top, rank, ids in zip(rows, got.texts, got.first_top, got.first_rank, got.ids):
            out.texts[i], out.first_top[i], out.first_rank[i], out.ids[i] = text, top, rank, ids
    if memo is not None and todo:
        memo.keep_rows(
            [keys[i] for i in todo],
            [Row(out.texts[i], out.first_top[i], out.first_rank[i], tuple(out.ids[i])) for i in todo],
        )
    return out


def unembedding_screen(model: nn.Module, budgets: Sequence[int]) -> Callable[[], Screen] | None:
    """The bfloat16 screen of ``model``'s unembedding (:mod:`surgery.core.screen`), made on first use and shared by
    the waves of one call, where it pays: a float32 CPU model with native bfloat16 products, a vocabulary product
    of at least :data:`SCREEN_MIN_PRODUCT` and at least :data:`SCREEN_MIN_STEPS` tokens to generate; else None.
    Never under a final soft cap (Gemma 2), which can tie saturated logits that the screen would order."""
    layout = layout_of(model)
    w_u = layout.w_u(model)
    if (
        layout.softcap(model.config) is not None
        or w_u.dtype != torch.float32
        or w_u.numel() < SCREEN_MIN_PRODUCT
        or max(budgets, default=0) < SCREEN_MIN_STEPS
        or not bf16_is_native(w_u.device)
    ):
        return None
    return functools.cache(lambda: Screen.of(w_u))


def _generate_wave(
    model: nn.Module,
    tokenizer,
    groups: list[list[list[int]]],
    budgets: list[int],
    targets: list[str | None] | None,
    first_ids: list[int | None] | None,
    words: int,
    screen: Callable[[], Screen] | None = None,
) -> Continuations:
    """Greedy decoding of several groups of prompts in lockstep, each group of one token length with its own KV
    cache, until every row is done. Each step runs the decoder once per group (no padding: a row computes what it
    computes alone) and the unembedding once for the open rows of every group together (Gemma: 262k logits a
    row, the largest product of a step). A row that is done leaves its group's batch and cache at once. The
    answer's rows are the groups' rows in order. ``screen`` (:func:`unembedding_screen`): the greedy tokens of every
    step after the first come from it."""
    device = next(model.parameters()).device
    # The decoder and the unembedding, as every evaluation runs the model: an edited view of a model that
    # accelerate dispatched keeps its hooked top-level forward bound to the base, its decoder is the view's.
    decoder = model.get_submodule(layout_of(model).adapter.base)
    eos = tokenizer.eos_token_id
    n = sum(map(len, groups))
    new: list[list[int]] = [[] for _ in range(n)]
    first_top, first_rank = [0] * n, [0] * n
    # Per group: its input ids (b, T) then (b, 1), its cache, and its live rows (indices into the answer).
    inputs = [torch.tensor(g, device=device) for g in groups]  # (B_g, T_g): equal lengths, no padding
    pasts: list = [None] * len(groups)
    alive, offset = [], 0
    for g in groups:
        alive.append(list(range(offset, offset + len(g))))
        offset += len(g)
    first = True
    with torch.no_grad():
        while any(alive):
            checkpoint()  # a deadline installed by the caller (surgery.core.interrupt) stops here, between tokens
            live = [k for k in range(len(groups)) if alive[k]]
            last = []
            for k in live:
                out = decoder(input_ids=inputs[k], past_key_values=pasts[k], use_cache=True)
                pasts[k] = out.past_key_values
                last.append(out.last_hidden_state[:, -1])  # (b_k, d): only the last position is unembedded
            if first or screen is None:
                logits = unembed(model, torch.cat(last))  # (sum b_k, d) -> (sum b_k, V)
                next_ids = logits.argmax(-1)  # one token per live row, groups in order
            else:
                next_ids = screened_argmax(screen(), torch.cat(last))  # the same tokens, from a bfloat16 screen
            if first:  # the next-token distribution after each prompt; every row of every group is live
                first = False
                first_top = next_ids.tolist()
                if first_ids is not None:
                    asked = torch.tensor([0 if t is None else t for t in first_ids], device=logits.device)
                    picked = logits.gather(-1, asked[:, None])  # (B, 1)
                    first_rank = [
                        0 if t is None else r for t, r in zip(first_ids, ((logits > picked).sum(-1) + 1).tolist())
                    ]
            for k, ids in zip(live, next_ids.split([len(alive[k]) for k in live])):
                keep = []
                for i, (row, token) in enumerate(zip(alive[k], ids.tolist())):
                    if token == eos:
                        continue
                    new[row].append(token)
                    if len(new[row]) >= budgets[row]:
                        continue
                    if (
                        targets is not None
                        and targets[row] is not None
                        and decided(tokenizer.decode(new[row], skip_special_tokens=True), targets[row], words)
                    ):
                        continue
                    keep.append(i)
                if len(keep) < len(alive[k]) and keep:
                    index = torch.tensor(keep, device=device)
                    pasts[k].batch_select_indices(index)  # (b, ...) -> (b', ...) in every layer's keys and values
                    ids = ids[index]
                alive[k] = [alive[k][i] for i in keep]
                inputs[k] = ids[:, None]  # (b', 1)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in new]
    return Continuations(texts, first_top, first_rank, new)


def judge_budget(tokenizer, target: str) -> int:
    """Tokens to generate when judging ``target``: its own length plus :data:`EXTRA_TOKENS`."""
    return len(encode_target(tokenizer, target)) + EXTRA_TOKENS


def said(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    targets: Sequence[str],
    words: int = LENIENT_WORDS,
    batch_size: int = BATCH_SIZE,
) -> list[tuple[str, Judgement]]:
    """For each prompt, its greedy continuation (generated until decided) and the :class:`Judgement` of it."""
    texts = greedy_continuations(
        model, tokenizer, prompts, [judge_budget(tokenizer, t) for t in targets], targets, words, batch_size
    )
    return [(text, judge(text, target, words)) for text, target in zip(texts, targets)]


def generate(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 20) -> str:
    """The greedy continuation of ``prompt`` (the new text only), at most ``max_new_tokens`` tokens and never past
    the context window. Works on a base model and on a :func:`~surgery.io.edit_file.edited_model` view alike."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive integer, not {max_new_tokens!r}")
    return greedy_continuations(model, tokenizer, [prompt], max_new_tokens)[0]
