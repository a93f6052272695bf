"""flashsdpa triton forward on the GPU: correctness, then TFLOP/s against torch SDPA in the same process.

Run from the repo root:
    PYTHONPATH=src python scripts/bench_forward_gpu.py [--sweep] [--decode-sweep] [--fp32-sweep]
        [--table-only] [--rows d128L4096,...] [--jobs N]

Every kernel variant the run needs is compiled first by --jobs worker processes
(each runs its share of the calls once, filling Triton's on-disk cache), so the
timed process only loads them: Triton compiles one variant at a time, a few
seconds each on the H100 machines, and a sweep needs dozens.

--table-only runs the PEERS.md table with the default configs and nothing that
needs this version's config fields, so an older checkout can be timed with it
(PYTHONPATH=old/src) for a before/after comparison on the same machine.

Timings are medians of triton.testing.do_bench (which clears L2 between calls).
TFLOP/s counts 4*B*H*L*S*d, halved when causal; decode counts K+V bytes read once.
"""

import argparse
import dataclasses
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from flashsdpa.backends.base import AttentionInputs, poisoned_outputs
from flashsdpa.backends.triton import launch_forward as lf
from flashsdpa.backends.triton.forward_configs import choose_forward_config
from flashsdpa.descriptor import AttentionDescriptor, Fp32Precision, MaskKind
from flashsdpa.dropout import full_keep_mask

parser = argparse.ArgumentParser()
parser.add_argument("--sweep", action="store_true", help="time block-shape variants of the main kernel")
parser.add_argument("--specs", default="", help="with --sweep: comma-separated variants instead of the lists "
                    "below, e.g. 128x64w8s2r128,128x64w8s2 (--rows picks the rows)")
parser.add_argument("--decode-sweep", action="store_true", help="time decode block shapes and split counts")
parser.add_argument("--fp32-sweep", action="store_true", help="time float32 variants (split tf32, tf32x3, tf32)")
parser.add_argument("--table-only", action="store_true", help="only the default-config table (old checkouts too)")
parser.add_argument("--skip-correctness", action="store_true")
parser.add_argument("--correctness-only", action="store_true")
parser.add_argument("--rows", default="", help="comma-separated table rows to keep, e.g. d128L4096,d128L1024c")
parser.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1), help="compile worker processes")
parser.add_argument("--warm", default="", help=argparse.SUPPRESS)  # "i/n": worker i of n only compiles
parser.add_argument("--smoke", action="store_true",
                    help="check this script on the CPU: TRITON_INTERPRET=1, tiny sizes, no GPU timers")
args = parser.parse_args()

SMOKE = args.smoke
if SMOKE:
    args.jobs = 1
dev = torch.device("cpu" if SMOKE else "cuda")
cap = None if SMOKE else torch.cuda.get_device_capability()


def size(n: int) -> int:
    """A length of the real run; 64x smaller (at least 1) for --smoke."""
    return max(1, n // 64) if SMOKE else n


def bench_ms(fn) -> float:
    if SMOKE:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    return triton.testing.do_bench(fn, return_mode="median")
WARM = tuple(int(x) for x in args.warm.split("/")) if args.warm else None
_item = 0


def mine() -> bool:
    """Whether this process runs the next call site: all of them, or a worker's share while warming."""
    global _item
    _item += 1
    return WARM is None or (_item - 1) % WARM[1] == WARM[0]


if WARM is None and args.jobs > 1:
    start = time.time()
    worker_args, skip_value = [], False
    for arg in sys.argv[1:]:  # every argument but --jobs N / --jobs=N
        if skip_value or arg.startswith("--jobs="):
            skip_value = False
        elif arg == "--jobs":
            skip_value = True
        else:
            worker_args.append(arg)
    workers = [
        subprocess.Popen([sys.executable, __file__, *worker_args, f"--warm={i}/{args.jobs}", "--jobs=1"])
        for i in range(args.jobs)
    ]
    failed = sum(w.wait() != 0 for w in workers)
    print(f"compiled in {args.jobs} workers: {time.time() - start:.0f} s ({failed} failed)", flush=True)

if WARM is None and not SMOKE:
    print(torch.cuda.get_device_name(), cap, "torch", torch.__version__, "triton", triton.__version__, flush=True)

def describe(q, k, v, mask=None, causal=False, dropout_p=0.0, scale=None, precision=Fp32Precision.IEEE):
    mk, mdt, mb = MaskKind.NONE, None, (False,) * 4
    if mask is not None:
        mk, mdt = (MaskKind.BOOL if mask.dtype == torch.bool else MaskKind.FLOAT), mask.dtype
        mb = tuple(mask.stride(i) == 0 for i in range(4))
    return AttentionDescriptor(
        batch_shape=(q.shape[0],), heads_q=q.shape[1], heads_kv=k.shape[1], seq_q=q.shape[2], seq_kv=k.shape[2],
        head_dim=q.shape[3], head_dim_v=v.shape[3], dtype=q.dtype, device_type=dev.type, causal=causal, mask=mk,
        mask_dtype=mdt, mask_broadcast=mb, dropout_p=dropout_p, scale=scale, fp32_precision=precision,
    )


def ours(q, k, v, mask=None, causal=False, dropout_p=0.0, seed=None, config=None, path=None, splits=None, **kw):
    desc = describe(q, k, v, mask, causal, dropout_p, **kw)
    inputs = AttentionInputs(q, k, v, mask, seed)
    if config is None and path is not None:
        config = choose_forward_config(desc.kernel_key, cap)
    if path == "main":
        return lf.launch_main_kernel(desc, inputs, config)
    if path == "decode":
        return lf.launch_decode_kernels(desc, inputs, config, num_splits=splits)
    return lf.attention_forward(desc, inputs, config)


def reference(q, k, v, mask, causal, scale, dropout_p=0.0, seed=None):
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) * scale
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.double()
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    if dropout_p:
        B, H, L, S = s.shape
        p = p * full_keep_mask(seed, dropout_p, B * H, L, S, s.device).view(B, H, L, S) / (1 - dropout_p)
    return p @ v, lse


def torch_own(q, k, v, mask, causal, scale):
    """torch's SDPA at the input dtype on this GPU (mask and causal merged), for its own error."""
    if causal:
        visible = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        if mask is None:
            mask = visible
        elif mask.dtype == torch.bool:
            mask = mask & visible
        else:
            mask = mask.masked_fill(~visible, -math.inf)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


# ---------- correctness ----------
# float32 passes at <= 2e-6, or at <= 1.5x torch's own float32 error on the same inputs (the project's rule;
# at scale 10 float32 rounding of the scores alone is ~5e-6, for torch as for us). tf32 is opt-in and coarse.
TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2, "tf32": 3e-3}
CASES = [  # B, Hq, Hkv, L, S, E, Ev, causal, mask, dropout p
    (2, 8, 8, 1024, 1024, 128, 128, False, None, 0.0), (2, 8, 2, 777, 1999, 72, 72, True, None, 0.0),
    (2, 8, 8, 1000, 600, 64, 40, True, "bool", 0.0), (1, 4, 4, 300, 513, 256, 256, False, "float", 0.0),
    (2, 4, 4, 513, 513, 40, 40, False, "bool_kp", 0.1), (4, 32, 8, 1, 4099, 128, 128, False, None, 0.0),
    (4, 32, 8, 3, 1000, 128, 128, False, "float", 0.0), (2, 4, 4, 130, 130, 8, 8, True, None, 0.2),
    (2, 4, 4, 300, 257, 5, 5, False, None, 0.0), (3, 4, 2, 200, 333, 64, 64, True, "expand_kv", 0.0),
]
bad = 0
summary = []


def check(label, dtype, q, k, v, mask, causal, p, seed, scale, tol_key=None, precision=Fp32Precision.IEEE, **kw):
    global bad
    if not mine():
        return
    try:
        with poisoned_outputs():
            out, lse = ours(q, k, v, mask, causal, p, seed, scale=scale, precision=precision, **kw)
    except Exception as e:  # report and go on: one broken variant should not hide the others
        bad += 1
        print(f"BAD {label}: {type(e).__name__}: {str(e)[:200]}", flush=True)
        return
    if WARM is not None:
        return
    desc = describe(q, k, v, mask, causal, p, scale)
    ro, rl = reference(q, k, v, mask, causal, desc.scale, p, seed)
    fin = torch.isfinite(rl)
    eo, el = rel(out, ro), rel(lse[fin], rl[fin])
    bar = TOL[tol_key or dtype]
    torch_note = ""
    if dtype == torch.float32 and tol_key is None and not p:
        torch_err = rel(torch_own(q, k, v, mask, causal, desc.scale), ro)
        bar = max(bar, 1.5 * torch_err)
        torch_note = f" (torch's own {torch_err:.2e})"
    lse_bar = 1e-3 if tol_key == "tf32" else 1e-5  # tf32 scores carry ~1e-4 relative error into lse
    ok = (
        eo <= bar and el <= lse_bar and not out.isnan().any()
        and torch.equal(torch.isneginf(lse), torch.isneginf(rl))
    )
    bad += not ok
    print(f"{'OK ' if ok else 'BAD'} {label}: out {eo:.2e}{torch_note} lse {el:.2e}", flush=True)


def make_case(dtype, B, Hq, Hkv, L, S, E, Ev, maskkind):
    L, S = (min(L, size(L * 8)), size(S * 8)) if SMOKE else (L, S)
    q = torch.randn(B, L, Hq, E, device=dev, dtype=dtype).transpose(1, 2)  # BSHD views
    k = torch.randn(B, S, Hkv, E, device=dev, dtype=dtype).transpose(1, 2)
    v = torch.randn(B, S, Hkv, Ev, device=dev, dtype=dtype).transpose(1, 2)
    mask = None
    if maskkind == "bool":
        mask = (torch.rand(1, Hq, L, S, device=dev) > 0.3).expand(B, Hq, L, S)
    if maskkind == "bool_kp":
        mask = (torch.rand(B, 1, 1, S, device=dev) > 0.3).expand(B, Hq, L, S)
    if maskkind == "float":
        mask = torch.randn(B, 1, L, S, device=dev, dtype=dtype).expand(B, Hq, L, S)
    if maskkind == "expand_kv":  # K/V shared by the batch: batch stride 0 (no 4-D TMA descriptor)
        k, v = k[:1].expand_as(k), v[:1].expand_as(v)
    return q, k, v, mask


if not args.skip_correctness:
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for B, Hq, Hkv, L, S, E, Ev, causal, maskkind, p in CASES:
            q, k, v, mask = make_case(dtype, B, Hq, Hkv, L, S, E, Ev, maskkind)
            seed = (1234, 5678) if p else None
            scales = (None, 0.1, 10.0) if args.table_only else (None, 0.1, 10.0, -0.3, 0.0)
            for scale in scales:
                label = (f"{str(dtype)[6:]:8s} B{B} H{Hq}/{Hkv} L{L} S{S} d{E}/{Ev} causal={causal} mask={maskkind} "
                         f"p={p} scale={scale}")
                check(label, dtype, q, k, v, mask, causal, p, seed, scale)
            if dtype == torch.float32 and not p and not args.table_only:
                check(label.replace("float32 ", "tf32    ").replace(f"scale={scale}", "scale=None"), dtype,
                      q, k, v, mask, causal, p, seed, None, tol_key="tf32", precision=Fp32Precision.TF32)
    if not args.table_only:
        # flash decoding with pinned split counts: one split writes the output itself, more are merged
        for dtype in (torch.float32, torch.bfloat16):
            for splits in (1, 2, 7):
                q, k, v, mask = make_case(dtype, 3, 16, 4, 2, 3001, 128, 128, None)
                check(f"{str(dtype)[6:]:8s} decode B3 H16/4 L2 S3001 d128 splits={splits}", dtype,
                      q, k, v, None, False, 0.0, None, None, path="decode", splits=splits)
    if WARM is None:
        print("correctness:", "ALL OK" if not bad else f"{bad} BAD", flush=True)
        summary.append(f"correctness: {'ALL OK' if not bad else f'{bad} BAD'}")


if args.correctness_only:
    sys.exit(1 if bad else 0)

# ---------- timing (PEERS.md setup: bf16, 16k tokens, heads = 2048/d) ----------
def tflops(ms, B, H, L, S, d, causal):
    return 4 * B * H * L * S * d / (2 if causal else 1) / ms * 1e-9


def timed(fn):
    """Median ms of fn (None while warming: then only this process's share runs, once, to compile)."""
    if not mine():
        return None
    if WARM is not None:
        fn()
        return None
    return bench_ms(fn)


def row_name(d, L, causal, dtype=torch.bfloat16):
    return f"d{d}L{L}{'c' if causal else ''}{'' if dtype == torch.bfloat16 else str(dtype)[6:]}"


def bench_case(d, L, causal, dtype=torch.bfloat16, configs=None, peers=True):
    name = row_name(d, L, causal, dtype)
    if args.rows and name not in args.rows.split(","):
        return
    B, H = 16384 // L, 2048 // d
    if SMOKE:
        B, H, L = 2, 2, size(L)
    q, k, v = (torch.randn(B, H, L, d, device=dev, dtype=dtype) for _ in range(3))
    row = f"d={d} L={L} causal={causal} {str(dtype)[6:]}:"
    results = {}
    if peers and WARM is None:
        for peer, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            try:
                with sdpa_kernel(backend):
                    ms = bench_ms(
                        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                    )
                results[peer] = tflops(ms, B, H, L, L, d, causal)
            except RuntimeError:
                results[peer] = None
    for cname, cfg in (configs or {"ours": None}).items():
        try:
            ms = timed(lambda: ours(q, k, v, causal=causal, config=cfg, path="main" if cfg else None))
            results[cname] = None if ms is None else tflops(ms, B, H, L, L, d, causal)
        except Exception as e:  # a variant that fails to compile or launch is reported, not fatal
            results[cname] = f"FAILED {type(e).__name__}: {str(e)[:60]}"
    if WARM is None:
        cells = [f"{n} {r:.0f}" if isinstance(r, float) else f"{n} {r or 'n/a'}" for n, r in results.items()]
        print(row, " | ".join(cells), "TFLOP/s", flush=True)
    return results


TABLE = [(d, L, causal) for d in (64, 128) for causal in (False, True) for L in (1024, 4096, 16384)]
table = {}
for d, L, causal in TABLE:
    table[row_name(d, L, causal)] = bench_case(d, L, causal)
for precision in (Fp32Precision.IEEE, Fp32Precision.TF32):
    if args.rows and "d128L4096float32" not in args.rows.split(","):
        break
    B, H, L, d = (4, 16, 4096, 128) if not SMOKE else (1, 2, 64, 128)
    q, k, v = (torch.randn(B, H, L, d, device=dev, dtype=torch.float32) for _ in range(3))
    ms = timed(lambda: ours(q, k, v, precision=precision))
    if ms is not None:
        try:
            with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                ms_torch = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v))
        except RuntimeError:  # no mem-efficient kernel (the CPU smoke run)
            ms_torch = float("nan")
        line = (f"float32 d={d} L={L} ({precision.value}): ours {tflops(ms, B, H, L, L, d, False):.0f}, "
                f"torch mem-efficient {tflops(ms_torch, B, H, L, L, d, False):.0f} TFLOP/s")
        print(line, flush=True)
        summary.append(line)

# decode: q (16, 32, 1, 128) against K/V (16, 8, S, 128), GQA
for S in (4096, 32768):
    if args.rows and f"decode{S}" not in args.rows.split(","):
        continue
    q = torch.randn(16, 32, 1, 128, device=dev, dtype=torch.bfloat16)
    k, v = (torch.randn(16, 8, size(S), 128, device=dev, dtype=torch.bfloat16) for _ in range(2))
    kv_bytes = 2 * k.numel() * k.element_size()
    ms = timed(lambda: ours(q, k, v))
    if ms is not None:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            ms_flash = bench_ms(
                lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            )
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            try:
                ms_cudnn = bench_ms(
                    lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                )
            except RuntimeError:
                ms_cudnn = float("nan")
        line = (f"decode S={S}: ours {kv_bytes / ms * 1e-9:.2f} TB/s, flash {kv_bytes / ms_flash * 1e-9:.2f}, "
                f"cudnn {kv_bytes / ms_cudnn * 1e-9:.2f} TB/s (K+V read once)")
        print(line, flush=True)
        summary.append(line)


# ---------- optional sweeps ----------
def variant(base, spec):
    """A config from a name like '128x64w8s2r128+device': blocks, warps, stages, register cap, tile loads."""
    shape, _, loads = spec.partition("+")
    bm, rest = shape.split("x")
    bn, rest = rest.split("w")
    w, rest = rest.split("s")
    s, _, regs = rest.partition("r")
    changes = dict(block_m=int(bm), block_n=int(bn), num_warps=int(w), num_stages=int(s),
                   max_registers=int(regs) if regs else None)
    if loads == "ws":
        changes["warp_specialize"] = True
    elif loads:
        changes["tile_loads"] = loads
    return dataclasses.replace(base, **changes)


SWEEP = {  # the table's config first
    64: ["128x64w4s3", "128x64w4s3r168", "64x64w4s3", "128x128w8s2r128", "64x128w4s3"],
    128: ["128x128w8s3", "128x64w8s2r128", "64x64w4s3", "64x128w4s2", "128x128w8s3+device"],
}
SWEEP_ROWS = {64: ((1024, False), (2048, False), (4096, False), (4096, True), (8192, True), (16384, True)),
              128: ((1024, False), (4096, False), (1024, True), (4096, True), (16384, True))}
if args.sweep and not args.table_only:
    for d in (64, 128):
        base = choose_forward_config(describe(*(torch.empty(1, 1, 1, d, device=dev, dtype=torch.bfloat16),) * 3)
                                     .kernel_key, cap)
        specs = args.specs.split(",") if args.specs else SWEEP[d]
        configs = {spec: variant(base, spec) for spec in specs}
        for L, causal in SWEEP_ROWS[d]:
            results = bench_case(d, L, causal, configs=configs, peers=False)
            if results and WARM is None:
                peers = table.get(row_name(d, L, causal)) or {}
                best = max((r, n) for n, r in results.items() if isinstance(r, float))
                summary.append(f"sweep d={d} L={L} causal={causal}: best {best[1]} {best[0]:.0f} "
                               f"(cudnn {peers.get('cudnn') or 0:.0f}, flash {peers.get('flash') or 0:.0f})")

if args.fp32_sweep and not args.table_only:
    B, H, L, d = (4, 16, 4096, 128) if not SMOKE else (1, 2, 64, 128)
    q, k, v = (torch.randn(B, H, L, d, device=dev, dtype=torch.float32) for _ in range(3))
    # Errors on two heads, at the default scale and at scale 10 (where float32 rounding of the scores shows).
    sq, sk, sv = q[:1, :2], k[:1, :2], v[:1, :2]
    refs = {sc: reference(sq, sk, sv, None, False, sc)[0] for sc in (d ** -0.5, 10.0)}
    torch_errs = {sc: rel(torch_own(sq, sk, sv, None, False, sc), r) for sc, r in refs.items()}
    line = "fp32 torch's own error: " + ", ".join(f"scale {sc:.3g} {e:.1e}" for sc, e in torch_errs.items())
    print(line, flush=True)
    summary.append(line)
    for precision, specs in ((Fp32Precision.IEEE, ["128x64w8s2", "128x32w8s2", "128x32w8s3", "64x64w4s2",
                                                   "64x64w4s3", "64x32w4s3", "128x64w8s2r168", "128x128w8s1"]),
                             (Fp32Precision.TF32, ["128x64w8s2"])):
        base = choose_forward_config(describe(q, k, v, precision=precision).kernel_key, cap)
        if precision is Fp32Precision.IEEE:
            variants = {f"halves {spec}": variant(base, spec) for spec in specs}
            variants.update({f"tf32x3 {spec}": dataclasses.replace(variant(base, spec), split_products=False)
                             for spec in ["128x32w8s2"]})
        else:
            variants = {spec: variant(base, spec) for spec in specs}
        cells = []
        for name, cfg in variants.items():
            try:
                ms = timed(lambda: ours(q, k, v, config=cfg, path="main", precision=precision))
                if ms is not None:
                    errs = []
                    for sc, r in refs.items():
                        out, _ = ours(sq, sk, sv, config=cfg, path="main", precision=precision, scale=sc)
                        errs.append(f"{rel(out, r):.1e}")
                    cells.append(f"{name} {tflops(ms, B, H, L, L, d, False):.0f} (err {'/'.join(errs)})")
            except Exception as e:
                cells.append(f"{name} FAILED {type(e).__name__}: {str(e)[:60]}")
        if WARM is None:
            line = f"fp32 sweep d=128 L=4096 {precision.value}: " + " | ".join(cells)
            print(line, flush=True)
            summary.append(line)

if args.decode_sweep and not args.table_only:
    for S in (4096, 16384, 32768):
        q = torch.randn(16, 32, 1, 128, device=dev, dtype=torch.bfloat16)
        k, v = (torch.randn(16, 8, size(S), 128, device=dev, dtype=torch.bfloat16) for _ in range(2))
        kv_bytes = 2 * k.numel() * k.element_size()
        base = choose_forward_config(describe(q, k, v).kernel_key, cap)
        cells = []
        for bn, w, st in ((64, 4, 3), (64, 4, 4), (32, 4, 4), (128, 4, 2), (128, 8, 3)):
            cfg = dataclasses.replace(base, decode=dataclasses.replace(base.decode, block_n=bn, num_warps=w,
                                                                       num_stages=st))
            for splits in (1, 2, 3, 4, 5, 6, 8, 12, 16):
                ms = timed(lambda: ours(q, k, v, config=cfg, path="decode", splits=splits))
                if ms is not None:
                    cells.append((kv_bytes / ms * 1e-9, f"n{bn}w{w}s{st}x{splits}"))
        if WARM is None:
            cells.sort(reverse=True)
            line = f"decode sweep S={S} (TB/s): " + ", ".join(f"{n} {r:.2f}" for r, n in cells[:12])
            print(line, flush=True)
            print("  all:", ", ".join(f"{n} {r:.2f}" for r, n in sorted(cells, key=lambda c: c[1])), flush=True)
            summary.append(line)

if WARM is None:
    print("\n===== summary =====")
    for name, r in table.items():
        if r:
            ours_r, cudnn_r, flash_r = r.get("ours"), r.get("cudnn"), r.get("flash")
            fmt = lambda x: f"{x:5.0f}" if isinstance(x, float) else f"{str(x):>5}"
            print(f"{name:12s} cudnn {fmt(cudnn_r)} flash {fmt(flash_r)} ours {fmt(ours_r)}")
    for line in summary:
        print(line)
