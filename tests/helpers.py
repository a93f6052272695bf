"""Shared oracles, tolerances and runners for the flashsdpa tests.

Every numeric check compares a backend with float64 math on the very same
(already rounded) inputs, by relative Frobenius error ||x - ref|| / ||ref||,
against two bars:

* an absolute bar per dtype (FORWARD_TOL / GRAD_TOL below, from the issues);
* at most 1.5x the error of torch's own SDPA run on the same inputs at the
  input dtype on the same device ("torch's own error"). Where torch's error is
  at float32 rounding level (~1e-7) a summation-order difference alone can
  exceed 1.5x it, so float32 gets a tiny floor, FP32_FLOOR_FORWARD = 5e-7 and
  FP32_FLOOR_GRAD = 1e-6: 4 and 8 float32 ulps, 4x and 10x under the absolute
  bars. bfloat16 and float16 get no floor.
* A gradient that is zero in exact math (the grad of a float mask broadcast
  over the key dim: each softmax row's score gradients sum to zero) has no
  relative error; it is bounded instead by the bar times the norm of the full
  (unreduced) score gradient.

The float64 oracle (`oracle`) is explicit softmax math on the caller's shapes
(broadcast batch dims, GQA by repeat_interleave, bool/float masks, top-left
causal, rows with no visible key -> zeros and lse -inf, dropout by a given
keep-mask), differentiable by torch autograd; `test_forward.py` checks it
against torch's float64 SDPA where torch accepts the problem.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import flashsdpa
from flashsdpa.backends.base import poisoned_outputs
from flashsdpa.dropout import draw_seed, full_keep_mask, split_seed

ON_CUDA = torch.cuda.is_available()
# Sequence lengths of the (slow, interpreted on CPU) triton tests are multiplied by SIZE on CUDA.
SIZE = int(os.environ.get("FLASHSDPA_TEST_SIZE", "4" if ON_CUDA else "1"))

BACKENDS = ("triton", "tiled")  # the two flash backends; "reference" is added where it makes sense
HALF_DTYPES = (torch.float16, torch.bfloat16)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

FORWARD_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 2e-6, torch.float64: 1e-12}
GRAD_TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-5, torch.float64: 1e-10}
FP32_FLOOR_FORWARD = 5e-7  # ~4 float32 ulps (eps = 1.19e-7); 4x under the 2e-6 bar
# Gradients pass one more cancellation (dS = P * (dP - rowsum(dO * O))), so their rounding level is higher.
FP32_FLOOR_GRAD = 1e-6  # ~8 float32 ulps; 10x under the 1e-5 bar
TORCH_ERROR_FACTOR = 1.5
# The triton backend's float32 forward multiplies operands split into two
# float16 halves: 22 of float32's 24 bits, three tensor-core products per
# product (the accuracy of split tf32 products, see halves_kernels). The
# interpreter runs that arithmetic too, while torch's CPU kernels round each
# float32 dot product once, so on small problems with large scores its error
# reaches 2-3x torch's own (measured: d=16-32, scale 4-4.6, 21-70 keys: up to
# 3.0x, mean 1.3-1.6x; at the default scale 0.96-1.2x; the backward's
# gradients, on the same products: 1.54x seen, d=8, scale 4.3). On the H100 the same
# kernel's error is below torch's own (d=128, L=4096: 4.1e-7 and 3.1e-6 at
# scales 0.088 and 10, against 7.3e-7 and 3.7e-6). The absolute bar (2e-6)
# holds either way.
SPLIT_PRODUCTS_TORCH_FACTOR = 3.0
# On problems of a handful of scores one backend's error is up to 1.9x another's
# by rounding noise alone (tests/test_properties.py, `build`).
SMALL_PROBLEM_TORCH_FACTOR = 2.0
# lse is float32 from float32 accumulators: absolute + relative bar on it.
LSE_ATOL = 1e-5
LSE_RTOL = 1e-5


def seq(n: int) -> int:
    """A sequence length for the triton tests: n on the CPU interpreter; larger (and still odd-sized) on CUDA."""
    return n if SIZE == 1 else n * SIZE + 3


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, gen: torch.Generator, dtype=torch.float32, device="cpu", scale: float = 1.0) -> torch.Tensor:
    """Standard normal data (drawn on the CPU so CPU and CUDA runs see the same values), then cast."""
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)


def qkv(batch_heads_q, batch_heads_kv, seq_q, seq_kv, head_dim, gen, dtype, device, head_dim_v=None, scale=1.0):
    """(q, k, v) with q (*batch_heads_q, L, E), k (*batch_heads_kv, S, E), v (*batch_heads_kv, S, Ev)."""
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    q = randn((*batch_heads_q, seq_q, head_dim), gen, dtype, device, scale)
    k = randn((*batch_heads_kv, seq_kv, head_dim), gen, dtype, device, scale)
    v = randn((*batch_heads_kv, seq_kv, head_dim_v), gen, dtype, device, scale)
    return q, k, v


def random_bool_mask(shape, gen, device, keep_fraction=0.7, ensure_first_key=True) -> torch.Tensor:
    """True = may attend; key 0 kept everywhere (unless told otherwise) so no row is fully masked by chance."""
    mask = torch.rand(shape, generator=gen) < keep_fraction
    if ensure_first_key:
        mask[..., 0] = True
    return mask.to(device)


def random_float_mask(shape, gen, dtype, device, with_neg_inf=True) -> torch.Tensor:
    """An additive mask: normal values, and -inf on ~20% of keys (never key 0)."""
    mask = torch.randn(shape, generator=gen, dtype=torch.float64) * 2.0
    if with_neg_inf:
        hidden = torch.rand(shape, generator=gen) < 0.2
        hidden[..., 0] = False
        mask = mask.masked_fill(hidden, float("-inf"))
    return mask.to(dtype).to(device)


# --------------------------------------------------------------------------- oracles


def causal_visible(seq_q: int, seq_kv: int, device) -> torch.Tensor:
    """Top-left causal: query i sees keys j <= i."""
    return torch.ones(seq_q, seq_kv, dtype=torch.bool, device=device).tril()


def oracle(q, k, v, attn_mask=None, causal=False, scale=None, enable_gqa=False, dropout_p=0.0, keep=None):
    """float64 (out, lse) by explicit softmax math, on the caller's shapes; differentiable.

    keep: the bool dropout keep-mask, broadcastable to the scores (see `keep_mask_for`).
    """
    q64, k64, v64 = (t if t.dtype == torch.float64 else t.to(torch.float64) for t in (q, k, v))
    head_dim = q.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim) if head_dim else 1.0
    if enable_gqa and q.dim() >= 3 and k.shape[-3] != q.shape[-3]:
        group = q.shape[-3] // k64.shape[-3]
        k64 = k64.repeat_interleave(group, dim=-3)
        v64 = v64.repeat_interleave(group, dim=-3)
    scores = (q64 @ k64.transpose(-1, -2)) * scale
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(torch.float64)
    seq_q, seq_kv = scores.shape[-2], scores.shape[-1]
    if causal:
        scores = scores.masked_fill(~causal_visible(seq_q, seq_kv, scores.device), float("-inf"))
    out_shape = (*scores.shape[:-1], v64.shape[-1])
    if seq_kv == 0 or seq_q == 0:
        zero = (scores.sum(-1, keepdim=True) * v64.sum(-2, keepdim=True)).sum() * 0.0  # keeps the graph
        out = torch.zeros(out_shape, dtype=torch.float64, device=scores.device) + zero
        return out, torch.full(scores.shape[:-1], float("-inf"), dtype=torch.float64, device=scores.device)
    row_max = scores.detach().amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    row_sum = weights.sum(dim=-1, keepdim=True)
    probs = weights / torch.where(row_sum == 0, torch.ones_like(row_sum), row_sum)  # empty row -> zeros
    lse = (row_max + torch.log(row_sum.detach())).squeeze(-1)
    if keep is not None and dropout_p > 0.0:
        probs = probs * keep.to(torch.float64) / (1.0 - dropout_p)
    return probs @ v64, lse


def variants_oracle(
    q, k, v, *, causal=False, window=None, alignment="top_left", softcap=None, alibi_slopes=None, sinks=None,
    attn_mask=None, scale=None, keep=None, dropout_p=0.0, dtype=torch.float64,
):
    """(out, lse) in `dtype` (float64: the truth; the inputs' dtype: the stand-in for torch's own error, as
    torch has no such variants) of the variants' semantics (`flashsdpa.attention`), written out element by element.

    Canonical shapes: q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev), Hq a multiple of Hkv; alibi_slopes
    (Hq,) or (B, Hq); sinks (Hq,); attn_mask and keep broadcast to (B, Hq, L, S). Differentiable in q, k, v,
    sinks and a float mask. Visibility is decided pair by pair in Python (small problems only), independently
    of flashsdpa's code.
    """
    q64, k64, v64 = (t.to(dtype) for t in (q, k, v))
    b, hq, seq_q, head_dim = q64.shape
    group = hq // k64.shape[1]
    k64, v64 = k64.repeat_interleave(group, dim=1), v64.repeat_interleave(group, dim=1)
    seq_kv = k64.shape[2]
    scale = (1.0 / math.sqrt(head_dim) if head_dim else 1.0) if scale is None else scale
    offset = seq_kv - seq_q if alignment == "bottom_right" else 0
    left, right = (-1, -1) if window is None else tuple(-1 if w is None else w for w in window)
    visible = torch.zeros(seq_q, seq_kv, dtype=torch.bool)
    for i in range(seq_q):
        for j in range(seq_kv):
            at = i + offset
            visible[i, j] = (
                (not causal or j <= at) and (left < 0 or j >= at - left) and (right < 0 or j <= at + right)
            )
    s = (q64 @ k64.transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(dtype).expand(b, hq)[:, :, None, None]
        distance = (torch.arange(seq_q).view(-1, 1) + offset - torch.arange(seq_kv).view(1, -1)).abs()
        s = s - slopes * distance.to(s.device)
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask.to(dtype)
    s = s.masked_fill(~visible.to(s.device), float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.to(dtype).view(1, -1, 1, 1).expand(b, hq, seq_q, 1)], dim=-1)
    row_max = s.detach().amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(s - row_max)
    row_sum = weights.sum(dim=-1, keepdim=True)
    probs = (weights / torch.where(row_sum == 0, torch.ones_like(row_sum), row_sum))[..., :seq_kv]
    lse = (row_max + torch.log(row_sum)).squeeze(-1)
    if keep is not None and dropout_p > 0.0:
        probs = probs * keep.to(dtype) / (1.0 - dropout_p)
    return probs @ v64, lse


def output_lead_shape(q, k, v, enable_gqa=False) -> tuple[int, ...]:
    """The output's leading (batch..., heads) dims, as flashsdpa flattens them into B*Hq."""
    ndim = max(q.dim(), k.dim(), v.dim())
    if ndim < 3:
        return ()
    pad = lambda t: (1,) * (ndim - t.dim()) + tuple(t.shape)  # noqa: E731
    qs, ks, vs = pad(q), pad(k), pad(v)
    batch = torch.broadcast_shapes(qs[:-3], ks[:-3], vs[:-3])
    heads = max(qs[-3], ks[-3], vs[-3]) if not enable_gqa else qs[-3]
    return (*batch, heads)


def keep_mask_for(seed_pair, p, lead_shape, seq_q, seq_kv, device) -> torch.Tensor:
    """flashsdpa's dropout keep-mask for an output with leading dims `lead_shape`, shaped (*lead, L, S)."""
    batch_heads = math.prod(lead_shape)
    keep = full_keep_mask(seed_pair, p, batch_heads, seq_q, seq_kv, device)
    return keep.view(*lead_shape, seq_q, seq_kv)


def predict_seed(torch_seed: int) -> tuple[int, int]:
    """The dropout seed the next flashsdpa call draws after `torch.manual_seed(torch_seed)`."""
    torch.manual_seed(torch_seed)
    return split_seed(draw_seed())


def _torch_kernels(q, math_only=False):
    """torch's own SDPA kernels, less cuDNN attention on CUDA: on an H100 with torch 2.11 it failed on a
    float (L, 1) mask ("mha_graph.execute ... is_good()" with CUDA_LAUNCH_BLOCKING=1, an illegal memory access
    poisoning the CUDA context without), so torch chooses among flash, efficient and math instead. (The
    mask is materialised now, see torch_sdpa; cuDNN stays out until that is checked on the GPU again.)"""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if math_only:
        return sdpa_kernel([SDPBackend.MATH])
    if q.device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def torch_sdpa(
    q, k, v, attn_mask=None, causal=False, scale=None, enable_gqa=False, keep=None, dropout_p=0.0, math_only=False
):
    """torch's own attention at the inputs' dtype, on their device (the "torch's own error" run).

    mask + causal are merged into one mask (same semantics, portable across
    torch builds). With dropout (a `keep` mask) torch's SDPA cannot take our
    pattern, so this is torch's math-backend formula in the input dtype:
    softmax(q k^T * scale + mask) * keep / (1 - p) @ v.
    """
    # torch's own error does not depend on the layout, but its CUDA kernels do not take every layout (seen with
    # torch 2.11 on an H100: "p.query_ptr is not correctly aligned" or a misaligned-address fault for views that
    # start one element into their storage; "(*bias): last dimension must be contiguous" for key-broadcast masks):
    # torch gets dense copies of the same values, and a materialised mask. (Differentiable, for its gradients.)
    if attn_mask is not None:
        lead = output_lead_shape(q, k, v, enable_gqa)
        score_shape = torch.broadcast_shapes(attn_mask.shape, (*lead, q.shape[-2], k.shape[-2]))
        attn_mask = attn_mask.expand(score_shape).clone(memory_format=torch.contiguous_format)
    q, k, v = (t.clone(memory_format=torch.contiguous_format) for t in (q, k, v))  # fresh, aligned storage
    if causal and attn_mask is not None:
        visible = causal_visible(q.shape[-2], k.shape[-2], q.device)
        if attn_mask.dtype == torch.bool:
            attn_mask = attn_mask & visible
        else:
            attn_mask = attn_mask.masked_fill(~visible, float("-inf"))
        causal = False
    if attn_mask is not None and attn_mask.is_floating_point() and attn_mask.dtype != q.dtype:
        attn_mask = attn_mask.to(q.dtype)
    if keep is None:
        with _torch_kernels(q, math_only):
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=causal, scale=scale, enable_gqa=enable_gqa
            )
    if causal:
        attn_mask = causal_visible(q.shape[-2], k.shape[-2], q.device)
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        group = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    probs = torch.softmax(scores, dim=-1)
    return (probs * keep.to(q.dtype) / (1.0 - dropout_p)) @ v


# --------------------------------------------------------------------------- comparisons


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error in float64 (absolute where ref is all zeros); NaN if got has NaN."""
    got64, ref64 = got.detach().to(torch.float64).cpu(), ref.detach().to(torch.float64).cpu()
    assert got64.shape == ref64.shape, f"shape {tuple(got64.shape)} != reference {tuple(ref64.shape)}"
    diff = (got64 - ref64).norm().item()
    norm = ref64.norm().item()
    return diff / norm if norm > 0 else diff


def _assert_within(what, got, ref, torch_result, dtype, tol, floor, torch_ratio=True,
                   torch_factor=TORCH_ERROR_FACTOR):
    """err <= the dtype's bar, and (torch_ratio) <= torch_factor (1.5) x torch's own error (with the float32 floor).

    A problem so ill-conditioned that torch's own result misses the bar (a near
    one-hot float32 softmax at scale 4: torch's dq 6.7e-5 against the 1e-5 bar)
    is held to torch's error instead: 1.5x it, or SMALL_PROBLEM_TORCH_FACTOR x
    where the ratio of two rounding noises is not a measurement (torch_ratio=False).
    """
    err = rel_err(got, ref)
    torch_err = rel_err(torch_result, ref) if torch_result is not None and dtype != torch.float64 else None
    if torch_err is not None and not math.isfinite(torch_err):
        # torch has no result to compare with: on the H100 (torch 2.11) its fused float16 kernels
        # return NaN for scale <= 0, where flashsdpa gives the float64 answer. The dtype's bar stays.
        torch_err = None
    bar = tol[dtype]
    if torch_err is not None and torch_err > bar:
        bar = (TORCH_ERROR_FACTOR if torch_ratio else SMALL_PROBLEM_TORCH_FACTOR) * torch_err
    assert err <= bar, f"{what}: relative error {err:.3g} over the {dtype} bar {bar:g} (torch's own: {torch_err})"
    if torch_ratio and torch_err is not None:
        bound = max(torch_factor * torch_err, floor if dtype == torch.float32 else 0.0)
        assert err <= bound, (
            f"{what}: relative error {err:.3g} over {torch_factor}x torch's own {torch_err:.3g} "
            f"(bound {bound:.3g}, {dtype})"
        )
    return err


def assert_forward_close(what, got, ref, torch_out, dtype, torch_ratio=True, torch_factor=TORCH_ERROR_FACTOR):
    return _assert_within(what, got, ref, torch_out, dtype, FORWARD_TOL, FP32_FLOOR_FORWARD, torch_ratio,
                          torch_factor)


def assert_grad_close(what, got, ref, torch_grad, dtype, torch_ratio=True, torch_factor=TORCH_ERROR_FACTOR):
    return _assert_within(what, got, ref, torch_grad, dtype, GRAD_TOL, FP32_FLOOR_GRAD, torch_ratio, torch_factor)


def assert_lse_close(lse, ref_lse, input_dtype=torch.float32, atol=LSE_ATOL):
    # float32, except float64 for float64 inputs (whose gradients need it).
    expected = torch.float64 if input_dtype == torch.float64 else torch.float32
    assert lse.dtype == expected, f"lse dtype {lse.dtype}, expected {expected}"
    assert lse.shape == ref_lse.shape, f"lse shape {tuple(lse.shape)} != {tuple(ref_lse.shape)}"
    lse64, ref64 = lse.detach().double().cpu(), ref_lse.detach().double().cpu()
    empty = torch.isneginf(ref64)
    assert torch.equal(torch.isneginf(lse64), empty), "lse is -inf exactly on the rows with no visible key"
    diff = (lse64 - ref64)[~empty].abs()
    bound = atol + LSE_RTOL * ref64[~empty].abs()
    assert bool((diff <= bound).all()), f"lse off by up to {diff.max().item():.3g}"


# --------------------------------------------------------------------------- runners


def run(backend, q, k, v, **options):
    """flashsdpa.attention with every backend output poisoned (NaN) until written."""
    with poisoned_outputs():
        return flashsdpa.attention(q, k, v, backend=backend, **options)


def record_backward_precisions(monkeypatch) -> list:
    """The gradient precision of each triton backward from now on, as it keys its config (`launch_backward`)."""
    from flashsdpa.backends.triton import launch_backward

    seen = []
    cache = launch_backward.kernel_cache

    class Recorder:
        def get(self, key, build):
            if key[0] == "backward":  # ("backward", kernel key, capability, precision, packed)
                seen.append(key[3])
            return cache.get(key, build)

    monkeypatch.setattr(launch_backward, "kernel_cache", Recorder())
    return seen


@dataclass
class Case:
    """One attention problem at its input dtype (tensors) with its options."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    attn_mask: torch.Tensor | None = None
    causal: bool = False
    scale: float | None = None
    enable_gqa: bool = False

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    def options(self) -> dict:
        return dict(causal=self.causal, scale=self.scale, attn_mask=self.attn_mask, enable_gqa=self.enable_gqa)

    def oracle(self, **extra):
        return oracle(self.q, self.k, self.v, self.attn_mask, self.causal, self.scale, self.enable_gqa, **extra)

    def torch(self, **extra):
        return torch_sdpa(self.q, self.k, self.v, self.attn_mask, self.causal, self.scale, self.enable_gqa, **extra)


def check_forward(backend: str, case: Case, what: str = "", check_torch: bool | str = True, lse_atol=LSE_ATOL):
    """Run `case` on `backend` (poisoned), compare out and lse with the oracle and torch; returns (out, lse).

    check_torch: True (the 1.5x-torch rule), "conditioning" (torch's error only
    recognises an ill-conditioned problem, see _assert_within) or False.
    lse_atol: the absolute part of the lse bar (LSE_ATOL unless a backend's documented bar differs).
    """
    what = f"{backend} forward {what}".strip()
    out, lse = run(backend, case.q, case.k, case.v, return_lse=True, **case.options())
    ref_out, ref_lse = case.oracle()
    assert out.dtype == case.dtype, f"{what}: output dtype {out.dtype}"
    assert out.shape == ref_out.shape, f"{what}: output shape {tuple(out.shape)} != {tuple(ref_out.shape)}"
    assert out.device == case.q.device
    torch_out = case.torch() if check_torch and case.dtype != torch.float64 else None
    split_products = backend == "triton" and case.dtype == torch.float32
    torch_factor = SPLIT_PRODUCTS_TORCH_FACTOR if split_products else TORCH_ERROR_FACTOR
    assert_forward_close(what, out, ref_out, torch_out, case.dtype, torch_ratio=check_torch is True,
                         torch_factor=torch_factor)
    assert_lse_close(lse, ref_lse, case.dtype, lse_atol)
    return out, lse


def torch_gradients(inputs, flags, prepare, case, keep, dropout_p, grad_out):
    """Leaves holding torch's own gradients at the input dtype. Where torch's chosen kernel raises (seen:
    torch 2.11's CUDA efficient-attention backward, "LSE is not correctly aligned", when only the mask
    needs a gradient), torch's math backend gives torch's own answer instead."""
    def attempt(math_only):
        leaves = _leaves(inputs, flags)
        out = torch_sdpa(
            *prepare(*leaves[:3]), leaves[3], case.causal, case.scale, case.enable_gqa, keep=keep,
            dropout_p=dropout_p, math_only=math_only,
        )  # fmt: skip
        out.backward(grad_out)
        return leaves

    try:
        return attempt(math_only=False)
    except RuntimeError:
        return attempt(math_only=True)


def ref_shape_of(prepare, case) -> tuple[int, ...]:
    """The output's shape without its last dim: (*lead, L)."""
    q, k, v = prepare(case.q, case.k, case.v)
    return (*output_lead_shape(q, k, v, case.enable_gqa), q.shape[-2])


def _leaves(tensors, needs):
    return [t.detach().clone().requires_grad_(n) if t is not None else None for t, n in zip(tensors, needs)]


def check_backward(
    backend: str,
    case: Case,
    what: str = "",
    needs=(True, True, True),
    mask_grad: bool = False,
    grad_out: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    torch_seed: int = 1234,
    gen: torch.Generator | None = None,
    check_torch: bool | str = True,
    prepare=None,
):
    """Gradients of `case` on `backend` (poisoned) against float64 autograd of the oracle and torch's own.

    needs: which of q, k, v require grad; mask_grad: the float mask requires grad.
    check_torch: as in check_forward.
    prepare: (q, k, v) -> (q, k, v) views taken inside the graph (strided/expanded layouts), applied to
    leaves shaped like case.q, case.k, case.v; gradients then arrive through the views.
    Returns the backend's gradients (q, k, v, mask; None where not required).
    """
    what = f"{backend} backward {what}".strip()
    dtype = case.dtype
    prepare = prepare or (lambda q, k, v: (q, k, v))
    inputs = [case.q, case.k, case.v, case.attn_mask]
    flags = [*needs, mask_grad]
    view_q, view_k, view_v = prepare(case.q, case.k, case.v)
    if grad_out is None:
        ref_shape = oracle(view_q, view_k, view_v, case.attn_mask, case.causal, case.scale, case.enable_gqa)[0].shape
        grad_out = randn(ref_shape, gen or generator(99), dtype, case.q.device)

    keep = None
    if dropout_p > 0.0:
        seed_pair = predict_seed(torch_seed)
        lead = output_lead_shape(view_q, view_k, view_v, case.enable_gqa)
        keep = keep_mask_for(seed_pair, dropout_p, lead, view_q.shape[-2], view_k.shape[-2], case.q.device)

    # The triton backward multiplies float32 as float16 halves too (see SPLIT_PRODUCTS_TORCH_FACTOR).
    torch_factor = SPLIT_PRODUCTS_TORCH_FACTOR if backend == "triton" and dtype == torch.float32 else TORCH_ERROR_FACTOR
    ours = _leaves(inputs, flags)
    torch.manual_seed(torch_seed)
    with poisoned_outputs():
        out = flashsdpa.attention(
            *prepare(*ours[:3]), attn_mask=ours[3], causal=case.causal, scale=case.scale,
            enable_gqa=case.enable_gqa, dropout_p=dropout_p, backend=backend,
        )  # fmt: skip
        out.backward(grad_out)

    ref = [
        None if t is None else (t.detach().to(torch.float64) if t.is_floating_point() else t).requires_grad_(f)
        for t, f in zip(inputs, flags)
    ]
    ref_mask = ref[3]
    score_grad = None
    if mask_grad:
        # a zero additive mask of the full score shape: its gradient is the unreduced score gradient dS
        score_shape = (*ref_shape_of(prepare, case), case.k.shape[-2])
        score_grad = torch.zeros(score_shape, dtype=torch.float64, device=case.q.device, requires_grad=True)
        ref_mask = ref[3] + score_grad
    ref_out, _ = oracle(*prepare(*ref[:3]), ref_mask, case.causal, case.scale, case.enable_gqa, dropout_p, keep)
    ref_out.backward(grad_out.to(torch.float64))
    assert_forward_close(f"{what} (its forward)", out, ref_out, None, dtype)

    theirs = [None] * 4
    if check_torch and dtype != torch.float64:
        theirs = torch_gradients(inputs, flags, prepare, case, keep, dropout_p, grad_out)

    grads = []
    for name, mine, reference, torch_leaf, flag in zip(("dq", "dk", "dv", "dmask"), ours, ref, theirs, flags):
        if not flag:
            assert mine is None or mine.grad is None, f"{what}: {name} computed though not required"
            grads.append(None)
            continue
        assert mine.grad is not None, f"{what}: no {name}"
        assert mine.grad.shape == mine.shape and mine.grad.dtype == mine.dtype, f"{what}: {name} shape/dtype"
        torch_grad = None if torch_leaf is None else torch_leaf.grad
        if name == "dmask" and mine.shape[-1:] in ((), (1,)):
            # broadcast over keys: zero in exact math (see the module doc)
            bound = GRAD_TOL[dtype] * score_grad.grad.norm().item()
            assert mine.grad.double().norm().item() <= bound, f"{what}: {name} of a key-broadcast mask is not ~0"
            grads.append(mine.grad)
            continue
        # The bar follows the precision of the computation (the query dtype), also for a float32 mask's grad.
        assert_grad_close(f"{what} {name}", mine.grad, reference.grad, torch_grad, dtype, check_torch is True,
                          torch_factor)
        grads.append(mine.grad)
    return grads
