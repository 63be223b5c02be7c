"""An :class:`~surgery.edit.compare.EditorComparison` as a reader sees it: a Markdown page and a figure."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..arch import block_label
from ..diagnosis.plots import new_figure
from .compare import LISTS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .compare import EditorComparison

COLUMNS = (
    "",
    "layer",
    *LISTS.values(),
    "fluency",
    "KL unrelated",
    "perplexity",
    "params changed",
    "ΔL2",
    "wall time",
    "peak memory",
)


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _count(row: dict, name: str, when: str) -> str:
    """``said/total (first-token)``; relation, general and the specificity lists add what the edit broke (and for
    the relation what it fixed)."""
    total = row.get(f"{name}_total", 0)
    if not total:
        return "—"
    cell = f"{row[f'{name}_{when}']}/{total} ({row[f'{name}_first_token_{when}']})"
    if when == "after" and name == "relation":
        cell += f" +{row['relation_fixed']} −{row['relation_broken']}"
    elif when == "after" and row.get(f"{name}_broken"):
        cell += f" −{row[f'{name}_broken']}"
    return cell


def _number(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _base_cells(c: EditorComparison) -> list[str]:
    row = {k if k.endswith("_total") else f"{k}_before": v for k, v in c.base.items()}
    return [
        "base model",
        "",
        *(_count(row, name, "before") for name in LISTS),
        _number(row.get("fluency_before"), ".3f"),
        "0",
        _number(row.get("perplexity_before"), ".2f"),
        "0",
        "0",
        f"{c.base_evaluation_s:.1f} s (once)",
        "",
    ]


def _run_cells(run) -> list[str]:
    if not run.ok:
        return [f"**{run.name}**", f"failed: {run.error}"] + [""] * (len(COLUMNS) - 2)
    f = run.figures()
    memory = f"+{run.memory.increase_mib:,.0f} MiB (peak {run.memory.peak_mib:,.0f})"
    if run.memory.cuda_peak_mib is not None:
        memory += f"; GPU {run.memory.cuda_peak_mib:,.0f} MiB"
    return [
        f"**{run.name}**",
        str(f["layer"]),
        *(_count(f, name, "after") for name in LISTS),
        _number(f["fluency_after"], ".3f"),
        _number(f["kl_unrelated"], ".2e"),
        _number(f["perplexity_after"], ".2f"),
        f"{f['params_changed']:,} of {f['params']:,}",
        f"{f['delta_l2']:.3f}",
        f"{f['wall_time_s']:.1f} s",
        memory,
    ]


def comparison_markdown(c: EditorComparison, title: str) -> str:
    """The comparison table with the base model's row first, each run's layer and why, and how to read it."""
    rows = [_base_cells(c)] if c.base else []
    rows += [_run_cells(r) for r in c.runs]
    layer = "auto: each method's own choice (below)" if c.layer is None else f"block {c.layer}, given"
    lines = [
        f"# {title}",
        "",
        f"{len(c.facts)} facts, the same base model, panel and evaluation for every method; layer: {layer}.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
        *("| " + " | ".join(_md(cell) for cell in row) + " |" for row in rows),
        "",
        "## Layers",
        "",
    ]
    for r in c.runs:
        if r.ok:
            f = r.figures()
            lines.append(
                f"- **{r.name}**: site {f['site']} of block {f['layer']} ({block_label(f['layer'])}): "
                f"{_md(f['layer_reason'])}"
            )
        else:
            lines.append(f"- **{r.name}**: failed after {r.wall_time_s:.1f} s: {_md(r.error or '')}")
    how = next((r.memory.how for r in c.runs), "")
    lines += [
        "",
        "## How to read it",
        "",
        "- Every list is judged by what the model *says* (greedy generation; the whole answer at a word boundary): "
        "`said/total`, with the first-token count (the top-1 next token is the answer's first token) in brackets "
        "as a diagnostic. The base model's row is before any edit; each method's row is after its edit.",
        "- **efficacy**: the edited facts; **paraphrase**: the same facts in other wordings; **unedited facts of "
        "the relation**: the panel's facts of the same relation that were not edited (+ fixed by the edit, − broken "
        "by it); **neighbourhood** and **side effects**: probes whose answers must not move (specificity; − broken); "
        "**general**: general-knowledge probes (− broken).",
        "- **fluency**: mean n-gram entropy of greedy generations (lower than the base: repetitive text); "
        "**KL unrelated**: mean KL(base ‖ edited) of next-token distributions on the unrelated text; "
        "**perplexity**: on the panel's held-out passage.",
        "- **params changed**: weights whose value differs from the base, of the weights the method may change; "
        "**ΔL2**: the L2 norm of the change. Every other tensor is bitwise the base's (each method's report.json).",
        f"- **wall time**: the whole `operate` (diagnosis, edit, evaluation of the edited model); the base model's "
        f"evaluation is computed once ({c.base_evaluation_s:.1f} s) and shared by every method.",
        f"- **peak memory**: {how}; `+N MiB` is the peak above the resident set when the method started (its own "
        "share), `peak` the process-wide peak, which includes the loaded model.",
        "- Each method's folder holds its `patch.safetensors` (apply it with `python -m surgery apply-patch`), "
        "its `report.json` and its model card `README.md`.",
        "",
    ]
    return "\n".join(lines)


def comparison_figure(c: EditorComparison) -> Figure:
    """Top: the share said right of every list that has probes, by generation (bars) with the first-token share
    (dots), the base model first and then each method that succeeded; bottom: ΔL2, KL on the unrelated text and
    wall time per method."""
    ok = [r for r in c.runs if r.ok]
    names = [name for name in LISTS if c.base.get(f"{name}_total")]
    fig = new_figure((max(7.0, 1.4 * len(names) + 3), 7.0))
    grid = fig.add_gridspec(2, 3, height_ratios=(3, 2))
    ax = fig.add_subplot(grid[0, :])
    series = [("base model", {k if k.endswith("_total") else f"{k}_after": v for k, v in c.base.items()})]
    series += [(r.name, r.figures()) for r in ok]
    width = 0.8 / max(1, len(series))
    for i, (label, row) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(names))]
        said = [row[f"{n}_after"] / row[f"{n}_total"] for n in names]
        first = [row[f"{n}_first_token_after"] / row[f"{n}_total"] for n in names]
        bars = ax.bar(xs, said, width, label=label)
        ax.plot(xs, first, "o", color=bars.patches[0].get_facecolor() if bars.patches else None, mec="black", ms=4)
    ax.set_xticks(range(len(names)), [LISTS[n] for n in names], fontsize="small")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share said right")
    ax.set_title("said by generation (bars), first token (dots)", fontsize="medium")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside upper center", fontsize="small", ncols=len(series))
    labels = [r.name for r in ok]
    small = (
        ("delta_l2", "ΔL2", False),
        ("kl_unrelated", "KL on unrelated text", True),
        ("wall_time_s", "wall time (s)", False),
    )
    for k, (key, title, log) in enumerate(small):
        sub = fig.add_subplot(grid[1, k])
        values = [r.figures()[key] or 0.0 for r in ok]
        sub.bar(range(len(ok)), values, color=[f"C{i + 1}" for i in range(len(ok))])
        sub.set_xticks(range(len(ok)), labels, fontsize="small")
        sub.set_title(title, fontsize="small")
        if log and any(v > 0 for v in values):
            sub.set_yscale("log")
    if c.failed:
        ax.set_title(f"{ax.get_title()}; failed: {', '.join(c.failed)}", fontsize="medium", color="C3")
    return fig
