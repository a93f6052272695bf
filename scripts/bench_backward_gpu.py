"""flashsdpa triton backward on a CUDA GPU: correctness at real sizes, speed, and a tile sweep.

Usage (from the repo root, PYTHONPATH=src):
    python scripts/bench_backward_gpu.py correct          # float64 references, awkward sizes, all features
    python scripts/bench_backward_gpu.py bench            # TFLOP/s vs torch flash / cuDNN backward, PEERS.md shapes
    python scripts/bench_backward_gpu.py breakdown        # GPU time per backward kernel
    python scripts/bench_backward_gpu.py sweep d=128 causal=1 [dtype=bf16] [L=4096] [kernel=dkdv|dq] [precision=exact|rounded] [quick=1]
        [tiles=64x128x8x2,...] [loads=pointers,host] [early=0,1]
    (dtype=fp32: the full-precision float16-halves backward; its out/lse come from flashsdpa's forward)
out/lse for the benchmarks come from torch's flash forward (natural-log lse, float32).
"""
import itertools
import os
import sys
from dataclasses import replace

import torch
import torch.nn.functional as F
import triton

from flashsdpa.backends.base import AttentionInputs, GradientsNeeded
from flashsdpa.backends.triton import launch_backward
from flashsdpa.backends.triton.backward_configs import TileShape, backward_config
from flashsdpa.descriptor import AttentionDescriptor, GradientPrecision, MaskKind
from flashsdpa.dropout import full_keep_mask

DEV = os.environ.get("BWD_CHECK_DEVICE", "cuda")  # "cpu" (with TRITON_INTERPRET=1) shrinks the cases: a smoke test
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def reference(q, k, v, mask, mask_kind, causal, scale, p, seed, grad_out):
    B, Hq, L, _ = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    s = qd @ kd.repeat_interleave(G, 1).transpose(-1, -2) * scale
    visible = torch.ones(B, Hq, L, S, dtype=torch.bool, device=DEV)
    md = None
    if mask_kind == "float":
        md = mask.detach().double().expand(B, Hq, L, S).clone().requires_grad_()
        s = s + md
        visible &= md.detach() != float("-inf")
    elif mask_kind == "bool":
        visible &= mask.expand(B, Hq, L, S)
    if causal:
        visible &= torch.ones(L, S, dtype=torch.bool, device=DEV).tril()
    s = s.masked_fill(~visible, float("-inf"))
    with torch.no_grad():
        lse = torch.logsumexp(s, -1)
    empty = ~visible.any(-1, keepdim=True)
    probs = torch.softmax(s.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    if p > 0:
        probs = probs * full_keep_mask(seed, p, B * Hq, L, S, DEV).view(B, Hq, L, S) / (1 - p)
    out = probs @ vd.repeat_interleave(G, 1)
    out.backward(grad_out.double())
    return out.detach(), lse.float(), (qd.grad, kd.grad, vd.grad, md.grad if md is not None else None)


def descriptor(q, k, v, mask, mask_kind, causal, scale, p, mask_shape=None):
    B, Hq, L, E = q.shape
    broadcast = (False,) * 4 if mask_shape is None else tuple(n == 1 and f > 1 for n, f in zip(mask_shape, (B, Hq, L, k.shape[2])))
    return AttentionDescriptor(
        batch_shape=(B,), heads_q=Hq, heads_kv=k.shape[1], seq_q=L, seq_kv=k.shape[2], head_dim=E,
        head_dim_v=v.shape[3], dtype=q.dtype, device_type=DEV, causal=causal, mask=MaskKind(mask_kind),
        mask_dtype=None if mask is None else mask.dtype, mask_broadcast=broadcast, dropout_p=p, scale=scale)


def correct():
    g = torch.Generator(device=DEV).manual_seed(0)
    cases = [
        # dtype, B, Hq, Hkv, L, S, E, Ev, causal, mask_kind, mask_shape, p, scale
        (torch.bfloat16, 2, 4, 4, 1000, 1000, 128, 128, False, "none", None, 0.0, None),
        (torch.float16, 2, 4, 4, 777, 199, 64, 64, True, "none", None, 0.0, None),
        (torch.float16, 2, 4, 4, 199, 777, 64, 64, True, "none", None, 0.0, None),
        (torch.bfloat16, 1, 8, 2, 513, 1031, 128, 128, True, "bool", (1, 1, 1, 1031), 0.0, 0.3),
        (torch.float16, 2, 4, 1, 300, 300, 256, 256, True, "float", (2, 4, 300, 300), 0.1, None),
        (torch.bfloat16, 1, 4, 2, 257, 129, 72, 40, False, "float", (1, 4, 1, 129), 0.0, 10.0),
        (torch.float32, 1, 2, 2, 333, 444, 96, 96, True, "bool", (1, 2, 333, 444), 0.2, None),
        (torch.float32, 1, 2, 1, 100, 1, 16, 8, False, "none", None, 0.0, None),
        (torch.float16, 1, 2, 2, 1, 4099, 128, 128, False, "none", None, 0.0, None),
    ]
    worst = True
    for dtype, B, Hq, Hkv, L, S, E, Ev, causal, mk, mshape, p, scale in cases:
        if DEV == "cpu":
            shrink = lambda n: max(1, n // 25)  # noqa: E731
            L, S = shrink(L), shrink(S)
            mshape = mshape and tuple(shrink(n) if n > 8 else n for n in mshape)
        q = torch.randn(B, L, Hq, E, device=DEV, generator=g).to(dtype).transpose(1, 2)  # non-contiguous
        k = torch.randn(B, Hkv, S, E, device=DEV, generator=g).to(dtype)
        v = torch.randn(B, Hkv, S, 2 * Ev, device=DEV, generator=g).to(dtype)[..., ::2]
        grad_out = torch.randn(B, Hq, L, Ev, device=DEV, generator=g).to(dtype)
        mask = None
        if mk == "bool":
            mask = (torch.rand(*mshape, device=DEV, generator=g) > 0.3).expand(B, Hq, L, S)
        elif mk == "float":
            base = torch.randn(*mshape, device=DEV, generator=g).to(dtype)
            mask = base.masked_fill(torch.rand(*mshape, device=DEV, generator=g) < 0.1, float("-inf")).expand(B, Hq, L, S)
        desc = descriptor(q, k, v, mask, mk, causal, scale, p, mshape)
        seed = (1234, 5678) if p > 0 else None
        out, lse, ref = reference(q, k, v, mask, mk, causal, desc.scale, p, seed, grad_out)
        needed = GradientsNeeded(True, True, True, mk == "float")
        args = (desc, AttentionInputs(q, k, v, mask, seed), out.to(dtype), lse, grad_out, needed)
        got = launch_backward.attention_backward(*args)
        again = launch_backward.attention_backward(*args)
        errs = {}
        for name, a, r in zip(("dq", "dk", "dv", "dmask"), got, ref):
            if r is not None:
                diff = float((a.double() - r).norm())  # absolute where the exact gradient is 0 (S = 1)
                errs[name] = diff / float(r.norm()) if float(r.norm()) > 0 else diff
        bitwise = all(a is None or torch.equal(a, b) for a, b in zip(got, again))
        ok = bitwise and max(errs.values()) <= TOL[dtype]
        worst &= ok
        print(f"{'ok  ' if ok else 'FAIL'} {str(dtype)[6:]:8s} B{B} H{Hq}/{Hkv} L{L} S{S} E{E}/{Ev} causal={causal:d} "
              f"mask={mk} p={p} bitwise={bitwise} " + " ".join(f"{n}={e:.1e}" for n, e in errs.items()), flush=True)
    print("ALL OK" if worst else "SOME FAILED")


def bench_inputs(dtype, B, H, L, d, causal):
    q, k, v, grad_out = (torch.randn(B, H, L, d, device=DEV, dtype=dtype) for _ in range(4))
    if dtype == torch.float32:  # torch's flash kernel refuses float32: flashsdpa's own forward
        import flashsdpa
        out, lse = flashsdpa.attention(q, k, v, causal=causal, backend="triton", return_lse=True)
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal)[:2]
    desc = descriptor(q, k, v, None, "none", causal, None, 0.0)
    return desc, AttentionInputs(q, k, v), out, lse, grad_out


def precision_config(desc, precision):
    return backward_config(desc.kernel_key, torch.cuda.get_device_capability(), GradientPrecision(precision))


def time_ours(desc, inputs, out, lse, grad_out, config=None):
    needed = GradientsNeeded()
    return triton.testing.do_bench(
        lambda: launch_backward.attention_backward(desc, inputs, out, lse, grad_out, needed, config=config))


def time_torch(inputs, grad_out, causal, backend):
    from torch.nn.attention import sdpa_kernel
    q, k, v = (t.detach().requires_grad_() for t in (inputs.query, inputs.key, inputs.value))
    with sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return triton.testing.do_bench(lambda: torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True))


def bench():
    from torch.nn.attention import SDPBackend
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    for d, L, causal in [(64, 1024, False), (64, 4096, False), (64, 4096, True), (128, 1024, False),
                         (128, 4096, False), (128, 16384, False), (128, 4096, True), (128, 16384, True), (256, 4096, False)]:
        B, H = 16384 // L, 2048 // d
        desc, inputs, out, lse, grad_out = bench_inputs(torch.bfloat16, B, H, L, d, causal)
        flops = desc.flops(backward=True)
        # rounded: what torch's own fused kernels compute, so what this problem gets by default
        ours = time_ours(desc, inputs, out, lse, grad_out, precision_config(desc, "rounded"))
        row = f"d={d} L={L} causal={causal:d}: triton bwd rounded {flops / ours * 1e-9:6.1f} TFLOP/s ({ours:.3f} ms)"
        exact = time_ours(desc, inputs, out, lse, grad_out, precision_config(desc, "exact"))
        row += f" | exact {flops / exact * 1e-9:6.1f}"
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            try:
                t = time_torch(inputs, grad_out, causal, backend)
                row += f" | {name} {flops / t * 1e-9:6.1f} (ratio {t / ours:.2f}x)"
            except RuntimeError as error:
                row += f" | {name} n/a ({str(error)[:40]})"
        print(row, flush=True)


def breakdown():
    """GPU time of each backward kernel (torch profiler), exact and rounded precision, bf16 d=128 L=4096."""
    from torch.profiler import ProfilerActivity, profile

    desc, inputs, out, lse, grad_out = bench_inputs(torch.bfloat16, 4, 16, 4096, 128, False)
    for name in ("exact", "rounded"):
        config = precision_config(desc, name)
        time_ours(desc, inputs, out, lse, grad_out, config)  # compile and warm up
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                launch_backward.attention_backward(desc, inputs, out, lse, grad_out, GradientsNeeded(), config=config)
            torch.cuda.synchronize()
        times = {}
        for event in prof.key_averages():
            if event.key.startswith("attention_backward"):
                times[event.key] = event.device_time_total / 20 / 1000  # ms per backward
        print(f"{name}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in sorted(times.items())), flush=True)


def sweep(options):
    d = int(options.get("d", 128))
    causal = options.get("causal", "0") == "1"
    L = int(options.get("L", 4096))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[options.get("dtype", "bf16")]
    B, H = 16384 // L, 2048 // d
    desc, inputs, out, lse, grad_out = bench_inputs(dtype, B, H, L, d, causal)
    flops = desc.flops(backward=True)
    default = precision_config(desc, options.get("precision", "rounded"))
    print(f"default: {default}")
    which = options.get("kernel", "dkdv")
    blocks = [(32, 64), (32, 128), (64, 64), (64, 128), (128, 64)] if which == "dkdv" else \
             [(64, 64), (128, 32), (128, 64), (128, 128)]
    stages = (2, 3)
    if d == 256:  # twice the operand bytes per row: smaller tiles, fewer stages
        blocks = [(16, 64), (16, 128), (32, 64), (64, 64)] if which == "dkdv" else [(32, 64), (64, 32), (64, 64), (128, 32)]
        stages = (1, 2)
    if options.get("quick") == "1":
        blocks, stages = blocks[1:4], (2,)
    tiles = [TileShape(bm, bn, warps, st) for (bm, bn), warps, st in itertools.product(blocks, (4, 8), stages)]
    if "tiles" in options:  # e.g. tiles=64x128x8x2,64x128x8x3
        tiles = [TileShape(*map(int, text.split("x"))) for text in options["tiles"].split(",")]
    # loads=pointers,host: the dK/dV kernel's Q/dO tile loads (BackwardConfig.dkdv_tile_loads)
    # early=0,1: BackwardConfig.dkdv_early_dp
    early_flags = [bool(int(f)) for f in options.get("early", str(int(default.dkdv_early_dp))).split(",")]
    for tile, loads, early in itertools.product(
            tiles, options.get("loads", default.dkdv_tile_loads).split(","), early_flags):
        config = replace(default, dkdv=tile) if which == "dkdv" else replace(default, dq=tile)
        config = replace(config, dkdv_tile_loads=loads, dkdv_early_dp=early)
        tile = f"{tile} loads={loads} early={int(early)}"
        try:
            ms = time_ours(desc, inputs, out, lse, grad_out, config)
            print(f"{which} {tile}: {flops / ms * 1e-9:6.1f} TFLOP/s ({ms:.3f} ms, whole backward)", flush=True)
        except Exception as error:  # out of resources etc.
            print(f"{which} {tile}: failed {type(error).__name__}: {str(error)[:60]}", flush=True)


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "correct"
    if mode == "correct":
        correct()
    elif mode == "bench":
        bench()
    elif mode == "breakdown":
        breakdown()
    else:
        sweep(dict(arg.split("=") for arg in sys.argv[2:]))
