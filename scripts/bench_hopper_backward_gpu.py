"""The Hopper backward's candidate specs against the shipped one and cuDNN's: correctness, then backward TFLOP/s.

On an H100/H200: each of backward_specs.CANDIDATES and the shipped backward_specs.SPECS, errors against
float64, same bits, and backward-alone TFLOP/s on the four headline rows beside cuDNN's.

Run from the repo root on the GPU machine (under 2 minutes, most of it compiling):
    PYTHONPATH=src python scripts/bench_hopper_backward_gpu.py [--candidates stats,stats+pingpong,...] [--rows ...]
                                                                 [--reps 20] [--budget-s 110]

1. Check, each spec in its own child process, all at once, killed at the budget less the timing's share (a
   wrong ping-pong turn would hang): for "shipped" and each candidate, problems with partial blocks (plain and
   causal at d=64 and d=128, GQA with softcap at d=128) against a float64 formula, two calls for the same bits,
   and one backward of each headline row. A spec passes when every gradient's relative error is within 1.5x
   the same formula's in bf16 (the stand-in for torch's own error, as in tests/test_hopper.py's variant
   checks), the calls agree bit for bit, nothing fell back to triton, its bits equal the shipped spec's or
   its errors are within 1.25x of them, and it finished. Only passing specs are timed.
2. Timing (bf16, `flashsdpa bench`'s main cases: 16k tokens a batch, heads = 2048 / d): backward alone (each
   peer's forward graph kept; CUDA events around one `torch.autograd.grad` call, L2 cleared before each, peers
   interleaved call by call, median of --reps after warm-up). TFLOP/s count 2.5x the forward's products (the
   visible half when causal), as `flashsdpa bench` does.

The table comes last (also $OUT/bench_hopper_backward.txt when OUT is set). To ship a candidate, copy its fields
from backward_specs.CANDIDATES into backward_specs.SPECS (the table's ratio columns say where it wins).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import flashsdpa
from flashsdpa import gradient_precision
from flashsdpa.backends.base import poisoned_outputs
from flashsdpa.backends.hopper import backward_specs, launch_backward
from flashsdpa.descriptor import GradientPrecision

ROWS = "d128L4096,d128L16384c,d64L4096,d128L1024"
TOKENS, WIDTH = 16384, 2048  # flashsdpa.bench.cases: tokens a batch, heads * head_dim
SHIPPED = "shipped"
# (head_dim, heads_q, heads_kv, seq_q, seq_kv, causal, softcap), batch 1: lengths not a multiple of the 64/128-row
# blocks. The first three specialise the kernels as the rows d128L1024, d128L16384c and d64L4096 do (Triton
# compiles integers by divisibility by 16: heads, lengths, block counts), so that they add no compile; the last
# adds GQA and a score transform.
CHECK_PROBLEMS = ((128, 16, 16, 1040, 1040, False, None), (128, 16, 16, 2000, 2000, True, None),
                  (64, 32, 32, 2000, 2000, False, None), (128, 32, 16, 528, 400, False, 20.0))
STARTED = time.time()
TIMING_S = 25  # what the timing of the passed specs takes (4 rows, 20 calls each of 7 peers, and their forwards)


def parse_row(text: str) -> tuple[int, int, bool]:
    head_dim, length = text.removesuffix("c").removeprefix("d").split("L")
    return int(head_dim), int(length), text.endswith("c")


@contextlib.contextmanager
def gluon_backward(spec_name: str):
    """The hopper backend with its Gluon backward at every head dim the kernels take, built with a named spec,
    ROUNDED whatever torch's own backward would be for the call (EXACT calls, e.g. causal GQA on torch 2.11,
    otherwise go to triton's backward)."""
    enabled, default, precision = (backward_specs.GLUON_BACKWARD_HEAD_DIMS, launch_backward.backward_spec,
                                   gradient_precision.at_backward)
    backward_specs.GLUON_BACKWARD_HEAD_DIMS = backward_specs.BACKWARD_HEAD_DIMS
    candidate = None if spec_name == SHIPPED else spec_name
    launch_backward.backward_spec = functools.partial(backward_specs.backward_spec, candidate=candidate)
    gradient_precision.at_backward = lambda desc, inputs: GradientPrecision.ROUNDED
    try:
        with flashsdpa.use_backend("hopper"):
            yield
    finally:
        backward_specs.GLUON_BACKWARD_HEAD_DIMS, launch_backward.backward_spec = enabled, default
        gradient_precision.at_backward = precision


def inputs(head_dim, heads_q, heads_kv, seq_q, seq_kv, batch, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    make = lambda h, length: torch.randn(batch, h, length, head_dim, device="cuda", generator=gen)  # noqa: E731
    q, k, v = (make(h, length).bfloat16().requires_grad_()
               for h, length in ((heads_q, seq_q), (heads_kv, seq_kv), (heads_kv, seq_kv)))
    return q, k, v, make(heads_q, seq_q).bfloat16()


def hopper_forward(q, k, v, causal: bool, softcap=None):
    with flashsdpa.use_backend("hopper"):
        return flashsdpa.attention(q, k, v, causal=causal, softcap=softcap, enable_gqa=q.shape[1] != k.shape[1])


def formula_gradients(q, k, v, grad_out, causal: bool, softcap, dtype):
    """dq, dk, dv of the attention formula computed in `dtype` (float64: the truth; bfloat16: the bar's stand-in
    for torch's own error); causal is top-left aligned (key j visible to row i when j <= i)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    q_, k_, v_ = leaves
    group = q.shape[1] // k.shape[1]
    scores = q_ @ k_.repeat_interleave(group, 1).transpose(-1, -2) * q.shape[-1] ** -0.5
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if causal:
        rows, keys = torch.arange(q.shape[2], device="cuda"), torch.arange(k.shape[2], device="cuda")
        scores = scores.masked_fill(keys[None] > rows[:, None], float("-inf"))
    out = torch.softmax(scores, -1) @ v_.repeat_interleave(group, 1)
    return torch.autograd.grad(out, leaves, grad_out.to(dtype))


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def digest(tensors) -> str:
    """A fingerprint of the tensors' bits (the parent compares specs checked in different processes)."""
    hasher = hashlib.sha1()
    for tensor in tensors:
        hasher.update(tensor.contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return hasher.hexdigest()


def check(spec_name: str, rows: list[str]) -> None:
    """The child's work for one spec: one JSON line per problem, then per row, then {"done": spec}."""
    for number, (head_dim, hq, hkv, seq_q, seq_kv, causal, softcap) in enumerate(CHECK_PROBLEMS):
        q, k, v, grad_out = inputs(head_dim, hq, hkv, seq_q, seq_kv, 1, number)
        truth = formula_gradients(q, k, v, grad_out, causal, softcap, torch.float64)
        bf16 = formula_gradients(q, k, v, grad_out, causal, softcap, torch.bfloat16)
        bars = [1.5 * relative_error(g, t) for g, t in zip(bf16, truth)]
        flashsdpa.reset_stats()
        out = hopper_forward(q, k, v, causal, softcap)
        with gluon_backward(spec_name), poisoned_outputs():
            runs = [torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True) for _ in range(2)]
        errors = [relative_error(g, t) for g, t in zip(runs[0], truth)]
        same = all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
        fallbacks = flashsdpa.stats().get("fallbacks", {})
        ok = same and not fallbacks and all(e <= bar for e, bar in zip(errors, bars))
        print(json.dumps(dict(spec=spec_name, problem=CHECK_PROBLEMS[number], ok=ok,
                              errors=[float(f"{e:.3e}") for e in errors], bars=[float(f"{b:.3e}") for b in bars],
                              same_bits=same, digest=digest(runs[0]), fallbacks=fallbacks,
                              elapsed_s=round(time.time() - STARTED, 1))), flush=True)
        del q, k, v, grad_out, out, runs, truth, bf16
        torch.cuda.empty_cache()  # (one child a spec runs at once: each gives back its float64 references)
    for row in rows:  # one backward of each timed problem (compiles its kernels; a hang shows here)
        head_dim, length, causal = parse_row(row)
        q, k, v, grad_out = inputs(head_dim, WIDTH // head_dim, WIDTH // head_dim, length, length,
                                   TOKENS // length, 0)
        out = hopper_forward(q, k, v, causal)
        with gluon_backward(spec_name):
            grads = torch.autograd.grad(out, (q, k, v), grad_out)
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
        print(json.dumps(dict(spec=spec_name, row=row, ok=finite, elapsed_s=round(time.time() - STARTED, 1))),
              flush=True)
        del q, k, v, grad_out, out, grads
    print(json.dumps(dict(done=spec_name)), flush=True)


def run_check(spec_names: list[str], rows: str, limit: float) -> tuple[list[str], list[dict], list[str]]:
    """Each spec checked in its own child process, all at once (Gluon compiles are single-threaded: the check
    takes about the longest spec's compiles), each killed at `limit` seconds: (the specs that passed, the
    children's JSON lines, notes on children that failed or were killed)."""
    children = {name: subprocess.Popen([sys.executable, __file__, "--check", "--candidates", name, "--rows", rows],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for name in spec_names}
    deadline, results, notes = time.time() + limit, [], []
    for name, child in children.items():
        try:
            stdout, stderr = child.communicate(timeout=max(1.0, deadline - time.time()))
            if child.returncode:
                notes.append(f"{name}: exit {child.returncode}: {stderr[-1500:]}")
        except subprocess.TimeoutExpired:
            child.kill()
            stdout, _ = child.communicate()
            notes.append(f"{name}: killed after {limit:.0f} s (a hang, or compiles past the limit)")
        results += [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    # A spec that only moves data or reorders issues gives the shipped spec's bits; one that regroups a sum (e.g.
    # dq_block_n) must stay within 1.25x the shipped spec's errors.
    shipped = {tuple(r["problem"]): r for r in results if r.get("spec") == SHIPPED and "problem" in r}
    for r in results:
        if "problem" in r and tuple(r["problem"]) in shipped:
            reference = shipped[tuple(r["problem"])]
            r["bits_as_shipped"] = r["digest"] == reference["digest"]
            if not r["bits_as_shipped"] and any(e > 1.25 * s for e, s in zip(r["errors"], reference["errors"])):
                r["ok"] = False
    passed = [name for name in spec_names if {"done": name} in results
              and all(r["ok"] for r in results if r.get("spec") == name)]
    return passed, results, notes


@contextlib.contextmanager
def cudnn():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        yield


def median_ms(calls: dict, reps: int, flush: torch.Tensor) -> dict[str, float]:
    """Median ms of each call, the calls interleaved, L2 cleared before each (outside the events)."""
    times = {name: [] for name in calls}
    for rep in range(reps + 3):
        for name, call in calls.items():
            flush.zero_()
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            call()
            end.record()
            end.synchronize()
            if rep >= 3:  # warm-up
                times[name].append(begin.elapsed_time(end))
    return {name: sorted(values)[len(values) // 2] for name, values in times.items()}


def bench(rows: list[str], spec_names: list[str], reps: int) -> list[str]:
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    names = [*spec_names, "cudnn"]
    lines = [f"{'row':<12}" + "".join(f"{name:>16}" for name in names)]
    ratios = [f"{'vs cudnn':<12}" + "".join(f"{'':>16}" for _ in names)]
    for row in rows:
        head_dim, length, causal = parse_row(row)
        heads, batch = WIDTH // head_dim, TOKENS // length
        q, k, v, grad_out = inputs(head_dim, heads, heads, length, length, batch, length + head_dim)
        leaves = (q, k, v)
        hopper_out = hopper_forward(q, k, v, causal)
        with cudnn():
            cudnn_out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

        def call(name):
            if name == "cudnn":
                with cudnn():
                    return torch.autograd.grad(cudnn_out, leaves, grad_out, retain_graph=True)
            with gluon_backward(name):
                return torch.autograd.grad(hopper_out, leaves, grad_out, retain_graph=True)

        ms = median_ms({name: functools.partial(call, name) for name in names}, reps, flush)
        flops = 2.5 * 4 * batch * heads * length * length * head_dim * (0.5 if causal else 1.0)
        lines.append(f"{row:<12}" + "".join(f"{flops / ms[name] * 1e-9:16.0f}" for name in names))
        ratios.append(f"{row:<12}" + "".join(f"{ms['cudnn'] / ms[name]:16.3f}" for name in names))
        print(lines[-1], "|", ratios[-1][12:], flush=True)
        del q, k, v, grad_out, hopper_out, cudnn_out
        torch.cuda.empty_cache()
    return ["backward alone, TFLOP/s (bf16, CUDA events, median)", *lines,
            "speed over cuDNN (its ms / each one's ms)", *ratios[1:]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", default=",".join(backward_specs.CANDIDATES),
                        help=f"comma-separated, of {', '.join(backward_specs.CANDIDATES)} (the shipped spec always)")
    parser.add_argument("--rows", default=ROWS)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--budget-s", type=float, default=110,
                        help=f"the whole run's; the check gets all but {TIMING_S} s (its children are killed then)")
    parser.add_argument("--check", action="store_true", help="(the child process's part)")
    args = parser.parse_args()
    spec_names = [name for name in args.candidates.split(",") if name]
    if args.check:
        check(spec_names[0], args.rows.split(","))
        return 0
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "cudnn", torch.backends.cudnn.version(),
          flush=True)
    unknown = [name for name in spec_names if name not in backward_specs.CANDIDATES]
    if unknown:
        raise SystemExit(f"unknown candidates {unknown}; backward_specs.CANDIDATES: {list(backward_specs.CANDIDATES)}")
    passed, results, notes = run_check([SHIPPED, *spec_names], args.rows, args.budget_s - TIMING_S)
    check_lines = ["check (errors dq/dk/dv against float64 | bars: 1.5x the formula's in bf16):"]
    for r in results:
        if "problem" in r:
            d, hq, hkv, seq_q, seq_kv, causal, softcap = r["problem"]
            what = f"d={d} {hq}/{hkv} {seq_q}x{seq_kv}{' causal' if causal else ''}{' softcap' if softcap else ''}"
            check_lines.append(
                f"  {r['spec']:<16} {what:<30} {'ok ' if r['ok'] else 'BAD'} "
                + "/".join(f"{e:.2e}" for e in r["errors"]) + " | " + "/".join(f"{b:.2e}" for b in r["bars"])
                + f" bits {'same' if r['same_bits'] else 'DIFF'}{', = shipped' if r.get('bits_as_shipped') else ''}"
                + (f" fallbacks {r['fallbacks']}" if r["fallbacks"] else ""))
        elif "row" in r and not r["ok"]:
            check_lines.append(f"  {r['spec']:<16} {r['row']}: non-finite gradients")
    check_lines += [f"  passed: {', '.join(passed) or 'none'}", *(f"  {note}" for note in notes)]
    print("\n".join(check_lines), flush=True)
    summary = ["check, per spec: passed?, worst error / bar over the problems, problems with the shipped bits"]
    for name in [SHIPPED, *spec_names]:
        mine = [r for r in results if r.get("spec") == name and "problem" in r]
        worst = max((e / b for r in mine for e, b in zip(r["errors"], r["bars"])), default=float("nan"))
        summary.append(f"  {name:<16} {'passed' if name in passed else 'FAILED'}  {worst:5.2f}  "
                       f"{sum(bool(r.get('bits_as_shipped')) for r in mine)}/{len(mine)}")
    table = bench(args.rows.split(","), [name for name in [SHIPPED, *spec_names] if name in passed], args.reps)
    table.append(f"({time.time() - STARTED:.0f} s)")
    report = "\n".join(["", *summary, *(f"  {note}" for note in notes), "", *table])
    print(report, flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_hopper_backward.txt").write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
