"""``census``: diagnose every fact of one or more datasets; verdicts per relation, summary, report and plots.

Several processes: launched with ``torchrun --nproc_per_node N -m surgery census ...`` (CPU, gloo) or
``accelerate launch --multi_gpu -m surgery census ...`` (one GPU each), the facts are split across the processes
with accelerate's ``PartialState`` and merged into the same ``census.jsonl`` a single process writes.
"""

from __future__ import annotations

import argparse
import os

from ..census.report import outcome_table, verdict_table
from ..census.run import CensusConfig, SingleProcess, run_census
from ..core.errors import InputError
from ..core.progress import progress_bar
from ..diagnosis.diagnose import DiagnosisConfig
from ..evaluation.facts import load_facts
from ..io.loading import load_model
from .common import add_device_arg, add_model_arg, load, resolve_device

DEFAULTS = DiagnosisConfig()


def register(sub) -> None:
    p = sub.add_parser(
        "census",
        help="diagnose every fact of a dataset: verdicts per relation, report, plots",
        description="Batched diagnosis of every fact in JSONL fact files (docs/facts.md). Writes "
        "DIR/census.jsonl (one diagnosis per fact, appended per batch: an interrupted "
        "run resumes where it stopped), DIR/summary.json and DIR/report.md with plots.",
    )
    add_model_arg(p)
    p.add_argument(
        "--facts",
        required=True,
        nargs="+",
        metavar="FILE",
        help="JSONL fact files or folders of them (e.g. assets/facts)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created; resumed if it holds a census)")
    p.add_argument("--batch-size", type=int, default=128, help="prompts per forward pass (default 128)")
    p.add_argument("--limit", type=int, help="diagnose only the first N facts (after skipping ambiguous ones)")
    p.add_argument("--include-ambiguous", action="store_true", help="also diagnose facts flagged ambiguous")
    p.add_argument(
        "--routing-rank",
        type=int,
        default=DEFAULTS.routing_rank,
        help=f"lens rank that counts as holding the answer (default {DEFAULTS.routing_rank})",
    )
    p.add_argument(
        "--routing-from",
        type=float,
        default=DEFAULTS.routing_from,
        help=f"fraction of the stack from which the lens counts (default {DEFAULTS.routing_from})",
    )
    p.add_argument("--prepend-bos", action="store_true", help="prepend the BOS token (off: matches model(input_ids))")
    add_device_arg(p)
    p.add_argument(
        "--device-map",
        metavar="auto",
        help="spread a model larger than one device over GPUs/CPU/disk (accelerate big-model inference; "
        "one process); --device is then ignored",
    )
    p.add_argument("--offload-folder", metavar="DIR", help="where --device-map puts blocks offloaded to disk")
    p.set_defaults(run=run)


def process_group(device: str):
    """accelerate's ``PartialState`` when launched by torchrun / accelerate with several processes, else one."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return SingleProcess()
    from accelerate import PartialState

    return PartialState(cpu=device == "cpu" or resolve_device("auto").type == "cpu")


def run(args: argparse.Namespace) -> int:
    facts = load_facts(args.facts)
    unlabelled = next((f for f in facts if f.relation is None), None)
    if unlabelled is not None:  # a JSON facts list: a census counts verdicts per relation
        raise InputError(
            f"a census reads fact datasets (.jsonl lines with 'relation' and 'subject', docs/facts.md); "
            f"the fact {unlabelled.prompt!r} has no relation"
        )
    config = CensusConfig(
        batch_size=args.batch_size,
        limit=args.limit,
        include_ambiguous=args.include_ambiguous,
        diagnosis=DiagnosisConfig(
            routing_rank=args.routing_rank, routing_from=args.routing_from, prepend_bos=args.prepend_bos
        ),
    )
    state = process_group(args.device)
    if state.num_processes > 1 and resolve_device(args.device).type != "cpu":
        args.device = str(state.device)  # one GPU per process
    if args.device_map:
        if state.num_processes > 1:
            raise InputError("--device-map spreads one model over the devices: run it in a single process")
        loaded = load_model(args.model, device_map=args.device_map, offload_folder=args.offload_folder)
    else:
        loaded = load(args)
    progress, close = _progress_bar(state)
    try:
        result = run_census(
            loaded.model,
            loaded.tokenizer,
            facts,
            args.out,
            config,
            model_name=args.model,
            state=state,
            progress=progress,
        )
    finally:
        close()
    if state.is_main_process:
        s = result.summary
        print(
            f"{result.selected} facts ({result.skipped_ambiguous} ambiguous skipped); {result.already_done} "
            f"were already in {args.out}"
        )
        all_ = s["outcomes"]["all"]
        print(
            f"what the model says ({all_['says_later']} say the answer a little later, "
            f"{all_['generic_first_piece']} miss a generic first piece: neither counted as routing)"
        )
        print(outcome_table(s))
        print("\ndiagnosis verdicts (a multi-token answer at its first missed piece)")
        print(verdict_table(s))
        moved = sum(s["rule_change"]["all"].values())
        print(f"\nverdicts moved by the routing rule (old -> new): {moved} {s['rule_change']['all'] or ''}")
        print(f"wrote {os.path.join(args.out, 'census.jsonl')}, summary.json, report.md and plots")
    return 0


def _progress_bar(state):
    """A progress bar on stderr (one line off a terminal), on the main process only; ``progress(done, total)``
    and a closer."""
    if not state.is_main_process:
        return (lambda done, total: None), (lambda: None)
    n = state.num_processes
    bar, close = progress_bar("census" if n == 1 else f"census (process 0 of {n})", unit="fact")
    return (lambda done, total: bar(min(done * n, total), total)), close
