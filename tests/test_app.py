"""The app's event functions, called directly (no server): on the demo model and on the tiny fixtures.

Covers the adaptation UI <-> library, every user error as one ``gr.Error`` line, the model picker, the causal
views, and the many-users invariants: the shared base models are never modified, two sessions never see each
other's edits — also when their requests run at the same time — and an edit never reaches another model.
"""

from __future__ import annotations

import json
import os
import threading

import pytest
import torch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
from conftest import NoProgress, make_tiny_model  # noqa: E402

import app  # noqa: E402
import ui.callbacks as ui_callbacks  # noqa: E402
import ui.common as ui_common  # noqa: E402
import ui.diagnose as ui_diagnose  # noqa: E402
import ui.heads as ui_heads  # noqa: E402
import ui.picker as ui_picker  # noqa: E402
import ui.surgery as ui_surgery  # noqa: E402
from surgery.core.errors import SurgeryError  # noqa: E402
from surgery.evaluation.facts import Fact  # noqa: E402
from surgery.evaluation.panels import Panel  # noqa: E402
from surgery.io.edit_file import Edit  # noqa: E402
from surgery.io.loading import LoadedModel  # noqa: E402
from surgery.serve.registry import ModelChoice, ModelRegistry  # noqa: E402
from surgery.serve.sessions import SessionEdits, StartUp  # noqa: E402

FRANCE = ("The capital of France is", " Paris")


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the shared base model was modified"


def error_text(excinfo) -> str:
    return str(excinfo.value.message if hasattr(excinfo.value, "message") else excinfo.value)


def serving(loaded: LoadedModel, panel: Panel | None = None, **kwargs) -> ui_callbacks.SurgeryApp:
    return ui_callbacks.SurgeryApp(ui_picker.single_model_registry(StartUp(loaded), panel), **kwargs)


@pytest.fixture(scope="module")
def demo_app(demo, tmp_path_factory):
    return serving(demo, work_dir=str(tmp_path_factory.mktemp("sessions")))


@pytest.fixture(scope="module")
def demo_served(demo_app):
    return demo_app.served()


@pytest.fixture(scope="module")
def demo_facts(demo_served) -> str:
    return json.dumps([p.to_dict() for p in demo_served.facts])


@pytest.fixture(scope="module")
def operated(demo_app, demo_served, demo_facts):
    """One session's surgery on the demo model (wv, auto layer), with the base model's weights before it."""
    before = snapshot(demo_served.model)
    progress = NoProgress()
    out = demo_app.operate(demo_facts, "wv", "auto", "wv", None, progress=progress)
    return before, progress, out


# --------------------------------------------------------------------------------------------------------------
# Diagnose
# --------------------------------------------------------------------------------------------------------------


def test_diagnose_demo_capital(demo_app):
    verdict, lens, heatmap, bars, raw = demo_app.diagnose(*FRANCE, "")
    assert "Routing" in verdict and "overridden by L" in verdict and "prescribed surgery layer L" in verdict
    for fig in (lens, heatmap):
        assert fig.__class__.__name__ == "Figure"
    # The bar chart holds the TOP_HEADS heads with the largest |target - competitor|.
    shown = set(bars["head"])
    rest = [
        abs(a["target"] - a["competitor"])
        for a in raw["dla"]
        if a["head"] is not None and demo_app.served().layout.label(a["layer"], a["head"]) not in shown
    ]
    assert len(bars) == ui_diagnose.TOP_HEADS and bars["target − competitor"].abs().min() >= max(rest)
    assert raw["verdict"] == "routing" and raw["target"]["text"].strip() == "Paris"
    json.dumps(raw)  # JSON-friendly for API clients
    n_heads = raw["n_layer"] * raw["n_head"]
    assert sum(a["head"] is not None for a in raw["dla"]) == n_heads


def test_diagnose_with_competitor(demo_app):
    _, _, _, _, raw = demo_app.diagnose(*FRANCE, " the")
    assert raw["competitor"]["text"].strip() == "the"


@pytest.mark.parametrize(
    "prompt, target, match",
    [
        ("", " Paris", "empty"),
        ("   ", " Paris", "empty"),
        ("The capital of France is" * 100, " Paris", "characters long"),
        ("The capital of France is", "", "target is empty"),
        ("The capital of France is", " Zurichxyz", "vocabulary"),
    ],
)
def test_diagnose_bad_input_is_one_gr_error(demo_app, prompt, target, match):
    with pytest.raises(gr.Error, match=match):
        demo_app.diagnose(prompt, target, "")


def test_prompt_longer_than_the_context(tiny_model, tiny_tokenizer):
    tiny = serving(LoadedModel(tiny_model, tiny_tokenizer, "tiny"), tiny_panel())
    with pytest.raises(gr.Error, match="context"):
        tiny.diagnose("the cat sat on the mat . " * 10, "Paris", "")


# --------------------------------------------------------------------------------------------------------------
# Facts and options
# --------------------------------------------------------------------------------------------------------------


def test_parse_facts_accepts_json_rows_and_tables():
    import pandas as pd

    want = [Fact(*FRANCE)]
    assert ui_common.parse_facts(json.dumps([{"prompt": FRANCE[0], "target": FRANCE[1]}])) == want
    assert ui_common.parse_facts([list(FRANCE), ["", ""]]) == want  # empty table rows are ignored
    assert ui_common.parse_facts(pd.DataFrame([list(FRANCE)], columns=["prompt", "target"])) == want


@pytest.mark.parametrize(
    "facts, match",
    [
        ("", "no facts"),
        ("[]", "empty"),
        ('[{"prompt": "x"', "not valid JSON"),
        ('[{"prompt": "The capital of France is"}]', "target"),
        ('{"a": 1}', "list"),
    ],
)
def test_bad_facts(facts, match):
    with pytest.raises(SurgeryError, match=match):
        ui_common.parse_facts(facts)


def test_facts_table_and_json_stay_in_step():
    rows = [[*FRANCE, "France"], ["The capital of Italy is", " Rome", ""]]
    as_json = ui_surgery.table_to_json(rows)
    assert json.loads(as_json) == [
        {"prompt": FRANCE[0], "target": FRANCE[1], "subject": "France"},
        dict(zip(("prompt", "target"), rows[1])),
    ]
    assert ui_surgery.facts_table(as_json) == rows
    assert ui_surgery.table_to_json([list(FRANCE)]) == json.dumps([dict(zip(("prompt", "target"), FRANCE))], indent=1)
    with pytest.raises(SurgeryError, match="subject"):  # a subject that is not part of the prompt is refused
        ui_common.parse_facts([[*FRANCE, "Spain"]])
    assert ui_surgery.facts_table('[{"prompt": ') == gr.skip()  # half-typed JSON leaves the table as it is


def test_parse_layer():
    parse_layer = ui_common.parse_layer
    assert parse_layer("auto") is None and parse_layer(None) is None and parse_layer("") is None
    assert parse_layer("3") == 3 and parse_layer(3) == 3
    with pytest.raises(SurgeryError, match="block index"):
        ui_common.parse_layer("third")


def test_site_choices_show_parameter_counts(demo_served):
    choices = dict((value, label) for label, value in ui_surgery.site_choices(demo_served))
    assert list(choices) == ["wv", "attn", "mlp", "layer"]
    d = demo_served.layout.d_model
    assert f"{d * d:,} params" in choices["wv"]


def test_layer_choices_name_the_prescribed_layer(demo_served):
    label, value = ui_surgery.layer_choices(demo_served)[0]
    assert value == "auto" and "prescribed: L" in label


# --------------------------------------------------------------------------------------------------------------
# Surgery
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_operate_fixes_the_facts_and_leaves_the_base_alone(demo_app, demo_served, operated):
    before, progress, (summary, metrics, facts_rows, files, report, edits) = operated
    assert_unchanged(demo_served.model, before)
    assert "Surgery done" in summary and "8/8" in summary
    assert "| facts said (efficacy) |" in metrics and "| Q/K unchanged (bitwise) |  | true |" in metrics
    assert "| side effects (specificity) |" in metrics and "| perplexity |" in metrics
    assert [row[0] for row in facts_rows] == ["fact"] * len(demo_served.facts)  # the demo panel has no paraphrases
    assert all(row[5] == "✓" for row in facts_rows)
    assert edits.keys() == [demo_served.key] and edits.get(demo_served.key).model_key == demo_served.key
    assert sorted(os.path.basename(f) for f in files) == ["patch.safetensors", "report.json"]
    edit = Edit.load(files[0])
    assert edit.site == "wv" and edit.metadata["base_model"] == demo_served.loaded.base_name
    assert json.loads(open(files[1]).read())["facts_fixed"] == "8/8"
    json.dumps(report)
    assert progress.calls and progress.calls[-1][1].startswith("writing")
    assert any(isinstance(p, tuple) for p, _ in progress.calls)  # the library's per-step callback reached the bar


@pytest.mark.slow
def test_generate_side_by_side(demo_app, operated):
    edits = operated[2][-1]
    original, corrected = demo_app.generate(FRANCE[0], 3, edits)
    assert not original.strip().startswith("Paris") and corrected.strip().startswith("Paris")
    original_only, note = demo_app.generate(FRANCE[0], 3, None)
    assert original_only == original and "no surgery" in note


def test_generate_bad_input(demo_app):
    with pytest.raises(gr.Error, match="empty"):
        demo_app.generate("  ", 5, None)
    with pytest.raises(gr.Error, match=r"10000 new tokens asked for: at most 64 here \(SURGERY_MAX_NEW_TOKENS\)"):
        demo_app.generate(FRANCE[0], 10_000, None)


@pytest.mark.parametrize("tokens", ["abc", 2.5, 0, -3, "-1", True, [8]])
def test_generate_refuses_a_bad_token_count(demo_app, tokens):
    """The /generate endpoint with max_new_tokens="abc" raised a ValueError traceback (and 0 quietly meant 20):
    now one gr.Error line naming the value."""
    with pytest.raises(gr.Error) as e:
        demo_app.generate(FRANCE[0], tokens, None)
    text = error_text(e)
    assert text.startswith("new tokens must be a whole number of at least 1, not ") and "\n" not in text


def test_generate_accepts_whole_numbers_in_any_form(demo_app):
    three = demo_app.generate(FRANCE[0], 3, None)
    assert demo_app.generate(FRANCE[0], 3.0, None) == three and demo_app.generate(FRANCE[0], " 3 ", None) == three


def test_operate_without_facts(demo_app):
    with pytest.raises(gr.Error, match="no facts"):
        demo_app.operate("", "wv", "auto", "wv", None, progress=NoProgress())
    with pytest.raises(gr.Error, match="unknown site"):
        demo_app.operate(
            json.dumps([dict(prompt=FRANCE[0], target=FRANCE[1])]), "xyz", "auto", "wv", None, progress=NoProgress()
        )


def tiny_panel() -> Panel:
    return Panel(
        name="tiny",
        facts=(Fact("The capital of France is", "Paris"),),
        general=(Fact("the cat sat on the", "mat"),),
        side_effects=(Fact("one two", "three"),),
        perplexity_text="the cat sat on the mat .",
        unrelated_text=("the dog sat on the mat .",),
    )


def test_surgery_that_fails_is_one_gr_error(tiny_tokenizer, monkeypatch):
    """Contradictory facts cannot all be top-1: the library's SurgeryFailed becomes a gr.Error."""
    import functools

    fast = functools.partial(ui_callbacks.SurgeryConfig, epochs=5)  # fail fast
    monkeypatch.setattr(ui_callbacks, "SurgeryConfig", fast)
    tiny_model = make_tiny_model(len(tiny_tokenizer))  # its own: views install transformers' hooks on a base
    tiny = serving(LoadedModel(tiny_model, tiny_tokenizer, "tiny"), tiny_panel())
    before = snapshot(tiny_model)
    facts = json.dumps([{"prompt": "The capital of France is", "target": t} for t in ("Paris", "Rome")])
    with pytest.raises(gr.Error, match="not fixed within the budget"):
        tiny.operate(facts, "wv", "0", "wv", None, progress=NoProgress())
    assert_unchanged(tiny_model, before)


# --------------------------------------------------------------------------------------------------------------
# Many users
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_sessions_never_see_each_others_edits(demo_app, operated):
    """Session A holds an edit; session B makes a different one while A generates and diagnoses in parallel."""
    base = demo_app.served().model
    before = operated[0]
    edit_a = operated[2][-1]
    a_answer = demo_app.generate(FRANCE[0], 2, edit_a)
    a_diagnosis = demo_app.diagnose(*FRANCE, "")[-1]

    results, errors = {"a": [], "diag": []}, []

    def session_a():
        try:
            for _ in range(5):
                results["a"].append(demo_app.generate(FRANCE[0], 2, edit_a))
                results["diag"].append(demo_app.diagnose(*FRANCE, "")[-1])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    worker = threading.Thread(target=session_a)
    worker.start()
    b = demo_app.operate(
        json.dumps([p.to_dict() for p in demo_app.served().facts]), "mlp", "auto", "wv", None, progress=NoProgress()
    )
    worker.join()
    assert not errors, errors
    edit_b = b[-1]
    assert all(r == a_answer for r in results["a"])  # A's outputs never changed while B operated
    assert all(d == a_diagnosis for d in results["diag"])  # nor did the shared diagnosis (hooks stay per thread)
    assert_unchanged(base, before)

    # Each session's model is the base plus its own edit only.
    edit_a, edit_b = edit_a.get(demo_app.served().key), edit_b.get(demo_app.served().key)
    view_a, view_b = edit_a.model(base), edit_b.model(base)
    a_params, b_params = dict(view_a.named_parameters()), dict(view_b.named_parameters())
    for name, p in base.named_parameters():
        in_a = any(s.name == name for s in edit_a.edit.slices)
        in_b = any(s.name == name for s in edit_b.edit.slices)
        assert torch.equal(a_params[name], p) or in_a
        assert torch.equal(b_params[name], p) or in_b
    assert edit_a.edit.site == "wv" and edit_b.edit.site == "mlp"
    # A session with no edit still gets the original model.
    assert demo_app.generate(FRANCE[0], 2, None)[0] == a_answer[0]


# --------------------------------------------------------------------------------------------------------------
# The model picker: two tiny models, each loaded once on first use; an edit belongs to the model it was made on
# --------------------------------------------------------------------------------------------------------------

TINY_FACTS = [
    Fact("The capital of France is", "Paris", ("The capital city of France is", "the capital of France is")),
    Fact("The capital of Japan is", "Tokyo"),
]


def paraphrase_panel() -> Panel:
    return Panel(
        name="tiny",
        facts=tuple(TINY_FACTS),
        general=(Fact("the cat sat on the", "mat"),),
        side_effects=(Fact("one two", "three"),),
        perplexity_text="the cat sat on the mat .",
        unrelated_text=("the dog sat on the mat .",),
    )


class TinyLoader:
    """Stands in for load_model: one tiny random GPT-2 per source (seeded by it), counting the loads."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []

    def __call__(self, source, device=None):
        self.calls.append(source)
        seed = {"/models/a": 1, "/models/b": 2}[source]
        return LoadedModel(make_tiny_model(len(self.tokenizer), seed=seed), self.tokenizer, source)


def two_model_registry(tokenizer) -> tuple[ModelRegistry, TinyLoader]:
    loader = TinyLoader(tokenizer)
    choices = [ModelChoice("tiny-a", "tiny model A", "/models/a"), ModelChoice("tiny-b", "tiny model B", "/models/b")]
    return ModelRegistry(
        choices, loader=loader, panels={"tiny-a": paraphrase_panel(), "tiny-b": paraphrase_panel()}
    ), loader


@pytest.fixture(scope="module")
def two_models(tiny_tokenizer, tmp_path_factory):
    registry, _ = two_model_registry(tiny_tokenizer)
    return ui_callbacks.SurgeryApp(registry, work_dir=str(tmp_path_factory.mktemp("two-models")))


TINY_FACTS_JSON = json.dumps([f.to_dict() for f in TINY_FACTS])


def operate_tiny(tiny_app: ui_callbacks.SurgeryApp, model: str, edits=None):
    # The whole block 2 (site "layer"): a random tiny model is fixed within the default budget.
    return tiny_app.operate(TINY_FACTS_JSON, "layer", "2", "wv", edits, model, progress=NoProgress())


@pytest.fixture(scope="module")
def operated_a(two_models):
    """One session's surgery on tiny model A: the Surgery tab's outputs."""
    return operate_tiny(two_models, "tiny-a")


def picker_of(blocks: gr.Blocks) -> gr.Dropdown:
    (picker,) = [b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == "model-picker"]
    return picker


def test_the_picker_lists_the_models_and_each_loads_once_on_first_use(tiny_tokenizer):
    registry, loader = two_model_registry(tiny_tokenizer)
    picker = picker_of(app.build_demo(registry=registry))
    assert picker.choices == [("tiny model A", "tiny-a"), ("tiny model B", "tiny-b")] and picker.value == "tiny-a"
    assert loader.calls == ["/models/a"]  # the page is built on the default model; B is not loaded yet
    tiny = ui_callbacks.SurgeryApp(registry)
    view = tiny.select_model("tiny-b", None, progress=NoProgress())
    assert loader.calls == ["/models/a", "/models/b"]
    assert "**tiny-b**" in view[0] and view[2] == TINY_FACTS[0].prompt  # model line, first example
    tiny.select_model("tiny-b", None, progress=NoProgress())
    tiny.diagnose(*FRANCE, "", "tiny-b")
    tiny.select_model("tiny-a", None, progress=NoProgress())
    assert loader.calls == ["/models/a", "/models/b"]  # never again
    with pytest.raises(gr.Error, match="unknown model"):
        tiny.diagnose(*FRANCE, "", "tiny-c")


def test_switching_models_diagnoses_and_scores_each_panel_once(tiny_tokenizer, monkeypatch):
    import surgery.serve.registry as registry_module

    calls = []
    for name in ("choose_layer", "score_probes"):
        real = getattr(registry_module, name)
        monkeypatch.setattr(registry_module, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    registry, _ = two_model_registry(tiny_tokenizer)
    tiny = ui_callbacks.SurgeryApp(registry)
    first = tiny.select_model("tiny-b", None, progress=NoProgress())
    assert sorted(calls) == ["choose_layer", "score_probes"]
    again = (
        tiny.select_model("tiny-a", None, progress=NoProgress()),
        tiny.select_model("tiny-b", None, progress=NoProgress()),
    )
    assert sorted(calls) == ["choose_layer", "choose_layer", "score_probes", "score_probes"]  # A once, B not again
    assert again[1][7] == first[7] and again[1][6].choices == first[6].choices  # the same facts note and layers


def test_the_side_by_side_shows_the_facts_then_their_paraphrases(operated_a):
    summary, metrics, rows, files, report, edits = operated_a
    paraphrases = list(TINY_FACTS[0].paraphrases)
    assert [r[0] for r in rows] == ["fact", "fact", "paraphrase", "paraphrase"]
    assert [r[1] for r in rows] == [f.prompt for f in TINY_FACTS] + paraphrases
    assert all(r[2] == "Paris" for r in rows[2:]) and all(r[3] and r[4] for r in rows)  # both answers shown
    assert all(r[5] == "✓" for r in rows[:2])
    assert "| paraphrases (generalization) | " in metrics and "Paraphrases:" in summary
    assert report["paraphrases"] and edits.keys() == ["tiny-a"]


def test_two_sessions_on_two_models_never_mix_edits(two_models):
    base_a, base_b = two_models.served("tiny-a").model, two_models.served("tiny-b").model
    before_a, before_b = snapshot(base_a), snapshot(base_b)
    results, errors = {}, []

    def session(name, model):
        try:
            results[name] = operate_tiny(two_models, model)[-1]
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    workers = [
        threading.Thread(target=session, args=("alice", "tiny-a")),
        threading.Thread(target=session, args=("bob", "tiny-b")),
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors, errors
    alice, bob = results["alice"], results["bob"]
    assert alice.keys() == ["tiny-a"] and bob.keys() == ["tiny-b"]
    assert_unchanged(base_a, before_a)
    assert_unchanged(base_b, before_b)

    # Each session's edit applies to its own model only; on the other model the session has no edit.
    assert "no surgery on this model" in two_models.generate(FRANCE[0], 2, alice, "tiny-b")[1]
    assert "no surgery on this model" in two_models.generate(FRANCE[0], 2, bob, "tiny-a")[1]
    for edits, model in ((alice, "tiny-b"), (bob, "tiny-a")):
        with pytest.raises(gr.Error, match="nothing to verify"):
            two_models.verify("", edits, model)
        with pytest.raises(gr.Error, match="no edit"):
            two_models.patch_weights("site", edits, model)
    # On its own model, a session's view is that base plus its own edit only.
    for edits, key, base in ((alice, "tiny-a", base_a), (bob, "tiny-b", base_b)):
        edit = edits.get(key)
        assert edit.model_key == key
        view = dict(edit.model(base).named_parameters())
        changed = {s.name for s in edit.edit.slices}
        assert all(torch.equal(view[n], p) for n, p in base.named_parameters() if n not in changed)
        assert not all(torch.equal(view[n], p) for n, p in base.named_parameters() if n in changed)


@pytest.mark.slow
def test_one_session_keeps_one_edit_per_model(two_models):
    from surgery.evaluation.generation import generate

    edits = operate_tiny(two_models, "tiny-a")[-1]
    first_a = edits.get("tiny-a")
    edits = operate_tiny(two_models, "tiny-b", edits)[-1]
    assert sorted(edits.keys()) == ["tiny-a", "tiny-b"] and edits.get("tiny-a") is first_a
    for key in ("tiny-a", "tiny-b"):
        served = two_models.served(key)
        want = generate(edits.get(key).model(served.model), served.tokenizer, FRANCE[0], max_new_tokens=2)
        assert two_models.generate(FRANCE[0], 2, edits, key)[1] == want
    # Switching back to a model shows this session's edit of it; a new edit of it replaces the old one.
    view = two_models.select_model("tiny-a", edits, progress=NoProgress())
    assert "Surgery done" in view[12] and view[-1].visible is True
    edits = operate_tiny(two_models, "tiny-a", edits)[-1]
    assert edits.get("tiny-a") is not first_a and not first_a.folder.exists()
    edits.discard()
    assert edits.keys() == []
    fresh = two_models.select_model("tiny-a", SessionEdits(), progress=NoProgress())
    assert fresh[12] == ui_surgery.NO_EDIT_YET and fresh[-1].visible is False


def test_weight_patching_of_the_sessions_edit(two_models, operated_a):
    edits = operated_a[-1]
    summary, chart, raw = two_models.patch_weights("site", edits, "tiny-a")
    assert chart.__class__.__name__ == "Figure" and raw["mode"] == "donor" and raw["granularity"] == "site"
    assert raw["donor"]["facts_correct"] == len(TINY_FACTS) and "this session's edit" in summary
    assert {c["layer"] for c in raw["components"]} == {2}  # only the edited block differs
    _, _, heads = two_models.patch_weights("head", edits, "tiny-a")
    assert heads["granularity"] == "head" and all(c["head"] is not None for c in heads["components"])


# --------------------------------------------------------------------------------------------------------------
# Causal checks on the demo model
# --------------------------------------------------------------------------------------------------------------


def test_activation_patching_on_the_demo_model(demo_app):
    summary, positions, heads, raw = demo_app.patch_activations(
        FRANCE[0], ui_diagnose.DEFAULT_CORRUPT, FRANCE[1], "", "attn"
    )
    assert positions.__class__.__name__ == heads.__class__.__name__ == "Figure"
    assert set(raw["grids"]) == {"attn", "head"} and raw["target"]["text"].strip() == "Paris"
    assert "clean" in summary and "corrupted" in summary and "L3" in summary  # block 2 attention carries it
    json.dumps(raw)


@pytest.mark.parametrize(
    "corrupt, kind, match",
    [
        ("The capital city of Poland is", "resid", "same number of tokens"),
        ("", "resid", "corrupted prompt is empty"),
        (ui_diagnose.DEFAULT_CORRUPT, "head", "unknown grid"),
    ],
)
def test_activation_patching_errors(demo_app, corrupt, kind, match):
    with pytest.raises(gr.Error, match=match):
        demo_app.patch_activations(FRANCE[0], corrupt, FRANCE[1], "", kind)


@pytest.mark.slow
def test_weight_patching_on_the_demo_model(demo_app, demo_served, operated):
    summary, chart, raw = demo_app.patch_weights("site", operated[2][-1], demo_served.key)
    assert chart.__class__.__name__ == "Figure"
    layer = operated[2][-1].get(demo_served.key).result.report.layer
    # Only the edited block's sites that hold the trained value projection differ (wv, attn and layer).
    assert {(c["name"], c["layer"]) for c in raw["components"]} == {("wv", layer), ("attn", layer), ("layer", layer)}
    assert all(c["facts_correct"] == 8 for c in raw["components"]) and raw["donor"]["facts_correct"] == 8
    assert f"L{layer + 1}" in summary and "8/8" in summary


def test_weight_patching_needs_an_edit(demo_app):
    with pytest.raises(gr.Error, match="no edit"):
        demo_app.patch_weights("site", None)


# --------------------------------------------------------------------------------------------------------------
# Verify and push
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_verify_this_sessions_edit_and_a_folder(demo_app, operated, tmp_path):
    edits = operated[2][-1]
    verdict, facts, panels, raw = demo_app.verify("", edits)
    assert "Verified" in verdict and raw["facts_after"] == raw["facts_total"] == len(demo_app.served().facts)
    assert all(row[5] == "✓" for row in facts) and "| general |" in panels
    assert "| side effects (specificity) |" in panels and raw["evaluation"]["efficacy"]["after"] == 8

    from surgery.io.export import write_output

    folder = write_output(tmp_path / "corrected", demo_app.served().loaded, edits.get(demo_app.served().key).result)
    verdict2, _, _, raw2 = demo_app.verify(str(folder), None)
    assert raw2["facts_after"] == raw["facts_after"] and "Verified" in verdict2


def test_verify_errors(demo_app, monkeypatch):
    with pytest.raises(gr.Error, match="nothing to verify"):
        demo_app.verify("", None)
    with pytest.raises(gr.Error, match="not a model this app loads"):  # not in SURGERY_ALLOWED_MODELS
        demo_app.verify("nobody/no-such-model", None)
    with pytest.raises(gr.Error, match="no such model folder"):
        demo_app.verify("./no/such/folder", None)


def test_verify_refuses_local_folders_on_a_space(demo, tmp_path):
    space = serving(demo, allow_local_models=False)
    with pytest.raises(gr.Error, match="Hub model id"):
        space.verify(str(demo.source), None)


def test_push_without_login(demo_app):
    with pytest.raises(gr.Error, match="Sign in with Hugging Face"):
        demo_app.push("fixed", False, None, oauth_token=None, profile=None)


@pytest.mark.slow
def test_push_goes_to_the_users_namespace(demo_app, operated, monkeypatch):
    calls = []

    def fake_push(folder, repo_id, token=None, private=False):
        calls.append(({p.name for p in folder.iterdir()}, repo_id, token, private))
        return f"https://huggingface.co/{repo_id}"

    monkeypatch.setattr(ui_callbacks, "push_folder", fake_push)
    edits = operated[2][-1]
    token = gr.OAuthToken(token="hf_oauth_secret", scope="openid profile contribute-repos", expires_at=0)
    profile = gr.OAuthProfile({"name": "Ada", "preferred_username": "ada", "profile": "", "picture": ""})
    message = demo_app.push("someone-else/capitals-fixed", True, edits, oauth_token=token, profile=profile)
    names, repo_id, sent, private = calls[0]
    assert repo_id == "ada/capitals-fixed" and sent == "hf_oauth_secret" and private is True
    assert {"config.json", "model.safetensors", "patch.safetensors", "report.json", "README.md"} <= names
    assert "ada/capitals-fixed" in message and "hf_oauth_secret" not in message
    with pytest.raises(gr.Error, match="nothing to push"):
        demo_app.push("x", False, None, oauth_token=token, profile=profile)


# --------------------------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------------------------


def test_build_demo_names_the_endpoints(demo):
    demo_blocks = app.build_demo(startup=StartUp(demo))
    names = {d.api_name for d in demo_blocks.fns.values()}
    assert {"diagnose", "operate", "generate", "verify", "patch_activations", "patch_weights", "heads"} <= names
    assert not demo_blocks.expects_oauth  # no login button off a Space


def test_login_button_on_a_space_with_oauth(demo, monkeypatch):
    """What a Space with ``hf_oauth: true`` provides: the OAuth variables; then the app shows the login button."""
    import gradio.oauth

    monkeypatch.setenv("SYSTEM", "spaces")
    monkeypatch.setenv("SPACE_ID", "someone/transformer-surgery")
    for name, value in [
        ("OAUTH_CLIENT_ID", "id"),
        ("OAUTH_CLIENT_SECRET", "secret"),
        ("OAUTH_SCOPES", "openid profile contribute-repos"),
        ("OPENID_PROVIDER_URL", "https://huggingface.co"),
    ]:
        monkeypatch.setattr(gradio.oauth, name, value)
    blocks = app.build_demo(startup=StartUp(demo), login=True)
    assert blocks.expects_oauth


def test_importing_the_app_loads_nothing(monkeypatch):
    """No model, no environment, no server at import: only build_demo() and main() do things."""
    import importlib

    import surgery.io.loading

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded at import")

    monkeypatch.setattr(surgery.io.loading, "load_model", refuse)
    monkeypatch.setenv("SURGERY_MODEL", "/nonexistent")
    importlib.reload(app)
    monkeypatch.undo()
    importlib.reload(app)


def test_offline_start_falls_back_to_the_demo_model_with_a_banner(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    demo_blocks = app.build_demo("gpt2-this-id-is-not-cached")
    banners = [b for b in demo_blocks.blocks.values() if getattr(b, "elem_id", None) == "fallback-banner"]
    assert banners and "demo model" in banners[0].value and "unreachable" in banners[0].value
    (picker,) = [b for b in demo_blocks.blocks.values() if getattr(b, "elem_id", None) == "model-picker"]
    keys = [value for _, value in picker.choices]
    assert picker.value == keys[0] == "assets/demo-model" and "gpt2-this-id-is-not-cached" not in keys


def test_heads_views(demo_app, demo_served):
    overlap, keys, rows = demo_app.heads()
    lay = demo_served.layout
    assert len(rows) == lay.n_layer * lay.n_head and len(rows[0]) == len(ui_heads.HEAD_COLUMNS)
    assert demo_app.heads(demo_served.key)[2] == rows and len(demo_served.head_cache) == 1  # cached per model
