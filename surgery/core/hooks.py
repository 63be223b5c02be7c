"""The one hook mechanism: forward (pre-)hooks addressed by HF module paths, always removed.

Hooks live only inside :func:`hooked`; leaving the ``with`` block (normally or by exception) removes them, so a
shared model never keeps a stray hook.

Hooks are also *thread-scoped*: they fire only for forward passes run by the thread that registered them. The app
serves many sessions from one shared base model (and edited views that share its untouched modules), so while
one request diagnoses with hooks, another request's plain forward pass on the same modules in another thread
must neither feed those hooks nor be altered by them.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from torch import Tensor, nn


@contextmanager
def hooked(
    model: nn.Module,
    forward: Mapping[str, Callable] | None = None,
    pre: Mapping[str, Callable] | None = None,
    pre_kwargs: Mapping[str, Callable] | None = None,
) -> Iterator[nn.Module]:
    """Register ``forward`` hooks ``fn(module, args, output)``, ``pre`` hooks ``fn(module, args)`` and
    ``pre_kwargs`` hooks ``fn(module, args, kwargs)`` (which see keyword arguments too, and may return
    ``(args, kwargs)`` to replace them).

    Keys are module paths as in ``model.named_modules()`` (e.g. ``"transformer.h.9.attn.c_proj"``).
    A path that does not exist raises ``KeyError`` before anything is registered. The hooks run only in the
    calling thread (elsewhere they return ``None``: the module's inputs and output are left as they are).
    """
    modules = dict(model.named_modules())
    wanted = list((forward or {}).items()) + list((pre or {}).items()) + list((pre_kwargs or {}).items())
    missing = [path for path, _ in wanted if path not in modules]
    if missing:
        raise KeyError(f"no such module(s): {', '.join(missing)}")
    handles = []
    try:
        for path, fn in (forward or {}).items():
            handles.append(modules[path].register_forward_hook(_this_thread_only(fn)))
        for path, fn in (pre or {}).items():
            handles.append(modules[path].register_forward_pre_hook(_this_thread_only(fn)))
        for path, fn in (pre_kwargs or {}).items():
            handles.append(modules[path].register_forward_pre_hook(_this_thread_only(fn), with_kwargs=True))
        yield model
    finally:
        for handle in handles:
            handle.remove()


def _this_thread_only(fn: Callable) -> Callable:
    """Wrap a hook so that it runs only in the thread that registered it (see the module docstring)."""
    owner = threading.get_ident()

    @functools.wraps(fn)
    def hook(*args):
        if threading.get_ident() != owner:
            return None
        return fn(*args)

    hook.thread_scoped = True  # lets copies of a module (surgery.io.edit_file) leave these request-scoped hooks behind
    return hook


def main_output(output) -> Tensor:
    """The hidden states in a module's output (transformers 5 blocks return a tensor; a module may return a tuple
    whose first item they are)."""
    return output[0] if isinstance(output, tuple) else output
