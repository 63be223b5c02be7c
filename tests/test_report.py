import json

from surgery.evaluation.facts import Fact
from surgery.evaluation.panels import Panel
from surgery.evaluation.report import (
    Comparison,
    allowed_breaks,
    compare,
    fact_outcomes,
    format_facts,
    format_wrong,
    regressions,
)
from surgery.evaluation.scoring import (
    PanelResult,
    ProbeResult,
    ProbeScores,
    fluency,
    fluency_prompts,
    greedy_continuations,
)


def _result(i: int, right: bool, first_token: bool | None = None, said: str | None = None) -> ProbeResult:
    target = f" answer{i}"
    said = said if said is not None else (target + "." if right else " something else")
    first = right if first_token is None else first_token
    return ProbeResult(
        f"prompt {i}",
        target,
        answer=target if first else " x",
        correct=right,
        target_rank=1,
        said=said,
        lenient=right,
        first_token_correct=first,
    )


def _scores(flags) -> ProbeScores:
    return ProbeScores([_result(i, f) for i, f in enumerate(flags)])


def _panel(relation=(), general=(), neighbourhood=(), side_effects=(), ppl=10.0) -> PanelResult:
    return PanelResult(
        "synthetic",
        general=_scores(general),
        side_effects=_scores(side_effects),
        perplexity=ppl,
        neighbourhood=_scores(neighbourhood),
        relation=_scores(relation),
    )


def _comparison(relation_after, relation_before=None, paraphrases=((False, True),), general=(True, True)):
    relation_before = relation_before if relation_before is not None else [True] * len(relation_after)
    facts = fact_outcomes(_scores([False]), _scores([True]))
    para = fact_outcomes(_scores([b for b, _ in paraphrases]), _scores([a for _, a in paraphrases]))
    return Comparison(
        facts,
        _panel(relation_before, general, [True] * 3, [True]),
        _panel(relation_after, general, [True] * 3, [True]),
        kl_unrelated=0.0,
        paraphrases=para,
    )


def test_allowed_breaks():
    assert [allowed_breaks(n) for n in (0, 3, 19, 20, 21, 39, 40)] == [0, 0, 0, 1, 1, 1, 2]


def test_verify_fails_when_the_unedited_facts_of_the_relation_break():
    assert regressions(_comparison([True] * 21)) == []
    assert regressions(_comparison([False] + [True] * 20)) == []  # 1 of 21: floor(5% of 21) = 1 allowed
    reasons = regressions(_comparison([False] * 13 + [True] * 8))  # the repair that broke 13 of 21 capitals
    assert len(reasons) == 1 and "unedited facts of the relation broken: 13 of 21" in reasons[0]
    assert regressions(_comparison([False] + [True] * 18))  # 1 of 19: none allowed
    # fixing some does not pay for breaking others: counted probe by probe
    assert regressions(_comparison([False, True, True], relation_before=[True, False, False]))


def test_verify_fails_on_each_panel_and_on_paraphrases_getting_worse():
    c = _comparison([True] * 3, paraphrases=((True, False), (False, False)), general=(True, True))
    c.panel_after.general = _scores([True, False])
    c.panel_after.side_effects = _scores([False])
    c.facts = fact_outcomes(_scores([False, False]), _scores([True, False]))
    reasons = regressions(c)
    assert len(reasons) == 4  # one reason per failed check
    assert reasons[0].startswith("1/2 edited facts not said after")
    assert reasons[1] == "paraphrases got worse: 1 -> 0 of 2 said"
    assert any(r.startswith("general probes broken: 1 of 2") for r in reasons)
    assert any(r.startswith("side-effect probes broken: 1 of 1") for r in reasons)


def test_evaluation_counts_by_generation_with_lenient_and_first_token_beside():
    c = _comparison([True, True])
    # the first token right, the answer not said (" D" -> " Dazaibakt"): wrong, but right by first token
    trap = _result(0, False, first_token=True, said=" Dazaibakt")
    c.facts = fact_outcomes(ProbeScores([_result(0, False)]), ProbeScores([trap]))
    e = c.evaluation()
    assert e["efficacy"] == {
        "before": 0,
        "after": 0,
        "total": 1,
        "lenient": {"before": 0, "after": 0},
        "first_token": {"before": 0, "after": 1},
    }
    assert list(e["relation"])[:5] == ["before", "after", "total", "fixed", "broken"]  # old keys first
    assert c.facts[0].after == " Dazaibakt" and c.facts[0].first_token_after == " answer0"
    assert "0/1 (lenient 0, first token 1)" in dict((m, a) for m, _, a in c.rows())["facts said (efficacy)"]
    wrong = c.wrong_after()
    assert [(w.kind, w.why, w.after) for w in wrong] == [("fact", "not said", " Dazaibakt")]
    assert "' Dazaibakt'" in format_wrong(wrong) and "' Dazaibakt'" in format_facts(c.facts)
    assert regressions(c)[0].startswith("1/1 edited facts not said after")
    d = json.loads(json.dumps(c.to_dict()))
    assert d["wrong_after"][0]["after"] == " Dazaibakt" and d["facts"][0]["first_token_correct_after"]


def test_wrong_after_lists_broken_and_changed_probes():
    c = _comparison([False, True], paraphrases=((False, True), (False, False)))
    c.panel_after.neighbourhood = ProbeScores(
        [_result(0, True, said=" answer0, then"), _result(1, True), _result(2, False)]
    )
    kinds = [(w.kind, w.why, w.prompt) for w in c.wrong_after()]
    assert kinds == [
        ("paraphrase", "not said", "prompt 1"),
        ("relation", "broken", "prompt 0"),
        ("neighbourhood", "changed", "prompt 0"),
        ("neighbourhood", "broken", "prompt 2"),
    ]


def test_compare_judges_by_generation(tiny_model, tiny_tokenizer, tiny_panel):
    # a fact whose first token the model gives but whose answer it does not go on to say
    prompt = "The capital of France is"
    words = greedy_continuations(tiny_model, tiny_tokenizer, [prompt], 2)[0].split()
    other = next(w for w in ("Tokyo", "Rome", "Madrid") if w != words[1])
    trap = Fact(prompt, f" {words[0]} {other}")
    panel = Panel.from_dict(
        {**tiny_panel.to_dict(), "relation": [{"prompt": "The capital of Japan is", "target": " Tokyo"}]}
    )
    c = compare(tiny_model, tiny_model, tiny_tokenizer, [trap], panel, fluency_tokens=8)
    e = c.evaluation()
    assert (e["efficacy"]["after"], e["efficacy"]["first_token"]["after"]) == (0, 1)
    assert c.facts[0].after == c.facts[0].before and c.facts[0].after.split()[0] == words[0]
    assert e["relation"]["total"] == 1 and e["general"]["total"] == 2
    assert e["fluency"]["before"] == e["fluency"]["after"] and e["fluency"]["tokens"] == 8
    # generated in the same batched call as the probes, yet each text as if alone
    alone = fluency(tiny_model, tiny_tokenizer, fluency_prompts([trap], panel), tokens=8)
    assert (c.fluency_after.prompts, c.fluency_after.texts) == (alone.prompts, alone.texts)
    assert c.fluency_after.prompts == [prompt] + [p.prompt for p in panel.general[:2]]
    assert e["specificity"]["answers_unchanged"] == e["specificity"]["total"]
    assert [w.kind for w in c.wrong_after()] == ["fact"]  # the same model: nothing broken or changed
    assert len(regressions(c)) == 1
    d = json.loads(json.dumps(c.to_dict()))
    assert d["fluency_after"]["samples"][0]["prompt"] == prompt
    assert compare(tiny_model, tiny_model, tiny_tokenizer, [trap], panel, fluency_tokens=0).fluency_after is None
