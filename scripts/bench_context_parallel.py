"""Context parallelism on several GPUs: ring attention against one GPU and against all-gathered K/V.

    torchrun --nproc-per-node 8 scripts/bench_context_parallel.py            # the table (NCCL)
    torchrun --nproc-per-node 8 scripts/bench_context_parallel.py --check    # gradients vs one GPU first
    torchrun --nproc-per-node 8 scripts/bench_context_parallel.py --profile  # + share of comm hidden
    torchrun --nproc-per-node 2 scripts/bench_context_parallel.py --smoke    # CPU (gloo), tiny sizes
    python scripts/bench_context_parallel.py --simulate 8                    # one GPU, no torchrun: below

Problem: B=1, bf16, d=128, GQA 32 query / 8 key-value heads, total lengths 32k..1M, causal (zigzag) and
not. For each: forward and forward+backward time of
  ring       flashsdpa.distributed.ring_attention (K/V around the ring, overlapped with compute);
  allgather  the Llama 3 variant: all-gather K/V (unshard_sequence), then flashsdpa.attention locally
             (causal zigzag: each query chunk attends the keys before it in full and its own chunk
             causally, merged by merge_attention; forward only, "-" for its backward: flashsdpa's lse
             carries no gradient, and one call would need bottom-right causal alignment);
  one GPU    flashsdpa.attention on the whole sequence on rank 0, where it fits (--one-gpu-max).
Time is the median over runs of the slowest rank's time. TFLOP/s per GPU counts 4 * B * Hq * L^2 * d
for the forward (half of it causal) and 2.5x that for the backward, over the GPU count; efficiency is a
per-GPU figure over the one-GPU figure at the same total length. --profile adds, from a torch.profiler
trace of one ring forward+backward on rank 0, the share of the communication kernels' time that ran
while a compute kernel ran. Peak memory is rank 0's torch.cuda.max_memory_allocated over the ring runs
(its slices, their gradients and the ring's buffers: O(L/GPU)).

--simulate W runs every rank's ring steps in turn in one process (the same block functions and merge
as ring_attention, without the exchanges) and prints the errors of outputs and gradients against one
device's flashsdpa (16-bit: its ROUNDED backward, what torch's fused kernels compute) and float64: a
check of the ring's arithmetic on one GPU's real kernels.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

import flashsdpa
from flashsdpa.bench.environment import collect, headline
from flashsdpa.distributed import ring_attention, ring_traffic, shard_sequence, unshard_sequence
from flashsdpa.distributed.layout import Layout, chunks_of


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="32768,65536,131072,262144,524288,1048576",
                        help="total sequence lengths (comma-separated)")
    parser.add_argument("--heads", default="32,8", help="query heads, key/value heads")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--causal", default="1,0", help="which of causal (1) and not (0) to run")
    parser.add_argument("--one-gpu-max", type=int, default=262144, help="longest total length run on one GPU")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--check", action="store_true", help="first compare outputs and gradients with one GPU")
    parser.add_argument("--profile", action="store_true", help="measure the share of communication hidden")
    parser.add_argument("--smoke", action="store_true", help="CPU (gloo) at tiny sizes: the script runs")
    parser.add_argument("--simulate", type=int, default=0, metavar="W",
                        help="one process: every rank's ring steps in turn, errors vs one device (no torchrun)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.lengths, args.heads, args.head_dim, args.reps, args.one_gpu_max = "64", "4,2", 16, 2, 64
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.heads = tuple(int(x) for x in args.heads.split(","))
    args.causal = [bool(int(x)) for x in args.causal.split(",")]
    args.dtype = getattr(torch, args.dtype)
    return args


class Bench:
    def __init__(self, args):
        self.args = args
        cuda = torch.cuda.is_available() and not args.smoke
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo")
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def slowest_median_ms(self, fn, everyone=True) -> float:
        """Median over runs of the time of `fn`, the slowest rank's (everyone=False: this rank's alone)."""
        fn()  # warm-up (compiles)
        times = []
        for _ in range(self.args.reps):
            self.sync()
            if everyone:
                dist.barrier()
            started = time.perf_counter()
            fn()
            self.sync()
            times.append((time.perf_counter() - started) * 1e3)
        median = torch.tensor([statistics.median(times)], dtype=torch.float64, device=self.device)
        if everyone:
            dist.all_reduce(median, op=dist.ReduceOp.MAX)
        return median.item()

    def problem(self, length, requires_grad):
        heads_q, heads_kv = self.args.heads
        gen = torch.Generator(device=self.device).manual_seed(length)
        shape = lambda h: (1, h, length, self.args.head_dim)  # noqa: E731
        tensors = [torch.randn(shape(h), generator=gen, device=self.device, dtype=self.args.dtype)
                   for h in (heads_q, heads_kv, heads_kv)]
        return [t.requires_grad_(requires_grad) for t in tensors]

    def local(self, tensors, requires_grad):
        return [shard_sequence(t.detach(), layout="zigzag").clone().requires_grad_(requires_grad) for t in tensors]

    def random_slices(self, length, requires_grad):
        """This rank's slices of a problem of total length `length` (random data: for timing only)."""
        return self.problem(length // self.world, requires_grad)


def flops(args, length, causal, backward) -> float:
    forward = 4.0 * args.heads[0] * length * length * args.head_dim * (0.5 if causal else 1.0)
    return forward * (3.5 if backward else 1.0)


def allgather_attention(q, k, v, causal, world, rank):
    """Llama 3's variant: every rank gathers the whole K/V, then attends its zigzag query chunks locally."""
    keys, values = unshard_sequence(k, layout="zigzag"), unshard_sequence(v, layout="zigzag")
    if not causal:
        return flashsdpa.attention(q, keys, values, enable_gqa=True)
    chunk = q.shape[-2] // 2
    outs = []
    for i, c in enumerate(chunks_of(Layout.ZIGZAG, rank, world)):
        rows, start = q[..., i * chunk:(i + 1) * chunk, :], c * chunk
        own = flashsdpa.attention(rows, keys[..., start:start + chunk, :], values[..., start:start + chunk, :],
                                  causal=True, enable_gqa=True, return_lse=True)
        if start == 0:
            outs.append(own[0])
            continue
        before = flashsdpa.attention(rows, keys[..., :start, :], values[..., :start, :], enable_gqa=True,
                                     return_lse=True)
        outs.append(flashsdpa.merge_attention([before[0], own[0]], [before[1], own[1]])[0])
    return torch.cat(outs, dim=-2)


def hidden_share(bench, fn) -> float | None:
    """Of the communication kernels' GPU time in one run of `fn` (rank 0), the share overlapped by compute."""
    if bench.device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        bench.sync()
    comm, compute = [], []
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        span = (event.time_range.start, event.time_range.end)
        (comm if "nccl" in event.name.lower() else compute).append(span)

    def union(spans):
        merged = []
        for start, end in sorted(spans):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        return merged

    comm, compute = union(comm), union(compute)
    total = sum(e - s for s, e in comm)
    if total == 0:
        return None
    overlap = sum(max(0, min(e1, e2) - max(s1, s2)) for s1, e1 in comm for s2, e2 in compute)
    return overlap / total


def check(bench) -> None:
    """Outputs and gradients of ring attention equal one device's flashsdpa (relative error, bar as in tests)."""
    args = bench.args
    length = 2 * bench.world * (8 if args.smoke else 1024)
    for causal in args.causal:
        whole = bench.problem(length, True)
        gen = torch.Generator(device=bench.device).manual_seed(1)  # the same on every rank
        grad = torch.randn(whole[0].shape, generator=gen, device=bench.device, dtype=args.dtype)
        ref = flashsdpa.attention(*whole, causal=causal, enable_gqa=True)
        ref.backward(grad)
        local = bench.local(whole, True)
        out = ring_attention(*local, causal=causal, enable_gqa=True)
        out.backward(shard_sequence(grad, layout="zigzag"))
        errors = []
        for name, mine, theirs in zip(("out", "dq", "dk", "dv"), (out, *(t.grad for t in local)),
                                      (ref, *(t.grad for t in whole))):
            mine = unshard_sequence(mine.contiguous(), layout="zigzag").double()
            errors.append(f"{name} {((mine - theirs.double()).norm() / theirs.double().norm()).item():.2e}")
        if bench.rank == 0:
            print(f"check L={length} causal={int(causal)} vs one device: " + ", ".join(errors), flush=True)


def simulate(args) -> None:
    """Every rank's forward and backward ring steps in one process; errors against one device and float64."""
    from flashsdpa import gradient_precision
    from flashsdpa.descriptor import GradientPrecision
    from flashsdpa.distributed import ring
    from flashsdpa.distributed.layout import visible_block
    from flashsdpa.distributed.sharding import _slice_of

    world = args.simulate
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    length = min(args.lengths) if args.smoke else 4096
    heads_q, heads_kv = args.heads
    for dtype in ([args.dtype, torch.float32] if args.dtype != torch.float32 else [torch.float32]):
        for layout in (Layout.ZIGZAG, Layout.CONTIGUOUS):
            for causal in args.causal:
                gen = torch.Generator(device=device).manual_seed(0)
                q, k, v, grad = (torch.randn(1, h, length, args.head_dim, generator=gen, device=device).to(dtype)
                                 for h in (heads_q, heads_kv, heads_kv, heads_q))
                part = lambda t, r: _slice_of(t, layout, r, world)  # noqa: E731
                seq_local, acc = length // world, torch.float32
                path_a = device.type == "cuda" and dtype != torch.float32
                spec = ring.RingSpec(ring.Ring(None, 0, world), layout, causal, args.head_dim ** -0.5,
                                     heads_q != heads_kv, None, "ieee", dtype if path_a else acc)
                outs, lses = [], []
                for r in range(world):
                    out = lse = None
                    for step in range(world):
                        s = (r - step) % world
                        block = visible_block(layout, causal, r, s, seq_local)
                        if block is None:
                            continue
                        part_out, part_lse = ring.attend_block(part(q, r), part(k, s), part(v, s), None, block, spec)
                        if out is None:
                            out, lse = part_out.to(acc), part_lse
                        else:
                            rows = block.query_rows
                            out[..., rows, :], lse[..., rows] = flashsdpa.merge_attention(
                                [out[..., rows, :], part_out], [lse[..., rows], part_lse], out_dtype=acc)
                    outs.append(out)
                    lses.append(lse)
                grads = [[torch.zeros(part(t, r).shape, dtype=acc, device=device) for r in range(world)]
                         for t in (q, k, v)]
                for r in range(world):
                    grad_r = part(grad, r)
                    out_dot_grad = (grad_r.to(acc) * outs[r]).sum(-1)
                    for step in range(world):
                        s = (r - step) % world
                        block = visible_block(layout, causal, r, s, seq_local)
                        if block is None:
                            continue
                        dq, dk, dv = ring.block_gradients(part(q, r), part(k, s), part(v, s), None, block, spec,
                                                          grad_r, outs[r].to(dtype), lses[r], out_dot_grad)
                        grads[0][r][..., block.query_rows, :] += dq
                        grads[1][s][..., block.key_rows, :] += dk
                        grads[2][s][..., block.key_rows, :] += dv
                order = torch.cat([_slice_of(torch.arange(length)[:, None], layout, r, world)[:, 0]
                                   for r in range(world)])
                gathered = [torch.cat([x.to(dtype) for x in parts], dim=-2)[..., order.argsort().to(device), :]
                            for parts in (outs, *grads)]
                gradient_precision.pinned = GradientPrecision.ROUNDED if dtype != torch.float32 else None
                try:
                    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
                    one = flashsdpa.attention(*leaves, causal=causal, enable_gqa=heads_q != heads_kv)
                    one.backward(grad)
                finally:
                    gradient_precision.pinned = None
                exact = [t.double().requires_grad_() for t in (q, k, v)]
                ref = torch.nn.functional.scaled_dot_product_attention(*exact, is_causal=causal,
                                                                       enable_gqa=heads_q != heads_kv)
                ref.backward(grad.double())
                error = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
                cells = [
                    f"{name} {error(mine, r64):.2e} (one device {error(theirs, r64):.2e})"
                    for name, mine, theirs, r64 in zip(("out", "dq", "dk", "dv"), gathered,
                                                       (one, *(t.grad for t in leaves)),
                                                       (ref, *(t.grad for t in exact)))
                ]
                print(f"simulated {world} ranks {str(dtype)[6:]} {layout.value} causal={int(causal)} L={length} "
                      f"{'global' if path_a else 'local'} statistics, vs float64: " + ", ".join(cells), flush=True)


def main(argv=None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.simulate:
        simulate(args)
        return
    bench = Bench(args)
    info = collect(bench.device)
    if bench.device.type == "cuda":
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    if bench.rank == 0:
        print(f"# {bench.world} x {headline(info)}" + (f", NCCL {info['nccl']}" if "nccl" in info else ""))
        print(f"# B=1 {args.dtype} d={args.head_dim} heads {args.heads[0]}/{args.heads[1]} (GQA), layout zigzag"
              + (" -- SMOKE RUN: CPU, tiny sizes, times meaningless" if args.smoke else ""))
    if args.check:
        check(bench)
    if bench.rank == 0:
        print("| L total | L/GPU | causal | pass | ring ms | ring TFLOP/s/GPU | allgather ms | one GPU ms "
              "| one GPU TFLOP/s | efficiency | comm hidden | bytes/step | ring peak memory/GPU |")
        print("|---" * 13 + "|", flush=True)
    for length in args.lengths:
        for causal in args.causal:
            for backward in (False, True):
                row = run_row(bench, length, causal, backward)
                if bench.rank == 0:
                    print(row, flush=True)
    dist.destroy_process_group()


def _bytes(count: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def run_row(bench, length, causal, backward) -> str:
    args, world = bench.args, bench.world
    local = bench.random_slices(length, backward)
    grad = torch.ones_like(local[0]) if backward else None

    def step(attend):
        def run():
            out = attend(*local)
            if backward:
                out.backward(grad)
                for t in local:
                    t.grad = None
        return run

    ring = step(lambda q, k, v: ring_attention(q, k, v, causal=causal, enable_gqa=True, validate=False))
    ring_traffic.reset()
    if bench.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ring_ms = bench.slowest_median_ms(ring)
    traffic = ring_traffic.snapshot()
    peak = torch.cuda.max_memory_allocated() if bench.device.type == "cuda" else None  # inputs included
    gather_ms = None
    if not (causal and backward):
        gather_ms = bench.slowest_median_ms(step(lambda q, k, v: allgather_attention(q, k, v, causal, world,
                                                                                     bench.rank)))
    share = hidden_share(bench, ring) if args.profile and bench.rank == 0 else None
    one_ms = None
    if length <= args.one_gpu_max:
        dist.barrier()
        if bench.rank == 0:
            full = bench.problem(length, backward)
            grad_full = torch.ones_like(full[0]) if backward else None

            def one():
                out = flashsdpa.attention(*full, causal=causal, enable_gqa=True)
                if backward:
                    out.backward(grad_full)
                    for t in full:
                        t.grad = None

            one_ms = bench.slowest_median_ms(one, everyone=False)
            del full
        dist.barrier()
    work = flops(args, length, causal, backward)
    ring_tflops = work / world / (ring_ms * 1e-3) / 1e12
    one_tflops = work / (one_ms * 1e-3) / 1e12 if one_ms else None
    per_step = traffic["backward_bytes_per_step"] if backward else traffic["forward_bytes_per_step"]
    cells = [
        f"{length:,}", f"{length // world:,}", "yes" if causal else "no", "fwd+bwd" if backward else "fwd",
        f"{ring_ms:.2f}", f"{ring_tflops:.1f}", f"{gather_ms:.2f}" if gather_ms else "-",
        f"{one_ms:.2f}" if one_ms else "-", f"{one_tflops:.1f}" if one_tflops else "-",
        f"{ring_tflops / one_tflops:.0%}" if one_tflops else "-",
        f"{share:.0%}" if share is not None else "-", _bytes(per_step), _bytes(peak) if peak else "-",
    ]
    return "| " + " | ".join(cells) + " |"


if __name__ == "__main__":
    main()
