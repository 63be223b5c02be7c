"""The app's event functions, called directly (no server): on the demo model and on the tiny fixtures.

Covers the adaptation UI <-> library, every user error as one ``gr.Error`` line, and the many-users invariants:
the shared base model is never modified, and two sessions never see each other's edits — also when their
requests run at the same time.
"""

from __future__ import annotations

import json
import os
import threading

import pytest
import torch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

import app  # noqa: E402
from conftest import make_tiny_model  # noqa: E402
from surgery.model_io import LoadedModel  # noqa: E402
from surgery.panels import Panel, Probe  # noqa: E402
from surgery.patch import Patch  # noqa: E402
from surgery.sessions import StartUp  # noqa: E402

FRANCE = ("The capital of France is", " Paris")


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the shared base model was modified"


def error_text(excinfo) -> str:
    return str(excinfo.value.message if hasattr(excinfo.value, "message") else excinfo.value)


class NoProgress:
    """Stands in for gr.Progress outside an event."""

    def __init__(self):
        self.calls = []

    def __call__(self, progress=None, desc=None, **kwargs):
        self.calls.append((progress, desc))


@pytest.fixture(scope="module")
def demo_app(demo, tmp_path_factory):
    return app.SurgeryApp(StartUp(demo), work_dir=str(tmp_path_factory.mktemp("sessions")))


@pytest.fixture(scope="module")
def demo_facts(demo_app) -> str:
    return json.dumps([p.to_dict() for p in demo_app.facts])


@pytest.fixture(scope="module")
def operated(demo_app, demo_facts):
    """One session's surgery on the demo model (wv, auto layer), with the base model's weights before it."""
    before = snapshot(demo_app.base.model)
    progress = NoProgress()
    out = demo_app.operate(demo_facts, "wv", "auto", None, progress=progress)
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
    rest = [abs(a["target"] - a["competitor"]) for a in raw["dla"]
            if a["head"] is not None and app.head_label(a["layer"], a["head"]) not in shown]
    assert len(bars) == app.TOP_HEADS and bars["target − competitor"].abs().min() >= max(rest)
    assert raw["verdict"] == "routing" and raw["target"]["text"].strip() == "Paris"
    json.dumps(raw)  # JSON-friendly for API clients
    n_heads = raw["n_layer"] * raw["n_head"]
    assert sum(a["head"] is not None for a in raw["dla"]) == n_heads


def test_diagnose_with_competitor(demo_app):
    _, _, _, _, raw = demo_app.diagnose(*FRANCE, " the")
    assert raw["competitor"]["text"].strip() == "the"


@pytest.mark.parametrize("prompt, target, match", [
    ("", " Paris", "empty"),
    ("   ", " Paris", "empty"),
    ("The capital of France is" * 100, " Paris", "characters long"),
    ("The capital of France is", "", "target is empty"),
    ("The capital of France is", " Zurichxyz", "vocabulary"),
])
def test_diagnose_bad_input_is_one_gr_error(demo_app, prompt, target, match):
    with pytest.raises(gr.Error, match=match):
        demo_app.diagnose(prompt, target, "")


def test_prompt_longer_than_the_context(tiny_model, tiny_tokenizer):
    tiny = app.SurgeryApp(StartUp(LoadedModel(tiny_model, tiny_tokenizer, "tiny")))
    with pytest.raises(gr.Error, match="context"):
        tiny.diagnose("the cat sat on the mat . " * 10, "Paris", "")


# --------------------------------------------------------------------------------------------------------------
# Facts and options
# --------------------------------------------------------------------------------------------------------------


def test_parse_facts_accepts_json_rows_and_tables():
    import pandas as pd

    want = [Probe(*FRANCE)]
    assert app.parse_facts(json.dumps([{"prompt": FRANCE[0], "target": FRANCE[1]}])) == want
    assert app.parse_facts([list(FRANCE), ["", ""]]) == want  # empty table rows are ignored
    assert app.parse_facts(pd.DataFrame([list(FRANCE)], columns=["prompt", "target"])) == want


@pytest.mark.parametrize("facts, match", [
    ("", "no facts"),
    ("[]", "empty"),
    ("[{\"prompt\": \"x\"", "not valid JSON"),
    ("[{\"prompt\": \"The capital of France is\"}]", "target"),
    ("{\"a\": 1}", "list"),
])
def test_bad_facts(facts, match):
    with pytest.raises(app.SurgeryError, match=match):
        app.parse_facts(facts)


def test_facts_table_and_json_stay_in_step():
    rows = [list(FRANCE), ["The capital of Italy is", " Rome"]]
    as_json = app.table_to_json(rows)
    assert json.loads(as_json) == [{"prompt": p, "target": t} for p, t in rows]
    assert app.facts_table(as_json) == rows
    assert app.facts_table("[{\"prompt\": ") == gr.skip()  # half-typed JSON leaves the table as it is


def test_parse_layer():
    assert app.parse_layer("auto") is None and app.parse_layer(None) is None and app.parse_layer("") is None
    assert app.parse_layer("3") == 3 and app.parse_layer(3) == 3
    with pytest.raises(app.SurgeryError, match="block index"):
        app.parse_layer("third")


def test_site_choices_show_parameter_counts(demo_app):
    choices = dict((value, label) for label, value in app.site_choices(demo_app))
    assert list(choices) == ["wv", "attn", "mlp", "layer"]
    d = demo_app.layout.d_model
    assert f"{d * d:,} params" in choices["wv"]


def test_layer_choices_name_the_prescribed_layer(demo_app):
    label, value = app.layer_choices(demo_app)[0]
    assert value == "auto" and "prescribed: L" in label


# --------------------------------------------------------------------------------------------------------------
# Surgery
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_operate_fixes_the_facts_and_leaves_the_base_alone(demo_app, operated):
    before, progress, (summary, metrics, facts_rows, files, report, edit) = operated
    assert_unchanged(demo_app.base.model, before)
    assert "Surgery done" in summary and "8/8" in summary
    assert "| facts correct |" in metrics and "| Q/K unchanged (bitwise) |  | true |" in metrics
    assert all(row[4] == "✓" for row in facts_rows) and len(facts_rows) == len(demo_app.facts)
    assert sorted(os.path.basename(f) for f in files) == ["patch.safetensors", "report.json"]
    patch = Patch.load(files[0])
    assert patch.site == "wv" and patch.metadata["base_model"] == demo_app.base.source
    assert json.loads(open(files[1]).read())["facts_fixed"] == "8/8"
    json.dumps(report)
    assert progress.calls and progress.calls[-1][1].startswith("writing")
    assert any(isinstance(p, tuple) for p, _ in progress.calls)  # the library's per-step callback reached the bar


@pytest.mark.slow
def test_generate_side_by_side(demo_app, operated):
    edit = operated[2][-1]
    original, corrected = demo_app.generate(FRANCE[0], 3, edit)
    assert not original.strip().startswith("Paris") and corrected.strip().startswith("Paris")
    original_only, note = demo_app.generate(FRANCE[0], 3, None)
    assert original_only == original and "no surgery" in note


def test_generate_bad_input(demo_app):
    with pytest.raises(gr.Error, match="empty"):
        demo_app.generate("  ", 5, None)
    assert demo_app.generate(FRANCE[0], 10_000, None)[0]  # clamped, not an error


def test_operate_without_facts(demo_app):
    with pytest.raises(gr.Error, match="no facts"):
        demo_app.operate("", "wv", "auto", None, progress=NoProgress())
    with pytest.raises(gr.Error, match="unknown site"):
        demo_app.operate(json.dumps([dict(prompt=FRANCE[0], target=FRANCE[1])]), "xyz", "auto", None,
                         progress=NoProgress())


def tiny_panel() -> Panel:
    return Panel(name="tiny", facts=(Probe("The capital of France is", "Paris"),),
                 general=(Probe("the cat sat on the", "mat"),), side_effects=(Probe("one two", "three"),),
                 perplexity_text="the cat sat on the mat .", unrelated_text=("the dog sat on the mat .",))


def test_surgery_that_fails_is_one_gr_error(tiny_tokenizer, monkeypatch):
    """Contradictory facts cannot all be top-1: the library's SurgeryFailed becomes a gr.Error."""
    import functools

    monkeypatch.setattr(app, "SurgeryConfig", functools.partial(app.SurgeryConfig, epochs=5))  # fail fast
    tiny_model = make_tiny_model(len(tiny_tokenizer))  # its own: views install transformers' hooks on a base
    tiny = app.SurgeryApp(StartUp(LoadedModel(tiny_model, tiny_tokenizer, "tiny")), panel=tiny_panel())
    before = snapshot(tiny_model)
    facts = json.dumps([{"prompt": "The capital of France is", "target": t} for t in ("Paris", "Rome")])
    with pytest.raises(gr.Error, match="not fixed within the budget"):
        tiny.operate(facts, "wv", "0", None, progress=NoProgress())
    assert_unchanged(tiny_model, before)


# --------------------------------------------------------------------------------------------------------------
# Many users
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_sessions_never_see_each_others_edits(demo_app, operated):
    """Session A holds an edit; session B makes a different one while A generates and diagnoses in parallel."""
    base = demo_app.base.model
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
    b = demo_app.operate(json.dumps([p.to_dict() for p in demo_app.facts]), "mlp", "auto", None,
                         progress=NoProgress())
    worker.join()
    assert not errors, errors
    edit_b = b[-1]
    assert all(r == a_answer for r in results["a"])  # A's outputs never changed while B operated
    assert all(d == a_diagnosis for d in results["diag"])  # nor did the shared diagnosis (hooks stay per thread)
    assert_unchanged(base, before)

    # Each session's model is the base plus its own patch only.
    view_a, view_b = edit_a.model(base), edit_b.model(base)
    a_params, b_params = dict(view_a.named_parameters()), dict(view_b.named_parameters())
    for name, p in base.named_parameters():
        in_a = any(s.name == name for s in edit_a.patch.slices)
        in_b = any(s.name == name for s in edit_b.patch.slices)
        assert torch.equal(a_params[name], p) or in_a
        assert torch.equal(b_params[name], p) or in_b
    assert edit_a.patch.site == "wv" and edit_b.patch.site == "mlp"
    # A session with no edit still gets the original model.
    assert demo_app.generate(FRANCE[0], 2, None)[0] == a_answer[0]


# --------------------------------------------------------------------------------------------------------------
# Verify and push
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_verify_this_sessions_edit_and_a_folder(demo_app, operated, tmp_path):
    edit = operated[2][-1]
    verdict, facts, panels, raw = demo_app.verify("", edit)
    assert "Verified" in verdict and raw["facts_after"] == raw["facts_total"] == len(demo_app.facts)
    assert all(row[4] == "✓" for row in facts) and "| general |" in panels

    from surgery.export import write_output

    folder = write_output(tmp_path / "corrected", demo_app.base, edit.result)
    verdict2, _, _, raw2 = demo_app.verify(str(folder), None)
    assert raw2["facts_after"] == raw["facts_after"] and "Verified" in verdict2


def test_verify_errors(demo_app, monkeypatch):
    with pytest.raises(gr.Error, match="nothing to verify"):
        demo_app.verify("", None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(gr.Error, match="cannot load"):
        demo_app.verify("nobody/no-such-model", None)
    with pytest.raises(gr.Error, match="no such model folder"):
        demo_app.verify("./no/such/folder", None)


def test_verify_refuses_local_folders_on_a_space(demo, tmp_path):
    space = app.SurgeryApp(StartUp(demo), allow_local_models=False)
    with pytest.raises(gr.Error, match="Hub model id"):
        space.verify(str(demo.source), None)


def test_push_without_login(demo_app):
    with pytest.raises(gr.Error, match="Sign in with Hugging Face"):
        demo_app.push("fixed", False, None, None, None)


@pytest.mark.slow
def test_push_goes_to_the_users_namespace(demo_app, operated, monkeypatch):
    calls = []

    def fake_push(folder, repo_id, token=None, private=False):
        calls.append((folder, repo_id, token, private))
        return f"https://huggingface.co/{repo_id}"

    monkeypatch.setattr(app, "push_folder", fake_push)
    edit = operated[2][-1]
    token = gr.OAuthToken(token="hf_oauth_secret", scope="openid profile contribute-repos", expires_at=0)
    profile = gr.OAuthProfile({"name": "Ada", "preferred_username": "ada", "profile": "", "picture": ""})
    message = demo_app.push("someone-else/capitals-fixed", True, edit, token, profile)
    folder, repo_id, sent, private = calls[0]
    assert repo_id == "ada/capitals-fixed" and sent == "hf_oauth_secret" and private is True
    assert {"config.json", "model.safetensors", "patch.safetensors", "report.json", "README.md"} <= \
        {p.name for p in folder.iterdir()}
    assert "ada/capitals-fixed" in message and "hf_oauth_secret" not in message
    with pytest.raises(gr.Error, match="nothing to push"):
        demo_app.push("x", False, None, token, profile)


# --------------------------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------------------------


def test_build_demo_names_the_endpoints(demo):
    demo_blocks = app.build_demo(startup=StartUp(demo))
    names = {d.api_name for d in demo_blocks.fns.values()}
    assert {"diagnose", "operate", "generate", "verify"} <= names
    assert not demo_blocks.expects_oauth  # no login button off a Space


def test_login_button_on_a_space_with_oauth(demo, monkeypatch):
    """What a Space with ``hf_oauth: true`` provides: the OAuth variables; then the app shows the login button."""
    import gradio.oauth

    monkeypatch.setenv("SYSTEM", "spaces")
    monkeypatch.setenv("SPACE_ID", "someone/transformer-surgery")
    for name, value in [("OAUTH_CLIENT_ID", "id"), ("OAUTH_CLIENT_SECRET", "secret"),
                        ("OAUTH_SCOPES", "openid profile contribute-repos"),
                        ("OPENID_PROVIDER_URL", "https://huggingface.co")]:
        monkeypatch.setattr(gradio.oauth, name, value)
    blocks = app.build_demo(startup=StartUp(demo), login=True)
    assert blocks.expects_oauth


def test_importing_the_app_loads_nothing(monkeypatch):
    """No model, no environment, no server at import: only build_demo() and main() do things."""
    import importlib

    import surgery.model_io

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded at import")

    monkeypatch.setattr(surgery.model_io, "load_model", refuse)
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


def test_heads_views(demo_app):
    overlap, keys, rows = demo_app.heads()
    assert len(rows) == demo_app.layout.n_layer * demo_app.layout.n_head and len(rows[0]) == len(app.HEAD_COLUMNS)
    assert demo_app.heads()[2] == rows  # cached
