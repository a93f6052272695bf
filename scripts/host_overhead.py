"""flashsdpa's host (Python) overhead per call, measured on a machine without a GPU.

The triton backend is made to believe it runs on an sm_90 GPU while the
tensors stay on the CPU (capability (9, 0), 132 SMs, the automatic dispatch
order of CUDA), and Triton's `JITFunction.run` is replaced, so no kernel is
compiled or run:

    --launch none   run only returns a stand-in compiled kernel: only
                    flashsdpa's own layers are timed
    --launch bind   run does what Triton 3.6's real run does on a cache hit
                    (binding, specialization, cache key, global check, launch
                    metadata) with a stand-in kernel whose launcher launches
                    nothing: Triton's own per-launch host work is counted too

flashsdpa launches a kernel through run once per specialization and then
calls the kernel it kept directly (`direct_launch.py`), as it would the real
one; `--no-direct` sends every launch through run, for comparisons.

Each case prints the median per-call microseconds over many calls (in
batches of 10) after a warm-up, and the best batch. torch's SDPA on the same CPU tensors is printed for scale: for the
decode case that is a real CPU computation; on `meta` tensors it is torch's
own dispatch overhead only. Not measured here (no GPU): `torch.cuda.device`
switches, CUDA allocations and the driver's launch.

    PYTHONPATH=src python scripts/host_overhead.py [--launch none|bind] [--no-direct] [--calls N] [--profile CASE]

With `--device cuda` (on a GPU machine) nothing is patched: the same calls
run for real and the script prints the host time per call (enqueue time: the
GPU is synchronised between batches, outside the timing), beside torch's SDPA.

With `--device cpu-aten` nothing is patched either: flashsdpa's CPU path (the
`aten` backend, torch's own fused CPU kernel) and torch's SDPA run the same
problems on the CPU, their calls alternated batch by batch, and the
difference of the two is flashsdpa's host time: on tiny tensors, where the
kernel costs ~5 us, and on the smallest dense row of the CPU bench (B=1, H=8,
L=1024, d=64, float32, causal), where it is a fraction of the kernel's time.
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import os
import pstats
import statistics
import sys
import time

import torch
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import CompiledKernel, make_backend
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction, compute_cache_key, create_function_from_signature

import flashsdpa
from flashsdpa import dispatch
from flashsdpa.backends.triton import direct_launch, launch_backward, launch_forward

SM90 = GPUTarget("cuda", 90, 32)


class StandInDriver:
    """Triton's active driver as the launch path reads it: device 0 and its null stream."""

    @staticmethod
    def get_current_device() -> int:
        return 0

    @staticmethod
    def get_current_stream(device: int) -> int:
        return 0


def stand_in_kernel() -> CompiledKernel:
    """A CompiledKernel as Triton keeps it after a launch, whose launcher launches nothing."""
    kernel = CompiledKernel.__new__(CompiledKernel)
    kernel.module, kernel.function, kernel.packed_metadata = object(), 0, (4, 1, 0)
    kernel.name, kernel.src = "stand-in", None
    kernel._run = lambda *args: None
    return kernel


def device_caches(self: JITFunction) -> tuple:
    """The JITFunction's (kernel cache, key cache, target, backend, binder) for device 0, for sm_90."""
    if 0 not in self.device_caches:
        backend = make_backend(SM90)
        binder = create_function_from_signature(self.signature, self.params, backend)
        self.device_caches[0] = ({}, {}, SM90, backend, binder)
    return self.device_caches[0]


def no_launch(self, *args, grid, warmup, **kwargs):
    """Only a stand-in kernel, kept in the JITFunction's cache as run keeps the kernels it launched."""
    kernel_cache = device_caches(self)[0]
    return kernel_cache.setdefault("stand-in", stand_in_kernel())


def bind_only(self, *args, grid, warmup, **kwargs):
    """Triton 3.6's JITFunction.run with a stand-in for the compiled kernel: binding, specialization,
    cache key, global check and launch metadata, then the stand-in's launcher, which launches nothing."""
    kwargs["debug"] = kwargs.get("debug", self.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    device = driver.active.get_current_device()
    stream = driver.active.get_current_stream(device)
    kernel_cache, kernel_key_cache, _, _, binder = device_caches(self)
    bound_args, specialization, options = binder(*args, **kwargs)
    key = compute_cache_key(kernel_key_cache, specialization, options)
    kernel = kernel_cache.get(key)
    if kernel is None:
        kernel = kernel_cache[key] = stand_in_kernel()
    for (name, _), (val, globals_dict) in self.used_global_vals.items():
        if globals_dict.get(name) != val:
            raise RuntimeError(f"global {name} changed")
    grid_size = len(grid)
    launch_metadata = kernel.launch_metadata(grid, stream, *bound_args.values())
    kernel.run(grid[0], grid[1] if grid_size > 1 else 1, grid[2] if grid_size > 2 else 1, stream, kernel.function,
               kernel.packed_metadata, launch_metadata, knobs.runtime.launch_enter_hook,
               knobs.runtime.launch_exit_hook, *bound_args.values())
    return kernel


def pretend_sm90(launch: str) -> None:
    """Make CPU-tensor calls take the sm_90 paths (configs, TMA descriptors, decode splits) without launching."""
    # After flashsdpa's import, so the kernels stay JITFunctions; the backend
    # reads this at call time and then accepts CPU tensors.
    os.environ["TRITON_INTERPRET"] = "1"
    dispatch.AUTOMATIC_ORDER["cpu"] = dispatch.AUTOMATIC_ORDER["cuda"]
    for module in (launch_forward, launch_backward):
        module.device_capability = lambda device: (9, 0)
    launch_forward.sm_count = lambda device: 132
    driver.set_active(StandInDriver())
    JITFunction.run = {"none": no_launch, "bind": bind_only}[launch]


def per_call_us(fn, calls: int, warmup: int, batch: int = 10, sync=lambda: None) -> tuple[float, float]:
    """(median, minimum) over batches of `batch` calls of the mean microseconds per call.

    On a shared machine the median follows the load; the best batch is the
    quiet-machine cost. Compare runs by both. `sync` runs between batches,
    untimed (on a GPU: so the launch queue never fills and blocks a call).
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, calls // batch)):
        sync()
        start = time.perf_counter_ns()
        for _ in range(batch):
            fn()
        times.append((time.perf_counter_ns() - start) / batch)
    return statistics.median(times) / 1000, min(times) / 1000


def alternated_us(fns: dict, calls: int, warmup: int, batch: int) -> dict:
    """{name: (median, best)} microseconds per call, the callables' batches alternated (rotating order)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    names = list(fns)
    for index in range(max(1, calls // batch)):
        for name in names[index % len(names):] + names[: index % len(names)]:
            start = time.perf_counter_ns()
            for _ in range(batch):
                fns[name]()
            times[name].append((time.perf_counter_ns() - start) / batch)
    return {name: (statistics.median(t) / 1000, min(t) / 1000) for name, t in times.items()}


def aten_pairs() -> dict:
    """{case: {"flashsdpa": fn, "torch": fn, "calls": n}} on the CPU, the same tensors for both."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    torch.manual_seed(0)
    pairs = {}
    for label, shape, calls in (("tiny (1,1,1,8)", (1, 1, 1, 8), 3000), ("B=1 H=8 L=1024 d=64 fp32", (1, 8, 1024, 64), 40)):
        q, k, v = (torch.randn(*shape) for _ in range(3))
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        grad = torch.randn(*shape)
        for mode, ours, theirs in (
            ("causal forward", lambda q=q, k=k, v=v: flashsdpa.attention(q, k, v, causal=True),
             lambda q=q, k=k, v=v: sdpa(q, k, v, is_causal=True)),
            ("causal forward + backward",
             lambda qg=qg, kg=kg, vg=vg, g=grad: torch.autograd.grad(
                 flashsdpa.attention(qg, kg, vg, causal=True), (qg, kg, vg), g),
             lambda qg=qg, kg=kg, vg=vg, g=grad: torch.autograd.grad(
                 sdpa(qg, kg, vg, is_causal=True), (qg, kg, vg), g)),
        ):  # fmt: skip
            pairs[f"{label} {mode}"] = {"flashsdpa": ours, "torch": theirs, "calls": calls}
    return pairs


def main_aten(calls_scale: float) -> None:
    print(f"flashsdpa from {flashsdpa.__file__}, torch {torch.__version__}, CPU, {torch.get_num_threads()} threads: "
          "flashsdpa (aten backend) against torch's SDPA, batches alternated; us per call, median (best batch)")
    for name, pair in aten_pairs().items():
        calls = max(4, int(pair["calls"] * calls_scale))
        batch = 10 if calls >= 100 else 1
        result = alternated_us({"flashsdpa": pair["flashsdpa"], "torch": pair["torch"]}, calls, min(200, calls), batch)
        (ours, our_best), (theirs, their_best) = result["flashsdpa"], result["torch"]
        print(f"{name:50s} flashsdpa {ours:9.1f} ({our_best:.1f})  torch {theirs:9.1f} ({their_best:.1f})  "
              f"difference {ours - theirs:+8.1f} ({our_best - their_best:+.1f})")
    print("dispatch:", flashsdpa.stats())


def cases(device: str) -> dict:
    torch.manual_seed(0)
    new = lambda *shape: torch.randn(*shape, dtype=torch.bfloat16, device=device)  # noqa: E731
    q, k, v = (new(4, 16, 1024, 128) for _ in range(3))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    grad = torch.randn_like(q)
    dq, dk, dv = new(16, 32, 1, 128), new(16, 8, 4096, 128), new(16, 8, 4096, 128)
    # A KV cache that grows by one key per step: every call a new length (views of one buffer), so
    # no per-shape cache (descriptor, launch plan) ever hits, as in a real decode loop.
    cache_k, cache_v = new(16, 8, 8192, 128), new(16, 8, 8192, 128)
    lengths = itertools.cycle(range(4096, 8192))

    def growing_decode():
        length = next(lengths)
        flashsdpa.attention(dq, cache_k[:, :, :length], cache_v[:, :, :length], enable_gqa=True)
    meta = [t.to("meta") for t in (q, k, v)]
    tiny = [torch.randn(1, 1, 1, 8) for _ in range(3)]

    def fwd_bwd():  # autograd.grad: accumulating into .grad would be real CPU work
        torch.autograd.grad(flashsdpa.attention(qg, kg, vg), (qg, kg, vg), grad)

    on_cpu = {
        "torch sdpa decode, CPU (computes)": lambda: torch.nn.functional.scaled_dot_product_attention(
            dq, dk, dv, enable_gqa=True),
        "torch sdpa forward, meta tensors": lambda: torch.nn.functional.scaled_dot_product_attention(*meta),
        "torch sdpa, tiny CPU tensors (1,1,1,8)": lambda: torch.nn.functional.scaled_dot_product_attention(*tiny),
    }
    on_gpu = {  # the host time torch's SDPA takes to enqueue the same problems
        "torch sdpa forward": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
        "torch sdpa decode": lambda: torch.nn.functional.scaled_dot_product_attention(dq, dk, dv, enable_gqa=True),
    }
    return {
        "forward (4,16,1024,128) no grad": lambda: flashsdpa.attention(q, k, v),
        "forward, inputs require grad": lambda: flashsdpa.attention(qg, kg, vg),
        "forward + backward": fwd_bwd,
        "decode (16,32,1,128) x (16,8,4096,128) gqa": lambda: flashsdpa.attention(dq, dk, dv, enable_gqa=True),
        "decode via drop-in sdpa": lambda: flashsdpa.scaled_dot_product_attention(dq, dk, dv, enable_gqa=True),
        "decode, KV cache one key longer each call": growing_decode,
        **(on_cpu if device == "cpu" else on_gpu),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launch", choices=("none", "bind"), default="none")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--profile", metavar="CASE", help="cProfile the case whose name starts with CASE")
    parser.add_argument("--no-direct", action="store_true",
                        help="launch every kernel through JITFunction.run (flashsdpa's direct launches off)")
    parser.add_argument("--device", choices=("cpu", "cuda", "cpu-aten"), default="cpu",
                        help="cuda: real tensors and launches on a GPU (--launch is ignored), host time per call; "
                        "cpu-aten: flashsdpa's CPU path against torch's SDPA (module docstring)")
    args = parser.parse_args()
    if args.device == "cpu-aten":
        main_aten(args.calls / 2000)
        return
    sync = lambda: None  # noqa: E731
    if args.device == "cpu":
        pretend_sm90(args.launch)
    else:
        sync = torch.cuda.synchronize
    direct_launch.ENABLED = not args.no_direct
    launch = args.launch if args.device == "cpu" else "real"
    print(f"flashsdpa from {flashsdpa.__file__}, torch {torch.__version__}, {args.device}, launch={launch}, "
          f"direct launches {'off' if args.no_direct else 'on'}")
    dispatch.reset_stats()
    for name, fn in cases(args.device).items():
        if args.profile:
            if not name.startswith(args.profile):
                continue
            for _ in range(args.warmup):
                fn()
            profile = cProfile.Profile()
            profile.runcall(lambda: [fn() for _ in range(args.calls)])
            pstats.Stats(profile, stream=sys.stdout).sort_stats("cumulative").print_stats(45)
            return
        calls, batch = (args.calls, 10) if "CPU (computes)" not in name else (3, 1)
        median, best = per_call_us(fn, calls, min(args.warmup, calls), batch, sync)
        print(f"{name:45s} {median:9.1f} us   (best batch {best:.1f})")
    print("dispatch:", flashsdpa.stats())


if __name__ == "__main__":
    main()
