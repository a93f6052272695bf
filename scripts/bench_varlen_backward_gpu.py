"""The triton packed (varlen) backward's tile candidates and sequence order on a GPU, against torch's varlen_attn.

Run from the repo root on the GPU machine (about 1.5 minutes, compiles included):
    PYTHONPATH=src python scripts/bench_varlen_backward_gpu.py [--budget-s SECONDS] [--d 128,64]

Timing: the bench's varlen rows (`flashsdpa.bench.cases.kv_layout_cases`: lengths 1..8192, 16,404 tokens,
B=10, H=16, causal, bf16, d=128 and d=64), the backward alone (each peer's forward graph kept; `torch.autograd.grad`
of the packed output, host path included, as the bench times it), median of triton.testing.do_bench (L2
cleared before each call), TFLOP/s on real tokens (the bench's `Case.flops`). Rows: `current` is the
tiles and order before this script's candidates (the given sequence order); `default` what
`backward_config` gives now; each candidate swaps the ROUNDED packed table's (dK/dV tile, dQ tile) and the
sequence order (`BackwardConfig.packed_longest_first`); `torch-varlen` is torch's varlen_attn (FlashAttention
2) on the same inputs. The dq / dkdv columns are each kernel's GPU time (torch profiler, mean of 5 calls), so
the best dK/dV tile and the best dQ tile can be read apart: the candidates pair them so each appears once.

Correctness first: a small packed batch (lengths 1, 37, 300, 5, 130; H=16; causal, and not for the default and
current configurations; bf16) through every configuration, and the default with a window and softcap, against
the float64 reference backend: the relative Frobenius error of dq, dk, dv beside torch varlen_attn's own on the
same inputs ("!" where ours passes 1.5x torch's + 1e-3, or 2e-2 with the variants, or bits differ), and whether two calls, and the given and longest-first orders, give the same
bits. These run in --workers processes at once, so the kernels compile in parallel into Triton's cache, which
the timing then reads.

Writes $OUT/varlen_backward.json (every figure) when $OUT is set. To adopt a winner: copy its "table"
entry into backward_configs.SM90_16BIT_PACKED_ROUNDED[d]; its order into SM90_PACKED_LONGEST_FIRST.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import subprocess
import sys
import time

import torch
import triton

import flashsdpa
from flashsdpa.backends.triton import launch_backward
from flashsdpa.backends.triton.backward_configs import TileShape
from flashsdpa.bench.cases import kv_layout_cases, make_input_sets
from flashsdpa.cache import kernel_cache
from flashsdpa.descriptor import GradientPrecision

# "cpu" (with TRITON_INTERPRET=1): a smoke test of this script on tiny problems (no timing worth reading).
DEVICE = os.environ.get("VARLEN_BWD_DEVICE", "cuda")
SMOKE = DEVICE == "cpu"

# Before this script: the ROUNDED packed tiles by head dim, given sequence order.
CURRENT = {128: ((64, 64, 8, 2), (128, 32, 8, 3)), 64: ((64, 64, 4, 2), (64, 64, 4, 3))}
# (dK/dV tile, dQ tile) candidates, longest first, each with no spill and no replicated product in compile_sm90
# (VARLEN, bf16, sm_90; see the table's comment in backward_configs) but where said. Every dK/dV and dQ tile
# appears at least once; first ones first (--budget-s). OPTIONS: other BackwardConfig fields for one candidate,
# by index.
CANDIDATES = {
    128: [((32, 128, 8, 2), (128, 64, 8, 2)),
          # the tiles before, longest first: what the order alone is worth
          ((64, 64, 8, 2), (128, 32, 8, 3)),
          ((32, 128, 8, 3), (128, 32, 8, 3)), ((32, 128, 8, 2), (128, 32, 8, 4)), ((32, 128, 8, 2), (64, 32, 4, 3)),
          # dK/dV without the early dP^T product (248 / 232 registers, no spill)
          ((32, 128, 8, 2), (128, 64, 8, 2)),
          # the dense ROUNDED table's dK/dV tile: spills 124 B causal under VARLEN (not to adopt as it is; it
          # says what the larger key block would be worth)
          ((64, 128, 8, 2), (128, 64, 8, 2))],
    64: [((64, 64, 4, 2), (64, 64, 4, 3)), ((64, 128, 8, 2), (128, 64, 8, 3)), ((64, 64, 4, 2), (128, 32, 8, 3))],
}
OPTIONS = {(128, 5): dict(dkdv_early_dp=False)}
SPILLING = {(128, 6)}  # candidates timed for information, never recommended
ACCURACY_LENGTHS = (1, 37, 20, 5) if SMOKE else (1, 37, 300, 5, 130)
ACCURACY_HEADS = 2 if SMOKE else 16


def tile_name(tile) -> str:
    m, n, w, s = tile
    return f"{m}x{n}w{w}s{s}"


def use_tiles(tiles, longest_first: bool | None, options: dict | None = None) -> None:
    """Make the packed backward take `tiles` (dK/dV, dQ), `longest_first` and `options` (BackwardConfig
    fields); tiles None: backward_config's own."""
    launch_backward.backward_config = ORIGINAL_CONFIG if tiles is None else (
        lambda *args: _replaced(ORIGINAL_CONFIG(*args), tiles, longest_first, options or {}, packed=args[-1]))
    kernel_cache.clear()


def _replaced(config, tiles, longest_first, options, packed):
    if not packed:
        return config
    return dataclasses.replace(config, dkdv=TileShape(*tiles[0]), dq=TileShape(*tiles[1]),
                               packed_longest_first=longest_first, **options)


ORIGINAL_CONFIG = launch_backward.backward_config


def torch_varlen(q, k, v, cu, longest, causal):
    """torch's varlen_attn (CUDA only); None on the CPU."""
    from torch.nn.attention.varlen import varlen_attn

    if SMOKE:
        return None

    parameters = inspect.signature(varlen_attn).parameters
    keywords = {"window_size": (-1, 0) if causal else (-1, -1)} if "window_size" in parameters else {
        "is_causal": causal}
    return varlen_attn(q, k, v, cu, cu, longest, longest, **keywords)


def relative_error(got, ref) -> float:
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    return float((got - ref).norm() / ref.norm())


def accuracy_task(d: int, causal: bool, name: str, tiles, longest_first, options, call=None) -> dict:
    """One configuration on a small packed batch (H=16, as the bench: the kernels compile as the timed ones do,
    so this also fills Triton's cache for the timing), against float64; same bits on a second call, and
    (longest first) as the given order's. `call`: varlen_attn's variant arguments (window_size, softcap)."""
    call = call or {}
    gen = torch.Generator(device=DEVICE).manual_seed(d + causal)
    lengths = ACCURACY_LENGTHS
    cu = torch.tensor((0, *lengths), device=DEVICE).cumsum(0).to(torch.int32)
    total, longest, heads = sum(lengths), max(lengths), ACCURACY_HEADS
    q, k, v, grad = (torch.randn(total, heads, d, device=DEVICE, generator=gen).to(torch.bfloat16) for _ in range(4))
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    leaves64 = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    ref_out = flashsdpa.varlen_attn(*leaves64, cu.cpu(), cu.cpu(), longest, longest, causal=causal,
                                    backend="reference", **call)  # fmt: skip
    ref = torch.autograd.grad(ref_out, leaves64, grad.double().cpu())
    try:  # torch's own error on the same inputs, the bar's base (inf where its varlen_attn cannot run)
        torch_out = None if call else torch_varlen(*leaves, cu, longest, causal)
        torch_err = [float("inf")] * 3 if torch_out is None else [
            relative_error(g, r) for g, r in zip(torch.autograd.grad(torch_out, leaves, grad), ref)]
    except (RuntimeError, NotImplementedError, TypeError) as error:
        print(f"accuracy: torch varlen_attn failed: {type(error).__name__}: {str(error)[:200]}", flush=True)
        torch_err = [float("inf")] * 3

    def gradients(order):
        use_tiles(tiles, order, options)
        out = flashsdpa.varlen_attn(*leaves, cu, cu, longest, longest, causal=causal, backend="triton", **call)
        return torch.autograd.grad(out, leaves, grad, retain_graph=True), torch.autograd.grad(out, leaves, grad)

    first, again = gradients(longest_first)
    errors = [relative_error(g, r) for g, r in zip(first, ref)]
    same_bits = all(torch.equal(a, b) for a, b in zip(first, again))
    order_bits = None
    if tiles is not None and longest_first:
        order_bits = all(torch.equal(a, b) for a, b in zip(first, gradients(False)[0]))
    bars = [2e-2] * 3 if call else [1.5 * t + 1e-3 for t in torch_err]
    flagged = any(e > bar for e, bar in zip(errors, bars)) or not same_bits or order_bits is False
    return dict(d=d, causal=causal, config=name, dq=errors[0], dk=errors[1], dv=errors[2], torch=torch_err,
                same_bits=same_bits, order_bits=order_bits, flagged=flagged)


def accuracy_tasks(head_dims) -> list[tuple]:
    """(d, causal, name, tiles, longest_first): every configuration causal (the timed rows' kernels), the
    default and current ones not causal too."""
    tasks = [(d, causal, *config) for d in head_dims for config in configurations(d)
             for causal in ((True, False) if config[1] is None or not config[2] else (True,))]
    # The default's dK/dV tile with a window and softcap (no torch peer: the bar is the bf16 one, 2e-2)
    return tasks + [(d, True, "default window 64 + softcap 20", None, None, {},
                     dict(window_size=(64, 0), softcap=20.0)) for d in head_dims]


def accuracy(head_dims, workers: int, timeout_s: float) -> list[dict]:
    """The accuracy tasks in `workers` processes at once (compiles in parallel; they fill Triton's cache); a
    worker still running after timeout_s is stopped (its rows so far are kept)."""
    tasks = accuracy_tasks(head_dims)
    workers = max(1, min(workers, len(tasks)))
    command = [sys.executable, __file__, "--d", ",".join(map(str, head_dims)), "--worker"]
    processes = [subprocess.Popen([*command, f"{i}/{workers}"], stdout=subprocess.PIPE, text=True)
                 for i in range(workers)]
    rows = []
    deadline = time.time() + timeout_s
    for process in processes:
        try:
            output, _ = process.communicate(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
            print(f"accuracy: a worker ran past {timeout_s:.0f} s and was stopped")
        for line in output.splitlines():
            if line.startswith("ACCURACY "):
                rows.append(json.loads(line[len("ACCURACY "):]))
            else:
                print(line)
    for row in sorted(rows, key=lambda row: (-row["d"], row["config"], not row["causal"])):
        e, t = (row["dq"], row["dk"], row["dv"]), row["torch"]
        print(f"accuracy d={row['d']} causal={row['causal']:d} {row['config']:<50} dq/dk/dv {e[0]:.2e} {e[1]:.2e} "
              f"{e[2]:.2e} (torch {t[0]:.2e} {t[1]:.2e} {t[2]:.2e}) bits: repeat {row['same_bits']} "
              f"order {row['order_bits']}{' !' if row['flagged'] else ''}", flush=True)
    if len(rows) != len(tasks):
        print(f"accuracy: {len(tasks) - len(rows)} of {len(tasks)} tasks gave no row (see the workers' errors)")
    return rows


def worker(shard: str, head_dims) -> None:
    index, count = map(int, shard.split("/"))
    for task in accuracy_tasks(head_dims)[index::count]:
        try:
            print("ACCURACY " + json.dumps(accuracy_task(*task)), flush=True)
        except Exception as error:  # noqa: BLE001 - reported, the other tasks go on
            print(f"accuracy task {task[:3]} failed: {type(error).__name__}: {str(error)[:300]}", flush=True)


def kernel_times(run) -> dict:
    """Mean GPU ms a call of each backward kernel (torch profiler, 5 calls)."""
    from torch.profiler import ProfilerActivity, profile

    if SMOKE:
        return {"dq": 0.0, "dkdv": 0.0, "other": 0.0}
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            run()
        torch.cuda.synchronize()
    times = {"dq": 0.0, "dkdv": 0.0, "other": 0.0}
    for event in prof.key_averages():
        part = "dq" if "backward_dq" in event.key else "dkdv" if "backward_dkdv" in event.key else "other"
        times[part] += event.device_time_total / 5 / 1000
    return times


def timing(head_dims, deadline: float) -> list[dict]:
    rows = []
    cases = {case.head_dim: case for case in kv_layout_cases() if case.group == "varlen"}
    for d in head_dims:
        case = cases[d]
        if SMOKE:
            case = dataclasses.replace(next(c for c in kv_layout_cases(smoke=True, device_type="cpu")
                                            if c.group == "varlen"), head_dim=d)  # fmt: skip
        inputs = make_input_sets(case, torch.device(DEVICE), 1, seed=0)[0]
        leaves, cu, longest = inputs.differentiable, inputs.cu_seqlens, case.seq_kv
        flops = case.flops("bwd")

        def measure(name, forward, table=None, order=None, options=None):
            try:
                timed(name, forward, table, order, options)
            except Exception as error:  # noqa: BLE001 - one failed configuration leaves the others' rows
                print(f"time d={d} {name}: failed: {type(error).__name__}: {str(error)[:300]}", flush=True)

        def timed(name, forward, table, order, options):
            out = forward()
            run = lambda: torch.autograd.grad(out, leaves, inputs.grad_out, retain_graph=True)  # noqa: E731
            run()  # compile
            if SMOKE:
                begin = time.perf_counter()
                run()
                ms = (time.perf_counter() - begin) * 1e3
            else:
                ms = triton.testing.do_bench(run, warmup=10, rep=60, return_mode="median")
            parts = kernel_times(run)
            row = dict(d=d, config=name, ms=ms, tflops=flops / ms * 1e-9, table=table, longest_first=order,
                       options=options or {}, **parts)
            rows.append(row)
            print(f"time d={d} {name:<50} {ms:7.3f} ms {row['tflops']:6.1f} TFLOP/s (dq {parts['dq']:.3f}, "
                  f"dkdv {parts['dkdv']:.3f}, other {parts['other']:.3f} ms)", flush=True)

        if not SMOKE:
            measure("torch-varlen", lambda: torch_varlen(*leaves, cu, longest, True))
        for name, tiles, longest_first, options in configurations(d):
            if time.time() > deadline and name != "default":
                print(f"time d={d} {name}: skipped (budget)", flush=True)
                continue
            use_tiles(tiles, longest_first, options)
            measure(name, lambda: flashsdpa.varlen_attn(*leaves, cu, cu, longest, longest, causal=True,
                                                        backend="triton"), tiles, longest_first, options)
        use_tiles(None, None)
    return rows


def configurations(d):
    """(name, tiles or None for backward_config's own, longest_first, options) to run at head dim d."""
    current = CURRENT[d]
    rows = [("default", None, None, {}),
            (f"current {tile_name(current[0])}/{tile_name(current[1])} given", current, False, {})]
    for index, tiles in enumerate(CANDIDATES[d]):
        options = OPTIONS.get((d, index), {})
        extra = "".join(f" {name}={value}" for name, value in options.items()) + (
            " (spills)" if (d, index) in SPILLING else "")
        rows.append((f"{tile_name(tiles[0])}/{tile_name(tiles[1])} longest{extra}", tiles, True, options))
    return rows


def summary(rows, precision) -> None:
    print(f"\nsummary (backward TFLOP/s on real tokens, bf16 causal varlen rows; packed precision {precision})")
    print(f"{'d':>4} {'configuration':<50} {'ms':>7} {'TFLOP/s':>8} {'vs torch':>8} {'dq ms':>7} {'dkdv ms':>8}")
    for d in sorted({row["d"] for row in rows}, reverse=True):
        group = [row for row in rows if row["d"] == d]
        peer = next((row["ms"] for row in group if row["config"] == "torch-varlen"), None)
        for row in group:
            ratio = f"{peer / row['ms']:.2f}x" if peer else "-"
            print(f"{d:>4} {row['config']:<50} {row['ms']:7.3f} {row['tflops']:8.1f} {ratio:>8} {row['dq']:7.3f} "
                  f"{row['dkdv']:8.3f}")
        ours = [row for row in group if row["table"] is not None and "(spills)" not in row["config"]]
        if ours:
            best_dq = min(ours, key=lambda row: row["dq"])
            best_dkdv = min(ours, key=lambda row: row["dkdv"])
            best = min(ours, key=lambda row: row["ms"])
            print(f"{d:>4} best whole: {best['config']}; fastest dK/dV kernel in {best_dkdv['config']}, fastest dQ "
                  f"kernel in {best_dq['config']} -> SM90_16BIT_PACKED_ROUNDED[{d}] = "
                  f"({best_dkdv['table'][0]}, {best_dq['table'][1]})"
                  + (f", and {best_dkdv['options']}" if best_dkdv["options"] else ""))
            given = [row for row in ours if row["longest_first"] is False]
            same = [row for row in ours if row["longest_first"] and given and row["table"] == given[0]["table"]
                    and not row["options"]]
            if same:
                print(f"{d:>4} longest first {same[0]['ms']:.3f} ms against the given order's {given[0]['ms']:.3f} "
                      f"-> SM90_PACKED_LONGEST_FIRST = {same[0]['ms'] < given[0]['ms']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=100.0, help="skip candidates' timings after this")
    parser.add_argument("--d", default="128,64", help="head dims, comma-separated (128, 64)")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--workers", type=int, default=18, help="accuracy processes at once (compiles in parallel)")
    parser.add_argument("--accuracy-s", type=float, default=60.0, help="stop the accuracy processes after this")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # i/N: run the i-th share of the accuracy tasks
    args = parser.parse_args()
    start = time.time()
    head_dims = [int(d) for d in args.d.split(",")]
    if args.worker:
        return worker(args.worker, head_dims)
    device_name = "cpu (smoke test)" if SMOKE else torch.cuda.get_device_name()
    print(device_name, torch.__version__, triton.__version__, flush=True)
    probe = ORIGINAL_CONFIG(next(c for c in kv_layout_cases() if c.group == "varlen").descriptor.kernel_key,
                            None if SMOKE else torch.cuda.get_device_capability(), GradientPrecision.ROUNDED, True)
    print(f"backward_config (ROUNDED, packed, d=128): {probe}", flush=True)
    accuracy_rows = [] if args.skip_accuracy else accuracy(head_dims, args.workers, args.accuracy_s)
    print(f"({time.time() - start:.0f} s)", flush=True)
    # The precision the packed backward runs at for the bench's inputs (torch's own choice: gradient_precision).
    seen = []
    original = launch_backward.gradient_precision.at_backward

    def spy(desc, inputs):
        seen.append(original(desc, inputs))
        return seen[-1]

    launch_backward.gradient_precision.at_backward = spy
    timing_rows = timing(head_dims, start + args.budget_s)
    launch_backward.gradient_precision.at_backward = original
    precision = sorted({p.value for p in seen})
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "varlen_backward.json"), "w") as file:
            json.dump(dict(device=device_name, torch=torch.__version__, triton=triton.__version__,
                           precision=precision, accuracy=accuracy_rows, timing=timing_rows,
                           seconds=time.time() - start), file, indent=1, default=str)
    flagged = [row for row in accuracy_rows if row["flagged"]]
    print(f"\naccuracy: {len(accuracy_rows)} rows, {len(flagged)} flagged"
          + "".join(f"\n  FLAGGED d={r['d']} causal={r['causal']:d} {r['config']}" for r in flagged))
    summary(timing_rows, precision)
    print(f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
