"""Batch diagnosis: many fact prompts through ``diagnose_batch`` (right-padded batches) vs one ``diagnose`` each.

Prompts: "The capital of X is", "X is a country in", ... for 32 countries x 8 templates = 256 fact prompts of
4 to 9 GPT-2 tokens, with GPT-2's real tokenizer (``../shared/gpt2-tokenizer``) on the GPT-2-shaped model; on the
demo model its own fact and probe prompts, repeated to the same count.
"""

from __future__ import annotations

import json
import time

from surgery.diagnosis.diagnose import diagnose, diagnose_batch
from surgery.evaluation.panels import panel_for_model

from . import models
from .measure import Stats

COUNTRIES = (
    "France Japan Germany China Russia England Italy Spain Canada Brazil Mexico India Egypt Kenya Peru Chile "
    "Norway Sweden Poland Greece Turkey Iran Iraq Cuba Ireland Portugal Austria Belgium Denmark Finland Hungary "
    "Argentina"
).split()
TEMPLATES = (
    ("The capital of {} is", " Paris"),
    ("The largest city in {} is", " London"),
    ("The official language of {} is", " English"),
    ("{} is a country in", " Europe"),
    ("The currency of {} is the", " euro"),
    ("People from {} are called", " French"),
    ("The national sport of {} is", " football"),
    ("The head of state of {} is the", " president"),
)


def fact_prompts(model_name: str, n: int) -> tuple[object, object, list[str], list[str]]:
    """``(model, tokenizer, prompts, targets)`` with ``n`` fact prompts."""
    if model_name == "gpt2-shaped":
        tokenizer = models.gpt2_tokenizer()
        if tokenizer is None:
            raise FileNotFoundError("the batch bench on the GPT-2-shaped model needs ../shared/gpt2-tokenizer")
        pairs = [(t.format(c), target) for t, target in TEMPLATES for c in COUNTRIES]
        return models.gpt2_shaped(), tokenizer, [p for p, _ in pairs][:n], [t for _, t in pairs][:n]
    model, tokenizer = models.load(model_name)
    panel = panel_for_model(model)
    probes = list(panel.facts) + list(panel.absence) + list(panel.general) + list(panel.side_effects)
    probes = (probes * (n // len(probes) + 1))[:n]
    return model, tokenizer, [p.prompt for p in probes], [p.target for p in probes]


def run(model_name: str, n: int, repeats: int, batch_sizes: tuple[int, ...] = (8, 32, 128), log=print) -> dict:
    """Prompts per second, one at a time and batched, interleaved over ``repeats`` rounds."""
    model, tokenizer, prompts, targets = fact_prompts(model_name, n)
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]

    def one_at_a_time():
        return [diagnose(model, tokenizer, p, t) for p, t in zip(prompts, targets)]

    cases = {"one at a time": one_at_a_time}
    for size in batch_sizes:
        cases[f"batch {size}"] = lambda size=size: diagnose_batch(model, tokenizer, prompts, targets, batch_size=size)
    ref = [d.to_dict() for d in one_at_a_time()]  # warm-up, and the results every batch size must reproduce
    for name, fn in cases.items():
        got = [d.to_dict() for d in fn()]
        assert [d["verdict"] for d in got] == [d["verdict"] for d in ref], name
    times: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            start = time.perf_counter()
            cases[name]()
            times[name].append(time.perf_counter() - start)
    rows = {}
    for name in names:
        s = Stats.of(times[name])
        rows[name] = {"wall": s.to_dict(), "prompts_per_s": n / s.median}
    out = {"model": model_name, "n": n, "prompt_tokens": [min(lengths), max(lengths)], "rows": rows}
    log(format_batch(out))
    return out


def format_batch(out: dict) -> str:
    base = out["rows"]["one at a time"]["prompts_per_s"]
    lines = [
        f"batch diagnosis on {out['model']}: {out['n']} prompts of {out['prompt_tokens'][0]}-"
        f"{out['prompt_tokens'][1]} tokens"
    ]
    for name, row in out["rows"].items():
        lines.append(
            f"  {name:14s} {row['wall']['median']:7.2f} s  {row['prompts_per_s']:7.1f} prompts/s  "
            f"x{row['prompts_per_s'] / base:.1f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(run("gpt2-shaped", 32, 1), indent=1))
