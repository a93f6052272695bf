"""The float64 oracle: plain softmax(q k^T * scale + mask) v, materialising the scores.

For tests and `flashsdpa check` only; the dispatcher never picks it on its own.
Its backward is the textbook dense gradient in float64 (gradcheck-verified in the tests).
"""

from __future__ import annotations

import torch

from flashsdpa import dropout
from flashsdpa.backends.base import AttentionInputs, Backend, GradientsNeeded
from flashsdpa.descriptor import AttentionDescriptor, MaskKind, statistics_dtype


def masked_scores(desc: AttentionDescriptor, q, k, mask) -> torch.Tensor:
    """(B, Hq, L, S) scores in q's dtype, masked (-inf where a key may not be attended)."""
    k = k.repeat_interleave(desc.gqa_group, dim=1)
    scores = (q @ k.transpose(-1, -2)) * desc.scale
    if desc.mask is MaskKind.BOOL:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif desc.mask is MaskKind.FLOAT:
        scores = scores + mask.to(scores.dtype)
    if desc.causal:
        rows = torch.arange(desc.seq_q, device=q.device).view(-1, 1)
        cols = torch.arange(desc.seq_kv, device=q.device).view(1, -1)
        scores = scores.masked_fill(cols > rows, float("-inf"))
    return scores


def attention_math(desc: AttentionDescriptor, q, k, v, mask, dropout_seed):
    """Attention in the inputs' dtype; returns (out, lse, probs, dropped_probs)."""
    scores = masked_scores(desc, q, k, mask)
    lse = torch.logsumexp(scores, dim=-1)
    # Normalise by the row sum, not exp(-lse): with scores near finfo.min,
    # lse = max + log(S) rounds to max and would lose the 1/S.
    row_max = scores.amax(dim=-1, keepdim=True)
    # A row with no visible key has max -inf: give it zero weights, not NaN.
    unnormalised = torch.exp(scores - torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max))
    row_sum = unnormalised.sum(dim=-1, keepdim=True)
    probs = unnormalised / torch.where(row_sum == 0, torch.ones_like(row_sum), row_sum)
    dropped = probs * dropout_factor(desc, dropout_seed, q.device) if desc.dropout_p > 0.0 else probs
    out = dropped @ v.repeat_interleave(desc.gqa_group, dim=1)
    return out, lse, probs, dropped


def dropout_factor(desc: AttentionDescriptor, dropout_seed, device) -> torch.Tensor:
    """keep / (1 - p) for every (B, Hq, L, S) weight."""
    keep = dropout.full_keep_mask(dropout_seed, desc.dropout_p, desc.batch * desc.heads_q, desc.seq_q, desc.seq_kv, device)
    keep = keep.view(desc.batch, desc.heads_q, desc.seq_q, desc.seq_kv).to(torch.float64)
    return keep / (1.0 - desc.dropout_p)


def sum_over_group(desc: AttentionDescriptor, grad: torch.Tensor) -> torch.Tensor:
    """(B, Hq, ...) -> (B, Hkv, ...): a shared K/V head gets its group's gradients."""
    return grad.unflatten(1, (desc.heads_kv, desc.gqa_group)).sum(2)


class ReferenceBackend(Backend):
    name = "reference"

    def unsupported_reasons(self, desc: AttentionDescriptor, device: torch.device) -> list[str]:
        return []

    def forward(self, desc, inputs):
        q, k, v, mask = (_float64(t) for t in (inputs.query, inputs.key, inputs.value, inputs.mask))
        out, lse, _, _ = attention_math(desc, q, k, v, mask, inputs.dropout_seed)
        return out.to(desc.dtype), lse.to(statistics_dtype(desc.dtype))

    def backward(self, desc, inputs, out, lse, grad_out, needed: GradientsNeeded):
        # The textbook gradient of softmax attention, dense, in float64.
        q, k, v, mask = (_float64(t) for t in (inputs.query, inputs.key, inputs.value, inputs.mask))
        d_out = grad_out.to(torch.float64)
        _, _, probs, dropped = attention_math(desc, q, k, v, mask, inputs.dropout_seed)
        d_dropped = d_out @ v.repeat_interleave(desc.gqa_group, dim=1).transpose(-1, -2)
        d_probs = d_dropped * dropout_factor(desc, inputs.dropout_seed, q.device) if desc.dropout_p > 0.0 else d_dropped
        d_scores = probs * (d_probs - (probs * d_probs).sum(-1, keepdim=True))
        k_full = k.repeat_interleave(desc.gqa_group, dim=1)
        dq = (d_scores @ k_full) * desc.scale if needed.query else None
        dk = sum_over_group(desc, d_scores.transpose(-1, -2) @ q) * desc.scale if needed.key else None
        dv = sum_over_group(desc, dropped.transpose(-1, -2) @ d_out) if needed.value else None
        cast = lambda t, dtype: None if t is None else t.to(dtype)  # noqa: E731
        return cast(dq, desc.dtype), cast(dk, desc.dtype), cast(dv, desc.dtype), cast(
            d_scores if needed.mask else None, statistics_dtype(desc.dtype)
        )


def _float64(t):
    return t.to(torch.float64) if t is not None and t.is_floating_point() else t
