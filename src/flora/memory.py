"""Peak memory of one stretch of work: the process's resident set (Linux) and, on CUDA, the
allocator's peak, without touching process-wide counters.

``peak_memory()`` is a context manager; its record, filled when the block ends, holds the highest
resident set size seen during the block and the peak allocated CUDA memory, in MiB. The RSS peak
is exact when the block set a new high-water mark for the process (VmHWM rose); otherwise it is
the highest of samples of VmRSS taken every ``interval`` seconds by a background thread. The
process's own high-water mark (what ``getrusage`` reports) is never reset.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["PeakMemory", "peak_memory", "rss_mib"]


@dataclass
class PeakMemory:
    rss_mib: float | None = None  # highest resident set size (None: not on Linux)
    cuda_mib: float | None = None  # peak allocated CUDA memory (None: no CUDA)


def rss_mib(field: str = "VmRSS") -> float | None:
    """A /proc/self/status memory field in MiB: "VmRSS" (now) or "VmHWM" (the process's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        return None
    return None


@contextlib.contextmanager
def peak_memory(
    interval: float = 0.02, device: torch.device | str | None = None
) -> Iterator[PeakMemory]:
    """Measure the block's peak memory; the yielded record is filled when the block ends. The
    CUDA peak is that of ``device`` (the run's own GPU, e.g. cuda:1), where it is a GPU."""
    record = PeakMemory()
    high_before = rss_mib("VmHWM")
    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while True:
            now = rss_mib()
            if now is not None:
                samples.append(now)
            if stop.wait(interval):
                return

    sampler = threading.Thread(target=sample, daemon=True, name="flora-peak-memory")
    if high_before is not None:
        sampler.start()
    where = torch.device(device) if device is not None else None
    cuda = where is not None and where.type == "cuda" and torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats(where)
    try:
        yield record
    finally:
        stop.set()
        if sampler.is_alive():
            sampler.join()
        high_after = rss_mib("VmHWM")
        if high_before is not None and high_after is not None:
            sampled = max(samples, default=0.0)
            record.rss_mib = high_after if high_after > high_before else sampled
        if cuda:
            record.cuda_mib = torch.cuda.max_memory_allocated(where) / 2**20
