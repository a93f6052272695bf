"""flashsdpa triton forward on the GPU: correctness, then TFLOP/s against torch SDPA in the same process.

Run from the repo root:  PYTHONPATH=src python bench_forward_gpu.py [--sweep]
"""
import dataclasses, math, sys
import torch, triton
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from flashsdpa.descriptor import AttentionDescriptor, MaskKind, Fp32Precision
from flashsdpa.backends.base import AttentionInputs
from flashsdpa.backends.triton import launch_forward as lf
from flashsdpa.backends.triton.forward_configs import choose_forward_config
from flashsdpa.dropout import full_keep_mask

dev = torch.device("cuda")
cap = torch.cuda.get_device_capability()
print(torch.cuda.get_device_name(), cap, "torch", torch.__version__, "triton", triton.__version__)

def describe(q, k, v, mask=None, causal=False, dropout_p=0.0, scale=None, precision=Fp32Precision.IEEE):
    mk, mdt, mb = MaskKind.NONE, None, (False,) * 4
    if mask is not None:
        mk, mdt = (MaskKind.BOOL if mask.dtype == torch.bool else MaskKind.FLOAT), mask.dtype
        mb = tuple(mask.stride(i) == 0 for i in range(4))
    return AttentionDescriptor(batch_shape=(q.shape[0],), heads_q=q.shape[1], heads_kv=k.shape[1], seq_q=q.shape[2],
        seq_kv=k.shape[2], head_dim=q.shape[3], head_dim_v=v.shape[3], dtype=q.dtype, device_type="cuda",
        causal=causal, mask=mk, mask_dtype=mdt, mask_broadcast=mb, dropout_p=dropout_p, scale=scale, fp32_precision=precision)

def ours(q, k, v, mask=None, causal=False, dropout_p=0.0, seed=None, config=None, path=None, **kw):
    desc = describe(q, k, v, mask, causal, dropout_p, **kw)
    inputs = AttentionInputs(q, k, v, mask, seed)
    if path == "main": return lf.launch_main_kernel(desc, inputs, config or choose_forward_config(desc.kernel_key, cap))
    return lf.attention_forward(desc, inputs, config)

def reference(q, k, v, mask, causal, scale, dropout_p=0.0, seed=None):
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) * scale
    if mask is not None: s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.double()
    if causal: s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    if dropout_p:
        B, H, L, S = s.shape
        p = p * full_keep_mask(seed, dropout_p, B * H, L, S, s.device).view(B, H, L, S) / (1 - dropout_p)
    return p @ v, lse

def rel(a, b): return ((a.double() - b).norm() / b.norm()).item()

# ---------- correctness ----------
TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}
bad = 0
torch.manual_seed(0)
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for (B, Hq, Hkv, L, S, E, Ev, causal, maskkind, p) in [
        (2, 8, 8, 1024, 1024, 128, 128, False, None, 0.0), (2, 8, 2, 777, 1999, 72, 72, True, None, 0.0),
        (2, 8, 8, 1000, 600, 64, 40, True, "bool", 0.0), (1, 4, 4, 300, 513, 256, 256, False, "float", 0.0),
        (2, 4, 4, 513, 513, 40, 40, False, "bool_kp", 0.1), (4, 32, 8, 1, 4099, 128, 128, False, None, 0.0),
        (4, 32, 8, 3, 1000, 128, 128, False, "float", 0.0), (2, 4, 4, 130, 130, 8, 8, True, None, 0.2)]:
        q = torch.randn(B, L, Hq, E, device=dev, dtype=dtype).transpose(1, 2)       # BSHD views
        k = torch.randn(B, S, Hkv, E, device=dev, dtype=dtype).transpose(1, 2)
        v = torch.randn(B, S, Hkv, Ev, device=dev, dtype=dtype).transpose(1, 2)
        mask = None
        if maskkind == "bool": mask = (torch.rand(1, Hq, L, S, device=dev) > 0.3).expand(B, Hq, L, S)
        if maskkind == "bool_kp": mask = (torch.rand(B, 1, 1, S, device=dev) > 0.3).expand(B, Hq, L, S)
        if maskkind == "float": mask = torch.randn(B, 1, L, S, device=dev, dtype=dtype).expand(B, Hq, L, S)
        seed = (1234, 5678) if p else None
        for scale in (None, 0.1, 10.0):
            out, lse = ours(q, k, v, mask, causal, p, seed, scale=scale)
            desc = describe(q, k, v, mask, causal, p, scale)
            ro, rl = reference(q, k, v, mask, causal, desc.scale, p, seed)
            fin = torch.isfinite(rl)
            eo, el = rel(out, ro), rel(lse[fin], rl[fin])
            ok = eo <= TOL[dtype] and el <= 1e-5 and torch.equal(torch.isneginf(lse), torch.isneginf(rl))
            bad += not ok
            print(f"{'OK ' if ok else 'BAD'} {str(dtype)[6:]:8s} B{B} H{Hq}/{Hkv} L{L} S{S} d{E}/{Ev} causal={causal} mask={maskkind} p={p} scale={scale}: out {eo:.2e} lse {el:.2e}")
print("correctness:", "ALL OK" if not bad else f"{bad} BAD")

# ---------- timing (PEERS.md setup: bf16, 16k tokens, heads = 2048/d) ----------
def tflops(ms, B, H, L, S, d, causal): return 4 * B * H * L * S * d / (2 if causal else 1) / ms * 1e-9

def bench_case(d, L, causal, dtype=torch.bfloat16, configs=None):
    B, H = 16384 // L, 2048 // d
    q, k, v = (torch.randn(B, H, L, d, device=dev, dtype=dtype) for _ in range(3))
    row = f"d={d} L={L} causal={causal} {str(dtype)[6:]}:"
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                ms = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
            row += f" {name} {tflops(ms, B, H, L, L, d, causal):.0f}"
        except RuntimeError:
            row += f" {name} n/a"
    for cname, cfg in (configs or {"ours": None}).items():
        try:
            ms = triton.testing.do_bench(lambda: ours(q, k, v, causal=causal, config=cfg, path="main"))
            row += f" | {cname} {tflops(ms, B, H, L, L, d, causal):.0f}"
        except Exception as e:
            row += f" | {cname} FAILED {type(e).__name__}: {str(e)[:80]}"
    print(row, "TFLOP/s", flush=True)

for d in (64, 128):
    for L in (1024, 4096, 16384):
        bench_case(d, L, False)
    for L in (1024, 4096, 16384):
        bench_case(d, L, True)
bench_case(128, 4096, False, torch.float32)

# decode: q (16, 32, 1, 128) against K/V (16, 8, S, 128), GQA
for S in (4096, 32768):
    q = torch.randn(16, 32, 1, 128, device=dev, dtype=torch.bfloat16)
    k, v = (torch.randn(16, 8, S, 128, device=dev, dtype=torch.bfloat16) for _ in range(2))
    ms = triton.testing.do_bench(lambda: ours(q, k, v))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        ms_flash = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    kv_bytes = 2 * k.numel() * k.element_size()
    print(f"decode S={S}: ours {kv_bytes / ms * 1e-9:.2f} TB/s, flash {kv_bytes / ms_flash * 1e-9:.2f} TB/s (K+V read once)")

# ---------- optional config sweep ----------
if "--sweep" in sys.argv:
    for d in (64, 128):
        desc = describe(*(torch.empty(1, 1, 1, d, device=dev, dtype=torch.bfloat16) for _ in range(3)))
        base = choose_forward_config(desc.kernel_key, cap)
        configs = {"table": base, "no-TMA": dataclasses.replace(base, tensor_descriptors=False),
                   "WS": dataclasses.replace(base, warp_specialize=True)}
        for bm, bn, w, s in ((128, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3)):
            configs[f"{bm}x{bn}w{w}s{s}"] = dataclasses.replace(base, block_m=bm, block_n=bn, num_warps=w, num_stages=s)
        for causal in (False, True):
            bench_case(d, 4096, causal, configs=configs)
