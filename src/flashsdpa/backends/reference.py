"""The float64 oracle: plain softmax(q k^T * scale + mask) v, materialising the scores.

Every variant is written out from its formula (see `flashsdpa.attention`), independently of
flashsdpa/visibility.py, which the flash backends use and the tests check against this.

For tests and `flashsdpa check` only; the dispatcher never picks it on its own.
Its backward is the textbook dense gradient in float64 (gradcheck-verified in the tests).
"""

from __future__ import annotations

import torch

from flashsdpa import dropout
from flashsdpa.backends.base import AttentionInputs, Backend, GradientsNeeded
from flashsdpa.descriptor import AttentionDescriptor, MaskKind, statistics_dtype


def positions(desc: AttentionDescriptor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, 1) aligned query positions i + key_offset and (1, S) key positions."""
    rows = torch.arange(desc.seq_q, device=device).view(-1, 1) + desc.key_offset
    cols = torch.arange(desc.seq_kv, device=device).view(1, -1)
    return rows, cols


def scores(desc: AttentionDescriptor, q, k, mask, alibi_slopes) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, Hq, L, S) final scores in q's dtype (-inf where a key is not visible), and d(capped)/d(scaled)
    where a softcap applies. The order is `flashsdpa.attention`'s: scale, softcap, ALiBi, mask, visibility."""
    k = k.repeat_interleave(desc.gqa_group, dim=1)
    s = (q @ k.transpose(-1, -2)) * desc.scale
    softcap_slope = None
    if desc.softcap:
        capped = torch.tanh(s / desc.softcap)
        s, softcap_slope = desc.softcap * capped, 1.0 - capped * capped
    rows, cols = positions(desc, q.device)
    if desc.alibi:
        s = s - alibi_slopes.to(s.dtype)[:, :, None, None] * (rows - cols).abs()
    if desc.mask is MaskKind.BOOL:
        s = s.masked_fill(~mask, float("-inf"))
    elif desc.mask is MaskKind.FLOAT:
        s = s + mask.to(s.dtype)
    hidden = torch.zeros(desc.seq_q, desc.seq_kv, dtype=torch.bool, device=q.device)
    if desc.causal:
        hidden |= cols > rows
    if desc.window_left >= 0:
        hidden |= cols < rows - desc.window_left
    if desc.window_right >= 0:
        hidden |= cols > rows + desc.window_right
    return s.masked_fill(hidden, float("-inf")), softcap_slope


def attention_math(desc: AttentionDescriptor, q, k, v, mask, alibi_slopes, sinks, dropout_seed):
    """Attention in the inputs' dtype; returns (out, lse, probs, dropped_probs, softcap_slope)."""
    s, softcap_slope = scores(desc, q, k, mask, alibi_slopes)
    if desc.sinks:  # one more column per row: the sink's logit, which has no value row
        s = torch.cat([s, sinks.to(s.dtype).view(1, -1, 1, 1).expand(*s.shape[:3], 1)], dim=-1)
    lse = torch.logsumexp(s, dim=-1)
    # Normalise by the row sum, not exp(-lse): with scores near finfo.min,
    # lse = max + log(S) rounds to max and would lose the 1/S.
    row_max = s.amax(dim=-1, keepdim=True)
    # A row with no visible key has max -inf: give it zero weights, not NaN.
    unnormalised = torch.exp(s - torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max))
    row_sum = unnormalised.sum(dim=-1, keepdim=True)
    probs = (unnormalised / torch.where(row_sum == 0, torch.ones_like(row_sum), row_sum))[..., : desc.seq_kv]
    dropped = probs * dropout_factor(desc, dropout_seed, q.device) if desc.dropout_p > 0.0 else probs
    out = dropped @ v.repeat_interleave(desc.gqa_group, dim=1)
    return out, lse, probs, dropped, softcap_slope


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
    checks_variants = True

    def unsupported_reasons(self, desc: AttentionDescriptor, device: torch.device) -> list[str]:
        return []

    def forward(self, desc, inputs):
        q, k, v, mask = (_float64(t) for t in (inputs.query, inputs.key, inputs.value, inputs.mask))
        out, lse, _, _, _ = attention_math(desc, q, k, v, mask, inputs.alibi_slopes, inputs.sinks, inputs.dropout_seed)
        return out.to(desc.dtype), lse.to(statistics_dtype(desc.dtype))

    def backward(self, desc, inputs, out, lse, grad_out, needed: GradientsNeeded):
        # The textbook gradient of softmax attention, dense, in float64.
        q, k, v, mask = (_float64(t) for t in (inputs.query, inputs.key, inputs.value, inputs.mask))
        d_out = grad_out.to(torch.float64)
        _, _, probs, dropped, softcap_slope = attention_math(
            desc, q, k, v, mask, inputs.alibi_slopes, inputs.sinks, inputs.dropout_seed
        )
        d_dropped = d_out @ v.repeat_interleave(desc.gqa_group, dim=1).transpose(-1, -2)
        d_probs = d_dropped * dropout_factor(desc, inputs.dropout_seed, q.device) if desc.dropout_p > 0.0 else d_dropped
        # The sink's share of each row is in probs' normalisation; the sink itself has dP = 0.
        d_scores = probs * (d_probs - (probs * d_probs).sum(-1, keepdim=True))
        d_scaled = d_scores if softcap_slope is None else d_scores * softcap_slope
        k_full = k.repeat_interleave(desc.gqa_group, dim=1)
        dq = (d_scaled @ k_full) * desc.scale if needed.query else None
        dk = sum_over_group(desc, d_scaled.transpose(-1, -2) @ q) * desc.scale if needed.key else None
        dv = sum_over_group(desc, dropped.transpose(-1, -2) @ d_out) if needed.value else None
        cast = lambda t, dtype: None if t is None else t.to(dtype)  # noqa: E731
        return cast(dq, desc.dtype), cast(dk, desc.dtype), cast(dv, desc.dtype), cast(
            d_scores if needed.mask else None, statistics_dtype(desc.dtype)
        )


def _float64(t):
    return t.to(torch.float64) if t is not None and t.is_floating_point() else t
