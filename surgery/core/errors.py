"""User-facing error types.

Every error a person can cause (bad prompt, unknown model, malformed file, no login, offline Hub) is raised as
a subclass of :class:`SurgeryError` whose message is one actionable line. The CLI prints that line and exits
non-zero; the app turns it into ``gr.Error``. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
from pathlib import Path


class SurgeryError(Exception):
    """Base class: the message is shown to the user as is."""


class InputError(SurgeryError, ValueError):
    """A prompt, target, facts file or option the user gave is unusable."""


class NonFiniteError(InputError):
    """A model's activations, logits or loss hold NaN or inf (its weights overflow, or hold NaN set in memory): no
    number computed from them would mean anything."""


class ModelLoadError(SurgeryError):
    """A model or tokenizer could not be loaded (unknown id, offline Hub, broken folder)."""


class UnsupportedModelError(ModelLoadError):
    """The model loaded, but its architecture is not one of the supported families (surgery.arch)."""


class CheckpointError(ModelLoadError):
    """A checkpoint's weights are unusable: tensors missing or unexpected (transformers would fill the gaps with
    random values), or NaN/inf values."""


class SurgeryFailed(SurgeryError):
    """Training ran but did not produce a usable edit (NaN/Inf, or facts not fixed in budget)."""


class SurgeryTimeout(SurgeryFailed):
    """Surgery ran past its wall-time limit (``SurgeryConfig.max_seconds``) and stopped; nothing was produced."""


class EditError(SurgeryError):
    """An edit file (``patch.safetensors``) is malformed or does not match the base model."""


class OutputError(SurgeryError):
    """An output folder exists (without --overwrite), is not one this tool wrote (with --overwrite), or cannot be
    written."""


class HubError(SurgeryError):
    """Pushing to the Hugging Face Hub failed (no token, bad repo id, network)."""


def require_positive_int(name: str, value) -> int:
    """``value`` if it is a positive ``int`` (not a bool), else :class:`InputError` naming the option."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InputError(f"{name} must be a positive integer, not {value!r}")
    return value


def read_input_text(path: str | os.PathLike, what: str) -> str:
    """The UTF-8 text of a file the user named, or :class:`InputError` in one line (``what``: "facts file")."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"no such {what}: {path}") from None
    except UnicodeDecodeError as err:
        raise InputError(f"cannot read {what} {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise InputError(f"cannot read {what} {path}: {err.strerror or err}") from None


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
