"""Timing (interleaved repeats, median/min/max) and peak memory (a fresh subprocess per case).

**Time**: every case of a comparison runs once per round, the order rotating from round to round, so that the
noise of a shared 2-core machine (other people's tests) falls on all cases alike; the medians are compared as
ratios taken in the same run.

**Peak memory**: PyTorch allocates CPU tensors with plain ``malloc``, so neither ``tracemalloc`` nor a
``ru_maxrss`` read in a long-lived process says what one call needs. Each case therefore runs in a fresh
``python -m bench.measure`` subprocess that (1) notes its resident set size (RSS) after the imports, (2) builds
the model and the case, (3) runs the case once to warm up, (4) returns freed memory to the OS and resets the
kernel's peak-RSS counter (``/proc/self/clear_refs`` = 5), (5) runs the case once more and reads the peak
(``VmHWM``). glibc's allocation threshold is fixed (``MALLOC_MMAP_THRESHOLD_``) so every large tensor is its
own mapping and is really given back when freed, otherwise the allocator's cache would hide part of the peak.
Reported, in MiB: ``resident`` = RSS kept between calls above the post-import baseline (weights, caches,
optimizer state), ``transient`` = the extra peak during one call, ``total`` = resident + transient.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from .models import ROOT

THREADS = 2
MMAP_THRESHOLD = 64 * 1024


@dataclass
class Stats:
    """Seconds over repeats."""

    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, samples: list[float]) -> Stats:
        return cls(statistics.median(samples), min(samples), max(samples), len(samples))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Timing:
    """Wall-clock seconds and process CPU seconds (all threads) of one case over the repeats."""

    wall: Stats
    cpu: Stats

    def to_dict(self) -> dict:
        return {"wall": self.wall.to_dict(), "cpu": self.cpu.to_dict()}


def interleaved(cases: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, Timing]:
    """Time each zero-argument case ``repeats`` times, one round at a time with a rotating order.

    CPU time is reported next to wall time because it is far less sensitive to other processes on the machine
    (with passive OpenMP waiting, see ``bench.__main__``): the two ratios agree on an idle machine.
    """
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            w, c = time.perf_counter(), time.process_time()
            cases[name]()
            cpu[name].append(time.process_time() - c)
            wall[name].append(time.perf_counter() - w)
    return {name: Timing(Stats.of(wall[name]), Stats.of(cpu[name])) for name in names}


@dataclass
class Memory:
    """MiB: kept between calls above the post-import baseline, extra peak during one call, and their sum."""

    resident: float
    transient: float
    total: float

    def to_dict(self) -> dict:
        return asdict(self)


def peak_memory(factory: str, timeout: float = 1200, **kwargs) -> Memory:
    """Run ``factory(**kwargs)()`` (``"module:function"``) in a fresh subprocess and measure its memory."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), TOKENIZERS_PARALLELISM="false")
    spec = json.dumps({"factory": factory, "kwargs": kwargs})
    proc = subprocess.run(
        [sys.executable, "-m", "bench.measure", spec],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory case {factory}({kwargs}) failed:\n{proc.stderr[-3000:]}")
    return Memory(**json.loads(proc.stdout.strip().splitlines()[-1]))


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1))


def _release() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: nothing to trim
        pass


def _child(spec: dict) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    module, name = spec["factory"].split(":")
    factory = getattr(importlib.import_module(module), name)
    _release()
    before = _status_kib("VmRSS")
    run = factory(**spec["kwargs"])
    run()  # warm-up: lazy initialisation, first-call allocations
    _release()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (the peak RSS) to the current RSS
    base = _status_kib("VmRSS")
    run()
    peak = _status_kib("VmHWM")
    mib = 1024.0
    return {"resident": (base - before) / mib, "transient": (peak - base) / mib, "total": (peak - before) / mib}


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
