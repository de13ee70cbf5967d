"""Peak memory of one stretch of work: the process's resident set (Linux) and, on CUDA, the
allocator's peak.

``peak_memory()`` is a context manager; its value, read after the block, is the highest resident
set size (VmHWM, reset at the start through /proc/self/clear_refs) and the peak allocated CUDA
memory during the block, in MiB. Where the kernel refuses the reset (non-Linux, old kernels) the
RSS figure is the process's peak so far, and says so (``rss_since_start`` False).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["PeakMemory", "peak_memory", "rss_peak_mib"]


@dataclass
class PeakMemory:
    rss_mib: float | None = None  # highest resident set size (None: not on Linux)
    rss_since_start: bool = False  # the RSS peak is the block's own (else the process's so far)
    cuda_mib: float | None = None  # peak allocated CUDA memory (None: no CUDA)


def rss_peak_mib() -> float | None:
    """The process's peak resident set (VmHWM) in MiB, since start or the last reset (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        return None
    return None


def _reset_vm_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current
        return True
    except OSError:
        return False


@contextlib.contextmanager
def peak_memory() -> Iterator[PeakMemory]:
    """Measure the block's peak memory; the yielded record is filled when the block ends."""
    record = PeakMemory(rss_since_start=_reset_vm_hwm())
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        yield record
    finally:
        record.rss_mib = rss_peak_mib()
        if cuda:
            record.cuda_mib = torch.cuda.max_memory_allocated() / 2**20
