"""``heads``: input-free diagnostics of every attention head (QK overlap, circuit norms, key response, copying)."""

from __future__ import annotations

import argparse

from ..diagnosis.static_heads import HeadStats, StaticHeadConfig, head_table
from ..diagnosis.token_classes import TOKEN_CLASSES
from .common import add_device_arg, add_model_arg, load, print_json


def register(sub) -> None:
    p = sub.add_parser(
        "heads",
        help="static (input-free) diagnostics of every attention head",
        description="From the weights alone: QK overlap, QK and OV circuit norms, key response by "
        "token class and copying score of every (layer, head). See docs/heads.md.",
    )
    add_model_arg(p)
    p.add_argument("--top-k", type=int, default=100, help="input dimensions compared by the QK overlap (default 100)")
    p.add_argument("--copy-sample", type=int, default=1000, help="tokens sampled for the copying score (default 1000)")
    p.add_argument("--class-sample", type=int, default=128, help="tokens sampled per class for the key response")
    p.add_argument("--seed", type=int, default=0, help="seed of the token samples (default 0)")
    p.add_argument("--json", action="store_true", help="print a JSON list, one entry per (layer, head), 0-indexed")
    add_device_arg(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    loaded = load(args)
    config = StaticHeadConfig(
        top_k=args.top_k, copy_sample=args.copy_sample, class_sample=args.class_sample, seed=args.seed
    )
    table = head_table(loaded.model, loaded.tokenizer, config)
    if args.json:
        print_json([s.to_dict() for s in table])
    else:
        print(format_table(table))
    return 0


def format_table(table: list[HeadStats]) -> str:
    """One row per head; key response columns by token class (proper, common, function, punct., number)."""
    short = {
        "proper_noun": "proper",
        "common_word": "common",
        "function_word": "function",
        "punctuation": "punct",
        "number": "number",
    }
    lines = [
        f"{'':<58}key response by token class",
        f"{'head':<8}{'module':<12}{'QK overlap':>11}{'|QK|':>9}{'|OV|':>9}{'copying':>9}"
        + "".join(f"{short[c]:>9}" for c in TOKEN_CLASSES),
    ]
    for s in table:
        keys = "".join(f"{'-':>9}" if s.key_response[c] is None else f"{s.key_response[c]:9.3f}" for c in TOKEN_CLASSES)
        lines.append(
            f"{s.label:<8}{f'h.{s.layer}.{s.head}':<12}{s.qk_overlap:11.2f}{s.qk_norm:9.2f}{s.ov_norm:9.2f}"
            f"{s.copying_score:+9.2f}{keys}"
        )
    lines.append(
        f"QK overlap over the top {table[0].qk_top_k} input dimensions. Layers 1-indexed as in the reference "
        "write-up (L10 = block 9, e.g. transformer.h.9); heads by module index."
    )
    return "\n".join(lines)
