"""The hopper backend's variants on an H100/H200: accuracy against float64, then time beside triton and Flex.

Run from the repo root on the GPU machine (about 2 minutes with Flex's compiles):
    PYTHONPATH=src python scripts/bench_hopper_variants_gpu.py [--skip-accuracy] [--no-flex] [--budget SECONDS]

Accuracy: for each variant (windows, both causal alignments with rows that
see no key, softcap, ALiBi, sinks, all together; bf16, GQA 8/2, odd
lengths), the relative Frobenius error of out, dq, dk, dv (and dsinks) and
the largest lse error against the float64 reference backend, for the hopper
backend (--triton-accuracy: and the triton backend's beside it, on the same
inputs); "!" marks an error above the test suite's bf16 bar; `backward`
says which backward the hopper backend ran (gluon, or triton's and why).

Timing: the bench's variant rows (`flashsdpa.bench.cases.gpu_variant_cases`
without the d=512 row: window 4096 in causal 32k, softcap, sinks, ALiBi at
causal L=4096, d=128, bf16), forward and backward alone (each peer's forward
graph kept), medians of triton.testing.do_bench (L2 cleared before each
call). Peers: flashsdpa pinned to hopper and to triton, and compiled
FlexAttention with the bench's own mask_mod/score_mod (`bench.peers`); Flex
rows are compiled last and skipped once --budget seconds have passed.
TFLOP/s count the visible pairs (the backward 2.5x the forward). The last
table is the summary.
"""

from __future__ import annotations

import argparse
import time

import torch
import triton

import flashsdpa
from flashsdpa.backends.base import poisoned_outputs
from flashsdpa.bench.cases import gpu_variant_cases, make_input_sets
from flashsdpa.bench.peers import FlexPeer

from bench_hopper_gpu import PinnedFlashSdpa  # (scripts/ is the script's own folder, first on sys.path)

# name: (attention keyword arguments, head dim, (L, S)); B=2, Hq=8, Hkv=2, bf16. Chosen so that few kernel
# variants compile (flags and head dim): L > S bottom-right has rows before key 0, which see no key.
ACCURACY = {
    "causal-window256": (dict(causal=True, window=(256, None)), 128, (1000, 1000)),
    "br-causal-window200": (dict(causal=True, window=(200, None), causal_alignment="bottom_right"), 128, (700, 1500)),
    "br-causal L<S": (dict(causal=True, causal_alignment="bottom_right"), 128, (513, 1100)),
    "br-causal L>S": (dict(causal=True, causal_alignment="bottom_right"), 128, (1100, 513)),
    "window(300,100)": (dict(window=(300, 100)), 64, (777, 1029)),
    "softcap30": (dict(causal=True, softcap=30.0), 128, (1024, 1024)),
    "alibi d64": (dict(alibi=True), 64, (777, 1029)),
    "sinks": (dict(causal=True, sinks=True), 128, (1000, 1000)),
    "all d64": (dict(causal=True, window=(300, None), causal_alignment="bottom_right", softcap=20.0, alibi=True,
                     sinks=True), 64, (900, 1300)),
    "all d128": (dict(causal=True, window=(300, None), causal_alignment="bottom_right", softcap=20.0, alibi=True,
                      sinks=True), 128, (1300, 900)),
}
# The test suite's bf16 bars (tests/helpers.py FORWARD_TOL, GRAD_TOL): "!" marks an error above them.
OUT_BAR, GRAD_BAR = 1e-2, 2e-2


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def run_with_grads(backend: str, q, k, v, options: dict, slopes, sinks, grad_out):
    """(out, lse, [dq, dk, dv, dsinks]) of flashsdpa.attention on `backend`."""
    leaves = [q, k, v] + ([sinks] if sinks is not None else [])
    out, lse = flashsdpa.attention(q, k, v, enable_gqa=True, backend=backend, return_lse=True, alibi_slopes=slopes,
                                   sinks=sinks, **options)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out, lse, grads


def accuracy(device: str = "cuda", backends: tuple[str, ...] = ("hopper",)) -> None:
    """One row per problem; with two backends, each cell is first / second (the second: the bar to compare)."""
    print("accuracy against float64 (bf16, B=2, Hq=8, Hkv=2): relative error of out, dq, dk, dv, dsinks; "
          f"max |lse error| over rows that see a key (inf: rows with no key differ); {' / '.join(backends)}")
    width = 9 * len(backends) + len(backends) - 1
    print(f"{'variant':<20} {'d':>3} {'L x S':>10} " + " ".join(f"{c:>{width}}" for c in (
        "out", "lse", "dq", "dk", "dv", "dsinks")) + "  backward")
    gen = torch.Generator(device=device).manual_seed(0)
    for name, (options, head_dim, (seq_q, seq_kv)) in ACCURACY.items():
        options = dict(options)
        alibi, with_sinks = options.pop("alibi", False), options.pop("sinks", False)

        def randn(*shape):
            return torch.randn(*shape, device=device, generator=gen)

        q = randn(2, 8, seq_q, head_dim).bfloat16().requires_grad_()
        k, v = (randn(2, 2, seq_kv, head_dim).bfloat16().requires_grad_() for _ in "kv")
        grad_out = randn(2, 8, seq_q, head_dim).bfloat16()
        slopes = torch.exp2(-8.0 * torch.arange(1, 9, device=device) / 8) if alibi else None
        sinks = (2 * randn(8)).requires_grad_() if with_sinks else None
        leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
        sinks64 = sinks.detach().double().requires_grad_() if with_sinks else None
        ref = run_with_grads("reference", *leaves64, options, slopes, sinks64, grad_out.double())
        cells = {}
        for backend in backends:
            flashsdpa.reset_stats()
            with poisoned_outputs():
                out, lse, grads = run_with_grads(backend, q, k, v, options, slopes, sinks, grad_out)
            finite = torch.isfinite(ref[1])
            same_empty = torch.equal(torch.isneginf(lse), torch.isneginf(ref[1]))
            lse_error = (lse.double() - ref[1])[finite].abs().max().item() if finite.any() else 0.0
            cells[backend] = [relative_error(out, ref[0]), lse_error if same_empty else float("inf"),
                              *(relative_error(g, r) for g, r in zip(grads, ref[2]))]
            if backend == backends[0]:
                fallbacks = flashsdpa.stats()["fallbacks"]
                ran = "gluon" if not fallbacks else "triton's: " + "; ".join(fallbacks)[:90]
        bars = [OUT_BAR, float("inf")] + [GRAD_BAR] * 4
        columns = ["/".join(f"{e:8.1e}{'!' if e > bar else ' '}" for e in errors)
                   for bar, errors in zip(bars, zip(*(cells[b] for b in backends)))]
        columns += [f"{'-':>{width}}"] * (6 - len(columns))
        print(f"{name:<20} {head_dim:>3} {f'{seq_q}x{seq_kv}':>10} {' '.join(columns)}  {ran}", flush=True)
        del ref, q, k, v, leaves64


def time_peer(peer, case, inputs, device) -> tuple[float, float, str]:
    """(forward TFLOP/s, backward TFLOP/s, note) of one peer on one case; NaN where it fails."""
    leaves = inputs.differentiable
    rates, note = [float("nan"), float("nan")], ""
    try:
        forward = peer.prepare(case, device)
        with peer.context():
            flashsdpa.reset_stats()
            forward(inputs)
            ms = triton.testing.do_bench(lambda: forward(inputs), warmup=25, rep=100, return_mode="median")
            rates[0] = case.flops("fwd") / ms * 1e-9
            out = forward(inputs)
            grad = lambda: torch.autograd.grad(out, leaves, inputs.grad_out, retain_graph=True)  # noqa: E731
            grad()
            ms = triton.testing.do_bench(grad, warmup=25, rep=100, return_mode="median")
            rates[1] = case.flops("bwd") / ms * 1e-9
            if peer.name in ("hopper", "triton") and (fallbacks := flashsdpa.stats()["fallbacks"]):
                note = "; ".join(fallbacks)[:120]
            del out
    except Exception as error:  # noqa: BLE001 - a peer that refuses a row is reported, not fatal
        note = f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
    return rates[0], rates[1], note


def timing(flex: bool, budget: float, start: float) -> None:
    device = torch.device("cuda")
    cases = [case for case in gpu_variant_cases() if case.head_dim == 128]
    names = ["hopper", "triton"] + (["flex"] if flex else [])
    results = {}
    inputs = {}
    for case in cases:
        inputs[case.name] = make_input_sets(case, device, 1, seed=7)[0]
        for peer in (PinnedFlashSdpa("hopper"), PinnedFlashSdpa("triton")):
            results[case.name, peer.name] = time_peer(peer, case, inputs[case.name], device)
            print(f"  {case.name} {peer.name}: {results[case.name, peer.name]}", flush=True)
    if flex:
        peer = FlexPeer("static")
        for case in cases:
            if time.time() - start > budget:
                results[case.name, "flex"] = (float("nan"), float("nan"), f"skipped: past the {budget:.0f} s budget")
                continue
            results[case.name, "flex"] = time_peer(peer, case, inputs[case.name], device)
            print(f"  {case.name} flex: {results[case.name, 'flex']}", flush=True)
    print("\nTFLOP/s (bf16, d=128, causal; median of do_bench); ratio = hopper / flex, hopper / triton")
    header = "".join(f"{name:>9}" for name in names)
    print(f"{'row':<36} {'fwd':>4}{header}{'/flex':>8}{'/triton':>8} {'bwd':>4}{header}{'/flex':>8}{'/triton':>8}")
    for case in cases:
        cells = []
        for mode in (0, 1):
            rates = [results[case.name, name][mode] for name in names]
            flex_rate = rates[2] if flex else float("nan")
            cells.append(f"{'':>4}" + "".join(f"{r:9.0f}" for r in rates) + f"{rates[0] / flex_rate:8.2f}"
                         f"{rates[0] / rates[1]:8.2f}")
        print(f"{case.name:<36} {cells[0]} {cells[1]}")
    for (row, name), (_, _, note) in results.items():
        if note:
            print(f"  note {row} {name}: {note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--triton-accuracy", action="store_true",
                        help="the triton backend's errors beside hopper's (compiles its kernels too: slower)")
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--budget", type=float, default=100.0, help="seconds after which Flex rows are skipped")
    args = parser.parse_args()
    start = time.time()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    if not args.skip_accuracy:
        accuracy(backends=("hopper", "triton") if args.triton_accuracy else ("hopper",))
    timing(not args.no_flex, args.budget, start)
    print(f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
