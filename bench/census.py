"""Census throughput on Gemma 3 270M: facts per second batched vs one at a time (vs TransformerLens if installed).

    .venv/bin/python -m bench.census [--facts 64] [--batch-size 128 | 32,64,128] [--threads 2] [--repeats 2]

The same clean facts (the first ``--facts`` of each bundled relation in turn) are diagnosed three ways in one
process, interleaved over ``--repeats`` rounds so that a machine shared with other jobs slows every case alike:

* **batched** — what ``python -m surgery census`` does: :func:`surgery.census.run.diagnose_facts`, ``--batch-size``
  facts per forward pass (several sizes, comma-separated, give a case each);
* **one at a time** — the same function, one fact per call;
* **TransformerLens** — the same numbers the TransformerLens way, one fact at a time (it has no batch diagnosis):
  ``TransformerBridge`` built around a copy of the loaded HF model, ``run_with_cache`` with the lean cache (only
  the hooks read, last position), head results, residual decomposition and the full-vocabulary logit lens with
  ranks (:func:`bench.diagnosis.tl_diagnose`; ``check_tl_matches`` checks it agrees with ours before timing). Only
  when ``transformer_lens`` is installed (``make bench`` installs it).

OpenMP workers wait passively (``OMP_WAIT_POLICY=PASSIVE`` unless set), as in ``python -m bench``. Prints a
Markdown table (median wall time over the rounds, facts/s, wall and CPU-time ratios) for bench/README.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP, as in python -m bench

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from surgery.census.run import diagnose_facts  # noqa: E402
from surgery.diagnosis.diagnose import DiagnosisConfig  # noqa: E402
from surgery.evaluation.facts import load_facts  # noqa: E402
from surgery.io.loading import REPO_ROOT, load_model  # noqa: E402


def pick_facts(n: int):
    """``n`` clean facts, taken round-robin over the bundled relations (a mix of prompt lengths)."""
    by_relation: dict[str, list] = {}
    for f in load_facts(REPO_ROOT / "assets" / "facts"):
        if f.ambiguous is None:
            by_relation.setdefault(f.relation, []).append(f)
    picked, i = [], 0
    while len(picked) < n:
        for facts in by_relation.values():
            if i < len(facts) and len(picked) < n:
                picked.append(facts[i])
        i += 1
    return picked


def diagnose_in_batches(loaded, facts, size: int, config: DiagnosisConfig) -> list[dict]:
    """The census records of ``facts``, ``size`` facts a pass, as ``python -m surgery census --batch-size`` runs."""
    return [
        record
        for i in range(0, len(facts), size)
        for record in diagnose_facts(loaded.model, loaded.tokenizer, facts[i : i + size], config)
    ]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(fn) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = fn()
    return time.perf_counter() - wall, cpu_seconds() - cpu, result


def transformer_lens_case(loaded, facts):
    """A per-fact diagnosis with TransformerLens' bridge, or None (and why) when it is not installed."""
    try:
        from . import models
        from .diagnosis import check_tl_matches, tl_diagnose

        bridge = models.tl_bridge(loaded.model)
    except ImportError:
        return None, "transformer-lens is not installed (`make bench` installs it)"
    diff = check_tl_matches(loaded.model, bridge, lean=True, relative=True)
    prepared = [
        (
            torch.tensor([loaded.tokenizer(f.prompt)["input_ids"]]),  # as the census tokenizes
            loaded.tokenizer(f.target, add_special_tokens=False)["input_ids"][0],
        )
        for f in facts
    ]

    def run():
        for ids, target in prepared:
            tl_diagnose(bridge, ids, target, lean=True)

    return run, f"agrees with ours to {diff:.1e} of the largest lens logit, lens ranks equal"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=64)
    parser.add_argument("--batch-size", default="128", help="facts per pass; several, comma-separated, to compare")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model("gemma3-270m")
    facts = pick_facts(args.facts)
    config = DiagnosisConfig()

    def batched(size: int):
        return lambda: diagnose_in_batches(loaded, facts, size, config)

    sizes = [int(size) for size in args.batch_size.split(",")]
    cases = {f"batched ({size} per pass)": batched(size) for size in sizes}
    cases["one at a time"] = lambda: [diagnose_facts(loaded.model, loaded.tokenizer, [f], config)[0] for f in facts]
    tl_run, tl_note = transformer_lens_case(loaded, facts)
    if tl_run is not None:
        cases["TransformerLens (bridge, lean cache), one at a time"] = tl_run
    diagnose_facts(loaded.model, loaded.tokenizer, facts[:2], config)  # warm-up
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    records: dict[str, list] = {}
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    for _ in range(args.repeats):
        for name, fn in cases.items():
            wall, cpu, result = timed(fn)
            times[name].append((wall, cpu))
            records[name] = result
    load_end = " ".join(f"{x:.2f}" for x in os.getloadavg())

    base_name = "one at a time"
    base_wall = statistics.median(w for w, _ in times[base_name])
    base_cpu = statistics.median(c for _, c in times[base_name])
    print(
        f"Gemma 3 270M (float32), {len(facts)} clean facts from assets/facts, torch threads {args.threads}, "
        f"{args.repeats} interleaved rounds; {platform.processor() or platform.machine()}, torch {torch.__version__}; "
        f"load average at start / end: {load_start} / {load_end}."
    )
    print(f"TransformerLens: {tl_note if tl_run is not None else 'skipped — ' + tl_note}.")
    batches = {json.dumps(records[name], sort_keys=True) for name in records if name.startswith("batched")}
    verdicts = {
        json.dumps([(r["verdict"], r["said"]) for r in records[name]])
        for name in records
        if not name.startswith("TransformerLens")
    }
    print(
        f"Census records equal field for field at every batch size: {len(batches) == 1}; verdicts and what each fact "
        f"says equal batched and one at a time: {len(verdicts) == 1} (padding moves lens floats in the last bits)."
    )
    print()
    print("| mode | seconds for all (median) | facts / s | **speed-up (wall)** | speed-up (CPU time) |")
    print("|---|---:|---:|---:|---:|")
    for name, samples in times.items():
        wall = statistics.median(w for w, _ in samples)
        cpu = statistics.median(c for _, c in samples)
        print(
            f"| {name} | {wall:.1f} | {len(facts) / wall:.2f} | **{base_wall / wall:.2f}×** | {base_cpu / cpu:.2f}× |"
        )


if __name__ == "__main__":
    main()
