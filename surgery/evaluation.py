"""Judging a model on a panel: next-token answers, probe scores, perplexity and KL to another model.

Everything is greedy and next-token: a probe is correct when the model's top-1 next token is the first token
of its target. Batches are right-padded (causal model: real positions never see the padding), and only the
positions that are needed are unembedded.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .arch import layout_of, unembed
from .panels import Panel, Probe
from .tokens import encode_prompt, encode_target, pad_right, real_positions, token_text

BATCH_SIZE = 32
KL_CHUNK = 64  # positions unembedded at a time by mean_kl


@dataclass
class ProbeResult:
    prompt: str
    target: str
    answer: str  # the model's top-1 next token, as text
    correct: bool  # answer is the target's first token
    target_rank: int  # 1 = top


@dataclass
class ProbeScores:
    """Results of one list of probes; ``correct`` of ``total`` answered right."""

    results: list[ProbeResult]

    @property
    def correct(self) -> int:
        return sum(r.correct for r in self.results)

    @property
    def total(self) -> int:
        return len(self.results)

    def to_dict(self) -> dict:
        return {"correct": self.correct, "total": self.total, "results": [asdict(r) for r in self.results]}


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
        return {"panel": self.panel, "general": self.general.to_dict(),
                "side_effects": self.side_effects.to_dict(), "neighbourhood": self.neighbourhood.to_dict(),
                "relation": self.relation.to_dict(),
                "perplexity": self.perplexity if math.isfinite(self.perplexity) else None}


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


def next_token_logit_batches(model: nn.Module, tokenizer, prompts: list[str], batch_size: int = BATCH_SIZE
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


def target_scores(model: nn.Module, tokenizer, probes: Sequence[Probe]) -> TargetScores:
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


def score_probes(model: nn.Module, tokenizer, probes: list[Probe] | tuple[Probe, ...]) -> ProbeScores:
    """Top-1 next token of each probe's prompt against the first token of its target."""
    if not probes:
        return ProbeScores([])
    s = target_scores(model, tokenizer, probes)
    return ProbeScores([
        ProbeResult(p.prompt, p.target, token_text(tokenizer, int(s.top[i])), int(s.top[i]) == int(s.targets[i]),
                    int(s.ranks[i]))
        for i, p in enumerate(probes)
    ])


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


def mean_kl(base: nn.Module, edited: nn.Module, tokenizer, texts, chunk: int = KL_CHUNK) -> float:
    """Mean KL(base || edited) of next-token distributions over every position of ``texts``. The vocabulary is
    unembedded ``chunk`` positions at a time, so memory does not grow with the text (Gemma: 1 MB a position)."""
    h_base, h_edited = final_hidden(base, tokenizer, texts), final_hidden(edited, tokenizer, texts)  # (N, d)
    if h_base.shape[0] == 0:
        return float("nan")
    total = 0.0
    with torch.no_grad():
        for start in range(0, h_base.shape[0], chunk):
            ref = F.log_softmax(unembed(base, h_base[start : start + chunk]).float(), -1)  # (n, V)
            log_probs = F.log_softmax(unembed(edited, h_edited[start : start + chunk]).float(), -1)
            total += float((ref.exp() * (ref - log_probs)).sum())
    return total / h_base.shape[0]


def evaluate_panel(model: nn.Module, tokenizer, panel: Panel, exclude: frozenset[str] = frozenset()
                   ) -> PanelResult:
    """Scores of ``panel``'s general, side-effect, neighbourhood and relation probes (relation probes whose prompt
    is in ``exclude``, the edited facts, are left out) and the perplexity of its passage (NaN without one).
    All probe lists are scored in one batched pass."""
    lists = {"general": list(panel.general), "side_effects": list(panel.side_effects),
             "neighbourhood": list(panel.neighbourhood),
             "relation": [p for p in panel.relation if p.prompt not in exclude]}
    scores = score_probes(model, tokenizer, [p for probes in lists.values() for p in probes]).results
    split, start = {}, 0
    for key, probes in lists.items():
        split[key] = ProbeScores(scores[start : start + len(probes)])
        start += len(probes)
    ppl = perplexity(model, tokenizer, panel.perplexity_text) if panel.perplexity_text.strip() else float("nan")
    return PanelResult(panel=panel.name, perplexity=ppl, **split)
