"""``python -m bench.gemma``: the benchmarks on the real model, Gemma 3 270M, on 2 CPU threads.

Three sections (``--only`` picks some), all on ``load_model("gemma3-270m")`` (fp32, 18 blocks, vocabulary
262,144 x d_model 640):

* ``diagnosis``: a plain HF forward vs ``surgery.diagnosis.diagnose.diagnose`` vs TransformerLens' ``TransformerBridge``
  (idiomatic full cache, and a lean cache of the needed hooks at the last position) at 8 / 128 / 512 tokens,
  with the peak memory of each in a fresh subprocess (:mod:`bench.diagnosis`, :mod:`bench.measure`);
* ``surgery``: one optimisation step of each site at the block ``--layer auto`` prescribes, against a naive masked
  ``wv`` step and a full fine-tuning step, and their memory (:mod:`bench.training`);
* ``operation``: the whole 8-fact ``wv`` ``operate`` (diagnosis, training, panels, report), wall time per stage,
  a cProfile and a torch.profiler table (:mod:`bench.operation`).

Writes ``bench/results/gemma.json`` and ``gemma.md`` (``--quick``: ``gemma-quick.*``; ``--only``:
``gemma-<section>.*``). OpenMP workers wait passively, as in ``python -m bench``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from . import diagnosis, operation, report, training  # noqa: E402
from .measure import THREADS  # noqa: E402

HERE = Path(__file__).resolve().parent
MODEL = "gemma3-270m"
SECTIONS = ("diagnosis", "surgery", "operation")
FULL = {
    "lengths": [8, 128, 512],
    "repeats": {8: 9, 128: 7, 512: 5},
    "memory": True,
    "step_repeats": 3,
    "steps": 2,
    "operation_repeats": 3,
    "profile": True,
}
QUICK = {
    "lengths": [8, 128],
    "repeats": {8: 2, 128: 2},
    "memory": False,
    "step_repeats": 1,
    "steps": 1,
    "operation_repeats": 1,
    "profile": False,
}
LENS_LABELS = {"hf": "HF forward", "ours": "ours", "tl": "TransformerLens", "tl-lean": "TL lean cache"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gemma", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smallest cases only, no memory, no profiles")
    parser.add_argument("--only", choices=SECTIONS, action="append", help="run only this section (repeatable)")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for the JSON and markdown")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(THREADS)
    plan = QUICK if args.quick else FULL
    sections = args.only or list(SECTIONS)
    mode = "gemma" + ("-quick" if args.quick else "") + "".join(f"-{s}" for s in args.only or [])
    command = (
        "python -m bench.gemma" + (" --quick" if args.quick else "") + "".join(f" --only {s}" for s in args.only or [])
    )
    results: dict = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": report.machine(),
        "load_start": report.load_average(),
    }
    print(f"bench.gemma ({mode}) on {results['machine']['cpu']}, {THREADS} threads; load {results['load_start']}")
    start = time.perf_counter()
    if "diagnosis" in sections:
        print(f"\n== diagnosis: {MODEL}")
        results["diagnosis"] = diagnosis.run(plan["lengths"], plan["repeats"], plan["memory"], MODEL, lean=True)
        results["load_after_diagnosis"] = report.load_average()
    if "surgery" in sections:
        print(f"\n== surgery steps: {MODEL}")
        results["steps"] = training.run_steps(MODEL, plan["step_repeats"], plan["steps"], plan["memory"])
        results["load_after_surgery"] = report.load_average()
    if "operation" in sections:
        print(f"\n== operate: {MODEL}")
        j = training.job(MODEL)
        results["operation"] = operation.breakdown(
            j.model, j.tokenizer, j.facts, j.panel, repeats=plan["operation_repeats"], profile=plan["profile"]
        )
        del j
    results["load_end"] = report.load_average()
    results["elapsed_s"] = time.perf_counter() - start
    text = markdown(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{mode}.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / f"{mode}.md").write_text(text)
    print(f"\n{text}\nwritten to {args.out}/{mode}.json and {mode}.md in {results['elapsed_s']:.0f} s")
    return 0


# --------------------------------------------------------------------------------------------------
# Markdown.
# --------------------------------------------------------------------------------------------------


def diagnosis_table(res: dict) -> str:
    """Times, the target ratios (ours / HF, TL / ours, TL lean / ours) and transient peak memory per length."""
    lines = [
        "| prompt tokens | HF forward ms | ours ms | TL ms | TL lean ms | **ours / HF** | **TL / ours** | "
        "TL lean / ours | CPU-time ours / HF, TL / ours | peak MiB HF / ours / TL / TL lean | "
        "**TL / ours peak** |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in res["rows"]:
        t = row["time"]
        w = {k: v["wall"]["median"] for k, v in t.items()}
        c = {k: v["cpu"]["median"] for k, v in t.items()}
        mem = row.get("memory")
        peak = " / ".join(report._mib(mem[k]["transient"]) for k in LENS_LABELS if k in mem) if mem else "–"
        ratio = f"{mem['tl']['transient'] / mem['ours']['transient']:.1f}×" if mem else "–"
        lean = t.get("tl-lean")
        lines.append(
            f"| {row['length']} | {report._ms(t['hf']['wall'])} | {report._ms(t['ours']['wall'])} | "
            f"{report._ms(t['tl']['wall'])} | {report._ms(lean['wall']) if lean else '–'} | "
            f"**{w['ours'] / w['hf']:.2f}×** | **{w['tl'] / w['ours']:.2f}×** | "
            f"{(w['tl-lean'] / w['ours']) if lean else float('nan'):.2f}× | "
            f"{c['ours'] / c['hf']:.2f}×, {c['tl'] / c['ours']:.2f}× | {peak} | **{ratio}** |"
        )
    return "\n".join(lines)


def markdown(results: dict) -> str:
    m = results["machine"]
    loads = " / ".join(
        results[k] for k in ("load_start", "load_after_diagnosis", "load_after_surgery", "load_end") if k in results
    )
    out = [
        f"Measured {results['date']} with `{results['command']}` — {m['nproc']} CPU cores ({m['cpu']}), "
        f"torch {m['torch']}, transformers {m['transformers']}, transformer-lens {m['transformer_lens']}, "
        f"Python {m['python']}, torch threads {m['threads']}, OMP_WAIT_POLICY={m['omp_wait_policy']}. "
        f"Load average (1/5/15 min) at start / after each section: {loads}."
    ]
    if "diagnosis" in results:
        res = results["diagnosis"]
        out += [
            "",
            "### Diagnosis latency and peak memory — Gemma 3 270M",
            "",
            "Median wall time (min–max) over interleaved repeats; peak = extra resident memory during one call "
            "above the loaded model (fresh subprocess per case, VmHWM after a reset). TransformerLens' head "
            f"attributions and lens logits match ours to {res['tl_max_abs_diff']:.1e} "
            f"({res.get('tl_max_rel_diff', float('nan')):.0e} of the largest lens logit); lens ranks equal.",
            "",
            diagnosis_table(res),
        ]
    if "steps" in results:
        res = results["steps"]
        out += [
            "",
            f"### Surgery optimisation step — Gemma 3 270M, block {res['layer']}",
            "",
            f"Block chosen as `--layer auto` does: {res['layer_reason']}.",
            "",
            report.steps_table(res),
        ]
        rows = res["rows"]
        out += [
            "",
            "`wv` step / naive masked `wv` step: "
            f"**{rows['wv']['wall']['median'] / rows['naive-wv']['wall']['median']:.3f}×** "
            f"(CPU time {rows['wv']['cpu']['median'] / rows['naive-wv']['cpu']['median']:.3f}×).",
        ]
    if "operation" in results:
        res = results["operation"]
        r0 = res["runs"][0]
        out += [
            "",
            "### Whole 8-fact `wv` operation — Gemma 3 270M",
            "",
            f"`operate` with `--layer auto` (block {r0['layer']}), {r0['steps']} step(s) of a "
            f"{r0['epochs_budget']}-step budget, facts fixed {r0['fixed']}: **{res['wall']['median']:.1f} s** "
            f"median ({res['wall']['min']:.1f}–{res['wall']['max']:.1f}) over {len(res['runs'])} runs after a "
            f"warm-up. Stage times are medians over the runs.",
            "",
            operation.stages_table(res),
        ]
        if "cprofile" in res:
            out += [
                "",
                "<details><summary>cProfile of one operate (by own time)</summary>",
                "",
                "```",
                res["cprofile"].rstrip(),
                "```",
                "</details>",
                "",
                "<details><summary>torch.profiler of one operate (by self CPU time)</summary>",
                "",
                "```",
                res["torch_profile"].rstrip(),
                "```",
                "</details>",
            ]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
