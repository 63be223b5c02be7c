"""``repair-census``: one edit for many of a census' routing failures, judged on held-out facts, facts the model
knew and the neighbourhood; compared with one edit per fact. Writes ``report.json``, ``report.md`` and
``patch.safetensors``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..arch import block_label
from ..census.run import read_records
from ..core.errors import InputError
from ..edit.editors import METHODS
from ..edit.many_facts import RepairConfig, repair_from_census
from ..evaluation.facts import load_fact_file
from ..evaluation.panels import ENGLISH_PANEL, load_panel
from ..evaluation.report import format_rows
from ..io.export import atomic_output, check_output_dir, write_json, write_patch
from .common import add_device_arg, add_model_arg, load, parse_layer
from .operate import DEFAULTS, add_method_args, parse_layers


def register(sub) -> None:
    p = sub.add_parser(
        "repair-census",
        help="one edit for many routing failures of a census; held-out "
        "generalization, specificity, and one edit per fact for comparison",
        description="Splits the census' routing failures (per relation, seeded) into facts to edit "
        "and held-out facts, edits all of the first at the block most of them "
        "prescribe, and reports efficacy, paraphrases, the held-out facts, facts the "
        "model said right (any relation) and the neighbourhood panel; then edits --per-fact of them "
        "one at a time for comparison.",
    )
    add_model_arg(p)
    p.add_argument("--census", required=True, metavar="DIR", help="a census folder (python -m surgery census)")
    p.add_argument("--facts", required=True, nargs="+", metavar="FILE", help="the census' fact files (.jsonl)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (refused if it exists)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--site", default="wv", help="wv | attn | mlp | layer (default wv; for --method wv)")
    p.add_argument(
        "--method",
        default="wv",
        choices=METHODS,
        help="the editor: wv (our repair of --site) or a peer (rome, ft, memit, alphaedit: "
        "the MLP output projection, keyed at each fact's subject; docs/editors.md)",
    )
    add_method_args(p)
    p.add_argument("--layer", default="auto", help="block index or auto (the census' most common prescribed layer)")
    p.add_argument(
        "--edit-fraction",
        type=float,
        default=RepairConfig().edit_fraction,
        help="share of each relation's routing failures to edit (default 0.5; the rest is held out)",
    )
    p.add_argument("--max-edit", type=int, help="at most this many edited facts in all")
    p.add_argument(
        "--preserve-facts",
        type=int,
        default=RepairConfig().preserve_facts,
        help="correct facts of the edited relations, never scored, whose answers the preservation term keeps "
        f"(wv; default {RepairConfig().preserve_facts}; 0: only the panel's own)",
    )
    p.add_argument(
        "--per-fact",
        type=int,
        default=RepairConfig().per_fact,
        help="edited facts also edited one at a time, for comparison (default 4; 0: none)",
    )
    p.add_argument("--epochs", type=int, default=DEFAULTS.epochs)
    p.add_argument("--lr", type=float, default=DEFAULTS.lr)
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="facts per mini-batch")
    p.add_argument("--seed", type=int, default=0)
    add_device_arg(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..edit.training import SurgeryConfig

    surgery = SurgeryConfig(
        site=args.site,
        method=args.method,
        stat_tokens=args.stat_tokens,
        layers=parse_layers(args.layers),
        layer=parse_layer(args.layer),
        lr=args.lr,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    config = RepairConfig(
        edit_fraction=args.edit_fraction,
        max_edit=args.max_edit,
        preserve_facts=args.preserve_facts,
        per_fact=args.per_fact,
        seed=args.seed,
    )
    check_output_dir(args.out, args.overwrite)
    records = list(read_records(Path(args.census)).values())
    if not records:
        raise InputError(f"{args.census} holds no census records (census.jsonl)")
    facts = [f for path in args.facts for f in load_fact_file(path)]
    loaded = load(args)
    result = repair_from_census(
        loaded.model,
        loaded.tokenizer,
        records,
        facts,
        load_panel(ENGLISH_PANEL),
        surgery,
        config,
        progress=lambda text: print(f"... {text}", flush=True),
        cache_dir=args.stats_dir,
    )
    summary = result.to_dict()
    rows = format_rows(result.report.rows(), markdown=True)
    markdown = (
        f"# One edit for {result.edited} routing failures ({result.held_out} held out)\n\n"
        f"Method {result.report.method}, site {result.report.site} of {block_label(result.layer)}: "
        f"{result.layer_reason}.\n\n{rows}\n"
    )
    if "one_edit_vs_one_per_fact" in summary:
        cmp = summary["one_edit_vs_one_per_fact"]
        one, per = cmp["one_edit"], cmp["per_fact"]
        markdown += (
            f"\n| | time | parameters changed | side effects after |\n|---|---|---|---|\n"
            f"| one edit for {one['facts']} facts | {one['time_s']:.0f} s | {one['params_changed']:,} | "
            f"{one['side_effects_after']}/{one['side_effects_total']} |\n"
            f"| one edit per fact ({per['facts']} edits, projected to {one['facts']}) | "
            f"{per['projected_time_s_for_all']:.0f} s | {per['projected_params_changed_for_all']:,.0f} | "
            f"{', '.join(map(str, per['side_effects_after']))} (each of /{per['side_effects_total']}) |\n"
        )
    with atomic_output(args.out, args.overwrite) as tmp:
        write_patch(tmp, loaded, result.edit)
        write_json(tmp / "report.json", summary)
        (tmp / "report.md").write_text(markdown, encoding="utf-8")
    print(markdown)
    print(f"written to {args.out}")
    return 0
