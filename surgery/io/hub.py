"""Pushing an output folder to the Hugging Face Hub: create the repo if missing, upload in one commit.

The token is an argument (the CLI reads ``HF_TOKEN``, the app passes the user's OAuth token); it is handed to
``huggingface_hub`` and never printed, logged or put in an error message. The local folder is only read.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..core.errors import HubError, first_line
from .export import CARD_FILE, EDIT_FILE, MARKER_FILE, MODEL_FILES, REPORT_FILE

log = logging.getLogger(__name__)

REQUIRED_FILES = MODEL_FILES + (EDIT_FILE, REPORT_FILE, CARD_FILE)


def check_repo_id(repo_id: str) -> str:
    """``USER/NAME`` validated with huggingface_hub's own rules; raises :class:`HubError`."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise HubError(f"invalid repo id {repo_id!r}: use USER/NAME (or ORG/NAME)")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubError(f"invalid repo id {repo_id!r}: {e}") from None
    return repo_id


def check_folder(folder: str | os.PathLike) -> Path:
    """An output folder of ``operate`` with every file a pushed model needs; raises :class:`HubError`."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise HubError(f"folder {folder} does not exist (make it with: python -m surgery operate ... --out DIR)")
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise HubError(
            f"folder {folder} is incomplete (missing {', '.join(missing)}): push the folder written by 'operate --out'"
        )
    return path


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
) -> str:
    """Create ``repo_id`` if missing and upload ``folder`` in one commit; returns the repo URL.

    Raises :class:`HubError` for a missing token, an invalid repo id, an incomplete folder or any Hub/network
    failure (the local folder is left as it is).
    """
    if not token:
        raise HubError(
            "no Hugging Face token: log in, or set HF_TOKEN to a token with write access "
            "(https://huggingface.co/settings/tokens)"
        )
    check_repo_id(repo_id)
    path = check_folder(folder)
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(path),
            repo_type="model",
            token=token,
            commit_message=commit_message or "Upload model corrected by Transformer Surgery",
            ignore_patterns=[MARKER_FILE],  # a local bookkeeping file (export.py), not part of the model
        )
    except Exception as e:  # httpx / HfHubHTTPError / OSError: all become one line, without the token
        raise HubError(
            f"pushing to {repo_id} failed: {_first_line(e, token)} (the local folder is unchanged)"
        ) from None
    log.info("pushed %s to %s", path, repo_id)
    return str(getattr(url, "url", None) or url)


def _first_line(e: BaseException, token: str) -> str:
    return first_line(e).replace(token, "***")
