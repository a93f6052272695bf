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

Declined, with the reason recorded by the dispatcher, to `tiled`: other
devices, dropout (flashsdpa's keep-mask is its own counter hash, not torch's
generator), a value head dim other than the query's, head dim 0, causal with a
scale <= 0, a float32 mask of float64 queries. Two backwards are the tiled
one, which needs only the (out, lse) any correct forward gives: the gradient
of a float mask (the kernel computes none), and 16-bit gradients where torch
itself would not run this kernel (3-D inputs, `sdpa_kernel([SDPBackend.MATH])`,
...: `gradient_precision` says EXACT), since torch's math path then gives
gradients at half the kernel's error and flashsdpa's are held to torch's.

It is the kernel torch's own CPU SDPA calls, so time and memory match torch's
(BENCHMARKS.md, issue 16); the tiled backend took 2-10x torch's time and 3-6x
its memory there (issue 16's measurements).
"""

from __future__ import annotations

import torch

from flashsdpa import gradient_precision
from flashsdpa.backends.base import AttentionInputs, Backend, GradientsNeeded
from flashsdpa.backends.tiled import TiledBackend
from flashsdpa.descriptor import AttentionDescriptor, GradientPrecision, MaskKind, statistics_dtype

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _find_kernels():
    """(forward, backward) ops, or None where this torch build has no CPU flash kernel."""
    ops = torch.ops.aten
    try:
        return ops._scaled_dot_product_flash_attention_for_cpu, ops._scaled_dot_product_flash_attention_for_cpu_backward
    except (AttributeError, RuntimeError):  # pragma: no cover - torch builds before 2.3
        return None


_KERNELS = _find_kernels()


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """t itself, or a contiguous copy where its last dim is strided (the kernel assumes stride 1 there)."""
    if t.stride(-1) == 1 or t.shape[-1] <= 1:
        return t
    return t.contiguous()  # copy needed: the kernel reads the last dim as contiguous


def additive_mask(desc: AttentionDescriptor, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The mask as the kernel takes it: float masks as given; bool masks as 0/-inf in `dtype`, at the
    mask's compact shape (broadcast dims, stride 0 in the canonical view, kept at size 1)."""
    if mask is None or desc.mask is MaskKind.FLOAT:
        return mask
    compact = mask[tuple(slice(0, 1) if st == 0 else slice(None) for st in mask.stride())]
    return torch.zeros(compact.shape, dtype=dtype, device=mask.device).masked_fill_(~compact, float("-inf"))


def _mark_rows_without_keys(desc: AttentionDescriptor, mask: torch.Tensor | None, lse: torch.Tensor) -> None:
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
    if desc.causal:
        visible = visible & (torch.arange(desc.seq_kv, device=row.device) <= row.unsqueeze(-1))
    empty = ~visible.any(dim=-1)
    lse[batch[empty], head[empty], row[empty]] = float("-inf")


class AtenBackend(Backend):
    name = "aten"

    @staticmethod
    def _exact_gradients(desc: AttentionDescriptor, inputs: AttentionInputs) -> bool:
        """16-bit gradients that torch would compute on its float32-internal math path."""
        if desc.dtype not in (torch.float16, torch.bfloat16):
            return False
        return gradient_precision.at_backward(desc, inputs) is GradientPrecision.EXACT

    def unsupported_reasons(self, desc: AttentionDescriptor, device: torch.device) -> list[str]:
        reasons = []
        if device.type != "cpu":
            reasons.append(f"torch's fused flash kernel used here is the CPU one; tensors are on {device.type}")
        if _KERNELS is None:
            reasons.append("this torch build has no aten::_scaled_dot_product_flash_attention_for_cpu")
        if desc.dtype not in _DTYPES:
            reasons.append(f"dtype {desc.dtype} is not one of the kernel's {[str(d) for d in _DTYPES]}")
        if desc.dropout_p > 0.0:
            reasons.append("dropout: flashsdpa's keep-mask is its own counter hash, torch's kernel draws another")
        if desc.head_dim != desc.head_dim_v:
            reasons.append(f"value head dim {desc.head_dim_v} differs from the query's {desc.head_dim}")
        if desc.head_dim == 0:
            reasons.append("head dim 0 (the kernel gives NaN log-sum-exps)")
        if desc.causal and desc.scale <= 0.0:
            # measured: NaN rows (scale 0) and wrong ones (scale < 0), every dtype
            reasons.append(f"causal with scale {desc.scale} (the kernel scales its causal -inf fill)")
        if desc.mask is MaskKind.FLOAT and desc.mask_dtype not in (desc.dtype, statistics_dtype(desc.dtype)):
            # measured: a float32 mask with float64 queries is read as float64 (a wrong answer, no error)
            reasons.append(f"a {desc.mask_dtype} mask with {desc.dtype} queries (the kernel reads masks of the "
                           "query's dtype or of its accumulators only)")
        return reasons

    def forward(self, desc: AttentionDescriptor, inputs: AttentionInputs):
        forward_kernel, _ = _KERNELS
        q, k, v = (_unit_last_stride(t) for t in (inputs.query, inputs.key, inputs.value))
        mask = additive_mask(desc, inputs.mask, q.dtype)
        out, lse = forward_kernel(q, k, v, 0.0, desc.causal, attn_mask=mask, scale=desc.scale)
        _mark_rows_without_keys(desc, inputs.mask, lse)
        return out, lse

    def backward(self, desc, inputs, out, lse, grad_out, needed: GradientsNeeded):
        if needed.mask or self._exact_gradients(desc, inputs):
            # No score gradient from the kernel / torch's math-path precision (module docstring).
            return TiledBackend().backward(desc, inputs, out, lse, grad_out, needed)
        _, backward_kernel = _KERNELS
        q, k, v = (_unit_last_stride(t) for t in (inputs.query, inputs.key, inputs.value))
        mask = additive_mask(desc, inputs.mask, q.dtype)
        if inputs.mask is not None:
            lse = lse.masked_fill(torch.isneginf(lse), 0.0)  # the kernel's own value on rows without keys
        dq, dk, dv = backward_kernel(
            _unit_last_stride(grad_out), q, k, v, out, lse, 0.0, desc.causal, attn_mask=mask, scale=desc.scale
        )
        return (dq if needed.query else None, dk if needed.key else None, dv if needed.value else None, None)
