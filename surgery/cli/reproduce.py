"""``reproduce``: the reference experiment on one model — diagnosis, trace, four sites, generalization — written
as ``report.md``, ``report.json`` and the trace's plots (``lens.png``, ``heads.png``)."""

from __future__ import annotations

import argparse

from ..arch import SITES
from ..core.errors import InputError
from ..diagnosis import plots
from ..edit.reproduce import reproduce
from ..evaluation.facts import load_facts
from ..io.export import atomic_output, check_output_dir, write_json
from .common import add_device_arg, add_model_arg, add_panel_arg, load, load_panel_arg, parse_layer


def register(sub) -> None:
    p = sub.add_parser(
        "reproduce",
        help="the reference experiment end to end: diagnose, trace, four sites, generalization; Markdown, JSON and PNG",
        description="Diagnoses the facts (default: the panel's), traces the first routing failure "
        "per layer and per head, repairs every fact at each site of the prescribed "
        "block, and judges each repair on efficacy, paraphrases, unedited facts of "
        "the same relation, specificity, KL and perplexity. Writes report.md, "
        "report.json, lens.png and heads.png to --out, atomically.",
    )
    add_model_arg(p)
    p.add_argument("--facts", metavar="FILE", help="facts JSON (default: the panel's facts)")
    p.add_argument("--sites", default=",".join(SITES), help=f"comma-separated sites (default {','.join(SITES)})")
    p.add_argument("--layer", default="auto", help="block index (0-indexed) or auto (default)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (refused if it exists)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_panel_arg(p)
    add_device_arg(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..edit.training import SurgeryConfig

    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    bad = [s for s in sites if s not in SITES]
    if not sites or bad:
        raise InputError(f"--sites takes {', '.join(SITES)}, comma-separated, not {args.sites!r}")
    config = SurgeryConfig(layer=parse_layer(args.layer))
    check_output_dir(args.out, args.overwrite)
    facts = load_facts(args.facts) if args.facts else None
    loaded = load(args)
    panel = load_panel_arg(args, loaded.model)
    if facts is None:
        facts = list(panel.facts)
        if not facts:
            raise InputError(f"panel {panel.name!r} has no facts: pass --facts FILE")
    result = reproduce(
        loaded.model,
        loaded.tokenizer,
        facts,
        panel,
        name=args.model,
        sites=sites,
        config=config,
        progress=lambda text: print(f"... {text}", flush=True),
    )
    with atomic_output(args.out, args.overwrite) as tmp:
        (tmp / "report.md").write_text(result.to_markdown(), encoding="utf-8")
        write_json(tmp / "report.json", result.to_dict())
        traced = next((d for d in result.diagnoses if d.verdict == "routing"), None)
        if traced is not None:
            plots.cumulative_logit_plot(traced).savefig(tmp / "lens.png", dpi=120)
            plots.attribution_heatmap(traced).savefig(tmp / "heads.png", dpi=120)
    print(result.to_markdown())
    print(f"written to {args.out}")
    return 0
