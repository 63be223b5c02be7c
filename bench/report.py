"""Results as markdown tables (for bench/README.md), the machine they were measured on, and a plot."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path

from .measure import THREADS

MARK_START, MARK_END = "<!-- results:start -->", "<!-- results:end -->"


def machine() -> dict:
    import torch
    import transformers

    cpu = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    try:
        import transformer_lens

        tl = getattr(transformer_lens, "__version__", None) or _dist_version("transformer-lens")
    except ImportError:
        tl = None
    return {
        "nproc": int(subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip() or 0),
        "cpu": cpu.group(1).strip() if cpu else platform.processor(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "transformer_lens": tl,
        "python": platform.python_version(),
        "threads": THREADS,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "gpu": "not available in this session",
    }


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _mib(x: float) -> str:
    return f"{x:,.1f}" if abs(x) < 10 else f"{x:,.0f}"


def _ms(s: dict) -> str:
    f = ",.1f" if s["median"] < 0.01 else ",.0f"
    return f"{s['median'] * 1e3:{f}} ({s['min'] * 1e3:{f}}–{s['max'] * 1e3:{f}})"


def diagnosis_table(res: dict) -> str:
    lines = [
        "| prompt tokens | HF forward ms | ours ms | TransformerLens ms | **ours / HF** | **TL / ours** | "
        "CPU-time ours / HF, TL / ours | peak MiB HF / ours / TL | **TL / ours peak** |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in res["rows"]:
        t = row["time"]
        w = {k: v["wall"]["median"] for k, v in t.items()}
        c = {k: v["cpu"]["median"] for k, v in t.items()}
        mem = row.get("memory")
        peak = " / ".join(_mib(mem[k]["transient"]) for k in ("hf", "ours", "tl")) if mem else "–"
        mem_ratio = (
            f"{mem['tl']['transient'] / mem['ours']['transient']:.1f}×"
            if mem and mem["ours"]["transient"] >= 1
            else "–"
        )  # below 1 MiB: page-size noise
        lines.append(
            f"| {row['length']} | {_ms(t['hf']['wall'])} | {_ms(t['ours']['wall'])} | {_ms(t['tl']['wall'])} | "
            f"**{w['ours'] / w['hf']:.2f}×** | **{w['tl'] / w['ours']:.2f}×** | "
            f"{c['ours'] / c['hf']:.2f}×, {c['tl'] / c['ours']:.2f}× | {peak} | **{mem_ratio}** |"
        )
    return "\n".join(lines)


def batch_table(res: dict) -> str:
    base = res["rows"]["one at a time"]["prompts_per_s"]
    lines = ["| mode | seconds for all | prompts / s | speed-up |", "|---|---:|---:|---:|"]
    for name, row in res["rows"].items():
        w = row["wall"]
        lines.append(
            f"| {name} | {w['median']:.2f} ({w['min']:.2f}–{w['max']:.2f}) | {row['prompts_per_s']:.1f} | "
            f"{row['prompts_per_s'] / base:.1f}× |"
        )
    return "\n".join(lines)


STEP_LABELS = {
    "wv": "surgery `wv` (V slice)",
    "attn": "surgery `attn`",
    "mlp": "surgery `mlp`",
    "layer": "surgery `layer`",
    "full": "full fine-tuning (all parameters)",
    "naive-wv": "naive masked `wv` (full forward every step)",
}


def steps_table(res: dict) -> str:
    rows, mem = res["rows"], res.get("memory", {})
    full_w, full_c = rows["full"]["wall"]["median"], rows["full"]["cpu"]["median"]
    inf = mem.get("inference", {}).get("total")
    lines = [
        "| method | trainable parameters | ms / step | **× full FT step** | CPU-time × full | "
        "peak MiB (total) | **× inference peak** |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        m = mem.get(name)
        lines.append(
            f"| {STEP_LABELS[name]} | {row['params']:,} | {_ms(row['wall'])} | "
            f"**{row['wall']['median'] / full_w:.3f}×** | {row['cpu']['median'] / full_c:.3f}× | "
            f"{m['total']:,.0f} | **{m['total'] / inf:.2f}×** |"
            if m and inf
            else f"| {STEP_LABELS[name]} | {row['params']:,} | {_ms(row['wall'])} | "
            f"**{row['wall']['median'] / full_w:.3f}×** | {row['cpu']['median'] / full_c:.3f}× | – | – |"
        )
    if inf:
        lines.append(f"| inference (plain forward of the same batch) | – | – | – | – | {inf:,.0f} | 1.00× |")
    return "\n".join(lines)


def operation_table(ops: list[dict]) -> str:
    lines = ["| model | block | steps run (budget) | facts fixed | wall time s |", "|---|---:|---:|---|---:|"]
    for op in ops:
        lines.append(
            f"| {op['model']} | {op['layer']} | {op['steps']} ({op['epochs_budget']}) | {op['fixed']} | "
            f"{op['wall_s']:.1f} |"
        )
    return "\n".join(lines)


def markdown(results: dict) -> str:
    m = results["machine"]
    out = [
        f"Measured {results['date']} with `{results['command']}` — {m['nproc']} CPU cores ({m['cpu']}), "
        f"torch {m['torch']}, transformers {m['transformers']}, transformer-lens {m['transformer_lens']}, "
        f"Python {m['python']}, torch threads {m['threads']}, OMP_WAIT_POLICY={m['omp_wait_policy']}. "
        f"GPU: {m['gpu']}. Load average at start / end: {results['load_start']} / {results['load_end']} "
        f"(other jobs shared the machine: compare the ratios, not the absolute times).",
    ]
    for key, res in results.get("diagnosis", {}).items():
        out += [
            "",
            f"### Diagnosis latency and peak memory — {key}",
            "",
            f"Median wall time (min–max) over interleaved repeats; peak = extra resident memory during one call "
            f"above the loaded model. TransformerLens' head attributions and lens logits match ours to "
            f"{res['tl_max_abs_diff']:.1e}.",
            "",
            diagnosis_table(res),
        ]
    for key, res in results.get("batch", {}).items():
        out += [
            "",
            f"### Batch diagnosis — {key}, {res['n']} fact prompts of {res['prompt_tokens'][0]}–"
            f"{res['prompt_tokens'][1]} tokens",
            "",
            batch_table(res),
        ]
    for key, res in results.get("steps", {}).items():
        out += [
            "",
            f"### Surgery optimisation step — {key}, block {res['layer']} ({res['layer_reason']})",
            "",
            steps_table(res),
        ]
    if results.get("operations"):
        out += [
            "",
            "### Whole 8-fact `wv` operation (`operate`: diagnosis, training, panels, report)",
            "",
            operation_table(results["operations"]),
        ]
    return "\n".join(out) + "\n"


def update_readme(readme: Path, text: str) -> None:
    """Replace the text between the results markers of ``readme`` (left alone when the markers are absent)."""
    if not readme.is_file():
        return
    body = readme.read_text()
    start, end = body.find(MARK_START), body.find(MARK_END)
    if start < 0 or end < start:
        return
    readme.write_text(body[: start + len(MARK_START)] + "\n" + text + body[end:])


def plot_diagnosis(res: dict, path: Path) -> None:
    """Latency vs prompt length (log-log) for the three cases, and the two ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [r["length"] for r in res["rows"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=90)
    for case, label in (("hf", "plain HF forward"), ("ours", "ours (diagnose)"), ("tl", "TransformerLens")):
        a.plot(lengths, [r["time"][case]["wall"]["median"] for r in res["rows"]], marker="o", label=label)
    a.set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="seconds (median)", title="Diagnosis latency")
    a.legend(fontsize=8)
    b.plot(
        lengths,
        [r["time"]["ours"]["wall"]["median"] / r["time"]["hf"]["wall"]["median"] for r in res["rows"]],
        marker="o",
        label="ours / HF forward (target ≤ 1.0)",
    )
    b.plot(
        lengths,
        [r["time"]["tl"]["wall"]["median"] / r["time"]["ours"]["wall"]["median"] for r in res["rows"]],
        marker="s",
        label="TransformerLens / ours (target ≥ 1.5)",
    )
    b.axhline(1.0, color="grey", lw=0.8, ls="--")
    b.axhline(1.5, color="grey", lw=0.8, ls=":")
    b.set(xscale="log", xlabel="prompt tokens", ylabel="ratio", title="Ratios (same run)")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":  # re-render a results JSON: python -m bench.report bench/results/full.json
    import json
    import sys

    here = Path(__file__).resolve().parent
    results = json.loads(Path(sys.argv[1]).read_text())
    text = markdown(results)
    Path(sys.argv[1]).with_suffix(".md").write_text(text)
    if results["command"] == "python -m bench":
        update_readme(here / "README.md", text)
    print(text)
