"""``patch-activations``: which activations of a clean prompt's run restore its answer in a corrupted prompt?"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..arch import block_label
from ..core.errors import OutputError
from ..patching.activations import KINDS, ActivationPatching, ActivationPatchingConfig, patch_activations
from .common import add_device_arg, add_model_arg, load, print_json


def register(sub) -> None:
    p = sub.add_parser(
        "patch-activations",
        help="activation patching from a clean into a corrupted prompt",
        description="Run a clean and a corrupted prompt of the same token length, then re-run the "
        "corrupted one with one activation taken from the clean run: each block's output "
        "and its attention and MLP outputs at each position, each head's output at all "
        "positions. Prints the fraction of the clean-minus-corrupted logit difference "
        "each patch restores (docs/patching.md).",
    )
    add_model_arg(p)
    p.add_argument("--prompt", required=True, help="the clean prompt, e.g. 'The capital of France is'")
    p.add_argument(
        "--corrupt", required=True, help="the corrupted prompt, same number of tokens, e.g. 'The capital of Poland is'"
    )
    p.add_argument("--target", required=True, help="the clean answer, e.g. ' Paris' (first token is used)")
    p.add_argument("--competitor", help="the answer to compare with (default: the corrupted prompt's top answer)")
    p.add_argument(
        "--kinds", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)} (default: all)"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=ActivationPatchingConfig().batch_size,
        help="patched runs per forward pass (default 32; lower it if memory runs out)",
    )
    p.add_argument("--prepend-bos", action="store_true", help="prepend the BOS token to both prompts")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    p.add_argument("--out", metavar="DIR", help="also write one heatmap PNG per kind (resid.png, ...) to DIR")
    add_device_arg(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    config = ActivationPatchingConfig(kinds=kinds, batch_size=args.batch_size, prepend_bos=args.prepend_bos)
    out = _output_dir(args.out) if args.out else None
    loaded = load(args)
    result = patch_activations(
        loaded.model, loaded.tokenizer, args.prompt, args.corrupt, args.target, args.competitor, config
    )
    written = write_heatmaps(result, out) if out else []
    if args.json:
        print_json({**result.to_dict(), "files": [str(p) for p in written]})
    else:
        print(format_report(result))
        for path in written:
            print(f"wrote {path}")
    return 0


def _output_dir(path: str) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create --out {out}: {e.strerror or e}") from None
    return out


def write_heatmaps(result: ActivationPatching, out: Path) -> list[Path]:
    """One ``{kind}.png`` per grid in ``out``."""
    from ..patching.plots import patching_heatmap

    written = []
    for kind in result.grids:
        path = out / f"{kind}.png"
        try:
            patching_heatmap(result, kind).savefig(path, dpi=120)
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
        written.append(path)
    return written


def format_report(r: ActivationPatching) -> str:
    lines = [
        f"clean       {r.clean_prompt!r}",
        f"corrupted   {r.corrupt_prompt!r}",
        f"target      {r.target.text!r}   competitor {r.competitor.text!r} ({r.competitor_source})",
        f"d = logit(target) - logit(competitor):  clean {r.logit_diff_clean:+.3f}   "
        f"corrupted {r.logit_diff_corrupt:+.3f}",
        "restored = (d(patched) - d(corrupted)) / (d(clean) - d(corrupted)): 1 = clean, 0 = corrupted",
    ]
    for kind, grid in r.grids.items():
        if grid.axis == "head":
            header = [f"H{h}" for h in range(r.n_head)]
            title = "head outputs (z), all positions"
        else:
            header = [a if a == b else f"{a}→{b}" for a, b in zip(r.clean_tokens, r.corrupt_tokens)]
            title = {"resid": "block outputs (residual)", "attn": "attention outputs", "mlp": "MLP outputs"}[
                kind
            ] + ", one position"
        header = [h.strip() for h in header]
        widths = [max(7, len(h) + 2) for h in header]
        lines += ["", f"{kind}: {title}", "  " + " " * 12 + "".join(f"{h:>{w}}" for h, w in zip(header, widths))]
        for layer, row in enumerate(grid.restored):
            label = block_label(layer)
            lines.append(f"  {label:<12}" + "".join(f"{v:>+{w}.2f}" for v, w in zip(row, widths)))
        l, j, v = grid.best()
        if grid.axis == "head":
            where = block_label(l, j, r.blocks)
        else:
            where = f"{block_label(l, blocks=r.blocks)} position {j} {r.clean_tokens[j].strip()!r}"
        lines.append(f"  most restored: {where}: {v:+.3f}")
    return "\n".join(lines)
