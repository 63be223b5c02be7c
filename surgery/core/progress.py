"""Progress where a person watches, one line where a log is written.

Every progress bar of the CLI comes from :func:`progress_bar`. On a terminal (the stream is a TTY) it draws a tqdm
bar; otherwise (a log file, CI, a pipe) a bar's hundreds of carriage-return updates would bury the log, so the
stage writes one line when it ends instead: ``census: 120/120 facts in 8.4s``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

# progress(step, total, loss=None): called after each unit of work; close(): called once when the stage ends.
Progress = Callable[..., None]


def progress_bar(desc: str, unit: str = "step", stream: TextIO | None = None) -> tuple[Progress, Callable[[], None]]:
    """A ``progress(step, total, loss=None)`` callback and a ``close()`` for one stage named ``desc``.

    ``stream`` (default: ``sys.stderr`` at call time) gets a tqdm bar if it is a TTY, else one line at ``close()``
    (nothing if ``progress`` was never called).
    """
    stream = sys.stderr if stream is None else stream
    if _is_tty(stream):
        return _tqdm_bar(desc, unit, stream)
    return _one_line(desc, unit, stream)


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _tqdm_bar(desc: str, unit: str, stream: TextIO) -> tuple[Progress, Callable[[], None]]:
    from tqdm.auto import tqdm

    bar = {}

    def progress(step: int, total: int, loss: float | None = None) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, desc=desc, unit=unit, file=stream, leave=False)
        if loss is not None:
            bar["bar"].set_postfix(loss=f"{loss:.4f}", refresh=False)
        bar["bar"].update(step - bar["bar"].n)

    def close() -> None:
        if "bar" in bar:
            bar["bar"].close()

    return progress, close


def _one_line(desc: str, unit: str, stream: TextIO) -> tuple[Progress, Callable[[], None]]:
    state: dict = {"start": time.monotonic()}

    def progress(step: int, total: int, loss: float | None = None) -> None:
        state.update(step=step, total=total, loss=loss)

    def close() -> None:
        if "step" not in state:
            return
        loss = "" if state["loss"] is None else f", loss {state['loss']:.4f}"
        seconds = time.monotonic() - state["start"]
        stream.write(f"{desc}: {state['step']}/{state['total']} {unit}s in {seconds:.1f}s{loss}\n")
        stream.flush()

    return progress, close
