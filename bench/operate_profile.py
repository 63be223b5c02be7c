"""Where one whole Gemma repair spends its time (issue 22), and whether a faster evaluation changes anything.

One ``operate(model, tokenizer, panel.facts, SurgeryConfig(site="wv"))`` on Gemma 3 270M (the panel's 8 capitals,
``--layer auto``, every default), with thin timers (:func:`bench.operation.stages`) around its stages: the first
fact scores, the diagnosis, the kept prompts' answers, the capture, training, the fact scores after, and in
``compare`` the generation of each model, the perplexity and the KL. ``_generate_group`` (one batched greedy
generation) is timed wherever it is called, so generation and teacher-forced scoring are told apart.

``--repeats 2 --shared-memo`` runs two operates with one :class:`~surgery.evaluation.memo.EvaluationMemo`, as the
app does: the second finds the base model's figures computed. ``--out`` writes the stage tables and the last
report (without its wall times), so two trees' reports can be compared; an older tree runs this file with its own
``surgery`` and ``bench`` first on the path (``--shared-memo`` needs a tree that has the memo):

    OMP_NUM_THREADS=2 PYTHONPATH=. python bench/operate_profile.py [--repeats N] [--shared-memo] [--out F]
    git worktree add /tmp/old <commit>; OMP_NUM_THREADS=2 PYTHONPATH=/tmp/old python bench/operate_profile.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bench.operation import format_stages, stages  # absolute: the script also runs on an older tree

PROBES = (
    ("surgery.edit.training", "score_probes"),
    ("surgery.edit.training", "diagnose_batch"),
    ("surgery.edit.training", "kept_answers"),
    ("surgery.edit.training", "freeze_fact_batches"),
    ("surgery.edit.training", "train_site"),
    ("surgery.edit.upper_stack", "UpperStack.fact_logits"),
    ("surgery.edit.upper_stack", "UpperStack.text_log_probs"),
    ("surgery.edit.upper_stack", "UpperStack.kept_log_probs"),
    ("torch", "Tensor.backward"),
    ("surgery.edit.training", "edited_model"),
    ("surgery.edit.training", "compare"),
    ("surgery.evaluation.report", "fit_panel"),
    ("surgery.evaluation.report", "judge_lists"),
    ("surgery.evaluation.report", "panel_result"),
    ("surgery.evaluation.scoring", "perplexity"),
    ("surgery.evaluation.report", "mean_kl"),
    ("surgery.evaluation.generation", "_generate_group"),
    ("surgery.evaluation.generation", "_generate_wave"),
    ("surgery.edit.training", "weight_stats"),
)


def strip_times(report: dict) -> dict:
    """A report without its wall times (the only figures that may differ between two equal runs)."""
    return {k: v for k, v in report.items() if k not in ("train_time_s", "wall_time_s")}


def run(g, facts, panel, repeats: int, shared_memo: bool) -> tuple[list[dict], dict]:
    """``repeats`` operates, each timed by stage, and the last report. ``shared_memo``: one
    :class:`~surgery.evaluation.memo.EvaluationMemo` for all of them (as the app keeps one per model), so every
    operate after the first finds the base model's figures computed."""
    from surgery.edit.training import SurgeryConfig, operate

    extra = {}
    if shared_memo:
        from surgery.evaluation.memo import EvaluationMemo

        extra["memo"] = EvaluationMemo(g.model)
    runs, report = [], None
    for _ in range(repeats):
        with stages(g.model, PROBES) as totals:
            start = time.perf_counter()
            result = operate(g.model, g.tokenizer, facts, SurgeryConfig(site="wv"), panel=panel, **extra)
            wall = time.perf_counter() - start
        report = result.report.to_dict()
        runs.append(
            {
                "wall_s": wall,
                "steps": report["steps"],
                "layer": report["layer"],
                "stages": [{"path": "/".join(p), "calls": n, "seconds": s} for p, (n, s) in totals.items()],
            }
        )
    return runs, report


def show(label: str, runs: list[dict]) -> None:
    for i, r in enumerate(runs):
        print(f"\n{label} #{i + 1}: {r['wall_s']:.1f} s, block {r['layer']}, {r['steps']} steps")
        wall = {"median": r["wall_s"], "min": r["wall_s"], "max": r["wall_s"]}
        print(format_stages({"wall": wall, "stages": r["stages"]}))
    walls = sorted(r["wall_s"] for r in runs)
    median = statistics.median(walls)
    print(f"\n{label}: median of {len(walls)} {median:.1f} s (min {walls[0]:.1f}, max {walls[-1]:.1f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=1, help="operates in a row (the first pays the base figures)")
    parser.add_argument("--shared-memo", action="store_true", help="one evaluation memo for all the repeats")
    parser.add_argument("--out", default=None, help="write the stage tables and the last report (no times) as JSON")
    args = parser.parse_args()
    torch.set_num_threads(2)
    from surgery.evaluation.panels import panel_for_model
    from surgery.io.loading import load_model

    g = load_model("gemma3-270m")
    panel = panel_for_model(g.model)
    runs, report = run(g, list(panel.facts), panel, args.repeats, args.shared_memo)
    show("operate", runs)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"runs": runs, "report": strip_times(report)}, f, indent=1)


if __name__ == "__main__":
    main()
