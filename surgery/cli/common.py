"""Options and helpers shared by the CLI commands."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from ..model_io import LoadedModel, load_model


def add_model_arg(parser: argparse.ArgumentParser, flag: str = "--model", required: bool = True) -> None:
    parser.add_argument(flag, required=required, metavar="PATH_OR_ID",
                        help="Hub id (gpt2, distilgpt2, ...) or local folder, e.g. assets/demo-model")


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load(args: argparse.Namespace, flag: str = "model") -> LoadedModel:
    return load_model(getattr(args, flag), device=resolve_device(getattr(args, "device", "auto")))


def print_json(obj) -> None:
    """Exactly one JSON object on stdout."""
    json.dump(obj, sys.stdout, indent=2, allow_nan=False)
    sys.stdout.write("\n")


def head_label(layer: int, head: int) -> str:
    """Human label: 1-indexed layer as in the reference write-up, plus the module index."""
    return f"L{layer + 1} H{head} (h.{layer} head {head})"
