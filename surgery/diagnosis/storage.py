"""Where a model stores what it knows about a subject: causal tracing of the MLPs at the subject's last token.

The per-head diagnosis (:mod:`surgery.diagnosis.diagnose`) finds where an answer is *routed*: the block whose
attention writes it to the last position and the block that overrides it. The storage editors (MEMIT,
AlphaEdit) do not edit there: they write a new value at the *subject's* last token, which later attention has to
carry to the answer. Where to write it is the question causal tracing answers (Meng et al. 2022, "Locating and
Editing Factual Associations in GPT", section 2; MEMIT chose its layers from it):

1. Run the fact clean, and keep every block's MLP output at the subject's last token.
2. Corrupt the subject: add Gaussian noise, ``noise`` x the standard deviation of the subject tokens'
   embeddings (the paper's 3), to the embeddings of every subject token. The answer's log-probability drops.
3. Rerun the corrupted input with the clean MLP outputs of a window of ``span`` consecutive blocks restored at the
   subject's last token, for every window. How much of the answer's log-probability a window brings back is its
   indirect effect.

:func:`trace_storage` averages the effect over the facts and noise samples and names the window with the largest:
the blocks whose MLP output at the subject carries the fact, MEMIT's and AlphaEdit's blocks (``--layers trace``).
The answer is scored whole (every piece teacher-forced, as everywhere since answers are several tokens), the model
only hooked, never modified.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..arch import layout_of, unembed
from ..core.errors import InputError, require_positive_int
from ..core.hooks import hooked, main_output
from ..core.interrupt import checkpoint
from ..core.tokens import encode_prompt, encode_target
from ..evaluation.facts import Fact

NOISE = 3.0  # x the subject embeddings' standard deviation (the paper's)
SAMPLES = 3  # noise draws per fact
# Windows start at block 1: block 0's MLP output at the subject's last token is mostly a function of that token
# itself, so restoring it undoes the noise on the input rather than recalling anything (on SmolLM2-135M it alone
# brings back 77% of the answer; the papers' layers never include it: GPT-J 3-8, Llama 3 4-8).
FIRST_BLOCK = 1


@dataclass(frozen=True)
class StorageTrace:
    """Causal tracing of the MLPs at the subject: ``effects[i]`` is the mean answer log-probability (nats)
    that restoring the clean MLP outputs of blocks ``first + i .. first + i + span - 1`` at the subject's last token
    brings back to
    the corrupted run, over ``facts`` facts and ``samples`` noise draws each; ``drop`` is the mean log-probability
    the corruption took away (what full restoration would bring back)."""

    span: int
    first: int
    effects: tuple[float, ...]
    drop: float
    facts: int
    samples: int
    noise: float

    @property
    def blocks(self) -> tuple[int, ...]:
        """The window with the largest effect (the first among equals), ascending."""
        best = max(range(len(self.effects)), key=lambda i: (self.effects[i], -i))
        return tuple(range(self.first + best, self.first + best + self.span))

    def describe(self) -> str:
        b = self.blocks
        effect = self.effects[b[0] - self.first]
        what = (
            f"brings back {effect / self.drop:.0%} of the answer's log-probability that noise on the subject took away"
            if self.drop > 0
            else f"changes the answer's log-probability by {effect:+.3g} nats (noise on the subject did not lower it)"
        )
        return (
            f"blocks {', '.join(map(str, b))}: causal tracing of {self.facts} fact(s) (restoring these blocks' MLP "
            f"outputs at the subject's last token {what}, the most of any {self.span} consecutive blocks)"
        )

    def to_dict(self) -> dict:
        return {
            "blocks": list(self.blocks),
            "span": self.span,
            "first": self.first,
            "effects": list(self.effects),
            "drop": self.drop,
            "facts": self.facts,
            "samples": self.samples,
            "noise": self.noise,
        }


def subject_span(tokenizer, fact: Fact, prompt_ids: list[int]) -> range | None:
    """The positions of ``fact.subject``'s tokens in the prompt (every token that overlaps it), or None when the
    fact names no subject, the prompt does not contain it, or the tokenizer cannot say which characters a token
    covers."""
    subject = fact.subject
    if not subject or subject not in fact.prompt:
        return None
    start = fact.prompt.index(subject)
    end = start + len(subject)
    try:
        encoded = tokenizer(fact.prompt, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):  # a slow tokenizer has no offsets
        return None
    if list(encoded["input_ids"]) != list(prompt_ids):
        return None
    inside = [i for i, (a, b) in enumerate(encoded["offset_mapping"]) if b > a and a < end and b > start]
    return range(inside[0], inside[-1] + 1) if inside else None


def trace_storage(
    model: nn.Module,
    tokenizer,
    facts: Sequence[Fact],
    span: int,
    samples: int = SAMPLES,
    noise: float = NOISE,
    seed: int = 0,
) -> StorageTrace:
    """Causal tracing (module docstring) of ``facts`` that name their subject, over windows of ``span`` blocks
    (all of them on a model with fewer); :class:`InputError` when no fact names its subject."""
    layout = layout_of(model)
    span = min(require_positive_int("span", span), layout.n_layer)  # a shallow model: all its blocks, as MEMIT's
    items = []
    for fact in facts:
        ids = encode_prompt(tokenizer, fact.prompt, layout.n_ctx)
        subject = subject_span(tokenizer, fact, ids)
        if subject is not None:
            items.append((ids, encode_target(tokenizer, fact.target), subject))
    if not items:
        raise InputError(
            "causal tracing needs facts that name their subject (a 'subject' the prompt contains, e.g. "
            '"subject": "France" for "The capital of France is"); none of these does'
        )
    device = next(model.parameters()).device
    decoder = model.get_submodule(layout.adapter.base)
    embed = model.get_submodule(layout.adapter.embed)
    role = "mlp_post_norm" if layout.adapter.mlp_post_norm else "mlp"  # what the residual receives
    mlp_paths = [layout.adapter.path(role, b) for b in range(layout.n_layer)]
    first = FIRST_BLOCK if layout.n_layer - span >= FIRST_BLOCK else 0
    windows = [range(i, i + span) for i in range(first, layout.n_layer - span + 1)]
    with torch.no_grad():
        subject_embeddings = torch.cat(
            [embed(torch.tensor([ids[p] for p in subject], device=device)) for ids, _, subject in items]
        )
        scale = noise * float(subject_embeddings.float().std())
    generator = torch.Generator().manual_seed(seed)
    effects = torch.zeros(len(windows), dtype=torch.float64)
    drop = 0.0
    for ids, target, subject in items:
        checkpoint()
        inputs = torch.tensor([ids + target[:-1]], device=device)
        answer = torch.tensor(target, device=device)
        at = range(len(ids) - 1, len(ids) - 1 + len(target))  # where each piece of the answer is predicted
        clean_out: dict[int, Tensor] = {}
        keep = {p: _keep(clean_out, b, subject[-1]) for b, p in enumerate(mlp_paths)}
        with torch.no_grad(), hooked(model, forward=keep):
            clean = _answer_log_prob(model, decoder, inputs, at, answer)[0]
        rows = 1 + len(windows)  # row 0: corrupted; row 1 + w: corrupted, window w restored
        for _ in range(samples):
            draw = torch.randn(len(subject), subject_embeddings.shape[-1], generator=generator) * scale
            hooks = {layout.adapter.embed: _add_noise(draw.to(device), subject)}
            for b, p in enumerate(mlp_paths):
                restore = torch.tensor([False] + [b in w for w in windows], device=device)
                hooks[p] = _restore(clean_out[b], subject[-1], restore)
            with torch.no_grad(), hooked(model, forward=hooks):
                scores = _answer_log_prob(model, decoder, inputs.expand(rows, -1), at, answer)
            effects += (scores[1:] - scores[0]).double().cpu()
            drop += float(clean - scores[0])
    n = len(items) * samples
    return StorageTrace(span, first, tuple((effects / n).tolist()), drop / n, len(items), samples, noise)


def _keep(store: dict[int, Tensor], block: int, position: int):
    def fn(module, args, output):
        store[block] = main_output(output)[:, position].clone()

    return fn


def _add_noise(draw: Tensor, subject: range):
    def fn(module, args, output):
        out = output.clone()
        out[:, subject.start : subject.stop] += draw.to(out.dtype)
        return out

    return fn


def _restore(value: Tensor, position: int, rows: Tensor):
    def fn(module, args, output):
        out = main_output(output).clone()
        out[rows, position] = value.to(out.dtype).expand(int(rows.sum()), -1)
        return (out, *output[1:]) if isinstance(output, tuple) else out

    return fn


def _answer_log_prob(model: nn.Module, decoder: nn.Module, inputs: Tensor, at: range, answer: Tensor) -> Tensor:
    """The answer's log-probability (its pieces' log-probabilities summed, teacher-forced) per row of ``inputs``."""
    hidden = decoder(input_ids=inputs, use_cache=False).last_hidden_state[:, at.start : at.stop]  # (B, P, d)
    logp = unembed(model, hidden).float().log_softmax(-1)  # (B, P, V)
    return logp.gather(-1, answer.expand(inputs.shape[0], -1)[..., None])[..., 0].sum(-1)
