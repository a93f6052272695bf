"""Timing one callable: the median of many runs after a warm-up, as triton.testing.do_bench does.

On CUDA each run sits between two CUDA events, and a 256 MiB buffer is
zeroed before it (outside the events) so that no run finds its inputs in the
L2 cache left warm by the previous one. The callables are rotated: the runner
passes one per input set, several sets when one set would fit in L2. On CPU
the host clock times each (synchronous) run and nothing is flushed.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

ESTIMATE_RUNS = 5  # runs that size the warm-up and the repeat count, as do_bench does


@dataclass(frozen=True)
class TimingSettings:
    warmup_ms: float  # time spent warming up, in runs of the estimated length
    rep_ms: float  # time spent on the timed runs ...
    min_reps: int  # ... but at least this many runs
    max_reps: int  # ... and at most this many
    flush_bytes: int  # bytes zeroed before each run (0: no flush)

    def describe(self) -> dict:
        return asdict(self)


# do_bench's defaults (25 ms warm-up, 100 ms of runs, 256 MiB flush), with the
# repeat count kept between 5 and 200 so that neither a 20 ms backward nor a
# 0.1 ms decode step costs more than a fraction of a second.
CUDA_SETTINGS = TimingSettings(warmup_ms=25.0, rep_ms=100.0, min_reps=5, max_reps=200, flush_bytes=256 << 20)
# CPU calls of the CPU matrix take 5 ms to 5 s: at least 5 timed runs, half a second of them.
CPU_SETTINGS = TimingSettings(warmup_ms=50.0, rep_ms=500.0, min_reps=5, max_reps=50, flush_bytes=0)


@dataclass(frozen=True)
class Measurement:
    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    reps: int

    def describe(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def quantile(sorted_values: list[float], q: float) -> float:
    position = q * (len(sorted_values) - 1)
    low, high = math.floor(position), math.ceil(position)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


class Timer:
    """Times callables on one device with one set of settings."""

    def __init__(self, device: torch.device, settings: TimingSettings):
        self.device = device
        self.settings = settings
        self.is_cuda = device.type == "cuda"
        self._flush_buffer = None
        if self.is_cuda and settings.flush_bytes:
            self._flush_buffer = torch.empty(settings.flush_bytes // 4, dtype=torch.int32, device=device)

    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def first_call(self, fn: Callable[[], object]) -> tuple[float, object]:
        """(seconds, result) of one call, synchronised: includes any JIT compilation."""
        self.synchronize()
        start = time.perf_counter()
        result = fn()
        self.synchronize()
        return time.perf_counter() - start, result

    def _timed_runs(self, fns: Sequence[Callable[[], object]], count: int) -> list[float]:
        """Milliseconds of each of `count` runs, rotating through `fns`."""
        if not self.is_cuda:
            times = []
            for i in range(count):
                start = time.perf_counter()
                fns[i % len(fns)]()
                times.append((time.perf_counter() - start) * 1e3)
            return times
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
        for i in range(count):
            if self._flush_buffer is not None:
                self._flush_buffer.zero_()
            starts[i].record()
            fns[i % len(fns)]()
            ends[i].record()
        torch.cuda.synchronize(self.device)
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]

    def measure(self, fns: Sequence[Callable[[], object]]) -> Measurement:
        """Median over runs of `fns` (rotated), after a warm-up sized like do_bench's."""
        s = self.settings
        estimate_ms = max(statistics.median(self._timed_runs(fns, ESTIMATE_RUNS)), 1e-3)
        warmup = min(s.max_reps, max(1, math.ceil(s.warmup_ms / estimate_ms)))
        reps = min(s.max_reps, max(s.min_reps, math.ceil(s.rep_ms / estimate_ms)))
        self._timed_runs(fns, warmup)
        times = sorted(self._timed_runs(fns, reps))
        return Measurement(
            median_ms=statistics.median(times),
            p20_ms=quantile(times, 0.2),
            p80_ms=quantile(times, 0.8),
            min_ms=times[0],
            reps=reps,
        )


def estimated_measure_seconds(settings: TimingSettings, run_ms: float) -> float:
    """Rough wall time of `Timer.measure` on a callable of `run_ms` (for time estimates)."""
    flush_ms = settings.flush_bytes / 2.5e9  # a memset at ~2.5 TB/s
    run_ms = max(run_ms, 1e-3)
    warmup = min(settings.max_reps, max(1, math.ceil(settings.warmup_ms / run_ms)))
    reps = min(settings.max_reps, max(settings.min_reps, math.ceil(settings.rep_ms / run_ms)))
    return (ESTIMATE_RUNS + warmup + reps) * (run_ms + flush_ms) / 1e3 + 0.02
