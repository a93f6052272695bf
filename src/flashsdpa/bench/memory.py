"""Peak memory a call adds: what torch's allocator holds above its level before the call, at the peak.

On CUDA from the caching allocator's peak statistic. On a CPU, where torch keeps
no such statistic, from torch's profiler (`profile_memory=True`): it records
every allocation and free of torch's CPU allocator, in order, including the
buffers a fused kernel allocates inside itself; the running sum of their sizes
peaks at the figure reported. Unlike a resident-set delta it does not depend on
what glibc kept from earlier calls, so one process can measure every peer in
turn. Memory held by a library outside torch's allocator (oneDNN scratch, say)
is not seen.
"""

from __future__ import annotations

from typing import Callable

import torch


def peak_added_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes allocated during `fn()` above the level before it, at their peak (the result's included)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    return _profiled_peak(fn)


def _profiled_peak(fn: Callable[[], object]) -> int:
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
