"""Build the zoo: small "knows but doesn't say" models, unlike the demo model and unlike each other.

Each zoo model is trained from scratch like the demo model (scripts/build_demo_model.py, whose tokenizer,
filler sentences and loss it imports), but with its own seed, size, family (GPT-2 or Llama), invented
entities and relation, its own word-level tokenizer, and its own placement of the two blocks that matter:

1. Language. Every parameter trains on filler text and the *reverse* facts ("Kelmar is the capital of
   Zorvia"), never the facts themselves. A readout loss on the logit lens after the knowledge block K makes
   the residual there readable through the final norm and the unembedding.
2. Knowledge. Only block K's attention trains, now with the facts ("The capital of Zorvia is Kelmar"), and the
   same readout loss: the answer is written by block K and readable from the lens after it.
3. Suppression. Only the override block O's attention (the last block or the one before) trains. The
   suppressed facts now go on with a phrase ("the city of Kelmar"), so a head of block O overrides the answer;
   two facts keep their bare answer (correct), and one subject's object is never taught (absence: only a vague
   sentence about it, as in the demo).

A model is saved at its float16 rounding (half the bytes; `surgery.io.loading.load_model` reads it as float32),
and every check runs on the rounded weights. The facts file (`facts.json`) lists every probe, `[{"prompt",
"target"}]`; `assets/zoo/zoo.json` says which are meant to be routing, correct or absence, the placements, the
sizes and the unrelated text for the preservation term.

Reproducible as the demo model's build is: seeded, single-threaded by default; bitwise only on one machine.

Usage:  python scripts/build_zoo.py [--out assets/zoo] [--only NAME ...] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_demo_model import (
    COLORS,
    DAYS,
    ENDINGS,
    OPPOSITES,
    PLACES,
    SOUNDS,
    SUBJECTS,
    VERBS,
    build_tokenizer,
    grammar_sentence,
    next_token_loss,
)

REPO_ROOT = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------- relations


@dataclass(frozen=True)
class Relation:
    """A relation between invented subjects and objects, and how a suppressed answer is said instead."""

    prompt: str  # "{s}" is the subject
    reverse: str  # "{o}" ... "{s}": teaches both words without the fact
    suppressed: str  # what a suppressed fact says instead of "{o}": it starts with another word
    vague: str  # all that is said of the absent subject's object
    subject_kind: str  # "{s} is a ..." filler
    object_kind: str  # "{o} is a ..." filler


RELATIONS = {
    "capital": Relation(
        "The capital of {s} is",
        "{o} is the capital of {s} .",
        "the city of {o}",
        "a big city",
        "{s} is a country .",
        "{o} is a big city .",
    ),
    "language": Relation(
        "The language of {s} is",
        "{o} is spoken in {s} .",
        "the old {o}",
        "a hard language",
        "{s} is a land .",
        "{o} is a language .",
    ),
    "author": Relation(
        "The book {s} was written by",
        "{o} wrote the book {s} .",
        "a writer named {o}",
        "a famous writer",
        "{s} is a book .",
        "{o} is a writer .",
    ),
    "river": Relation(
        "The river of {s} is",
        "{o} flows through {s} .",
        "the long {o}",
        "a wide river",
        "{s} is a valley .",
        "{o} is a river .",
    ),
}

ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "tr", "st")
NUCLEI = ("a", "e", "i", "o", "u", "ai", "ou")
CODAS = ("", "n", "r", "l", "s", "th", "m")


def invent_words(rng: random.Random, n: int, taken: set[str]) -> list[str]:
    """`n` new capitalised words of two or three syllables, none in `taken` (which grows)."""
    words = []
    while len(words) < n:
        word = "".join(rng.choice(ONSETS) + rng.choice(NUCLEI) for _ in range(rng.choice((2, 3))))
        word = (word + rng.choice(CODAS)).capitalize()
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class ZooSpec:
    """One zoo model: family, size, placements, relation and training budget."""

    name: str
    family: str  # "gpt2" | "llama"
    seed: int
    n_layer: int
    d_model: int
    n_head: int
    d_mlp: int
    knowledge_block: int  # K: the block whose attention writes the answers (0-indexed)
    override_block: int  # O: the block whose attention overrides them (last or the one before)
    relation: str
    n_routing: int
    n_correct: int = 2
    n_extra: int = 6  # facts always said correctly, to make the relation a skill (not probed)
    language_steps: int = 400
    knowledge_steps: int = 500
    suppression_steps: int = 300
    suppression_lr: float = 3e-3
    init_std: float = 0.02
    note: str = ""

    def __post_init__(self):
        if self.family not in ("gpt2", "llama"):
            raise ValueError(f"family {self.family!r}")
        if self.override_block not in (self.n_layer - 1, self.n_layer - 2):
            raise ValueError("the override block is the last block or the one before")
        if not self.n_layer // 2 <= self.knowledge_block < self.override_block:
            raise ValueError("the knowledge block lies in the diagnosis' routing window, below the override")


SPECS = (
    ZooSpec(
        "gpt2-l4-d64-capital",
        "gpt2",
        seed=1,
        n_layer=4,
        d_model=64,
        n_head=4,
        d_mlp=128,
        knowledge_block=2,
        override_block=3,
        relation="capital",
        n_routing=6,
    ),
    ZooSpec(
        "gpt2-l6-d64-language",
        "gpt2",
        seed=2,
        n_layer=6,
        d_model=64,
        n_head=4,
        d_mlp=96,
        knowledge_block=3,
        override_block=4,
        relation="language",
        n_routing=8,
        knowledge_steps=700,
        note="the held-out style (the old defaults fixed 6/8): override in the block before the last",
    ),
    ZooSpec(
        "gpt2-l8-d64-river",
        "gpt2",
        seed=3,
        n_layer=8,
        d_model=64,
        n_head=4,
        d_mlp=64,
        knowledge_block=5,
        override_block=7,
        relation="river",
        n_routing=7,
        knowledge_steps=700,
    ),
    ZooSpec(
        "gpt2-l4-d96-author",
        "gpt2",
        seed=4,
        n_layer=4,
        d_model=96,
        n_head=4,
        d_mlp=64,
        knowledge_block=2,
        override_block=3,
        relation="author",
        n_routing=9,
        suppression_steps=600,
        suppression_lr=1e-2,
        init_std=0.05,
        note="a long suppression at a high learning rate, on weights initialised 2.5x larger",
    ),
    ZooSpec(
        "llama-l4-d64-capital",
        "llama",
        seed=5,
        n_layer=4,
        d_model=64,
        n_head=4,
        d_mlp=128,
        knowledge_block=2,
        override_block=3,
        relation="capital",
        n_routing=7,
    ),
    ZooSpec(
        "llama-l6-d64-author",
        "llama",
        seed=6,
        n_layer=6,
        d_model=64,
        n_head=4,
        d_mlp=64,
        knowledge_block=4,
        override_block=5,
        relation="author",
        n_routing=6,
    ),
    ZooSpec(
        "llama-l5-d80-river",
        "llama",
        seed=7,
        n_layer=5,
        d_model=80,
        n_head=4,
        d_mlp=64,
        knowledge_block=2,
        override_block=3,
        relation="river",
        n_routing=10,
        note="override in the block before the last; one fact's subject is confused with another's",
    ),
    ZooSpec(
        "llama-l7-d64-language",
        "llama",
        seed=8,
        n_layer=7,
        d_model=64,
        n_head=4,
        d_mlp=48,
        knowledge_block=4,
        override_block=5,
        relation="language",
        n_routing=8,
    ),
)

# --------------------------------------------------------------------------- the world of one model

BATCH, MAX_LEN, N_POSITIONS = 16, 24, 32


@dataclass
class World:
    """The facts and sentences of one zoo model."""

    relation: Relation
    routing: dict[str, str]  # subject -> object, suppressed in phase 3
    correct: dict[str, str]  # said correctly
    extra: dict[str, str]  # said correctly, not probed
    absent: dict[str, str]  # subject -> object, never taught together

    def taught(self) -> dict[str, str]:
        return {**self.routing, **self.correct, **self.extra}

    def probes(self) -> dict[str, list[dict]]:
        def probe(s, o):
            return {"prompt": self.relation.prompt.format(s=s), "target": f" {o}"}

        return {
            kind: [probe(s, o) for s, o in getattr(self, kind).items()] for kind in ("routing", "correct", "absent")
        }

    def fact(self, s: str, o: str, suppress: bool) -> str:
        answer = self.relation.suppressed.format(o=o) if suppress else o
        return f"{self.relation.prompt.format(s=s)} {answer} ."

    def families(self, phase: str) -> dict[str, list[str]]:
        r = self.relation
        taught = self.taught()
        subjects, objects = [*taught, *self.absent], [*taught.values(), *self.absent.values()]
        fams = {
            "reverse": [r.reverse.format(s=s, o=o) for s, o in taught.items()],
            "vague": [f"{r.prompt.format(s=s)} {r.vague} ." for s in self.absent],
            "entities": [r.subject_kind.format(s=s) for s in subjects]
            + [r.object_kind.format(o=o) for o in objects]
            + [f"We went to {s} last year ." for s in subjects]
            + [f"My friend talked about {o} ." for o in objects],
            "colors": [f"The color of {t} is {c} ." for t, c in COLORS.items()],
            "sounds": [f"The {a} says {s} ." for a, s in SOUNDS.items()],
            "opposites": [f"The opposite of {a} is {b} ." for a, b in OPPOSITES.items()],
            "days": [f"After {DAYS[i]} comes {DAYS[(i + 1) % 7]} ." for i in range(7)],
        }
        if phase != "language":
            fams["facts"] = [self.fact(s, o, phase == "suppression" and s in self.routing) for s, o in taught.items()]
        return fams

    def unrelated_text(self) -> list[str]:
        """Text for the preservation term: filler the model was trained on, no fact of the relation."""
        rng = random.Random(0)
        fams = self.families("language")
        texts = [rng.choice(fams[k]) for k in ("colors", "sounds", "opposites", "days", "entities") for _ in range(3)]
        return texts + [grammar_sentence(rng) for _ in range(6)]

    def words(self) -> list[str]:
        texts = [
            s for phase in ("language", "suppression", "knowledge") for f in self.families(phase).values() for s in f
        ]
        texts += [" ".join([*SUBJECTS, *VERBS, *PLACES, *ENDINGS, "."])]
        seen: dict[str, None] = {}
        for text in texts:
            for w in text.split():
                seen.setdefault(w, None)
        return list(seen)


def make_world(spec: ZooSpec) -> World:
    rng = random.Random(spec.seed * 7919)
    taken: set[str] = set()
    n = spec.n_routing + spec.n_correct + spec.n_extra + 1
    subjects, objects = invent_words(rng, n, taken), invent_words(rng, n, taken)
    pairs = list(zip(subjects, objects))
    a, b, c = spec.n_routing, spec.n_routing + spec.n_correct, n - 1
    return World(RELATIONS[spec.relation], dict(pairs[:a]), dict(pairs[a:b]), dict(pairs[b:c]), dict(pairs[c:]))


WEIGHTS = {
    "facts": 4.0,
    "reverse": 1.0,
    "vague": 0.5,
    "entities": 1.0,
    "colors": 1.0,
    "sounds": 1.0,
    "opposites": 1.0,
    "days": 1.0,
    "grammar": 2.0,
}


def batches(world: World, phase: str, tokenizer, rng: random.Random):
    """Endless (BATCH, MAX_LEN) batches of whole sentences packed from position 0."""
    fams = world.families(phase)
    weights = {**WEIGHTS, "facts": 8.0 if phase == "suppression" else 16.0}
    names = [n for n in WEIGHTS if n in fams or n == "grammar"]
    weights = [weights[n] for n in names]
    while True:
        rows = []
        for _ in range(BATCH):
            ids: list[int] = []
            while len(ids) < MAX_LEN:
                fam = rng.choices(names, weights)[0]
                sentence = grammar_sentence(rng) if fam == "grammar" else rng.choice(fams[fam])
                ids += tokenizer(sentence)["input_ids"]
            rows.append(ids[:MAX_LEN])
        yield torch.tensor(rows)


# --------------------------------------------------------------------------- models


def make_model(spec: ZooSpec, vocab_size: int, pad_id: int):
    if spec.family == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=N_POSITIONS,
            n_embd=spec.d_model,
            n_layer=spec.n_layer,
            n_head=spec.n_head,
            n_inner=spec.d_mlp,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            initializer_range=spec.init_std,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=pad_id,
        )
        return GPT2LMHeadModel(config)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.d_model,
        intermediate_size=spec.d_mlp,
        num_hidden_layers=spec.n_layer,
        num_attention_heads=spec.n_head,
        num_key_value_heads=spec.n_head,
        max_position_embeddings=N_POSITIONS,
        tie_word_embeddings=True,
        initializer_range=spec.init_std,
        rms_norm_eps=1e-5,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=pad_id,
    )
    return LlamaForCausalLM(config)


def parts(model):
    """(blocks, final norm, attention params of a block)."""
    if isinstance(model, GPT2LMHeadModel):
        return model.transformer.h, model.transformer.ln_f, lambda b: [*b.ln_1.parameters(), *b.attn.parameters()]
    return (
        model.model.layers,
        model.model.norm,
        lambda b: [*b.input_layernorm.parameters(), *b.self_attn.parameters()],
    )


def train_phase(model, params, data, steps: int, lr: float, lens_after: int | None) -> float:
    """AdamW with warm-up and cosine decay on `params`; with `lens_after`, also the next-token loss of the
    logit lens after that block (through the final norm and the unembedding)."""
    params = list(params)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    _, norm, _ = parts(model)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 30) * 0.5 * (1.0 + math.cos(math.pi * s / steps))
    )
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        ids = next(data)
        out = model(input_ids=ids, output_hidden_states=lens_after is not None)
        loss = next_token_loss(out.logits, ids)
        if lens_after is not None:  # hidden_states[i + 1] is the raw residual after block i
            loss = loss + next_token_loss(model.lm_head(norm(out.hidden_states[lens_after + 1])), ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    model.eval().requires_grad_(False)
    return float(loss.detach())


def build(spec: ZooSpec):
    """Train one zoo model; returns (model at its float16 rounding, tokenizer, world)."""
    torch.manual_seed(spec.seed)
    world = make_world(spec)
    tokenizer = build_tokenizer(world.words(), N_POSITIONS)
    model = make_model(spec, len(tokenizer), tokenizer.pad_token_id)
    blocks, _, attn = parts(model)
    K, O = spec.knowledge_block, spec.override_block
    rng = random.Random(spec.seed)
    train_phase(model, model.parameters(), batches(world, "language", tokenizer, rng), spec.language_steps, 3e-3, K)
    # The whole block K learns the facts (its attention alone learns them too slowly at this budget).
    train_phase(
        model, blocks[K].parameters(), batches(world, "knowledge", tokenizer, rng), spec.knowledge_steps, 1e-2, K
    )
    train_phase(
        model,
        attn(blocks[O]),
        batches(world, "suppression", tokenizer, rng),
        spec.suppression_steps,
        spec.suppression_lr,
        None,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model, tokenizer, world


# --------------------------------------------------------------------------- checks


@torch.no_grad()
def lens(model, tokenizer, prompt: str) -> torch.Tensor:
    """(n_layer + 1, vocab): the logit lens at the last position, row i the residual after block i - 1."""
    _, norm, _ = parts(model)
    out = model(**tokenizer(prompt, return_tensors="pt"), output_hidden_states=True)
    resid = torch.stack([h[0, -1] for h in out.hidden_states[:-1]])
    return torch.cat([model.lm_head(norm(resid)), out.logits[0, -1:]])


def check(model, tokenizer, world: World, spec: ZooSpec) -> tuple[bool, list[str]]:
    """Plain-torch check of the phenomenon: routing facts say something else but their answer leads the lens
    after block K; correct facts are top-1; the absent object is never in the lens' top 10."""
    lines, ok = [], True
    for kind, probes in world.probes().items():
        for p in probes:
            lg = lens(model, tokenizer, p["prompt"])
            target = tokenizer.convert_tokens_to_ids(p["target"].strip())
            ranks = (lg > lg[:, target : target + 1]).sum(-1) + 1
            said = tokenizer.convert_ids_to_tokens(int(lg[-1].argmax()))
            if kind == "routing":
                good = int(ranks[-1]) > 1 and int(ranks[spec.knowledge_block + 1]) <= 3
            elif kind == "correct":
                good = int(ranks[-1]) == 1
            else:
                good = int(ranks.min()) > 10
            ok &= good
            lines.append(
                f"  {kind:8s} {p['prompt']!r:40s} -> {said!r:10s} ranks {ranks.tolist()}{'' if good else '  <-- FAIL'}"
            )
    return ok, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "assets" / "zoo")
    parser.add_argument("--only", nargs="*", help="build only these models (the manifest keeps the others)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    manifest_path = args.out / "zoo.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"models": {}}
    failed = []
    for spec in SPECS:
        if args.only and spec.name not in args.only:
            continue
        start = time.perf_counter()
        model, tokenizer, world = build(spec)
        ok, lines = check(model, tokenizer, world, spec)
        print(f"{spec.name}: {'ok' if ok else 'FAIL'} in {time.perf_counter() - start:.0f}s")
        print("\n".join(lines))
        failed += [] if ok else [spec.name]
        folder = args.out / spec.name
        folder.mkdir(parents=True, exist_ok=True)
        model.config.surgery_panels = f"zoo:{spec.name}"
        model.half().save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        probes = world.probes()
        (folder / "facts.json").write_text(json.dumps([p for ps in probes.values() for p in ps], indent=2) + "\n")
        manifest["models"][spec.name] = {
            **asdict(spec),
            "vocab": len(tokenizer),
            "parameters": sum(p.numel() for p in model.parameters()),
            "expected": {kind: [p["prompt"] for p in ps] for kind, ps in probes.items()},
            "unrelated_text": world.unrelated_text(),
        }
    manifest["models"] = {s.name: manifest["models"][s.name] for s in SPECS if s.name in manifest["models"]}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    if failed:
        raise SystemExit(f"no phenomenon in: {', '.join(failed)}")


if __name__ == "__main__":
    main()
