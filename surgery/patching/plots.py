"""Matplotlib figures of activation and weight patching, for the CLI's ``--out`` and the app (``gr.Plot``).

As in :mod:`surgery.diagnosis.plots`: each function returns a new :class:`~matplotlib.figure.Figure` on the Agg canvas,
never through ``pyplot``, so no global figure state leaks between sessions or threads. Layers are labelled
1-indexed ("L3" = block 2), heads by module index.
"""

from __future__ import annotations

from matplotlib.figure import Figure

from ..arch import block_label
from ..diagnosis.plots import label_cells, new_figure
from .activations import KIND_DESCRIPTIONS, ActivationPatching
from .weights import WeightPatching


def patching_heatmap(result: ActivationPatching, kind: str) -> Figure:
    """Block x position (``resid``, ``attn``, ``mlp``) or block x head (``head``) heatmap of the fraction restored.

    Colours are centred on 0 and span at least [-1, 1]: 1 = the clean run's logit difference, 0 = the corrupted
    run's. Positions where the two prompts differ are labelled ``clean→corrupted``.
    """
    grid = result.grids[kind]
    values = grid.restored
    n_layer, width = len(values), len(values[0])
    if grid.axis == "head":
        labels = [f"H{h}" for h in range(width)]
    else:
        labels = [a if a == b else f"{a}→{b}" for a, b in zip(result.clean_tokens, result.corrupt_tokens)]
    fig = new_figure((min(14.0, max(5.0, 2.5 + 0.9 * width)), min(12.0, max(3.0, 1.6 + 0.45 * n_layer))))
    ax = fig.add_subplot()
    bound = max(1.0, max(abs(v) for row in values for v in row))
    image = ax.imshow(values, cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto")
    fig.colorbar(image, ax=ax, label="fraction of the logit difference restored")
    ax.set_xticks(
        range(width),
        labels,
        rotation=30 if grid.axis == "position" else 0,
        ha="right" if grid.axis == "position" else "center",
        fontsize="small",
    )
    ax.set_yticks(range(n_layer), [block_label(layer) for layer in range(n_layer)])
    ax.set_xlabel(grid.axis)
    ax.set_ylabel("layer")
    label_cells(ax, image, values, "{:.2f}")
    ax.set_title(
        f"Activation patching: {KIND_DESCRIPTIONS[kind]}\n{result.target.text!r} vs "
        f"{result.competitor.text!r}, {result.clean_prompt!r} → {result.corrupt_prompt!r}",
        fontsize="medium",
    )
    fig.supxlabel(
        f"L1 = block 0 ({result.blocks}.0) … {block_label(n_layer - 1)} = block {n_layer - 1}",
        fontsize="x-small",
        color="dimgray",
    )
    return fig


def weight_patching_chart(result: WeightPatching, top: int = 20) -> Figure:
    """Horizontal bars: mean target-logit change of the ``top`` components with the largest |change|, each
    labelled with the facts right on its hybrid (recipient's count and, for donor patching, the donor's in the
    title)."""
    comps = sorted(result.components, key=lambda c: -abs(c.mean_target_logit_change))[:top]
    fig = new_figure((7.0, max(2.5, 1.2 + 0.35 * len(comps))))
    ax = fig.add_subplot()
    labels = [f"{block_label(c.layer, c.head)} {c.name}" for c in comps]
    values = [c.mean_target_logit_change for c in comps]
    ax.barh(range(len(comps)), values, color=["tab:blue" if v >= 0 else "tab:red" for v in values])
    ax.set_yticks(range(len(comps)), labels)
    ax.invert_yaxis()
    for i, c in enumerate(comps):
        ax.annotate(
            f"{c.facts_correct}/{result.facts_total}",
            (values[i], i),
            xytext=(3 if values[i] >= 0 else -3, 0),
            textcoords="offset points",
            ha="left" if values[i] >= 0 else "right",
            va="center",
            fontsize="x-small",
        )
    ax.axvline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("mean change of the target logit vs the recipient")
    what = "donor's weights" if result.mode == "donor" else f"{result.mode}-ablated weights"
    donor = "" if result.donor_correct is None else f", donor {result.donor_correct}/{result.facts_total}"
    ax.set_title(
        f"Weight patching ({what}): facts right — recipient {result.recipient_correct}/{result.facts_total}{donor}",
        fontsize="medium",
    )
    return fig
