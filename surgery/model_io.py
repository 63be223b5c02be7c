"""Loading GPT-2-architecture models and their tokenizers, from the Hub or a local folder.

Loading goes through ``from_pretrained`` as usual. Two things are added for the people using this tool:

* a Hub id is only fetched when the Hub answers (a 3 s connection probe); otherwise the local HF cache is
  tried, and failing that one line says the Hub is unreachable and names the bundled demo model — instead
  of ~30 s of retries and a stack trace;
* anything that is not a GPT-2 causal LM is refused up front with what *is* supported.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from .errors import ModelLoadError, UnsupportedModelError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = REPO_ROOT / "assets" / "demo-model"
SUPPORTED = (
    "GPT-2-architecture causal LMs (GPT2LMHeadModel): gpt2, distilgpt2, gpt2-medium, gpt2-large, gpt2-xl, "
    "or a local folder holding such a model"
)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class LoadedModel:
    """A model in eval mode with frozen parameters, its tokenizer, and where it came from."""

    model: nn.Module
    tokenizer: object
    source: str  # Hub id or absolute folder path, as given to from_pretrained
    revision: str | None = None  # Hub commit sha when known

    @property
    def is_demo(self) -> bool:
        return getattr(self.model.config, "surgery_panels", None) == "demo"


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub endpoint opens within ``timeout`` seconds."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _offline_hint() -> str:
    return f"offline, use the bundled demo model: --model {os.path.relpath(DEMO_MODEL)}"


def load_model(
    name_or_path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
) -> LoadedModel:
    """Load a GPT-2-architecture causal LM and its tokenizer.

    ``name_or_path`` is a Hub id (``"gpt2"``, ``"user/model"``) or a local folder. The model is returned in eval
    mode with ``requires_grad=False`` everywhere: it is meant to be shared and never trained in place.
    Raises :class:`ModelLoadError` (unknown id, unreachable Hub, broken folder) or
    :class:`UnsupportedModelError` (another architecture).
    """
    from transformers import AutoConfig, AutoTokenizer, GPT2LMHeadModel

    name = str(name_or_path).strip()
    if not name:
        raise ModelLoadError(f"no model given: pass a Hub id or a folder ({SUPPORTED})")
    path = Path(name).expanduser()
    kwargs: dict = {}
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"folder {name} has no config.json: it is not a saved Hugging Face model")
        source = str(path.resolve())
    elif name.startswith((".", "/", "~")) or not _REPO_ID.match(name):
        raise ModelLoadError(f"no such model folder: {name} (and it is not a valid Hub id)")
    else:
        source = name
        kwargs["revision"] = revision
        if not hub_reachable():
            kwargs["local_files_only"] = True  # the HF cache may still hold it
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except Exception as e:  # transformers raises OSError/ValueError/HTTP errors with long texts
        if kwargs.get("local_files_only"):
            raise ModelLoadError(
                f"cannot load '{name}': the Hugging Face Hub is unreachable and it is not in the local cache; "
                + _offline_hint()
            ) from e
        raise ModelLoadError(f"cannot load '{name}': {_first_line(e)}; " + _offline_hint()) from e
    if config.model_type != "gpt2" or getattr(config, "add_cross_attention", False):
        kind = config.model_type if config.model_type != "gpt2" else "gpt2 with cross-attention"
        raise UnsupportedModelError(f"'{name}' is a '{kind}' model; supported: {SUPPORTED}")
    try:
        model = GPT2LMHeadModel.from_pretrained(source, config=config, dtype=dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception as e:
        raise ModelLoadError(f"cannot load '{name}': {_first_line(e)}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    commit = getattr(config, "_commit_hash", None)
    log.info("loaded %s (%d layers, %d heads, d_model %d)", source, config.n_layer, config.n_head, config.n_embd)
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, revision=commit or revision)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
