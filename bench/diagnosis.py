"""Diagnosis latency and memory at several prompt lengths: a plain HF forward vs ours vs TransformerLens.

* ``hf``: ``model(input_ids)`` — the plain Hugging Face forward (full-vocabulary logits at every position).
* ``ours``: ``surgery.diagnosis.diagnose.diagnose`` on the same tokens (id-level tokenizer stub): logit lens at every
  layer with the target's rank, attribution of every head, attention bias and MLP, verdict.
* ``tl``: TransformerLens on the same weights (no folding): ``TransformerBridge.run_with_cache``, then
  ``stack_head_results`` + ``apply_ln_to_stack`` for the heads, ``decompose_resid`` for embeddings and MLPs,
  ``accumulated_resid`` + ``apply_ln_to_stack(recompute_ln=True)`` + unembedding for the logit lens — the
  same numbers as ours (``check_tl_matches`` compares them). Families with a norm after attention (Gemma 2/3)
  get the head results multiplied by that norm's frozen scale (its gain over the cached ``hook_scale``), the
  same linearisation as ours; RMSNorm gains with Gemma's ``1 + w`` offset follow ``cfg.rmsnorm_uses_offset``.
* ``tl-lean`` (optional, ``lean=True``): the same, but ``run_with_cache`` keeps only the hooks the diagnosis
  reads, at the last position only (``names_filter`` + ``pos_slice=-1``) — what a TransformerLens expert would
  write to save memory; a stronger baseline than the idiomatic full cache.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from surgery.arch import layout_of
from surgery.diagnosis.diagnose import diagnose

from . import models
from .measure import interleaved, peak_memory

CASES = ("hf", "ours", "tl")
TARGET_ID = 6342  # any token: the target's identity does not change the cost


def target_id(model: nn.Module) -> int:
    return min(TARGET_ID, model.config.vocab_size - 1)


def prompt_ids(length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, length), generator=g)  # (1, T)


# The hooks the diagnosis reads, for the lean variant (suffixes of the bridge's hook names).
LEAN_HOOKS = (
    "hook_z",
    "hook_embed",
    "hook_pos_embed",
    "hook_attn_out",
    "hook_mlp_out",
    "hook_resid_pre",
    "hook_resid_post",
    "ln_final.hook_scale",
    "ln1_post.hook_scale",
)


def _gain(bridge, norm) -> torch.Tensor:
    """A bridged norm's elementwise gain: ``w``, or ``1 + w`` for Gemma's RMSNorm. Float[Tensor, "d"]."""
    w = norm.original_component.weight
    return w + 1.0 if getattr(bridge.cfg, "rmsnorm_uses_offset", False) else w


def tl_diagnose(bridge, ids: torch.Tensor, target_id: int, lean: bool = False) -> dict[str, torch.Tensor]:
    """The diagnosis' numbers, the TransformerLens way. ``ids``: Long[Tensor, "1 T"]. ``lean``: cache only the
    hooks needed, at the last position."""
    n_layer, n_head = bridge.cfg.n_layers, bridge.cfg.n_heads
    post_norm = hasattr(bridge.blocks[0], "ln1_post")
    with torch.no_grad():
        if lean:
            logits, cache = bridge.run_with_cache(
                ids, names_filter=lambda name: name.endswith(LEAN_HOOKS), pos_slice=-1
            )
        else:
            logits, cache = bridge.run_with_cache(ids)
        top2 = logits[0, -1].topk(2).indices
        comp = top2[1] if int(top2[0]) == target_id else top2[0]
        tokens = torch.stack([torch.tensor(target_id), comp])
        dirs = bridge.tokens_to_residual_directions(tokens) * _gain(bridge, bridge.ln_final)  # (2, d): gamma * u_t
        heads = cache.stack_head_results(layer=-1, pos_slice=-1)  # (L*H, 1, d): z_h W_O^h
        if post_norm:  # what the residual receives: the post-norm's output, its scale frozen from the run
            scale = torch.stack(
                [
                    _gain(bridge, bridge.blocks[l].ln1_post) / cache[f"blocks.{l}.ln1_post.hook_scale"][:, -1]
                    for l in range(n_layer)
                ]
            )
            heads = (heads.view(n_layer, n_head, *heads.shape[1:]) * scale[:, None]).flatten(0, 1)  # (L*H, 1, d)
        heads = cache.apply_ln_to_stack(heads, layer=-1, pos_slice=-1)
        parts = cache.decompose_resid(layer=-1, pos_slice=-1, apply_ln=True)  # embed, pos_embed, attn/mlp outs
        resid = cache.accumulated_resid(layer=-1, pos_slice=-1)  # (L+1, 1, d)
        lens = cache.apply_ln_to_stack(resid, layer=-1, pos_slice=-1, recompute_ln=True) @ bridge.W_U
        picked = lens[..., tokens]  # (L+1, 1, 2)
        ranks = (lens > picked[..., :1]).sum(-1) + 1  # (L+1, 1)
    return {
        "heads": heads[:, 0] @ dirs.T,
        "parts": parts[:, 0] @ dirs.T,
        "lens": picked[:, 0],
        "ranks": ranks[:, 0],
        "competitor": comp,
    }


def make_cases(model: nn.Module, tokenizer, bridge, length: int, lean: bool = False) -> dict[str, Callable[[], object]]:
    """Zero-argument callables, one per case, on the same prompt of ``length`` tokens (``tl-lean`` too with
    ``lean``)."""
    ids, t = prompt_ids(length, model.config.vocab_size), target_id(model)
    text, target = models.IdTokenizer.text(ids[0]), f" {t}"

    def hf():
        with torch.no_grad():
            return model(ids)

    cases = {"hf": hf, "ours": lambda: diagnose(model, tokenizer, text, target)}
    if bridge is not None:
        cases["tl"] = lambda: tl_diagnose(bridge, ids, t)
        if lean:
            cases["tl-lean"] = lambda: tl_diagnose(bridge, ids, t, lean=True)
    return cases


def memory_case(model_name: str, length: int, case: str) -> Callable[[], object]:
    """Subprocess factory for :func:`bench.measure.peak_memory` (the bridge wraps the process' only model)."""
    model, _ = models.load(model_name)
    bridge = models.tl_bridge(model, copy_model=False) if case.startswith("tl") else None
    return make_cases(model, models.IdTokenizer(), bridge, length, lean=case == "tl-lean")[case]


def check_tl_matches(model: nn.Module, bridge, length: int = 16, lean: bool = False, relative: bool = False) -> float:
    """Largest difference between TransformerLens' and our head attributions and lens logits (should be ~1e-5;
    ``relative``: divided by the largest |lens logit|). The lens ranks must be equal wherever ours is within the
    top 1,000 (the verdict reads ranks <= 3; far down a 262k vocabulary, logits tie to the last bit and a rank can
    move by one with the order of a float sum)."""
    ids, t = prompt_ids(length, model.config.vocab_size, seed=1), target_id(model)
    ours = diagnose(model, models.IdTokenizer(), models.IdTokenizer.text(ids[0]), f" {t}")
    tl = tl_diagnose(bridge, ids, t, lean=lean)
    assert int(tl["competitor"]) == ours.competitor.token_id
    heads = torch.tensor([[a.target, a.competitor] for a in ours.dla if a.head is not None])
    lens = torch.tensor([[e.target_logit, e.competitor_logit] for e in ours.logit_lens])
    ranks = torch.tensor([e.target_rank for e in ours.logit_lens])
    near = ranks <= 1000
    assert torch.equal(ranks[near], tl["ranks"].cpu()[near]), (ranks, tl["ranks"])
    diff = max(float((heads - tl["heads"]).abs().max()), float((lens - tl["lens"]).abs().max()))
    return diff / float(lens.abs().max()) if relative else diff


def run(
    lengths: list[int],
    repeats: dict[int, int],
    memory: bool,
    model_name: str = "gpt2-shaped",
    log=print,
    lean: bool = False,
) -> dict:
    """Time the cases side by side at each length (and their memory, one subprocess each)."""
    model, _ = models.load(model_name)
    tokenizer = models.IdTokenizer()
    n_ctx = layout_of(model).n_ctx
    lengths = [n for n in lengths if n <= n_ctx] + ([n_ctx] if max(lengths) > n_ctx else [])  # the demo: 64
    bridge = models.tl_bridge(model)
    diff = check_tl_matches(model, bridge)
    rel = check_tl_matches(model, bridge, relative=True)
    if lean:
        diff = max(diff, check_tl_matches(model, bridge, lean=True))
        rel = max(rel, check_tl_matches(model, bridge, lean=True, relative=True))
    log(
        f"TransformerLens vs ours, max |difference| of head attributions and lens logits: {diff:.2e} "
        f"({rel:.1e} of the largest lens logit); lens ranks equal"
    )
    cases = CASES + (("tl-lean",) if lean else ())
    rows = []
    for length in lengths:
        times = interleaved(
            make_cases(model, tokenizer, bridge, length, lean), repeats.get(length, max(repeats.values()))
        )
        row = {"length": length, "time": {k: v.to_dict() for k, v in times.items()}}
        if memory:
            row["memory"] = {
                case: peak_memory(
                    "bench.diagnosis:memory_case", model_name=model_name, length=length, case=case
                ).to_dict()
                for case in cases
            }
        rows.append(row)
        log(format_row(row))
    return {"model": model_name, "tl_max_abs_diff": diff, "tl_max_rel_diff": rel, "rows": rows}


def format_row(row: dict) -> str:
    t = {k: v["wall"]["median"] for k, v in row["time"].items()}
    c = {k: v["cpu"]["median"] for k, v in row["time"].items()}
    text = (
        f"T={row['length']:5d}  wall ms: hf {t['hf'] * 1e3:7.1f} ours {t['ours'] * 1e3:7.1f} "
        f"tl {t['tl'] * 1e3:7.1f}  ours/hf {t['ours'] / t['hf']:.2f} (cpu {c['ours'] / c['hf']:.2f})  "
        f"tl/ours {t['tl'] / t['ours']:.2f} (cpu {c['tl'] / c['ours']:.2f})"
    )
    if "tl-lean" in t:
        text += f"  tl-lean/ours {t['tl-lean'] / t['ours']:.2f}"
    if "memory" in row:
        m = row["memory"]
        text += "  transient MiB " + " ".join(f"{c} {m[c]['transient']:.0f}" for c in m)
    return text
