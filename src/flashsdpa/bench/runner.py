"""Running one case: every peer on the same inputs, timed, and checked against each other.

Per peer, in turn: its set-up (untimed) and a first forward call timed on the
host clock (for flashsdpa this includes Triton's JIT: `first_call_s`). Then
the forwards of all peers are timed together, interleaved round by round on
the same input sets (`Timer.interleaved`: each peer's median, and its time
over flashsdpa's per round, median and interquartile range, as `vs_primary`).
For cases with a backward, the same again: per peer one forward per input set
kept with its graph and a first backward, then the backwards timed
interleaved, each as `torch.autograd.grad(out, (q, k, v), grad_out,
retain_graph=True)`: no forward and no gradient accumulation inside the timed
region. The forward is timed on inputs that require grad (the training
forward) when the case has a backward. A peer that raises is recorded as n/a
with the reason; one that fails only in the backward keeps its forward numbers.

After each mode's timings, the peak memory one call adds (`bench.memory`),
peer by peer: for the forward, one forward (its output included); for the
backward, one forward and its backward together. On a decode-graph row, each
peer's forward also gets the host's time per call (`Timer.host_time`:
`host_us`, with its 20th and 80th percentiles).

Each flashsdpa output (and gradients) is compared with every peer's by the
relative Frobenius error ||a - b|| / ||b||; the verdict uses the first of
cuDNN, flash, mem-efficient and math that ran (preferring one that also ran
the backward when flashsdpa did; FlexAttention where none ran). A variant case, which no fused torch kernel
runs, is checked against its float64 formula instead (`variant_math` on the
first input set in float64, output and gradients: the "float64" reference),
when its (B, H, L, S) float64 scores fit MATH_SCORE_LIMIT_BYTES.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from flashsdpa.bench.cases import HOST_TIME_GROUPS, KV_BYTES_GROUPS, Case, InputSet, make_input_sets
from flashsdpa.bench.memory import peak_added_bytes
from flashsdpa.bench.peers import (
    MATH_SCORE_LIMIT_BYTES,
    Peer,
    failure_reason,
    recording_warnings,
    variant_bias,
    variant_math,
)
from flashsdpa.bench.timing import Measurement, Timer

PRIMARY = "flashsdpa"
EXACT = "float64"  # the float64 formula a variant case is checked against
# flex last: the only reference left for the GPU's window row at 32k (too large for math and float64).
# torch-varlen and torch (padded SDPA as torch chooses) check the varlen rows too large for math.
CHECK_REFERENCES = (EXACT, "cudnn", "flash", "efficient", "math", "flex", "torch-varlen", "torch")
# Largest relative error between flashsdpa and a torch peer, over the output and
# the three gradients, that passes: a few times the error each has against
# float64 (bf16 ~2e-3, fp16 ~3e-4, fp32 ~7e-7; see shared/PEERS.md).
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}
TF32_TOLERANCE = 1e-2
CPU_L2_BYTES = 32 << 20  # assumed; only decides how many input sets rotate
ROTATED_SETS = 3  # input sets rotated when one set fits in L2
GRAD_NAMES = ("dq", "dk", "dv")
MIB = 1 << 20


@dataclass
class PeerRun:
    """One peer on one case. `out`/`grads` of input set 0 are kept for the checks only."""

    modes: dict = field(default_factory=dict)  # mode -> {"status": "ok", ...} or {"status": "n/a", "reason"}
    first_call_s: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)
    out: torch.Tensor | None = None
    grads: tuple[torch.Tensor, ...] | None = None

    def ms(self, mode: str) -> float | None:
        entry = self.modes.get(mode, {})
        return entry.get("ms") if entry.get("status") == "ok" else None

    def describe(self) -> dict:
        return {**self.modes, "first_call_s": self.first_call_s, **({"notes": self.notes} if self.notes else {})}


def l2_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    return CPU_L2_BYTES


def input_set_count(case: Case, device: torch.device) -> int:
    return ROTATED_SETS if case.input_bytes <= l2_bytes(device) else 1


def metrics(case: Case, mode: str, measurement: Measurement) -> dict:
    seconds = measurement.median_ms / 1e3
    entry = {
        "status": "ok",
        "ms": measurement.median_ms,
        "tflops": case.flops(mode) / seconds / 1e12,
        "p20_ms": measurement.p20_ms,
        "p80_ms": measurement.p80_ms,
        "reps": measurement.reps,
    }
    if case.group in KV_BYTES_GROUPS and mode == "fwd":
        entry["kv_tbps"] = case.kv_bytes / seconds / 1e12
    if case.group == "varlen":
        entry["tokens_per_s"] = case.tokens_q / seconds
    return entry


@dataclass
class _Timed:
    """A peer of the case being run: its PeerRun and the callables its mode times, one per input set."""

    peer: Peer
    run: PeerRun
    forward: Callable[[InputSet], torch.Tensor] | None = None
    calls: list[Callable[[], object]] | None = None


def run_peers(peers: dict[str, Peer], case: Case, sets: list[InputSet], timer: Timer, device: torch.device) -> dict:
    """Every peer on the case (module docstring): per mode, each peer's set-up and first call in turn, then
    all of them timed interleaved (`Timer.interleaved`), then each one's peak memory. {name: PeerRun}."""
    timed = {name: _Timed(peer, PeerRun()) for name, peer in peers.items()}
    for name, entry in timed.items():
        reasons = entry.peer.unavailable_reasons(case, device)
        if reasons:
            entry.run.modes = {mode: {"status": "n/a", "reason": "; ".join(reasons)} for mode in case.modes}
        else:
            _attempt(entry, case, device, lambda e=entry: _set_up_forward(e, case, sets, timer, device))
    _time_mode(timed, case, sets, "fwd", timer, device)
    if case.backward:
        for entry in timed.values():
            if entry.forward is not None and entry.run.ms("fwd") is not None:
                _attempt(entry, case, device, lambda e=entry: _set_up_backward(e, case, sets, timer, device))
        _time_mode(timed, case, sets, "bwd", timer, device)
    for entry in timed.values():
        entry.calls = entry.forward = None
    return {name: entry.run for name, entry in timed.items()}


def run_peer(peer: Peer, case: Case, sets: list[InputSet], timer: Timer, device: torch.device) -> PeerRun:
    """One peer alone on the case."""
    return run_peers({peer.name: peer}, case, sets, timer, device)[peer.name]


def _attempt(entry: _Timed, case: Case, device: torch.device, step: Callable[[], None]) -> None:
    """Runs one set-up step; a refusal, compile failure or OOM makes the modes it had not filled n/a."""
    with recording_warnings() as caught:
        try:
            step()
        except Exception as error:  # n/a with the reason, never a crash
            _give_up(entry, case, device, failure_reason(error, caught))


def _give_up(entry: _Timed, case: Case, device: torch.device, reason: str) -> None:
    for mode in case.modes:
        if entry.run.modes.get(mode, {}).get("status") != "ok":
            entry.run.modes[mode] = {"status": "n/a", "reason": reason}
    entry.calls = entry.forward = None
    if device.type == "cuda":
        torch.cuda.empty_cache()  # after a failure (maybe OOM), with its tensors released


def _set_up_forward(entry: _Timed, case: Case, sets: list[InputSet], timer: Timer, device: torch.device) -> None:
    run, peer = entry.run, entry.peer
    with peer.context():
        forward = peer.prepare(case, device)
        run.first_call_s["fwd"], out = timer.first_call(lambda: forward(sets[0]))
        run.notes = peer.notes()  # right after its own first call: which backend ran, and why
    run.out = out.detach()
    entry.forward = forward
    entry.calls = [functools.partial(forward, s) for s in sets]
    run.modes["fwd"] = {"status": "pending"}


def _set_up_backward(entry: _Timed, case: Case, sets: list[InputSet], timer: Timer, device: torch.device) -> None:
    run, peer, forward = entry.run, entry.peer, entry.forward
    why_not = peer.backward_unavailable(case, device)
    if why_not is not None:
        run.modes["bwd"] = {"status": "n/a", "reason": why_not}
        return
    with peer.context():
        outs = [forward(s) for s in sets]  # graphs kept: only the backward is timed

        def backward(i: int):
            return torch.autograd.grad(outs[i], sets[i].differentiable, sets[i].grad_out, retain_graph=True)

        run.first_call_s["bwd"], grads = timer.first_call(lambda: backward(0))
    run.grads = tuple(g.detach() for g in grads)
    entry.calls = [functools.partial(backward, i) for i in range(len(sets))]
    run.modes["bwd"] = {"status": "pending"}


def _time_mode(
    timed: dict[str, _Timed], case: Case, sets: list[InputSet], mode: str, timer: Timer, device: torch.device
) -> None:
    """The peers set up for `mode`, timed interleaved; then each one's peak memory."""
    ready = {name: e for name, e in timed.items() if e.run.modes.get(mode, {}).get("status") == "pending"}
    if not ready:
        return
    with recording_warnings() as caught:
        measured = timer.interleaved(
            {name: e.calls for name, e in ready.items()}, PRIMARY, {name: e.peer.context for name, e in ready.items()}
        )
    for name, error in measured.failures.items():
        _give_up(ready[name], case, device, failure_reason(error, caught))
    for name, measurement in measured.measurements.items():
        entry = ready[name]
        entry.run.modes[mode] = metrics(case, mode, measurement)
        if name in measured.ratios:
            entry.run.modes[mode]["vs_primary"] = measured.ratios[name].describe()
    for name, entry in ready.items():
        if entry.run.modes[mode].get("status") != "ok":
            continue
        forward, first = entry.forward, sets[0]
        with entry.peer.context():
            if mode == "fwd":
                peak = peak_added_bytes(lambda: forward(first), device)
            else:  # a forward and its backward together
                peak = peak_added_bytes(
                    lambda: torch.autograd.grad(forward(first), first.differentiable, first.grad_out), device
                )
        entry.run.modes[mode]["peak_mib"] = peak / MIB
        if mode == "fwd" and case.group in HOST_TIME_GROUPS:
            host = timer.host_time(entry.calls, entry.peer.context)
            entry.run.modes[mode].update(host_us=host.median_ms * 1e3, host_p20_us=host.p20_ms * 1e3,
                                         host_p80_us=host.p80_ms * 1e3)  # fmt: skip


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    difference = torch.linalg.vector_norm(actual.double() - expected.double())
    return float(difference / torch.linalg.vector_norm(expected.double()).clamp_min(1e-300))


def plain_number(value: float) -> float | str:
    """JSON-safe: NaN and infinities become strings."""
    return value if math.isfinite(value) else str(value)


def compare_runs(candidate: PeerRun, reference: PeerRun) -> dict:
    errors = {"out": relative_error(candidate.out, reference.out)}
    if candidate.grads is not None and reference.grads is not None:
        for name, mine, theirs in zip(GRAD_NAMES, candidate.grads, reference.grads):
            errors[name] = relative_error(mine, theirs)
    return errors


def exact_run(case: Case, inputs: InputSet, device: torch.device) -> PeerRun | None:
    """A variant case's output (and q, k, v gradients) in float64 on one input set, one batch item and key/value
    head (with its query heads) at a time; None where one such slice's float64 scores would take more than
    MATH_SCORE_LIMIT_BYTES."""
    group = case.heads_q // case.heads_kv
    if group * case.seq_q * case.seq_kv * 8 > MATH_SCORE_LIMIT_BYTES:
        return None
    out = torch.empty(inputs.query.shape, dtype=torch.float64, device=device)
    grads = tuple(torch.empty(t.shape, dtype=torch.float64, device=device) for t in inputs.differentiable)
    for b in range(case.batch):
        for h in range(case.heads_kv):
            heads = slice(h * group, (h + 1) * group)
            index = ((b, heads), (b, slice(h, h + 1)), (b, slice(h, h + 1)))
            q, k, v = (
                t[i].unsqueeze(0).detach().double().requires_grad_(case.backward)
                for t, i in zip(inputs.differentiable, index)
            )
            sinks = None if inputs.sinks is None else inputs.sinks[heads].double()
            bias = variant_bias(case, device, torch.float64, heads)
            part = variant_math(case, q, k, v, bias, sinks)
            out[b, heads] = part[0].detach()
            if case.backward:
                grad_out = inputs.grad_out[b, heads].unsqueeze(0).double()
                for grad, piece, i in zip(grads, torch.autograd.grad(part, (q, k, v), grad_out), index):
                    grad[i] = piece[0]
    return PeerRun(out=out, grads=grads if case.backward else None)


def check(case: Case, runs: dict[str, PeerRun], exact: PeerRun | None = None) -> dict:
    """flashsdpa-* outputs against every torch peer's (and the float64 formula's, if given);
    verdict against the first reference."""
    checks = {}
    for name, run in runs.items():
        if not name.startswith(PRIMARY) or run.out is None:
            continue
        others = {**({EXACT: exact} if exact is not None else {}), **runs}
        versus = {
            other: compare_runs(run, theirs)
            for other, theirs in others.items()
            if not other.startswith(PRIMARY) and theirs.out is not None
        }
        # The first reference that checks everything flashsdpa produced, else the first at all.
        candidates = [r for r in CHECK_REFERENCES if r in versus]
        complete = [r for r in candidates if len(versus[r]) == (1 if run.grads is None else 1 + len(GRAD_NAMES))]
        reference = (complete or candidates or [None])[0]
        tolerance = TF32_TOLERANCE if name.endswith("tf32") else TOLERANCE.get(case.dtype, 2e-2)
        entry = {"reference": reference, "tolerance": tolerance}
        if reference is not None:
            errors = list(versus[reference].values())
            worst = math.nan if any(math.isnan(e) for e in errors) else max(errors)
            entry["max_rel_err"] = plain_number(worst)
            entry["ok"] = bool(worst <= tolerance)  # NaN fails
        entry["rel_err_vs"] = {peer: {k: plain_number(v) for k, v in errs.items()} for peer, errs in versus.items()}
        checks[name] = entry
    return checks


def ratios(case: Case, runs: dict[str, PeerRun]) -> dict:
    """flashsdpa's speed over each peer's per mode (peer time / flashsdpa time; > 1: flashsdpa faster): the
    median of the per-round ratios where both were timed interleaved, else the ratio of the medians."""
    primary = runs.get(PRIMARY)
    table = {}
    for name, run in runs.items():
        if name == PRIMARY or primary is None:
            continue
        table[name] = {}
        for mode in case.modes:
            mine, theirs = primary.ms(mode), run.ms(mode)
            paired = run.modes.get(mode, {}).get("vs_primary")
            table[name][mode] = paired["median"] if paired and mine and theirs else (
                theirs / mine if mine and theirs else None
            )  # fmt: skip
    return table


def run_case(case: Case, peers: dict[str, Peer], timer: Timer, device: torch.device, seed: int) -> dict:
    start = time.perf_counter()
    count = input_set_count(case, device)
    sets = make_input_sets(case, device, count, seed)
    runs = run_peers({name: peers[name] for name in case.peers}, case, sets, timer, device)
    exact = exact_run(case, sets[0], device) if case.variant else None
    result = {
        **case.describe(),
        "status": "ran",
        "input_sets": count,
        "seed": seed,
        "peers": {name: run.describe() for name, run in runs.items()},
        "ratios": ratios(case, runs),
        "check": check(case, runs, exact),
    }
    del runs, sets, exact
    if device.type == "cuda":
        torch.cuda.empty_cache()
    result["elapsed_s"] = time.perf_counter() - start
    return result


def skipped_case(case: Case, reason: str) -> dict:
    return {**case.describe(), "status": "skipped", "reason": reason, "peers": {}, "ratios": {}, "check": {}}
