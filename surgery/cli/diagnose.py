"""``diagnose``: logit lens, per-head attribution and a verdict for one prompt."""

from __future__ import annotations

import argparse

from ..diagnosis.diagnose import Diagnosis, DiagnosisConfig, diagnose
from .common import add_device_arg, add_model_arg, add_prompt_args, load, print_json


def register(sub) -> None:
    p = sub.add_parser(
        "diagnose",
        help="why does the model emit the wrong next token?",
        description="Logit lens, direct logit attribution per head/MLP, and a verdict "
        "(routing / absence / correct) for one prompt.",
    )
    add_model_arg(p)
    add_prompt_args(p)
    p.add_argument(
        "--routing-rank",
        type=int,
        default=DiagnosisConfig.routing_rank,
        help=f"lens rank that counts as holding the answer (default {DiagnosisConfig.routing_rank})",
    )
    p.add_argument("--top", type=int, default=8, help="heads listed in the report (default 8)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    add_device_arg(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    loaded = load(args)
    config = DiagnosisConfig(routing_rank=args.routing_rank, prepend_bos=args.prepend_bos)
    d = diagnose(loaded.model, loaded.tokenizer, args.prompt, args.target, args.competitor, config)
    if args.json:
        print_json(d.to_dict())
    else:
        print(format_report(d, top=args.top))
    return 0


def format_report(d: Diagnosis, top: int = 8) -> str:
    t, c = d.target, d.competitor
    lines = [
        f"prompt      {d.prompt!r} ({len(d.tokens)} tokens)",
        f"prediction  {d.prediction.text!r}",
        f"target      {t.text!r}  logit {t.logit:8.3f}  rank {t.rank}",
        f"competitor  {c.text!r}  logit {c.logit:8.3f}  rank {c.rank}",
    ]
    v = d.divergence
    if v is not None and (d.multi_token_target or v.generic_first_piece):
        state = ("diverges" if v.diverges else "every piece predicted") if v.forced else "teacher forcing off"
        lines.append(
            f"piece       {v.piece_index + 1} of {len(v.pieces)} {v.pieces}, {v.piece!r} at token position "
            f"{v.position}"
            + (f" after {v.before!r}" if v.before else "")
            + f" ({state})"
            + ("; a generic first piece" if v.generic_first_piece else "")
        )
    width = max(14, len(d.label(d.n_layer - 1, path=True)) + 2)  # "L12 (transformer.h.11)" or "L30 (model.layers.29)"
    head_width = len(d.label(d.n_layer - 1, d.n_head - 1, path=True)) + 2
    lines += [
        "",
        f"verdict     {d.verdict.upper()}: {d.summary()}",
        "",
        "logit lens (residual -> ln_f -> unembed, last position)",
        f"  {'after':<{width}}{'target':>10}{'competitor':>12}{'rank':>8}",
    ]
    for e in d.logit_lens:
        name = d.label(e.layer, path=True)
        lead = "  <- target leads" if e.target_logit > e.competitor_logit else ""
        lines.append(f"  {name:<{width}}{e.target_logit:10.3f}{e.competitor_logit:12.3f}{e.target_rank:8d}{lead}")
    lines += ["", f"heads writing the target (target - competitor), top {top}"]
    for a in d.top_heads(top, toward="target"):
        lines.append(
            f"  {d.label(a.layer, a.head, path=True):<{head_width}} target {a.target:+9.3f}  "
            f"competitor {a.competitor:+9.3f}"
        )
    lines += [f"heads pushing the competitor (competitor - target), top {top}"]
    for a in d.top_heads(top, toward="competitor"):
        lines.append(
            f"  {d.label(a.layer, a.head, path=True):<{head_width}} target {a.target:+9.3f}  "
            f"competitor {a.competitor:+9.3f}"
        )
    o = d.override
    lines += [
        "",
        f"override head     {d.label(o['layer'], o['head'], path=True)}",
        f"prescribed layer  {d.label(d.prescribed_layer, path=True)}",
    ]
    return "\n".join(lines)
