"""``python -m bench [--quick]``: every benchmark in one run; results in bench/results/ (and bench/README.md).

Torch runs with 2 threads. OpenMP workers wait passively (``OMP_WAIT_POLICY=PASSIVE`` unless already set): on a
machine shared with other jobs, spinning workers steal each other's cores and make timings erratic; on an idle
machine the difference is small.
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

from . import batch, diagnosis, models, report, training  # noqa: E402
from .measure import THREADS  # noqa: E402

HERE = Path(__file__).resolve().parent
SECTIONS = ("diagnosis", "batch", "surgery")

FULL = {
    "lengths": [8, 128, 512, 1024],
    "repeats": {8: 15, 128: 9, 512: 5, 1024: 5},
    "memory": True,
    "batch_n": 256,
    "batch_repeats": 3,
    "batch_sizes": (8, 32, 128),
    "step_repeats": 3,
    "steps": 2,
    "operation_epochs": {"gpt2-shaped": 20},
}
QUICK = {
    "lengths": [8, 128],
    "repeats": {8: 3, 128: 3},
    "memory": False,
    "batch_n": 32,
    "batch_repeats": 1,
    "batch_sizes": (32,),
    "step_repeats": 1,
    "steps": 1,
    "operation_epochs": {"gpt2-shaped": 2},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smallest cases only (a few minutes)")
    parser.add_argument("--only", choices=SECTIONS, action="append", help="run only this section (repeatable)")
    parser.add_argument("--models", default="gpt2-shaped,demo", help="comma-separated: gpt2-shaped, demo")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for the JSON and markdown")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(THREADS)
    plan = QUICK if args.quick else FULL
    sections = args.only or list(SECTIONS)
    names = [m for m in args.models.split(",") if m]
    if "demo" in names and models.demo() is None:
        print("assets/demo-model is not there: skipping the demo model", file=sys.stderr)
        names.remove("demo")
    mode = ("quick" if args.quick else "full") + "".join(f"-{s}" for s in args.only or [])  # full.json: all
    command = "python -m bench" + (" --quick" if args.quick else "") + "".join(f" --only {s}" for s in args.only or [])
    results: dict = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": report.machine(),
        "load_start": report.load_average(),
    }
    print(f"bench ({mode}) on {results['machine']['cpu']}, {THREADS} threads; load {results['load_start']}")
    start = time.perf_counter()
    if "diagnosis" in sections:
        results["diagnosis"] = {}
        for name in names:
            print(f"\n== diagnosis: {name}")
            results["diagnosis"][name] = diagnosis.run(plan["lengths"], plan["repeats"], plan["memory"], name)
    if "batch" in sections:
        results["batch"] = {}
        for name in names:
            print(f"\n== batch diagnosis: {name}")
            results["batch"][name] = batch.run(name, plan["batch_n"], plan["batch_repeats"], plan["batch_sizes"])
    if "surgery" in sections:
        results["steps"], results["operations"] = {}, []
        for name in names:
            print(f"\n== surgery: {name}")
            results["steps"][name] = training.run_steps(name, plan["step_repeats"], plan["steps"], plan["memory"])
        for name in reversed(names):  # the demo model first: it is the one that must take seconds
            results["operations"].append(training.run_operation(name, plan["operation_epochs"].get(name)))
    results["load_end"] = report.load_average()
    results["elapsed_s"] = time.perf_counter() - start
    text = report.markdown(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{mode}.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / f"{mode}.md").write_text(text)
    if mode == "full" and names == ["gpt2-shaped", "demo"]:  # only a complete run replaces the README's tables
        report.update_readme(HERE / "README.md", text)
        if "gpt2-shaped" in results.get("diagnosis", {}):
            report.plot_diagnosis(results["diagnosis"]["gpt2-shaped"], HERE / "diagnosis.png")
    print(f"\n{text}\nwritten to {args.out}/{mode}.json and {mode}.md in {results['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
