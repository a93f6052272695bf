"""`flashsdpa check`: the validation matrix, against float64 and next to torch's own error.

Each row runs one problem through one backend on fresh random inputs (outputs
poisoned first), and compares the output (and, for gradient rows, dq/dk/dv)
with float64 math by relative Frobenius error, next to the error of torch's
own scaled_dot_product_attention on the same inputs at the same dtype. A row
passes when its error is within the dtype's bound and at most 1.5x torch's
(plus a rounding-level floor for float32, where both are at a few ulps).
Rows with variants torch's SDPA does not have (window, bottom-right alignment,
softcap, ALiBi, sinks) take the reference backend's formula instead, in
float64 and, for "torch's own" error, in the inputs' dtype (as torch's math
backend would compute it).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import flashsdpa
from flashsdpa import api
from flashsdpa.backends import reference
from flashsdpa.backends.base import poisoned_outputs
from flashsdpa.backends.triton import MAX_FP32_HEAD_DIM
from flashsdpa.dispatch import UnsupportedError

FORWARD_BOUND = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}
GRADIENT_BOUND = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}
# Below this, two float32 results differ only by summation order.
ROUNDING_FLOOR = {torch.float32: 5e-7, torch.float64: 1e-14}
TORCH_ERROR_FACTOR = 1.5


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[int, int, int, int, int, int]  # B, Hq, Hkv, L, S, E
    head_dim_v: int | None = None
    scale: float | None = None
    causal: bool = False
    mask: str | None = None  # "bool-keypad", "float-bias", "bool-empty-rows"
    layout: str = "contiguous"  # or "bshd" (transposed views) or "sliced"
    # The variants (see `flashsdpa.attention`); alibi: (B, H) slopes, sinks: (H,) logits, drawn at random.
    window: tuple[int | None, int | None] | None = None
    alignment: str = "top_left"
    softcap: float | None = None
    alibi: bool = False
    sinks: bool = False

    @property
    def has_variants(self) -> bool:
        return bool(self.window or self.alignment != "top_left" or self.softcap or self.alibi or self.sinks)

    def variants(self, dtype, device, generator) -> dict:
        """flashsdpa.attention's variant arguments for this case."""
        b, hq = self.shape[:2]
        options = dict(window=self.window, causal_alignment=self.alignment, softcap=self.softcap)
        if self.alibi:
            options["alibi_slopes"] = torch.rand(b, hq, generator=generator).to(device)
        if self.sinks:
            options["sinks"] = (torch.randn(hq, generator=generator) * 2).to(device=device, dtype=dtype)
        return options

    def make(self, dtype, device, generator):
        b, hq, hkv, l, s, e = self.shape
        ev = self.head_dim_v or e

        def rand(*shape):
            return torch.randn(*shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)

        if self.layout == "bshd":
            q, k, v = (rand(b, n, h, d).transpose(1, 2) for n, h, d in ((l, hq, e), (s, hkv, e), (s, hkv, ev)))
        elif self.layout == "sliced":
            q, k, v = (rand(b, h, 2 * n, d + 3)[:, :, ::2, 1 : d + 1] for h, n, d in ((hq, l, e), (hkv, s, e), (hkv, s, ev)))
        else:
            q, k, v = rand(b, hq, l, e), rand(b, hkv, s, e), rand(b, hkv, s, ev)
        mask = None
        if self.mask == "bool-keypad":
            mask = torch.ones(b, 1, 1, s, dtype=torch.bool, device=device)
            mask[0, ..., s // 2 :] = False
        elif self.mask == "float-bias":
            mask = rand(1, hq, l, s)
        elif self.mask == "bool-empty-rows":
            mask = torch.rand(l, s, generator=generator).to(device) > 0.5
            mask[: max(1, l // 4)] = False  # rows with no visible key: zeros, not NaN
        return q, k, v, mask


@dataclass
class Row:
    case: str
    backend: str
    dtype: str
    what: str
    max_abs: float
    rel: float
    torch_rel: float
    bound: float
    ok: bool
    seconds: float = 0.0
    note: str = field(default="")


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double().cpu(), ref.double().cpu()
    if not torch.isfinite(x).all():
        return math.inf
    denom = ref.norm().item()
    diff = (x - ref).norm().item()
    return diff / denom if denom > 0 else diff


def _float64_reference(case: Case, q, k, v, mask, scale, want_grad, grad_out):
    """Float64 math (torch's math path on float64 copies), with causal merged into the mask."""
    q64, k64, v64 = (t.detach().double().requires_grad_(want_grad) for t in (q, k, v))
    if mask is not None and mask.is_floating_point():
        mask = mask.double()
    merged = _merged_mask(case, mask, q.shape[-2], k.shape[-2], q.device)
    out = F.scaled_dot_product_attention(q64, k64, v64, attn_mask=merged, scale=scale, enable_gqa=True)
    out = torch.nan_to_num(out)  # torch's math path gives zeros for empty rows already; belt and braces
    grads = torch.autograd.grad(out, (q64, k64, v64), grad_out.double()) if want_grad else None
    return out.detach(), grads


def _merged_mask(case, mask, l, s, device):
    if not case.causal:
        return mask
    causal = torch.ones(l, s, dtype=torch.bool, device=device).tril()
    if mask is None:
        return causal
    return mask & causal if mask.dtype == torch.bool else mask.masked_fill(~causal, float("-inf"))


def _torch_run(case, q, k, v, mask, scale, want_grad, grad_out):
    qt, kt, vt = (t.detach().clone().requires_grad_(want_grad) for t in (q, k, v))
    merged = _merged_mask(case, mask, q.shape[-2], k.shape[-2], q.device)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=merged, scale=scale, enable_gqa=True)
    grads = torch.autograd.grad(out, (qt, kt, vt), grad_out) if want_grad else None
    return out.detach(), grads


def _variant_formula(case, q, k, v, mask, options, compute_dtype, want_grad, grad_out):
    """The reference backend's formula in `compute_dtype` (float64: the truth), on detached copies."""
    leaves = [t.detach().to(compute_dtype).requires_grad_(want_grad) for t in (q, k, v)]
    sinks = options.get("sinks")
    if sinks is not None:
        leaves.append(sinks.detach().to(compute_dtype).requires_grad_(want_grad))
    if mask is not None and mask.is_floating_point():
        mask = mask.to(compute_dtype)
    call = api.prepare(
        *leaves[:3], case.causal, case.scale, mask, 0.0, True, None, "ieee",
        **{**options, "sinks": leaves[3] if sinks is not None else None},
    )  # fmt: skip
    c, w = call.canon, call.variants
    out = reference.attention_math(call.desc, c.query, c.key, c.value, c.mask, w.alibi_slopes, w.sinks, None)[0]
    out = out.reshape(c.output_shape)
    grads = torch.autograd.grad(out, leaves, grad_out.to(compute_dtype)) if want_grad else None
    return out.detach(), grads


def run_case(case: Case, backend: str, dtype: torch.dtype, device: torch.device, gradients: bool, seed: int) -> list[Row]:
    generator = torch.Generator().manual_seed(seed)
    q, k, v, mask = case.make(dtype, device, generator)
    options = case.variants(dtype, device, generator) if case.has_variants else {}
    q, k, v = (t.requires_grad_(gradients) for t in (q, k, v))
    leaves = (q, k, v)
    if options.get("sinks") is not None:
        leaves = (q, k, v, options["sinks"].requires_grad_(gradients))
    grad_out = torch.randn(*q.shape[:-1], v.shape[-1], generator=generator).to(device=device, dtype=dtype)
    start = time.perf_counter()
    try:
        with poisoned_outputs():
            out = flashsdpa.attention(
                q, k, v, causal=case.causal, scale=case.scale, attn_mask=mask, enable_gqa=True, backend=backend,
                **options,
            )  # fmt: skip
            grads = torch.autograd.grad(out, leaves, grad_out) if gradients else None
    except UnsupportedError as declined:
        # An expected decline is not a failure (the automatic choice sends the problem to another
        # backend, for this reason); any other is, so a backend that wrongly refuses cannot pass.
        nan = float("nan")
        dtype_name = str(dtype).removeprefix("torch.")
        expected = expected_decline(case, backend, dtype)
        note = f"declined: {declined}" if expected else f"declined unexpectedly: {declined}"
        return [Row(case.name, backend, dtype_name, "-", nan, nan, nan, nan, expected, note=note)]
    seconds = time.perf_counter() - start
    if case.has_variants:
        ref_out, ref_grads = _variant_formula(case, q, k, v, mask, options, torch.float64, gradients, grad_out)
        torch_out, torch_grads = _variant_formula(case, q, k, v, mask, options, dtype, gradients, grad_out)
    else:
        ref_out, ref_grads = _float64_reference(case, q, k, v, mask, case.scale, gradients, grad_out)
        torch_out, torch_grads = _torch_run(case, q, k, v, mask, case.scale, gradients, grad_out)

    pairs = [("out", out, ref_out, torch_out, FORWARD_BOUND[dtype])]
    if gradients:
        for name, g, rg, tg in zip(("dq", "dk", "dv", "dsinks"), grads, ref_grads, torch_grads):
            pairs.append((name, g, rg, tg, GRADIENT_BOUND[dtype]))
    rows = []
    for what, ours, ref, theirs, bound in pairs:
        rel, torch_rel = relative_error(ours, ref), relative_error(theirs, ref)
        limit = min(bound, max(TORCH_ERROR_FACTOR * torch_rel, ROUNDING_FLOOR.get(dtype, 0.0)))
        max_abs = (ours.double().cpu() - ref.cpu()).abs().max().item() if ours.numel() else 0.0
        rows.append(
            Row(case.name, backend, str(dtype).removeprefix("torch."), what, max_abs, rel, torch_rel, limit,
                rel <= limit, seconds)
        )
    return rows


def expected_decline(case: Case, backend: str, dtype: torch.dtype) -> bool:
    """The problems a backend is meant to decline: triton's full-precision float32 over MAX_FP32_HEAD_DIM;
    aten's value head dims other than the query's and every variant (torch's CPU kernel has none)."""
    head_dim = max(case.shape[5], case.head_dim_v or 0)
    if backend == "aten":
        return case.has_variants or case.head_dim_v not in (None, case.shape[5])
    return backend == "triton" and dtype == torch.float32 and head_dim > MAX_FP32_HEAD_DIM


def default_cases(device: torch.device, quick: bool) -> list[Case]:
    """Scales x sizes, layouts, and edge cases. Smaller on the CPU interpreter."""
    scales = [None, 0.1, 0.25, 1 / math.sqrt(8), 0.5, 1.0, 1e-3, 10.0]
    sizes = [(4, 4), (16, 16), (32, 32), (100, 77)] + ([] if quick else [(256, 384)])
    cases = [Case(f"scale={s if s is None else round(s, 4)} {l}x{n}", (1, 2, 2, l, n, 8), scale=s)
             for s in scales for l, n in sizes]
    cases += [
        Case("bshd views d=64", (2, 4, 4, 33, 47, 64), layout="bshd"),
        Case("sliced views d=40", (1, 2, 2, 29, 31, 40), layout="sliced"),
        Case("causal L<S", (1, 2, 2, 20, 45, 32), causal=True),
        Case("causal L>S", (1, 2, 2, 45, 20, 32), causal=True),
        Case("bool key padding", (2, 2, 2, 24, 40, 32), mask="bool-keypad"),
        Case("float bias + causal", (1, 2, 2, 24, 24, 32), mask="float-bias", causal=True),
        Case("empty rows (all masked)", (1, 2, 2, 16, 24, 16), mask="bool-empty-rows"),
        Case("GQA 4:1, Ev=24", (1, 8, 2, 17, 33, 72), head_dim_v=24),
        Case("decode L=1", (2, 8, 2, 1, 100, 128)),
        Case("d=256", (1, 1, 1, 16, 20, 256)),
        Case("d=512 causal", (1, 1, 1, 17, 21, 512), causal=True),
        *variant_cases(),
    ]
    return cases


def variant_cases() -> list[Case]:
    return [
        Case("window L<S bottom-right", (1, 2, 2, 20, 45, 32), window=(7, 3), alignment="bottom_right"),
        Case("window L>S top-left", (1, 2, 2, 45, 20, 32), window=(4, 2)),
        Case("causal+window L>S b-right", (1, 2, 2, 45, 20, 32), causal=True, window=(5, None), alignment="bottom_right"),
        Case("softcap + float bias", (1, 2, 2, 24, 40, 32), softcap=5.0, mask="float-bias", scale=1.0),
        Case("ALiBi (B, H) GQA", (2, 4, 2, 30, 30, 32), alibi=True, causal=True),
        Case("sinks + empty rows", (1, 2, 2, 16, 24, 16), sinks=True, mask="bool-empty-rows"),
        Case("every variant GQA", (2, 4, 2, 33, 40, 32), causal=True, window=(9, None), alignment="bottom_right",
             softcap=4.0, alibi=True, sinks=True),
    ]


def gradient_cases() -> list[Case]:
    return [
        Case("grad scale=0.5", (1, 2, 2, 24, 40, 32), scale=0.5),
        Case("grad causal GQA", (1, 4, 2, 33, 33, 40), causal=True),
        Case("grad float bias bshd", (2, 2, 2, 19, 29, 64), mask="float-bias", layout="bshd"),
        Case("grad window sinks b-right", (1, 4, 2, 27, 41, 32), window=(6, 2), alignment="bottom_right", sinks=True),
        Case("grad softcap ALiBi causal", (1, 2, 2, 25, 25, 32), causal=True, softcap=3.0, alibi=True),
    ]


def available_backends(device: torch.device) -> list[str]:
    names = ["aten", "tiled"] if device.type == "cpu" else ["triton", "tiled"]
    if device.type == "cpu" and flashsdpa.dispatch.BACKENDS["triton"].unsupported_reasons(_probe(), device) == []:
        names.insert(0, "triton")  # only under TRITON_INTERPRET=1
    return names


def _probe():
    return flashsdpa.AttentionDescriptor((1,), 1, 1, 1, 1, 16, 16, torch.float32, "cpu")


def run_check(device: torch.device, quick: bool = False, dtypes=None):
    """Yields rows as they are computed (the first call of each kernel variant compiles it)."""
    dtypes = dtypes or [torch.float32, torch.float16, torch.bfloat16]
    seed = 0
    for backend in available_backends(device):
        interpreted = backend == "triton" and device.type == "cpu"
        cases = default_cases(device, quick or interpreted)
        if interpreted:
            cases = [c for c in cases if c.shape[3] * c.shape[4] <= 64 * 64 and max(c.shape[5], c.head_dim_v or 0) <= 64]
        for case in cases:
            for dtype in dtypes:
                seed += 1
                yield from run_case(case, backend, dtype, device, gradients=False, seed=seed)
        for case in gradient_cases():
            for dtype in dtypes:
                seed += 1
                yield from run_case(case, backend, dtype, device, gradients=True, seed=seed)
        for dtype in dtypes:
            seed += 1
            yield from packed_rows(backend, dtype, device, seed, small=quick or interpreted)


# ---- packed sequences (varlen_attn) and KV caches (kvcache_attention) -----------------------------


def _per_sequence(q, k, v, cu_q, cu_k, grad_out, want_grad):
    """Bottom-right causal attention of each packed sequence by torch's SDPA, at q's dtype (torch's own
    error) or on float64 copies (the reference); returns (out (T_q, Hq, Ev), (dq, dk, dv) or None).
    Each sequence is one 4-D call with the bottom-right mask, as a torch user makes it (3-D inputs would
    keep torch off its fused kernels, whose 16-bit gradients flashsdpa's backends follow)."""
    q, k, v = (t.detach().clone().requires_grad_(want_grad) for t in (q, k, v))
    outs = []
    for (q0, q1), (k0, k1) in zip(zip(cu_q[:-1], cu_q[1:]), zip(cu_k[:-1], cu_k[1:])):
        qs, ks, vs = (t.transpose(0, 1).unsqueeze(0) for t in (q[q0:q1], k[k0:k1], v[k0:k1]))  # (1, H, n, E)
        visible = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool, device=q.device).tril(k1 - k0 - (q1 - q0))
        out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=visible, enable_gqa=True)
        outs.append(torch.nan_to_num(out[0]).transpose(0, 1))
    out = torch.cat(outs)
    grads = torch.autograd.grad(out, (q, k, v), grad_out) if want_grad else None
    return out.detach(), grads


def _row(case, backend, dtype, what, ours, ref, theirs, bound, seconds) -> Row:
    rel, torch_rel = relative_error(ours, ref), relative_error(theirs, ref)
    limit = min(bound, max(TORCH_ERROR_FACTOR * torch_rel, ROUNDING_FLOOR.get(dtype, 0.0)))
    max_abs = (ours.double().cpu() - ref.double().cpu()).abs().max().item() if ours.numel() else 0.0
    return Row(case, backend, str(dtype).removeprefix("torch."), what, max_abs, rel, torch_rel, limit, rel <= limit,
               seconds)  # fmt: skip


def packed_rows(backend: str, dtype: torch.dtype, device: torch.device, seed: int, small: bool) -> list[Row]:
    """A packed batch of mixed lengths (causal, GQA, forward and gradients) through `varlen_attn`, and a
    paged decode step (page size 5) through `kvcache_attention`, each against float64 per sequence."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    lengths = (1, 37, 100, 5) if small else (1, 37, 1000, 5)
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    cu_tensor = torch.tensor(cu, dtype=torch.int32, device=device)
    q, k, v = (rand(cu[-1], h, 32).requires_grad_() for h in (4, 2, 2))
    grad_out = rand(cu[-1], 4, 32)
    case = f"varlen {','.join(map(str, lengths))} causal"
    start = time.perf_counter()
    with poisoned_outputs():
        out = flashsdpa.varlen_attn(q, k, v, cu_tensor, cu_tensor, max(lengths), max(lengths), window_size=(-1, 0),
                                    enable_gqa=True, backend=backend)  # fmt: skip
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
    seconds = time.perf_counter() - start
    ref, ref_grads = _per_sequence(q.double(), k.double(), v.double(), cu, cu, grad_out.double(), True)
    theirs, their_grads = _per_sequence(q, k, v, cu, cu, grad_out, True)
    rows = [_row(case, backend, dtype, "out", out, ref, theirs, FORWARD_BOUND[dtype], seconds)]
    for name, ours, r, t in zip(("dq", "dk", "dv"), grads, ref_grads, their_grads):
        rows.append(_row(case, backend, dtype, name, ours, r, t, GRADIENT_BOUND[dtype], seconds))

    # Paged decode: 3 sequences, a new token each, pages of 5 (not dividing the lengths), in shuffled order.
    lengths, page_size = (7, 0, 23) if small else (700, 0, 2300), 5
    pages_per_seq = max(lengths) // page_size + 1
    k_cache, v_cache = rand(len(lengths) * pages_per_seq, page_size, 2, 32), rand(len(lengths) * pages_per_seq,
                                                                                   page_size, 2, 32)  # fmt: skip
    table = torch.randperm(k_cache.shape[0], generator=generator).view(len(lengths), -1).to(device, torch.int32)
    q, k_new, v_new = rand(len(lengths), 1, 4, 32), rand(len(lengths), 1, 2, 32), rand(len(lengths), 1, 2, 32)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    start = time.perf_counter()
    with poisoned_outputs():
        out = flashsdpa.kvcache_attention(q, k_cache, v_cache, cache_seqlens=seqlens, k_new=k_new, v_new=v_new,
                                          block_table=table, backend=backend)  # fmt: skip
    seconds = time.perf_counter() - start
    keys = k_cache[table.long()].flatten(1, 2)
    values = v_cache[table.long()].flatten(1, 2)
    cu_k = [0]
    for n in lengths:
        cu_k.append(cu_k[-1] + n + 1)
    packed_k = torch.cat([keys[b, : n + 1] for b, n in enumerate(lengths)])
    packed_v = torch.cat([values[b, : n + 1] for b, n in enumerate(lengths)])
    cu_q = list(range(len(lengths) + 1))
    ref, _ = _per_sequence(q[:, 0].double(), packed_k.double(), packed_v.double(), cu_q, cu_k, None, False)
    theirs, _ = _per_sequence(q[:, 0], packed_k, packed_v, cu_q, cu_k, None, False)
    rows.append(_row(f"kvcache decode pages of {page_size}", backend, dtype, "out", out[:, 0], ref, theirs,
                     FORWARD_BOUND[dtype], seconds))  # fmt: skip
    return rows


HEADER = f"{'case':28} {'backend':8} {'dtype':9} {'what':6} {'max abs':>9} {'rel err':>9} {'torch rel':>9} {'bound':>9}  ok"


def format_row(r: Row) -> str:
    if r.note:
        return f"{r.case[:28]:28} {r.backend:8} {r.dtype:9} {r.note}"
    return (
        f"{r.case[:28]:28} {r.backend:8} {r.dtype:9} {r.what:6} {r.max_abs:9.2e} {r.rel:9.2e} "
        f"{r.torch_rel:9.2e} {r.bound:9.2e}  {'ok' if r.ok else 'FAIL'}"
    )
