"""The bfloat16 screen of the unembedding (``surgery.core.screen``) on and off, in one process, interleaved.

    OMP_NUM_THREADS=2 .venv/bin/python -m bench.screen [--model gemma3-270m] [--rounds 3] [--census 64] [--operate]

Three cases, each timed with the screen off (every step's full float32 vocabulary product) and on (the default
where it applies), in alternating rounds so that a shared machine slows both alike:

* **evaluation** — ``judge_lists`` of the model's panel as ``compare`` judges one model: its facts, paraphrases,
  every panel probe and the fluency prompts in one batched greedy generation;
* **census** — ``diagnose_facts`` of ``--census`` clean bundled facts in batches of 32, as ``python -m surgery
  census --batch-size 32`` runs them (the records include each fact's greedy continuation);
* **operate** (``--operate``) — the whole 8-fact ``wv`` repair of the panel's facts, every default.

Each case checks that both settings give the same answer (every generated text; every census record; the repair's
report without its wall times) and prints a Markdown row per case for bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import surgery.evaluation.generation as generation
from bench.census import diagnose_in_batches, pick_facts
from surgery.arch import layout_of
from surgery.diagnosis.diagnose import DiagnosisConfig
from surgery.evaluation.panels import fit_panel, panel_for_model
from surgery.evaluation.report import judged_lists
from surgery.evaluation.scoring import fluency_prompts, judge_lists
from surgery.io.loading import load_model

ON = generation.SCREEN_MIN_PRODUCT
CENSUS_BATCH = 32  # the batch of the census case as measured in bench/README.md (the census' default is now 128)


def screen(on: bool) -> None:
    generation.SCREEN_MIN_PRODUCT = ON if on else 2**62


def evaluation_case(g):
    panel = panel_for_model(g.model)
    facts = list(panel.facts)
    fitted = fit_panel(panel, g.tokenizer, layout_of(g.model).n_ctx).panel
    lists = {"facts": facts, **judged_lists(facts, fitted)}
    prompts = fluency_prompts(facts, fitted)

    def run():
        judged = judge_lists(g.model, g.tokenizer, lists, prompts)
        return [[r.said for r in s.results] for s in judged.scores.values()], judged.fluency.texts

    return run


def census_case(g, n: int):
    facts = pick_facts(n)

    def run():
        return json.dumps(diagnose_in_batches(g, facts, CENSUS_BATCH, DiagnosisConfig()), sort_keys=True)

    return run


def operate_case(g):
    from surgery.edit.training import SurgeryConfig, operate

    facts = list(panel_for_model(g.model).facts)

    def run():
        report = operate(g.model, g.tokenizer, facts, SurgeryConfig(site="wv")).report.to_dict()
        return {k: v for k, v in report.items() if k not in ("train_time_s", "wall_time_s")}

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--census", type=int, default=64, help="facts in the census case (0: skip it)")
    parser.add_argument("--operate", action="store_true", help="also time the whole 8-fact repair")
    args = parser.parse_args()
    g = load_model(args.model)
    cases = {"evaluation (judge_lists of the panel)": evaluation_case(g)}
    if args.census:
        cases[f"census ({args.census} facts, batches of {CENSUS_BATCH})"] = census_case(g, args.census)
    if args.operate:
        cases["operate (8 facts, wv, defaults)"] = operate_case(g)
    native = generation.bf16_is_native(torch.device("cpu"))
    print(f"{args.model}, torch threads {torch.get_num_threads()}, native bfloat16 products: {native}")
    print("\n| case | screen off (s) | screen on (s) | on / off | same answer |\n|---|---:|---:|---:|---|")
    for name, run in cases.items():
        times, answers = {False: [], True: []}, {}
        for _ in range(args.rounds):
            for on in (False, True):
                screen(on)
                start = time.perf_counter()
                answers[on] = run()
                times[on].append(time.perf_counter() - start)
        screen(True)
        off, on = statistics.median(times[False]), statistics.median(times[True])
        print(f"| {name} | {off:.1f} | {on:.1f} | {on / off:.2f}x | {answers[False] == answers[True]} |", flush=True)


if __name__ == "__main__":
    main()
