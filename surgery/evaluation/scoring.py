"""Judging a model on a panel: probe scores by what the model says, perplexity, fluency and KL to another model.

A probe is judged by the model's greedy continuation of its prompt (:func:`surgery.evaluation.generation.said`):
``correct`` (the headline) when it starts with the whole target ending at a word boundary, ``lenient`` when the
whole target comes within the first few words. The first-token figure (top-1 next token = the target's first
token) and the target's rank are kept beside them as a labelled diagnostic: it hides multi-token failures
(" D" right, then " Dazaibakt"). Every probe list of a panel is generated in one batched call.

Fluency is the n-gram entropy ROME and MEMIT report (:func:`ngram_entropy`) of a fixed number of greedily
generated tokens: a model that repeats itself scores low. Next-token batches are right-padded (causal model:
real positions never see the padding), and only the positions that are needed are unembedded.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..arch import layout_of, unembed
from ..core.tokens import encode_prompt, encode_target, pad_right, real_positions, token_text
from .facts import Fact
from .generation import continuations, greedy_continuations, judge, judge_budget
from .memo import EvaluationMemo, memo_for
from .panels import Panel

BATCH_SIZE = 32
KL_CHUNK = 64  # positions unembedded at a time by mean_kl
FLUENCY_TOKENS = 32  # tokens generated greedily per fluency prompt
FLUENCY_FACTS = 4  # fluency prompts: the first edited facts' own prompts (so a 100-fact edit costs no more) ...
FLUENCY_GENERAL = 2  # ... then this many of the panel's general probes
NGRAM_WEIGHTS = {2: 2 / 3, 3: 4 / 3}  # ROME's compute_n_gram_entropy: n -> weight, averaged

_NGRAM_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)  # words and punctuation marks, as nltk.word_tokenize roughly


@dataclass
class ProbeResult:
    """One probe, judged by what the model says. ``correct`` (the headline): ``said``, the greedy continuation,
    starts with the whole target, ending at a word boundary; ``lenient``: the whole target comes within the
    first :data:`~surgery.evaluation.generation.LENIENT_WORDS` words. First-token diagnostic: ``answer`` is the top-1
    next token, ``first_token_correct`` whether it is the target's first token, ``target_rank`` that token's rank."""

    prompt: str
    target: str
    answer: str  # first-token diagnostic: the model's top-1 next token, as text
    correct: bool  # strict, by generation: ``said`` starts with the whole target at a word boundary
    target_rank: int  # first-token diagnostic: rank of the target's first token, 1 = top
    said: str = ""  # the greedy continuation (new text only), generated until the verdict was decided
    lenient: bool = False  # by generation: the whole target within the first few words
    first_token_correct: bool = False  # first-token diagnostic: ``answer`` is the target's first token


@dataclass
class ProbeScores:
    """Results of one list of probes: ``correct`` (said, strict), ``lenient`` and ``first_token_correct``
    counts of ``total``."""

    results: list[ProbeResult]

    @property
    def correct(self) -> int:
        return sum(r.correct for r in self.results)

    @property
    def lenient(self) -> int:
        return sum(r.lenient for r in self.results)

    @property
    def first_token_correct(self) -> int:
        return sum(r.first_token_correct for r in self.results)

    @property
    def total(self) -> int:
        return len(self.results)

    def to_dict(self) -> dict:
        return {
            "correct": self.correct,
            "total": self.total,
            "lenient": self.lenient,
            "first_token_correct": self.first_token_correct,
            "results": [asdict(r) for r in self.results],
        }


@dataclass
class PanelResult:
    """A model's scores on a panel's probe lists and its perplexity passage (NaN without one)."""

    panel: str
    general: ProbeScores
    side_effects: ProbeScores
    perplexity: float
    neighbourhood: ProbeScores = field(default_factory=lambda: ProbeScores([]))
    relation: ProbeScores = field(default_factory=lambda: ProbeScores([]))

    def to_dict(self) -> dict:
        return {
            "panel": self.panel,
            "general": self.general.to_dict(),
            "side_effects": self.side_effects.to_dict(),
            "neighbourhood": self.neighbourhood.to_dict(),
            "relation": self.relation.to_dict(),
            "perplexity": self.perplexity if math.isfinite(self.perplexity) else None,
        }


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def last_position_logits(model: nn.Module, input_ids: Tensor, lengths: Tensor) -> Tensor:
    """Next-token logits at each row's last real position. ``input_ids`` (B, T) right-padded -> (B, V)."""
    with torch.no_grad():
        mask = real_positions(lengths, input_ids.shape[1]).long()
        decoder = model.get_submodule(layout_of(model).adapter.base)
        hidden = decoder(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
        # hidden: (B, T, d), after the final norm
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return unembed(model, hidden[rows, lengths - 1])  # (B, V)


def next_token_logit_batches(
    model: nn.Module, tokenizer, prompts: list[str], batch_size: int = BATCH_SIZE
) -> Iterator[Tensor]:
    """Next-token logits after each prompt, ``batch_size`` prompts at a time (every prompt is encoded, and so
    checked, before the first batch runs). Yields Float[Tensor, "b V"]."""
    n_ctx = layout_of(model).n_ctx
    encoded = [encode_prompt(tokenizer, p, n_ctx) for p in prompts]
    for start in range(0, len(encoded), batch_size):
        ids, lengths = pad_right(encoded[start : start + batch_size], tokenizer.pad_token_id, _device(model))
        yield last_position_logits(model, ids, lengths)


def next_token_logits(model: nn.Module, tokenizer, prompts: list[str], batch_size: int = BATCH_SIZE) -> Tensor:
    """Next-token logits after each prompt. Float[Tensor, "B V"] (B x the vocabulary: for many prompts,
    :func:`next_token_logit_batches` keeps memory bounded)."""
    return torch.cat(list(next_token_logit_batches(model, tokenizer, prompts, batch_size)))


def answer(model: nn.Module, tokenizer, prompt: str) -> str:
    """The model's greedy next token after ``prompt``, as text (GPT-2: with its leading space)."""
    return token_text(tokenizer, int(next_token_logits(model, tokenizer, [prompt])[0].argmax()))


class TargetScores(NamedTuple):
    """Per probe: the first token of its target, the model's top-1 next token, the target's rank (1 = top) and
    logit. Each Long/Float[Tensor, "N"]."""

    targets: Tensor
    top: Tensor
    ranks: Tensor
    logits: Tensor


def target_scores(model: nn.Module, tokenizer, probes: Sequence[Fact]) -> TargetScores:
    """:class:`TargetScores` of ``probes`` (at least one), scored one batch of logits at a time."""
    targets = torch.tensor([encode_target(tokenizer, p.target)[0] for p in probes])
    tops, ranks, picked = [], [], []
    batches = next_token_logit_batches(model, tokenizer, [p.prompt for p in probes])
    for start, logits in zip(range(0, len(probes), BATCH_SIZE), batches):  # logits: (b, V), one batch at a time
        target = logits.gather(-1, targets[start : start + len(logits), None].to(logits.device))  # (b, 1)
        tops.append(logits.argmax(-1))
        ranks.append((logits > target).sum(-1) + 1)
        picked.append(target[:, 0])
    top = torch.cat(tops)
    return TargetScores(targets.to(top.device), top, torch.cat(ranks), torch.cat(picked))


def score_probes(
    model: nn.Module, tokenizer, probes: Sequence[Fact], memo: EvaluationMemo | None = None
) -> ProbeScores:
    """Each probe judged by its greedy continuation (strict and lenient, as :func:`~surgery.evaluation.generation.said`
    judges), with the first-token diagnostic beside it (the first generation step's top-1 token against the
    target's first token, and that token's rank): one batched generation (none for what ``memo`` holds)."""
    return judge_lists(model, tokenizer, {"probes": probes}, memo=memo).scores["probes"]


@dataclass
class JudgedLists:
    """:func:`judge_lists`' answer: the scores of each named list, and the fluency (None: not asked)."""

    scores: dict[str, ProbeScores]
    fluency: Fluency | None = None


def judge_lists(
    model: nn.Module,
    tokenizer,
    lists: Mapping[str, Sequence[Fact]],
    fluency_prompts: Sequence[str] = (),
    fluency_tokens: int = FLUENCY_TOKENS,
    memo: EvaluationMemo | None = None,
) -> JudgedLists:
    """:func:`score_probes` of several named lists, and the :class:`Fluency` of ``fluency_prompts`` (if any), in one
    batched generation: prompts of one length share their decoding steps, whichever list they come from. Rows
    ``memo`` (of ``model``) holds are not generated again."""
    flat = [p for probes in lists.values() for p in probes]
    fluency_prompts = list(fluency_prompts)
    targets = [encode_target(tokenizer, p.target)[0] for p in flat]  # also validates every target
    got = continuations(
        model,
        tokenizer,
        [p.prompt for p in flat] + fluency_prompts,
        [judge_budget(tokenizer, p.target) for p in flat] + [fluency_tokens] * len(fluency_prompts),
        [p.target for p in flat] + [None] * len(fluency_prompts),
        targets + [None] * len(fluency_prompts),
        memo=memo,
    )
    results = []
    for i, p in enumerate(flat):
        verdict = judge(got.texts[i], p.target)
        results.append(
            ProbeResult(
                p.prompt,
                p.target,
                answer=token_text(tokenizer, got.first_top[i]),
                correct=verdict.strict,
                target_rank=got.first_rank[i],
                said=got.texts[i],
                lenient=verdict.lenient,
                first_token_correct=got.first_top[i] == targets[i],
            )
        )
    split, start = {}, 0
    for name, probes in lists.items():
        split[name] = ProbeScores(results[start : start + len(probes)])
        start += len(probes)
    spoken = got.texts[len(flat) :]
    fluent = (
        Fluency(fluency_prompts, spoken, [ngram_entropy(t) for t in spoken], fluency_tokens)
        if fluency_prompts
        else None
    )
    return JudgedLists(split, fluent)


def score_lists(model: nn.Module, tokenizer, lists: Mapping[str, Sequence[Fact]]) -> dict[str, ProbeScores]:
    """:func:`score_probes` of several named lists in one batched call, split back by name."""
    return judge_lists(model, tokenizer, lists).scores


def encode_texts(tokenizer, texts, n_ctx: int) -> list[list[int]]:
    """Token ids of each non-empty text, truncated to the context (texts of one token are dropped: nothing
    to predict)."""
    out = []
    for text in texts:
        ids = list(tokenizer(text, truncation=True, max_length=n_ctx)["input_ids"]) if text.strip() else []
        if len(ids) >= 2:
            out.append(ids)
    return out


def perplexity(model: nn.Module, tokenizer, text: str) -> float:
    """exp(mean next-token negative log-likelihood) over ``text`` (its first ``n_ctx`` tokens)."""
    encoded = encode_texts(tokenizer, [text], layout_of(model).n_ctx)
    if not encoded:
        return float("nan")
    ids = torch.tensor(encoded, device=_device(model))  # (1, T)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1]  # (T-1, V)
        nll = F.cross_entropy(logits.float(), ids[0, 1:])
    return math.exp(float(nll))


def text_log_probs(model: nn.Module, tokenizer, texts) -> Tensor:
    """Next-token log-probabilities at every real position of ``texts``. Float[Tensor, "N V"], N = all tokens."""
    encoded = encode_texts(tokenizer, texts, layout_of(model).n_ctx)
    if not encoded:
        return torch.empty(0, layout_of(model).d_vocab)
    ids, lengths = pad_right(encoded, tokenizer.pad_token_id, _device(model))
    real = real_positions(lengths, ids.shape[1])  # (B, T)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=real.long(), use_cache=False).logits  # (B, T, V)
    return F.log_softmax(logits[real].float(), -1)


def kl_divergence(ref_log_probs: Tensor, log_probs: Tensor) -> Tensor:
    """Mean over positions of KL(ref || model) from log-probabilities (N, V) -> scalar."""
    return (ref_log_probs.exp() * (ref_log_probs - log_probs)).sum(-1).mean()


def final_hidden(model: nn.Module, tokenizer, texts) -> Tensor:
    """The decoder's output (after the final norm) at every real position of ``texts``. Float[Tensor, "N d"]."""
    encoded = encode_texts(tokenizer, texts, layout_of(model).n_ctx)
    if not encoded:
        return torch.empty(0, layout_of(model).d_model, device=_device(model))
    ids, lengths = pad_right(encoded, tokenizer.pad_token_id, _device(model))
    real = real_positions(lengths, ids.shape[1])  # (B, T)
    with torch.no_grad():
        decoder = model.get_submodule(layout_of(model).adapter.base)
        return decoder(input_ids=ids, attention_mask=real.long(), use_cache=False).last_hidden_state[real]


def mean_kl(
    base: nn.Module, edited: nn.Module, tokenizer, texts, chunk: int = KL_CHUNK, memo: EvaluationMemo | None = None
) -> float:
    """Mean KL(base || edited) of next-token distributions over every position of ``texts``. The vocabulary is
    unembedded ``chunk`` positions at a time, so memory does not grow with the text (Gemma: 1 MB a position).
    The base model's hidden states are kept in ``memo`` when it is ``base``'s."""
    texts = list(texts)
    memo = memo_for(memo, base)
    h_base = (
        memo.hidden(tuple(texts), lambda: final_hidden(base, tokenizer, texts))
        if memo is not None
        else final_hidden(base, tokenizer, texts)
    )
    h_edited = final_hidden(edited, tokenizer, texts)  # (N, d), as h_base
    if h_base.shape[0] == 0:
        return float("nan")
    total = 0.0
    with torch.no_grad():
        for start in range(0, h_base.shape[0], chunk):
            ref = F.log_softmax(unembed(base, h_base[start : start + chunk]).float(), -1)  # (n, V)
            log_probs = F.log_softmax(unembed(edited, h_edited[start : start + chunk]).float(), -1)
            total += float((ref.exp() * (ref - log_probs)).sum())
    return total / h_base.shape[0]


PANEL_LISTS = ("general", "side_effects", "neighbourhood", "relation")


def panel_probes(panel: Panel, exclude: frozenset[str] = frozenset()) -> dict[str, list[Fact]]:
    """``panel``'s probe lists by name (:data:`PANEL_LISTS`); relation probes whose prompt is in ``exclude`` (the
    edited facts) are left out."""
    return {
        "general": list(panel.general),
        "side_effects": list(panel.side_effects),
        "neighbourhood": list(panel.neighbourhood),
        "relation": [p for p in panel.relation if p.prompt not in exclude],
    }


def panel_result(
    model: nn.Module,
    tokenizer,
    panel: Panel,
    scores: Mapping[str, ProbeScores],
    memo: EvaluationMemo | None = None,
) -> PanelResult:
    """A :class:`PanelResult` from the scores of :func:`panel_probes` (extra lists in ``scores`` are ignored) and
    the perplexity of the panel's passage (NaN without one; kept in ``memo`` when it is ``model``'s)."""
    text = panel.perplexity_text
    memo = memo_for(memo, model)
    if not text.strip():
        ppl = float("nan")
    elif memo is not None:
        ppl = memo.perplexity(text, lambda: perplexity(model, tokenizer, text))
    else:
        ppl = perplexity(model, tokenizer, text)
    return PanelResult(panel=panel.name, perplexity=ppl, **{name: scores[name] for name in PANEL_LISTS})


def evaluate_panel(model: nn.Module, tokenizer, panel: Panel, exclude: frozenset[str] = frozenset()) -> PanelResult:
    """Scores of ``panel``'s general, side-effect, neighbourhood and relation probes (relation probes whose prompt
    is in ``exclude``, the edited facts, are left out) and the perplexity of its passage (NaN without one).
    All probe lists are generated in one batched call."""
    return panel_result(model, tokenizer, panel, score_lists(model, tokenizer, panel_probes(panel, exclude)))


def ngram_entropy(text: str, weights: Mapping[int, float] = NGRAM_WEIGHTS) -> float:
    """ROME's ``compute_n_gram_entropy`` of one text: the mean over ``n`` of weight x the entropy (bits) of the
    frequency distribution of the text's word ``n``-grams (default: 2-grams x 2/3 and 3-grams x 4/3). Words and
    punctuation marks are split by a regular expression instead of nltk. A text too short for an ``n`` has no
    ``n``-grams: that entropy counts as 0."""
    words = _NGRAM_WORD.findall(text)
    terms = []
    for n, weight in weights.items():
        counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(counts.values())
        entropy = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        terms.append(weight * entropy)
    return sum(terms) / len(terms)


@dataclass
class Fluency:
    """Greedy continuations of fixed prompts, ``tokens`` tokens each, and the n-gram entropy of each
    (:func:`ngram_entropy`); ``mean`` is the figure ROME and MEMIT report (higher: less repetitive)."""

    prompts: list[str]
    texts: list[str]
    entropies: list[float]
    tokens: int

    @property
    def mean(self) -> float:
        return sum(self.entropies) / len(self.entropies) if self.entropies else float("nan")

    def to_dict(self) -> dict:
        return {
            "mean": self.mean if self.entropies else None,
            "tokens": self.tokens,
            "samples": [
                {"prompt": p, "text": t, "entropy": e} for p, t, e in zip(self.prompts, self.texts, self.entropies)
            ],
        }


def fluency(model: nn.Module, tokenizer, prompts: Sequence[str], tokens: int = FLUENCY_TOKENS) -> Fluency:
    """:class:`Fluency` of ``model`` on ``prompts`` (one batched generation; never past the context)."""
    prompts = list(prompts)
    texts = greedy_continuations(model, tokenizer, prompts, tokens) if prompts else []
    return Fluency(prompts, texts, [ngram_entropy(t) for t in texts], tokens)


def fluency_prompts(
    facts: Sequence[Fact], panel: Panel, general: int = FLUENCY_GENERAL, edited: int = FLUENCY_FACTS
) -> list[str]:
    """The fluency prompts of an edit: the prompts of its first ``edited`` facts, then the first ``general`` of
    ``panel``'s general probes (in the model's vocabulary once the panel is fitted), without repeats. Few and
    fixed: fluency generates ``FLUENCY_TOKENS`` tokens from each, on every operate and verify."""
    facts_first = list(dict.fromkeys(f.prompt for f in facts))[:edited]
    return list(dict.fromkeys(facts_first + [p.prompt for p in panel.general[:general]]))
