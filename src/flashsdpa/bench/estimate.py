"""Time estimates per case, so a run can be planned (`--plan`) and kept within its budget.

The rates and compile times below are guesses for one H100 (rates from
shared/PEERS.md, compile times unmeasured when written); a run rescales the
remaining estimates by how its finished cases compared with theirs, and the
JSON records each case's estimate beside its elapsed time so the guesses can
be replaced.
"""

from __future__ import annotations

from flashsdpa.bench.cases import GRAPH_SUFFIX, HOST_TIME_GROUPS, KV_BYTES_GROUPS, Case
from flashsdpa.bench.peers import MATH_SCORE_LIMIT_BYTES
from flashsdpa.bench.timing import HOST_TIMED_CALLS, HOST_WARMUP_CALLS, TimingSettings, estimated_measure_seconds

# Assumed speeds on an H100, TFLOP/s for 16-bit inputs (forward, backward).
CUDA_TFLOPS_16BIT = {
    "flashsdpa": (350, 250),
    "cudnn": (550, 450),
    "flash": (300, 260),
    "efficient": (150, 115),
    "math": (19, 19),
    "flex": (400, 330),
}
CUDA_TFLOPS_FP32 = {"flashsdpa": (40, 30), "flashsdpa-tf32": (120, 90), "efficient": (47, 40), "math": (26, 26)}
CUDA_DECODE_BYTES_PER_S = {"math": 0.08e12}  # others ~2.5e12 (K+V read)
CUDA_DECODE_DEFAULT = 2.5e12
# Speeds on the 2-core CPU machine, TFLOP/s (any dtype, forward and backward): roughly the quiet-machine
# run of the dense rows (BENCHMARKS.md, issue 16; flashsdpa and torch 0.15-1.1, math 0.02-0.2).
CPU_TFLOPS = {"flashsdpa": 0.25, "torch": 0.25, "math": 0.06, "flex": 0.06}
CPU_TFLOPS_DEFAULT = 0.06

# Seconds of compilation the first time a kernel is needed (guesses).
FLASHSDPA_JIT_S = {"fwd": 2.0, "bwd": 4.0}  # per new KernelKey
FLEX_COMPILE_S = {"fwd": 8.0, "bwd": 12.0}  # per new shape ("static") or per group ("dynamic")
FLEX_COMPILE_S_CPU = 40.0  # inductor's C++ for one forward, with gcc on the 2-core machine
CASE_OVERHEAD_S = {"cuda": 0.5, "cpu": 0.05}  # inputs, checks, block masks, empty_cache
HOST_CALL_S = 1e-4  # a call's host time, added to its run time where the host time is measured (a guess)
REFUSAL_S = 0.05


def expected_refusal(peer: str, case: Case) -> bool:
    """Peers torch is known to refuse on this kind of case (they cost almost nothing)."""
    if peer in ("cudnn", "flash") and case.element_size == 4:
        return True
    if peer == "flash" and case.mask != "none":
        return True
    return peer == "efficient" and case.gqa


class Estimator:
    """Estimates cases in running order (it remembers which kernels are compiled)."""

    def __init__(self, settings: TimingSettings, device_type: str, flex_mode: str, sets: int = 1):
        self.settings = settings
        self.device_type = device_type
        self.flex_mode = flex_mode
        self.sets = sets
        self.compiled: set = set()

    def _compile_seconds(self, peer: str, case: Case, mode: str) -> float:
        if self.device_type != "cuda" and peer != "flex":
            return 0.0
        if peer.startswith("flashsdpa"):  # a CUDA-graph peer replays the kernels its eager peer compiled
            key = (peer.removesuffix(GRAPH_SUFFIX), case.descriptor.kernel_key, mode, case.seq_q <= 16)
            cost = FLASHSDPA_JIT_S[mode]
        elif peer == "flex":
            shape = (case.batch, case.heads_q, case.seq_q, case.seq_kv) if self.flex_mode == "static" else ()
            key = (peer, case.dtype, case.head_dim, case.causal, case.mask, case.variant_labels, mode, shape)
            cost = FLEX_COMPILE_S[mode] if self.device_type == "cuda" else FLEX_COMPILE_S_CPU
        else:
            return 0.0
        if key in self.compiled:
            return 0.0
        self.compiled.add(key)
        return cost

    def _run_ms(self, peer: str, case: Case, mode: str) -> float:
        if case.group in KV_BYTES_GROUPS:
            rate = CUDA_DECODE_BYTES_PER_S.get(peer, CUDA_DECODE_DEFAULT) if self.device_type == "cuda" else 1e10
            return case.kv_bytes / rate * 1e3
        if self.device_type != "cuda":
            tflops = CPU_TFLOPS.get(peer, CPU_TFLOPS_DEFAULT)
        else:
            table = CUDA_TFLOPS_FP32 if case.element_size == 4 else CUDA_TFLOPS_16BIT
            tflops = table.get(peer, (100, 80))[0 if mode == "fwd" else 1]
        return case.flops(mode) / (tflops * 1e12) * 1e3

    def skipped(self, peer: str, case: Case) -> bool:
        if peer == "flex":
            return self.flex_mode == "off" or case.mask == "bias"
        return peer == "math" and case.score_bytes > MATH_SCORE_LIMIT_BYTES

    def estimate(self, case: Case) -> float:
        """Seconds `run_case` should take; call once per case, in running order."""
        seconds = CASE_OVERHEAD_S.get(self.device_type, 0.05)
        for peer in case.peers:
            if self.skipped(peer, case):
                continue
            if expected_refusal(peer, case) and self.device_type == "cuda":
                seconds += REFUSAL_S
                continue
            modes = ("fwd",) if peer == "flex" and self.device_type != "cuda" else case.modes  # no CPU backward
            for mode in modes:
                run_ms = self._run_ms(peer, case, mode)
                seconds += self._compile_seconds(peer, case, mode)
                lead_ms = self._run_ms(case.peers[0], case, mode) if peer != case.peers[0] else None
                seconds += estimated_measure_seconds(self.settings, run_ms, lead_ms) + run_ms / 1e3
                if mode == "bwd":  # the forwards kept for the backward
                    seconds += self.sets * self._run_ms(peer, case, "fwd") / 1e3
                elif case.group in HOST_TIME_GROUPS:
                    seconds += (HOST_WARMUP_CALLS + HOST_TIMED_CALLS) * (run_ms / 1e3 + HOST_CALL_S)
        return seconds


class Budget:
    """Wall-clock budget of a run, with estimates rescaled by how the run is going."""

    def __init__(self, seconds: float | None, start: float):
        self.seconds = seconds
        self.start = start
        self.estimated_done = 0.0
        self.actual_done = 0.0

    @property
    def scale(self) -> float:
        if self.estimated_done <= 0:
            return 1.0
        return min(5.0, max(0.3, self.actual_done / self.estimated_done))

    def record(self, estimated: float, actual: float) -> None:
        self.estimated_done += estimated
        self.actual_done += actual

    def fits(self, now: float, estimated: float) -> bool:
        return self.seconds is None or (now - self.start) + self.scale * estimated <= self.seconds
