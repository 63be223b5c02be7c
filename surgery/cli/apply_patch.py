"""``apply-patch``: rebuild the corrected model from the base and ``patch.safetensors``."""

from __future__ import annotations

import argparse

from ..io.edit_file import Edit
from ..io.export import check_output_dir, write_edited_model
from .common import add_device_arg, load


def register(sub) -> None:
    p = sub.add_parser(
        "apply-patch",
        help="rebuild a corrected model from its base and a patch file",
        description="Applies patch.safetensors (written by operate) to the base model and writes "
        "the corrected model folder. A patch made for another base is refused.",
    )
    p.add_argument("--base", required=True, metavar="PATH_OR_ID", help="the base model the patch was made from")
    p.add_argument("--patch", required=True, metavar="FILE", help="patch.safetensors")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (refused if it exists)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_device_arg(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    edit = Edit.load(args.patch)
    check_output_dir(args.out, args.overwrite)
    loaded = load(args, "base")
    out = write_edited_model(args.out, loaded, edit, overwrite=args.overwrite)
    blocks = f"block {edit.layer}" if len(edit.layers) == 1 else f"blocks {', '.join(map(str, edit.layers))}"
    print(f"applied {edit.site} patch of {blocks} ({edit.numel:,} parameters) to {loaded.source}")
    print(f"written to {out}")
    return 0
