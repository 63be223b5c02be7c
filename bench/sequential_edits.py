"""Sequential editing (issue 20, experiment (c)): rounds of facts, each round edited on the previous round's result,
every round's facts re-checked by greedy generation after the last round.

    .venv/bin/python -m bench.sequential_edits --model gemma3-270m --census runs/census-gemma/census.jsonl \\
        --rounds 3 --per-round 4 --methods wv,memit,alphaedit --out /tmp/seq

The facts: routing failures of the census (its ``census.jsonl``) that the model does not say, at the census' most
common prescribed block, drawn with ``--seed`` (a reference fact file given with ``--exclude`` is left out), split
into ``--rounds`` rounds of ``--per-round``. Each round runs :func:`~surgery.edit.training.operate` (``layer`` auto,
``require_all=False``) on the model the previous round left: a view of the base with every earlier edit applied in
turn (:func:`~surgery.io.edit_file.edited_model` composes), so the base is never mutated. Each round's own
evaluation is slimmed to the edited facts (the panel's probe lists dropped; its unrelated text, perplexity passage
and ``preserve`` list, which the wv repair trains with, kept); after the last round the chained model is judged
against the base once with the full panel, and every round's facts are re-checked one by one.

Two choices follow the sequential protocols of the papers rather than ``operate``'s single-edit defaults:

- the key statistics ``C`` (ROME, MEMIT, AlphaEdit) are those of the base model, estimated once; ``operate`` alone
  would re-estimate them on every round's model, since their cache key hashes the edited block's weights;
- AlphaEdit carries ``K_p K_pᵀ``, the keys of the facts edited in earlier rounds (its sequential term:
  :func:`~surgery.edit.memit.apply_alphaedit`'s ``previous``), which ``operate``, editing one round, does not pass.

Writes ``sequential.json`` and ``sequential.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import random
import subprocess
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from surgery import load_facts, load_model
from surgery.arch import layout_of
from surgery.census.report import outcome
from surgery.cli.operate import parse_layers
from surgery.core.errors import InputError, NonFiniteError, SurgeryFailed
from surgery.edit import editors, memit
from surgery.edit.compare import editor_configs, method_config
from surgery.edit.training import SurgeryConfig, operate, preservation_texts
from surgery.evaluation.facts import Fact
from surgery.evaluation.generation import said
from surgery.evaluation.memo import EvaluationMemo
from surgery.evaluation.panels import Panel, panel_for_model
from surgery.evaluation.report import compare
from surgery.io.edit_file import edited_model

log = logging.getLogger(__name__)


def pick_facts(census: Path, n: int, seed: int, exclude: set[str]) -> tuple[list[Fact], int]:
    """``n`` routing failures of ``census`` (a census.jsonl): the census' ``routing`` outcome, so not the facts the
    model says (first or a little later) nor those missing only a generic first piece; all at the census' most
    common prescribed block, drawn with ``seed``; prompts in ``exclude`` left out. Each keeps the census' subject
    (where ROME, MEMIT and AlphaEdit read their key). Returns them and the block."""
    rows = [json.loads(line) for line in census.read_text().splitlines() if line.strip()]
    routing = [r for r in rows if outcome(r) == "routing" and r["prompt"] not in exclude]
    block = Counter(r["prescribed_layer"] for r in routing).most_common(1)[0][0]
    pool = sorted((r for r in routing if r["prescribed_layer"] == block), key=lambda r: r["prompt"])
    if len(pool) < n:
        raise InputError(f"the census has {len(pool)} routing failures at block {block}, fewer than {n}")
    picked = random.Random(seed).sample(pool, n)
    return [Fact(r["prompt"], r["target"], subject=r.get("subject")) for r in picked], block


def slim_panel(panel: Panel) -> Panel:
    """``panel`` without its probe lists: a round's own evaluation judges the edited facts; what the wv repair
    trains with (unrelated text, ``preserve``) and the perplexity passage stay."""
    return replace(panel, facts=(), absence=(), general=(), side_effects=(), neighbourhood=(), relation=())


@contextlib.contextmanager
def sequential_protocol(base: nn.Module, memory: dict[int, Tensor]) -> Iterator[None]:
    """Inside: key statistics always from ``base`` (computed once, then cached), and AlphaEdit solving with
    ``memory[l]`` (``K_p K_pᵀ`` of block ``l``'s earlier edited keys) and adding its own keys to it."""
    key_statistics, apply_alphaedit = editors.key_statistics, editors.apply_alphaedit

    def base_statistics(_model, tokenizer, layer, **kwargs):
        return key_statistics(base, tokenizer, layer, **kwargs)

    def alphaedit_remembering(model, tokenizer, facts, layers, stats, hp, check=None, post_norm=False):
        weights, targets, dims = apply_alphaedit(
            model, tokenizer, facts, layers, stats, hp, check, dict(memory), post_norm
        )
        layout = layout_of(model)
        matrices = {layer: layout.mlp_out_matrix(w).float() for layer, w in weights.items()}
        for layer in layers:
            # a key at block l depends on the blocks below l only, so reading it with every block updated gives
            # the key the update of block l was solved with
            keys, _ = memit.keys_and_residuals(model, tokenizer, targets, layer, max(layers), matrices)  # (d_mlp, n)
            memory[layer] = memory.get(layer, 0) + keys @ keys.T
        return weights, targets, dims

    editors.key_statistics, editors.apply_alphaedit = base_statistics, alphaedit_remembering
    try:
        yield
    finally:
        editors.key_statistics, editors.apply_alphaedit = key_statistics, apply_alphaedit


def judged(model: nn.Module, tokenizer, facts: Sequence[Fact]) -> list[dict]:
    """Each fact's greedy continuation and whether it says the target (strict: the whole answer first)."""
    out = said(model, tokenizer, [f.prompt for f in facts], [f.target for f in facts])
    return [{"prompt": f.prompt, "target": f.target, "said": j.strict, "text": t} for f, (t, j) in zip(facts, out)]


def run_chain(
    base: nn.Module,
    tokenizer,
    rounds: Sequence[Sequence[Fact]],
    method: str,
    panel: Panel,
    base_memo: EvaluationMemo,
    config: SurgeryConfig = SurgeryConfig(),
    layers: Sequence[int] | None = None,
) -> dict:
    """Edit ``rounds`` in turn with ``method``, each on the previous round's result; then re-check every round and
    judge the chained model against ``base`` with the full ``panel``. ``base`` is never mutated. ``layers``: MEMIT's
    and AlphaEdit's blocks (``--layers``), as in ``compare-editors``."""
    current, per_round, memory = base, [], {}
    t0 = time.perf_counter()
    with sequential_protocol(base, memory):
        for i, facts in enumerate(rounds):
            t = time.perf_counter()
            entry = {"round": i + 1, "facts": len(facts)}
            try:
                result = operate(
                    current,
                    tokenizer,
                    facts,
                    method_config(config, method, layers),
                    panel=slim_panel(panel),
                    require_all=False,
                )
            except (InputError, SurgeryFailed, NonFiniteError) as e:  # e.g. earlier rounds already fixed them all
                entry |= {"error": str(e), "wall_time_s": time.perf_counter() - t}
                log.info("%s round %d: %s", method, i + 1, e)
                per_round.append(entry)
                continue
            r = result.report
            e = r.comparison.evaluation()
            current = edited_model(current, result.edit)
            entry |= {
                "layer": r.layer,
                "layers": r.config.get("layers"),
                "said_before": e["efficacy"]["before"],
                "said_after": e["efficacy"]["after"],
                "params_changed": r.weights.params_changed,
                "delta_l2": r.weights.delta_l2,
                "wall_time_s": time.perf_counter() - t,
            }
            log.info("%s round %d: %d/%d said", method, i + 1, entry["said_after"], len(facts))
            per_round.append(entry)
    edit_s = time.perf_counter() - t0
    recheck = [judged(current, tokenizer, facts) for facts in rounds]
    everything = [f for facts in rounds for f in facts]
    texts, _ = preservation_texts(panel, tokenizer, layout_of(base).n_ctx, None)
    final = compare(base, current, tokenizer, everything, panel, texts, memo=base_memo).evaluation()
    spec = final["specificity"]
    return {
        "method": method,
        "rounds": per_round,
        "recheck": recheck,
        "retained_per_round": [sum(j["said"] for j in rs) for rs in recheck],
        "final": {
            "efficacy": final["efficacy"],
            "paraphrase": final["paraphrase"],
            "relation": final["relation"],
            "neighbourhood": spec["neighbourhood"],
            "general": final["general"],
            "side_effects": spec["side_effects"],
            "fluency": final["fluency"],
            "kl_unrelated": final["kl_unrelated"],
            "perplexity": final["perplexity"],
        },
        "edit_wall_time_s": edit_s,
        "wall_time_s": time.perf_counter() - t0,
    }


def _count(c: dict) -> str:
    if not c or c.get("total", 0) == 0:
        return "—"
    extra = (f" +{c['fixed']}" if c.get("fixed") else "") + (f" −{c['broken']}" if c.get("broken") else "")
    return f"{c['after']}/{c['total']}{extra}"


def to_markdown(out: dict) -> str:
    """The chains as a Markdown page: rounds, what each round still says after the last, the final judgement."""
    rounds, per = out["setup"]["rounds"], out["setup"]["per_round"]
    lines = [
        f"# Sequential editing on {out['setup']['model']}: {rounds} rounds of {per} facts",
        "",
        f"Commit {out['setup']['commit']}, {out['setup']['date']}, {out['setup']['machine']}; load at start / end: "
        f"{out['setup']['load_start']} / {out['setup']['load_end']}. Facts: {rounds * per} "
        + (
            f"routing failures of the census at block {out['setup']['block']} (seed {out['setup']['seed']})"
            if out["setup"]["block"] is not None
            else f"the first of {out['setup']['source']}"
        )
        + " (listed in sequential.json).",
        "",
        "| method | said right after each round | still said after the last round (per round) | all facts after last |"
        " unedited facts of the relation | neighbourhood | general | side effects | KL unrelated | perplexity |"
        " wall time |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in out["chains"]:
        after = ", ".join(f"{r['said_after']}/{r['facts']}" if "said_after" in r else "— (†)" for r in c["rounds"])
        kept = ", ".join(f"{n}/{len(rs)}" for n, rs in zip(c["retained_per_round"], c["recheck"]))
        f = c["final"]
        lines.append(
            f"| **{c['method']}** | {after} | {kept} | {f['efficacy']['after']}/{f['efficacy']['total']} | "
            f"{_count(f['relation'])} | {_count(f['neighbourhood'])} | {_count(f['general'])} | "
            f"{_count(f['side_effects'])} | {f['kl_unrelated']:.2e} | "
            f"{f['perplexity']['before']:.2f} → {f['perplexity']['after']:.2f} | {c['wall_time_s']:.0f} s |"
        )
    lines += [
        "",
        "Each round is edited on the previous round's result; the columns after the first are judged after the last"
        " round, against the base model (greedy generation, the whole answer at a word boundary). Key statistics: the"
        " base model's, estimated once; AlphaEdit keeps the earlier rounds' keys (K_p K_pᵀ).",
        "",
    ]
    failed = [(c["method"], i, r["error"]) for c in out["chains"] for i, r in enumerate(c["rounds"], 1) if "error" in r]
    if failed:
        lines += ["† Rounds that did not edit (the chain went on with the model as it was):", ""]
        lines += [f"- {method}, round {i}: {error}" for method, i, error in failed]
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--census", type=Path, help="a census' census.jsonl (the facts are drawn from it)")
    p.add_argument("--facts", type=Path, help="instead of --census: a facts JSON, taken in order")
    p.add_argument("--exclude", type=Path, help="a facts JSON whose prompts are not drawn (the reference facts)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--per-round", type=int, default=12)
    p.add_argument("--methods", default="wv,memit,alphaedit")
    p.add_argument(
        "--layers",
        help="MEMIT's and AlphaEdit's blocks, e.g. 2,3,4,5,6, or trace (causal tracing of each round's facts; "
        "default: traced, as operate does with --layer auto)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.manual_seed(args.seed)
    layers = parse_layers(args.layers)
    editor_configs(args.methods.split(","), layers=layers)  # bad methods or layers: refused before any work
    n = args.rounds * args.per_round
    if args.facts:
        facts, block = load_facts(args.facts)[:n], None
    else:
        exclude = {f["prompt"] for f in json.loads(args.exclude.read_text())} if args.exclude else set()
        facts, block = pick_facts(args.census, n, args.seed, exclude)
    rounds = [facts[i * args.per_round : (i + 1) * args.per_round] for i in range(args.rounds)]
    loaded = load_model(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    panel = panel_for_model(model)
    memo = EvaluationMemo(model)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    setup = {
        "model": args.model,
        "rounds": args.rounds,
        "per_round": args.per_round,
        "seed": args.seed,
        "block": block,
        "layers": layers,
        "source": str(args.census or args.facts),
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{_cpu_name()} x {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "load_start": " ".join(f"{x:.2f}" for x in _loadavg()),
        "facts": [[f.to_dict() for f in r] for r in rounds],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    chains = []
    for method in args.methods.split(","):
        chains.append(run_chain(model, tokenizer, rounds, method, panel, memo, layers=layers))
        out = {"setup": setup | {"load_end": " ".join(f"{x:.2f}" for x in _loadavg())}, "chains": chains}
        (args.out / "sequential.json").write_text(json.dumps(out, indent=2) + "\n")  # after each method: partial
        (args.out / "sequential.md").write_text(to_markdown(out))
        print(to_markdown(out), flush=True)


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def _loadavg() -> tuple[float, float, float]:
    return os.getloadavg()


if __name__ == "__main__":
    main()
