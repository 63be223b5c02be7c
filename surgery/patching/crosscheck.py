"""Does the diagnosis hold up under other attribution methods? Three checks and where they disagree.

For one prompt, target and competitor (the diagnosis' own choice when not given), with
``diff = logit(target) - logit(competitor)`` at the last position:

* **DLA** (from :func:`surgery.diagnosis.diagnose.diagnose`): each head's direct effect on ``diff`` at the last
  position.
* **Gradient x activation**: for each head, ``sum over positions and d_head of z * d(diff)/dz``, where z is the
  head's slice of the attention output projection's input (its output before W_O; GPT-2: ``attn.c_proj``). It counts
  indirect paths and all positions, and is exact to first order. Parameters stay ``requires_grad=False``: a hook on
  the token embedding makes the activations a leaf that requires grad, and the gradients are taken w.r.t. the z's.
* **Ablation**, at every position of the prompt, one unit at a time: the top ``top_heads`` heads by |DLA| plus
  the override head (their z slice), and the prescribed layer's attention output (the output projection's output,
  b_O included). ``zero`` replaces the activation by 0; ``mean`` by its mean over the prompt's positions (the
  prompt itself is the reference distribution: no dataset needed). The *effect* of a unit is
  ``diff(clean) - diff(ablated)``, signed like DLA (positive = the unit helps the target).
* **Logit lens**: the first block after which the target's lens logit exceeds the competitor's.

**Agreement** (``agree``): Spearman correlation of DLA and grad x act over all heads (signed values, average
ranks for ties); overlap of their top-k heads by |value|; whether both put the same head first; whether grad x act's
most competitor-favouring head is the override; the override is *confirmed* when mean-ablating it raises ``diff``
(the answer moves toward the target); the prescribed layer is *confirmed* when mean-ablating its attention output
lowers the target logit; the lens agrees when the target leads before the override block. Mean-ablation decides
because it stays on the activations' own scale: zeroing also removes the constant part every position shares
(b_O, attention to the first token), which can break unrelated circuits downstream. The zero-ablation verdicts
are reported beside it (``*_confirmed_zero``), and every failed check, in either mode, is spelled out in
``differences``.

Two causal checks join when asked for (definitions in ``docs/patching.md``):

* **Activation patching** (``corrupt``: a prompt of the same token length, e.g. another country): each block's
  attention and MLP output, at every position, taken from the prompt's run into the corrupted one. With
  ``d = logit(target) - logit(corrupted run's top answer)``, the prescribed layer is *confirmed* when its attention
  output restores at least half of ``d(prompt) - d(corrupted)`` (it carries the target). The override head's z,
  with ``d = logit(target) - logit(competitor)``, is *confirmed* when patching it moves the corrupted run toward
  the competitor (restored > 0: it carries the failure).
* **Weight patching** (``donor``: a model of the same architecture, e.g. the corrected one): each site whose
  weights differ is copied into the model alone; the check holds when the one raising the target's logit most
  lies in the prescribed layer.

The model is never modified: ablations are hooks inside :func:`surgery.core.hooks.hooked`, removed on exit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from functools import partial

import torch
from torch import Tensor, nn

from ..arch import apply_softcap, layout_of
from ..core.errors import require_positive_int
from ..core.hooks import hooked
from ..core.tokens import encode_prompt
from ..diagnosis.diagnose import Diagnosis, DiagnosisConfig, diagnose
from ..evaluation.facts import Fact
from .activations import PatchUnit, prepare_pair
from .weights import WeightPatching, patch_weights

MODES = ("zero", "mean")
PATCHING_CONFIRMS = 0.5  # the prescribed layer's attention output must restore at least this fraction


@dataclass(frozen=True)
class CrossCheckConfig:
    """``top_heads``: heads ablated besides the override; ``top_k``: size of the compared top sets."""

    top_heads: int = 5
    top_k: int = 5
    diagnosis: DiagnosisConfig = field(default_factory=DiagnosisConfig)

    def __post_init__(self):
        for name in ("top_heads", "top_k"):
            require_positive_int(name, getattr(self, name))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class HeadScore:
    layer: int
    head: int
    value: float  # effect on target - competitor (positive = helps the target)


@dataclass
class Ablation:
    """One unit ablated in one mode. ``head`` is None for a layer's whole attention output."""

    unit: str  # "head" or "attn_out"
    layer: int
    head: int | None
    mode: str  # "zero" or "mean"
    target_logit: float
    competitor_logit: float
    d_target: float  # ablated - clean
    d_competitor: float

    @property
    def effect(self) -> float:
        """diff(clean) - diff(ablated): what the unit contributes to target - competitor."""
        return self.d_competitor - self.d_target

    def to_dict(self) -> dict:
        return {**asdict(self), "d_diff": -self.effect, "effect": self.effect}


@dataclass
class Agreement:
    spearman: float | None  # DLA vs grad x act over all heads; None when undefined (constant values)
    top_k: int
    top_k_overlap: float  # |top-k by |DLA| ∩ top-k by |grad x act|| / k
    top1_same: bool
    override_top_grad_x_act: bool  # grad x act's most competitor-favouring head is the override
    override_confirmed: bool  # mean-ablating the override raises target - competitor
    override_confirmed_zero: bool  # ... and zero-ablating it
    prescribed_confirmed: bool  # mean-ablating the prescribed layer's attention output lowers the target
    prescribed_confirmed_zero: bool  # ... and zero-ablating it
    lens_first_lead_layer: int | None
    lens_leads_before_override: bool
    lens_at_prescribed_layer: bool
    differences: list[str]
    # The causal checks; None when not asked for (no corrupted prompt, no donor).
    prescribed_patching_confirmed: bool | None = None  # its attention output restores >= PATCHING_CONFIRMS
    override_patching_confirmed: bool | None = None  # patching the override moves toward the competitor
    donor_best_in_prescribed: bool | None = None  # the donor's site raising the target most is in that layer

    @property
    def all(self) -> bool:
        return not self.differences


@dataclass
class PatchingCheck:
    """Activation patching from the prompt into ``corrupt_prompt`` (fractions restored, docs/patching.md)."""

    corrupt_prompt: str
    corrupt_answer: str  # the corrupted run's top answer: the competitor of the first metric
    attn_restored: list[float]  # per block: attention output at every position; target vs corrupt_answer
    mlp_restored: list[float]  # per block: MLP output at every position; same metric
    override_restored: float  # the override head's z at every position; target vs the diagnosis' competitor

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CrossCheck:
    """The three methods' views of one prompt and whether they agree. Layers and heads 0-indexed."""

    diagnosis: Diagnosis
    dla: list[HeadScore]  # every head, ranked by |value|
    grad_x_act: list[HeadScore]  # every head, ranked by |value|
    ablations: list[Ablation]
    agree: Agreement
    patching: PatchingCheck | None = None  # with a corrupted prompt
    weight_patching: WeightPatching | None = None  # with a donor model; the prompt is the one fact scored

    def ablation_ranking(self, mode: str = "zero") -> list[HeadScore]:
        """Ablated heads ranked by |effect| in ``mode``."""
        heads = [HeadScore(a.layer, a.head, a.effect) for a in self.ablations if a.unit == "head" and a.mode == mode]
        return sorted(heads, key=lambda s: -abs(s.value))

    def to_dict(self) -> dict:
        d = self.diagnosis
        return {
            "prompt": d.prompt,
            "target": asdict(d.target),
            "competitor": asdict(d.competitor),
            "verdict": d.verdict,
            "override": d.override,
            "prescribed_layer": d.prescribed_layer,
            "rankings": {
                "dla": [asdict(s) for s in self.dla],
                "grad_x_act": [asdict(s) for s in self.grad_x_act],
                **{f"ablation_{m}": [asdict(s) for s in self.ablation_ranking(m)] for m in MODES},
            },
            "ablations": [a.to_dict() for a in self.ablations],
            "agree": {**asdict(self.agree), "all": self.agree.all},
            "patching": None if self.patching is None else self.patching.to_dict(),
            "weight_patching": None if self.weight_patching is None else self.weight_patching.to_dict(),
        }


# --------------------------------------------------------------------------------------------------
# Activations, gradients and ablations (hooks only; the model is never modified).
# --------------------------------------------------------------------------------------------------


@dataclass
class CleanRun:
    """The unablated run. L = n_layer, T = prompt length, d = d_model."""

    z: Tensor  # Float[Tensor, "L T H*dh"]   W_O inputs (heads concatenated)
    attn_out: Tensor  # Float[Tensor, "L T d"]   W_O outputs
    grad_x_act: Tensor  # Float[Tensor, "L H"]
    logits: Tensor  # Float[Tensor, "2"]   target, competitor


def last_logits(model: nn.Module, input_ids: Tensor, token_ids: Tensor) -> Tensor:
    """Logits of ``token_ids`` (k,) at the last position of ``input_ids`` (1, T), without the full vocabulary."""
    layout = layout_of(model)
    decoder = model.get_submodule(layout.adapter.base)
    hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state[0, -1]  # (d,) after the final norm
    return apply_softcap(layout.w_u(model)[token_ids] @ hidden, layout.softcap(model.config))  # (k,)


def clean_run(model: nn.Module, input_ids: Tensor, token_ids: Tensor) -> CleanRun:
    """One forward and one backward pass: z, attention outputs and grad x act of ``logit[0] - logit[1]``."""
    layout = layout_of(model)
    z: list[Tensor | None] = [None] * layout.n_layer
    out: list[Tensor | None] = [None] * layout.n_layer

    def embed_hook(module, args, output):
        return output.detach().requires_grad_(True)  # a leaf: everything downstream joins the graph

    def c_proj_hook(layer):
        def fn(module, args, output):
            z[layer], out[layer] = args[0], output.detach()

        return fn

    forward = {layout.adapter.path("o", l): c_proj_hook(l) for l in range(layout.n_layer)}
    forward[layout.adapter.embed] = embed_hook
    with torch.enable_grad(), hooked(model, forward=forward):
        logits = last_logits(model, input_ids, token_ids)
        grads = torch.autograd.grad(logits[0] - logits[1], z)
    zs = torch.stack([t[0].detach() for t in z])  # (L, T, d)
    gxa = (zs * torch.stack([g[0] for g in grads])).sum(1)  # (L, d): summed over positions
    return CleanRun(
        z=zs,
        attn_out=torch.stack([t[0] for t in out]),
        grad_x_act=gxa.view(layout.n_layer, layout.n_head, layout.d_head).sum(-1),  # (L, H)
        logits=logits.detach(),
    )


def ablated_logits(
    model: nn.Module, input_ids: Tensor, token_ids: Tensor, clean: CleanRun, layer: int, head: int | None, mode: str
) -> Tensor:
    """Logits of ``token_ids`` with one head's z (or, ``head=None``, the layer's attention output) ablated."""
    layout = layout_of(model)
    path = layout.adapter.path("o", layer)
    if head is None:
        mean = clean.attn_out[layer].mean(0)  # (d,) mean over positions

        def replace_output(module, args, output):
            return torch.zeros_like(output) if mode == "zero" else mean.expand_as(output).clone()

        hooks = {"forward": {path: replace_output}}
    else:
        cols = layout.head_slice(head)
        mean = clean.z[layer, :, cols].mean(0)  # (dh,)

        def replace_head(module, args):
            z = args[0].clone()
            z[..., cols] = 0.0 if mode == "zero" else mean
            return (z, *args[1:])

        hooks = {"pre": {path: replace_head}}
    with torch.no_grad(), hooked(model, **hooks):
        return last_logits(model, input_ids, token_ids)


# --------------------------------------------------------------------------------------------------
# Agreement (pure).
# --------------------------------------------------------------------------------------------------


def average_ranks(x: Tensor) -> Tensor:
    """Ranks 1..n of a 1-D tensor, ties sharing their average rank."""
    order = x.argsort()
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=torch.float64)
    for value in x.unique():
        tied = x == value
        if int(tied.sum()) > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: Tensor, b: Tensor) -> float | None:
    """Spearman rank correlation of two 1-D tensors; None when either is constant."""
    ra, rb = average_ranks(a.flatten()), average_ranks(b.flatten())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom > 0 else None


def top_by_magnitude(x: Tensor, k: int) -> list[tuple[int, int]]:
    """(layer, head) of the k entries of ``x`` (L, H) with the largest |value|."""
    flat = x.abs().flatten().topk(min(k, x.numel())).indices
    return [(int(i) // x.shape[1], int(i) % x.shape[1]) for i in flat]


def ranking(x: Tensor) -> list[HeadScore]:
    """Every head of ``x`` (L, H), ranked by |value|."""
    return [HeadScore(l, h, float(x[l, h])) for l, h in top_by_magnitude(x, x.numel())]


def compare(d: Diagnosis, dla: Tensor, gxa: Tensor, ablations: list[Ablation], top_k: int) -> Agreement:
    """The agreement summary. ``dla``, ``gxa``: (L, H) effects on target - competitor."""
    differences: list[str] = []
    named = partial(d.label, path=True)  # "L10 H8 (transformer.h.9, head 8)"
    o_layer, o_head = d.override["layer"], d.override["head"]
    top_dla, top_gxa = top_by_magnitude(dla, top_k), top_by_magnitude(gxa, top_k)
    overlap = len(set(top_dla) & set(top_gxa)) / len(top_dla)
    if top_dla[0] != top_gxa[0]:
        differences.append(f"DLA ranks {named(*top_dla[0])} first, grad x act ranks {named(*top_gxa[0])} first")
    if overlap < 1:
        differences.append(f"top-{len(top_dla)} heads overlap {overlap:.0%} between DLA and grad x act")
    gxa_override = divmod(int(gxa.argmin()), gxa.shape[1])
    if gxa_override != (o_layer, o_head):
        differences.append(
            f"grad x act's most competitor-favouring head is {named(*gxa_override)}, "
            f"not the override {named(o_layer, o_head)}"
        )

    def effects(unit: str, layer: int, head: int | None) -> dict[str, Ablation]:
        return {a.mode: a for a in ablations if a.unit == unit and a.layer == layer and a.head == head}

    override = {mode: a.effect < 0 for mode, a in effects("head", o_layer, o_head).items()}  # diff rises
    for mode, a in effects("head", o_layer, o_head).items():
        if not override[mode]:
            differences.append(
                f"{mode}-ablating the override {named(o_layer, o_head)} does not move the "
                f"answer toward the target (target - competitor {-a.effect:+.3f})"
            )
    prescribed = {mode: a.d_target < 0 for mode, a in effects("attn_out", d.prescribed_layer, None).items()}
    for mode, a in effects("attn_out", d.prescribed_layer, None).items():
        if not prescribed[mode]:
            differences.append(
                f"{mode}-ablating the attention output of the prescribed layer "
                f"{named(d.prescribed_layer)} does not lower the target ({a.d_target:+.3f})"
            )
    lead = next((e.layer for e in d.logit_lens if e.layer is not None and e.target_logit > e.competitor_logit), None)
    before = lead is not None and lead < o_layer
    if not before:
        differences.append(f"the target never leads in the logit lens before the override block {named(o_layer)}")
    return Agreement(
        spearman=spearman(dla, gxa),
        top_k=len(top_dla),
        top_k_overlap=overlap,
        top1_same=top_dla[0] == top_gxa[0],
        override_top_grad_x_act=gxa_override == (o_layer, o_head),
        override_confirmed=override["mean"],
        override_confirmed_zero=override["zero"],
        prescribed_confirmed=prescribed["mean"],
        prescribed_confirmed_zero=prescribed["zero"],
        lens_first_lead_layer=lead,
        lens_leads_before_override=before,
        lens_at_prescribed_layer=lead == d.prescribed_layer,
        differences=differences,
    )


def patching_check(
    model: nn.Module, tokenizer, d: Diagnosis, corrupt: str, target: str, prepend_bos: bool = False
) -> PatchingCheck:
    """Activation patching of every block's attention and MLP output (all positions) and of the override head's
    z (all positions) from ``d``'s prompt into ``corrupt``; see the module docstring for the two metrics."""
    layout = layout_of(model)
    o_layer, o_head = d.override["layer"], d.override["head"]
    knowledge = prepare_pair(model, tokenizer, d.prompt, corrupt, target, None, ("attn", "mlp"), prepend_bos)
    rows = [[PatchUnit(kind, l)] for kind in ("attn", "mlp") for l in range(layout.n_layer)]
    restored = knowledge.restored(model, rows).tolist()
    failure = prepare_pair(model, tokenizer, d.prompt, corrupt, target, d.competitor.token_id, ("head",), prepend_bos)
    override = float(failure.restored(model, [[PatchUnit("head", o_layer, head=o_head)]])[0])
    return PatchingCheck(
        corrupt, knowledge.competitor.text, restored[: layout.n_layer], restored[layout.n_layer :], override
    )


def causal_agreement(
    d: Diagnosis, patching: PatchingCheck | None, weights: WeightPatching | None
) -> tuple[dict, list[str]]:
    """The causal checks' :class:`Agreement` fields and their differences (empty when none was asked for)."""
    fields, differences = {}, []
    named = partial(d.label, path=True)
    p, o = d.prescribed_layer, (d.override["layer"], d.override["head"])
    if patching is not None:
        x = patching.attn_restored[p]
        fields["prescribed_patching_confirmed"] = x >= PATCHING_CONFIRMS
        if x < PATCHING_CONFIRMS:
            differences.append(
                f"patching the attention output of the prescribed layer {named(p)} into "
                f"{patching.corrupt_prompt!r} restores only {x:.0%} of the target's lead over "
                f"{patching.corrupt_answer!r}"
            )
        fields["override_patching_confirmed"] = patching.override_restored > 0
        if patching.override_restored <= 0:
            differences.append(
                f"patching the override {named(*o)} into {patching.corrupt_prompt!r} does not move "
                f"it toward the competitor ({patching.override_restored:+.2f} of the difference)"
            )
    if weights is not None:
        best = weights.best()
        if best is None:
            differences.append("the donor's weights equal the model's: weight patching has nothing to compare")
        else:
            fields["donor_best_in_prescribed"] = best.layer == p
            if best.layer != p:
                differences.append(
                    f"the donor's {best.name} of {named(best.layer)} raises the target most "
                    f"({best.mean_target_logit_change:+.3f}), not the prescribed layer {named(p)}"
                )
    return fields, differences


# --------------------------------------------------------------------------------------------------
# Public entry point.
# --------------------------------------------------------------------------------------------------


def crosscheck(
    model: nn.Module,
    tokenizer,
    prompt: str,
    target: str,
    competitor: str | None = None,
    config: CrossCheckConfig = CrossCheckConfig(),
    corrupt: str | None = None,
    donor: nn.Module | None = None,
) -> CrossCheck:
    """Diagnose ``prompt`` and check the result with grad x act, ablations and the logit lens; with ``corrupt`` (a
    prompt of the same token length) also by activation patching, with ``donor`` (a model of the same architecture
    sharing ``tokenizer``) also by weight patching.

    Every method here runs on the prompt alone, so the diagnosis it checks is of the answer's first piece at the
    prompt's last position (``teacher_force=False``), also for an answer of several pieces."""
    d = diagnose(model, tokenizer, prompt, target, competitor, replace(config.diagnosis, teacher_force=False))
    layout = layout_of(model)
    device = layout.w_u(model).device
    ids = encode_prompt(tokenizer, prompt, layout.n_ctx, prepend_bos=config.diagnosis.prepend_bos)
    input_ids = torch.tensor([ids], device=device)
    token_ids = torch.tensor([d.target.token_id, d.competitor.token_id], device=device)
    clean = clean_run(model, input_ids, token_ids)
    dla = torch.tensor(d.head_matrix("diff"))  # (L, H)

    units = top_by_magnitude(dla, config.top_heads)
    if (d.override["layer"], d.override["head"]) not in units:
        units.append((d.override["layer"], d.override["head"]))
    ablations = []
    for layer, head in [*units, (d.prescribed_layer, None)]:
        for mode in MODES:
            logits = ablated_logits(model, input_ids, token_ids, clean, layer, head, mode)
            delta = logits - clean.logits
            ablations.append(
                Ablation(
                    "head" if head is not None else "attn_out",
                    layer,
                    head,
                    mode,
                    float(logits[0]),
                    float(logits[1]),
                    float(delta[0]),
                    float(delta[1]),
                )
            )
    agree = compare(d, dla, clean.grad_x_act, ablations, config.top_k)
    patching = (
        None if corrupt is None else patching_check(model, tokenizer, d, corrupt, target, config.diagnosis.prepend_bos)
    )
    weights = None if donor is None else patch_weights(model, donor, tokenizer, [Fact(prompt, target)])
    fields, differences = causal_agreement(d, patching, weights)
    agree = replace(agree, **fields, differences=agree.differences + differences)
    return CrossCheck(
        diagnosis=d,
        dla=ranking(dla),
        grad_x_act=ranking(clean.grad_x_act),
        ablations=ablations,
        agree=agree,
        patching=patching,
        weight_patching=weights,
    )
