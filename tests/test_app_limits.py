"""The app within its limits (surgery.serve.limits.Limits): every over-limit input refused in one gr.Error line that
names its variable, a surgery past its time keeps nothing, Verify loads only allowed Hub models (size-checked before
any download, without the app's token, once), sessions' files go when Gradio deletes or expires their state, and a
push leaves no model folder behind, even when the upload fails. On tiny models and the demo model, offline."""

from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
from conftest import NoProgress, facts_panel, make_tiny_model  # noqa: E402
from gradio.state_holder import StateHolder  # noqa: E402

import app  # noqa: E402
import surgery.edit.training as training  # noqa: E402
import ui.callbacks as ui_callbacks  # noqa: E402
from surgery.core.errors import SurgeryFailed  # noqa: E402
from surgery.evaluation.facts import Fact  # noqa: E402
from surgery.io.loading import LoadedModel  # noqa: E402
from surgery.serve.limits import Limits  # noqa: E402
from surgery.serve.registry import ModelChoice, ModelRegistry  # noqa: E402
from surgery.serve.sessions import SessionEdit, SessionEdits, StartUp  # noqa: E402

FACTS = [
    Fact("The capital of France is", "Paris", ("The capital city of France is",)),
    Fact("The capital of Japan is", "Tokyo"),
]
PANEL = facts_panel(FACTS)
FACTS_JSON = json.dumps([f.to_dict() for f in FACTS])


class Loader:
    """Stands in for load_model: a tiny GPT-2 for any source, recording each call and its keyword arguments."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []

    def __call__(self, source, device=None, **kwargs):
        self.calls.append((source, kwargs))
        return LoadedModel(make_tiny_model(len(self.tokenizer), seed=len(self.calls)), self.tokenizer, source)


def tiny_app(tokenizer, tmp_path, **limits) -> tuple[ui_callbacks.SurgeryApp, Loader]:
    loader = Loader(tokenizer)
    registry = ModelRegistry([ModelChoice("tiny", "tiny model", "/models/tiny")], loader=loader, panels={"tiny": PANEL})
    return ui_callbacks.SurgeryApp(registry, work_dir=str(tmp_path), limits=Limits(**limits)), loader


def error_text(excinfo) -> str:
    return str(excinfo.value.message if hasattr(excinfo.value, "message") else excinfo.value)


class FakeHub:
    """Stands in for huggingface_hub.HfApi: model_info lists ``sizes``; create_repo fails when ``fail``; every
    call is recorded (with what the uploaded folder held at upload time)."""

    calls: list = []
    sizes: dict = {}
    fail = False

    def model_info(self, repo_id, **kwargs):
        FakeHub.calls.append(("model_info", repo_id, kwargs))
        siblings = [SimpleNamespace(rfilename=name, size=size) for name, size in FakeHub.sizes.items()]
        return SimpleNamespace(siblings=siblings)

    def create_repo(self, repo_id, **kwargs):
        FakeHub.calls.append(("create_repo", repo_id, kwargs))
        if FakeHub.fail:
            raise RuntimeError("503 Service Unavailable")
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        FakeHub.calls.append(("upload_folder", repo_id, sorted(p.name for p in os.scandir(folder_path))))


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    FakeHub.calls, FakeHub.sizes, FakeHub.fail = [], {}, False
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    return FakeHub


# --------------------------------------------------------------------------------------------------------------
# Surgery and generation
# --------------------------------------------------------------------------------------------------------------


def test_too_many_or_too_long_facts_are_refused_before_any_work(tiny_tokenizer, tmp_path, monkeypatch):
    tiny, _ = tiny_app(tiny_tokenizer, tmp_path, max_facts=1, max_prompt_tokens=5)
    monkeypatch.setattr(ui_callbacks, "run_surgery", lambda *a: pytest.fail("trained despite the limits"))
    with pytest.raises(gr.Error) as e:
        tiny.operate(FACTS_JSON, "wv", "auto", "wv", None, progress=NoProgress())
    assert error_text(e) == "2 facts given: at most 1 per surgery here (SURGERY_MAX_FACTS)"
    japan = json.dumps([{"prompt": "The capital of Japan is the", "target": "Tokyo"}])  # 6 words
    with pytest.raises(gr.Error, match=r"the prompt 'The capital of Japan is the' is 6 tokens long: at most 5 "):
        tiny.operate(japan, "wv", "auto", "wv", None, progress=NoProgress())
    long_paraphrase = json.dumps([{**FACTS[1].to_dict(), "paraphrases": ["the capital city of Japan is"]}])
    with pytest.raises(gr.Error, match=r"the paraphrase .* is 6 tokens long: .*\(SURGERY_MAX_PROMPT_TOKENS\)"):
        tiny.operate(long_paraphrase, "wv", "auto", "wv", None, progress=NoProgress())
    assert not list(tmp_path.iterdir())  # no session folder


def test_surgery_gets_the_step_and_time_limits(tiny_tokenizer, tmp_path, monkeypatch):
    tiny, _ = tiny_app(tiny_tokenizer, tmp_path, max_steps=7, max_seconds=12.5, max_stat_tokens=321)
    configs = []

    def stop(model, tokenizer, facts, config, panel, progress, memo, **_):
        assert memo.serves(model)  # the served model's evaluation memo: its base figures are computed once
        configs.append(config)
        raise SurgeryFailed("stopped here")

    monkeypatch.setattr(ui_callbacks, "run_surgery", stop)
    with pytest.raises(gr.Error, match="stopped here"):
        tiny.operate(FACTS_JSON, "wv", "auto", "wv", None, progress=NoProgress())
    assert configs[0].epochs == 7 and configs[0].max_seconds == 12.5 and configs[0].stat_tokens == 321
    # on a ZeroGPU Space the GPU is held for the surgery's own limit and the time to write its results, not less
    gpu_s = ui_callbacks.surgery_gpu_seconds(None, None, [], configs[0], None, None)
    assert gpu_s == 13 + ui_callbacks.GPU_SURGERY_EXTRA_S


def test_a_surgery_past_its_time_limit_stops_and_keeps_nothing(tiny_tokenizer, tmp_path, monkeypatch):
    """A clock that jumps 1000 s after the surgery starts: the first check stops it with one gr.Error naming
    SURGERY_MAX_SECONDS; the session's edits are as they were (its earlier edit kept) and no file is written."""
    tiny, _ = tiny_app(tiny_tokenizer, tmp_path / "work", max_seconds=60)
    (tmp_path / "work").mkdir()
    earlier = SessionEdit(result=None, facts=FACTS, folder=tmp_path / "earlier", model_key="tiny")
    earlier.folder.mkdir()
    edits = SessionEdits()
    edits.put(earlier)
    ticks = iter([0.0])
    monkeypatch.setattr(training.time, "monotonic", lambda: next(ticks, 1000.0))
    with pytest.raises(gr.Error) as e:
        tiny.operate(FACTS_JSON, "layer", "2", "wv", edits, progress=NoProgress())
    assert error_text(e).startswith("surgery stopped: it ran past its time limit of 60 s (")
    assert error_text(e).endswith("nothing was kept (SURGERY_MAX_SECONDS)")
    assert edits.get("tiny") is earlier and earlier.folder.exists() and earlier not in tiny.sessions
    assert not list((tmp_path / "work").iterdir())


def test_generation_over_its_limit_is_refused(tiny_tokenizer, tmp_path):
    tiny, _ = tiny_app(tiny_tokenizer, tmp_path, max_new_tokens=4)
    with pytest.raises(gr.Error) as e:
        tiny.generate("the cat sat on the", 5, None)
    assert error_text(e) == "5 new tokens asked for: at most 4 here (SURGERY_MAX_NEW_TOKENS)"
    original, corrected = tiny.generate("the cat sat on the", 4, None)
    assert original and "no surgery" in corrected


# --------------------------------------------------------------------------------------------------------------
# Models a visitor names
# --------------------------------------------------------------------------------------------------------------


def test_verify_loads_only_allowed_hub_models_checked_before_any_download(tiny_tokenizer, tmp_path, fake_hub):
    tiny, loader = tiny_app(tiny_tokenizer, tmp_path, allowed_models=("ada/fixed", "ada/huge"), max_model_bytes=1000)
    served = tiny.served()
    loader.calls.clear()
    with pytest.raises(gr.Error, match=r"'bob/model' is not a model this app loads.*SURGERY_ALLOWED_MODELS"):
        tiny.verify("bob/model", None)
    assert fake_hub.calls == [] and loader.calls == []  # refused without asking the Hub

    fake_hub.sizes = {"model-00001.safetensors": 800, "model-00002.safetensors": 400, "README.md": 10}
    with pytest.raises(gr.Error, match=r"ada/huge holds 0.00 GB of weights.*\(SURGERY_MAX_MODEL_BYTES\)"):
        tiny.verify("ada/huge", None)
    assert fake_hub.calls == [("model_info", "ada/huge", {"files_metadata": True, "token": False})]
    assert loader.calls == []  # nothing downloaded

    fake_hub.calls.clear()
    fake_hub.sizes = {"model.safetensors": 600, "pytorch_model.bin": 300, "big.gguf": 90, "vocab.json": 10_000}
    first = tiny.corrected_model("ada/fixed", served)
    assert tiny.corrected_model("ada/fixed", served) is first  # loaded once, kept
    assert loader.calls == [("ada/fixed", {"token": False})]  # without the app's token
    assert [c[0] for c in fake_hub.calls] == ["model_info"]  # 990 bytes: under the limit, checked once
    assert tiny.corrected_model("tiny", served) is served.loaded  # a picker model: the shared one


def test_verify_refuses_folders_on_a_space(tiny_tokenizer, tmp_path, fake_hub):
    tiny, loader = tiny_app(tiny_tokenizer, tmp_path)
    tiny.allow_local_models = False
    with pytest.raises(gr.Error, match="local folders are not read on the Space"):
        tiny.verify(str(tmp_path), None)
    assert fake_hub.calls == [] and loader.calls == [("/models/tiny", {})]  # the picker's model only


# --------------------------------------------------------------------------------------------------------------
# Sessions and the page
# --------------------------------------------------------------------------------------------------------------


def session_with_files(folder) -> SessionEdits:
    folder.mkdir()
    (folder / "patch.safetensors").write_bytes(b"x")
    edits = SessionEdits()
    edits.put(SessionEdit(result=None, facts=FACTS, folder=folder, model_key="tiny"))
    return edits


def test_a_malformed_variable_stops_the_app_at_start_up_in_one_line(monkeypatch):
    monkeypatch.setenv("SURGERY_MAX_FACTS", "lots")
    monkeypatch.setattr(app, "build_demo", lambda *a, **k: pytest.fail("started despite a malformed variable"))
    with pytest.raises(SystemExit) as e:
        app.main()
    assert e.value.code == "error: SURGERY_MAX_FACTS must be a positive whole number, not 'lots'"


def test_the_page_has_the_queue_size_and_the_session_time_to_live(demo, tmp_path):
    blocks = app.build_demo(startup=StartUp(demo), limits=Limits(queue_size=3, session_ttl=0.05), work_dir=tmp_path)
    assert blocks._queue.max_size == 3
    (state,) = [b for b in blocks.blocks.values() if isinstance(b, gr.State)]
    assert state.time_to_live == 0.05

    # Gradio's own expiry (what its server runs every second): the expired state's delete callback removes
    # the session's files.
    holder = StateHolder()
    holder.set_blocks(blocks)
    edits = session_with_files(tmp_path / "session")
    holder["visitor"][state._id] = edits
    holder.delete_all_expired_state()
    assert (tmp_path / "session").exists()  # not expired yet
    time.sleep(0.1)
    holder.delete_all_expired_state()
    assert not (tmp_path / "session").exists() and edits.get("tiny") is None


def test_a_deleted_or_evicted_sessions_files_are_removed(tiny_tokenizer, tmp_path):
    tiny, _ = tiny_app(tiny_tokenizer, tmp_path, max_sessions=2, session_ttl=100)
    now = [0.0]
    tiny.sessions._clock = lambda: now[0]
    a, b, c = (session_with_files(tmp_path / name) for name in "abc")
    tiny.sessions.touch(a)
    now[0] = 1.0
    tiny.sessions.touch(b)
    now[0] = 2.0
    tiny.sessions.touch(c)  # a third session: the least recent (a) is discarded
    assert not (tmp_path / "a").exists() and (tmp_path / "b").exists() and a.get("tiny") is None
    tiny.sessions.end(b)  # Gradio deleted b's state (the tab closed, its time ran out)
    assert not (tmp_path / "b").exists() and len(tiny.sessions) == 1
    now[0] = 103.0
    tiny.sessions.expire()  # c's last surgery is 101 s old: past its time-to-live
    assert not (tmp_path / "c").exists() and len(tiny.sessions) == 0
    tiny.sessions.end(None)  # a session that never operated


def test_the_sweeper_expires_sessions_whose_tab_closed(tmp_path):
    """Gradio keeps a closed session's state an hour, whatever its time-to-live: the pool's own sweeper removes the
    files once the time-to-live has passed, without waiting for another surgery; it stops with its pool."""
    from surgery.serve.sessions import SessionPool

    pool = SessionPool(ttl=0.2, max_sessions=4)
    thread = pool.sweep_every(0.05)
    edits = session_with_files(tmp_path / "left")
    pool.touch(edits)
    assert (tmp_path / "left").exists()
    deadline = time.monotonic() + 5
    while (tmp_path / "left").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (tmp_path / "left").exists() and len(pool) == 0
    del pool
    thread.join(2)
    assert not thread.is_alive()


def test_a_surgery_joins_the_pool(tiny_tokenizer, tmp_path):
    tiny, _ = tiny_app(tiny_tokenizer, tmp_path, max_sessions=1)
    first = tiny.operate(FACTS_JSON, "layer", "2", "wv", None, progress=NoProgress())[-1]
    folder = first.get("tiny").folder
    assert first in tiny.sessions and folder.exists()
    second = tiny.operate(FACTS_JSON, "layer", "2", "wv", None, progress=NoProgress())[-1]  # another visitor
    assert second in tiny.sessions and first not in tiny.sessions and not folder.exists()


# --------------------------------------------------------------------------------------------------------------
# Push
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def pushable(tiny_tokenizer, tmp_path):
    tiny, _ = tiny_app(tiny_tokenizer, tmp_path / "work")
    (tmp_path / "work").mkdir()
    edits = tiny.operate(FACTS_JSON, "layer", "2", "wv", None, progress=NoProgress())[-1]
    token = gr.OAuthToken(token="hf_oauth_secret", scope="openid profile contribute-repos", expires_at=0)
    profile = gr.OAuthProfile({"name": "Ada", "preferred_username": "ada", "profile": "", "picture": ""})
    return tiny, edits, token, profile, tmp_path / "work"


def test_push_uploads_a_temporary_folder_and_removes_it(pushable, fake_hub):
    tiny, edits, token, profile, work = pushable
    before = sorted(p.name for p in work.iterdir())  # the session's folder
    message = tiny.push("capitals-fixed", False, edits, oauth_token=token, profile=profile)
    assert "ada/capitals-fixed" in message
    (upload,) = [c for c in fake_hub.calls if c[0] == "upload_folder"]
    assert {"config.json", "model.safetensors", "patch.safetensors", "report.json", "README.md"} <= set(upload[2])
    assert sorted(p.name for p in work.iterdir()) == before  # the model folder is gone
    assert not (edits.get("tiny").folder / "model").exists()


def test_push_removes_its_folder_when_the_upload_fails(pushable, fake_hub):
    tiny, edits, token, profile, work = pushable
    before = sorted(p.name for p in work.iterdir())
    fake_hub.fail = True
    with pytest.raises(gr.Error, match="pushing to ada/capitals-fixed failed: 503") as e:
        tiny.push("capitals-fixed", False, edits, oauth_token=token, profile=profile)
    assert "hf_oauth_secret" not in error_text(e)
    assert sorted(p.name for p in work.iterdir()) == before
