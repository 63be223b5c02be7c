"""Serving many people from shared base models: start-up with an offline fallback, and a session's edits.

The app holds each base model (a :class:`~surgery.io.loading.LoadedModel`, see :mod:`surgery.serve.registry`) once for
everybody and never modifies it. A session's edit is a :class:`SessionEdit` — the :class:`~surgery.io.edit_file.Edit`
that surgery produced, its report, and a private folder with the files offered for download — and every request
of that session runs on ``edited_model(base, edit)``: a view that shares all untouched modules with the base and
holds its own copy of the one edited block. Two sessions' edits therefore never meet, and no lock is needed.

A session may switch between base models: its :class:`SessionEdits` keeps at most one edit per base model, under
that model's key, and hands out only the edit made on the model asked for — an edit is never applied to another
model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..core.errors import ModelLoadError
from ..edit.training import SurgeryResult
from ..evaluation.facts import Fact
from ..io.edit_file import edited_model
from ..io.export import EDIT_FILE, REPORT_FILE, _with_base, report_dict
from ..io.loading import DEMO_MODEL, LoadedModel, load_model

log = logging.getLogger(__name__)


@dataclass
class StartUp:
    """The base model the app serves, and why it is not the one asked for (``None`` when it is)."""

    loaded: LoadedModel
    fallback_reason: str | None = None


def load_or_demo(name_or_path: str | os.PathLike, device=None) -> StartUp:
    """Load ``name_or_path``; if that fails (Hub unreachable, unknown id, broken folder), load the bundled demo
    model instead and say why. The demo model itself failing to load is a broken checkout: that error is raised.
    """
    try:
        return StartUp(load_model(name_or_path, device=device))
    except ModelLoadError as e:
        if Path(str(name_or_path)).expanduser().resolve() == DEMO_MODEL.resolve():
            raise
        log.warning("%s; falling back to the bundled demo model", e)
        return StartUp(load_model(DEMO_MODEL, device=device), fallback_reason=str(e))


@dataclass
class SessionEdit:
    """One session's edit: the surgery result (edit + report), the facts it was trained on, and the folder
    holding its downloadable files (``patch.safetensors``, ``report.json``)."""

    result: SurgeryResult
    facts: list[Fact]
    folder: Path
    files: list[Path] = field(default_factory=list)
    model_key: str | None = None  # the base model it was made on (its key in the app's registry)
    _view: nn.Module | None = field(default=None, repr=False)

    @property
    def edit(self):
        return self.result.edit

    def model(self, base: nn.Module) -> nn.Module:
        """This session's corrected model: an edited view of ``base`` (``base`` is not modified), built
        once: a session only ever runs on the one base it was made from."""
        if self._view is None:
            self._view = edited_model(base, self.result.edit)
        return self._view

    def discard(self) -> None:
        """Remove the session's files (called when the session ends or is replaced by a new edit)."""
        shutil.rmtree(self.folder, ignore_errors=True)


class SessionEdits:
    """One session's edits, at most one per base model (keyed as in :class:`surgery.serve.registry.ModelRegistry`).

    :meth:`get` returns only the edit made on the model asked for, so switching models never carries an edit
    over; switching back finds it again. A new edit on a model replaces (and discards) that model's old one."""

    def __init__(self) -> None:
        self._edits: dict[str, SessionEdit] = {}

    def get(self, model_key: str) -> SessionEdit | None:
        return self._edits.get(model_key)

    def put(self, edit: SessionEdit) -> None:
        if edit.model_key is None:
            raise ValueError("a session edit must name the model it was made on")
        old = self._edits.get(edit.model_key)
        self._edits[edit.model_key] = edit
        if old is not None and old is not edit:
            old.discard()

    def keys(self) -> list[str]:
        return list(self._edits)

    def discard(self) -> None:
        """Remove every edit's files (the session ended)."""
        for edit in self._edits.values():
            edit.discard()
        self._edits.clear()


def write_downloads(folder: str | os.PathLike, loaded: LoadedModel, result: SurgeryResult) -> list[Path]:
    """Write what a session offers for download into ``folder``: ``patch.safetensors`` (only the changed
    tensors, with the base model named in its metadata) and ``report.json`` — the same two files as in an
    ``operate --out`` folder, without the full model (which is written only when it is pushed)."""
    folder = Path(folder)
    edit = _with_base(result.edit, loaded)
    report = report_dict(loaded, result.report)  # the base named without local paths
    edit.save(folder / EDIT_FILE)
    (folder / REPORT_FILE).write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return [folder / EDIT_FILE, folder / REPORT_FILE]
