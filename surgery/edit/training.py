"""Single-site surgery: retrain one site of one block so the facts come out right, and nothing else moves.

Invariant (as in ROME): the model passed in is the same at the end as at the start — bitwise. Training works on
a private copy of the edited block; the trainable tensors are exactly the site's slices (for ``wv`` the
value projection's weight — GPT-2: the ``[d_model, d_model]`` V columns of ``c_attn.weight`` — so the Q/K
weights, biases and norms are never trainable and stay bitwise identical); the blocks above are run read-only
from the base. The result is a :class:`~surgery.io.edit_file.Edit`; :func:`~surgery.io.edit_file.edited_model`
turns it into a usable view.

Speed by design: the blocks below ``layer`` are frozen, so their output — the residual input of block
``layer`` — is captured once for the fact prompts and the unrelated text; each step runs only blocks
``layer .. n_layer-1``, then ``ln_f`` and the unembedding at the positions that matter (the last position of
each fact prompt, every position of the unrelated text). The original model's next-token distributions on the
unrelated text are computed once.

Loss = cross-entropy of every piece of each target, teacher-forced (prompt + the answer's earlier pieces), summed
       over the pieces and averaged over the facts: -log p(whole answer | prompt)
       + ``kl_weight`` * mean KL(original || edited) of the next-token distributions on the unrelated text.
A fact counts as fixed when every piece leads by ``margin``: greedy decoding then says the whole answer, not a
first piece that the model completes into something else.

Defaults (:class:`SurgeryConfig`): Adam with a step scaled to the edited weights (lr = ``lr_scale`` 0.025 x the RMS
of the site's base values: 1e-3 on Gemma 3 270M's value projections), at most 300 epochs (one epoch = one full-batch
step over all facts and the unrelated text), kl_weight 200, early stop as soon as every fact is top-1 by at least
``margin`` = 0.1 logit. The step grows 5% per step that lowers the loss (up to 32x); a step after which the loss
rose and the preservation term tripled is undone and the step halved (a given ``lr`` is fixed). With ``layer=None``
(``--layer auto``) a block that cannot fix every fact within the budget hands over to the next candidate
(:func:`candidate_layers`); the report's ``tried`` lists each block trained. These defaults fix the routing facts of
the zoo (assets/zoo, docs/zoo.md), models they were not tuned on. Training draws no random numbers (full batch,
dropout off, the slices start at the base values), so a run is deterministic on CPU; ``seed`` seeds torch's RNG
inside a forked RNG state anyway, so a future random op stays reproducible and the caller's RNG is left alone.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..arch import SITES, block_label, count_parameters, layout_of
from ..core.errors import InputError, NonFiniteError, SurgeryFailed, SurgeryTimeout, require_positive_int
from ..core.interrupt import checking
from ..diagnosis.diagnose import Diagnosis, diagnose_batch
from ..diagnosis.storage import StorageTrace, trace_storage
from ..evaluation.facts import Fact
from ..evaluation.memo import EvaluationMemo, memo_for
from ..evaluation.panels import ENGLISH_PANEL, Panel, fit_panel, load_panel, panel_for_model
from ..evaluation.report import SurgeryReport, compare
from ..evaluation.scoring import kl_divergence, score_probes
from ..io.edit_file import Edit, base_config, block_digests, edited_model, weight_stats
from .editors import EDIT_SITE, METHODS, MULTI_BLOCK, TrainOutcome, edit_mlp_out
from .keystats import DEFAULT_MAX_TOKENS
from .memit import MemitHparams, spread_layers
from .preservation import PRESERVE_TERMS, TextPreservation
from .upper_stack import FrozenInputs, UpperStack, encodable, freeze_fact_batches, kept_answers

TRACE = "trace"  # SurgeryConfig.layers: MEMIT's and AlphaEdit's blocks from causal tracing (surgery.diagnosis.storage)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

Progress = Callable[[int, int, float], None]


@dataclass(frozen=True)
class SurgeryConfig:
    """How to operate. Defaults are documented in the module docstring and ``docs/surgery.md``.

    site: ``wv`` | ``attn`` | ``mlp`` | ``layer``; layer: 0-indexed block, or None for the diagnosis'
    prescribed layer; lr: a fixed Adam learning rate, or None (the default) for an adaptive one that starts at
    ``lr_scale`` x the RMS of the site's base weights (:func:`site_lr`: the step follows the weights' scale, so one
    default serves models whose weights differ in scale) and grows or backs off (:func:`train_site`); epochs:
    step budget (per block tried); kl_weight: weight of the preservation term;
    margin: logits by which each target must lead for the early stop; max_unrelated_tokens: tokens of unrelated
    text used by the preservation term (the text is cut there; None: :func:`unrelated_token_budget` of the
    model's vocabulary); seed: RNG seed; batch_size: facts per mini-batch (a step still covers every fact: the
    gradient is accumulated over the mini-batches, so memory is bounded by the batch, not by the facts);
    max_seconds: wall-time limit of one :func:`operate`, or None (the default) for none: checked before every
    training step, after every forward pass of the key statistics and between the stages (so it may be passed by at
    most one stage), it stops the surgery with :class:`~surgery.core.errors.SurgeryTimeout` and nothing is returned
    (a public app's limit; the CLI sets none).
    method: ``wv`` (our repair of ``site``: everything above), ``rome`` or ``ft`` (the MLP output projection of the
    block), ``memit`` or ``alphaedit`` (those of several blocks; :mod:`surgery.edit.editors`; ``site`` must stay
    ``wv``, and lr, lr_scale, epochs, kl_weight, margin, max_unrelated_tokens and batch_size are ``wv``'s);
    stat_tokens: tokens of text for the key statistics of ROME, MEMIT and AlphaEdit; layers: the blocks MEMIT and
    AlphaEdit edit (ascending; ``--layers 3,4,5``, the papers' fixed layers), ``"trace"`` for the ``span`` blocks
    whose MLPs carry the facts' subjects by causal tracing (:mod:`surgery.diagnosis.storage`), or None (the
    default): with ``layer`` None those traced blocks when some fact names a subject its prompt contains, else
    (and with ``layer`` given) the ``span`` blocks ending at ``layer`` (given, or the diagnosis' prescribed one).
    preserve_term: the unrelated-text preservation term of ``wv``: ``kl`` (the exact KL, the default), or a cheaper
    stand-in, ``topk``, ``hidden`` or ``sampled`` (:mod:`surgery.edit.preservation`, measured in bench/README.md);
    the kept prompts' term is the exact KL under every option.
    """

    site: str = "wv"
    layer: int | None = None
    lr: float | None = None
    lr_scale: float = 0.025
    epochs: int = 300
    kl_weight: float = 200.0
    margin: float = 0.1
    max_unrelated_tokens: int | None = None
    seed: int = 0
    batch_size: int = 64
    max_seconds: float | None = None
    method: str = "wv"
    stat_tokens: int = DEFAULT_MAX_TOKENS
    layers: tuple[int, ...] | str | None = None
    preserve_term: str = "kl"

    def __post_init__(self) -> None:
        if self.preserve_term not in PRESERVE_TERMS:
            raise InputError(f"unknown preserve_term {self.preserve_term!r}: choose one of {', '.join(PRESERVE_TERMS)}")
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.layers is not None:
            object.__setattr__(self, "layers", _check_layers(self.layers, self.method, self.layer))
        if self.method != "wv" and self.site != "wv":
            raise InputError(
                f"--site {self.site} is for --method wv; --method {self.method} edits the MLP output projection"
            )
        require_positive_int("stat_tokens", self.stat_tokens)
        if self.site not in SITES:
            raise InputError(f"unknown site {self.site!r}: choose one of {', '.join(SITES)}")
        if self.layer is not None and (
            isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0
        ):
            raise InputError(f"layer must be a block index (0, 1, ...) or auto, not {self.layer!r}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"the learning rate must be a positive number, not {self.lr}")
        if not (math.isfinite(self.lr_scale) and self.lr_scale > 0):
            raise InputError(f"lr_scale must be a positive number, not {self.lr_scale}")
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise InputError(f"epochs must be at least 1, not {self.epochs}")
        if not (math.isfinite(self.kl_weight) and self.kl_weight >= 0):
            raise InputError(f"kl_weight must be a non-negative number, not {self.kl_weight}")
        require_positive_int("batch_size", self.batch_size)
        if not (math.isfinite(self.margin) and self.margin >= 0):
            raise InputError(f"margin must be a non-negative number, not {self.margin}")
        if self.max_unrelated_tokens is not None and (
            isinstance(self.max_unrelated_tokens, bool)
            or not isinstance(self.max_unrelated_tokens, int)
            or self.max_unrelated_tokens < 0
        ):
            raise InputError(f"max_unrelated_tokens must be a non-negative integer, not {self.max_unrelated_tokens!r}")
        if self.max_seconds is not None and (
            isinstance(self.max_seconds, bool)
            or not isinstance(self.max_seconds, (int, float))
            or not (math.isfinite(self.max_seconds) and self.max_seconds > 0)
        ):
            raise InputError(f"max_seconds must be a positive number of seconds, not {self.max_seconds!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SurgeryConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise InputError(f"unknown surgery option(s): {', '.join(sorted(unknown))}")
        return cls(**d)


def _check_layers(layers, method: str, layer: int | None) -> tuple[int, ...] | str:
    """``SurgeryConfig.layers`` as a tuple (or :data:`TRACE`), or :class:`InputError` in one line."""
    if method not in MULTI_BLOCK:
        raise InputError(f"--layers is for --method {' or '.join(MULTI_BLOCK)}; --method {method} edits one block")
    if layers == TRACE:
        if layer is not None:
            raise InputError(f"--layers {TRACE} chooses the blocks, and so the block: leave --layer out")
        return TRACE
    if (
        isinstance(layers, (str, bytes))
        or not isinstance(layers, (list, tuple))
        or not layers
        or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in layers)
        or list(layers) != sorted(set(layers))
    ):
        raise InputError(
            f"layers must be distinct block indices in ascending order (e.g. 3,4,5) or {TRACE!r}, not {layers!r}"
        )
    if layer is not None and layer != layers[-1]:
        raise InputError(f"--layer {layer} and --layers {list(layers)} disagree: the last of --layers is the block")
    return tuple(layers)


# Logits the preservation term may compute per step. Its cost is positions x vocabulary x d_model, so the
# unembedding of the unrelated text dominates a step on large vocabularies: 512 positions of GPT-2 (50,257 tokens)
# fit; Gemma's 262,144 tokens get 128 positions. The reported KL is still measured on the whole text.
LOGIT_BUDGET = 2**25


def unrelated_token_budget(d_vocab: int) -> int:
    """Tokens of unrelated text per training step: ``LOGIT_BUDGET / d_vocab``, between 64 and 512."""
    return max(64, min(512, LOGIT_BUDGET // d_vocab))


@dataclass
class SurgeryResult:
    edit: Edit
    report: SurgeryReport

    def to_dict(self) -> dict:
        return self.report.to_dict()


# --------------------------------------------------------------------------------------------------
# Choosing the layer.
# --------------------------------------------------------------------------------------------------


def choose_layer(model: nn.Module, tokenizer, facts: Sequence[Fact]) -> tuple[int, str, list[str]]:
    """The most common prescribed layer among the facts diagnosed as routing failures (ties: the first such
    fact's). Returns ``(layer, reason, verdicts)``; raises :class:`InputError` when no fact is a routing failure.
    """
    diagnoses = diagnose_batch(model, tokenizer, [f.prompt for f in facts], [f.target for f in facts])
    return (*layer_from_diagnoses(diagnoses), [d.verdict for d in diagnoses])


def _trace(model, tokenizer, facts: Sequence[Fact], deadline: Deadline, memo: EvaluationMemo) -> StorageTrace:
    """Causal tracing of ``facts`` (those naming a subject their prompt contains) over MEMIT's span: where
    MEMIT and AlphaEdit write (kept in ``memo``); :class:`InputError` when none names one."""
    named = [f for f in facts if f.subject and f.subject in f.prompt]
    key = (tuple((f.prompt, f.target, f.subject) for f in named), MemitHparams.span)
    with deadline.during("while tracing where the facts are stored"):
        return memo.trace(key, lambda: trace_storage(model, tokenizer, named, MemitHparams.span))


def layer_from_diagnoses(diagnoses: Sequence[Diagnosis]) -> tuple[int, str]:
    """:func:`choose_layer` on diagnoses already made: ``(layer, reason)``."""
    routing = [d for d in diagnoses if d.verdict == "routing"]
    if not routing:
        absent = [d.prompt for d in diagnoses if d.verdict == "absence"]
        raise InputError(
            "--layer auto needs a routing failure among the facts, but "
            + (
                f"{len(absent)} are absences (the model never had them: {absent[0]!r}, ...)"
                if absent
                else "every fact is already correct"
            )
            + "; pass --layer N to operate anyway"
        )
    counts = Counter(d.prescribed_layer for d in routing)
    layer, n = counts.most_common(1)[0]
    overrides = Counter((d.override["layer"], d.override["head"]) for d in routing)
    (o_layer, o_head), _ = overrides.most_common(1)[0]
    reason = (
        f"auto: block {layer} ({block_label(layer)}) is the prescribed layer of {n}/{len(routing)} routing "
        f"failures (where the target is written most strongly before the override head, "
        f"most often {block_label(o_layer, o_head)})"
    )
    return layer, reason


def candidate_layers(diagnoses: Sequence[Diagnosis], first: int, most: int = 3) -> list[int]:
    """The blocks ``--layer auto`` tries, in order: ``first`` (:func:`layer_from_diagnoses`), the other layers the
    routing failures prescribe (most often first), then the blocks beside ``first`` below the override head's
    block; at most ``most``."""
    routing = [d for d in diagnoses if d.verdict == "routing"]
    prescribed = [layer for layer, _ in Counter(d.prescribed_layer for d in routing).most_common()]
    override = Counter(d.override["layer"] for d in routing).most_common(1)[0][0] if routing else first + 1
    order = [first, *prescribed, first - 1, first + 1]
    out: list[int] = []
    for layer in order:
        if 0 <= layer < max(override, first + 1) and layer not in out:
            out.append(layer)
    return out[:most]


# --------------------------------------------------------------------------------------------------
# Training.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Deadline:
    """When a surgery must stop: ``SurgeryConfig.max_seconds`` after :meth:`start` (``time.monotonic``); a
    deadline without a limit never passes."""

    limit: float | None = None
    at: float | None = None

    @classmethod
    def start(cls, max_seconds: float | None) -> Deadline:
        return cls(max_seconds, None if max_seconds is None else time.monotonic() + max_seconds)

    def check(self, where: str) -> None:
        """Raise :class:`SurgeryTimeout` when the deadline has passed; ``where``: what the surgery was doing."""
        if self.at is not None and time.monotonic() > self.at:
            raise SurgeryTimeout(
                f"surgery stopped: it ran past its time limit of {self.limit:g} s ({where}); nothing was kept"
            )

    def watching(self, progress: Callable[..., None] | None, where: str) -> Callable[..., None]:
        """``progress`` (or nothing) preceded by :meth:`check`: a stage that only reports progress, such as the
        key statistics, stops at the deadline too (and, stopped, caches nothing)."""

        def checked(*args) -> None:
            self.check(where)
            if progress is not None:
                progress(*args)

        return checked

    def during(self, where: str) -> AbstractContextManager[None]:
        """A ``with`` block inside which every :func:`~surgery.core.interrupt.checkpoint` (each token of a greedy
        generation, each batch of a diagnosis) checks this deadline: a long evaluation stops inside itself, not
        only when it ends."""
        return checking(lambda: self.check(where))


# The step size adapts ("bold driver"): every accepted step that lowers the loss grows the learning rate by
# LR_GROWTH, up to LR_MAX_GROWTH x where it started, so a model that needs bigger steps than the scaled default gets
# them without a hand-tuned --lr; a step after which the loss rose and the preservation term jumped (by more than
# KL_JUMP x) is undone (the slices restored to the last accepted values) and the learning rate halved, at most
# MAX_BACKOFFS times per run. A run that converges within a few steps (Gemma 3 270M: one) never sees either.
LR_GROWTH = 1.05
LR_MAX_GROWTH = 32.0
KL_JUMP = 3.0
MAX_BACKOFFS = 20


def site_lr(values: dict[str, Tensor], config: SurgeryConfig) -> float:
    """The Adam learning rate of a run: ``config.lr`` when given, else ``config.lr_scale`` x the RMS of the site's
    base values (all slices together). Adam's steps are about ``lr`` per weight whatever the gradient's scale,
    so a step relative to the weights' own scale moves every model by the same fraction of its weights (Gemma
    3 270M's value projections: RMS 0.04, lr 1e-3 as tuned before; the demo model's: RMS 0.085, lr 2.1e-3)."""
    if config.lr is not None:
        return config.lr
    flat = torch.cat([v.detach().float().flatten() for v in values.values()])
    return config.lr_scale * float(flat.pow(2).mean().sqrt())


def train_site(
    model: nn.Module,
    frozen: FrozenInputs | Sequence[FrozenInputs],
    site: str,
    layer: int,
    config: SurgeryConfig,
    progress: Progress | None = None,
    deadline: Deadline | None = None,
) -> TrainOutcome:
    """Adam on the site's slices of block ``layer`` until every fact is top-1 by ``config.margin`` or the
    budget is spent. Returns the trained slice values (the model is not touched).

    With ``config.lr`` given, Adam runs at that fixed learning rate. Without (the default), the learning rate
    starts at :func:`site_lr` and adapts (``LR_GROWTH``, ``KL_JUMP``: see there): it grows while
    the loss falls; a step after which the loss rose and the preservation term jumped is undone (the slices go
    back to the last accepted values) and the learning rate halved; an undone step is not counted in ``steps``.

    ``frozen`` may be a list of fact mini-batches (:func:`~surgery.edit.upper_stack.freeze_fact_batches`; the first
    holds the unrelated text): each step then accumulates the gradient over all of them before the one Adam
    update, so a step is still one full-batch step over every fact — memory bounded by the mini-batch, the
    result that of one batch (up to the order of float sums).

    ``deadline`` (default: ``config.max_seconds`` from now) is checked before every step: past it,
    :class:`~surgery.core.errors.SurgeryTimeout` is raised.
    """
    deadline = deadline if deadline is not None else Deadline.start(config.max_seconds)
    batches = [frozen] if isinstance(frozen, FrozenInputs) else list(frozen)
    text = batches[0]
    n_facts = sum(b.n_facts for b in batches)
    layout = layout_of(model)
    slices = layout.site_slices(site, layer, model)
    stack = UpperStack(model, layer)
    base = dict(stack.block.named_parameters())
    values = {s.name: s.read(base[s.name[len(stack.prefix) :]]).detach().clone().requires_grad_(True) for s in slices}
    lr = site_lr(values, config)
    adaptive = config.lr is None  # a given --lr is a plain, fixed Adam step, as it always was
    optimizer = torch.optim.Adam(values.values(), lr=lr)
    use_kl = text.text is not None and config.kl_weight > 0
    use_kept = text.kept is not None and config.kl_weight > 0
    on_text = (
        TextPreservation(config.preserve_term, stack, text, stack.block_params(slices, values), config.seed)
        if use_kl
        else None
    )
    with torch.no_grad():
        if use_kept and text.kept_ref_log_probs is None:
            text.kept_ref_log_probs = stack.kept_log_probs(text, stack.block_params(slices, values))

    def preservation() -> Tensor:
        """The text term (``config.preserve_term``) plus KL where the kept prompts' own answers are said (each a
        mean)."""
        params = stack.block_params(slices, values)
        kl = on_text(params) if use_kl else torch.zeros(())
        if use_kept:
            kl = kl + kl_divergence(text.kept_ref_log_probs, stack.kept_log_probs(text, params))
        return kl

    steps, backoffs = 0, 0
    good = {n: v.detach().clone() for n, v in values.items()}  # the last accepted values
    last: tuple[float, float] | None = None  # (loss, preservation term) of the last accepted values
    while True:
        deadline.check(f"training block {layer}, step {steps + 1}")
        optimizer.zero_grad(set_to_none=True)
        ce, fixed = 0.0, 0
        for batch in batches:  # the facts' cross-entropy, mean over all facts, gradient accumulated per batch
            logits = stack.fact_logits(batch, stack.block_params(slices, values))  # (P, V): every answer piece
            part = F.cross_entropy(logits.float(), batch.targets, reduction="sum") / n_facts
            if steps < config.epochs:
                part.backward()
            ce += float(part.detach())
            fixed += _n_fixed(logits.detach(), batch.targets, batch.piece_rows, batch.n_facts, config.margin)
        kl = preservation()
        kl_term = config.kl_weight * float(kl.detach())
        loss = ce + kl_term
        if not math.isfinite(loss) and steps == 0:  # the base model itself: no learning rate would help
            raise NonFiniteError(
                f"the loss is {loss} before any training step at block {layer} (cross-entropy {ce}, preservation "
                f"{kl_term}): the model's activations on the facts or the preservation text overflow or hold NaN"
            )
        if not math.isfinite(loss):
            raise SurgeryFailed(
                f"training diverged: the loss became {loss} at step {steps}; try a lower learning rate (now {lr:.3g})"
            )
        if adaptive and last is not None and loss > last[0] and kl_term > KL_JUMP * last[1] and backoffs < MAX_BACKOFFS:
            with torch.no_grad():  # undo the step that overshot; the moments keep the accepted gradients
                for n, v in values.items():
                    v.copy_(good[n])
            backoffs += 1
            for group in optimizer.param_groups:
                group["lr"] /= 2
            log.debug(
                "step %d: preservation term %.3g -> %.3g, step undone, lr now %.3g",
                steps,
                last[1],
                kl_term,
                optimizer.param_groups[0]["lr"],
            )
            continue
        if fixed == n_facts or steps >= config.epochs:
            break
        if adaptive and last is not None and loss < last[0]:
            for group in optimizer.param_groups:
                group["lr"] = min(group["lr"] * LR_GROWTH, LR_MAX_GROWTH * lr)
        last = (loss, kl_term)
        good = {n: v.detach().clone() for n, v in values.items()}
        if use_kl or use_kept:
            (config.kl_weight * kl).backward()
        optimizer.step()
        steps += 1
        if progress is not None:
            progress(steps, config.epochs, loss)
        log.debug("step %d loss %.4f ce %.4f kl %.2e fixed %d/%d", steps, loss, ce, kl, fixed, n_facts)
    bad = [n for n, v in values.items() if not torch.isfinite(v).all()]
    if bad:
        raise SurgeryFailed(f"training produced NaN/Inf weights in {', '.join(bad)}; try a lower learning rate")
    return TrainOutcome(
        {n: v.detach().clone() for n, v in values.items()}, steps, loss, ce, float(kl.detach()), fixed, lr, backoffs
    )


def preservation_texts(panel: Panel, tokenizer, n_ctx: int, given: Sequence[str] | None) -> tuple[list[str], str]:
    """The texts of the preservation term: ``given``, else the panel's that ``tokenizer`` can encode, else the
    English panel's; with none at all, training runs on the facts alone and the returned note says so."""
    if given is not None:
        return list(given), ""
    for source in (panel, load_panel(ENGLISH_PANEL)):
        texts = list(fit_panel(source, tokenizer, n_ctx).panel.unrelated_text)
        if texts:
            note = (
                ""
                if source is panel
                else f"preservation text: the English panel's (panel {panel.name!r} has none this tokenizer can encode)"
            )
            return texts, note
    return [], "no unrelated text this tokenizer can encode: trained without the preservation (KL) term"


def _n_fixed(logits: Tensor, targets: Tensor, rows: Tensor, n_facts: int, margin: float) -> int:
    """Facts every piece of whose answer leads every other token by at least ``margin`` (teacher-forced): greedy
    decoding then says the whole answer. ``logits`` (P, V), ``targets`` and ``rows`` (P,): piece labels, facts."""
    target = logits.gather(-1, targets[:, None])[:, 0]  # (P,)
    others = logits.scatter(-1, targets[:, None], float("-inf")).amax(-1)  # (P,)
    lead = target - others
    worst = torch.full((n_facts,), float("inf"), device=lead.device).scatter_reduce(0, rows, lead, "amin")
    return int((worst >= margin).sum()) if margin > 0 else int((worst > 0).sum())


# --------------------------------------------------------------------------------------------------
# The whole operation.
# --------------------------------------------------------------------------------------------------


def operate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    facts: Sequence[Fact],
    config: SurgeryConfig = SurgeryConfig(),
    unrelated: Sequence[str] | None = None,
    progress: Progress | None = None,
    panel: Panel | None = None,
    require_all: bool = True,
    preserve: Sequence[Fact] | None = None,
    memo: EvaluationMemo | None = None,
    cache_dir: str | os.PathLike | None = None,
    stats_progress: Progress | None = None,
) -> SurgeryResult:
    """Edit one site so that every fact's target is the top-1 next token; ``model`` is never mutated.

    ``facts``: probes (prompt, target); every piece of each target is trained. With ``layer=None`` the facts the
    diagnosis calls absences (the model never holds the answer) are not trained, and the report says so: a
    single-site repair would only teach them by rote. ``unrelated``: texts for the
    preservation term (default: the panel's ``unrelated_text``). ``panel``: what the report judges the edit by
    (default :func:`panel_for_model`). ``preserve``: prompts (with their answers) whose greedy continuation the
    preservation term also keeps, as many tokens as each answer has pieces and the one after (default: the
    panel's ``preserve`` list; a prompt among the facts is left out). ``progress(step, total, loss)`` is called
    after every step.
    ``config.method`` ``rome``/``ft`` edits the block's MLP output projection instead (same layer choice, same
    report), ``memit``/``alphaedit`` those of ``config.layers`` or of the ``span`` blocks ending at the chosen one
    (the edit then holds several blocks); the key statistics are cached under ``cache_dir`` (default
    ``~/.cache/transformer-surgery/keystats``) and ``stats_progress(tokens, total)`` follows their computation.
    Raises :class:`InputError` (bad facts, nothing to fix, no routing failure for ``layer=None``) or
    :class:`SurgeryFailed` (NaN/Inf, or — with ``require_all``, the default — facts not all fixed within the
    budget; without it the report says how many were, as a many-fact edit is judged by its efficacy), or its
    subclass :class:`~surgery.core.errors.SurgeryTimeout` past ``config.max_seconds``.

    ``memo``: the base model's evaluation figures already computed (an
    :class:`~surgery.evaluation.memo.EvaluationMemo` of ``model``, e.g. the app's, shared by its repairs): what it
    holds is not computed again, and what this repair computes on the base model is kept there. Without one, a
    fresh memo serves this call alone. The results are the same either way.
    """
    t0 = time.perf_counter()
    memo = memo_for(memo, model)  # a memo of another model holds nothing for this one
    memo = memo if memo is not None else EvaluationMemo(model)
    deadline = Deadline.start(config.max_seconds)
    facts = list(facts)
    if not facts:
        raise InputError('no facts given: give at least one {"prompt", "target"} to fix')
    layout = layout_of(model)
    panel = panel if panel is not None else panel_for_model(model)
    unrelated, unrelated_note = preservation_texts(panel, tokenizer, layout.n_ctx, unrelated)
    with deadline.during("while judging and diagnosing the facts"):
        before = score_probes(model, tokenizer, facts, memo)  # also validates every prompt and target
        if before.correct == before.total:
            raise InputError(f"the model already answers all {before.total} facts correctly: nothing to fix")
        diagnoses = memo.diagnoses(
            tuple((f.prompt, f.target) for f in facts),
            lambda: diagnose_batch(model, tokenizer, [f.prompt for f in facts], [f.target for f in facts]),
        )
    verdicts = [d.verdict for d in diagnoses]
    deadline.check("after diagnosing the facts")
    absent_notes: list[str] = []
    keep = [True] * len(facts)  # the facts trained, and required to be fixed
    trace: StorageTrace | None = None  # MEMIT, AlphaEdit: causal tracing of the facts (surgery.diagnosis.storage)
    untraced = ""  # why they were not traced, by default, when they were not
    if config.layers == TRACE:  # asked for: every fact traced (storage editors also write facts the model lacks)
        trace = _trace(model, tokenizer, facts, deadline, memo)
    elif config.layers is not None:
        layer = config.layers[-1]
        reason = f"given: blocks {', '.join(map(str, config.layers))} (--layers)"
    elif config.layer is None:
        layer, reason = layer_from_diagnoses(diagnoses)
        keep = [v != "absence" for v in verdicts]
        absent_notes = [
            f"not trained: {f.prompt!r} -> {f.target!r} is an absence (the model never holds the "
            f"answer), which single-site surgery does not repair"
            for f, v in zip(facts, verdicts)
            if v == "absence"
        ]
        if config.method in MULTI_BLOCK:
            # By default MEMIT and AlphaEdit write where the trained facts' subjects are stored; facts that name no
            # subject their prompt contains cannot be traced, and then the default is the blocks ending at the
            # prescribed one (--layers trace refuses them instead).
            try:
                trace = _trace(model, tokenizer, [f for f, k in zip(facts, keep) if k], deadline, memo)
            except InputError:
                untraced = "; not traced: no fact names a subject its prompt contains"
    else:
        layer, reason = layout.check_layer(config.layer), "given"
    traced = trace.blocks if trace is not None else ()
    if trace is not None:
        layer, reason = traced[-1], trace.describe()
    site = config.site if config.method == "wv" else EDIT_SITE
    spread: tuple[int, ...] = ()  # MEMIT, AlphaEdit: the blocks edited, `layer` the last
    if config.method in MULTI_BLOCK:
        spread = traced or config.layers or spread_layers(layer, MemitHparams.span)
        for block in spread:
            layout.check_layer(block)
        if config.layers is None and not traced:
            reason += (
                f"; blocks {', '.join(map(str, spread))}: the {MemitHparams.span} blocks ending at block {layer} "
                f"(MEMIT's span, clipped at block 0){untraced}"
            )
    log.info("operating (%s) on site %s of block %d (%s)", config.method, site, layer, reason)

    # --layer auto: when the prescribed block cannot fix the facts within the budget, the next candidate gets a
    # fresh budget; the best try (most facts fixed, the first among equals) is kept and the report lists them all.
    # ROME and FT-L edit the prescribed block only, as the papers edit one chosen layer.
    layers = candidate_layers(diagnoses, layer) if config.layer is None and config.method == "wv" else [layer]
    budget = config.max_unrelated_tokens
    budget = unrelated_token_budget(layout.d_vocab) if budget is None else budget
    trained = [f for f, k in zip(facts, keep) if k]
    edited_prompts = {f.prompt for f in facts}
    preserve = [p for p in (panel.preserve if preserve is None else preserve) if p.prompt not in edited_prompts]
    preserve, unpreservable = encodable(model, tokenizer, preserve) if config.method == "wv" else ([], [])
    kept = kept_answers(model, tokenizer, preserve, memo)
    device = next(model.parameters()).device
    tried: list[dict] = []
    best = None
    train_time = 0.0
    for layer in layers:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(config.seed)
            t_train = time.perf_counter()
            if config.method == "wv":
                frozen = freeze_fact_batches(
                    model, tokenizer, trained, unrelated, layer, budget, config.batch_size, kept
                )
                deadline.check(f"after capturing block {layer}'s inputs")
                outcome = train_site(model, frozen, config.site, layer, config, progress, deadline)
                slices = tuple(layout.site_slices(config.site, layer, model))
            else:
                done = edit_mlp_out(
                    model,
                    tokenizer,
                    trained,
                    layer,
                    config.method,
                    config.stat_tokens,
                    progress,
                    deadline.check,
                    cache_dir,
                    deadline.watching(stats_progress, "computing the key statistics"),
                    layers=spread,
                )
                outcome = done
                method_info = {"hparams": done.hparams, "notes": done.notes}
                slices = tuple(s for block in spread or (layer,) for s in layout.mlp_out_slices(block))
            train_time += time.perf_counter() - t_train
        metadata = {"base_config": base_config(model), **block_digests(model, spread or (layer,))}
        if config.method != "wv":  # a wv edit's file stays byte-for-byte what it always was
            metadata["method"] = config.method
        edit = Edit(site, layer, slices, outcome.values, metadata, spread)
        edited = edited_model(model, edit)
        with deadline.during(f"judging the facts after training block {layer}"):
            after = score_probes(edited, tokenizer, facts)
        wrong = [r.prompt for r, k in zip(after.results, keep) if k and not r.correct]
        tried.append(
            {
                "layer": layer,
                "steps": outcome.steps,
                "lr": outcome.lr,
                "backoffs": outcome.backoffs,
                "fixed": sum(keep) - len(wrong),
                "total": sum(keep),
            }
        )
        log.info("block %d: %d/%d facts fixed in %d steps", layer, tried[-1]["fixed"], sum(keep), outcome.steps)
        if best is None or len(wrong) < len(best[5]):
            best = (layer, outcome, edit, edited, after, wrong)
        if not wrong:
            break
    layer, outcome, edit, edited, after, wrong = best
    if layer != layers[0]:
        reason += f"; block {layers[0]} did not fix every fact within {config.epochs} epochs, block {layer} did better"
    budget_words = (
        f"{config.method}'s step budget" if config.method != "wv" else f"the budget of {config.epochs} epochs"
    )
    if wrong and require_all:
        raise SurgeryFailed(
            f"not fixed within the budget: {sum(keep) - len(wrong)}/{sum(keep)} facts correct after {outcome.steps} "
            f"{'epochs' if config.method == 'wv' else 'steps'} at site {site} of "
            f"{'blocks ' + ', '.join(map(str, spread)) if len(spread) > 1 else f'block {layer}'}"
            f"{'' if config.method == 'wv' else ' with ' + config.method} (still wrong: {wrong[0]!r}"
            f"{', ...' if len(wrong) > 1 else ''}); "
            + (
                "try more --epochs, a larger site or another --layer"
                if config.method == "wv"
                else "try another --layer" + (" or --layers" if spread else "")
            )
        )
    deadline.check("before evaluating the edit")
    with deadline.during("while evaluating the edit"):
        comparison = compare(model, edited, tokenizer, facts, panel, unrelated, verdicts, before, after, memo=memo)
    notes = (
        absent_notes
        + [f"not scored: {u}" for u in comparison.unavailable]
        + ([unrelated_note] if unrelated_note and config.method == "wv" else [])
        + (method_info["notes"] if config.method != "wv" else [])
        + (
            [
                f"not preserved: {len(unpreservable)} preserve prompt(s) this tokenizer cannot encode or that do "
                f"not fit the context ({', '.join(repr(p.prompt) for p in unpreservable[:3])}"
                f"{', ...' if len(unpreservable) > 3 else ''})"
            ]
            if unpreservable
            else []
        )
    )
    if after.correct < after.total:
        notes.append(f"{after.correct}/{after.total} facts fixed within {budget_words}")
    if len(tried) > 1:
        notes.append(
            "blocks tried: "
            + ", ".join(f"{t['layer']} ({t['fixed']}/{t['total']} fixed in {t['steps']} steps)" for t in tried)
        )
    extra = {} if config.method == "wv" else {"hparams": method_info["hparams"]}
    if trace is not None:
        extra["storage_trace"] = trace.to_dict()
    report = SurgeryReport(
        site=site,
        layer=layer,
        layer_reason=reason,
        params_in_site=edit.numel,
        params_total=count_parameters(model),
        steps=outcome.steps,
        epochs=config.epochs,
        final_loss=outcome.loss,
        final_ce=outcome.ce,
        final_kl=outcome.kl,
        train_time_s=train_time,
        wall_time_s=time.perf_counter() - t0,
        comparison=comparison,
        weights=weight_stats(model, edit, edited),
        config={
            **config.to_dict(),
            "layer": layer,
            "layers": list(spread) if spread else None,
            "lr_start": outcome.lr,
            "panel": panel.name,
            "max_unrelated_tokens": budget,
            "preserved_prompts": len(kept),
            **extra,
        },
        notes=notes,
        block=layout.adapter.block(layer),
        tried=tried,
        method=config.method,
    )
    return SurgeryResult(edit, report)
