"""``verify``: check a corrected model against its base — facts said, no panel regressed.

Everything is judged by what the models say (greedy generation, the whole answer at a word boundary). Exit 0 only
if the corrected model says every fact, no more paraphrases are wrong than before, the unedited facts of the
relation and the general, neighbourhood and side-effect probes each broke at most floor(5%) of their list (0 for
lists under 20), and perplexity is at most 5% higher (:func:`surgery.evaluation.verify.verify`); exit 1 with one
reason per failed check otherwise; 2 for user errors.
"""

from __future__ import annotations

import argparse

from ..evaluation.facts import load_facts
from ..evaluation.report import PERPLEXITY_TOLERANCE, PROBE_TOLERANCE, format_facts, format_rows, format_wrong
from ..evaluation.verify import check_same_vocabulary, verify
from ..io.loading import load_model
from .common import add_device_arg, add_panel_arg, load_panel_arg, print_json, resolve_device

EXIT_FAILED = 1


def register(sub) -> None:
    p = sub.add_parser(
        "verify",
        help="check a corrected model against its base (exit 0 = verified)",
        description="Facts before/after and the evaluation panels for a base and a corrected "
        "model (Hub ids or folders), judged by what each model says. Exit 0 only if "
        "every fact is said after and no panel regresses; otherwise exit 1 with one "
        "reason per failed check.",
    )
    p.add_argument("--base", required=True, metavar="PATH_OR_ID", help="the original model")
    p.add_argument("--corrected", required=True, metavar="PATH_OR_ID", help="the corrected model")
    p.add_argument("--facts", metavar="FILE", help="facts JSON (default: the panel's facts)")
    add_panel_arg(p)
    p.add_argument(
        "--tolerance",
        type=float,
        default=PERPLEXITY_TOLERANCE,
        help=f"allowed relative perplexity increase (default {PERPLEXITY_TOLERANCE})",
    )
    p.add_argument(
        "--probe-tolerance",
        type=float,
        default=PROBE_TOLERANCE,
        help="fraction of each probe list that may go from right to wrong, rounded down "
        f"(default {PROBE_TOLERANCE}: none for lists under 20 probes)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_device_arg(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    facts = load_facts(args.facts) if args.facts else None
    base = load_model(args.base, device=device)
    corrected = load_model(args.corrected, device=device)
    check_same_vocabulary(base.model, corrected.model, base.tokenizer, corrected.tokenizer)
    v = verify(
        base.model,
        corrected.model,
        base.tokenizer,
        facts,
        load_panel_arg(args, base.model),
        perplexity_tolerance=args.tolerance,
        probe_tolerance=args.probe_tolerance,
    )
    c, reasons = v.comparison, v.reasons
    if args.json:
        print_json(
            {
                "verified": not reasons,
                "reasons": reasons,
                "base": base.source,
                "corrected": corrected.source,
                "perplexity_tolerance": args.tolerance,
                "probe_tolerance": args.probe_tolerance,
                **c.to_dict(),
            }
        )
    else:
        print(f"base       {base.source}\ncorrected  {corrected.source}\nfacts (what each model says):")
        print(format_facts(c.facts))
        print()
        print(format_rows(c.rows()))
        wrong = c.wrong_after()
        if wrong:
            print("\nwhat the corrected model says where it is wrong:")
            print(format_wrong(wrong))
        print()
        print("VERIFIED" if not reasons else "NOT VERIFIED:\n" + "\n".join(f"  - {r}" for r in reasons))
    return 0 if not reasons else EXIT_FAILED
