"""Options and helpers shared by the CLI commands."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from contextlib import contextmanager

import torch

from ..io.loading import LoadedModel, load_model


def add_model_arg(parser: argparse.ArgumentParser, flag: str = "--model", required: bool = True) -> None:
    parser.add_argument(
        flag,
        required=required,
        metavar="PATH_OR_ID",
        help="Hub id (gpt2, distilgpt2, ...) or local folder, e.g. assets/demo-model",
    )


def add_prompt_args(parser: argparse.ArgumentParser) -> None:
    """--prompt, --target, --competitor and --prepend-bos, as every per-prompt analysis takes them."""
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--target", required=True, help="the right answer text, e.g. ' Paris' (first token is used)")
    parser.add_argument("--competitor", help="the wrong answer to compare with (default: the model's top prediction)")
    parser.add_argument(
        "--prepend-bos", action="store_true", help="prepend the BOS token (off: matches model(input_ids))"
    )


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


def add_panel_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--panels",
        metavar="FILE",
        help="evaluation panel JSON (default: the bundled panel for this model; docs/panels.md)",
    )


def load_panel_arg(args: argparse.Namespace, model):
    """The panel given with --panels, or the bundled one for ``model``."""
    from ..evaluation.panels import load_panel, panel_for_model

    return load_panel(args.panels) if getattr(args, "panels", None) else panel_for_model(model)


def parse_layer(text: str) -> int | None:
    """``--layer N|auto`` -> block index or None (auto). Range is checked against the model later."""
    from ..core.errors import InputError

    if text is None or text.strip().lower() == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise InputError(f"--layer must be a block index (0, 1, ...) or auto, not {text!r}") from None


@contextmanager
def sigterm_as_interrupt():
    """While inside, SIGTERM (``kill``, a container stopping) raises KeyboardInterrupt as Ctrl-C does, so the same
    ``finally``/``except`` cleanup runs: no hidden ``.NAME.partial-*`` output folder or ``.tmp-*`` GGUF conversion
    is left behind. A second SIGTERM during that cleanup is ignored (SIGKILL still ends the process). Only the main
    thread can own signal handlers; elsewhere this does nothing. The previous handler is restored on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
