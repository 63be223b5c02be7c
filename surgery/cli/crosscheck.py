"""``crosscheck``: check a diagnosis with gradient x activation, ablations and the logit lens."""

from __future__ import annotations

import argparse

from ..core.errors import InputError
from ..diagnosis.diagnose import DiagnosisConfig
from ..patching.crosscheck import PATCHING_CONFIRMS, CrossCheck, CrossCheckConfig, crosscheck
from .common import add_device_arg, add_model_arg, add_prompt_args, load, print_json


def register(sub) -> None:
    p = sub.add_parser(
        "crosscheck",
        help="do other attribution methods agree with the diagnosis?",
        description="Diagnose one prompt, then compare per-head DLA with gradient x activation, "
        "zero/mean-ablate the top heads and the prescribed layer's attention output, and "
        "find where the target first leads in the logit lens. See docs/heads.md.",
    )
    add_model_arg(p)
    add_prompt_args(p)
    p.add_argument("--top-heads", type=int, default=5, help="heads ablated besides the override (default 5)")
    p.add_argument("--top-k", type=int, default=5, help="size of the top sets compared (default 5)")
    p.add_argument(
        "--corrupt",
        metavar="PROMPT",
        help="also check by activation patching from the prompt into this one (same number of tokens, "
        "e.g. another country; docs/patching.md)",
    )
    p.add_argument(
        "--donor",
        metavar="PATH_OR_ID",
        help="also check by weight patching: copy each differing site of this model (same "
        "architecture, e.g. the corrected one) into the model and score the prompt",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    add_device_arg(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    loaded = load(args)
    config = CrossCheckConfig(
        top_heads=args.top_heads, top_k=args.top_k, diagnosis=DiagnosisConfig(prepend_bos=args.prepend_bos)
    )
    donor = None
    if args.donor:
        donor = load(args, "donor")
        if donor.tokenizer.get_vocab() != loaded.tokenizer.get_vocab():
            raise InputError(
                "the model and the --donor use different vocabularies: weights can only be patched "
                "between models of one tokenizer"
            )
    result = crosscheck(
        loaded.model,
        loaded.tokenizer,
        args.prompt,
        args.target,
        args.competitor,
        config,
        corrupt=args.corrupt,
        donor=None if donor is None else donor.model,
    )
    if args.json:
        print_json(result.to_dict())
    else:
        print(format_report(result))
    return 0


def format_report(r: CrossCheck) -> str:
    d, a = r.diagnosis, r.agree
    o = d.override
    lines = [
        f"prompt      {d.prompt!r}",
        f"target      {d.target.text!r} (logit {d.target.logit:.3f})  competitor {d.competitor.text!r} "
        f"(logit {d.competitor.logit:.3f})  verdict {d.verdict}",
        f"override    {d.label(o['layer'], o['head'], path=True)}   prescribed layer "
        f"{d.label(d.prescribed_layer, path=True)}",
        "",
        f"top {a.top_k} heads by |effect on target - competitor|",
        f"  {'DLA':<44}{'grad x act':<44}",
    ]
    for x, y in zip(r.dla[: a.top_k], r.grad_x_act[: a.top_k]):
        lines.append(
            f"  {d.label(x.layer, x.head, path=True):<34}{x.value:+9.3f} "
            f"{d.label(y.layer, y.head, path=True):<34}{y.value:+9.3f}"
        )
    lines += [
        "",
        "ablations (all positions; d = ablated - clean)",
        f"  {'unit':<36}{'mode':<6}{'d target':>10}{'d competitor':>14}{'d diff':>10}",
    ]
    for ab in r.ablations:
        unit = (
            d.label(ab.layer, ab.head, path=True) if ab.head is not None else f"attn out {d.label(ab.layer, path=True)}"
        )
        lines.append(f"  {unit:<36}{ab.mode:<6}{ab.d_target:+10.3f}{ab.d_competitor:+14.3f}{-ab.effect:+10.3f}")
    lead = "never" if a.lens_first_lead_layer is None else d.label(a.lens_first_lead_layer, path=True)
    spearman = "n/a" if a.spearman is None else f"{a.spearman:+.3f}"
    lines += [
        "",
        "agreement",
        f"  Spearman DLA vs grad x act      {spearman}",
        f"  top-{a.top_k} overlap                   {a.top_k_overlap:.0%}   same top-1: {_yes(a.top1_same)}",
        f"  override = grad x act's most competitor-favouring head: {_yes(a.override_top_grad_x_act)}",
        f"  override confirmed by ablation  mean {_yes(a.override_confirmed)} (zero {_yes(a.override_confirmed_zero)})",
        f"  prescribed layer confirmed      mean {_yes(a.prescribed_confirmed)} "
        f"(zero {_yes(a.prescribed_confirmed_zero)})",
        f"  logit lens: target first leads  {lead}",
    ]
    lines += _causal_lines(r)
    lines += ["", "all methods agree" if a.all else "where they differ"] + [f"  - {x}" for x in a.differences]
    return "\n".join(lines)


def _causal_lines(r: CrossCheck) -> list[str]:
    """The activation- and weight-patching lines of the agreement, where they were asked for."""
    d, a, lines = r.diagnosis, r.agree, []
    if r.patching is not None:
        pc = r.patching
        lines += [
            f"  activation patching into {pc.corrupt_prompt!r} (target vs {pc.corrupt_answer!r}; "
            f"fraction restored, all positions)",
            "    attention per block  " + "  ".join(f"{d.label(i)} {v:+.2f}" for i, v in enumerate(pc.attn_restored)),
            "    MLP per block        " + "  ".join(f"{d.label(i)} {v:+.2f}" for i, v in enumerate(pc.mlp_restored)),
            f"    prescribed layer's attention restores >= {PATCHING_CONFIRMS:.0%}: "
            f"{_yes(a.prescribed_patching_confirmed)}",
            f"    override moves the corrupted run toward the competitor: {_yes(a.override_patching_confirmed)} "
            f"({pc.override_restored:+.2f} of target - competitor)",
        ]
    if r.weight_patching is not None:
        w = r.weight_patching
        lines.append(
            f"  weight patching from the donor (target logit change; {w.skipped_identical} identical sites skipped)"
        )
        for c in w.components:
            lines.append(
                f"    {d.label(c.layer, path=True)} {c.name:<6} {c.mean_target_logit_change:+.3f}"
                f"   answers right: {_yes(bool(c.facts_correct))}"
            )
        if a.donor_best_in_prescribed is not None:
            lines.append(
                f"    the site raising the target most is in the prescribed layer: {_yes(a.donor_best_in_prescribed)}"
            )
    return lines


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"
