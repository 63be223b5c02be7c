"""``compare-editors``: every editor on the same facts and base, one evaluation; writes compare.md, compare.json,
compare.png and each method's patch, report and card, atomically."""

from __future__ import annotations

import argparse

from ..core.progress import progress_bar
from ..edit.compare import EditorComparison, check_methods, compare_configs, editor_configs
from ..edit.editors import METHODS
from ..evaluation.facts import load_facts
from ..io.export import atomic_output, check_output_dir, write_edit_files, write_json
from .common import add_model_arg, load, load_panel_arg, print_json
from .operate import add_method_args, add_training_args, config_from_args, parse_layers, read_unrelated

EXIT_SOME_FAILED = 1
FILES = ("compare.md", "compare.json", "compare.png")


def register(sub) -> None:
    p = sub.add_parser(
        "compare-editors",
        help="run every editor (wv, rome, ft, ...) on the same facts; a table, JSON and a plot",
        description="Runs each method with operate on the same facts, base model and evaluation (the base "
        "evaluated once) and writes compare.md, compare.json, compare.png and one folder per method "
        "(patch.safetensors, report.json, README.md) to --out, atomically. A method that fails is a row "
        "saying why; the exit code is then 1.",
    )
    add_model_arg(p)
    p.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated methods, in the table's order (default {','.join(METHODS)})",
    )
    p.add_argument(
        "--require-all",
        action="store_true",
        help="a method that does not fix every fact is a failed row (default: its efficacy is reported)",
    )
    add_method_args(p)
    add_training_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (refused if it exists)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out written by this tool")
    p.add_argument("--json", action="store_true", help="print compare.json instead of the table")
    p.set_defaults(run=run)


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    check_methods(methods)
    return methods


def run(args: argparse.Namespace) -> int:
    # bad input: refused before anything is loaded or written
    configs = editor_configs(
        parse_methods(args.methods), config_from_args(args, "wv", layers=False), parse_layers(args.layers)
    )
    check_output_dir(args.out, args.overwrite)
    facts = load_facts(args.facts)
    unrelated = read_unrelated(args.unrelated)
    loaded = load(args)
    panel = load_panel_arg(args, loaded.model)
    comparison = compare_configs(
        loaded.model,
        loaded.tokenizer,
        facts,
        configs,
        panel=panel,
        unrelated=unrelated,
        cache_dir=args.stats_dir,
        progress_bars=progress_bar,
        require_all=args.require_all,
    )
    summary = {"base_model": loaded.base_name, "revision": loaded.revision, **comparison.to_dict()}
    markdown = comparison.to_markdown(f"Editors compared on {loaded.base_name}")
    write_comparison(args.out, args.overwrite, loaded, comparison, summary, markdown)
    if args.json:
        print_json(summary)
    else:
        print(markdown)
        print(f"written to {args.out}")
    return EXIT_SOME_FAILED if comparison.failed else 0


def write_comparison(out, overwrite: bool, loaded, comparison: EditorComparison, summary: dict, markdown: str):
    """compare.md, compare.json, compare.png and, per method that succeeded, its folder as ``operate`` writes it
    but for the model weights (``apply-patch`` rebuilds them from the patch)."""
    with atomic_output(out, overwrite) as tmp:
        (tmp / "compare.md").write_text(markdown, encoding="utf-8")
        write_json(tmp / "compare.json", summary)
        comparison.figure().savefig(tmp / "compare.png", dpi=120)
        for r in comparison.runs:
            if not r.ok:
                continue
            folder = tmp / r.name
            folder.mkdir()
            write_edit_files(folder, loaded, r.result)
