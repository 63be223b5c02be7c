"""Stopping long work from inside its loops.

A stage that calls other code for a long time (the evaluation's hundreds of greedy generations) can only be
stopped where that code looks: :func:`checkpoint`, called once per step of such loops, runs the checks that the
callers on the stack installed with :func:`checking`, and a check stops the work by raising. Without one
installed, :func:`checkpoint` does nothing. The checks are per thread (and per asyncio task): one app session's
deadline does not stop another's evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_CHECKS: ContextVar[tuple[Callable[[], None], ...]] = ContextVar("surgery_checks", default=())


@contextmanager
def checking(check: Callable[[], None]) -> Iterator[None]:
    """Run ``check()`` at every :func:`checkpoint` reached inside the ``with`` block (and the outer blocks' checks
    too)."""
    token = _CHECKS.set(_CHECKS.get() + (check,))
    try:
        yield
    finally:
        _CHECKS.reset(token)


def checkpoint() -> None:
    """Run the installed checks, outermost first; a check that raises stops the work."""
    for check in _CHECKS.get():
        check()
