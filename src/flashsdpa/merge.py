"""Merging partial attention results computed over disjoint key sets.

Attention over keys K = K_1 u ... u K_n (disjoint) is a weighted mean of the
attention over each part: with out_i = softmax over K_i applied to V_i and
lse_i = log sum_{j in K_i} exp(s_j) (natural log),

    lse = log sum_i exp(lse_i),    out = sum_i exp(lse_i - lse) * out_i.

This is the split-KV reduction, cascade (shared-prefix) attention, and how
ring attention (`flashsdpa.distributed`) combines the slices of keys it sees
one after another.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def merge_attention(
    outs: Sequence[torch.Tensor],
    lses: Sequence[torch.Tensor],
    *,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine partial attention results over disjoint key sets; returns (out, lse).

    outs: n >= 1 tensors (..., L, Ev), each the attention of the same queries
        over one part of the keys (zeros where a row sees no key of that part).
    lses: n tensors (..., L), each part's natural-log log-sum-exp of the
        scaled, masked scores (-inf where a row sees no key of that part), as
        `flashsdpa.attention(..., return_lse=True)` returns it.
    out_dtype: the dtype of the merged out (default: that of outs[0]).

    The merge computes in float32, or float64 if any input is float64. A row
    whose every part is -inf gives out = 0 and lse = -inf, never NaN, and its
    gradients are 0. Differentiable through outs and lses with torch autograd;
    the merged out depends on every lse, so a part whose out requires grad
    while its lse cannot carry one (flashsdpa.attention's lse is not
    differentiable) raises rather than return gradients missing that path.
    The returned lse has the computation dtype (float32 or float64).
    """
    outs, lses = list(outs), list(lses)
    _check(outs, lses)
    compute = torch.float32
    if any(t.dtype == torch.float64 for t in (*outs, *lses)):
        compute = torch.float64
    out_dtype = outs[0].dtype if out_dtype is None else out_dtype

    lse_stack = torch.stack([lse.to(compute) for lse in lses])  # (n, ..., L)
    # The largest part per row, as a constant (like a softmax's max): it only keeps exp() in range.
    peak = lse_stack.detach().amax(dim=0)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    weights = torch.exp(lse_stack - peak)  # 0 for parts that are -inf
    total = weights.sum(dim=0)
    seen = total > 0
    safe_total = torch.where(seen, total, torch.ones_like(total))
    lse = torch.where(seen, peak + torch.log(safe_total), torch.full_like(total, float("-inf")))
    shares = weights / safe_total  # (n, ..., L): each part's share of the row's softmax mass
    out = sum(share.unsqueeze(-1) * part.to(compute) for share, part in zip(shares, outs))
    return out.to(out_dtype), lse


def _check(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> None:
    if not outs:
        raise ValueError("merge_attention needs at least one partial result, got outs=[]")
    if len(outs) != len(lses):
        raise ValueError(f"merge_attention: {len(outs)} outs but {len(lses)} lses; give one lse per out")
    shape = outs[0].shape
    for i, (out, lse) in enumerate(zip(outs, lses)):
        if not (out.is_floating_point() and lse.is_floating_point()):
            raise TypeError(f"merge_attention: outs[{i}] ({out.dtype}) and lses[{i}] ({lse.dtype}) must be floating")
        if out.dim() < 1 or out.shape != shape:
            raise ValueError(
                f"merge_attention: outs[{i}] has shape {tuple(out.shape)}, outs[0] {tuple(shape)}; "
                "every part must have the same (..., L, Ev) shape"
            )
        if lse.shape != shape[:-1]:
            raise ValueError(
                f"merge_attention: lses[{i}] has shape {tuple(lse.shape)}, expected {tuple(shape[:-1])} "
                f"(outs[{i}] {tuple(out.shape)} without its last dim)"
            )
        if out.device != outs[0].device or lse.device != outs[0].device:
            raise ValueError(f"merge_attention: outs[{i}]/lses[{i}] are not on {outs[0].device} as outs[0] is")
        if torch.is_grad_enabled() and out.requires_grad and not lse.requires_grad and len(outs) > 1:
            raise ValueError(
                f"merge_attention: outs[{i}] requires grad but lses[{i}] does not, so the merged out's gradient "
                "would miss the path through each part's lse (flashsdpa.attention returns its lse without a "
                "gradient). Merge under torch.no_grad(), pass lses that carry gradients, or use "
                "flashsdpa.distributed.ring_attention, whose backward accounts for it"
            )
