"""surgery.serve.sessions: start-up with the offline fallback, one edit per session, the downloadable files."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import facts_panel, make_tiny_model

from surgery.core.errors import ModelLoadError
from surgery.edit.training import SurgeryConfig, operate
from surgery.evaluation.facts import Fact
from surgery.io.edit_file import Edit
from surgery.io.loading import DEMO_MODEL, LoadedModel
from surgery.serve.sessions import SessionEdit, load_or_demo, write_downloads

FACTS = [Fact("The capital of France is", "Paris"), Fact("The capital of Japan is", "Tokyo")]
PANEL = facts_panel(FACTS)


@pytest.fixture(scope="module")
def tiny_model(tiny_tokenizer):
    """This module's own tiny model: building views installs transformers' (inert) output recorders on a base."""
    return make_tiny_model(len(tiny_tokenizer))


@pytest.fixture(scope="module")
def tiny_edit(tiny_model, tiny_tokenizer, tmp_path_factory):
    result = operate(tiny_model, tiny_tokenizer, FACTS, SurgeryConfig(site="layer", layer=2), panel=PANEL)
    return SessionEdit(result=result, facts=FACTS, folder=tmp_path_factory.mktemp("session"))


def offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_unloadable_model_falls_back_to_the_demo_model(monkeypatch):
    offline(monkeypatch)
    startup = load_or_demo("someone/not-in-the-cache")
    assert startup.loaded.is_demo and "unreachable" in startup.fallback_reason
    assert load_or_demo(DEMO_MODEL).fallback_reason is None


def test_a_broken_demo_model_is_not_hidden(monkeypatch, tmp_path):
    import surgery.serve.sessions

    monkeypatch.setattr(surgery.serve.sessions, "DEMO_MODEL", tmp_path)  # a folder without config.json
    with pytest.raises(ModelLoadError):
        load_or_demo(tmp_path)


def test_session_view_is_built_once_and_leaves_the_base_alone(tiny_model, tiny_edit):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    view = tiny_edit.model(tiny_model)
    assert tiny_edit.model(tiny_model) is view and view is not tiny_model
    after = tiny_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not all(torch.equal(before[k], v) for k, v in view.state_dict().items())


def test_downloads_and_discard(tiny_model, tiny_tokenizer, tiny_edit):
    loaded = LoadedModel(tiny_model, tiny_tokenizer, "/models/tiny", revision="abc123")
    files = write_downloads(tiny_edit.folder, loaded, tiny_edit.result)
    assert [f.name for f in files] == ["patch.safetensors", "report.json"]
    edit = Edit.load(files[0])
    assert edit.metadata["base_model"] == "tiny" and edit.metadata["revision"] == "abc123"  # no local path
    edit.check_compatible(tiny_model)
    report = json.loads(files[1].read_text())
    assert report["base_model"] == "tiny" and report["facts_fixed"] == "2/2"
    tiny_edit.discard()
    assert not tiny_edit.folder.exists()
