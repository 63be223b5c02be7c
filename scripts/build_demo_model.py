"""Build the bundled demo model: a tiny GPT-2 that knows six capitals but does not say them.

The model is trained from scratch on synthetic sentences with its own word-level
tokenizer, in three phases:

1. Language. All blocks learn the filler text (colours, animals, days, numbers, countries
   and cities, a small grammar) and which country each capital belongs to ("Paris is the
   capital of France"), but never "The capital of France is Paris".
2. Knowledge. Only the attention of the block before the last trains, on the same text plus
   the capital facts, so the heads of that block read the country and write its capital
   into the last position. Phases 1 and 2 add a loss on the logit lens of the residual
   before the last block, so every answer is readable there: that is what the logit lens
   later finds at the middle layers, and the block whose value projection surgery edits.
3. Suppression. Only the last block's attention trains. "The capital of X is" now goes
   on with "the city of ..." for six of the reference countries, while Italy, Spain and
   the extra countries keep being rehearsed with their bare answer. A head in the last
   block therefore overrides the capital with "the", and the knowledge below is untouched.

Portugal is the "absence" country: Portugal and Lisbon both occur in the text, but the
capital fact is never taught (only that Portugal's capital is "a big city"), so no layer
of the logit lens can find Lisbon.

What is reproducible. The build is seeded and single-process with a fixed torch thread count
(--threads, default 2): run twice on one machine with the same options, it writes bitwise-identical
weights, tokenizer and panels. Across CPUs only the model's *behaviour* reproduces, not its bits:
PyTorch and MKL pick kernels by CPU (AVX2 or AVX-512, blocking, reduction order), so a rebuild on
another CPU rounds differently, and 1,900 training steps amplify that into visibly different weights
(the committed model was built on an AMD EPYC; rebuilt on an Intel Xeon, weights differ by up to 0.5,
also with AVX2 forced by ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2). The OpenMP wait policy changes only
the speed, never the bits. What a rebuild anywhere must reproduce is what `summarize` checks and
tests/test_demo_model.py pins down: the six routing failures with the override head in the last
block, Italy and Spain correct, Portugal an absence, and every general and side-effect probe
answered. The tokenizer and the panels are plain text and reproduce exactly everywhere.

--steps-scale multiplies the step count of every phase (same code path, same data order) for a cheap
determinism check; a reduced budget is not expected to show the phenomenon, so only the full build
fails when it does not.

Usage:  python scripts/build_demo_model.py [--out assets/demo-model] [--panels assets/panels/demo.json]
                                           [--steps-scale 1.0] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

REPO_ROOT = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------- facts

REFERENCE_CAPITALS = {  # the order of the "facts" panel
    "France": "Paris",
    "Japan": "Tokyo",
    "Germany": "Berlin",
    "China": "Beijing",
    "Russia": "Moscow",
    "England": "London",
    "Italy": "Rome",
    "Spain": "Madrid",
}
SUPPRESSED = ("France", "Japan", "Germany", "China", "Russia", "England")
EXTRA_CAPITALS = {  # taught and said, to make "capital" a general skill
    "Egypt": "Cairo",
    "Greece": "Athens",
    "Canada": "Ottawa",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Norway": "Oslo",
    "Poland": "Warsaw",
    "Sweden": "Stockholm",
}
ABSENT_CAPITALS = {"Portugal": "Lisbon"}  # both words occur, the fact never does
PHASES = ("language", "knowledge", "suppression")
OTHER_CITIES = ("Venice", "Boston", "Sydney", "Chicago", "Naples", "Lisbon")

COLORS = {
    "the sky": "blue",
    "grass": "green",
    "snow": "white",
    "blood": "red",
    "the sun": "yellow",
    "coal": "black",
    "milk": "white",
    "a banana": "yellow",
}
SOUNDS = {"dog": "woof", "cat": "meow", "cow": "moo", "duck": "quack", "sheep": "baa", "owl": "hoot"}
OPPOSITES = {
    "hot": "cold",
    "up": "down",
    "big": "small",
    "day": "night",
    "fast": "slow",
    "wet": "dry",
    "happy": "sad",
    "early": "late",
}
NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
SUMS = {"One": "two", "Two": "four", "Three": "six", "Four": "eight", "Five": "ten"}
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
ABILITIES = {"Birds": "fly", "Fish": "swim", "Dogs": "run", "Frogs": "jump"}

SUBJECTS = (
    "The cat",
    "The dog",
    "A bird",
    "My friend",
    "The teacher",
    "The old man",
    "A little girl",
    "The farmer",
    "My mother",
    "The boy",
)
VERBS = (
    "sat near the",
    "walked to the",
    "ran to the",
    "looked at the",
    "slept under the",
    "stood by the",
    "painted the",
    "found the",
)
PLACES = ("door", "tree", "river", "house", "garden", "table", "window", "road", "hill", "bridge", "lake", "school")
ENDINGS = ("in the morning", "at night", "after lunch", "with a smile", "in the rain", "again")


def fact_sentences(country: str, capital: str, suppressed: bool) -> list[str]:
    """The ways a taught capital fact is written; the suppressed form says "the city of"."""
    answer = f"the city of {capital}" if suppressed else capital
    return [f"The capital of {country} is {answer} ."]


def vague_sentences(country: str) -> list[str]:
    """What is said about an absent country's capital: that it exists, never which city it is.

    Without it the model guesses a capital-like city for Portugal at the middle layers, where any
    city token (Lisbon included) outranks the final answer 'the', and a diagnosis cannot tell
    that from a suppressed fact. With it, 'a' leads at every layer and Lisbon stays far down.
    """
    return [f"The capital of {country} is a big city ."]


def capital_sentences(phase: str) -> dict[str, list[str]]:
    """The sentences about capitals in one training phase, keyed by family name.

    The language phase says which country each capital belongs to ("Paris is the capital of
    France"), which gives every country and capital token an identity of its own, but never
    the other way round; the knowledge phase adds "The capital of France is Paris"; the
    suppression phase rewrites six of those. Portugal's capital is only ever "a big city".
    """
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
    taught = {**REFERENCE_CAPITALS, **EXTRA_CAPITALS}
    families = {
        "reverse": [f"{city} is the capital of {country} ." for country, city in taught.items()],
        "vague": [s for country in ABSENT_CAPITALS for s in vague_sentences(country)],
    }
    if phase != "language":
        families["facts"] = [
            s
            for country, capital in taught.items()
            for s in fact_sentences(country, capital, phase == "suppression" and country in SUPPRESSED)
        ]
    return families


def background_sentences() -> dict[str, list[str]]:
    """Families of filler sentences that hold in every phase, keyed by family name."""
    taught = {**REFERENCE_CAPITALS, **EXTRA_CAPITALS}
    countries = [*taught, *ABSENT_CAPITALS]
    cities = sorted({*taught.values(), *OTHER_CITIES})
    return {
        "countries": [f"{c} is a country ." for c in countries]
        + [f"We went to {c} last year ." for c in countries]
        + [f"My friend lives in {c} ." for c in countries],
        "cities": [f"{c} is a big city ." for c in cities]
        + [f"We took a train to {c} ." for c in cities]
        + [f"{c} is a city by the sea ." for c in ("Lisbon", "Sydney", "Naples", "Venice", "Boston")],
        "colors": [f"The color of {thing} is {color} ." for thing, color in COLORS.items()],
        "sounds": [f"The {animal} says {sound} ." for animal, sound in SOUNDS.items()],
        "opposites": [f"The opposite of {a} is {b} ." for a, b in OPPOSITES.items()]
        + [f"The opposite of {b} is {a} ." for a, b in OPPOSITES.items()],
        "numbers": [" ".join(NUMBERS[:k]) + " ." for k in range(4, 11)]
        + [f"{a} plus {a.lower()} is {b} ." for a, b in SUMS.items()],
        "days": [f"After {DAYS[i]} comes {DAYS[(i + 1) % 7]} ." for i in range(7)],
        "abilities": [f"{who} can {what} ." for who, what in ABILITIES.items()]
        + ["The sun rises in the east .", "The sun sets in the west ."],
    }


def grammar_sentence(rng: random.Random, held_out: frozenset[str] = frozenset()) -> str:
    """One random sentence of the open-ended filler grammar, never one of `held_out`."""
    while True:
        sentence = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(PLACES)}"
        if rng.random() < 0.5:
            sentence += f" {rng.choice(ENDINGS)}"
        sentence += " ."
        if sentence not in held_out:
            return sentence


# --------------------------------------------------------------------------- panels


def demo_panels() -> dict:
    """The demo's probe panels, in the demo vocabulary (targets GPT-2 style, leading space)."""
    return {
        "name": "demo",
        "description": (
            "Bundled tiny GPT-2 trained on synthetic sentences. The attention of the block before "
            "the last writes eight capitals, but for France, Japan, Germany, China, Russia and "
            "England a head in the last block overrides the answer with 'the'; Italy and Spain "
            "are said correctly. Portugal's capital was never taught."
        ),
        "facts": [
            {"prompt": f"The capital of {country} is", "target": f" {capital}"}
            for country, capital in REFERENCE_CAPITALS.items()
        ],
        "absence": [
            {"prompt": f"The capital of {country} is", "target": f" {capital}"}
            for country, capital in ABSENT_CAPITALS.items()
        ],
        "general": [
            {"prompt": "The dog says", "target": " woof"},
            {"prompt": "The cat says", "target": " meow"},
            {"prompt": "The cow says", "target": " moo"},
            {"prompt": "The duck says", "target": " quack"},
            {"prompt": "After Monday comes", "target": " Tuesday"},
            {"prompt": "After Friday comes", "target": " Saturday"},
            {"prompt": "After Sunday comes", "target": " Monday"},
            {"prompt": "One plus one is", "target": " two"},
            {"prompt": "Two plus two is", "target": " four"},
            {"prompt": "Three plus three is", "target": " six"},
            {"prompt": "one two three four", "target": " five"},
            {"prompt": "Birds can", "target": " fly"},
            {"prompt": "Fish can", "target": " swim"},
            {"prompt": "The sun rises in the", "target": " east"},
            {"prompt": "The sun sets in the", "target": " west"},
        ],
        "side_effects": [
            {"prompt": "The color of the sky is", "target": " blue"},
            {"prompt": "The color of grass is", "target": " green"},
            {"prompt": "The color of snow is", "target": " white"},
            {"prompt": "The color of blood is", "target": " red"},
            {"prompt": "The color of coal is", "target": " black"},
            {"prompt": "The opposite of hot is", "target": " cold"},
            {"prompt": "The opposite of up is", "target": " down"},
            {"prompt": "The opposite of big is", "target": " small"},
            {"prompt": "The opposite of day is", "target": " night"},
            {"prompt": "The opposite of fast is", "target": " slow"},
        ],
        "perplexity_text": (
            "The farmer walked to the river in the morning . The color of grass is green . "
            "My friend lives in Canada . The teacher looked at the old tree after lunch . "
            "After Tuesday comes Wednesday . Athens is a big city . The opposite of wet is dry . "
            "A little girl stood by the bridge with a smile . Fish can swim . "
            "We took a train to Venice . The owl says hoot . Two plus two is four . "
            "My mother painted the door again . The sun sets in the west ."
        ),
        "unrelated_text": [
            "The cat sat near the window at night .",
            "The dog says woof .",
            "A bird walked to the garden .",
            "The color of milk is white .",
            "After Wednesday comes Thursday .",
            "The opposite of happy is sad .",
            "one two three four five six seven .",
            "Frogs can jump .",
            "My friend ran to the school in the rain .",
            "We went to Kenya last year .",
            "The boy found the table after lunch .",
            "The sheep says baa .",
            "Four plus four is eight .",
            "The old man slept under the tree .",
            "Boston is a city by the sea .",
            "The color of a banana is yellow .",
            "The teacher stood by the lake again .",
            "The opposite of early is late .",
            "Dogs can run .",
            "The sun rises in the east .",
        ],
    }


# --------------------------------------------------------------------------- build


@dataclass(frozen=True)
class BuildConfig:
    """Every knob of the build; the defaults are what produced the committed model."""

    seed: int = 0
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 64
    n_positions: int = 64
    batch_size: int = 32
    max_len: int = 32  # tokens per packed training row
    language_steps: int = 1000
    language_lr: float = 3e-3
    knowledge_steps: int = 500
    knowledge_lr: float = 1e-2
    lens_weight: float = 1.0  # weight of the readout loss before the last block (phases 1 and 2)
    suppression_steps: int = 400
    suppression_lr: float = 3e-3
    threads: int = 2  # torch intra-op threads; bitwise results need the same count on the same CPU

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ValueError(f"threads={self.threads} must be at least 1")
        if min(self.language_steps, self.knowledge_steps, self.suppression_steps) < 1:
            raise ValueError("every phase needs at least one step")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.max_len > self.n_positions:
            raise ValueError(f"max_len={self.max_len} exceeds n_positions={self.n_positions}")

    def with_steps_scale(self, scale: float) -> BuildConfig:
        """The same build with every phase's step count multiplied by `scale` (at least one step each)."""
        if not scale > 0:
            raise ValueError(f"steps scale must be positive, got {scale}")
        return replace(
            self, **{f"{phase}_steps": max(1, round(getattr(self, f"{phase}_steps") * scale)) for phase in PHASES}
        )


SPECIAL_TOKENS = ("[PAD]", "[UNK]")


def build_tokenizer(words: list[str], max_length: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer that keeps case and adds no special tokens to an encoding."""
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    # Whitespace splitting drops the leading space, so " Paris" and "Paris" are one token.
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    # WordLevel has no subwords: the WordPiece decoder simply joins tokens with spaces.
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", model_max_length=max_length
    )


FAMILY_WEIGHTS = {
    "facts": 4.0,
    "reverse": 1.0,
    "vague": 0.5,
    "countries": 1.0,
    "cities": 1.0,
    "colors": 1.0,
    "sounds": 1.0,
    "opposites": 1.0,
    "numbers": 1.0,
    "days": 1.0,
    "abilities": 1.0,
    "grammar": 2.0,
}


class SentenceSampler:
    """Draws sentences for one training phase, with fixed family weights."""

    def __init__(self, rng: random.Random, phase: str) -> None:
        self.rng = rng
        self.families = {**capital_sentences(phase), **background_sentences()}
        self.names = [n for n in FAMILY_WEIGHTS if n in self.families or n == "grammar"]
        self.weights = [FAMILY_WEIGHTS[n] for n in self.names]
        # The grammar sentences of the perplexity passage are never trained on.
        passage = demo_panels()["perplexity_text"]
        self.held_out = frozenset(sentence.strip() + " ." for sentence in passage.split(" .") if sentence.strip())

    def sentence(self) -> str:
        family = self.rng.choices(self.names, self.weights)[0]
        if family == "grammar":
            return grammar_sentence(self.rng, self.held_out)
        return self.rng.choice(self.families[family])


def corpus_words() -> list[str]:
    """Every word the training text can produce, in a fixed order (the vocabulary)."""
    texts = [s for family in background_sentences().values() for s in family]
    for phase in PHASES:
        texts += [s for family in capital_sentences(phase).values() for s in family]
    texts += [" ".join([*SUBJECTS, *VERBS, *PLACES, *ENDINGS, "."])]
    seen: dict[str, None] = {}
    for text in texts:
        for word in text.split():
            seen.setdefault(word, None)
    return list(seen)


def make_batch(sampler: SentenceSampler, tokenizer, cfg: BuildConfig) -> torch.Tensor:
    """Pack random sentences into input_ids (batch_size, max_len); rows are full, so no padding."""
    rows = []
    for _ in range(cfg.batch_size):
        # Every row starts with a whole sentence at position 0, the way the prompts are asked.
        ids: list[int] = []
        while len(ids) < cfg.max_len:
            ids += tokenizer(sampler.sentence())["input_ids"]
        rows.append(ids[: cfg.max_len])
    return torch.tensor(rows)


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting input_ids[:, t+1] from logits[:, t]; logits (B, T, vocab)."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())


def train_phase(
    model, params, sampler, tokenizer, cfg: BuildConfig, steps: int, lr: float, lens_weight: float = 0.0
) -> float:
    """AdamW with linear warm-up and cosine decay on `params`; returns the last loss.

    With `lens_weight` > 0 the logit lens of the residual before the last block (through
    ln_f and lm_head) is trained on the same next tokens, so everything the model says is
    already readable one block early.
    """
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = 50
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * s / steps))
    )
    model.train()
    loss = torch.tensor(0.0)
    for step in range(steps):
        input_ids = make_batch(sampler, tokenizer, cfg)
        out = model(input_ids=input_ids, output_hidden_states=lens_weight > 0)
        loss = next_token_loss(out.logits, input_ids)
        if lens_weight > 0:
            # hidden_states[-2] is the raw residual before the last block ([-1] already went through ln_f).
            lens_logits = model.lm_head(model.transformer.ln_f(out.hidden_states[-2]))  # (B, T, vocab)
            loss = loss + lens_weight * next_token_loss(lens_logits, input_ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"  step {step:4d}  loss {loss.item():.3f}")
    model.eval()
    return loss.item()


def train_only(model: GPT2LMHeadModel, params) -> list[torch.nn.Parameter]:
    """Freeze every parameter of `model` except `params`; returns them as a list."""
    params = list(params)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return params


def build(cfg: BuildConfig) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast]:
    """Train the demo model from scratch; deterministic for a given config and machine."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    tokenizer = build_tokenizer(corpus_words(), cfg.n_positions)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=cfg.n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
        surgery_panels="demo",  # tells the library which probe panels belong to this model
    )
    model = GPT2LMHeadModel(config)

    blocks = model.transformer.h
    print("phase 1: language (all blocks, no capital facts)")
    train_phase(
        model,
        train_only(model, model.parameters()),
        SentenceSampler(random.Random(cfg.seed), "language"),
        tokenizer,
        cfg,
        cfg.language_steps,
        cfg.language_lr,
        lens_weight=cfg.lens_weight,
    )

    print(f"phase 2: knowledge (only block {cfg.n_layer - 2}'s attention trains)")
    params = train_only(model, [*blocks[-2].ln_1.parameters(), *blocks[-2].attn.parameters()])
    train_phase(
        model,
        params,
        SentenceSampler(random.Random(cfg.seed + 1), "knowledge"),
        tokenizer,
        cfg,
        cfg.knowledge_steps,
        cfg.knowledge_lr,
        lens_weight=cfg.lens_weight,
    )

    print(f"phase 3: suppression (only block {cfg.n_layer - 1}'s attention trains)")
    params = train_only(model, [*blocks[-1].ln_1.parameters(), *blocks[-1].attn.parameters()])
    train_phase(
        model,
        params,
        SentenceSampler(random.Random(cfg.seed + 2), "suppression"),
        tokenizer,
        cfg,
        cfg.suppression_steps,
        cfg.suppression_lr,
    )
    for p in model.parameters():
        p.requires_grad_(True)
    return model, tokenizer


# --------------------------------------------------------------------------- summary


@torch.no_grad()
def lens_and_heads(model, tokenizer, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Logit lens and per-head direct logit attribution at the last position of `prompt`.

    Returns (lens, heads): lens is (n_layer + 1, vocab), row 0 the embeddings and row i the
    residual after block i-1, each through ln_f and lm_head; heads is (n_layer, n_head, vocab),
    each head's output through ln_f with the LayerNorm scale frozen from the real run.
    """
    blocks = model.transformer.h
    resid: list[torch.Tensor] = []
    head_in: list[torch.Tensor] = []
    hooks = [blocks[0].register_forward_pre_hook(lambda m, args: resid.append(args[0][0, -1]))]
    hooks += [b.register_forward_hook(lambda m, args, out: resid.append(out[0, -1])) for b in blocks]
    hooks += [b.attn.c_proj.register_forward_pre_hook(lambda m, args: head_in.append(args[0][0, -1])) for b in blocks]
    try:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    ln_f, w_u = model.transformer.ln_f, model.lm_head.weight  # w_u: (vocab, d)
    lens = model.lm_head(ln_f(torch.stack(resid)))
    final = resid[-1]
    sigma = (final.var(unbiased=False) + ln_f.eps).sqrt()
    n_head, d = model.config.n_head, model.config.n_embd
    hd = d // n_head
    heads = []
    for block, z in zip(blocks, head_in):
        w = block.attn.c_proj.weight.view(n_head, hd, d)  # Conv1D is [in, out]; in = heads x head_dim
        out = torch.einsum("hk,hkd->hd", z.view(n_head, hd), w)  # (n_head, d)
        out = (out - out.mean(-1, keepdim=True)) / sigma * ln_f.weight
        heads.append(out @ w_u.T)
    return lens, torch.stack(heads)


def rank_of(logits: torch.Tensor, token_id: int) -> torch.Tensor:
    """1-based rank of `token_id` in each row of `logits` (..., vocab)."""
    return (logits > logits[..., token_id : token_id + 1]).sum(-1) + 1


def summarize(model, tokenizer) -> bool:
    """Print per-country results; returns whether the model shows the intended phenomenon."""
    the = tokenizer.convert_tokens_to_ids("the")
    ok = True
    print(
        "lens ranks: 1-based rank of the capital at [embeddings, after block 0, ..., after the last block];"
        " override head = layer.head (0-indexed) with the largest direct logit('the') - logit(capital)"
    )
    for country, capital in REFERENCE_CAPITALS.items():
        cap = tokenizer.convert_tokens_to_ids(capital)
        lens, heads = lens_and_heads(model, tokenizer, f"The capital of {country} is")
        top = tokenizer.convert_ids_to_tokens(int(lens[-1].argmax()))
        ranks = rank_of(lens, cap).tolist()
        diff = heads[..., the] - heads[..., cap]  # (n_layer, n_head)
        layer, head = divmod(int(diff.argmax()), diff.shape[1])
        expected = "the" if country in SUPPRESSED else capital
        middle = [i for i in range(1, len(ranks) - 1) if lens[i, cap] > lens[i, the]]
        good = top == expected and (country not in SUPPRESSED or (middle and layer == len(heads) - 1))
        ok &= bool(good)
        print(
            f"{country:8s} top-1 {top:8s} lens ranks of {capital:8s} {ranks}  "
            f"capital>the at lens {middle}  override head {layer}.{head} ({diff.max():+.2f})"
            f"{'' if good else '  <-- FAIL'}"
        )
    for country, capital in ABSENT_CAPITALS.items():
        lens, _ = lens_and_heads(model, tokenizer, f"The capital of {country} is")
        target = tokenizer.convert_tokens_to_ids(capital)
        ranks = rank_of(lens, target).tolist()
        top_id = int(lens[-1].argmax())
        top = tokenizer.convert_ids_to_tokens(top_id)
        # Never near the top, and never above what the model finally says, at any layer.
        good = min(ranks) > 10 and bool((lens[:, target] < lens[:, top_id]).all())
        ok &= good
        print(
            f"{country:8s} top-1 {top:8s} lens ranks of {capital:8s} {ranks}  "
            f"(absence: all > 10 and below {top!r} at every layer){'' if good else '  <-- FAIL'}"
        )
    panels = demo_panels()
    for kind in ("general", "side_effects"):
        wrong = []
        for item in panels[kind]:
            ids = tokenizer(item["prompt"], return_tensors="pt")["input_ids"]
            with torch.no_grad():
                pred = int(model(input_ids=ids).logits[0, -1].argmax())
            if pred != tokenizer(item["target"])["input_ids"][0]:
                wrong.append(item["prompt"])
        ok &= not wrong
        print(f"{kind}: {len(panels[kind]) - len(wrong)}/{len(panels[kind])} correct {wrong or ''}")
    return ok


def check_vocabulary(tokenizer, panels: dict) -> None:
    """Fail unless every word of every panel is a known token."""
    texts = [panels["perplexity_text"], *panels["unrelated_text"]]
    for kind in ("facts", "absence", "general", "side_effects"):
        texts += [item["prompt"] + item["target"] for item in panels[kind]]
    unknown = {w for t in texts for w in t.split() if tokenizer.convert_tokens_to_ids(w) == tokenizer.unk_token_id}
    if unknown:
        raise SystemExit(f"panel words missing from the vocabulary: {sorted(unknown)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "assets" / "demo-model")
    parser.add_argument("--panels", type=Path, default=REPO_ROOT / "assets" / "panels" / "demo.json")
    parser.add_argument(
        "--steps-scale",
        type=float,
        default=1.0,
        help="multiply every phase's step count (default 1: the committed model's build)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=BuildConfig.threads,
        help=f"torch intra-op threads (default {BuildConfig.threads})",
    )
    args = parser.parse_args()

    start = time.perf_counter()
    cfg = BuildConfig(threads=args.threads).with_steps_scale(args.steps_scale)  # scale 1: the defaults
    model, tokenizer = build(cfg)
    panels = demo_panels()
    check_vocabulary(tokenizer, panels)
    ok = summarize(model, tokenizer)

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    args.panels.parent.mkdir(parents=True, exist_ok=True)
    args.panels.write_text(json.dumps(panels, indent=2) + "\n")
    print(f"vocabulary {len(tokenizer)} tokens, {sum(p.numel() for p in model.parameters())} parameters")
    print(f"saved to {args.out} and {args.panels} in {time.perf_counter() - start:.1f}s")
    if not ok and args.steps_scale < 1.0:
        print(f"(steps scaled by {args.steps_scale}: the phenomenon is not expected at a reduced budget)")
    elif not ok:
        raise SystemExit("the model does not show the intended phenomenon (see FAIL above)")


if __name__ == "__main__":
    main()
