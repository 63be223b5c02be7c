"""``operate``: retrain one site of one block so the facts come out right; write model, patch, report, card."""

from __future__ import annotations

import argparse

from ..arch import block_label
from ..core.errors import InputError, read_input_text
from ..core.progress import progress_bar
from ..edit.editors import METHOD_DESCRIPTIONS, METHODS
from ..edit.memit import MemitHparams
from ..edit.training import TRACE, SurgeryConfig, SurgeryResult, operate
from ..evaluation.facts import load_facts
from ..evaluation.report import format_facts, format_rows, format_wrong
from ..io.export import check_output_dir, write_output
from .common import add_device_arg, add_model_arg, add_panel_arg, load, load_panel_arg, parse_layer, print_json

DEFAULTS = SurgeryConfig()


def add_training_args(p: argparse.ArgumentParser) -> None:
    """Options shared by ``operate``, ``compare-sites`` and ``compare-editors``."""
    p.add_argument(
        "--facts",
        required=True,
        metavar="FILE",
        help='JSON list of {"prompt", "target"} (a panel file works too: its facts are used)',
    )
    p.add_argument(
        "--layer",
        default="auto",
        help="block index (0-indexed) or auto: the diagnosis' prescribed layer of the failing facts (default auto)",
    )
    p.add_argument(
        "--unrelated",
        metavar="TEXT_FILE",
        help="text for the preservation (KL) loss; passages separated by blank lines "
        "(default: the panel's unrelated_text)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=DEFAULTS.epochs,
        help=f"step budget: one epoch = one full-batch Adam step (default {DEFAULTS.epochs}; "
        "stops early once every fact is top-1)",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=DEFAULTS.lr,
        help=f"Adam learning rate (default: {DEFAULTS.lr_scale} x the RMS of the site's weights)",
    )
    p.add_argument(
        "--kl-weight",
        type=float,
        default=DEFAULTS.kl_weight,
        help=f"weight of the KL preservation term (default {DEFAULTS.kl_weight})",
    )
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help=f"random seed (default {DEFAULTS.seed})")
    add_panel_arg(p)
    add_device_arg(p)


def add_method_args(p: argparse.ArgumentParser) -> None:
    """The editors' own options, shared by ``operate`` and ``compare-editors``."""
    p.add_argument(
        "--stat-tokens",
        type=int,
        default=DEFAULTS.stat_tokens,
        help=f"rome, memit, alphaedit: tokens of text for the key statistics (default {DEFAULTS.stat_tokens:,})",
    )
    p.add_argument(
        "--stats-dir",
        metavar="DIR",
        help="rome, memit, alphaedit: where key statistics are cached (default ~/.cache/transformer-surgery/keystats)",
    )
    p.add_argument(
        "--layers",
        metavar="A,B,C",
        help="memit, alphaedit: the blocks to edit, ascending (the papers' fixed layers, e.g. 3,4,5,6,7,8), or "
        f"{TRACE}: the {MemitHparams.span} blocks whose MLPs carry the facts' subjects by causal tracing "
        f"(docs/editors.md); default: {TRACE} with --layer auto when some fact names its subject, else the "
        f"{MemitHparams.span} blocks ending at --layer",
    )


def register(sub) -> None:
    p = sub.add_parser(
        "operate",
        help="retrain one site so the facts come out right, and write the fix",
        description="Single-site surgery: train one site (wv, attn, mlp or layer) of one block on "
        "the facts plus a KL term on unrelated text; every other tensor stays bitwise "
        "identical. Writes the corrected model, patch.safetensors, report.json and "
        "README.md to --out, atomically.",
    )
    add_model_arg(p)
    p.add_argument("--site", default="wv", help="wv | attn | mlp | layer (default wv; for --method wv)")
    p.add_argument(
        "--method",
        default="wv",
        choices=METHODS,
        help="; ".join(f"{m}: {d}" for m, d in METHOD_DESCRIPTIONS.items())
        + " (default wv; --epochs, --lr and --kl-weight are wv's)",
    )
    add_method_args(p)
    add_training_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (refused if it exists)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(run=run)


def config_from_args(args: argparse.Namespace, site: str, layers: bool = True) -> SurgeryConfig:
    """The :class:`SurgeryConfig` of the parsed options; ``layers=False`` leaves ``--layers`` out (compare-editors
    gives them to MEMIT and AlphaEdit only)."""
    return SurgeryConfig(
        site=site,
        method=getattr(args, "method", "wv"),
        stat_tokens=getattr(args, "stat_tokens", DEFAULTS.stat_tokens),
        layers=parse_layers(getattr(args, "layers", None)) if layers else None,
        layer=parse_layer(args.layer),
        lr=args.lr,
        epochs=args.epochs,
        kl_weight=args.kl_weight,
        seed=args.seed,
    )


def parse_layers(text: str | None) -> tuple[int, ...] | str | None:
    """``--layers 3,4,5`` -> ``(3, 4, 5)``, ``--layers trace`` -> ``"trace"``; None without the option. Order and
    range are checked later."""
    if text is None:
        return None
    if text.strip() == TRACE:
        return TRACE
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise InputError(
            f"--layers must be block indices separated by commas (e.g. 3,4,5) or {TRACE}, not {text!r}"
        ) from None


def read_unrelated(path: str | None) -> list[str] | None:
    """Passages of a text file, split at blank lines; None without a file."""
    if path is None:
        return None
    text = read_input_text(path, "--unrelated file")  # a folder or non-UTF-8 bytes: one line, as for --facts
    passages = [p.strip() for p in text.split("\n\n") if p.strip()]
    if not passages:
        raise InputError(f"--unrelated {path} is empty")
    return passages


def run_operate(
    loaded, facts, config: SurgeryConfig, panel, unrelated, desc: str, stats_dir: str | None = None
) -> SurgeryResult:
    """``operate`` with progress bars on stderr (one line each when stderr is not a terminal): the training steps,
    and ROME's key statistics when they are computed."""
    progress, close = progress_bar(desc)
    stats_progress, close_stats = progress_bar("key statistics", unit="token")
    try:
        return operate(
            loaded.model,
            loaded.tokenizer,
            facts,
            config,
            unrelated=unrelated,
            progress=progress,
            panel=panel,
            cache_dir=stats_dir,
            stats_progress=stats_progress,
        )
    finally:
        close_stats()
        close()


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args, args.site)  # bad site/layer/lr: fail before loading anything
    check_output_dir(args.out, args.overwrite)
    facts = load_facts(args.facts)
    unrelated = read_unrelated(args.unrelated)
    loaded = load(args)
    panel = load_panel_arg(args, loaded.model)
    desc = f"surgery {config.site}" if config.method == "wv" else f"surgery {config.method}"
    result = run_operate(loaded, facts, config, panel, unrelated, desc, args.stats_dir)
    out = write_output(args.out, loaded, result, overwrite=args.overwrite)
    if args.json:
        print_json({"out": str(out), **result.report.to_dict()})
        return 0
    r = result.report
    method = "" if r.method == "wv" else f"{r.method}: "
    print(f"{method}site {r.site} of block {r.layer} ({r.block}, {block_label(r.layer)}): {r.layer_reason}")
    print(f"{r.steps} steps in {r.train_time_s:.1f} s (total {r.wall_time_s:.1f} s); final loss {r.final_loss:.4f}")
    print("facts (what each model says):")
    print(format_facts(r.comparison.facts))
    print()
    print(format_rows(r.rows()))
    wrong = r.comparison.wrong_after()
    if wrong:
        print("\nwhat the corrected model says where it is wrong:")
        print(format_wrong(wrong))
    for note in r.notes:
        print(f"note: {note}")
    print(f"\nwritten to {out}")
    return 0
