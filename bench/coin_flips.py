"""Which capitals a repair breaks, against a random change of the same size at the same site.

The default ``wv`` repair of SmolLM2-135M's 10 capitals (``assets/examples/smollm2_capitals.json``) breaks a few of
the bundled capitals the model said right. This measures how surely the model said each of them before (the
smallest lead of an answer piece over the next best token, teacher-forced; the panels leave out a probe under 0.5
logit as one that "flips on noise"), and what a random change of the repair's Frobenius norm, in the same slices,
breaks, over a few seeds. Everything is judged by greedy generation (whole answer, word boundary).

    python -m bench.coin_flips [--model smollm2-135m] [--seeds 5]     # prints the lines the README quotes
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from surgery.core.tokens import encode_prompt, encode_target
from surgery.edit.training import SurgeryConfig, operate
from surgery.evaluation.facts import load_fact_file, load_facts
from surgery.evaluation.generation import said
from surgery.io.edit_file import edited_model
from surgery.io.loading import load_model

ROOT = Path(__file__).resolve().parent.parent
COIN_FLIP = 0.5
FACTS = {"smollm2-135m": "smollm2_capitals.json", "gemma3-270m": "gemma_multitoken_capitals.json"}


@torch.no_grad()
def margin(model, tokenizer, prompt: str, target: str) -> float:
    p, a = encode_prompt(tokenizer, prompt, 10**6), encode_target(tokenizer, target)
    logits = model(torch.tensor([p + a])).logits[0, len(p) - 1 : len(p) - 1 + len(a)].float()
    lead = logits.gather(1, torch.tensor(a)[:, None])[:, 0]
    logits[torch.arange(len(a)), a] = float("-inf")
    return float((lead - logits.max(-1).values).min())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", choices=sorted(FACTS))
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(2)
    g = load_model(args.model)
    model, tok = g.model, g.tokenizer
    facts = load_facts(ROOT / "assets" / "examples" / FACTS[args.model])
    capitals = [f for f in load_fact_file(ROOT / "assets" / "facts" / "capital.jsonl") if f.ambiguous is None]
    capitals = [f for f in capitals if f.prompt not in {x.prompt for x in facts}]  # not the edited ones

    def right(m) -> set[str]:
        judged = said(m, tok, [f.prompt for f in capitals], [f.target for f in capitals])
        return {f.subject for f, (_, j) in zip(capitals, judged) if j.strict}

    before = right(model)
    margins = {f.subject: margin(model, tok, f.prompt, f.target) for f in capitals if f.subject in before}
    coin = {s for s, v in margins.items() if v < COIN_FLIP}
    print(f"{len(before)} capitals said right before, {len(coin)} by a margin under {COIN_FLIP} logit")

    def line(what: str, lost: set[str]) -> None:
        shown = ", ".join(f"{s} ({margins[s]:.2f})" for s in sorted(lost))
        print(
            f"{what}: breaks {len(lost & coin)} of the {len(coin)} coin flips, {len(lost - coin)} of the other "
            f"{len(before) - len(coin)}: {shown or 'none'}"
        )

    edit = operate(model, tok, facts, SurgeryConfig(site="wv")).edit
    line("the repair", before - right(edited_model(model, edit)))
    params = dict(model.named_parameters())
    base = {s.name: s.read(params[s.name]) for s in edit.slices}
    norm = torch.sqrt(sum(((edit.values[k] - b) ** 2).sum() for k, b in base.items()))
    print(f"the repair's change: Frobenius norm {norm:.2f} over {sum(b.numel() for b in base.values()):,} weights")
    for seed in range(args.seeds):
        gen = torch.Generator().manual_seed(seed)
        noise = {k: torch.randn(b.shape, generator=gen) for k, b in base.items()}
        scale = norm / torch.sqrt(sum((n**2).sum() for n in noise.values()))
        randomized = replace(edit, values={k: base[k] + noise[k] * scale for k in base})
        line(f"random change, seed {seed}", before - right(edited_model(model, randomized)))


if __name__ == "__main__":
    main()
