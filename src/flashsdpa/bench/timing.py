"""Timing callables: the median of many runs after a warm-up, as triton.testing.do_bench does.

On CUDA each run sits between two CUDA events, and a 256 MiB buffer is
zeroed before it (outside the events) so that no run finds its inputs in the
L2 cache left warm by the previous one. The callables are rotated: the runner
passes one per input set, several sets when one set would fit in L2. On CPU
the host clock times each (synchronous) run and nothing is flushed.

The peers of one case are timed interleaved (`Timer.interleaved`): round by
round, each peer runs once on the round's input set, in an order that rotates
every round, so a drift of the machine (another process, clock, cache, memory
state) falls on every peer alike. Each peer keeps its own median; the ratio
of two peers is taken per round (same round, same inputs) and reported as
the median of those ratios with their interquartile range, the part of a
ratio that is noise.

`Timer.host_time` measures the other side of a call: the host's time to
return from it, each call made with the GPU idle (synchronised before the
call, outside the timing), so that no queue of earlier work can make the host
wait. On CUDA that is the time to enqueue the call's work (a call that
synchronises inside shows its GPU time too); on a CPU the whole call.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, ContextManager, Sequence

import torch


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
# CPU calls of the CPU matrix take 5 ms to 5 s. A ratio of two peers within a few per cent needs
# more rounds than a single time does (the spread of one run on two shared cores is ~5-10%):
# at least 11 rounds, 3 s of them, at most 101.
CPU_SETTINGS = TimingSettings(warmup_ms=200.0, rep_ms=3000.0, min_reps=11, max_reps=101, flush_bytes=0)
# A peer this many times slower than the primary one runs only as many rounds as its own time
# allows (at least SLOW_PEER_MIN_REPS, no warm-up round): math's 5 s calls must not set the
# rounds of two 0.1 s kernels.
SLOW_PEER_FACTOR = 4.0
SLOW_PEER_MIN_REPS = 3
# `Timer.host_time`: calls timed after HOST_WARMUP_CALLS untimed ones (a decode step's enqueue takes 10-100 us).
HOST_TIMED_CALLS = 50
HOST_WARMUP_CALLS = 5


@dataclass(frozen=True)
class Measurement:
    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    reps: int

    def describe(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class RatioSpread:
    """A peer's time over the primary's, per round both ran: median and interquartile range."""

    median: float
    p25: float
    p75: float
    rounds: int

    def describe(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@dataclass
class Interleaved:
    """What `Timer.interleaved` measured: per peer a Measurement or the exception that stopped it."""

    measurements: dict[str, Measurement] = field(default_factory=dict)
    ratios: dict[str, RatioSpread] = field(default_factory=dict)  # peer -> its time / the primary's
    failures: dict[str, BaseException] = field(default_factory=dict)


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

    def _timed_call(self, fn: Callable[[], object], context: Callable[[], ContextManager]):
        """One call of fn, `context` entered outside the timed region: its milliseconds on a CPU; on CUDA its
        (start, end) events, read by `_milliseconds` after a synchronisation (no per-call synchronisation:
        the flush before each call keeps the GPU busy while the host enqueues the call, as in do_bench)."""
        with context():
            if not self.is_cuda:
                start = time.perf_counter()
                fn()
                return (time.perf_counter() - start) * 1e3
            if self._flush_buffer is not None:
                self._flush_buffer.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            return start, end

    def _milliseconds(self, timed) -> float:
        if not self.is_cuda:
            return timed
        start, end = timed
        end.synchronize()
        return start.elapsed_time(end)

    def host_time(
        self, calls: Sequence[Callable[[], object]], context: Callable[[], ContextManager] = contextlib.nullcontext
    ) -> Measurement:
        """The host's milliseconds per call (module docstring), `calls` taken in turn, `context` entered
        outside the timing; HOST_TIMED_CALLS of them after HOST_WARMUP_CALLS."""
        times = []
        for index in range(HOST_WARMUP_CALLS + HOST_TIMED_CALLS):
            with context():
                self.synchronize()
                start = time.perf_counter()
                calls[index % len(calls)]()
                elapsed_ms = (time.perf_counter() - start) * 1e3
            if index >= HOST_WARMUP_CALLS:
                times.append(elapsed_ms)
        self.synchronize()
        times.sort()
        return Measurement(median_ms=statistics.median(times), p20_ms=quantile(times, 0.2),
                           p80_ms=quantile(times, 0.8), min_ms=times[0], reps=len(times))  # fmt: skip

    def interleaved(
        self,
        calls: dict[str, Sequence[Callable[[], object]]],
        primary: str,
        contexts: dict[str, Callable[[], ContextManager]] | None = None,
    ) -> Interleaved:
        """Times every peer's calls (one per input set) round by round (module docstring).

        The rounds are sized on `primary` (the first peer if it is not there) as do_bench sizes its
        repetitions (rep_ms of its calls, within min_reps and max_reps, after warmup_ms); a peer more than SLOW_PEER_FACTOR times slower runs in the first of them only, as
        many as its own time allows. A peer whose call raises drops out with the exception recorded."""
        s = self.settings
        contexts = contexts or {}
        context = {name: contexts.get(name, contextlib.nullcontext) for name in calls}
        result = Interleaved()
        estimates = {}
        for name, fns in calls.items():  # one call each (after the caller's first call) sizes the rounds
            try:
                estimates[name] = max(self._milliseconds(self._timed_call(fns[0], context[name])), 1e-3)
            except Exception as error:  # noqa: BLE001 - the caller records the reason
                result.failures[name] = error
        if not estimates:
            return result
        lead = primary if primary in estimates else next(iter(estimates))
        rounds = min(s.max_reps, max(s.min_reps, math.ceil(s.rep_ms / estimates[lead])))
        slow = {name for name, ms in estimates.items() if ms > SLOW_PEER_FACTOR * estimates[lead]}
        target = {
            name: min(rounds, max(SLOW_PEER_MIN_REPS, math.ceil(s.rep_ms / ms))) if name in slow else rounds
            for name, ms in estimates.items()
        }  # fmt: skip
        round_ms = sum(ms for name, ms in estimates.items() if name not in slow)
        warmup = min(s.max_reps, max(1, math.ceil(s.warmup_ms / round_ms)))
        times: dict[str, list] = {name: [] for name in estimates}  # per round: `_timed_call`'s result or None
        for index in range(warmup + rounds):
            if index < warmup:  # the slow peers' sizing call was their warm-up
                active = [name for name in estimates if name not in result.failures and name not in slow]
            else:
                active = [n for n in estimates if n not in result.failures and len(times[n]) < target[n]]
            if not active:
                break
            shift = index % len(active)
            for name in active[shift:] + active[:shift]:
                fns = calls[name]
                try:
                    ms = self._timed_call(fns[index % len(fns)], context[name])
                except Exception as error:  # noqa: BLE001
                    result.failures[name] = error
                    continue
                if index >= warmup:
                    times[name].append(ms)
            if index >= warmup:
                for name in estimates:  # rounds a peer sat out stay aligned with the others
                    if len(times[name]) < index - warmup + 1:
                        times[name].append(None)
        self.synchronize()
        times = {name: [t if t is None else self._milliseconds(t) for t in runs] for name, runs in times.items()}
        for name, values in times.items():
            ran = sorted(v for v in values if v is not None)
            if name in result.failures or not ran:
                continue
            result.measurements[name] = Measurement(
                median_ms=statistics.median(ran), p20_ms=quantile(ran, 0.2), p80_ms=quantile(ran, 0.8),
                min_ms=ran[0], reps=len(ran),
            )  # fmt: skip
        if lead in result.measurements:
            for name in result.measurements:
                if name == lead:
                    continue
                per_round = sorted(
                    theirs / mine for theirs, mine in zip(times[name], times[lead]) if theirs and mine
                )
                if per_round:
                    result.ratios[name] = RatioSpread(
                        statistics.median(per_round), quantile(per_round, 0.25), quantile(per_round, 0.75),
                        len(per_round),
                    )  # fmt: skip
        return result


def estimated_measure_seconds(settings: TimingSettings, run_ms: float, lead_ms: float | None = None) -> float:
    """Rough wall time of one peer's share of `Timer.interleaved` on a callable of `run_ms`, the primary
    peer's call taking `lead_ms` (None: this is the primary); for time estimates."""
    flush_ms = settings.flush_bytes / 2.5e9  # a memset at ~2.5 TB/s
    run_ms = max(run_ms, 1e-3)
    lead_ms = run_ms if lead_ms is None else max(lead_ms, 1e-3)
    rounds = min(settings.max_reps, max(settings.min_reps, math.ceil(settings.rep_ms / lead_ms)))
    if run_ms > SLOW_PEER_FACTOR * lead_ms:
        calls = 1 + min(rounds, max(SLOW_PEER_MIN_REPS, math.ceil(settings.rep_ms / run_ms)))
    else:
        calls = 1 + min(settings.max_reps, max(1, math.ceil(settings.warmup_ms / lead_ms))) + rounds
    return calls * (run_ms + flush_ms) / 1e3 + 0.02
