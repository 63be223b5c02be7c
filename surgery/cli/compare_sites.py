"""``compare-sites``: run all four sites on the same facts and print one table."""

from __future__ import annotations

import argparse
from dataclasses import replace

from ..arch import SITES
from ..core.progress import progress_bar
from ..edit.compare import compare_configs
from ..edit.training import choose_layer
from ..evaluation.facts import load_facts
from .common import add_model_arg, load, load_panel_arg, print_json
from .operate import add_training_args, config_from_args, read_unrelated

EXIT_SOME_FAILED = 1
COLUMNS = ("site", "params", "facts", "general", "side effects", "perplexity", "ΔL2", "max |Δ|", "steps", "time")


def register(sub) -> None:
    p = sub.add_parser(
        "compare-sites",
        help="run wv, attn, mlp and layer on the same facts; one table",
        description="Runs surgery at all four sites of the same block on the same facts and "
        "prints parameters, facts fixed, general, side effects, perplexity, ΔL2, "
        "max |Δ| and wall time. Nothing is written. Exit 1 if a site failed.",
    )
    add_model_arg(p)
    add_training_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args, "wv")
    facts = load_facts(args.facts)
    unrelated = read_unrelated(args.unrelated)
    loaded = load(args)
    panel = load_panel_arg(args, loaded.model)
    layer, reason = config.layer, "given"
    if layer is None:  # one choice for all four sites
        layer, reason, _ = choose_layer(loaded.model, loaded.tokenizer, facts)
    comparison = compare_configs(
        loaded.model,
        loaded.tokenizer,
        facts,
        {site: replace(config, site=site, layer=layer) for site in SITES},
        panel=panel,
        unrelated=unrelated,
        progress_bars=lambda desc, unit="step": progress_bar(f"site {desc}" if unit == "step" else desc, unit),
        require_all=True,
    )
    rows = [
        {"site": r.name, "ok": True, **r.figures()} if r.ok else {"site": r.name, "ok": False, "error": r.error}
        for r in comparison.runs
    ]
    if args.json:
        print_json({"layer": layer, "layer_reason": reason, "sites": rows})
    else:
        print(f"block {layer}: {loaded.layout.label(layer, path=True)}: {reason}")
        print(format_table(rows))
    return EXIT_SOME_FAILED if comparison.failed else 0


def _change(row: dict, key: str) -> str:
    total = row[f"{key}_total"]
    return f"{row[f'{key}_before']}/{total} -> {row[f'{key}_after']}/{total}"


def _perplexity(row: dict) -> str:
    before, after = row["perplexity_before"], row["perplexity_after"]
    return "-" if before is None or after is None else f"{before:.2f} -> {after:.2f}"


def format_table(rows: list[dict]) -> str:
    cells = [COLUMNS]
    for r in rows:
        if not r["ok"]:
            cells.append((r["site"], "failed: " + r["error"]) + ("",) * (len(COLUMNS) - 2))
            continue
        cells.append(
            (
                r["site"],
                f"{r['params']:,}",
                _change(r, "facts"),
                _change(r, "general"),
                _change(r, "side_effects"),
                _perplexity(r),
                f"{r['delta_l2']:.3f}",
                f"{r['max_abs_delta']:.4f}",
                str(r["steps"]),
                f"{r['wall_time_s']:.1f} s",
            )
        )
    widths = [max(len(row[i]) for row in cells if not row[1].startswith("failed")) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
        if not row[1].startswith("failed")
        else f"{row[0].ljust(widths[0])}  {row[1]}"
        for row in cells
    )
