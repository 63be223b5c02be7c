"""The one hook mechanism: forward (pre-)hooks addressed by HF module paths, always removed.

Hooks live only inside :func:`hooked`; leaving the ``with`` block (normally or by exception) removes them, so a
shared model never keeps a stray hook.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Mapping

from torch import nn


@contextmanager
def hooked(
    model: nn.Module,
    forward: Mapping[str, Callable] | None = None,
    pre: Mapping[str, Callable] | None = None,
) -> Iterator[nn.Module]:
    """Register ``forward`` hooks ``fn(module, args, output)`` and ``pre`` hooks ``fn(module, args)``.

    Keys are module paths as in ``model.named_modules()`` (e.g. ``"transformer.h.9.attn.c_proj"``).
    A path that does not exist raises ``KeyError`` before anything is registered.
    """
    modules = dict(model.named_modules())
    wanted = list((forward or {}).items()) + list((pre or {}).items())
    missing = [path for path, _ in wanted if path not in modules]
    if missing:
        raise KeyError(f"no such module(s): {', '.join(missing)}")
    handles = []
    try:
        for path, fn in (forward or {}).items():
            handles.append(modules[path].register_forward_hook(fn))
        for path, fn in (pre or {}).items():
            handles.append(modules[path].register_forward_pre_hook(fn))
        yield model
    finally:
        for handle in handles:
            handle.remove()
