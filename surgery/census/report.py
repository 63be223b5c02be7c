"""The census summary (``summary.json``), its readable report (``report.md``) and the report's plots.

Everything here is computed from the census records alone (see :mod:`surgery.census.run`), so a report can be
rebuilt from a ``census.jsonl`` without the model. Layers and heads are 0-indexed in JSON, as everywhere; the
report's prose says "block 11" for ``h.11``.

**Outcomes** (:func:`outcome`) put what the model *says* first: a fact whose greedy continuation starts with the
whole answer is ``says``, one that says it within the first few words is ``says_later`` (not a failure, though the
first-token diagnosis may call it routing), one whose missed first piece is generic (fed it, the model goes on to
another answer: " D" -> "akar" for Doha) is ``generic_first_piece`` (a repair would only teach the piece); the
rest keep their diagnosis' verdict (``routing``, ``absence``, or ``correct`` when the pieces are predicted but the
answer is not said at a word boundary). Prescribed layers and override heads are counted over the ``routing``
outcomes: the facts to repair.

The report also shows how many verdicts the routing rule of issue 12 moved: :func:`legacy_verdict` is the rule
before it (routing if after any block 1 .. L-2 the target's lens logit beats the competitor's or its lens rank is
within 10), recomputed from each record's ``lens_margin`` and ``lens_ranks``.
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..diagnosis.diagnose import VERDICTS, DiagnosisConfig

RANK_BINS = ((1, 1), (2, 2), (3, 3), (4, 5), (6, 10), (11, 100), (101, 1000), (1001, None))
PLOTS = {"verdicts": "verdicts_per_relation.png", "layers": "prescribed_layers.png", "heads": "override_heads.png"}
LEGACY_ROUTING_RANK = 10
OUTCOMES = ("says", "says_later", "generic_first_piece", "routing", "absence", "correct")


def outcome(record: dict) -> str:
    """What a diagnosed census record amounts to (one of :data:`OUTCOMES`; the module docstring). Records without
    the generation fields (a prompt that fills the context) fall back on their diagnosis."""
    if record.get("says_answer"):
        return "says"
    if record.get("says_later"):
        return "says_later"
    if (record.get("divergence") or {}).get("generic_first_piece"):
        return "generic_first_piece"
    return record["verdict"]


def legacy_verdict(record: dict) -> str:
    """The verdict under the rule before issue 12 (from the record's lens ranks and margins)."""
    ranks, margin = record["lens_ranks"], record["lens_margin"]
    if ranks[-1] == 1:
        return "correct"
    middle = range(1, len(ranks) - 1)
    held = any(margin[i] > 0 or ranks[i] <= LEGACY_ROUTING_RANK for i in middle)
    return "routing" if held else "absence"


def rank_bin(rank: int) -> str:
    for lo, hi in RANK_BINS:
        if hi is None or rank <= hi:
            return f"{lo}" if lo == hi else (f"{lo}-{hi}" if hi else f">{lo - 1}")
    raise AssertionError


def summarize(
    records: list[dict], *, n_layer: int, n_head: int, model_name: str = "", config=None, skipped_ambiguous: int = 0
) -> dict:
    """``summary.json``: outcome and verdict counts per relation, distributions of prescribed layers, override heads
    (over the ``routing`` outcomes) and best lens ranks, the diagnosed piece of the facts whose answer diverges, and
    the old-vs-new rule transitions per relation."""
    diagnosed = [r for r in records if r.get("verdict")]
    relations = sorted({r["relation"] for r in records})
    verdicts = {rel: {v: 0 for v in VERDICTS} for rel in relations + ["all"]}
    outcomes = {rel: {o: 0 for o in OUTCOMES} for rel in relations + ["all"]}
    pieces = collections.Counter()
    unusable = collections.Counter(r["relation"] for r in records if not r.get("verdict"))
    layers = {rel: [0] * n_layer for rel in relations + ["all"]}
    heads = [[0] * n_head for _ in range(n_layer)]
    best = {rel: {rank_bin(lo): 0 for lo, _ in RANK_BINS} for rel in relations + ["all"]}
    moved = {rel: collections.Counter() for rel in relations + ["all"]}
    for r in diagnosed:
        result = outcome(r)
        for rel in (r["relation"], "all"):
            verdicts[rel][r["verdict"]] += 1
            outcomes[rel][result] += 1
            best[rel][rank_bin(r["best_lens_rank"])] += 1
            old = legacy_verdict(r)
            if old != r["verdict"]:
                moved[rel][f"{old} -> {r['verdict']}"] += 1
            if result == "routing":
                layers[rel][r["prescribed_layer"]] += 1
        if result == "routing":
            heads[r["override"]["layer"]][r["override"]["head"]] += 1
        if (r.get("divergence") or {}).get("diverges"):
            pieces[r["divergence"]["piece_index"]] += 1
    top_heads = sorted(((n, l, h) for l, row in enumerate(heads) for h, n in enumerate(row) if n), reverse=True)
    return {
        "model": model_name,
        "n_layer": n_layer,
        "n_head": n_head,
        "config": config.to_dict() if config is not None else None,
        "facts": {
            "records": len(records),
            "diagnosed": len(diagnosed),
            "unusable": dict(unusable),
            "skipped_ambiguous": skipped_ambiguous,
        },
        "outcomes": outcomes,
        "verdicts": verdicts,
        "divergence_piece": {str(k): n for k, n in sorted(pieces.items())},
        "prescribed_layers": layers,
        "override_heads": heads,
        "top_override_heads": [{"layer": l, "head": h, "count": n} for n, l, h in top_heads[:10]],
        "best_lens_rank": best,
        "rule_change": {rel: dict(sorted(c.items())) for rel, c in moved.items()},
    }


def write_report(
    records: list[dict],
    out: str | os.PathLike,
    *,
    n_layer: int,
    n_head: int,
    model_name: str = "",
    config=None,
    skipped_ambiguous: int = 0,
) -> dict:
    """Write ``summary.json``, the three PNG plots and ``report.md`` into ``out``; return the summary."""
    out = Path(out)
    summary = summarize(
        records,
        n_layer=n_layer,
        n_head=n_head,
        model_name=model_name,
        config=config,
        skipped_ambiguous=skipped_ambiguous,
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for key, figure in (
        ("verdicts", verdicts_figure(summary)),
        ("layers", layers_figure(summary)),
        ("heads", heads_figure(summary)),
    ):
        FigureCanvasAgg(figure).print_png(str(out / PLOTS[key]))
    (out / "report.md").write_text(format_report(summary))
    return summary


def outcome_table(summary: dict) -> str:
    """Markdown table: facts per relation and outcome (with percentages)."""
    lines = ["| relation | facts | " + " | ".join(OUTCOMES) + " |", "|---|---:|" + "---:|" * len(OUTCOMES)]
    for rel, counts in summary["outcomes"].items():
        total = sum(counts.values())
        cells = [f"{counts[o]} ({100 * counts[o] / total:.0f}%)" if total else "0" for o in OUTCOMES]
        lines.append(f"| {'**all**' if rel == 'all' else rel} | {total} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict_table(summary: dict) -> str:
    """Markdown table: facts per relation and verdict (with percentages)."""
    lines = ["| relation | facts | correct | routing | absence |", "|---|---:|---:|---:|---:|"]
    for rel, counts in summary["verdicts"].items():
        total = sum(counts.values())
        cells = [
            f"{counts[v]} ({100 * counts[v] / total:.0f}%)" if total else "0" for v in ("correct", "routing", "absence")
        ]
        name = "**all**" if rel == "all" else rel
        lines.append(f"| {name} | {total} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_report(summary: dict) -> str:
    cfg = (summary.get("config") or {}).get("diagnosis") or {}
    facts = summary["facts"]
    lines = [
        f"# Census of {summary['model'] or 'a model'}",
        "",
        f"{facts['diagnosed']} facts diagnosed ({summary['n_layer']} blocks, {summary['n_head']} heads); "
        f"{facts['skipped_ambiguous']} ambiguous facts skipped"
        + (f"; not diagnosable: {facts['unusable']}" if facts["unusable"] else "")
        + ".",
        "",
        f"Rule: `routing` when the target is not the output's top-1 but its logit-lens rank is within "
        f"{cfg.get('routing_rank', '?')} after some block from block {_start(summary, cfg)} "
        f"(`routing_from` = {cfg.get('routing_from', '?')} of the stack) to the block before the last; "
        f"`absence` otherwise (docs/census.md).",
        "",
        "## What the model says",
        "",
        "`says`: the greedy continuation starts with the whole answer; `says_later`: the whole answer comes within "
        "the first few words (not a failure); `generic_first_piece`: the model misses the first piece and, fed it, "
        'goes on to another answer (" D" -> "akar" for Doha), so a repair would only teach the piece; '
        "`routing`/`absence`: the diagnosis' verdict of the rest (`correct`: every piece predicted, the answer not "
        "said at a word boundary). A multi-token answer is diagnosed at its first missed piece"
        + (f" (facts whose answer diverges, by piece: {_pieces(summary)})" if summary.get("divergence_piece") else "")
        + ".",
        "",
        outcome_table(summary),
        "",
        "## Verdicts per relation",
        "",
        verdict_table(summary),
        "",
        f"![verdicts per relation]({PLOTS['verdicts']})",
        "",
        "## What the new routing rule changed",
        "",
        "Old rule: routing if after any block 1 .. L-2 the target's lens logit beats the competitor's or its lens "
        "rank is within 10.",
        "",
        "| relation | verdicts moved | transitions |",
        "|---|---:|---|",
    ]
    for rel, moves in summary["rule_change"].items():
        text = ", ".join(f"{k}: {n}" for k, n in moves.items()) or "–"
        lines.append(f"| {'**all**' if rel == 'all' else rel} | {sum(moves.values())} | {text} |")
    layers = summary["prescribed_layers"]["all"]
    lines += [
        "",
        "## Prescribed layers (routing outcomes)",
        "",
        "| block | " + " | ".join(str(l) for l in range(len(layers))) + " |",
        "|---|" + "---:|" * len(layers),
        "| facts | " + " | ".join(str(n) for n in layers) + " |",
        "",
        f"![prescribed layers]({PLOTS['layers']})",
        "",
        "## Override heads (routing outcomes)",
        "",
        "| head | facts |",
        "|---|---:|",
    ]
    lines += [f"| block {h['layer']} head {h['head']} | {h['count']} |" for h in summary["top_override_heads"]]
    lines += [
        "",
        f"![override heads]({PLOTS['heads']})",
        "",
        "## Best lens rank before the last block",
        "",
        "| relation | " + " | ".join(summary["best_lens_rank"]["all"]) + " |",
        "|---|" + "---:|" * len(summary["best_lens_rank"]["all"]),
    ]
    for rel, bins in summary["best_lens_rank"].items():
        lines.append(f"| {'**all**' if rel == 'all' else rel} | " + " | ".join(str(n) for n in bins.values()) + " |")
    return "\n".join(lines) + "\n"


def _pieces(summary: dict) -> str:
    return ", ".join(f"piece {int(k) + 1}: {n}" for k, n in summary["divergence_piece"].items())


def _start(summary: dict, cfg: dict) -> str:
    try:
        return str(
            DiagnosisConfig(**{k: cfg[k] for k in ("routing_rank", "routing_from")}).routing_start(summary["n_layer"])
        )
    except (KeyError, TypeError):
        return "?"


# --------------------------------------------------------------------------------------------------
# Plots: built on Figure directly (no pyplot state), rendered with Agg.
# --------------------------------------------------------------------------------------------------

COLORS = {"correct": "#4c9a5b", "routing": "#d98c2b", "absence": "#9a9a9a"}


def verdicts_figure(summary: dict) -> Figure:
    """Stacked horizontal bars: each relation's facts split by verdict (counts)."""
    rels = [r for r in summary["verdicts"] if r != "all"]
    fig = Figure(figsize=(7.0, 0.5 * len(rels) + 1.4), dpi=90, layout="constrained")
    ax = fig.add_subplot()
    left = [0] * len(rels)
    for v in ("correct", "routing", "absence"):
        counts = [summary["verdicts"][r][v] for r in rels]
        ax.barh(rels, counts, left=left, color=COLORS[v], label=v)
        left = [a + b for a, b in zip(left, counts)]
    ax.invert_yaxis()
    ax.set_xlabel("facts")
    ax.set_title(f"Verdicts per relation — {summary['model']}")
    ax.legend(loc="lower right", fontsize="small")
    return fig


def layers_figure(summary: dict) -> Figure:
    """Histogram of prescribed layers over the routing facts, stacked by relation."""
    per = {r: c for r, c in summary["prescribed_layers"].items() if r != "all" and any(c)}
    fig = Figure(figsize=(7.0, 3.2), dpi=90, layout="constrained")
    ax = fig.add_subplot()
    bottom = [0] * summary["n_layer"]
    for rel, counts in per.items():
        ax.bar(range(summary["n_layer"]), counts, bottom=bottom, label=rel)
        bottom = [a + b for a, b in zip(bottom, counts)]
    ax.set_xticks(range(summary["n_layer"]))
    ax.set_xlabel("prescribed block (0-indexed)")
    ax.set_ylabel("routing facts")
    ax.set_title("Prescribed layer")
    if per:
        ax.legend(fontsize="small")
    return fig


def heads_figure(summary: dict) -> Figure:
    """Heatmap of override heads (block x head) over the routing facts."""
    grid = summary["override_heads"]
    fig = Figure(
        figsize=(1.6 + 0.45 * summary["n_head"], 1.2 + 0.22 * summary["n_layer"]), dpi=90, layout="constrained"
    )
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="Oranges", aspect="auto")
    fig.colorbar(image, ax=ax, label="routing facts")
    peak = max(max(row) for row in grid) or 1
    if summary["n_layer"] * summary["n_head"] <= 256:  # the count in each cell, readable up to 16 x 16
        for l, row in enumerate(grid):
            for h, n in enumerate(row):
                if n:
                    ax.text(
                        h, l, str(n), ha="center", va="center", fontsize=7, color="white" if n > peak / 2 else "black"
                    )
    ax.set_xticks(range(summary["n_head"]))
    ax.set_yticks(range(summary["n_layer"]))
    ax.set_xlabel("head")
    ax.set_ylabel("block (0-indexed)")
    ax.set_title("Override head")
    return fig
