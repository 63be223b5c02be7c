"""Census throughput with ``surgery/generation.py`` at a git revision vs the working tree, interleaved.

    .venv/bin/python -m bench.generation_revisions HEAD~1 [--facts 64] [--batch-size 32] [--threads 2] [--repeats 2]

The census (:func:`surgery.census.diagnose_facts`, ``--batch-size`` facts per call) of the same facts as
``bench.census``, once with the generation module of ``revision`` and once with today's, alternating over
``--repeats`` rounds in one process (a shared machine slows both alike). The records must be equal (checked).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import surgery.census as census  # noqa: E402
from surgery.diagnosis import DiagnosisConfig  # noqa: E402
from surgery.model_io import REPO_ROOT, load_model  # noqa: E402

from .census import pick_facts  # noqa: E402


def generation_at(revision: str):
    """The module ``surgery.generation`` as it was at ``revision`` (relative imports bound to today's package)."""
    source = subprocess.run(["git", "show", f"{revision}:surgery/generation.py"], cwd=REPO_ROOT, capture_output=True,
                            text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "generation_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("surgery.generation_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revision")
    parser.add_argument("--facts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model("gemma3-270m")
    facts, config = pick_facts(args.facts), DiagnosisConfig()
    cases = {args.revision: generation_at(args.revision).said, "working tree": census.said}

    def run(said):
        census.said = said  # diagnose_facts looks it up in its module at call time
        try:
            return [r for i in range(0, len(facts), args.batch_size)
                    for r in census.diagnose_facts(loaded.model, loaded.tokenizer, facts[i : i + args.batch_size],
                                                   config)]
        finally:
            census.said = cases["working tree"]

    run(cases["working tree"])  # warm-up
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    times: dict[str, list[float]] = {name: [] for name in cases}
    records = {}
    for _ in range(args.repeats):
        for name, said in cases.items():
            start = time.perf_counter()
            records[name] = run(said)
            times[name].append(time.perf_counter() - start)
    load_end = " ".join(f"{x:.2f}" for x in os.getloadavg())
    before, after = (statistics.median(t) for t in times.values())
    print(f"Gemma 3 270M, {len(facts)} facts, batch {args.batch_size}, torch threads {args.threads}, {args.repeats} "
          f"interleaved rounds; load average at start / end: {load_start} / {load_end}; records equal: "
          f"{records[args.revision] == records['working tree']}")
    for name, t in times.items():
        median = statistics.median(t)
        print(f"| {name} | {median:.1f} s ({', '.join(f'{x:.1f}' for x in t)}) | {len(facts) / median:.2f} facts/s |")
    print(f"speed-up: {before / after:.2f}x")


if __name__ == "__main__":
    main()
