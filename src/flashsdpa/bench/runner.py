"""Running one case: every peer on the same inputs, timed, and checked against each other.

Per peer: its set-up (untimed), a first forward call timed on the host clock
(for flashsdpa this includes Triton's JIT: `first_call_s`), the forward timed
by `Timer.measure`, then, for cases with a backward, one forward per input set
kept with its graph and the backward alone timed as
`torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True)`: no
forward and no gradient accumulation inside the timed region. The forward is
timed on inputs that require grad (the training forward) when the case has a
backward. A peer that raises is recorded as n/a with the reason; one that
fails only in the backward keeps its forward numbers.

After the timings, the peak memory one call adds (`bench.memory`): for the
forward, one forward (its output included); for the backward, one forward
and its backward together.

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

import torch

from flashsdpa.bench.cases import KV_BYTES_GROUPS, Case, InputSet, make_input_sets
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


def run_peer(peer: Peer, case: Case, sets: list[InputSet], timer: Timer, device: torch.device) -> PeerRun:
    run = PeerRun()
    reasons = peer.unavailable_reasons(case, device)
    if reasons:
        run.modes = {mode: {"status": "n/a", "reason": "; ".join(reasons)} for mode in case.modes}
        return run
    with recording_warnings() as caught:
        try:
            time_peer(run, peer, case, sets, timer, device)
        except Exception as error:  # a refusal, a compile failure or OOM: n/a, never a crash
            reason = failure_reason(error, caught)
            for mode in case.modes:
                run.modes.setdefault(mode, {"status": "n/a", "reason": reason})
    if device.type == "cuda" and len(run.modes) != sum(m.get("status") == "ok" for m in run.modes.values()):
        torch.cuda.empty_cache()  # after a failure (maybe OOM), with its tensors released
    run.notes = peer.notes()
    return run


def time_peer(run: PeerRun, peer: Peer, case: Case, sets: list[InputSet], timer: Timer, device: torch.device) -> None:
    """Fills run.modes mode by mode; raises on the first failure (its tensors die with this frame)."""
    with peer.context():
        forward = peer.prepare(case, device)
        run.first_call_s["fwd"], out = timer.first_call(lambda: forward(sets[0]))
        run.out = out.detach()
        run.modes["fwd"] = metrics(case, "fwd", timer.measure([functools.partial(forward, s) for s in sets]))
        run.modes["fwd"]["peak_mib"] = peak_added_bytes(lambda: forward(sets[0]), device) / MIB
        if not case.backward:
            return
        why_not = peer.backward_unavailable(case, device)
        if why_not is not None:
            run.modes["bwd"] = {"status": "n/a", "reason": why_not}
            return
        outs = [out] + [forward(s) for s in sets[1:]]  # graphs kept: only the backward is timed

        def backward(i: int):
            return torch.autograd.grad(outs[i], sets[i].differentiable, sets[i].grad_out, retain_graph=True)

        run.first_call_s["bwd"], grads = timer.first_call(lambda: backward(0))
        run.grads = tuple(g.detach() for g in grads)
        measured = timer.measure([functools.partial(backward, i) for i in range(len(sets))])
        run.modes["bwd"] = metrics(case, "bwd", measured)

        def forward_and_backward():
            first = sets[0]
            return torch.autograd.grad(forward(first), first.differentiable, first.grad_out)

        run.modes["bwd"]["peak_mib"] = peak_added_bytes(forward_and_backward, device) / MIB


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
    """flashsdpa's speed over each peer's per mode (peer time / flashsdpa time; > 1: flashsdpa faster)."""
    primary = runs.get(PRIMARY)
    table = {}
    for name, run in runs.items():
        if name == PRIMARY or primary is None:
            continue
        table[name] = {}
        for mode in case.modes:
            mine, theirs = primary.ms(mode), run.ms(mode)
            table[name][mode] = theirs / mine if mine and theirs else None
    return table


def run_case(case: Case, peers: dict[str, Peer], timer: Timer, device: torch.device, seed: int) -> dict:
    start = time.perf_counter()
    count = input_set_count(case, device)
    sets = make_input_sets(case, device, count, seed)
    runs = {name: run_peer(peers[name], case, sets, timer, device) for name in case.peers}
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
