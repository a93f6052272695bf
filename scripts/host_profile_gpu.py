"""Host (Python) time per flashsdpa call on a CUDA machine, beside torch's, with a cProfile of ours.

Small problems (decode, L=1024) are decided by host time when the GPU waits
on the next launch (as under `flashsdpa bench`'s L2 flush). This measures it
on the GPU's own host: calls are issued back to back without synchronising,
so the host time per call is what the loop takes while the GPU keeps up.

    PYTHONPATH=src python scripts/host_profile_gpu.py [--profile]
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time

import torch
import torch.nn.functional as F

import flashsdpa


def host_us_per_call(fn, calls: int = 300) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def problems():
    device, dtype = "cuda", torch.bfloat16
    new = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    q, k, v = new(16, 16, 1024, 128), new(16, 16, 1024, 128), new(16, 16, 1024, 128)
    yield "fwd bf16 (16,16,1024,128)", (lambda: flashsdpa.attention(q, k, v)), (
        lambda: F.scaled_dot_product_attention(q, k, v))
    yield "drop-in fwd, same", (lambda: flashsdpa.scaled_dot_product_attention(q, k, v)), None
    qd, kd, vd = new(16, 32, 1, 128), new(16, 8, 4096, 128), new(16, 8, 4096, 128)
    yield "decode q (16,32,1) kv (16,8,4096)", (lambda: flashsdpa.attention(qd, kd, vd, enable_gqa=True)), (
        lambda: F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    grad = torch.randn_like(q)

    def ours_step():
        torch.autograd.grad(flashsdpa.attention(qg, kg, vg), (qg, kg, vg), grad)

    def torch_step():
        torch.autograd.grad(F.scaled_dot_product_attention(qg, kg, vg), (qg, kg, vg), grad)

    yield "fwd+bwd bf16 (16,16,1024,128)", ours_step, torch_step


def main() -> None:
    profile = "--profile" in sys.argv
    print(torch.cuda.get_device_name(), torch.__version__)
    for name, ours, theirs in problems():
        row = f"{name:<36} flashsdpa {host_us_per_call(ours):7.1f} us/call"
        if theirs is not None:
            row += f" | torch {host_us_per_call(theirs):7.1f} us/call"
        print(row, flush=True)
        if profile:
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(200):
                ours()
            profiler.disable()
            torch.cuda.synchronize()
            stats = pstats.Stats(profiler).sort_stats("tottime")
            stats.print_stats(18)


if __name__ == "__main__":
    main()
