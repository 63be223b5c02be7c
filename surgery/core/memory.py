"""Peak memory of one stage of work, measured where the memory is: the process's resident set, and the GPU's.

``tracemalloc`` would miss torch's tensors (allocated outside Python's allocator), so the CPU figure is the
kernel's: on Linux the resident-set high-water mark ``VmHWM`` of ``/proc/self/status``, reset at the start of the
stage by writing ``5`` to ``/proc/self/clear_refs``. It is process-wide (every thread, the loaded model, whatever
an earlier stage left allocated), so :attr:`PeakMemory.increase_mib` — the peak above the resident set at the
start — is the stage's own share. Where the mark cannot be reset (not Linux, or ``clear_refs`` not writable) the
figure is ``ru_maxrss``, the high-water mark of the whole process's life, and ``how`` says so. On a CUDA device
the peak of torch's allocations on it (``torch.cuda.max_memory_allocated``, reset at the start) is kept beside it.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

MIB = 2**20
HOW_VMHWM = "VmHWM (process resident-set peak, reset per stage via /proc/self/clear_refs)"
HOW_MAXRSS = "ru_maxrss (process resident-set peak since the process started; not reset per stage)"


@dataclass
class PeakMemory:
    """The resident set at the start of a stage and its peak during it (MiB, process-wide); how they were read;
    the peak of torch's allocations on a CUDA device (None on CPU)."""

    start_mib: float = 0.0
    peak_mib: float = 0.0
    how: str = ""
    cuda_peak_mib: float | None = None

    @property
    def increase_mib(self) -> float:
        """The peak above the resident set at the start: what the stage itself needed at most."""
        return max(0.0, self.peak_mib - self.start_mib)

    def to_dict(self) -> dict:
        return {**asdict(self), "increase_mib": self.increase_mib}


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_high_water_mark() -> bool:
    """Reset ``VmHWM`` to the current resident set (Linux); False where that cannot be done."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def _maxrss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / MIB if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


@contextmanager
def peak_memory(device: torch.device | None = None) -> Iterator[PeakMemory]:
    """Measure the stage run inside: yields a :class:`PeakMemory` that is filled in when the block ends (also when
    it raises). ``device``: where the model runs; a CUDA device also gets its allocation peak."""
    record = PeakMemory()
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    if _reset_high_water_mark():
        record.how = HOW_VMHWM
        record.start_mib = (_status_kib("VmRSS") or 0) / 1024
    else:
        record.how = HOW_MAXRSS
        record.start_mib = _maxrss_mib()
    try:
        yield record
    finally:
        hwm = _status_kib("VmHWM") if record.how == HOW_VMHWM else None
        peak = hwm / 1024 if hwm is not None else _maxrss_mib()
        # The kernel's RSS counters are cached per thread and read a few pages apart (split RSS counting): the peak
        # is at least the resident set at the start, which the mark can otherwise read a few KiB under.
        record.peak_mib = max(peak, record.start_mib)
        if cuda:
            record.cuda_peak_mib = torch.cuda.max_memory_allocated(device) / MIB
