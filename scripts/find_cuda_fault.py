"""Which Triton kernel faults? Runs problems one per subprocess with every launch synchronised.

An illegal address is reported at the next synchronisation and leaves the
CUDA context unusable, so in a test run it surfaces in whatever torch call
comes next. Here each problem runs in its own process under
CUDA_LAUNCH_BLOCKING=1, every kernel launch prints its name first, and the
last name printed before a fault is the kernel that made it.

Usage (GPU machine, repo root): PYTHONPATH=src python3 scripts/find_cuda_fault.py
"""

import os
import subprocess
import sys

# (dtype, E, Ev, L, S, causal): the float32 E != Ev problems that faulted in the H100 test runs, and neighbours.
PROBLEMS = [
    ("float32", 64, 8, 71, 83, False), ("float32", 16, 40, 71, 83, False), ("float32", 40, 128, 71, 83, False),
    ("float32", 64, 64, 71, 83, False), ("float32", 8, 8, 71, 83, False), ("float16", 64, 8, 71, 83, False),
    ("float32", 64, 16, 71, 83, False), ("float32", 64, 8, 71, 83, True),
]


def run_one(dtype: str, E: int, Ev: int, L: int, S: int, causal: bool, dot_precision: str) -> None:
    import dataclasses

    import torch
    import triton.runtime.jit as jit

    import flashsdpa
    from flashsdpa.backends.triton import backward_configs, direct_launch, launch_backward

    direct_launch.ENABLED = False  # every launch through run, which announces it
    launch = jit.JITFunction.run

    def announced(self, *args, **kwargs):
        print("  launch", self.fn.__name__, flush=True)
        return launch(self, *args, **kwargs)

    jit.JITFunction.run = announced
    chosen = backward_configs.backward_config
    if dot_precision != "default":
        launch_backward.backward_config = lambda key, cap, precision: dataclasses.replace(
            chosen(key, cap, precision), dot_precision=dot_precision)
    gen = torch.Generator().manual_seed(0)
    dt = getattr(torch, dtype)
    q, k = (torch.randn(1, 2, n, E, generator=gen).to(dt).cuda().requires_grad_() for n in (L, S))
    v = torch.randn(1, 2, S, Ev, generator=gen).to(dt).cuda().requires_grad_()
    out = flashsdpa.attention(q, k, v, causal=causal, backend="triton")
    torch.cuda.synchronize()
    out.backward(torch.randn_like(out))
    torch.cuda.synchronize()
    print("  ok", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        dtype, E, Ev, L, S, causal, precision = sys.argv[1:]
        run_one(dtype, int(E), int(Ev), int(L), int(S), causal == "True", precision)
        sys.exit(0)
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    for problem in PROBLEMS:
        for precision in ("default", "tf32") if problem[0] == "float32" else ("default",):
            args = [str(x) for x in problem] + [precision]
            result = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True)
            lines = result.stdout.strip().splitlines()
            verdict = "ok" if result.returncode == 0 else f"FAULT after: {lines[-1].strip() if lines else '?'}"
            print(" ".join(args), "->", verdict, flush=True)
            if result.returncode != 0:
                print("   ", (result.stderr.strip().splitlines() or ["?"])[-1][:200], flush=True)
