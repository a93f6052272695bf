"""Peak memory a call adds: the most it holds at once above the level before the call.

On CUDA from the caching allocator's peak statistic (`max_memory_allocated`).

On a CPU torch keeps no such statistic. The figure is the process's peak
resident set (Linux: VmHWM, reset through /proc/self/clear_refs) above its
resident set before the call. glibc would otherwise serve a call from heap it
kept from earlier calls, unseen, so that the same call measured 23.5-29.3 MiB
depending on what ran before it (bf16, B=1, H=8, L=4096, d=64, forward and
backward); `fix_allocation_threshold` makes every allocation over 128 KiB a
mapping of its own, returned at its free, and the same call then measures
23.4 +- 0.1 MiB whatever ran before. torch's profiler (profile_memory) would
count allocations exactly, but flashsdpa sees the profiler and takes its
custom-op path instead of the eager one, so it would not measure the call a
user makes; it is the fallback where /proc or glibc is missing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import re
from pathlib import Path
from typing import Callable

import torch

MMAP_THRESHOLD_BYTES = 128 << 10  # glibc's initial default, kept fixed (it grows to 32 MiB on its own)
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@functools.cache
def _libc():
    """glibc, or None (another C library, or not Linux)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both must exist
    except (OSError, AttributeError):
        return None
    return libc


def resident_peaks_available() -> bool:
    return _libc() is not None and _STATUS.exists() and _CLEAR_REFS.exists()


def fix_allocation_threshold() -> bool:
    """Call once before a CPU run (before anything is timed, so every peer runs under it); False if unavailable."""
    libc = _libc()
    return bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def peak_added_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes held during `fn()` above the level before it, at their peak (its result included)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if resident_peaks_available():
        return _resident_peak(fn)
    return _profiled_peak(fn)


def _status_bytes(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    return int(match.group(1)) * 1024


def _resident_peak(fn: Callable[[], object]) -> int:
    _libc().malloc_trim(0)  # free heap back to the system, so that reusing it shows
    before = _status_bytes("VmRSS")
    _CLEAR_REFS.write_text("5")  # the peak resident set starts again from the current one
    fn()
    return max(0, _status_bytes("VmHWM") - before)


def _profiled_peak(fn: Callable[[], object]) -> int:
    """The running sum of torch's CPU allocations and frees, in order, at its peak."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocations = []
    pending = list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        if event.tag == _EventType.Allocation:
            allocations.append((event.start_time_ns, event.extra_fields.alloc_size))  # negative: a free
        pending.extend(event.children)
    allocations.sort(key=lambda a: a[0])
    held = peak = 0
    for _, size in allocations:
        held += size
        peak = max(peak, held)
    return peak
