"""Serving many people from shared base models: start-up with an offline fallback, and a session's edits.

The app holds each base model (a :class:`~surgery.io.loading.LoadedModel`, see :mod:`surgery.serve.registry`) once for
everybody and never modifies it. A session's edit is a :class:`SessionEdit` — the :class:`~surgery.io.edit_file.Edit`
that surgery produced, its report, and a private folder with the files offered for download — and every request
of that session runs on ``edited_model(base, edit)``: a view that shares all untouched modules with the base and
holds its own copy of the edited tensors only (for ``wv``: the value projection; a session's memory is those
tensors and its files). Two sessions' edits therefore never meet, and no lock is needed.

A session may switch between base models: its :class:`SessionEdits` keeps at most one edit per base model, under
that model's key, and hands out only the edit made on the model asked for — an edit is never applied to another
model.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..core.errors import ModelLoadError
from ..edit.training import SurgeryResult
from ..evaluation.facts import Fact
from ..io.edit_file import edited_model
from ..io.export import REPORT_FILE, report_dict, write_json, write_patch
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


class SessionPool:
    """The sessions holding edits, so that their files (and edited views) are removed however a session ends.

    :meth:`touch` after each surgery makes that session the most recent; then every session whose last surgery is
    more than ``ttl`` seconds old is discarded, and the least recent beyond ``max_sessions``. :meth:`end` discards
    one at once (the app's ``gr.State`` delete callback: Gradio calls it when a closed or expired session's state
    is deleted). A session Gradio drops without a callback (its own capacity) is still discarded here by age or
    count. A discarded session holds no edit any more: its next request finds none.
    """

    def __init__(self, ttl: float, max_sessions: int, clock: Callable[[], float] = time.monotonic):
        if not (ttl > 0 and max_sessions >= 1):
            raise ValueError(f"a session pool needs ttl > 0 and max_sessions >= 1, not {ttl}, {max_sessions}")
        self.ttl, self.max_sessions, self._clock = ttl, max_sessions, clock
        self._last: OrderedDict[int, tuple[SessionEdits, float]] = OrderedDict()  # by id, least recent first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._last)

    def __contains__(self, edits: SessionEdits) -> bool:
        return id(edits) in self._last

    def touch(self, edits: SessionEdits) -> None:
        """``edits`` just got a new edit: keep it, as the most recent, and discard the expired and the surplus."""
        now = self._clock()
        with self._lock:
            self._last.pop(id(edits), None)
            self._last[id(edits)] = (edits, now)
            self._expire(now)
            while len(self._last) > self.max_sessions:
                _, (oldest, _) = self._last.popitem(last=False)
                log.info("discarding the least recent session's edits (%d sessions at most)", self.max_sessions)
                oldest.discard()

    def expire(self) -> None:
        """Discard every session whose last surgery is more than ``ttl`` seconds old."""
        with self._lock:
            self._expire(self._clock())

    def sweep_every(self, seconds: float) -> threading.Thread:
        """Call :meth:`expire` every ``seconds`` from a daemon thread, for as long as this pool exists. Needed because
        Gradio keeps a *closed* session's state for an hour whatever its ``time_to_live`` (``STATE_TTL_WHEN_CLOSED``
        in gradio/state_holder.py), so a visitor who leaves would otherwise keep their files that long."""
        ref = weakref.ref(self)

        def loop() -> None:
            while True:
                time.sleep(seconds)
                pool = ref()
                if pool is None:
                    return
                pool.expire()
                del pool

        thread = threading.Thread(target=loop, name="session-sweeper", daemon=True)
        thread.start()
        return thread

    def end(self, edits: SessionEdits | None) -> None:
        """Discard one session's edits now (the session ended; None: it never held any)."""
        if edits is None:
            return
        with self._lock:
            self._last.pop(id(edits), None)
        edits.discard()

    def _expire(self, now: float) -> None:
        for key, (edits, last) in list(self._last.items()):
            if now - last > self.ttl:
                del self._last[key]
                edits.discard()


def write_downloads(folder: str | os.PathLike, loaded: LoadedModel, result: SurgeryResult) -> list[Path]:
    """Write what a session offers for download into ``folder``: ``patch.safetensors`` (only the changed
    tensors, with the base model named in its metadata) and ``report.json`` — the same two files as in an
    ``operate --out`` folder, without the full model (which is written only when it is pushed)."""
    folder = Path(folder)
    return [
        write_patch(folder, loaded, result.edit),
        write_json(folder / REPORT_FILE, report_dict(loaded, result.report)),  # the base named without local paths
    ]


WORK_PREFIX = "transformer-surgery-app-"


def app_work_dir(parent: str | os.PathLike | None = None) -> Path:
    """A new folder for this app process's per-session files, ``transformer-surgery-app-<pid>-*`` in ``parent``
    (default: the system's temporary folder). Folders that processes no longer running left there (killed with
    SIGKILL, or the machine lost power) are removed first: whatever they held was never finished or is nobody's.
    """
    parent = Path(parent or tempfile.gettempdir())
    for old in parent.glob(f"{WORK_PREFIX}*"):
        pid = old.name[len(WORK_PREFIX) :].split("-", 1)[0]
        if old.is_dir() and pid.isdigit() and not _running(int(pid)):
            log.info("removing %s, left by process %s, which is not running", old, pid)
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{os.getpid()}-", dir=parent))


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
