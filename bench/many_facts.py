"""Many facts in one edit: `operate` wall time and peak memory for 8, 64 and 512 facts on Gemma 3 270M.

Each case runs in a fresh process (peak memory = that process's maximum resident set size, ``ru_maxrss``, minus
the same process's RSS right after loading the model), with a fixed step budget so that the cases differ only in
how many facts each step covers: ``operate(..., SurgeryConfig(site="wv", layer=12, epochs=EPOCHS),
require_all=False)`` on the first N clean facts of ``assets/facts/city_country.jsonl`` and ``capital.jsonl``
(paraphrases dropped: the evaluation is then the facts and the English panel). Facts are trained in mini-batches
of 64 (the default ``batch_size``); the 512-fact case is also run with one batch of 512, to show what the
mini-batches bound.

    python -m bench.many_facts            # writes bench/results/many_facts.json and prints a Markdown table
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

EPOCHS = 3
CASES = [(8, 64), (64, 64), (512, 64), (512, 512)]  # (facts, batch_size)
ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "many_facts.json"


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_case(n: int, batch_size: int) -> dict:
    """One case, in this process (called in a fresh subprocess by :func:`main`)."""
    import torch

    from surgery.facts import load_fact_file
    from surgery.model_io import load_model
    from surgery.panels import ENGLISH_PANEL, Probe, load_panel
    from surgery.training import SurgeryConfig, operate

    torch.set_num_threads(2)
    g = load_model("gemma3-270m")
    facts = [f for name in ("city_country", "capital") for f in load_fact_file(ROOT / "assets" / "facts" / f"{name}.jsonl")
             if f.ambiguous is None][:n]
    probes = [Probe(f.prompt, f.target) for f in facts]
    panel = load_panel(ENGLISH_PANEL)
    loaded_mb = _rss_mb()
    t0 = time.perf_counter()
    r = operate(g.model, g.tokenizer, probes, SurgeryConfig(site="wv", layer=12, epochs=EPOCHS, batch_size=batch_size),
                panel=panel, require_all=False).report
    wall = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"facts": n, "batch_size": batch_size, "epochs": EPOCHS, "steps": r.steps, "wall_s": wall,
            "train_s": r.train_time_s, "peak_mb_over_loaded": peak_mb - loaded_mb, "loaded_mb": loaded_mb,
            "fixed": r.comparison.facts_after, "before": r.comparison.facts_before}


def main() -> None:
    if len(sys.argv) == 3:  # a child: one case
        print(json.dumps(run_case(int(sys.argv[1]), int(sys.argv[2]))))
        return
    rows = []
    for n, batch in CASES:
        out = subprocess.run([sys.executable, "-m", "bench.many_facts", str(n), str(batch)], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    load = Path("/proc/loadavg").read_text().split()[:3]
    OUT.write_text(json.dumps({"rows": rows, "load_average": load}, indent=2) + "\n")
    print("| facts | mini-batch | steps | operate wall | training | peak RSS above the loaded model |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['facts']} | {r['batch_size']} | {r['steps']} | {r['wall_s']:.0f} s | {r['train_s']:.0f} s | "
              f"{r['peak_mb_over_loaded']:.0f} MB |")


if __name__ == "__main__":
    main()
