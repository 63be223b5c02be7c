"""Many facts in one edit: `operate` wall time and peak memory for 8, 64 and 512 facts on Gemma 3 270M.

Each case runs in a fresh process with glibc's mmap threshold fixed as in :mod:`bench.measure`. Peak memory is the
kernel's peak-RSS counter (``VmHWM``), reset (``/proc/self/clear_refs`` = 5) once the model is loaded and freed
memory is given back to the OS and every weight has been read (a cached model is memory-mapped, so its pages
would otherwise count as ``operate`` touches them), minus the RSS at that moment: what ``operate`` adds on top of
the loaded model.
Every case has the same step budget, so that the cases differ only in how many facts each step covers:
``operate(..., SurgeryConfig(site="wv", layer=12, epochs=EPOCHS, margin=1e6), require_all=False)`` (a margin no
fact reaches turns the early stop off) on the first N clean facts of ``assets/facts/city_country.jsonl`` then
``capital.jsonl`` (paraphrases dropped: the evaluation is the facts and the English panel). Facts are trained in
mini-batches of 64 (the default ``batch_size``); the 512-fact case also runs with one batch of 512, to show what
the mini-batches bound.

    python -m bench.many_facts            # writes bench/results/many_facts.json and prints a Markdown table
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .measure import MMAP_THRESHOLD, _release, _status_kib

EPOCHS = 3
CASES = [(8, 64), (64, 64), (512, 64), (512, 512)]  # (facts, batch_size)
ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "many_facts.json"


def run_case(n: int, batch_size: int) -> dict:
    """One case, in this process (called in a fresh subprocess by :func:`main`)."""
    import torch

    from surgery.edit.training import SurgeryConfig, operate
    from surgery.evaluation.facts import Fact, load_fact_file
    from surgery.evaluation.panels import ENGLISH_PANEL, load_panel
    from surgery.io.loading import load_model

    torch.set_num_threads(2)
    g = load_model("gemma3-270m")
    facts = [
        f
        for name in ("city_country", "capital")
        for f in load_fact_file(ROOT / "assets" / "facts" / f"{name}.jsonl")
        if f.ambiguous is None
    ][:n]
    probes = [Fact(f.prompt, f.target) for f in facts]
    panel = load_panel(ENGLISH_PANEL)
    with torch.no_grad():  # page in every weight (a cached model is memory-mapped): the baseline is the whole model
        sum(float(t.float().sum()) for t in g.model.state_dict().values())
    _release()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (the peak RSS) to the current RSS
    loaded_mb = _status_kib("VmRSS") / 1024
    t0 = time.perf_counter()
    r = operate(
        g.model,
        g.tokenizer,
        probes,
        SurgeryConfig(site="wv", layer=12, epochs=EPOCHS, batch_size=batch_size, margin=1e6),
        panel=panel,
        require_all=False,
    ).report
    wall = time.perf_counter() - t0
    peak_mb = _status_kib("VmHWM") / 1024
    return {
        "facts": n,
        "batch_size": batch_size,
        "epochs": EPOCHS,
        "steps": r.steps,
        "wall_s": wall,
        "train_s": r.train_time_s,
        "peak_mb_over_loaded": peak_mb - loaded_mb,
        "loaded_mb": loaded_mb,
        "fixed": r.comparison.facts_after,
        "before": r.comparison.facts_before,
    }


def main() -> None:
    if len(sys.argv) == 3:  # a child: one case
        print(json.dumps(run_case(int(sys.argv[1]), int(sys.argv[2]))))
        return
    rows = []
    for n, batch in CASES:
        env = dict(
            os.environ,
            MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD),
            TOKENIZERS_PARALLELISM="false",
            OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
        )
        out = subprocess.run(
            [sys.executable, "-m", "bench.many_facts", str(n), str(batch)],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
            env=env,
        ).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    load = Path("/proc/loadavg").read_text().split()[:3]
    OUT.write_text(json.dumps({"rows": rows, "load_average": load}, indent=2) + "\n")
    print("| facts | mini-batch | steps | operate wall | training | peak RSS above the loaded model |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['facts']} | {r['batch_size']} | {r['steps']} | {r['wall_s']:.0f} s | {r['train_s']:.0f} s | "
            f"{r['peak_mb_over_loaded']:.0f} MB |"
        )


if __name__ == "__main__":
    main()
