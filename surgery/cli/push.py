"""``push``: upload an output folder to the Hugging Face Hub in one commit."""

from __future__ import annotations

import argparse
import os

from ..io.hub import push_folder


def register(sub) -> None:
    p = sub.add_parser(
        "push",
        help="upload an operate --out folder to the Hub (token from HF_TOKEN)",
        description="Creates the model repo if missing and uploads the folder in one commit. "
        "The token comes from HF_TOKEN (or a saved 'hf auth login'); it is never "
        "printed.",
    )
    p.add_argument("--folder", required=True, metavar="DIR", help="a folder written by operate --out")
    p.add_argument("--repo", required=True, metavar="USER/NAME", help="the Hub model repo")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.set_defaults(run=run)


def hf_token() -> str | None:
    """HF_TOKEN, else the token saved by ``hf auth login``."""
    token = os.environ.get("HF_TOKEN")
    if token:
        return token
    from huggingface_hub import get_token

    return get_token()


def run(args: argparse.Namespace) -> int:
    url = push_folder(args.folder, args.repo, token=hf_token(), private=args.private)
    print(f"pushed {args.folder} to {url}")
    return 0
