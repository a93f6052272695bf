"""The hopper backend's forward on an H100/H200: accuracy against float64, then TFLOP/s beside its peers.

Run from the repo root on the GPU machine:
    PYTHONPATH=src python scripts/bench_hopper_gpu.py [--rows d128L4096,d128L16384c,...] [--no-flex] [--backward]

--backward times the backward alone (each peer's forward graph kept) instead:
the hopper backend with its Gluon backward ("gluon") and with triton's
("hopper"), the triton backend, cuDNN and torch flash; TFLOP/s count 2.5x the
forward's products.

Accuracy: relative Frobenius error of out (and the largest lse error) against
float64 math, for hopper, the triton backend and cuDNN on the same inputs.
Timing: one process, the same inputs for every peer (`flashsdpa.bench`'s
cases and peers: bf16, 16k tokens a batch, heads = 2048 / d); hopper and
triton are flashsdpa pinned to each backend. Medians of
triton.testing.do_bench, which clears L2 before every call; TFLOP/s count
4*B*H*L*S*d (the visible pairs only when causal).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses

import torch
import triton

import flashsdpa
from flashsdpa.bench.cases import main_case, make_input_sets
from flashsdpa.bench.peers import FlashSdpaPeer, make_peers

HEADLINE = "d128L4096,d128L16384c,d64L4096,d128L1024"
MORE = "d128L16384,d128L4096c,d64L16384c,d256L4096,d256L4096c"
# Spec changes timed beside the default (--variants).
VARIANTS = {"per-tile": dict(persistent=False), "persistent": dict(persistent=True), "pingpong": dict(pingpong=True),
            "pp-tile": dict(pingpong=True, persistent=False), "n64": dict(block_n=64, stages=3),
            "s2": dict(stages=2), "s3": dict(stages=3)}


class PinnedFlashSdpa(FlashSdpaPeer):
    """flashsdpa with one backend pinned (`flashsdpa.use_backend`)."""

    def __init__(self, backend: str):
        super().__init__(backend)
        self.backend = backend

    def context(self):
        return flashsdpa.use_backend(self.backend)


class HopperVariant(PinnedFlashSdpa):
    """hopper with its spec's fields changed, e.g. persistent=False (one program per tile)."""

    def __init__(self, name: str, **changes):
        super().__init__("hopper")
        self.name, self.changes = name, changes

    @contextlib.contextmanager
    def context(self):
        from flashsdpa.backends.hopper import launch_forward

        default = launch_forward.forward_spec
        launch_forward.forward_spec = lambda *a: dataclasses.replace(default(*a), **self.changes)
        try:
            with flashsdpa.use_backend("hopper"):
                yield
        finally:
            launch_forward.forward_spec = default


def parse_row(text: str) -> tuple[int, int, bool]:
    causal = text.endswith("c")
    head_dim, length = text.removesuffix("c").removeprefix("d").split("L")
    return int(head_dim), int(length), causal


def accuracy() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    print("accuracy: out relative error / max |lse error| against float64 (B=2)")
    print(f"{'problem':<34} {'hopper':>18} {'triton':>18} {'cudnn':>9}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        for head_dim, hq, hkv, seq_q, seq_kv, causal in (
            (128, 8, 8, 1024, 1024, False), (128, 8, 2, 1000, 1537, True), (64, 8, 8, 777, 2048, False),
            (64, 4, 4, 2048, 333, True), (256, 4, 2, 513, 1030, True), (256, 4, 4, 1024, 1024, False),
        ):
            q = torch.randn(2, hq, seq_q, head_dim, device="cuda", generator=gen).to(dtype)
            k = torch.randn(2, hkv, seq_kv, head_dim, device="cuda", generator=gen).to(dtype)
            v = torch.randn(2, hkv, seq_kv, head_dim, device="cuda", generator=gen).to(dtype)
            k64, v64 = (t.double().repeat_interleave(hq // hkv, dim=1) for t in (k, v))
            scores = q.double() @ k64.transpose(-1, -2) / head_dim**0.5
            if causal:
                visible = torch.ones(seq_q, seq_kv, dtype=torch.bool, device="cuda").tril()
                scores = scores.masked_fill(~visible, float("-inf"))
            ref_lse = torch.logsumexp(scores, -1)
            ref = torch.softmax(scores, -1) @ v64
            cells = []
            for backend in ("hopper", "triton"):
                with flashsdpa.backends.base.poisoned_outputs():
                    out, lse = flashsdpa.attention(q, k, v, causal=causal, enable_gqa=hq != hkv, backend=backend,
                                                   return_lse=True)
                err = ((out.double() - ref).norm() / ref.norm()).item()
                cells.append(f"{err:9.2e}/{(lse.double() - ref_lse).abs().max().item():8.1e}")
            try:
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    torch_out = torch.nn.functional.scaled_dot_product_attention(
                        q, k, v, is_causal=causal, enable_gqa=hq != hkv)
                cells.append(f"{((torch_out.double() - ref).norm() / ref.norm()).item():9.2e}")
            except RuntimeError:
                cells.append(f"{'n/a':>9}")
            name = f"{str(dtype)[6:]} d={head_dim} {hq}/{hkv} {seq_q}x{seq_kv}{' causal' if causal else ''}"
            print(f"{name:<34} {' '.join(cells)}", flush=True)
            del q, k, v, k64, v64, scores, ref


def timing(rows: list[str], flex: bool, variants: list[str]) -> None:
    peers = make_peers("static")
    order = [PinnedFlashSdpa("hopper"), PinnedFlashSdpa("triton"), peers["cudnn"], peers["flash"]]
    order += [HopperVariant(name, **changes) for name, changes in VARIANTS.items() if name in variants]
    if flex:
        order.append(peers["flex"])
    print("\nforward TFLOP/s (bf16, median of do_bench; ratio = hopper / cudnn)")
    print(f"{'row':<14}" + "".join(f"{peer.name:>9}" for peer in order) + f"{'ratio':>8}")
    for row in rows:
        head_dim, length, causal = parse_row(row)
        case = main_case(torch.bfloat16, head_dim, length, causal)
        inputs = make_input_sets(case, torch.device("cuda"), 1, seed=length + head_dim)[0]
        rates = []
        for peer in order:
            try:
                forward = peer.prepare(case, torch.device("cuda"))
                with peer.context():
                    forward(inputs)
                    ms = triton.testing.do_bench(lambda: forward(inputs), warmup=100, rep=400,
                                                 return_mode="median")
                rates.append(case.flops("fwd") / ms * 1e-9)
            except Exception as error:  # noqa: BLE001 - a peer that refuses a row is reported, not fatal
                print(f"  {peer.name} on {row}: {type(error).__name__}: {str(error)[:200]}")
                rates.append(float("nan"))
        print(f"{row:<14}" + "".join(f"{r:9.0f}" for r in rates) + f"{rates[0] / rates[2]:8.3f}", flush=True)


class GluonBackward(PinnedFlashSdpa):
    """hopper with its Gluon backward taken at every head dim its kernels cover."""

    def __init__(self):
        super().__init__("hopper")
        self.name = "gluon"

    @contextlib.contextmanager
    def context(self):
        from flashsdpa.backends.hopper import backward_specs

        enabled = backward_specs.GLUON_BACKWARD_HEAD_DIMS
        backward_specs.GLUON_BACKWARD_HEAD_DIMS = backward_specs.BACKWARD_HEAD_DIMS
        try:
            with flashsdpa.use_backend("hopper"):
                yield
        finally:
            backward_specs.GLUON_BACKWARD_HEAD_DIMS = enabled


def backward_timing(rows: list[str]) -> None:
    peers = make_peers("static")
    order = [GluonBackward(), PinnedFlashSdpa("hopper"), PinnedFlashSdpa("triton"), peers["cudnn"], peers["flash"]]
    print("\nbackward alone, TFLOP/s (bf16, median of do_bench; ratios = gluon / cudnn, gluon / hopper)")
    print(f"{'row':<14}" + "".join(f"{peer.name:>9}" for peer in order) + f"{'/cudnn':>8}{'/hopper':>8}")
    for row in rows:
        head_dim, length, causal = parse_row(row)
        case = main_case(torch.bfloat16, head_dim, length, causal)
        inputs = make_input_sets(case, torch.device("cuda"), 1, seed=length + head_dim)[0]
        leaves = (inputs.query, inputs.key, inputs.value)
        rates = []
        for peer in order:
            try:
                forward = peer.prepare(case, torch.device("cuda"))
                with peer.context():
                    flashsdpa.reset_stats()
                    out = forward(inputs)
                    grad = lambda: torch.autograd.grad(out, leaves, inputs.grad_out, retain_graph=True)  # noqa: E731
                    grad()
                    ms = triton.testing.do_bench(grad, warmup=100, rep=400, return_mode="median")
                    fallbacks = flashsdpa.stats().get("fallbacks")
                    if fallbacks:
                        print(f"  {peer.name} on {row}: fallbacks {fallbacks}")
                rates.append(case.flops("bwd") / ms * 1e-9)
                del out
            except Exception as error:  # noqa: BLE001 - a peer that refuses a row is reported, not fatal
                print(f"  {peer.name} on {row}: {type(error).__name__}: {str(error)[:200]}")
                rates.append(float("nan"))
        print(f"{row:<14}" + "".join(f"{r:9.0f}" for r in rates) + f"{rates[0] / rates[3]:8.3f}"
              f"{rates[0] / rates[1]:8.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=HEADLINE, help=f"default: the headline rows; more: {MORE}")
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--variants", default="", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--backward", action="store_true", help="time the backward instead (no accuracy table)")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__,
          "cudnn", torch.backends.cudnn.version(), flush=True)
    if args.backward:
        backward_timing(args.rows.split(","))
        return
    if not args.skip_accuracy:
        accuracy()
    timing(args.rows.split(","), not args.no_flex, args.variants.split(","))


if __name__ == "__main__":
    main()
