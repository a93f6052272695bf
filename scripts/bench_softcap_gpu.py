"""The hopper backend's softcap forward, each way it can run, beside compiled Flex on an H100/H200 (issue 14).

Run from the repo root on the GPU machine (under 2 minutes with Flex's compiles):
    PYTHONPATH=src python scripts/bench_softcap_gpu.py [--flex-rows N] [--budget SECONDS] [--skip-tanh]

`hopper.variants.SOFTCAP_FORWARD` (per head dim) says how the hopper backend
computes softcap's forward: "precise" (the Gluon kernel, a precise tanh: the
default), "hardware" (the Gluon kernel, tanh.approx.f32), "hardware-fma" (and
one consumer group's exponentials by FMA arithmetic) or "triton" (the triton
backend's forward); the backward is the Gluon one in every case.

1. tanh itself, over every finite float32 against float64: the largest
   relative error where |x| is normal, the largest absolute error anywhere
   (the hardware's tanh.approx.f32 and the precise form the Gluon forward had).
2. accuracy against float64 (the reference backend) of each choice: bf16,
   B=2, Hq=8, Hkv=2, d=128 and 64, causal L=S=1000, softcap 30, at the
   default scale and at scale 1 ("steep": scores spread over tanh's curve):
   relative error of out, dq, dk, dv and the largest lse error; "!" marks one
   above the test suite's bf16 bar; `ran` names the forward's and backward's
   kernels as the fallbacks say.
3. time: forward and backward TFLOP/s (median of triton.testing.do_bench:
   CUDA events, L2 cleared before each call) of each choice and compiled Flex
   with the bench's score_mod (`bench.peers.flex_score_mod`), on the bench's
   softcap row (bf16 d=128 causal L=4096 B=4 H=16 softcap 30), the same
   non-causal, and d=64 causal; `err` is each forward's out error against
   float64 on heads 0-1 of batch 0 of the timed inputs. Flex rows come last:
   the bench's row alone unless --flex-rows says more, none past --budget
   seconds.

The last table is the summary: per row, each choice's forward and backward
TFLOP/s and the best choice's forward against Flex. Its "set" lines name the
fastest forward that keeps the bar, per head dim: that is the entry to write
into `SOFTCAP_FORWARD` (src/flashsdpa/backends/hopper/variants.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import time

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

import flashsdpa
from flashsdpa.backends.base import poisoned_outputs
from flashsdpa.backends.hopper import variants
from flashsdpa.backends.hopper.variant_kernels import hardware_tanh
from flashsdpa.backends.triton.score_kernels import tanh as precise_tanh
from flashsdpa.bench.cases import gpu_variant_cases, make_input_sets
from flashsdpa.bench.peers import FlexPeer

from bench_hopper_gpu import PinnedFlashSdpa  # (scripts/ is the script's own folder, first on sys.path)
from bench_hopper_variants_gpu import GRAD_BAR, OUT_BAR, relative_error, time_peer

CHOICES = variants.SOFTCAP_FORWARDS
TANH_BLOCK = 1024


@gluon.jit
def _tanh_kernel(x_ptr, y_ptr, n, HARDWARE: gl.constexpr, BLOCK: gl.constexpr):
    layout: gl.constexpr = gl.BlockedLayout([4], [32], [4], [0])
    offsets = gl.program_id(0) * BLOCK + gl.arange(0, BLOCK, layout=layout)
    inside = offsets < n
    x = gl.load(x_ptr + offsets, mask=inside)
    if HARDWARE:
        y = hardware_tanh(x)
    else:
        y = precise_tanh(x)
    gl.store(y_ptr + offsets, y, mask=inside)


def tanh_errors(chunk_bits: int = 28) -> None:
    """Largest relative error (normal |x|) and absolute error of each tanh form over every finite float32."""
    print("tanh against float64 over every finite float32: max relative error (|x| >= 2^-126), max absolute error")
    chunk = 1 << chunk_bits
    worst = {name: [0.0, 0.0, 0.0] for name in ("hardware", "precise")}  # relative, its x, absolute
    start = time.time()
    for first in range(0, 1 << 32, chunk):
        bits = torch.arange(first, first + chunk, dtype=torch.int64, device="cuda")
        x = (bits - (1 << 32) * (bits >= (1 << 31))).to(torch.int32).view(torch.float32)
        x = x[torch.isfinite(x)]
        truth = torch.tanh(x.double())
        normal = x.abs() >= torch.finfo(torch.float32).tiny
        y = torch.empty_like(x)
        for name in worst:
            _tanh_kernel[(triton.cdiv(x.numel(), TANH_BLOCK),)](x, y, x.numel(), HARDWARE=name == "hardware",
                                                                  BLOCK=TANH_BLOCK, num_warps=4)
            error = (y.double() - truth).abs()
            relative = torch.where(normal & (truth != 0), error / truth.abs().clamp_min(1e-300), 0.0)
            where = int(relative.argmax())
            if relative[where].item() > worst[name][0]:
                worst[name][:2] = relative[where].item(), x[where].item()
            worst[name][2] = max(worst[name][2], error.max().item())
        del bits, x, truth, normal, y
    for name, (relative, at, absolute) in worst.items():
        print(f"  {name:<9} relative {relative:.3e} (at x = {at:.6g})  absolute {absolute:.3e}")
    print(f"  ({time.time() - start:.0f} s)", flush=True)


@contextlib.contextmanager
def softcap_forward(choice: str, head_dim: int):
    """`SOFTCAP_FORWARD[head_dim]` set to `choice` inside the block."""
    before = variants.SOFTCAP_FORWARD[head_dim]
    variants.SOFTCAP_FORWARD[head_dim] = choice
    try:
        yield
    finally:
        variants.SOFTCAP_FORWARD[head_dim] = before


def ran(fallbacks: dict) -> str:
    """Which kernels the hopper backend ran, as its fallbacks say."""
    forward = "triton" if any("softcap's forward" in reason for reason in fallbacks) else "gluon"
    backward = "triton" if any("hopper backward" in reason for reason in fallbacks) else "gluon"
    return f"fwd {forward}, bwd {backward}"


def accuracy(device: str = "cuda", seq: int = 1000, backend: str = "hopper") -> dict:
    """{(head_dim, steep, choice): errors}; prints one row per problem and choice (`backend`: another for a dry
    run on the CPU)."""
    print("\naccuracy against float64 (bf16, B=2, Hq=8, Hkv=2, causal L=S=1000, softcap 30): relative error of "
          "out, dq, dk, dv; max |lse error|")
    print(f"{'choice':<12} {'d':>3} {'scale':>7} {'out':>9} {'lse':>9} {'dq':>9} {'dk':>9} {'dv':>9}  ran")
    results = {}
    for head_dim in (128, 64):
        for steep in (False, True):
            gen = torch.Generator(device=device).manual_seed(head_dim + steep)
            q = torch.randn(2, 8, seq, head_dim, device=device, generator=gen).bfloat16().requires_grad_()
            k, v = (torch.randn(2, 2, seq, head_dim, device=device, generator=gen).bfloat16().requires_grad_()
                    for _ in "kv")
            grad_out = torch.randn(2, 8, seq, head_dim, device=device, generator=gen).bfloat16()
            options = dict(causal=True, softcap=30.0, enable_gqa=True, return_lse=True,
                           scale=1.0 if steep else None)
            leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
            ref_out, ref_lse = flashsdpa.attention(*leaves64, backend="reference", **options)
            ref_grads = torch.autograd.grad(ref_out, leaves64, grad_out.double())
            for choice in CHOICES:
                with softcap_forward(choice, head_dim):
                    flashsdpa.reset_stats()
                    with poisoned_outputs():
                        out, lse = flashsdpa.attention(q, k, v, backend=backend, **options)
                    grads = torch.autograd.grad(out, (q, k, v), grad_out)
                    fallbacks = flashsdpa.stats()["fallbacks"]
                errors = [relative_error(out, ref_out), (lse.double() - ref_lse).abs().max().item(),
                          *(relative_error(g, r) for g, r in zip(grads, ref_grads))]
                results[head_dim, steep, choice] = errors
                cells = " ".join(f"{e:8.1e}{'!' if e > bar else ' '}" for e, bar in zip(errors, BARS))
                print(f"{choice:<12} {head_dim:>3} {'1' if steep else 'default':>7} {cells} {ran(fallbacks)}",
                      flush=True)
            del ref_out, ref_lse, ref_grads, leaves64
    return results


class SoftcapChoice(PinnedFlashSdpa):
    """The hopper backend with `SOFTCAP_FORWARD[head_dim]` set to one choice."""

    def __init__(self, choice: str, head_dim: int):
        super().__init__("hopper")
        self.choice, self.head_dim = choice, head_dim

    @contextlib.contextmanager
    def context(self):
        with softcap_forward(self.choice, self.head_dim), flashsdpa.use_backend("hopper"):
            yield


def out_error(forward, inputs, ref: torch.Tensor) -> float:
    """Relative error of a forward's out on heads 0-1 of batch 0 against their float64 reference."""
    with torch.no_grad():
        return relative_error(forward(inputs)[0, :2], ref)


def timing_cases():
    (softcap_row,) = [case for case in gpu_variant_cases() if case.softcap is not None]
    return [softcap_row, dataclasses.replace(softcap_row, causal=False),
            dataclasses.replace(softcap_row, head_dim=64)]


def timing(flex_rows: int, budget: float, start: float) -> dict:
    device = torch.device("cuda")
    results = {}
    print("\ntiming (TFLOP/s; err: out's relative error against float64 on heads 0-1 of batch 0)")
    cases = timing_cases()
    inputs = {case.name: make_input_sets(case, device, 1, seed=7)[0] for case in cases}
    refs = {}
    for case in cases:
        x = inputs[case.name]
        q, k, v = (t.detach()[0, :2].double() for t in (x.query, x.key, x.value))
        refs[case.name] = flashsdpa.attention(q, k, v, causal=case.causal, softcap=case.softcap,
                                              backend="reference")
        for choice in CHOICES:
            peer = SoftcapChoice(choice, case.head_dim)
            rates = time_peer(peer, case, x, device)
            with peer.context():
                error = out_error(peer.prepare(case, device), x, refs[case.name])
            results[case.name, choice] = (*rates, error)
            print(f"  {case.name} {choice}: {rates[0]:.0f} / {rates[1]:.0f} err {error:.1e} {rates[2]}", flush=True)
    peer = FlexPeer("static")
    for number, case in enumerate(cases):
        if number >= flex_rows:
            results[case.name, "flex"] = (float("nan"), float("nan"), "not timed (--flex-rows)", float("nan"))
            continue
        if time.time() - start > budget:
            results[case.name, "flex"] = (float("nan"), float("nan"), f"skipped: past {budget:.0f} s",
                                          float("nan"))
            continue
        rates = time_peer(peer, case, inputs[case.name], device)
        with peer.context():
            error = out_error(peer.prepare(case, device), inputs[case.name], refs[case.name])
        results[case.name, "flex"] = (*rates, error)
        print(f"  {case.name} flex: {rates[0]:.0f} / {rates[1]:.0f} err {error:.1e} {rates[2]}", flush=True)
    return results


BARS = [OUT_BAR, float("inf")] + [GRAD_BAR] * 3  # out, lse, dq, dk, dv


def keeps_bar(errors: dict, head_dim: int, choice: str) -> bool:
    """Whether a choice's errors in `accuracy` are within the test suite's bf16 bars at both scales."""
    return all(e <= bar for steep in (False, True) for e, bar in zip(errors[head_dim, steep][choice], BARS))


def summary(results: dict, errors: dict) -> None:
    names = [*CHOICES, "flex"]
    print("\nsummary: TFLOP/s (bf16, B=4, H=16, L=4096, softcap 30; median of do_bench); best/flex = the fastest "
          "choice keeping the bar, forward, against Flex")
    header = "".join(f"{name:>13}" for name in names)
    print(f"{'row':<40} fwd{header}  bwd{header}  {'best':>12} {'best/flex':>9}")
    best_by_dim = {}
    for case in timing_cases():
        keeps = [choice for choice in CHOICES if keeps_bar(errors, case.head_dim, choice)
                 and results[case.name, choice][3] <= OUT_BAR]
        forward = {name: results[case.name, name][0] for name in names}
        best = max(keeps, key=lambda choice: forward[choice]) if keeps else "-"
        ratio = forward[best] / forward["flex"] if keeps else float("nan")
        best_by_dim.setdefault(case.head_dim, []).append(best)
        fwd = "".join(f"{forward[name]:13.0f}" for name in names)
        bwd = "".join(f"{results[case.name, name][1]:13.0f}" for name in names)
        print(f"{case.name:<40}    {fwd}     {bwd}  {best:>12} {ratio:9.2f}")
    for head_dim, bests in best_by_dim.items():
        print(f"set: SOFTCAP_FORWARD[{head_dim}] = {bests[0]!r}" + (
            "" if len(set(bests)) == 1 else f"  (rows differ: {bests}; the causal row is the bench's)"))
    for (row, name), (_, _, note, _) in results.items():
        if note:
            print(f"  note {row} {name}: {note[:160]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flex-rows", type=int, default=1,
                        help="time Flex on the first N rows (1: the bench's row; its compiles take ~20 s a row)")
    parser.add_argument("--skip-tanh", action="store_true", help="skip the float32 sweep of the tanh forms")
    parser.add_argument("--budget", type=float, default=100.0, help="seconds after which Flex rows are skipped")
    args = parser.parse_args()
    start = time.time()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__,
          "SOFTCAP_FORWARD", variants.SOFTCAP_FORWARD, flush=True)
    if not args.skip_tanh:
        tanh_errors()
    accuracy_results = accuracy()
    errors = {}
    for (head_dim, steep, choice), values in accuracy_results.items():
        errors.setdefault((head_dim, steep), {})[choice] = values
    results = timing(args.flex_rows, args.budget, start)
    summary(results, errors)
    print(f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
