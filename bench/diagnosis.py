"""Diagnosis latency and memory at several prompt lengths: a plain HF forward vs ours vs TransformerLens.

* ``hf``: ``model(input_ids)`` — the plain Hugging Face forward (full-vocabulary logits at every position).
* ``ours``: ``surgery.diagnosis.diagnose`` on the same tokens (id-level tokenizer stub): logit lens at every
  layer with the target's rank, attribution of every head, attention bias and MLP, verdict.
* ``tl``: TransformerLens on the same weights (no folding): ``TransformerBridge.run_with_cache``, then
  ``stack_head_results`` + ``apply_ln_to_stack`` for the heads, ``decompose_resid`` for embeddings and MLPs,
  ``accumulated_resid`` + ``apply_ln_to_stack(recompute_ln=True)`` + unembedding for the logit lens — the
  same numbers as ours (``check_tl_matches`` compares them).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from surgery.diagnosis import diagnose
from surgery.arch import layout_of

from . import models
from .measure import interleaved, peak_memory

CASES = ("hf", "ours", "tl")
TARGET_ID = 6342  # any token: the target's identity does not change the cost


def target_id(model: nn.Module) -> int:
    return min(TARGET_ID, model.config.vocab_size - 1)


def prompt_ids(length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, length), generator=g)  # (1, T)


def tl_diagnose(bridge, ids: torch.Tensor, target_id: int) -> dict[str, torch.Tensor]:
    """The diagnosis' numbers, the TransformerLens way. ``ids``: Long[Tensor, "1 T"]."""
    ln_f_weight = bridge.original_model.get_submodule(layout_of(bridge.original_model).adapter.final_norm).weight
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(ids)
        top2 = logits[0, -1].topk(2).indices
        comp = top2[1] if int(top2[0]) == target_id else top2[0]
        tokens = torch.stack([torch.tensor(target_id), comp])
        dirs = bridge.tokens_to_residual_directions(tokens) * ln_f_weight  # (2, d): gamma * u_t
        heads = cache.stack_head_results(layer=-1, pos_slice=-1)  # (L*H, 1, d)
        heads = cache.apply_ln_to_stack(heads, layer=-1, pos_slice=-1)
        parts = cache.decompose_resid(layer=-1, pos_slice=-1, apply_ln=True)  # embed, pos_embed, attn/mlp outs
        resid = cache.accumulated_resid(layer=-1, pos_slice=-1)  # (L+1, 1, d)
        lens = cache.apply_ln_to_stack(resid, layer=-1, pos_slice=-1, recompute_ln=True) @ bridge.W_U
        picked = lens[..., tokens]  # (L+1, 1, 2)
        ranks = (lens > picked[..., :1]).sum(-1) + 1  # (L+1, 1)
    return {"heads": heads[:, 0] @ dirs.T, "parts": parts[:, 0] @ dirs.T, "lens": picked[:, 0], "ranks": ranks[:, 0],
            "competitor": comp}


def make_cases(model: nn.Module, tokenizer, bridge, length: int) -> dict[str, Callable[[], object]]:
    """Zero-argument callables, one per case, on the same prompt of ``length`` tokens."""
    ids, t = prompt_ids(length, model.config.vocab_size), target_id(model)
    text, target = models.IdTokenizer.text(ids[0]), f" {t}"

    def hf():
        with torch.no_grad():
            return model(ids)

    cases = {"hf": hf, "ours": lambda: diagnose(model, tokenizer, text, target)}
    if bridge is not None:
        cases["tl"] = lambda: tl_diagnose(bridge, ids, t)
    return cases


def memory_case(model_name: str, length: int, case: str) -> Callable[[], object]:
    """Subprocess factory for :func:`bench.measure.peak_memory` (the bridge wraps the process' only model)."""
    model, _ = models.load(model_name)
    bridge = models.tl_bridge(model, copy_model=False) if case == "tl" else None
    return make_cases(model, models.IdTokenizer(), bridge, length)[case]


def check_tl_matches(model: nn.Module, bridge, length: int = 16) -> float:
    """Largest difference between TransformerLens' and our head attributions and lens logits (should be ~1e-5)."""
    ids, t = prompt_ids(length, model.config.vocab_size, seed=1), target_id(model)
    ours = diagnose(model, models.IdTokenizer(), models.IdTokenizer.text(ids[0]), f" {t}")
    tl = tl_diagnose(bridge, ids, t)
    assert int(tl["competitor"]) == ours.competitor.token_id
    heads = torch.tensor([[a.target, a.competitor] for a in ours.dla if a.head is not None])
    lens = torch.tensor([[e.target_logit, e.competitor_logit] for e in ours.logit_lens])
    return max(float((heads - tl["heads"]).abs().max()), float((lens - tl["lens"]).abs().max()))


def run(lengths: list[int], repeats: dict[int, int], memory: bool, model_name: str = "gpt2-shaped",
        log=print) -> dict:
    """Time the three cases side by side at each length (and their memory, one subprocess each)."""
    model, _ = models.load(model_name)
    tokenizer = models.IdTokenizer()
    n_ctx = model.config.n_positions
    lengths = [n for n in lengths if n <= n_ctx] + ([n_ctx] if max(lengths) > n_ctx else [])  # the demo: 64
    bridge = models.tl_bridge(model)
    diff = check_tl_matches(model, bridge)
    log(f"TransformerLens vs ours, max |difference| of head attributions and lens logits: {diff:.2e}")
    rows = []
    for length in lengths:
        times = interleaved(make_cases(model, tokenizer, bridge, length), repeats.get(length, max(repeats.values())))
        row = {"length": length, "time": {k: v.to_dict() for k, v in times.items()}}
        if memory:
            row["memory"] = {case: peak_memory("bench.diagnosis:memory_case", model_name=model_name, length=length,
                                               case=case).to_dict() for case in CASES}
        rows.append(row)
        log(format_row(row))
    return {"model": model_name, "tl_max_abs_diff": diff, "rows": rows}


def format_row(row: dict) -> str:
    t = {k: v["wall"]["median"] for k, v in row["time"].items()}
    c = {k: v["cpu"]["median"] for k, v in row["time"].items()}
    text = (f"T={row['length']:5d}  wall ms: hf {t['hf'] * 1e3:7.1f} ours {t['ours'] * 1e3:7.1f} "
            f"tl {t['tl'] * 1e3:7.1f}  ours/hf {t['ours'] / t['hf']:.2f} (cpu {c['ours'] / c['hf']:.2f})  "
            f"tl/ours {t['tl'] / t['ours']:.2f} (cpu {c['tl'] / c['ours']:.2f})")
    if "memory" in row:
        m = row["memory"]
        text += "  transient MiB " + " ".join(f"{c} {m[c]['transient']:.0f}" for c in CASES)
    return text
