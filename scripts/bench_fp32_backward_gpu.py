"""The float32 full-precision backward (float16 halves) on a CUDA GPU: candidate structures and tiles against the
shipped default and torch's float32 backward, in one process.

Usage (from the repo root):
    PYTHONPATH=src python scripts/bench_fp32_backward_gpu.py [d=128,64] [causal=0,1] [L=4096] [only=NAME,...]

For each head dim and causality: every candidate of CANDIDATES (the default first) and torch's
memory-efficient backward (its fastest float32) are timed on the bench's problem (B = 16384 / L, H = 2048 / d,
out and lse from flashsdpa's forward), with TFLOP/s (backward FLOPs counted as 2.5x the forward's) and the
ratio to torch; each candidate's relative Frobenius error of dq, dk, dv against float64 autograd (and torch's
own) on a smaller problem (B=1, H=4, L=1024, scores scaled by 4); the GPU time of each kernel launch of the
default and of the fastest candidate (torch profiler). Kernels are compiled first in parallel processes
(Triton's disk cache), so the run stays within about two minutes. The last lines are the table. Writes the
table to $OUT/fp32_backward.txt when OUT is set.
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import time
from dataclasses import replace

import torch
import triton

from flashsdpa.backends.base import AttentionInputs, GradientsNeeded
from flashsdpa.backends.triton import launch_backward
from flashsdpa.backends.triton.backward_configs import TileShape, backward_config
from flashsdpa.descriptor import AttentionDescriptor, GradientPrecision, MaskKind

# "cpu" (with TRITON_INTERPRET=1 and small L) runs the candidates' configs under the interpreter: a smoke test
DEVICE = os.environ.get("FP32_BWD_DEVICE", "cuda")


def tile(text: str) -> TileShape:
    return TileShape(*map(int, text.split("x")))


# name -> changes to the shipped config: dkdv (the dK/dV kernel's tile; dK alone where dv is set), dv (dV in
# its own launch, BackwardConfig.dv; "none": one launch), rows (the dQ kernel's row pass in its own launch,
# BackwardConfig.rows; "none": in the dQ launch), dq. Per head dim.
CANDIDATES = {
    128: {
        "default": {},
        "dv apart": dict(dkdv="32x128x8x2", dv="32x128x8x2"),
        "dv+rows apart 128x64s1": dict(dkdv="32x128x8x2", dv="32x128x8x2", rows="128x64x8x1"),
        "dv+rows apart 64x64w4": dict(dkdv="32x128x8x2", dv="32x128x8x2", rows="64x64x4x2"),
        # 4 warps on under 113 KB of shared memory: two programs an SM, one's elementwise work beside the other's
        # products
        "dv apart w4": dict(dkdv="16x64x4x2", dv="32x64x4x2"),
        "dv+rows apart w4": dict(dkdv="16x64x4x2", dv="32x64x4x2", rows="64x32x4x1", dq="64x16x4x2"),
        "dv+rows apart w4, dq 128x32": dict(dkdv="16x64x4x2", dv="32x64x4x2", rows="64x32x4x1"),
    },
    64: {
        "default": {},
        "fused 64x128": dict(dkdv="64x128x8x2", dv="none"),
        "dv apart 64x128": dict(dkdv="64x128x8x2", dv="64x128x8x2"),
        "rows apart 128x128": dict(rows="128x128x8x2"),
        "dq 64x64w4": dict(dq="64x64x4x2"),
        # 4 warps on under 113 KB of shared memory: two programs an SM
        "w4: fused 64x64, dq 64x64": dict(dkdv="64x64x4x2", dq="64x64x4x2"),
        "w4: fused 64x64, rows+dq 64x64": dict(dkdv="64x64x4x2", rows="64x64x4x2", dq="64x64x4x2"),
    },
}


def descriptor(q, k, v, causal: bool, scale=None) -> AttentionDescriptor:
    B, H, L, E = q.shape
    return AttentionDescriptor(
        batch_shape=(B,), heads_q=H, heads_kv=k.shape[1], seq_q=L, seq_kv=k.shape[2], head_dim=E,
        head_dim_v=v.shape[3], dtype=q.dtype, device_type=DEVICE, causal=causal, mask=MaskKind.NONE,
        mask_dtype=None, mask_broadcast=(False,) * 4, dropout_p=0.0, scale=scale)


def config_of(desc: AttentionDescriptor, changes: dict):
    config = backward_config(desc.kernel_key, torch.cuda.get_device_capability(), GradientPrecision.EXACT)
    fields = {name: (None if text == "none" else tile(text)) for name, text in changes.items()}
    return replace(config, **fields)


def problem(d: int, causal: bool, L: int, B: int | None = None, H: int | None = None, score_scale: float = 1.0):
    import flashsdpa

    B, H = B or 16384 // L, H or 2048 // d
    gen = torch.Generator(device=DEVICE).manual_seed(d * 10 + causal)
    q, k, v, grad_out = (torch.randn(B, H, L, d, device=DEVICE, generator=gen) for _ in range(4))
    q = q * score_scale
    out, lse = flashsdpa.attention(q, k, v, causal=causal, backend="triton", return_lse=True)
    return descriptor(q, k, v, causal), AttentionInputs(q, k, v), out, lse, grad_out


def run_ours(case, config):
    desc, inputs, out, lse, grad_out = case
    return launch_backward.attention_backward(desc, inputs, out, lse, grad_out, GradientsNeeded(), config=config)


def time_torch(case) -> float:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    desc, inputs, _, _, grad_out = case
    q, k, v = (t.detach().requires_grad_() for t in (inputs.query, inputs.key, inputs.value))
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=desc.causal)
    return triton.testing.do_bench(lambda: torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True))


def errors(case, config) -> tuple[float, float]:
    """(ours, torch's efficient kernel): the worst relative Frobenius error of dq, dk, dv against float64."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    desc, inputs, _, _, grad_out = case
    leaves = [t.detach().double().requires_grad_() for t in (inputs.query, inputs.key, inputs.value)]
    torch.autograd.backward(F.scaled_dot_product_attention(*leaves, is_causal=desc.causal), grad_out.double())
    truth = [leaf.grad for leaf in leaves]
    ours = run_ours(case, config)[:3]
    theirs_leaves = [t.detach().requires_grad_() for t in (inputs.query, inputs.key, inputs.value)]
    # (the CPU smoke test: torch's math backend, the CPU has no efficient kernel)
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION if DEVICE == "cuda" else SDPBackend.MATH):
        torch.autograd.backward(F.scaled_dot_product_attention(*theirs_leaves, is_causal=desc.causal), grad_out)
    relative = lambda got: max(float((g.double() - t).norm() / t.norm()) for g, t in zip(got, truth))  # noqa: E731
    return relative(ours), relative([leaf.grad for leaf in theirs_leaves])


def kernel_times(case, config, repeats: int = 10) -> list[tuple[str, float]]:
    """(kernel, ms) of each launch of one backward, in launch order (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    run_ours(case, config)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            run_ours(case, config)
        torch.cuda.synchronize()
    kernels = sorted((event for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA
                      and ("attention_backward" in event.name or "split" in event.name)),
                     key=lambda event: event.time_range.start)
    per_call = len(kernels) // repeats
    return [(kernels[i].name.replace("attention_backward_", "").replace("_kernel", ""),
             sum(kernels[i + r * per_call].time_range.elapsed_us() for r in range(repeats)) / repeats / 1000)
            for i in range(per_call)]


def cases(options: dict) -> list[tuple[int, bool]]:
    dims = [int(x) for x in options.get("d", "128,64").split(",")]
    causals = [x == "1" for x in options.get("causal", "0,1").split(",")]
    return [(d, c) for d in dims for c in causals]


def chosen(d: int, options: dict) -> dict:
    only = options.get("only")
    names = CANDIDATES[d]
    return {n: c for n, c in names.items() if only is None or n == "default" or n in only.split(",")}


def warm(options: dict) -> None:
    """Compile every candidate's kernels (one small backward each) in parallel processes first."""
    jobs = [(d, causal, name) for d, causal in cases(options) for name in chosen(d, options)]
    env = dict(os.environ)
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 4) as pool:
        results = list(pool.map(lambda job: subprocess.run(
            [sys.executable, __file__, "warm-one", str(job[0]), str(int(job[1])), job[2], options.get("L", "4096")],
            env=env, capture_output=True, text=True), jobs))
    for job, result in zip(jobs, results):
        if result.returncode != 0:
            print(f"warm {job}: failed: {result.stderr.strip().splitlines()[-1:]}", flush=True)


def warm_one(d: int, causal: bool, name: str, L: int) -> None:
    case = problem(d, causal, L, B=1, H=1)  # (the forward's kernels too, as the timed problem's)
    run_ours(case, config_of(case[0], CANDIDATES[d][name]))
    torch.cuda.synchronize()


def main(options: dict) -> None:
    start = time.time()
    L = int(options.get("L", 4096))
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    if options.get("warm", "1") == "1":
        warm(options)
        print(f"compiled in {time.time() - start:.0f} s", flush=True)
    table = []
    for d, causal in cases(options):
        case = problem(d, causal, L)
        small = problem(d, causal, 1024, B=1, H=4, score_scale=4.0)
        flops = case[0].flops(backward=True)
        torch_ms = time_torch(case)
        torch_err = None
        best = None
        for name, changes in chosen(d, options).items():
            config = config_of(case[0], changes)
            try:
                ms = triton.testing.do_bench(lambda: run_ours(case, config))
                ours_err, torch_err = errors(small, config_of(small[0], changes))
            except Exception as error:  # noqa: BLE001 - out of resources etc.: a finding, not a stop
                print(f"d={d} causal={causal:d} {name}: failed {type(error).__name__}: {str(error)[:80]}", flush=True)
                continue
            row = (f"d={d} causal={causal:d} {name:<30} {flops / ms * 1e-9:6.1f} TFLOP/s {ms:8.3f} ms "
                   f"{torch_ms / ms:5.2f}x torch  err {ours_err:.1e}")
            print(row, flush=True)
            table.append(row)
            if best is None or ms < best[1]:
                best = (name, ms, config)
        torch_row = (f"d={d} causal={causal:d} {'torch efficient':<30} {flops / torch_ms * 1e-9:6.1f} TFLOP/s "
                     f"{torch_ms:8.3f} ms  1.00x torch  err {torch_err or float('nan'):.1e}")
        print(torch_row, flush=True)
        table.append(torch_row)
        for name in dict.fromkeys(("default", best[0])) if best else ():
            try:
                launches = kernel_times(case, config_of(case[0], chosen(d, options)[name]))
            except Exception as error:  # noqa: BLE001 - the profile is extra: the timings stand without it
                print(f"d={d} causal={causal:d} {name} kernels: failed {type(error).__name__}: {error}", flush=True)
                continue
            row = f"d={d} causal={causal:d} {name} kernels: " + ", ".join(f"{k} {ms:.3f}" for k, ms in launches)
            print(row, flush=True)
            table.append(row)
    print(f"\n--- table ({time.time() - start:.0f} s) ---")
    print("\n".join(table))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "fp32_backward.txt"), "w") as file:
            file.write("\n".join(table) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "warm-one":
        warm_one(int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4], int(sys.argv[5]))
    else:
        main(dict(arg.split("=", 1) for arg in sys.argv[1:]))
