"""Command-line interface: ``python -m surgery <command> ...``.

Each command lives in its own module of this package with a ``register(subparsers)`` function that adds its
parser and sets ``run(args) -> int``. User errors (:class:`surgery.core.errors.SurgeryError`) are printed as one
line on stderr with exit code 2; ``verify`` uses exit code 1 for "the check failed". Ctrl-C and SIGTERM both
interrupt cleanly (half-written outputs removed) with exit code 130.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings

from ..core.errors import SurgeryError
from .common import sigterm_as_interrupt

# Command modules, in the order `--help` lists them; each is named after its command (`apply_patch`: the
# `apply-patch` command, which keeps its name although the thing it applies is now called an edit).
COMMANDS = [
    "diagnose",
    "sites",
    "operate",
    "verify",
    "compare_sites",
    "compare_editors",
    "apply_patch",
    "push",
    "heads",
    "crosscheck",
    "patch_activations",
    "patch_weights",
    "census",
    "repair_census",
    "reproduce",
]

EXIT_USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m surgery",
        description="Diagnose why a transformer language model answers wrong, edit one site, verify and ship the fix.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries(args.verbose)
    try:
        with sigterm_as_interrupt():  # SIGTERM cleans up half-written outputs as Ctrl-C does
            return int(args.run(args) or 0)
    except SurgeryError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _quiet_libraries(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if not verbose:
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore")
