"""``patch-weights``: copy one component's weights at a time from a donor model (or ablate them) and score facts."""

from __future__ import annotations

import argparse

from ..arch import Layout
from ..core.errors import InputError
from ..evaluation.facts import load_facts
from ..patching.weights import ABLATIONS, GRANULARITIES, WeightPatching, ablate_weights, patch_weights
from .common import add_device_arg, load, print_json


def register(sub) -> None:
    p = sub.add_parser(
        "patch-weights",
        help="which component's weights make a donor answer differently?",
        description="Copy one component at a time from --donor into --recipient (two models of the "
        "same architecture, e.g. a base and its corrected version) and score the facts "
        "on each hybrid; or, with --ablate, zero or mean-ablate each component of "
        "--recipient alone. Components: each block's wv, attn, mlp and layer sites, or "
        "with --granularity head each head's V and O slices. Identical weights are "
        "skipped. Neither model is modified (docs/patching.md).",
    )
    p.add_argument("--recipient", required=True, metavar="PATH_OR_ID", help="the model that receives the weights")
    p.add_argument("--donor", metavar="PATH_OR_ID", help="the model the weights come from (same architecture)")
    p.add_argument(
        "--ablate",
        metavar="MODE",
        help=f"{' or '.join(ABLATIONS)}: ablate the recipient's components instead of patching from a donor",
    )
    p.add_argument(
        "--facts",
        required=True,
        metavar="FILE",
        help='JSON list of {"prompt", "target"} (a panel file works too: its facts are used)',
    )
    p.add_argument("--granularity", default="site", help=f"{' or '.join(GRANULARITIES)} (default site)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    add_device_arg(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.granularity not in GRANULARITIES:
        raise InputError(f"--granularity must be {' or '.join(GRANULARITIES)}, not {args.granularity!r}")
    if (args.donor is None) == (args.ablate is None):
        raise InputError(
            "give either --donor MODEL to patch weights from, or --ablate zero|mean to ablate the "
            "recipient's own weights (not both)"
        )
    if args.ablate is not None and args.ablate not in ABLATIONS:
        raise InputError(f"--ablate must be {' or '.join(ABLATIONS)}, not {args.ablate!r}")
    facts = load_facts(args.facts)
    recipient = load(args, "recipient")
    if args.donor is not None:
        donor = load(args, "donor")
        if recipient.tokenizer.get_vocab() != donor.tokenizer.get_vocab():
            raise InputError(
                "the recipient and the donor use different vocabularies: weights can only be patched "
                "between models of one tokenizer"
            )
        result = patch_weights(recipient.model, donor.model, recipient.tokenizer, facts, args.granularity)
    else:
        result = ablate_weights(recipient.model, recipient.tokenizer, facts, args.ablate, args.granularity)
    if args.json:
        print_json({"recipient_model": recipient.source, "donor_model": args.donor, **result.to_dict()})
    else:
        print(format_report(result, recipient.source, args.donor, recipient.layout))
    return 0


def format_report(r: WeightPatching, recipient: str, donor: str | None, layout: Layout) -> str:
    n = r.facts_total
    lines = [f"recipient   {recipient}: {r.recipient_correct}/{n} facts right"]
    if r.mode == "donor":
        lines.append(f"donor       {donor}: {r.donor_correct}/{n} facts right")
        lines.append("each row: the recipient with that component's weights from the donor")
    else:
        lines.append(f"each row: the recipient with that component's weights {r.mode}-ablated")
    width = max(20, len(layout.label(layout.n_layer - 1, layout.n_head - 1)) + 8)
    lines += ["", f"  {'component':<{width}}{'facts':>8}{'mean d target logit':>22}   fixed / broken"]
    for c in r.components:
        name = f"{layout.label(c.layer, c.head)} {c.name}"
        lines.append(
            f"  {name:<{width}}{f'{c.facts_correct}/{n}':>8}{c.mean_target_logit_change:>+22.3f}   "
            f"{len(c.fixed)} / {len(c.broken)}"
        )
    if not r.components:
        lines.append("  (no component differs)")
    lines.append(f"\n{r.skipped_identical} component(s) skipped: their weights would not change")
    best = r.best()
    if best is not None:
        lines.append(
            f"largest mean target-logit gain: {layout.label(best.layer, path=True)} {best.name}"
            + ("" if best.head is None else f" head {best.head}")
            + f" ({best.mean_target_logit_change:+.3f}, {best.facts_correct}/{n} right)"
        )
    return "\n".join(lines)
