"""``python -m bench.preservation``: the cheaper preservation terms of issue 22 against the exact KL, in one process.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.preservation demo [--steps 6 --repeats 3]
    OMP_NUM_THREADS=1 .venv/bin/python -m bench.preservation gemma3-270m

(a) Time per ``wv`` training step of each ``SurgeryConfig.preserve_term`` and of the naive masked step
(:class:`bench.training.Baseline`), on :func:`bench.training.job`'s block and facts, the early stop turned off;
rounds interleaved, the median over every step of every round. (b) One ``operate`` per term (``--layer auto``,
every other option the default) on the facts file (demo: ``assets/examples/demo_facts.json``; Gemma:
``assets/examples/gemma_multitoken_capitals.json``), one shared memo, and every figure of its report in one table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time

import torch

from surgery.edit.preservation import PRESERVE_TERMS
from surgery.edit.training import SurgeryConfig, operate, train_site, unrelated_token_budget
from surgery.edit.upper_stack import freeze_inputs
from surgery.evaluation.facts import load_facts
from surgery.evaluation.memo import EvaluationMemo

from . import training
from .measure import ROOT

FACTS = {
    "demo": ROOT / "assets" / "examples" / "demo_facts.json",
    "gemma3-270m": ROOT / "assets" / "examples" / "gemma_multitoken_capitals.json",
}


def step_times(j: training.Job, steps: int, repeats: int, terms=PRESERVE_TERMS) -> dict[str, float]:
    """Median wall seconds of one step per term and of the naive masked step (rounds interleaved)."""
    frozen = freeze_inputs(
        j.model, j.tokenizer, j.facts, j.unrelated, j.layer, unrelated_token_budget(j.model.config.vocab_size)
    )

    def engine(term: str):
        def run():
            stamps: list[float] = []
            config = SurgeryConfig(layer=j.layer, epochs=steps + 1, margin=training.NEVER, preserve_term=term)
            train_site(j.model, frozen, "wv", j.layer, config, progress=lambda *_: stamps.append(time.perf_counter()))
            return [b - a for a, b in zip(stamps, stamps[1:])]

        return run

    naive = training.Baseline(j, training.make_batch(j), "naive", "wv")
    cases = {term: engine(term) for term in terms}
    cases["naive-wv"] = lambda: [t for t, _ in training.baseline_steps(naive, steps)]
    samples: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for fn in cases.values():  # warm-up
        fn()
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            samples[name].extend(cases[name]())
    return {name: statistics.median(s) for name, s in samples.items()}


def figures(report) -> dict[str, str]:
    """Every evaluation figure of one report, as table cells (strict after-counts; broken where counted)."""
    e = report.comparison.evaluation()

    def count(c: dict, broken: bool = False) -> str:
        return f"{c['after']}/{c['total']}" + (f" (-{c['broken']})" if broken and c["broken"] else "")

    spec = e["specificity"]
    return {
        "steps": str(report.steps),
        "train s": f"{report.train_time_s:.2f}",
        "efficacy": count(e["efficacy"]),
        "paraphrase": count(e["paraphrase"]),
        "relation": count(e["relation"], True),
        "neighbourhood": count(spec["neighbourhood"], True),
        "side effects": count(spec["side_effects"], True),
        "unchanged": f"{spec['answers_unchanged']}/{spec['total']}",
        "general": count(e["general"], True),
        "KL": f"{e['kl_unrelated']:.3e}" if e["kl_unrelated"] is not None else "-",
        "ppl": f"{e['perplexity']['before']:.3f}→{e['perplexity']['after']:.3f}",
    }


def table(rows: dict[str, dict[str, str]]) -> str:
    cols = list(next(iter(rows.values())))
    out = ["| term | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    out += [f"| {name} | " + " | ".join(r[c] for c in cols) + " |" for name, r in rows.items()]
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model", choices=sorted(FACTS))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--kl-weight", type=float, nargs="*", default=[200.0], help="(b) for each of these weights (none: skip (b))"
    )
    p.add_argument("--no-steps", action="store_true", help="skip (a)")
    p.add_argument("--terms", default=",".join(PRESERVE_TERMS), help="comma-separated (default: every term)")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    load = lambda: subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()  # noqa: E731
    print(f"load at start: {load()}")
    j = training.job(args.model)
    terms = args.terms.split(",")
    if not args.no_steps:
        times = step_times(j, args.steps, args.repeats, terms)
        naive = times["naive-wv"]
        print(f"\n(a) one wv step at block {j.layer} ({j.layer_reason}), median of {args.steps} x {args.repeats} steps")
        print("| term | step ms | vs kl | vs naive masked step |\n|---|---|---|---|")
        for name, t in times.items():
            print(f"| {name} | {1000 * t:.1f} | {t / times.get('kl', t):.2f}× | {t / naive:.2f}× |")
        print(f"load: {load()}")
    facts = load_facts(FACTS[args.model])
    memo = EvaluationMemo(j.model)
    rows = {}
    for weight in args.kl_weight:
        for term in terms:
            config = SurgeryConfig(preserve_term=term, kl_weight=weight)
            name = term if weight == 200.0 else f"{term}, kl_weight {weight:g}"
            rows[name] = figures(operate(j.model, j.tokenizer, facts, config, memo=memo).report)
            print(f"{name}: {rows[name]}", flush=True)
    if rows:  # `--kl-weight` with no value: the step times (a) alone
        print(f"\n(b) operate --layer auto on {FACTS[args.model].relative_to(ROOT)}, one run per term")
        print(table(rows))
    print(f"load at end: {load()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
