"""flashsdpa's CPU call against torch's SDPA, the bare aten kernel and a four-check stand-in, alternated.

Each call is timed alone (the host clock; CPU calls are synchronous), the peers run once a round in an order
that rotates every round, on inputs that require grad (the bench's forward rows) unless --no-grad; the medians
are printed as microseconds over torch's. The stand-in is the least Python that can call the kernel (four
checks), so flashsdpa's distance from it is flashsdpa's own Python after a kernel has cooled the caches.
`--math-first-rounds N` adds a call of torch's math path in each of the first N rounds, as the bench's slow
peer does. `--fixed-threshold` runs every call under the allocator setting of the bench's CPU runs (each
allocation over 128 KiB mapped alone: `bench.memory.fix_allocation_threshold`). Run it on a quiet machine:
another process on either core moves every figure.

    PYTHONPATH=src python scripts/cpu_alternation.py [--rounds 150] [--no-grad] [--math-first-rounds 0]
                                                     [--fixed-threshold]
"""

import argparse
import resource
import statistics
import time

import torch
import torch.nn.functional as F

import flashsdpa
from flashsdpa.backends import aten
from flashsdpa.bench.memory import fix_allocation_threshold

CASES = (  # (dtype, causal, L, E)
    (torch.bfloat16, True, 1024, 64), (torch.bfloat16, False, 1024, 128),
    (torch.float32, False, 1024, 64), (torch.float32, True, 1024, 128),
)  # fmt: skip


def stand_in(q, k, v, causal):
    """The least Python that can call torch's CPU flash kernel: four checks (None where they fail)."""
    if type(q) is torch.Tensor and type(k) is torch.Tensor and type(v) is torch.Tensor and q.is_cpu:
        return aten.KERNELS[0](q, k, v, 0.0, causal)[0]
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--no-grad", action="store_true")
    parser.add_argument("--math-first-rounds", type=int, default=0)
    parser.add_argument("--fixed-threshold", action="store_true")
    args = parser.parse_args()
    if args.fixed_threshold and not fix_allocation_threshold():
        parser.error("--fixed-threshold: this C library has no mallopt")
    kernel = aten.KERNELS[0]
    peers = {
        "torch": lambda q, k, v, c: F.scaled_dot_product_attention(q, k, v, is_causal=c),
        "bare kernel": lambda q, k, v, c: kernel(q, k, v, 0.0, c)[0],
        "stand-in": stand_in,
        "flashsdpa": lambda q, k, v, c: flashsdpa.attention(q, k, v, causal=c),
    }
    faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt  # noqa: E731
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, grad {not args.no_grad}")
    for dtype, causal, length, dim in CASES:
        sets = [tuple(torch.randn(1, 8, length, dim, dtype=dtype, requires_grad=not args.no_grad) for _ in range(3))
                for _ in range(3)]  # fmt: skip
        times = {name: [] for name in peers}
        faulted = {name: [] for name in peers}
        for r in range(args.rounds + 5):
            if r < args.math_first_rounds:
                with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
                    F.scaled_dot_product_attention(*sets[r % 3], is_causal=causal)
            names = list(peers)
            names = names[r % len(names):] + names[: r % len(names)]
            for name in names:
                q, k, v = sets[r % 3]
                f0, start = faults(), time.perf_counter()
                out = peers[name](q, k, v, causal)
                elapsed, f1 = time.perf_counter() - start, faults()
                del out
                if r >= 5:
                    times[name].append(elapsed)
                    faulted[name].append(f1 - f0)
        medians = {name: statistics.median(t) for name, t in times.items()}
        base = medians["torch"]
        cells = "  ".join(f"{name} {(m - base) * 1e6:+.0f} us ({statistics.median(faulted[name]):.0f} faults)"
                          for name, m in medians.items())  # fmt: skip
        print(f"{str(dtype)[6:]} causal={causal} L={length} E={dim}: torch {base * 1e3:.3f} ms; {cells}", flush=True)


if __name__ == "__main__":
    main()
