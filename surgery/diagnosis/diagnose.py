"""Why does the model emit the wrong next token? Logit lens, direct logit attribution and a verdict.

**Which token.** A target of several tokens (" Tir" + "ana") is teacher-forced first
(:mod:`surgery.diagnosis.divergence`): the diagnosed piece is the first one the model's greedy prediction misses, read
at the position before it, so the input is ``prompt + target[:k]`` and the target token ``target[k]``; when the model
predicts every piece, piece 0 at the prompt's last position (as for a single-token target, whose numbers are those of
one plain pass).
:attr:`Diagnosis.divergence` says which piece and position, and whether a missed first piece is generic (fed
it, the model still misses a later piece: a repair there would only teach the piece).

One forward pass of the decoder with hooks that keep only the last position gives everything, for every
supported family (:mod:`surgery.arch`):

* the residual stream after the embeddings and after each block (rebuilt from the captured component outputs),
* each head's ``z`` (the input of the attention output projection W_O), each attention output bias, each MLP
  output, and — for families with norms after the sub-layers (Gemma 2/3) — those post-norms' scales.

**Logit lens** (as in TransformerLens' ``accumulated_resid`` + ``apply_ln``): each residual is passed through the
final norm *with its own* statistics and the unembedding; only the last position is unembedded.

**Direct logit attribution**: the final residual ``r = embed + sum_l (sum_h head_lh + b_O^l + mlp_l)`` goes
through the final norm with its scale ``sigma`` *frozen from the actual run* (LayerNorm: ``sqrt(var(r) + eps)``,
RMSNorm: ``sqrt(mean(r^2) + eps)``), so

    logit_t = sum_c c . v_t  +  beta . u_t,    v_t = centre(gamma * u_t) / sigma  (RMSNorm: no centring, no beta)

is exactly additive: the components (embeddings, every query head, every attention output bias, every MLP and
the final norm's bias, where those biases exist) sum to the model's real logit. A post-norm after attention
(Gemma 2/3) is frozen the same way, a per-coordinate scale ``s``, so head h contributes ``z_h . (W_O^h (s * v_t))``.
Soft-capped logits (Gemma 2) are decomposed before the cap. Projection first: a direction ``v_t`` is built for
the target and the competitor only — no per-head ``d_model`` vectors at every position, no full-vocabulary
logits except at the last position.

**Verdict** (rules, documented in the README):

* ``correct``: the target is the top-1 prediction at the output.
* ``routing``: not top-1 at the output, but in the later part of the stack — after some block from
  ``floor(routing_from * L)`` (default half-way) to the block before the last — the target's lens rank is within
  ``routing_rank`` (default 3). The model holds the answer; the path to the output breaks.
* ``absence``: otherwise — the model never holds the answer where it counts; surgery of one site is not the
  right tool.

Why this rule (docs/census.md): the lens of the first blocks reads residuals the final norm was never trained on,
and there a target's logit beats a competitor such as " the" by chance. The rule before (any block 1 .. L-2, lens
logit above the competitor's or rank <= 10) called 78% of *wrong* answers routing on Gemma 3 270M (a census of 300
facts with each target swapped for another fact's answer); rank <= 3 from half-way on calls 3% of them routing and
still 90 of the 194 true targets the model gets wrong. Ranks only, late blocks only.

**Override head**: the head with the largest ``competitor - target`` attribution among the heads that act once
the model holds the answer: in blocks whose input already has the target within ``routing_rank`` of the lens top
(all heads when it never does). A head before that point cannot overrule what is not there yet.
**Prescribed layer**: among blocks *before* the override head's block, the one whose components (its heads,
attention bias and MLP) write the largest ``target - competitor`` attribution (block 0 if the override is in
block 0). That is where the target is written most strongly before being overridden.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor, nn

from ..arch import Layout, apply_softcap, block_label, layout_of
from ..core.errors import InputError, NonFiniteError
from ..core.hooks import hooked
from ..core.interrupt import checkpoint
from ..core.tokens import encode_prompt, encode_target, token_text
from .divergence import Divergence, missed_pieces

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

VERDICTS = ("routing", "absence", "correct")


@dataclass(frozen=True)
class DiagnosisConfig:
    """Options of a diagnosis; the verdict's thresholds are chosen from a census of Gemma 3 270M (docs/census.md).

    ``routing_rank``: the target's lens rank (1 = top) at or under which the model *holds* the answer.
    ``routing_from``: where, as a fraction of the stack, the lens starts to count: after block
    :meth:`routing_start` (``floor(routing_from * n_layer)``, at most ``n_layer - 2``) up to the block before the
    last. Earlier lenses read a residual the final norm was never trained on, and on a large vocabulary a target
    lands near the top there by chance.
    ``teacher_force``: diagnose a multi-token target at its divergence piece (:mod:`surgery.diagnosis.divergence`);
    False diagnoses its first piece at the prompt's last position whatever the model says.
    """

    routing_rank: int = 3
    routing_from: float = 0.5
    prepend_bos: bool = False
    teacher_force: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.routing_rank, bool) or not isinstance(self.routing_rank, int) or self.routing_rank < 1:
            raise InputError(f"routing_rank must be a whole number of at least 1, not {self.routing_rank!r}")
        if (
            isinstance(self.routing_from, bool)
            or not isinstance(self.routing_from, (int, float))
            or not 0.0 <= self.routing_from < 1.0
        ):
            raise InputError(f"routing_from must be a fraction of the stack in [0, 1), not {self.routing_from!r}")
        if not isinstance(self.teacher_force, bool):
            raise InputError(f"teacher_force must be True or False, not {self.teacher_force!r}")

    def routing_start(self, n_layer: int) -> int:
        """The first block (0-indexed) after which a lens rank counts for ``routing``."""
        return max(0, min(int(self.routing_from * n_layer), n_layer - 2))

    def routing_window(self, n_layer: int) -> slice:
        """The lens rows (0 = after the embeddings) whose ranks count for ``routing``: after block
        :meth:`routing_start` to after the block before the last."""
        return slice(1 + self.routing_start(n_layer), n_layer)


@dataclass
class TokenScore:
    text: str
    token_id: int
    logit: float
    rank: int  # 1 = the model's top prediction


@dataclass
class LensEntry:
    name: str  # "embed" or "h.{layer}" (residual after that block)
    layer: int | None
    target_logit: float
    competitor_logit: float
    target_rank: int


@dataclass
class Attribution:
    name: str  # "embed", "h.{l}.attn.head.{h}", "h.{l}.attn.bias", "h.{l}.mlp", "ln_f.bias" (biases where they exist)
    layer: int | None
    head: int | None
    target: float
    competitor: float


@dataclass
class Diagnosis:
    """Everything the diagnosis found for one prompt. Layers and heads are 0-indexed (HF module index).

    ``tokens`` is the diagnosed input: the prompt's tokens, then the target pieces fed before the divergence
    (``divergence.piece_index`` of them); ``target`` is the diagnosed piece, scored at the input's last position.
    """

    prompt: str
    tokens: list[str]
    prediction: TokenScore
    target: TokenScore
    competitor: TokenScore
    target_tokens: list[str]  # all tokens of the target text; divergence.piece_index says which is diagnosed
    logit_lens: list[LensEntry]
    dla: list[Attribution]
    verdict: str
    override: dict  # {"layer": int, "head": int}
    prescribed_layer: int
    n_layer: int
    n_head: int
    routing_rank: int = field(default=3)
    routing_from: float = 0.5  # the verdict's thresholds (DiagnosisConfig)
    n_kv_head: int | None = None  # key/value heads (fewer than n_head under grouped-query attention)
    family: str = "GPT-2"
    blocks: str = "transformer.h"  # module path of the blocks, for naming them
    divergence: Divergence | None = None  # which piece and position (None only for a hand-made Diagnosis)

    @property
    def multi_token_target(self) -> bool:
        return len(self.target_tokens) > 1

    def head_matrix(self, which: str = "target") -> list[list[float]]:
        """Per-head attribution as ``[layer][head]``; ``which`` is target, competitor or diff (target - comp.)."""
        grid = [[0.0] * self.n_head for _ in range(self.n_layer)]
        for a in self.dla:
            if a.head is not None:
                grid[a.layer][a.head] = {
                    "target": a.target,
                    "competitor": a.competitor,
                    "diff": a.target - a.competitor,
                }[which]
        return grid

    def top_heads(self, k: int, toward: str | None = None) -> list[Attribution]:
        """The ``k`` heads that push hardest, strongest first (ties keep the order of ``dla``): ``toward="target"``
        ranks by target − competitor, ``"competitor"`` by competitor − target, ``None`` by |target − competitor|
        either way. One ranking for the CLI's report and the app's bar chart."""
        keys = {
            None: lambda a: -abs(a.target - a.competitor),
            "target": lambda a: a.competitor - a.target,
            "competitor": lambda a: a.target - a.competitor,
        }
        if toward not in keys:
            raise ValueError(f"toward must be 'target', 'competitor' or None, not {toward!r}")
        return sorted((a for a in self.dla if a.head is not None), key=keys[toward])[:k]

    def label(self, layer: int | None, head: int | None = None, path: bool = False) -> str:
        """:meth:`Layout.label <surgery.arch.Layout.label>` for this diagnosis's model: ``"L17 H3"``, with
        ``path=True`` ``"L17 H3 (model.layers.16, head 3)"``; ``"embeddings"`` for ``layer=None``."""
        return block_label(layer, head, self.blocks if path else None)

    def summary(self) -> str:
        """The verdict in one sentence (heads shown 1-indexed as in the reference write-up, module index too)."""
        o = self.override
        head = self.label(o["layer"], o["head"], path=True)
        layer = self.label(self.prescribed_layer, path=True)
        t, c = self.target.text, self.competitor.text
        where = self.divergence.sentence() if self.divergence is not None else ""
        if self.verdict == "correct":
            return f"Correct: the model already answers {t!r}.{where}"
        if self.verdict == "routing":
            return (
                f"Routing failure: the model knows {t!r} (in the lens top {self.routing_rank} late in the stack) but "
                f"{c!r} wins at the output; overridden by {head}; prescribed surgery layer {layer}.{where}"
            )
        config = DiagnosisConfig(self.routing_rank, self.routing_from)
        start = config.routing_start(self.n_layer)
        best = min(e.target_rank for e in self.logit_lens[config.routing_window(self.n_layer)] or self.logit_lens[-1:])
        return (
            f"Absence: {t!r} never gets near the top from {self.blocks}.{start} on (best lens rank {best}); "
            f"the model does not hold this fact, so single-site surgery is not prescribed.{where}"
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["prediction"] = self.prediction.text
        d["prediction_token_id"] = self.prediction.token_id
        d["multi_token_target"] = self.multi_token_target
        d["summary"] = self.summary()
        return d


# --------------------------------------------------------------------------------------------------
# Capture: one forward pass, last position only.
# --------------------------------------------------------------------------------------------------


@dataclass
class LastPositionCapture:
    """Component outputs at each row's last real position. B = batch, L = n_layer, d = d_model, H x dh = heads.

    ``attn_out``/``mlp_out`` are what each sub-layer adds to the residual (after its post-norm where the family
    has one); ``attn_scale`` is the attention post-norm's frozen scale ``gain / rms`` (None without post-norms),
    so that ``attn_out = (z @ W_O + b_O) * attn_scale`` exactly.
    """

    embed: Tensor  # Float[Tensor, "B d"]   what block 0 receives (token + position embeddings, scaled)
    z: Tensor  # Float[Tensor, "L B H*dh"]  W_O input: heads concatenated
    attn_out: Tensor  # Float[Tensor, "L B d"]
    mlp_out: Tensor  # Float[Tensor, "L B d"]
    final_resid: Tensor  # Float[Tensor, "B d"]  input of the final norm
    attn_scale: Tensor | None = None  # Float[Tensor, "L B d"]


def capture_last_position(
    model: nn.Module, input_ids: Tensor, last: Tensor, attention_mask: Tensor | None = None
) -> LastPositionCapture:
    """Run the decoder once, keeping only what the diagnosis needs at position ``last[b]`` of row b.

    ``input_ids``: Long[Tensor, "B T"], right-padded; ``last``: Long[Tensor, "B"]. With right padding and a
    causal model, real positions never see the padding, so the numbers equal an unpadded run.
    """
    layout = layout_of(model)
    a, n = layout.adapter, layout.n_layer
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    store: dict[str, list] = {k: [None] * n for k in ("z", "attn", "mlp", "attn_scale")}

    def take(x: Tensor) -> Tensor:
        # (B, T, d) -> (B, d), gathered where the block ran and brought to the input's device (device_map)
        return x[rows.to(x.device), last.to(x.device)].detach().to(rows.device)

    def embed_hook(module, args, kwargs):
        store["embed"] = take(args[0] if args else kwargs["hidden_states"])

    def record(key, layer, z=False):  # key None: the input only (a post-norm records the output)
        def fn(module, args, output):
            if z:
                store["z"][layer] = take(args[0])
            if key is not None:
                store[key][layer] = take(output)

        return fn

    def post_norm(key, layer):
        def fn(module, args, output):
            store[key][layer] = take(output)
            if key == "attn":  # forward hooks run after accelerate has offloaded the weights again
                with onloaded(module):
                    store["attn_scale"][layer] = a.norm.frozen_scale(module, take(args[0])).to(rows.device)

        return fn

    def final_hook(module, args):
        store["final"] = take(args[0])

    forward = {}
    for l in range(n):
        # Where a family has a post-norm, its output is what the residual receives: recorded there, not before.
        forward[a.path("o", l)] = record(None if a.attn_post_norm else "attn", l, z=True)
        if a.attn_post_norm:
            forward[a.path("attn_post_norm", l)] = post_norm("attn", l)
        if a.mlp_post_norm:
            forward[a.path("mlp_post_norm", l)] = post_norm("mlp", l)
        else:
            forward[a.path("mlp", l)] = record("mlp", l)
    with (
        torch.no_grad(),
        hooked(model, forward=forward, pre={a.final_norm: final_hook}, pre_kwargs={a.block(0): embed_hook}),
    ):
        model.get_submodule(a.base)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return LastPositionCapture(
        embed=store["embed"],
        z=torch.stack(store["z"]),
        attn_out=torch.stack(store["attn"]),
        mlp_out=torch.stack(store["mlp"]),
        final_resid=store["final"],
        attn_scale=torch.stack(store["attn_scale"]) if a.attn_post_norm else None,
    )


# --------------------------------------------------------------------------------------------------
# Pure maths over captured tensors.
# --------------------------------------------------------------------------------------------------


def accumulated_resid(cap: LastPositionCapture) -> Tensor:
    """Residual stream after the embeddings and after each block. Float[Tensor, "L+1 B d"]."""
    per_block = cap.attn_out + cap.mlp_out  # (L, B, d)
    return torch.cat([cap.embed[None], cap.embed[None] + per_block.cumsum(0)])


class Lens(NamedTuple):
    """What :func:`logit_lens` returns. ``logits``: Float[Tensor, "S B 3"], the lens logits of ``ids`` (target,
    competitor, top-1 at the output) at each residual; ``target_ranks``: Long[Tensor, "S B"] (1 = top);
    ``competitor_rank``: Long[Tensor, "B"], at the output (the top-1 ranks 1 there by definition);
    ``ids``: Long[Tensor, "B 3"]."""

    logits: Tensor
    target_ranks: Tensor
    competitor_rank: Tensor
    ids: Tensor


def logit_lens(
    model: nn.Module,
    resid: Tensor,
    token_ids: Tensor,
    competitor_ids: Tensor | None = None,
    chunk: int = 16,
    slab: int = 16384,
) -> Lens:
    """Lens logits of ``[target, competitor, top-1]`` at each residual (last position only), the target's rank at
    each, the competitor's at the output.

    ``resid``: Float[Tensor, "S B d"]; ``token_ids``: Long[Tensor, "B"] (targets); ``competitor_ids``:
    Long[Tensor, "B"] with -1 meaning "the model's own top prediction at the output, or its runner-up when
    that is the target". Each residual goes through the final norm with its own statistics, then the
    unembedding (and the family's soft-capping: monotonic, ranks unchanged). A rank counts the whole vocabulary:
    the unembedding runs ``slab`` tokens at a time for ``chunk`` prompts' residuals together, and each slab's
    logits are compared with the target's as they are made, so the full-vocabulary logits are never held (nor
    read again) except at the output row, where the competitor is picked. The picked logits are one dot product
    each (the same numbers whatever the batch); a token never outranks itself.
    """
    layout = layout_of(model)
    final_norm = model.get_submodule(layout.adapter.final_norm)
    cap = layout.softcap(model.config)
    if competitor_ids is None:
        competitor_ids = torch.full_like(token_ids, -1)
    parts: list[Lens] = []
    with onloaded(model.get_submodule(layout.adapter.unembed)):
        w_u = layout.w_u(model)  # (V, d)
        n_vocab = w_u.shape[0]
        for start in range(0, resid.shape[1], chunk):
            x = final_norm(resid[:, start : start + chunk])  # (S, b, d)
            n_s, b = x.shape[:2]
            t = token_ids[start : start + chunk].to(w_u.device)  # (b,)
            t_logit = apply_softcap(torch.einsum("sbd,bd->sb", x, w_u[t]), cap)  # (S, b)
            flat, thr, t_rows = x.reshape(n_s * b, -1), t_logit.reshape(-1, 1), t.repeat(n_s)  # row = s * b + j
            above = torch.zeros(n_s * b, dtype=torch.int32, device=x.device)
            output = torch.empty(b, n_vocab, dtype=x.dtype, device=x.device)  # the output row's logits
            for v0 in range(0, n_vocab, slab):
                y = apply_softcap(flat @ w_u[v0 : v0 + slab].T, cap)  # (S*b, k)
                # Count in int32: summing a bool tensor into the default int64 costs twice as much.
                above += (y > thr).sum(-1, dtype=torch.int32)
                own = ((t_rows >= v0) & (t_rows < v0 + y.shape[1])).nonzero()[:, 0]  # rows whose target is here
                above[own] -= (y[own, t_rows[own] - v0] > thr[own, 0]).int()  # never count the target itself
                output[:, v0 : v0 + y.shape[1]] = y[-b:]
            top2 = output.topk(2, dim=-1).indices  # (b, 2)
            auto = torch.where(top2[:, 0] == t, top2[:, 1], top2[:, 0])
            c = competitor_ids[start : start + chunk].to(w_u.device)
            c = torch.where(c < 0, auto, c)
            ids = torch.stack([t, c, top2[:, 0]], -1)  # (b, 3)
            others = apply_softcap(torch.einsum("sbd,bkd->sbk", x, w_u[ids[:, 1:]]), cap)  # (S, b, 2)
            picked = torch.cat([t_logit[..., None], others], -1)  # (S, b, 3)
            c_out = picked[-1, :, 1:2]  # (b, 1)
            c_above = (output > c_out).sum(-1) - (output.gather(-1, c[:, None]) > c_out)[:, 0].long()
            parts.append(Lens(picked, above.view(n_s, b).long() + 1, c_above + 1, ids))
    return Lens(
        torch.cat([p.logits for p in parts], 1),
        torch.cat([p.target_ranks for p in parts], 1),
        torch.cat([p.competitor_rank for p in parts]),
        torch.cat([p.ids for p in parts]),
    )


@contextmanager
def onloaded(*modules: nn.Module):
    """Weights that accelerate keeps off the device between forwards (big-model inference: a ``device_map`` with
    ``"cpu"``/``"disk"`` parts leaves them on the meta device) loaded for the duration, so they can be read
    directly; a no-op for modules that are not offloaded."""
    from accelerate.utils import align_module_device, has_offloaded_params

    with ExitStack() as stack:
        for m in modules:
            if has_offloaded_params(m):
                stack.enter_context(align_module_device(m))
        yield


def unembed_directions(model: nn.Module, final_resid: Tensor, token_ids: Tensor) -> Tensor:
    """``v_t`` with ``final_norm(r) . u_t = sum_c c . v_t (+ bias . u_t)``, the norm's scale frozen from
    ``final_resid``: ``centre(gamma * u_t) / sigma`` for LayerNorm, ``gain * u_t / rms`` for RMSNorm.

    ``final_resid``: Float[Tensor, "B d"]; ``token_ids``: Long[Tensor, "B k"] -> Float[Tensor, "B k d"].
    """
    layout = layout_of(model)
    final_norm = model.get_submodule(layout.adapter.final_norm)
    with onloaded(final_norm, model.get_submodule(layout.adapter.unembed)):
        return layout.adapter.norm.direction(final_norm, final_resid, layout.w_u(model)[token_ids])


def logit_attrs(model: nn.Module, cap: LastPositionCapture, token_ids: Tensor) -> dict[str, Tensor]:
    """Direct logit attribution of every additive component to each of ``token_ids`` (B, k).

    Returns tensors with a trailing ``k``: embed (B, k), heads (L, B, H, k), attn_bias (L, B, k),
    mlp (L, B, k), final_bias (B, k) (zeros where the family has no such bias). Their sum over components
    equals the real logits (before soft-capping, for the families that cap).
    A post-norm's frozen scale multiplies into the direction, so head h contributes ``z_h . (W_O^h (s * v))``.
    """
    layout = layout_of(model)
    v = unembed_directions(model, cap.final_resid, token_ids)  # (B, k, d)
    heads, bias = [], []
    for layer in range(layout.n_layer):
        v_l = v if cap.attn_scale is None else v * cap.attn_scale[layer][:, None]  # (B, k, d)
        with onloaded(model.get_submodule(layout.adapter.path("o", layer))):
            w_o = layout.w_o(model, layer).float().to(v.device)  # (H, dh, d)
            b_o = layout.b_o(model, layer)  # (d,) or None
            b_o = None if b_o is None else b_o.float().to(v.device)
        # W_O^h v for every head at once: one matrix product over the weight's own layout, (B, k, d) @ (d, H*dh).
        # (An einsum over the (H, dh, d) view ran as a strided batched product: 18x slower on nn.Linear layouts.)
        w_o_v = (v_l @ w_o.flatten(0, 1).T).unflatten(-1, (layout.n_head, layout.d_head))  # (B, k, H, dh)
        z = cap.z[layer].float().view(-1, 1, layout.n_head, layout.d_head)  # (B, H*dh) -> (B, 1, H, dh)
        heads.append((z * w_o_v).sum(-1).transpose(1, 2))  # (B, k, H) -> (B, H, k)
        bias.append(torch.zeros_like(v[..., 0]) if b_o is None else torch.einsum("d,bkd->bk", b_o, v_l))
    final_norm = model.get_submodule(layout.adapter.final_norm)
    with onloaded(final_norm, model.get_submodule(layout.adapter.unembed)):
        final_bias = layout.adapter.norm.bias(final_norm)
        final_bias = None if final_bias is None else final_bias.float().to(v.device)
        u = layout.w_u(model)[token_ids].float().to(v.device)  # (B, k, d)
    return {
        "embed": torch.einsum("bd,bkd->bk", cap.embed.float(), v),
        "heads": torch.stack(heads),
        "attn_bias": torch.stack(bias),
        "mlp": torch.einsum("lbd,bkd->lbk", cap.mlp_out.float(), v),  # already post-normed: one component
        "final_bias": torch.zeros_like(v[..., 0]) if final_bias is None else torch.einsum("d,bkd->bk", final_bias, u),
    }


def refuse_non_finite(
    resid: Tensor, lens_logits: Tensor, attrs: dict[str, Tensor], prompts: list[str], blocks: str
) -> None:
    """:class:`NonFiniteError` when any number a diagnosis reports would be NaN or inf, naming the first such prompt
    and the first residual that is not finite (a weight that overflows the forward pass, or a NaN set in memory:
    loading refuses NaN weights, a model built in memory is not loaded).

    ``resid``: Float[Tensor, "S B d"]; ``lens_logits``: Float[Tensor, "S B 3"]; ``attrs``: :func:`logit_attrs`
    (batch on dim 0 of 2-d tensors, dim 1 of the others). Reads only tensors already computed.
    """
    finite = (torch.isfinite(resid).all(-1) & torch.isfinite(lens_logits).all(-1)).cpu()  # (S, B)
    bad_rows = ~finite.all(0)  # (B,)
    for v in attrs.values():
        bad_rows |= ~torch.isfinite(v.movedim(0 if v.dim() == 2 else 1, 0)).flatten(1).all(1).cpu()
    if not bool(bad_rows.any()):
        return
    b = int(bad_rows.nonzero()[0])
    col = (~finite[:, b]).nonzero()
    if not len(col):
        where = "in its logit attributions"
    elif int(col[0]) == 0:
        where = "after the embeddings"
    else:
        where = f"after {block_label(int(col[0]) - 1, None, blocks)}"
    raise NonFiniteError(
        f"the model's activations hold NaN or inf {where} on the prompt {prompts[b]!r} (a weight that overflows or "
        f"is NaN): nothing can be diagnosed from them"
    )


def find_override(heads_tc: Tensor, target_ranks: Tensor | None = None, near: int = 10) -> tuple[int, int]:
    """(layer, head) with the largest competitor-minus-target attribution. ``heads_tc``: (L, H, 2).

    An override overrules an answer the model already holds, so with the target's lens ranks ``target_ranks``
    ((L+1,): embeddings, then after each block) only heads in blocks from the first one whose *input* already
    has the target within the top ``near`` are candidates (every head when the target never gets there, or
    when it only does so at the output).
    """
    diff = heads_tc[..., 1] - heads_tc[..., 0]  # (L, H)
    if target_ranks is not None:
        held = (target_ranks[:-1] <= near).nonzero()  # residual entering block l = lens row l
        if len(held):
            first = int(held[0])
            diff = diff.clone()
            diff[:first] = float("-inf")
    flat = int(diff.argmax())
    return flat // diff.shape[1], flat % diff.shape[1]


def prescribe_layer(attrs_tc: dict[str, Tensor], override_layer: int) -> int:
    """Block before ``override_layer`` writing the most target-minus-competitor (block 0 if none before).

    ``attrs_tc``: one row of :func:`logit_attrs` with k = 2: heads (L, H, 2), attn_bias (L, 2), mlp (L, 2).
    """
    per_block = attrs_tc["heads"].sum(1) + attrs_tc["attn_bias"] + attrs_tc["mlp"]  # (L, 2)
    score = per_block[:, 0] - per_block[:, 1]
    if override_layer == 0:
        return 0
    return int(score[:override_layer].argmax())


def classify(ranks: Tensor, config: DiagnosisConfig = DiagnosisConfig()) -> str:
    """Verdict from the target's lens ranks of one prompt: ``ranks`` Long[Tensor, "L+1"] (after the embeddings,
    then after each block; the last entry is the output).

    ``correct`` when the output ranks the target first; ``routing`` when, after some block from
    ``config.routing_start(L)`` to the block before the last, its rank is within ``config.routing_rank``;
    ``absence`` otherwise. Only ranks count: a logit that beats the competitor's says little when the competitor
    (" the") is itself far from the top in the middle of the stack.
    """
    if int(ranks[-1]) == 1:
        return "correct"
    n_layer = ranks.shape[0] - 1
    window = ranks[config.routing_window(n_layer)]
    return "routing" if bool((window <= config.routing_rank).any()) else "absence"


# --------------------------------------------------------------------------------------------------
# Public entry points.
# --------------------------------------------------------------------------------------------------


def diagnose(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    target: str,
    competitor: str | None = None,
    config: DiagnosisConfig = DiagnosisConfig(),
) -> Diagnosis:
    """Diagnose one prompt. ``target``/``competitor`` are answer texts (e.g. ``" Paris"``); the competitor
    defaults to the model's own top prediction (or its runner-up when the target is already top)."""
    return diagnose_batch(model, tokenizer, [prompt], [target], [competitor], config=config)[0]


def diagnose_batch(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    targets: list[str],
    competitors: list[str | None] | None = None,
    config: DiagnosisConfig = DiagnosisConfig(),
    batch_size: int = 32,
) -> list[Diagnosis]:
    """Diagnose many prompts, ``batch_size`` at a time (right-padded; results equal one-at-a-time runs).

    A multi-token target is diagnosed at its divergence piece (``config.teacher_force``; the module docstring):
    one extra forward pass per batch, for the rows with several pieces only.
    """
    if len(prompts) != len(targets):
        raise InputError("give one target per prompt")
    competitors = competitors or [None] * len(prompts)
    layout = layout_of(model)
    encoded = []
    for prompt, target, comp in zip(prompts, targets, competitors):
        ids = encode_prompt(tokenizer, prompt, layout.n_ctx, prepend_bos=config.prepend_bos)
        t_ids = encode_target(tokenizer, target)
        c_ids = encode_target(tokenizer, comp, "competitor") if comp is not None and comp != "" else None
        encoded.append(_Item(prompt, target, ids, t_ids, c_ids))
    out: list[Diagnosis] = []
    for start in range(0, len(encoded), batch_size):
        checkpoint()  # a caller's deadline (surgery.core.interrupt) stops between batches
        chunk = encoded[start : start + batch_size]
        if config.teacher_force:
            _find_divergences(model, tokenizer, layout, chunk)
        for item in chunk:
            if item.c_ids is not None and item.c_ids[0] == item.t_ids[item.k]:
                piece = token_text(tokenizer, item.t_ids[item.k])
                raise InputError(
                    f"the competitor {tokenizer.decode(item.c_ids)!r} starts with the same token as the "
                    f"diagnosed piece {piece!r} of the target {item.target!r}"
                )
        out.extend(_diagnose_chunk(model, tokenizer, layout, chunk, config))
    return out


@dataclass
class _Item:
    """One prompt of a batch: its token ids, and the target piece ``k`` diagnosed (set by teacher forcing)."""

    prompt: str
    target: str
    ids: list[int]  # the prompt's tokens
    t_ids: list[int]
    c_ids: list[int] | None
    k: int = 0
    forced: bool = False  # k was found by teacher forcing (none missed: k = 0, every piece predicted)
    missed: list[int] = field(default_factory=list)  # the pieces missed under teacher forcing

    @property
    def input_ids(self) -> list[int]:  # the diagnosed input: the prompt, then the pieces before the divergence
        return self.ids + self.t_ids[: self.k]


def _find_divergences(model, tokenizer, layout: Layout, chunk: list[_Item]) -> None:
    """Set ``k`` of every multi-token item to its divergence piece (one teacher-forced pass for them all)."""
    multi = [item for item in chunk if len(item.t_ids) > 1]
    if not multi:
        return
    found = missed_pieces(model, layout, [i.ids for i in multi], [i.t_ids for i in multi], tokenizer.pad_token_id)
    for item, missed in zip(multi, found):
        item.k, item.forced, item.missed = (missed[0] if missed else 0), True, missed


def _diagnose_chunk(model, tokenizer, layout: Layout, items: list[_Item], config: DiagnosisConfig) -> list[Diagnosis]:
    device = next(model.parameters()).device
    lengths = [len(item.input_ids) for item in items]
    width = max(lengths)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(items), width), pad, dtype=torch.long, device=device)
    for row, item in enumerate(items):
        input_ids[row, : lengths[row]] = torch.tensor(item.input_ids)
    last = torch.tensor(lengths, device=device) - 1
    mask = None
    if len(set(lengths)) > 1:
        mask = (torch.arange(width, device=device)[None] < torch.tensor(lengths, device=device)[:, None]).long()

    cap = capture_last_position(model, input_ids, last, mask)
    with torch.no_grad():
        resid = accumulated_resid(cap)  # (L+1, B, d)
        target_ids = torch.tensor([item.t_ids[item.k] for item in items], device=device)
        comp_given = torch.tensor([item.c_ids[0] if item.c_ids is not None else -1 for item in items], device=device)
        lens = logit_lens(model, resid, target_ids, comp_given)
        attrs = logit_attrs(model, cap, lens.ids[:, :2])
    refuse_non_finite(resid, lens.logits, attrs, [item.prompt for item in items], layout.adapter.blocks)

    has_bias = [layout.b_o(model, l) is not None for l in range(layout.n_layer)]
    final_bias = layout.adapter.norm.bias(model.get_submodule(layout.adapter.final_norm)) is not None
    results = []
    lens_list, ranks_list = lens.logits.tolist(), lens.target_ranks.tolist()  # one conversion, not one per number
    for b, item in enumerate(items):
        row = {k: (v[:, b] if v.dim() > 2 else v[b]) for k, v in attrs.items()}
        target_ranks = lens.target_ranks[:, b]
        o_layer, o_head = find_override(row["heads"], target_ranks, config.routing_rank)
        final = lens.logits[-1, b]
        comp_id, pred_id, t_id = int(lens.ids[b, 1]), int(lens.ids[b, 2]), item.t_ids[item.k]
        results.append(
            Diagnosis(
                prompt=item.prompt,
                tokens=[token_text(tokenizer, i) for i in item.input_ids],
                prediction=TokenScore(token_text(tokenizer, pred_id), pred_id, float(final[2]), 1),
                target=TokenScore(token_text(tokenizer, t_id), t_id, float(final[0]), ranks_list[-1][b]),
                competitor=TokenScore(
                    token_text(tokenizer, comp_id), comp_id, float(final[1]), int(lens.competitor_rank[b])
                ),
                target_tokens=[token_text(tokenizer, i) for i in item.t_ids],
                logit_lens=[
                    LensEntry(
                        "embed" if s == 0 else f"h.{s - 1}",
                        None if s == 0 else s - 1,
                        lens_list[s][b][0],
                        lens_list[s][b][1],
                        ranks_list[s][b],
                    )
                    for s in range(lens.logits.shape[0])
                ],
                dla=_attribution_list(row, layout, has_bias, final_bias),
                verdict=classify(target_ranks, config),
                override={"layer": o_layer, "head": o_head},
                prescribed_layer=prescribe_layer(row, o_layer),
                n_layer=layout.n_layer,
                n_head=layout.n_head,
                routing_rank=config.routing_rank,
                routing_from=config.routing_from,
                n_kv_head=layout.n_kv_head,
                family=layout.family,
                blocks=layout.adapter.blocks,
                divergence=_divergence(tokenizer, item, lengths[b] - 1, misses=ranks_list[-1][b] != 1),
            )
        )
    return results


def _divergence(tokenizer, item: _Item, position: int, misses: bool) -> Divergence:
    """The :class:`Divergence` of a diagnosed item; ``misses``: the output does not rank the diagnosed piece first."""
    pieces = [token_text(tokenizer, i) for i in item.t_ids]
    diverges = bool(item.missed) if item.forced else misses  # forced: some piece is missed, piece k first
    generic = diverges and item.k == 0 and len(item.missed) > 1  # fed piece 0, the model misses a later one too
    return Divergence(
        piece_index=item.k,
        piece=pieces[item.k],
        pieces=pieces,
        position=position,
        before=tokenizer.decode(item.t_ids[: item.k]) if item.k else "",
        diverges=diverges,
        forced=item.forced,
        generic_first_piece=generic,
        missed_after=item.missed[1] if generic else None,
    )


def _attribution_list(
    row: dict[str, Tensor], layout: Layout, has_bias: list[bool], final_bias: bool
) -> list[Attribution]:
    """Named attributions; biases appear only where the model has them (GPT-2: every one)."""
    r = {k: v.tolist() for k, v in row.items()}  # Python floats in one conversion per tensor
    out = [Attribution("embed", None, None, *r["embed"])]
    for layer in range(layout.n_layer):
        for head in range(layout.n_head):
            out.append(Attribution(f"h.{layer}.attn.head.{head}", layer, head, *r["heads"][layer][head]))
        if has_bias[layer]:
            out.append(Attribution(f"h.{layer}.attn.bias", layer, None, *r["attn_bias"][layer]))
        out.append(Attribution(f"h.{layer}.mlp", layer, None, *r["mlp"][layer]))
    if final_bias:
        out.append(Attribution("ln_f.bias", None, None, *r["final_bias"]))
    return out
