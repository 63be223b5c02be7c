"""Experiment (b) of the editors' comparison: one batch edit of a census' routing failures, one ``repair-census``
run per method, side by side (docs/editors.md, "(b) One batch edit").

Each method runs as its own process (``python -m surgery repair-census --method M``: the same split, the same
census panel, the same evaluation), so a method's wall time and peak memory are its own; this module only reads
the runs' ``report.json`` and writes the table::

    for m in wv memit alphaedit rome ft; do
        python -m surgery repair-census --model smollm2-135m --census runs/census-smollm2 \\
            --facts assets/facts/*.jsonl --per-fact 0 --method $m --out /tmp/b/$m
    done
    python -m bench.batch_edits /tmp/b/* --out docs/results/batch-smollm2-135m

Every figure comes from the runs' own reports; runs that did not edit the same facts are refused.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from surgery.core.errors import InputError
from surgery.edit.compare import evaluation_figures
from surgery.io.export import atomic_output, write_json

# (key in the figures, column label) of the lists a batch edit is judged on, in the table's order
LISTS = (
    ("facts", "efficacy"),
    ("paraphrase", "paraphrase"),
    ("relation", "held-out routing failures"),
    ("side_effects", "facts it said right"),
    ("neighbourhood", "neighbourhood"),
    ("general", "general"),
)


def read_run(folder: Path) -> dict:
    """One run's row: the method, its blocks, the figures of its evaluation, its weights and wall time."""
    path = folder / "report.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        report = summary["report"]
        row = {
            "run": folder.name,
            "method": report["method"],
            "layer": summary["layer"],
            # the census' choice of the block, and the blocks a multi-block method spread it over
            "layer_reason": "; ".join([summary["layer_reason"], *report["layer_reason"].split("; ")[1:]]),
            "edited": summary["edited"],
            "held_out": summary["held_out"],
            "facts": sorted(f["prompt"] for f in report["facts"]),
            **evaluation_figures(summary["evaluation"]),
            "params_changed": report["weights"]["params_changed"],
            "delta_l2": report["weights"]["delta_l2"],
            "steps": report["steps"],
            "wall_time_s": report["wall_time_s"],
        }
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{folder} is not a repair-census output folder ({type(e).__name__}: {e})") from None
    return row


def _count(row: dict, name: str, when: str) -> str:
    total = row[f"{name}_total"]
    if not total:
        return "—"
    cell = f"{row[f'{name}_{when}']}/{total} ({row[f'{name}_first_token_{when}']})"
    if when == "after":
        fixed, broken = row.get(f"{name}_fixed"), row.get(f"{name}_broken")
        if name == "relation" and fixed is not None:
            cell += f" +{fixed}"
        if broken:
            cell += f" −{broken}"
    return cell


def _number(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def to_markdown(rows: Sequence[dict], title: str) -> str:
    first = rows[0]
    head = ["", "block(s)", *(label for _, label in LISTS), "KL unrelated", "perplexity", "params changed", "ΔL2"]
    head += ["steps", "wall time"]
    lines = [
        f"# {title}",
        "",
        f"One edit of {first['edited']} routing failures of the census ({first['held_out']} held out), the same "
        "facts, split and evaluation for every method (`repair-census --method M`, one process each).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        "| base model | | "
        + " | ".join(_count(first, name, "before") for name, _ in LISTS)
        + f" | 0 | {_number(first['perplexity_before'], '.2f')} | 0 | 0 | | |",
    ]
    methods = [r["method"] for r in rows]
    for r in rows:
        label = r["method"] if methods.count(r["method"]) == 1 or r["run"] == r["method"] else r["run"]
        cells = [f"**{label}**", str(r["layer"])]
        cells += [_count(r, name, "after") for name, _ in LISTS]
        cells += [_number(r["kl_unrelated"], ".2e"), _number(r["perplexity_after"], ".2f"), f"{r['params_changed']:,}"]
        cells += [f"{r['delta_l2']:.1f}", str(r["steps"]), f"{r['wall_time_s']:.0f} s"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Blocks", ""]
    lines += [f"- **{r['method']}** ({r['run']}): {r['layer_reason']}" for r in rows]
    lines += [
        "",
        "Counts are what the model *says* (greedy generation, the whole answer at a word boundary), with the "
        "first-token count in brackets; `+` fixed, `−` broken by the edit. **held-out routing failures**: the "
        "census' routing failures of the same relations that were not edited; **facts it said right**: a seeded "
        "sample of the census' correct facts of every relation (the edited relations included). The wall time is "
        "the whole `operate` (diagnosis, edit, evaluation before and after).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.batch_edits", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="repair-census output folders, one per method")
    p.add_argument("--out", type=Path, help="write batch.md, batch.json and each run's report.json (by folder) here")
    p.add_argument("--title", default="One batch edit, method by method")
    args = p.parse_args(argv)
    try:
        rows = [read_run(folder) for folder in args.runs]
    except InputError as e:
        raise SystemExit(f"error: {e}") from None
    if len({tuple(r["facts"]) for r in rows}) != 1:
        raise SystemExit("error: the runs did not edit the same facts (another census, split or seed)")
    if len({r["run"] for r in rows}) != len(rows):
        raise SystemExit("error: give each run its own folder name (it names the run in the table)")
    markdown = to_markdown(rows, args.title)
    print(markdown)
    if args.out:
        with atomic_output(args.out, overwrite=True) as tmp:
            (tmp / "batch.md").write_text(markdown, encoding="utf-8")
            write_json(tmp / "batch.json", [{k: v for k, v in r.items() if k != "facts"} for r in rows])
            for folder, r in zip(args.runs, rows):
                (tmp / r["run"]).mkdir()
                shutil.copy(folder / "report.json", tmp / r["run"] / "report.json")


if __name__ == "__main__":
    main()
