"""Surgery speed and memory: one optimisation step per site vs full fine-tuning vs naive masked training.

All three train with the engine's loss on the same batch (the 8 fact prompts and the unrelated text of the
model's panel): cross-entropy of each target at its prompt's last position + KL to the original next-token
distributions on the unrelated text (computed once, for every method).

* ``wv`` / ``attn`` / ``mlp`` / ``layer``: the engine, ``surgery.edit.training.train_site`` — block ``layer``'s input
  captured once (``freeze_inputs``), each step runs only the blocks from ``layer`` up and unembeds only the
  positions that matter. Step time = time between two of its ``progress`` callbacks.
* ``full``: full fine-tuning — every parameter trainable (a copy: the base is shared), full forward and backward
  through the whole model (full-vocabulary logits at every position), Adam over all 124M parameters.
* ``naive-wv``: naive masked training of the ``wv`` site — the same trainable tensor as the engine's, but each
  step is a full forward from the embeddings with logits at every position, and the gradient of the whole
  ``c_attn.weight`` is computed and masked to the V columns.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from surgery.arch import SITES, layout_of
from surgery.core.errors import SurgeryFailed
from surgery.core.tokens import encode_prompt, encode_target, pad_right
from surgery.edit.training import SurgeryConfig, choose_layer, operate, train_site, unrelated_token_budget
from surgery.edit.upper_stack import FrozenInputs, _truncate_texts, freeze_inputs
from surgery.evaluation.facts import Fact, load_facts
from surgery.evaluation.panels import Panel, fit_panel, panel_for_model
from surgery.evaluation.scoring import encode_texts, kl_divergence

from . import models
from .measure import ROOT, Stats, peak_memory

FACTS = {
    "gpt2-shaped": ROOT / "assets" / "examples" / "gpt2_capitals.json",
    "demo": ROOT / "assets" / "examples" / "demo_facts.json",
}  # Gemma: its panel's 8 capital facts
NEVER = 1e9  # an early-stop margin no fact reaches: a run does exactly its step budget
STEP_CASES = SITES + ("full", "naive-wv")


@dataclass
class Job:
    """The 8-fact job of one model: what every method trains on."""

    model: nn.Module
    tokenizer: object
    facts: list[Fact]
    unrelated: list[str]
    panel: Panel
    layer: int
    layer_reason: str


def job(model_name: str) -> Job:
    """Model, tokenizer, facts and unrelated text, and a late block for the step comparison: block 9 of the
    GPT-2 shape (the reference write-up's L10), the block below the last on the demo model, and on Gemma 3 270M
    the block ``--layer auto`` prescribes for its panel's 8 capital facts (what ``operate`` trains)."""
    if model_name == "gemma3-270m":
        model, tokenizer = models.load(model_name)
        panel = fit_panel(panel_for_model(model), tokenizer, layout_of(model).n_ctx).panel
        facts = list(panel.facts)
        layer, reason, _ = choose_layer(model, tokenizer, facts)
        return Job(model, tokenizer, facts, list(panel.unrelated_text), panel, layer, reason)
    if model_name == "gpt2-shaped":
        tokenizer = models.gpt2_tokenizer()
        if tokenizer is None:
            raise FileNotFoundError("the GPT-2-shaped surgery job needs ../shared/gpt2-tokenizer")
        model = models.gpt2_shaped()
        layer, reason = model.config.n_layer - 3, "late block n_layer - 3; random weights prescribe nothing"
    else:
        model, tokenizer = models.load(model_name)
        layer, reason = model.config.n_layer - 2, "late block n_layer - 2"
    panel = panel_for_model(model)
    return Job(model, tokenizer, load_facts(FACTS[model_name]), list(panel.unrelated_text), panel, layer, reason)


# --------------------------------------------------------------------------------------------------
# The batch every method trains on, and the two baselines.
# --------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    facts_ids: Tensor  # Long[Tensor, "Bf Tf"] right-padded
    facts_last: Tensor  # Long[Tensor, "Bf"]
    targets: Tensor  # Long[Tensor, "Bf"]
    text_ids: Tensor  # Long[Tensor, "Bu Tu"]
    text_real: Tensor  # Bool[Tensor, "Bu Tu"]
    ref_log_probs: Tensor  # Float[Tensor, "N V"] the original model's, computed once


def make_batch(j: Job, max_unrelated_tokens: int | None = None) -> Batch:
    max_unrelated_tokens = max_unrelated_tokens or unrelated_token_budget(j.model.config.vocab_size)
    layout = layout_of(j.model)
    pad = j.tokenizer.pad_token_id
    ids, lengths = pad_right([encode_prompt(j.tokenizer, f.prompt, layout.n_ctx) for f in j.facts], pad)
    targets = torch.tensor([encode_target(j.tokenizer, f.target)[0] for f in j.facts])
    # cut to the engine's token budget exactly as freeze_inputs cuts it, so every method trains on the same batch
    texts = _truncate_texts(encode_texts(j.tokenizer, j.unrelated, layout.n_ctx), max_unrelated_tokens)
    t_ids, t_lengths = pad_right(texts, pad)
    real = torch.arange(t_ids.shape[1])[None] < t_lengths[:, None]
    with torch.no_grad():
        ref = F.log_softmax(j.model(t_ids, use_cache=False).logits[real], -1)
    return Batch(ids, lengths - 1, targets, t_ids, real, ref)


class Baseline:
    """Full fine-tuning (``kind="full"``) or naive masked training of ``site`` (``kind="naive"``) of ``j.model``
    without touching it: the trainable tensors are copies passed in with ``functional_call``."""

    def __init__(self, j: Job, batch: Batch, kind: str, site: str = "wv", lr: float = 1e-3):
        self.model, self.batch = j.model, batch
        params = dict(j.model.named_parameters())
        if kind == "full":
            names = list(params)
        else:
            slices = layout_of(j.model).site_slices(site, j.layer, j.model)
            names = [s.name for s in slices]
        self.values = {n: params[n].detach().clone().requires_grad_(True) for n in names}
        if kind == "naive":
            for s in slices:
                if s.cols is not None:  # gradient of the whole tensor, masked to the slice's columns
                    mask = torch.zeros_like(params[s.name])
                    mask[:, s.cols] = 1
                    self.values[s.name].register_hook(lambda g, m=mask: g * m)
        self.optimizer = torch.optim.Adam(self.values.values(), lr=lr)

    def step(self) -> float:
        b = self.batch
        logits = functional_call(self.model, self.values, (b.facts_ids,), {"use_cache": False}).logits  # (Bf, Tf, V)
        rows = torch.arange(logits.shape[0])
        ce = F.cross_entropy(logits[rows, b.facts_last], b.targets)
        text = functional_call(self.model, self.values, (b.text_ids,), {"use_cache": False}).logits  # (Bu, Tu, V)
        loss = ce + kl_divergence(b.ref_log_probs, F.log_softmax(text[b.text_real], -1))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


def engine_steps(j: Job, frozen: FrozenInputs, site: str, steps: int) -> list[tuple[float, float]]:
    """Run the engine for ``steps`` steps; (wall, cpu) seconds of each step after the first."""
    stamps: list[tuple[float, float]] = []
    config = SurgeryConfig(site=site, layer=j.layer, epochs=steps, margin=NEVER)
    train_site(
        j.model,
        frozen,
        site,
        j.layer,
        config,
        progress=lambda *_: stamps.append((time.perf_counter(), time.process_time())),
    )
    return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(stamps, stamps[1:])]


def baseline_steps(trainer: Baseline, steps: int) -> list[tuple[float, float]]:
    out = []
    for _ in range(steps):
        w, c = time.perf_counter(), time.process_time()
        trainer.step()
        out.append((time.perf_counter() - w, time.process_time() - c))
    return out


def step_cases(j: Job, steps: int) -> dict[str, Callable[[], list[tuple[float, float]]]]:
    """One callable per method, each running ``steps`` steps and returning per-step (wall, cpu) seconds."""
    frozen = freeze_inputs(
        j.model, j.tokenizer, j.facts, j.unrelated, j.layer, unrelated_token_budget(j.model.config.vocab_size)
    )
    batch = make_batch(j)
    cases: dict[str, Callable] = {site: (lambda s=site: engine_steps(j, frozen, s, steps + 1)) for site in SITES}
    full, naive = Baseline(j, batch, "full"), Baseline(j, batch, "naive", "wv")
    cases["full"] = lambda: baseline_steps(full, steps)
    cases["naive-wv"] = lambda: baseline_steps(naive, steps)
    return cases


def memory_case(model_name: str, case: str, steps: int = 2) -> Callable[[], object]:
    """Subprocess factory: everything a method allocates happens inside the returned call (set-up + steps);
    ``inference`` is a plain forward over the same batch, the reference for the memory target."""
    j = job(model_name)
    if case == "inference":
        batch = make_batch(j)

        def run():
            with torch.no_grad():
                j.model(batch.facts_ids, use_cache=False)
                j.model(batch.text_ids, use_cache=False)

        return run
    if case in SITES:

        def run():
            frozen = freeze_inputs(
                j.model, j.tokenizer, j.facts, j.unrelated, j.layer, unrelated_token_budget(j.model.config.vocab_size)
            )
            engine_steps(j, frozen, case, steps)

        return run

    def run():
        trainer = Baseline(j, make_batch(j), "full" if case == "full" else "naive", "wv")
        baseline_steps(trainer, steps)

    return run


# --------------------------------------------------------------------------------------------------
# Runs.
# --------------------------------------------------------------------------------------------------


def run_steps(model_name: str, repeats: int, steps: int, memory: bool, log=print) -> dict:
    """Per-step time of every method, interleaved (``repeats`` rounds of ``steps`` steps), and memory."""
    j = job(model_name)
    cases = step_cases(j, steps)
    for fn in cases.values():  # warm-up
        fn()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    names = list(cases)
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            samples[name].extend(cases[name]())
    out = {"model": model_name, "layer": j.layer, "layer_reason": j.layer_reason, "rows": {}}
    layout = layout_of(j.model)
    for name in names:
        row = {
            "wall": Stats.of([s[0] for s in samples[name]]).to_dict(),
            "cpu": Stats.of([s[1] for s in samples[name]]).to_dict(),
            "params": (
                layout.site_size(j.model, name, j.layer)
                if name in SITES
                else layout.site_size(j.model, "wv", j.layer)
                if name == "naive-wv"
                else sum(p.numel() for p in j.model.parameters())
            ),
        }
        out["rows"][name] = row
    if memory:
        out["memory"] = {
            case: peak_memory("bench.training:memory_case", model_name=model_name, case=case).to_dict()
            for case in ("inference",) + STEP_CASES
        }
    log(format_steps(out))
    return out


def run_operation(model_name: str, epochs: int | None, log=print) -> dict:
    """Wall time of the whole 8-fact ``wv`` operation (``operate``: diagnosis, training, panels, report)."""
    j = job(model_name)
    layer = j.layer if model_name == "gpt2-shaped" else None  # the demo model: --layer auto, as a user would
    config = SurgeryConfig(site="wv", layer=layer, **({"epochs": epochs} if epochs else {}))
    steps = []
    start = time.perf_counter()
    try:
        result = operate(
            j.model,
            j.tokenizer,
            j.facts,
            config,
            unrelated=j.unrelated,
            panel=j.panel,
            progress=lambda s, *_: steps.append(s),
        )
        outcome = {
            "fixed": f"{sum(f.correct_after for f in result.report.comparison.facts)}/{len(j.facts)}",
            "train_time_s": result.report.train_time_s,
        }
    except SurgeryFailed as e:
        outcome = {"fixed": "not all (SurgeryFailed)", "error": str(e)}
    out = {
        "model": model_name,
        "layer": result.report.layer if layer is None and "error" not in outcome else layer,
        "epochs_budget": config.epochs,
        "steps": len(steps),
        "wall_s": time.perf_counter() - start,
        **outcome,
    }
    log(
        f"operate {model_name}: wv at block {out['layer']}, {out['steps']} steps, {out['wall_s']:.1f} s, "
        f"fixed {out['fixed']}"
    )
    return out


def format_steps(out: dict) -> str:
    rows, full = out["rows"], out["rows"]["full"]["wall"]["median"]
    lines = [f"surgery steps on {out['model']} (block {out['layer']}):"]
    for name, row in rows.items():
        w, c = row["wall"]["median"], row["cpu"]["median"]
        mem = out.get("memory", {}).get(name)
        lines.append(
            f"  {name:9s} {w * 1e3:8.1f} ms/step  x{w / full:.3f} of full "
            f"(cpu x{c / rows['full']['cpu']['median']:.3f})" + (f"  total {mem['total']:.0f} MiB" if mem else "")
        )
    if "memory" in out:
        lines.append(f"  inference total {out['memory']['inference']['total']:.0f} MiB")
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(run_steps("gpt2-shaped", 1, 2, False), indent=1))
