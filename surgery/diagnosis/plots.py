"""Matplotlib figures of the head diagnostics, for the app (``gr.Plot``) and for reports.

Every function returns a new :class:`matplotlib.figure.Figure` built directly — never through ``pyplot`` — so no
global figure state exists to leak between sessions or threads; rendering uses the Agg canvas. Layers are
labelled 1-indexed as in the reference write-up ("L10 H8"), heads by their module index, and each caption names
the module ("L10 = block 9", e.g. ``transformer.h.9``).
"""

from __future__ import annotations

import math

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.patches import Rectangle

from ..arch import block_label
from .diagnose import Diagnosis
from .static_heads import HeadStats, layer_key_response
from .token_classes import TOKEN_CLASSES

ANNOTATE_MAX_CELLS = 256  # write the value in each cell up to 16 x 16 heads


def qk_overlap_heatmap(table: list[HeadStats]) -> Figure:
    """Layer x head heatmap of the QK overlap (0..1) from :func:`surgery.diagnosis.static_heads.head_table`."""
    grid = _grid(table, lambda s: s.qk_overlap)
    fig, ax = _figure(len(grid), len(grid[0]))
    image = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    fig.colorbar(image, ax=ax, label="|top-k(W_Q) ∩ top-k(W_K)| / k")
    label_cells(ax, image, grid, "{:.2f}")
    ax.set_title("QK overlap per head")
    _caption(fig, len(grid))
    return fig


def key_response_plot(table: list[HeadStats]) -> Figure:
    """Mean key response ``||W_K^T ln_1(e)||`` by token class, averaged over each layer's heads."""
    per_class = layer_key_response(table)
    n_layer = len(next(iter(per_class.values())))
    fig = new_figure((7.0, 4.0))
    ax = fig.add_subplot()
    layers = list(range(1, n_layer + 1))
    for name in TOKEN_CLASSES:
        values = [math.nan if v is None else v for v in per_class[name]]
        ax.plot(layers, values, marker="o", label=name.replace("_", " "))
    ax.set_xticks(layers, [block_label(layer - 1) for layer in layers])
    ax.set_xlabel("layer")
    ax.set_ylabel("mean key norm (mean over heads)")
    ax.set_title("Key response by token class")
    ax.legend(fontsize="small")
    _caption(fig, n_layer)
    return fig


def attribution_heatmap(d: Diagnosis) -> Figure:
    """Per-head direct logit attribution of target - competitor; the override head is boxed."""
    grid = d.head_matrix("diff")
    fig, ax = _figure(d.n_layer, d.n_head)
    bound = max(1e-6, max(abs(v) for row in grid for v in row))
    image = ax.imshow(grid, cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto")
    fig.colorbar(image, ax=ax, label="target − competitor logit")
    label_cells(ax, image, grid, "{:+.1f}")
    o = d.override
    ax.add_patch(_box(o["head"], o["layer"]))
    ax.set_title(
        f"Per-head attribution, {d.target.text!r} − {d.competitor.text!r}\n"
        f"(boxed: override {d.label(o['layer'], o['head'])})",
        fontsize="medium",
    )
    _caption(fig, d.n_layer)
    return fig


def cumulative_logit_plot(d: Diagnosis) -> Figure:
    """Logit lens: target and competitor logits after the embeddings and after each block."""
    fig = new_figure((7.0, 4.0))
    ax = fig.add_subplot()
    x = list(range(len(d.logit_lens)))
    ax.plot(x, [e.target_logit for e in d.logit_lens], marker="o", label=f"target {d.target.text!r}")
    ax.plot(x, [e.competitor_logit for e in d.logit_lens], marker="s", label=f"competitor {d.competitor.text!r}")
    ax.axvline(d.prescribed_layer + 1, color="grey", linestyle=":", label=f"prescribed {d.label(d.prescribed_layer)}")
    ax.set_xticks(x, ["emb" if e.layer is None else d.label(e.layer) for e in d.logit_lens])
    ax.set_xlabel("residual after")
    ax.set_ylabel("logit (final norm + unembedding)")
    _clip_outliers(ax, [v for e in d.logit_lens for v in (e.target_logit, e.competitor_logit)])
    ax.set_title(f"Cumulative logit by layer — {d.verdict}")
    ax.legend(fontsize="small")
    _caption(fig, d.n_layer)
    return fig


# --------------------------------------------------------------------------------------------------


def new_figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)  # attach the Agg canvas: savefig/draw without pyplot or a GUI backend
    return fig


def _figure(n_layer: int, n_head: int) -> tuple[Figure, Axes]:
    fig = new_figure((min(14.0, max(6.0, 2.5 + 0.6 * n_head)), min(12.0, max(3.5, 1.8 + 0.4 * n_layer))))
    ax = fig.add_subplot()
    ax.set_xticks(range(n_head), [f"H{h}" for h in range(n_head)])
    ax.set_yticks(range(n_layer), [block_label(layer) for layer in range(n_layer)])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    return fig, ax


def _grid(table: list[HeadStats], value) -> list[list[float]]:
    n_layer = max(s.layer for s in table) + 1
    n_head = max(s.head for s in table) + 1
    grid = [[math.nan] * n_head for _ in range(n_layer)]
    for s in table:
        grid[s.layer][s.head] = value(s)
    return grid


def label_cells(ax: Axes, image: AxesImage, grid: list[list[float]], fmt: str) -> None:
    """Write each value of a layer x column grid in its cell, white on dark colours (small grids only)."""
    if len(grid) * len(grid[0]) > ANNOTATE_MAX_CELLS:
        return
    for layer, row in enumerate(grid):
        for head, v in enumerate(row):
            r, g, b, _ = image.cmap(image.norm(v))
            color = "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"
            ax.text(head, layer, fmt.format(v), ha="center", va="center", fontsize="x-small", color=color)


def _clip_outliers(ax: Axes, values: list[float], factor: float = 4.0) -> None:
    """Keep the y-axis on the bulk of the lens: a first row far off-scale (the final norm applied to bare
    embeddings gives Gemma's logits in the hundreds) would flatten every other row to a line. Such points leave
    the chart, and the axis label says so."""
    ordered = sorted(values)
    lo, hi = ordered[len(ordered) // 10], ordered[-(len(ordered) // 10) - 1]  # 10th..90th percentile
    span = max(hi - lo, 1e-6)
    if ordered[0] < lo - factor * span or ordered[-1] > hi + factor * span:
        ax.set_ylim(lo - span, hi + span)
        ax.set_ylabel(ax.get_ylabel() + "\n(off-scale rows clipped)", fontsize="small")


def _box(head: int, layer: int) -> Rectangle:
    return Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2)


def _caption(fig: Figure, n_layer: int) -> None:
    last = n_layer - 1
    fig.supxlabel(
        f"Layers 1-indexed as in the reference write-up: L1 = block 0 … "
        f"{block_label(last)} = block {last}\nheads by module index",
        fontsize="x-small",
        color="dimgray",
    )
