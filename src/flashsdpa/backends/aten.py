"""torch's own fused flash-attention CPU kernel, for the problems it computes as flashsdpa defines them.

`aten::_scaled_dot_product_flash_attention_for_cpu` (and its `_backward`) is
the kernel torch's CPU SDPA runs: vectorised C++, parallel over batch, heads
and query blocks, accumulating in float32 (float64 for float64 inputs), and
returning the natural-log row log-sum-exp that flashsdpa's backward contract
needs. Its semantics match flashsdpa's on every point checked in
tests/test_aten_backend.py: any scale (zero and negative too), top-left causal
also when L != S, causal together with a mask (both apply), float masks read
through their broadcast strides, GQA natively (key/value with fewer heads, no
expanded copies), float16/bfloat16/float32/float64, any strides except a
non-unit last one. Where they differ this module adapts, at O(L*E) cost:

* bool masks: the kernel takes additive masks only. The mask is converted
  to 0/-inf in the query's dtype (as torch's SDPA converts it) at its
  compact shape: the dims it broadcasts stay size 1.
* a row with no key it may attend to: the kernel gives zeros (as flashsdpa)
  but lse 0, not -inf. Such rows can only come from a mask, and always have
  lse 0, so only rows with lse exactly 0 are checked against the mask and
  marked -inf; the backward hands the kernel its own 0 back.
* a last dim with a stride other than 1: the kernel reads it as contiguous
  (a wrong answer, measured), so that tensor is copied contiguous first.
* the outputs keep the kernel's layouts ((B, L, H, E) strides for the
  gradients): the eager path hands them to autograd as they are, as torch's
  own call does; only the custom ops (traced, compiled) make them contiguous.

The variants the kernel has no argument for, all but softcap, are computed
on it too (`checks_variants`):

* a sliding window, bottom-right alignment and ALiBi: both depend on a
  (query, key) pair only through d = i' - j (i' the query's aligned
  position), so over the keys in reverse order (j' = S - 1 - j) they are a
  function of i + j': the whole (L, S) additive mask (0 / -inf visibility,
  -slope * |d|) is a strided view (strides 1, 1) of one vector of L + S - 1
  values per head, `Band`, which the kernel reads as it is (measured: it
  takes overlapping strides). K and V are reversed once (copies of O(S*E)).
  The query rows are cut into blocks (`query_block`); each block is one kernel
  call on the keys it sees (`Visibility.key_range`), so a window costs
  O(L * (window + block)), with its slice of the view, plus the caller's
  mask where there is one (then materialised per block). Each row is
  complete in its call, so out and lse are the kernel's own; the backward
  does the same per block and sums dK/dV over the blocks in the
  accumulators' dtype (16-bit inputs: the blocks run in float32, so the sum
  is not of rounded partials). Where every query sees every key (a
  bottom-right causal decode step) it is one plain call (`kernel_causal`).
* sinks: the kernel's out and lse without the sink are exact, and the sink
  only joins each row's denominator: out * sigmoid(lse - sink) and
  lse' = logaddexp(lse, sink). The backward is the kernel's, given that out
  and lse' (P = exp(s - lse') is then the sinks' own P and delta is
  rowsum(dO * out)); the sink's gradient is `ops.sink_gradient`'s.
* softcap (tanh of each score) is not an additive mask: declined.

Declined, with the reason recorded by the dispatcher, to `tiled`: other
devices, dropout (flashsdpa's keep-mask is its own counter hash, not torch's
generator), a value head dim other than the query's, head dim 0, causal with a
scale <= 0, a float32 mask of float64 queries, softcap. The gradient of a
float mask (the kernel computes none) is the tiled backward's, which needs
only the (out, lse) any correct forward gives. 16-bit gradients where torch
itself would not run this kernel (3-D inputs, `sdpa_kernel([SDPBackend.MATH])`,
...: `gradient_precision` says EXACT) have half the kernel's 16-bit error in
torch's math path, and flashsdpa's are held to torch's: the kernel then runs
on float32 copies of the inputs (O(L*E) memory) and the gradients are
rounded once.

It is the kernel torch's own CPU SDPA calls, so time and memory match torch's
(BENCHMARKS.md, issue 16); the tiled backend took 2-10x torch's time and 3-6x
its memory there (issue 16's measurements).
"""

from __future__ import annotations

import dataclasses

import torch

from flashsdpa import gradient_precision
from flashsdpa.backends.base import AttentionInputs, Backend, GradientsNeeded, new_output
from flashsdpa.backends.tiled import TiledBackend
from flashsdpa.descriptor import AttentionDescriptor, GradientPrecision, MaskKind, statistics_dtype
from flashsdpa.visibility import Visibility

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_SIXTEEN_BIT = (torch.float16, torch.bfloat16)
# Queries per kernel call on the blocked path (`Band`): a window's block sees window + block keys, a causal
# one the whole diagonal block, computed whole (the kernel skips no masked pairs); fewer, larger calls
# elsewhere.
WINDOW_QUERY_BLOCK = 128
QUERY_BLOCK = 512


def _find_kernels():
    """(forward, backward) ops, or None where this torch build has no CPU flash kernel. Their one overload each
    (`.default`): a call of the packet resolves the overload every time."""
    ops = torch.ops.aten
    try:
        return (ops._scaled_dot_product_flash_attention_for_cpu.default,
                ops._scaled_dot_product_flash_attention_for_cpu_backward.default)
    except (AttributeError, RuntimeError):  # pragma: no cover - torch builds before 2.3
        return None


KERNELS = _find_kernels()  # (forward, backward), or None


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """t itself, or a contiguous copy where its last dim is strided (the kernel assumes stride 1 there)."""
    if t.stride(-1) == 1 or t.shape[-1] <= 1:
        return t
    return t.contiguous()  # copy needed: the kernel reads the last dim as contiguous


def additive_mask(desc: AttentionDescriptor, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The mask as the kernel takes it for queries of `dtype`: float masks as given where the kernel reads
    their dtype (`dtype`'s or its accumulators'), else in `dtype` (a 16-bit mask with the float32 copies the
    backend makes); bool masks as 0/-inf in `dtype`, at the mask's compact shape (broadcast dims, stride 0
    in the canonical view, kept at size 1)."""
    if mask is None:
        return None
    if desc.mask is MaskKind.FLOAT:
        return mask if mask.dtype in (dtype, statistics_dtype(dtype)) else mask.to(dtype)
    compact = _compact(mask)
    return torch.zeros(compact.shape, dtype=dtype, device=mask.device).masked_fill_(~compact, float("-inf"))


def _compact(t: torch.Tensor) -> torch.Tensor:
    """t with its broadcast dims (stride 0) cut to size 1: the kernel broadcasts a mask itself."""
    return t[tuple(slice(0, 1) if st == 0 else slice(None) for st in t.stride())]


def kernel_causal(desc: AttentionDescriptor) -> bool | None:
    """The kernel's causal flag where one call computes the problem: no ALiBi, and every query sees every
    key or top-left causal holds (a decode step's bottom-right causal row sees all its keys); None where
    the band and the query blocks are needed (module docstring). (The common case from the descriptor's
    fields alone: every call asks, twice.)"""
    if desc.alibi:
        return None
    if not desc.windowed and (not desc.causal or desc.key_offset == 0):
        return desc.causal
    lo, hi = Visibility.of(desc).full_key_range(0, desc.seq_q)
    return False if lo <= 0 and hi >= desc.seq_kv else None


def query_block(desc: AttentionDescriptor) -> int:
    return WINDOW_QUERY_BLOCK if desc.window_left >= 0 else QUERY_BLOCK


class Band:
    """The blocked path's additive mask over the keys in reverse order (module docstring): entry (i, j') of
    `view` is that of query i and key S - 1 - j', in the accumulators' dtype."""

    def __init__(self, desc: AttentionDescriptor, inputs: AttentionInputs):
        self.desc, self.inputs = desc, inputs
        acc = statistics_dtype(desc.dtype)
        device = inputs.query.device
        seq_q, seq_kv = desc.seq_q, desc.seq_kv
        length = seq_q + seq_kv - 1
        # Entry n = i + j' holds the pair (i, j = S - 1 - j'): d = i' - j = n + key_offset - (S - 1). Visibility
        # decides it on one virtual query row that sees the n-th last of `length` keys at that same d.
        virtual = dataclasses.replace(Visibility.of(desc), seq_q=1, seq_kv=length, offset=desc.key_offset + seq_q - 1)
        n = torch.arange(length, device=device)
        visible = virtual.mask(torch.zeros(1, dtype=torch.long, device=device), length - 1 - n)[0]
        band = torch.zeros(length, dtype=acc, device=device).masked_fill_(~visible, float("-inf"))[None, None]
        if desc.alibi:
            slopes = _compact(inputs.alibi_slopes).to(acc)[..., None]  # (B or 1, Hq, 1)
            band = band - slopes * (n + desc.key_offset - (seq_kv - 1)).abs().to(acc)
        self.view = band.as_strided((*band.shape[:2], seq_q, seq_kv), (*band.stride()[:2], 1, 1))

    def blocks(self):
        """(query rows, the keys they see, those keys reversed) per kernel call; rows that see no key: empty."""
        desc, visibility, size = self.desc, Visibility.of(self.desc), query_block(self.desc)
        for start in range(0, desc.seq_q, size):
            rows = range(start, min(start + size, desc.seq_q))
            lo, hi = visibility.key_range(rows.start, rows.stop)
            keys = range(lo, max(lo, hi))
            yield rows, keys, range(desc.seq_kv - keys.stop, desc.seq_kv - keys.start)

    def mask(self, rows: range, keys: range, reversed_keys: range) -> torch.Tensor:
        """The additive mask of one block's call: the band's slice, with the caller's mask (materialised)."""
        mask = self.view[..., rows.start : rows.stop, reversed_keys.start : reversed_keys.stop]
        if self.inputs.mask is None:
            return mask
        given = _compact(self.inputs.mask[..., rows.start : rows.stop, keys.start : keys.stop]).flip(-1)
        if self.desc.mask is MaskKind.BOOL:
            return mask.masked_fill(~given, float("-inf"))
        return mask + given.to(mask.dtype)


def _mark_empty_rows(additive: torch.Tensor, lse: torch.Tensor) -> None:
    """Set lse to -inf, in place, on rows of one block whose additive mask is -inf everywhere (candidates: the
    rows the kernel gave lse 0)."""
    batch, head, row = (lse == 0).nonzero(as_tuple=True)
    if row.numel() == 0:
        return
    full = additive.expand(*lse.shape, additive.shape[-1])
    empty = torch.isneginf(full[batch, head, row]).all(dim=-1)
    lse[batch[empty], head[empty], row[empty]] = float("-inf")


def _add_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention without the sinks (out, lse) turned into attention with them (module docstring); a row with
    no visible key (lse -inf) keeps its zeros and gets the sink's logit as lse. Computed in float64 and
    rounded once: in float32 the rounding of the share and of lse' put the sinks' gradient, a sum with
    cancellation, at up to 6x the tiled backend's error (1.5e-6 against 2.4e-7, measured)."""
    wide = lse.double()
    sink = sinks.double().view(1, -1, 1)
    share = torch.where(torch.isneginf(wide), 0.0, torch.sigmoid(wide - sink))
    return (out.double() * share.unsqueeze(-1)).to(out.dtype), torch.logaddexp(wide, sink).to(lse.dtype)


def _mark_rows_without_keys(
    desc: AttentionDescriptor, causal: bool, mask: torch.Tensor | None, lse: torch.Tensor
) -> None:
    """Set lse to -inf, in place, on rows where the mask (with causal) hides every key.

    The kernel gives those rows lse 0; any row it gives 0 is a candidate, and
    only candidates are checked. Top-left causal alone always leaves key 0
    visible, so without a mask no row is empty.
    """
    if mask is None:
        return
    batch, head, row = (lse == 0).nonzero(as_tuple=True)
    if row.numel() == 0:
        return
    scores_mask = mask[batch, head, row]  # (candidates, S)
    visible = scores_mask if desc.mask is MaskKind.BOOL else ~torch.isneginf(scores_mask)
    if causal:
        visible = visible & (torch.arange(desc.seq_kv, device=row.device) <= row.unsqueeze(-1))
    empty = ~visible.any(dim=-1)
    lse[batch[empty], head[empty], row[empty]] = float("-inf")


class AtenBackend(Backend):
    name = "aten"
    checks_variants = True

    @staticmethod
    def _exact_gradients(desc: AttentionDescriptor, inputs: AttentionInputs) -> bool:
        """16-bit gradients that torch would compute on its float32-internal math path."""
        if desc.dtype not in _SIXTEEN_BIT:
            return False
        return gradient_precision.at_backward(desc, inputs) is GradientPrecision.EXACT

    def unsupported_reasons(self, desc: AttentionDescriptor, device: torch.device) -> list[str]:
        reasons = []
        if device.type != "cpu":
            reasons.append(f"torch's fused flash kernel used here is the CPU one; tensors are on {device.type}")
        if KERNELS is None:
            reasons.append("this torch build has no aten::_scaled_dot_product_flash_attention_for_cpu")
        if desc.dtype not in KERNEL_DTYPES:
            reasons.append(f"dtype {desc.dtype} is not one of the kernel's {[str(d) for d in KERNEL_DTYPES]}")
        if desc.dropout_p > 0.0:
            reasons.append("dropout: flashsdpa's keep-mask is its own counter hash, torch's kernel draws another")
        if desc.head_dim != desc.head_dim_v:
            reasons.append(f"value head dim {desc.head_dim_v} differs from the query's {desc.head_dim}")
        if desc.head_dim == 0:
            reasons.append("head dim 0 (the kernel gives NaN log-sum-exps)")
        if desc.scale <= 0.0 and kernel_causal(desc):
            # measured: NaN rows (scale 0) and wrong ones (scale < 0), every dtype
            reasons.append(f"causal with scale {desc.scale} (the kernel scales its causal -inf fill)")
        if desc.mask is MaskKind.FLOAT and desc.mask_dtype not in (desc.dtype, statistics_dtype(desc.dtype)):
            # measured: a float32 mask with float64 queries is read as float64 (a wrong answer, no error)
            reasons.append(f"a {desc.mask_dtype} mask with {desc.dtype} queries (the kernel reads masks of the "
                           "query's dtype or of its accumulators only)")
        if desc.softcap:
            reasons.append("softcap: a tanh of each score, which the kernel cannot take as an additive mask")
        return reasons

    def forward(self, desc: AttentionDescriptor, inputs: AttentionInputs):
        forward_kernel, _ = KERNELS
        q, k, v = inputs.query, inputs.key, inputs.value
        if desc.sinks and desc.dtype in _SIXTEEN_BIT:
            # float32 copies: the sinks rescale the kernel's output, which is then rounded once, not twice
            q, k, v = q.float(), k.float(), v.float()
        q, k, v = (_unit_last_stride(t) for t in (q, k, v))
        causal = kernel_causal(desc)
        if causal is None:
            band = Band(desc, inputs)
            k, v = k.flip(-2), v.flip(-2)  # copies: the band's keys run backwards
            out = new_output((desc.batch, desc.heads_q, desc.seq_q, desc.head_dim_v), q.dtype, q.device)
            lse = new_output((desc.batch, desc.heads_q, desc.seq_q), statistics_dtype(desc.dtype), q.device)
            for rows, keys, backwards in band.blocks():
                part = slice(rows.start, rows.stop)
                if not keys:
                    out[..., part, :], lse[..., part] = 0.0, float("-inf")
                    continue
                mask = band.mask(rows, keys, backwards)
                seen = slice(backwards.start, backwards.stop)
                o, l = forward_kernel(q[..., part, :], k[..., seen, :], v[..., seen, :], 0.0, False, attn_mask=mask,
                                      scale=desc.scale)  # fmt: skip
                _mark_empty_rows(mask, l)
                out[..., part, :], lse[..., part] = o, l
        else:
            mask = additive_mask(desc, inputs.mask, q.dtype)
            out, lse = forward_kernel(q, k, v, 0.0, causal, attn_mask=mask, scale=desc.scale)
            _mark_rows_without_keys(desc, causal, inputs.mask, lse)
        if desc.sinks:
            out, lse = _add_sinks(out, lse, inputs.sinks)
        return out.to(desc.dtype), lse  # (out: float32 where the sinks took float32 copies)

    def backward(self, desc, inputs, out, lse, grad_out, needed: GradientsNeeded):
        if needed.mask:  # the kernel computes no score gradient
            return TiledBackend().backward(desc, inputs, out, lse, grad_out, needed)
        _, backward_kernel = KERNELS
        tensors = (grad_out, inputs.query, inputs.key, inputs.value, out)
        causal = kernel_causal(desc)
        blocked = causal is None
        if desc.dtype in _SIXTEEN_BIT and (blocked or self._exact_gradients(desc, inputs)):
            # float32 copies: torch's math-path precision, and dK/dV summed over blocks unrounded (module docstring)
            tensors = tuple(t.float() for t in tensors)
        d_out, q, k, v, out = (_unit_last_stride(t) for t in tensors)
        if inputs.mask is not None or blocked:
            lse = lse.masked_fill(torch.isneginf(lse), 0.0)  # the kernel's own value on rows without keys
        if not blocked:
            mask = additive_mask(desc, inputs.mask, q.dtype)
            dq, dk, dv = backward_kernel(d_out, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=desc.scale)
        else:
            band = Band(desc, inputs)
            k, v = k.flip(-2), v.flip(-2)  # copies: the band's keys run backwards; so do dK and dV below
            dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
            for rows, keys, backwards in band.blocks():
                if not keys:
                    continue
                part, seen = slice(rows.start, rows.stop), slice(backwards.start, backwards.stop)
                gq, gk, gv = backward_kernel(
                    d_out[..., part, :], q[..., part, :], k[..., seen, :], v[..., seen, :], out[..., part, :],
                    lse[..., part], 0.0, False, attn_mask=band.mask(rows, keys, backwards), scale=desc.scale,
                )  # fmt: skip
                dq[..., part, :] = gq
                dk[..., seen, :] += gk
                dv[..., seen, :] += gv
            dk, dv = dk.flip(-2), dv.flip(-2)
        grads = (dq if needed.query else None, dk if needed.key else None, dv if needed.value else None)
        return (*(g if g is None or g.dtype == desc.dtype else g.to(desc.dtype) for g in grads), None)
