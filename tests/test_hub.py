"""Hub push at the huggingface_hub client boundary: the exact calls, no network."""

import huggingface_hub
import pytest

from surgery.cli import main
from surgery.core.errors import HubError
from surgery.io.export import MARKER_FILE
from surgery.io.hub import REQUIRED_FILES, push_folder

TOKEN = "hf_secretTOKEN123"


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "fixed"
    d.mkdir()
    for name in REQUIRED_FILES + ("tokenizer.json",):
        (d / name).write_text("x")
    return d


@pytest.fixture
def calls(monkeypatch):
    """Record HfApi.create_repo / upload_folder calls instead of talking to the Hub."""
    log = []

    def create_repo(self, repo_id, **kwargs):
        log.append(("create_repo", (repo_id,), kwargs))
        return huggingface_hub.hf_api.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kwargs):
        log.append(("upload_folder", (), kwargs))
        return None

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return log


def test_push_creates_the_repo_and_uploads_in_one_commit(folder, calls):
    url = push_folder(folder, "alice/fixed-gpt2", token=TOKEN, private=True)
    assert url == "https://huggingface.co/alice/fixed-gpt2"
    assert calls == [
        (
            "create_repo",
            ("alice/fixed-gpt2",),
            {"token": TOKEN, "private": True, "repo_type": "model", "exist_ok": True},
        ),
        (
            "upload_folder",
            (),
            {
                "repo_id": "alice/fixed-gpt2",
                "folder_path": str(folder),
                "repo_type": "model",
                "token": TOKEN,
                "commit_message": "Upload model corrected by Transformer Surgery",
                "ignore_patterns": [MARKER_FILE],
            },
        ),
    ]


def test_no_token(folder, calls):
    for token in (None, ""):
        with pytest.raises(HubError, match="no Hugging Face token.*HF_TOKEN"):
            push_folder(folder, "alice/fixed", token=token)
    assert calls == []


@pytest.mark.parametrize(
    "repo_id", ["fixed", "alice/b/c", "alice/bad--name", "alice/.hidden", "alice/x.git", "", "alice/with space"]
)
def test_invalid_repo_id(folder, calls, repo_id):
    with pytest.raises(HubError, match="invalid repo id"):
        push_folder(folder, repo_id, token=TOKEN)
    assert calls == []


def test_missing_or_incomplete_folder(folder, calls, tmp_path):
    with pytest.raises(HubError, match="does not exist"):
        push_folder(tmp_path / "nope", "alice/fixed", token=TOKEN)
    (folder / "model.safetensors").unlink()
    with pytest.raises(HubError, match="incomplete.*model.safetensors"):
        push_folder(folder, "alice/fixed", token=TOKEN)
    assert calls == []


def test_network_failure_keeps_the_folder_and_the_token_secret(folder, monkeypatch):
    import httpx

    def create_repo(self, repo_id, **kwargs):
        raise httpx.ConnectError(f"[Errno -3] could not reach huggingface.co (Authorization: Bearer {TOKEN})")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    before = {p.name: p.read_text() for p in folder.iterdir()}
    with pytest.raises(HubError, match="pushing to alice/fixed failed: .*could not reach") as info:
        push_folder(folder, "alice/fixed", token=TOKEN)
    assert TOKEN not in str(info.value) and "local folder is unchanged" in str(info.value)
    assert {p.name: p.read_text() for p in folder.iterdir()} == before


def test_cli_push_reads_hf_token_and_never_prints_it(folder, calls, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert main(["push", "--folder", str(folder), "--repo", "alice/fixed"]) == 0
    out, err = capsys.readouterr()
    assert "https://huggingface.co/alice/fixed" in out
    assert TOKEN not in out + err
    assert calls[0][2]["token"] == TOKEN and calls[0][2]["private"] is False


def test_cli_push_without_token(folder, calls, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert main(["push", "--folder", str(folder), "--repo", "alice/fixed", "--private"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no Hugging Face token") and err.count("\n") == 1
    assert calls == []
