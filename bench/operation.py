"""Where the time of one whole ``operate`` goes: wall time per stage, a cProfile and a torch.profiler table.

``breakdown(...)`` runs ``surgery.edit.training.operate`` with thin timing wrappers around the functions it calls
(installed by :func:`stages` for the duration of the call and removed in ``finally``; the library is not
changed), so each stage's inclusive wall time is known with its place in the call tree, e.g.
``compare / evaluate_panel / perplexity``. The stages:

* ``score_probes`` (facts before and after), ``choose_layer`` -> ``diagnose_batch`` (capture, lens, attribution)
* ``freeze_*`` (block inputs captured once), ``train_site`` -> per step ``fact_logits``, ``text_log_probs``
  (the first of them, under ``no_grad``, is the reference distribution), ``backward``, ``Adam.step``
* ``edited_model``, ``compare`` -> ``fit_panel``, ``evaluate_panel`` (``score_probes`` + ``perplexity``) for the
  base and the edited model, ``mean_kl`` (``text_log_probs`` of both), paraphrase ``score_probes``
* ``weight_stats``, ``block_digest``
"""

from __future__ import annotations

import cProfile
import functools
import importlib
import io
import pstats
import time
from collections import defaultdict
from contextlib import contextmanager

import torch

from surgery.core.errors import SurgeryFailed
from surgery.edit.training import SurgeryConfig, operate

from .measure import Stats

# (module, attribute) pairs to time; a class attribute is written "Class.method".
PROBES = (
    ("surgery.edit.training", "preservation_texts"),
    ("surgery.edit.training", "score_probes"),
    ("surgery.edit.training", "choose_layer"),
    ("surgery.edit.training", "diagnose_batch"),
    ("surgery.diagnosis.diagnose", "capture_last_position"),
    ("surgery.diagnosis.diagnose", "logit_lens"),
    ("surgery.diagnosis.diagnose", "logit_attrs"),
    ("surgery.edit.training", "freeze_inputs"),
    ("surgery.edit.training", "freeze_fact_batches"),
    ("surgery.edit.training", "train_site"),
    ("surgery.edit.upper_stack", "UpperStack.fact_logits"),
    ("surgery.edit.upper_stack", "UpperStack.text_log_probs"),
    ("torch", "Tensor.backward"),
    ("torch.optim", "Adam.step"),
    ("surgery.edit.training", "edited_model"),
    ("surgery.edit.training", "compare"),
    ("surgery.evaluation.report", "fit_panel"),
    ("surgery.evaluation.report", "evaluate_panel"),
    ("surgery.evaluation.report", "mean_kl"),
    ("surgery.evaluation.report", "score_probes"),
    ("surgery.evaluation.scoring", "score_probes"),
    ("surgery.evaluation.scoring", "perplexity"),
    ("surgery.evaluation.scoring", "text_log_probs"),
    ("surgery.edit.training", "weight_stats"),
    ("surgery.edit.training", "block_digest"),
)


PER_MODEL = ("score_probes", "evaluate_panel", "perplexity", "text_log_probs")  # labelled [base] / [edited]


@contextmanager
def stages(base=None, probes=PROBES):
    """Wrap each probe that exists with a timer; yields ``{path: [calls, seconds]}`` (inclusive wall time, path =
    the tuple of enclosing probe names). A call of :data:`PER_MODEL` is labelled ``[base]`` when its model is
    ``base``, ``[edited]`` otherwise; a call made under ``no_grad`` inside training, ``[no grad]``. Every
    original is put back in ``finally``."""
    totals: dict[tuple[str, ...], list] = defaultdict(lambda: [0, 0.0])
    stack: list[str] = []
    restore = []

    def tagged(label, args) -> str:
        if base is not None and label in PER_MODEL and args and isinstance(args[0], torch.nn.Module):
            return f"{label} [{'base' if args[0] is base else 'edited'}]"
        if "train_site" in stack and not torch.is_grad_enabled():
            return f"{label} [no grad]"
        return label

    def wrap(fn, label):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            stack.append(tagged(label, args))
            path = tuple(stack)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[path][0] += 1
                totals[path][1] += time.perf_counter() - start
                stack.pop()

        return timed

    try:
        for module_name, attr in probes:
            owner = importlib.import_module(module_name)
            *outer, name = attr.split(".")
            for part in outer:
                owner = getattr(owner, part)
            if name not in vars(owner):  # e.g. freeze_fact_batches before the engine has it
                continue
            original = vars(owner)[name]
            setattr(owner, name, wrap(original, name))
            restore.append((owner, name, original))
        yield totals
    finally:
        for owner, name, original in reversed(restore):
            setattr(owner, name, original)


def run_operate(model, tokenizer, facts, panel, unrelated=None, layer=None, epochs=None) -> dict:
    """One ``operate`` with ``site="wv"``; the outcome (steps, layer, facts fixed) and its wall time."""
    config = SurgeryConfig(site="wv", layer=layer, **({"epochs": epochs} if epochs else {}))
    steps = []
    start = time.perf_counter()
    try:
        result = operate(
            model, tokenizer, facts, config, unrelated=unrelated, panel=panel, progress=lambda s, *_: steps.append(s)
        )
        c = result.report.comparison
        outcome = {
            "layer": result.report.layer,
            "layer_reason": result.report.layer_reason,
            "fixed": f"{c.facts_after}/{len(c.facts)}",
            "train_time_s": result.report.train_time_s,
        }
    except SurgeryFailed as e:
        outcome = {"layer": layer, "fixed": "not all (SurgeryFailed)", "error": str(e)}
    return {"steps": len(steps), "epochs_budget": config.epochs, "wall_s": time.perf_counter() - start, **outcome}


def breakdown(model, tokenizer, facts, panel, repeats: int = 3, profile: bool = True, log=print) -> dict:
    """``repeats`` timed operations (after one warm-up) with the per-stage times of each; then, when ``profile``,
    one more under cProfile and one under torch.profiler."""
    run_operate(model, tokenizer, facts, panel)  # warm-up: first-call allocations, lazy imports
    runs = []
    for r in range(repeats):
        with stages(model) as totals:
            out = run_operate(model, tokenizer, facts, panel)
        out["stages"] = [{"path": "/".join(p), "calls": n, "seconds": s} for p, (n, s) in totals.items()]
        runs.append(out)
        log(
            f"operate #{r + 1}: {out['wall_s']:.1f} s, block {out['layer']}, {out['steps']} steps, fixed {out['fixed']}"
        )
    result = {"runs": runs, "wall": Stats.of([r["wall_s"] for r in runs]).to_dict(), "stages": median_stages(runs)}
    if profile:
        result["cprofile"] = cprofile_operate(model, tokenizer, facts, panel)
        result["torch_profile"] = torch_profile_operate(model, tokenizer, facts, panel)
    log(format_stages(result))
    return result


def median_stages(runs: list[dict]) -> list[dict]:
    """Per path, the median seconds and calls over the runs, in the order of the first run."""
    order, seconds, calls = [], defaultdict(list), defaultdict(list)
    for run in runs:
        for row in run["stages"]:
            if row["path"] not in seconds:
                order.append(row["path"])
            seconds[row["path"]].append(row["seconds"])
            calls[row["path"]].append(row["calls"])
    out = []
    for path in sorted(order, key=_tree_key(order)):
        s = sorted(seconds[path] + [0.0] * (len(runs) - len(seconds[path])))
        out.append({"path": path, "calls": max(calls[path]), "seconds": s[len(s) // 2]})
    return out


def _tree_key(order: list[str]):
    """Sort paths as a tree (a parent before its children), siblings in first-seen order."""
    first = {p: i for i, p in enumerate(order)}

    def key(path: str):
        parts = path.split("/")
        return [first.get("/".join(parts[: i + 1]), len(order)) for i in range(len(parts))]

    return key


def cprofile_operate(model, tokenizer, facts, panel, top: int = 25) -> str:
    """cProfile of one operate: the ``top`` functions by own time (torch's C functions show as builtins)."""
    prof = cProfile.Profile()
    prof.enable()
    try:
        run_operate(model, tokenizer, facts, panel)
    finally:
        prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    text = buf.getvalue()
    return text[text.find("   ncalls") :] if "   ncalls" in text else text


def torch_profile_operate(model, tokenizer, facts, panel, top: int = 20) -> str:
    """torch.profiler of one operate: the ``top`` operators by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_operate(model, tokenizer, facts, panel)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=40)


def format_stages(result: dict) -> str:
    total = result["wall"]["median"]
    lines = [f"operate: {total:.1f} s median ({result['wall']['min']:.1f}–{result['wall']['max']:.1f})"]
    for row in result["stages"]:
        depth = row["path"].count("/")
        name = row["path"].rsplit("/", 1)[-1]
        lines.append(
            f"  {'  ' * depth}{name:<{34 - 2 * depth}} {row['calls']:4d}x {row['seconds']:7.2f} s "
            f"{100 * row['seconds'] / total:5.1f}%"
        )
    return "\n".join(lines)


def stages_table(result: dict) -> str:
    """Markdown: the stage tree with calls, median seconds and share of the median operate."""
    total = result["wall"]["median"]
    lines = ["| stage (inclusive; children indented) | calls | seconds | share |", "|---|---:|---:|---:|"]
    for row in result["stages"]:
        depth = row["path"].count("/")
        name = row["path"].rsplit("/", 1)[-1]
        lines.append(
            f"| {'&nbsp;&nbsp;' * 2 * depth}`{name}` | {row['calls']} | {row['seconds']:.2f} | "
            f"{100 * row['seconds'] / total:.0f}% |"
        )
    return "\n".join(lines)


if __name__ == "__main__":  # quick look on the demo model
    from surgery.evaluation.panels import panel_for_model

    from . import models

    model, tokenizer = models.load("demo")
    panel = panel_for_model(model)
    torch.set_num_threads(2)
    breakdown(model, tokenizer, list(panel.facts), panel, repeats=1, profile=False)
