"""The flash algorithm in PyTorch tensor ops, tile by tile, on any device.

Extra memory is O(L*E) for the accumulators plus one bounded tile of scores
(BLOCK_M x BLOCK_N per batch*head); the L x S matrix of the whole problem is
never formed. Accumulates in float32 (float64 for float64 inputs) and rounds
once at the end, so its bf16/fp16 error is at or below torch's own.
"""

from __future__ import annotations

import torch

from flashsdpa import dropout
from flashsdpa.backends.base import AttentionInputs, Backend, GradientsNeeded, new_output
from flashsdpa.descriptor import AttentionDescriptor, MaskKind, statistics_dtype
from flashsdpa.visibility import Block, Visibility

# Tiles large enough that Python overhead stays small next to the matmuls on a
# CPU, small enough that one score tile per batch*head stays in cache-sized
# memory (measured on the 2-core CPU machine: 256 x 512 was within 10% of the
# best tile for L = 1024-4096).
BLOCK_M = 256
BLOCK_N = 512


class _Tiles:
    """Group-shaped views and per-tile score computation shared by forward and backward."""

    def __init__(self, desc: AttentionDescriptor, inputs: AttentionInputs):
        self.desc = desc
        self.acc = statistics_dtype(desc.dtype)  # accumulate in float32, or float64 for float64
        b, hkv, g = desc.batch, desc.heads_kv, desc.gqa_group
        # Split the query heads into (kv head, group member): always a view.
        self.q = inputs.query.unflatten(1, (hkv, g))  # (B, Hkv, G, L, E)
        self.k = inputs.key.unsqueeze(2)  # (B, Hkv, 1, S, E)
        self.v = inputs.value.unsqueeze(2)
        self.mask = None if inputs.mask is None else inputs.mask.unflatten(1, (hkv, g))
        self.seed = inputs.dropout_seed
        self.bh = torch.arange(b * hkv * g, device=inputs.query.device).view(b, hkv, g, 1, 1)
        self.visibility = Visibility.of(desc)
        self.slopes = None  # (B, Hkv, G, 1, 1)
        if desc.alibi:
            self.slopes = inputs.alibi_slopes.to(self.acc).reshape(b, hkv, g, 1, 1)
        self.sinks = None  # (1, Hkv, G, 1, 1)
        if desc.sinks:
            self.sinks = inputs.sinks.to(self.acc).reshape(1, hkv, g, 1, 1)

    def key_blocks(self, m0: int, m1: int):
        """Key blocks that some query of [m0, m1) sees (the rest are skipped)."""
        return self.visibility.key_blocks(m0, m1, BLOCK_N)

    def query_blocks(self, n0: int, n1: int):
        """Query blocks that see some key of [n0, n1)."""
        return self.visibility.query_blocks(n0, n1, BLOCK_M)

    def scores(self, m0, m1, block: Block, q_tile, k_tile):
        """(final scores, d final / d scaled or None) of one tile, in the accumulator dtype.

        The order is `flashsdpa.attention`'s: scale, softcap, ALiBi, the float mask
        added or the bool mask applied, then the keys the query may not see -> -inf.
        """
        n0, n1 = block.start, block.stop
        s = (q_tile @ k_tile.transpose(-1, -2)) * self.desc.scale
        softcap_slope = None
        if self.desc.softcap:
            capped = torch.tanh(s / self.desc.softcap)
            s, softcap_slope = self.desc.softcap * capped, 1.0 - capped * capped
        rows = cols = None
        if self.slopes is not None:
            rows, cols = self._positions(m0, m1, n0, n1, s.device)
            s = s - self.slopes * (rows.view(-1, 1) + self.desc.key_offset - cols.view(1, -1)).abs()
        if self.mask is not None:
            m = self.mask[..., m0:m1, n0:n1]
            if self.desc.mask is MaskKind.BOOL:
                s = s.masked_fill(~m, float("-inf"))
            else:
                s = s + m.to(self.acc)
        if block.needs_mask:
            if rows is None:
                rows, cols = self._positions(m0, m1, n0, n1, s.device)
            s = s.masked_fill(~self.visibility.mask(rows, cols), float("-inf"))
        return s, softcap_slope

    @staticmethod
    def _positions(m0, m1, n0, n1, device):
        return torch.arange(m0, m1, device=device), torch.arange(n0, n1, device=device)

    def keep(self, m0, m1, n0, n1):
        rows = torch.arange(m0, m1, device=self.bh.device).view(-1, 1)
        cols = torch.arange(n0, n1, device=self.bh.device).view(1, -1)
        return dropout.keep_mask(self.seed, self.desc.dropout_p, self.bh, rows, cols)

    def tile(self, t, start, stop):
        return t[..., start:stop, :].to(self.acc)


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """lse with -inf (rows with no visible key) replaced by +inf, so exp(s - lse) is 0 there, not NaN."""
    return torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)


class TiledBackend(Backend):
    name = "tiled"
    checks_variants = True

    def unsupported_reasons(self, desc: AttentionDescriptor, device: torch.device) -> list[str]:
        return []

    def forward(self, desc: AttentionDescriptor, inputs: AttentionInputs):
        t = _Tiles(desc, inputs)
        b, hkv, g = desc.batch, desc.heads_kv, desc.gqa_group
        out = new_output((b, hkv, g, desc.seq_q, desc.head_dim_v), desc.dtype, inputs.query.device)
        lse = new_output((b, hkv, g, desc.seq_q), statistics_dtype(desc.dtype), inputs.query.device)
        keep_scale = 1.0 / (1.0 - desc.dropout_p)
        for m0 in range(0, desc.seq_q, BLOCK_M):
            m1 = min(m0 + BLOCK_M, desc.seq_q)
            q_tile = t.tile(t.q, m0, m1)
            # A sink starts each row's running softmax: max = the sink, sum = exp(sink - max) = 1, no value row.
            row_max = torch.full((b, hkv, g, m1 - m0, 1), float("-inf"), dtype=t.acc, device=q_tile.device)
            row_sum = torch.zeros_like(row_max)
            if t.sinks is not None:
                row_max = t.sinks.expand_as(row_max)
                row_sum = torch.where(torch.isneginf(row_max), row_sum, 1.0)
            acc = torch.zeros(b, hkv, g, m1 - m0, desc.head_dim_v, dtype=t.acc, device=q_tile.device)
            for block in t.key_blocks(m0, m1):
                n0, n1 = block.start, block.stop
                s, _ = t.scores(m0, m1, block, q_tile, t.tile(t.k, n0, n1))
                new_max = torch.maximum(row_max, s.amax(dim=-1, keepdim=True))
                # Rows that have seen no visible key yet keep max -inf; shift by 0 there.
                shift = torch.where(torch.isneginf(new_max), torch.zeros_like(new_max), new_max)
                p = torch.exp(s - shift)
                correction = torch.exp(row_max - shift)
                row_sum = row_sum * correction + p.sum(dim=-1, keepdim=True)
                if desc.dropout_p > 0.0:
                    p = p * t.keep(m0, m1, n0, n1) * keep_scale
                acc = acc * correction + p @ t.tile(t.v, n0, n1)
                row_max = new_max
            empty = row_sum == 0  # no visible key and no sink: output zeros, lse -inf
            out[..., m0:m1, :] = torch.where(empty, torch.zeros_like(acc), acc / torch.where(empty, 1.0, row_sum))
            lse[..., m0:m1] = (row_max + torch.log(row_sum)).squeeze(-1)
        return out.flatten(1, 2), lse.flatten(1, 2)

    def backward(self, desc, inputs, out, lse, grad_out, needed: GradientsNeeded):
        t = _Tiles(desc, inputs)
        b, hkv, g = desc.batch, desc.heads_kv, desc.gqa_group
        device = inputs.query.device
        d_out = grad_out.unflatten(1, (hkv, g))
        lse_g = _finite(lse.unflatten(1, (hkv, g))).to(t.acc).unsqueeze(-1)
        keep_scale = 1.0 / (1.0 - desc.dropout_p)

        def probs_and_grad(m0, m1, block, q_tile, do_tile, k_tile, v_tile):
            """P, dP of one tile (dP with dropout's keep/(1-p) applied), that factor, and d final / d scaled."""
            n0, n1 = block.start, block.stop
            s, softcap_slope = t.scores(m0, m1, block, q_tile, k_tile)
            p = torch.exp(s - lse_g[..., m0:m1, :])
            dp = do_tile @ v_tile.transpose(-1, -2)
            # keep is bool: times a Python float it would be float32 (float64 inputs lost 2e-8 to it)
            keep = t.keep(m0, m1, n0, n1).to(t.acc) * keep_scale if desc.dropout_p > 0.0 else None
            return p, dp if keep is None else dp * keep, keep, softcap_slope

        # delta_i = sum_j P_ij dP_ij, summed tile by tile from the very P used
        # below, which is rescaled to sum to 1 per row (to 1 less the sink's share). rowsum(dO * O) equals
        # delta in exact math, but O was rounded to the output dtype (float16:
        # up to 3x torch's gradient error), and P = exp(s - lse) inherits the
        # rounding of a float32 lse, |lse| * 6e-8 (float32 at scale 4: dq 2e-5
        # on the H100, over the 1e-5 bar). As the triton backward does.
        delta = torch.zeros(b, hkv, g, desc.seq_q, 1, dtype=t.acc, device=device)
        # The sink's share, exp(sink - lse), rounded as P is, joins the row sum.
        row_scale = torch.zeros(b, hkv, g, desc.seq_q, 1, dtype=t.acc, device=device)
        if t.sinks is not None:
            row_scale = row_scale + torch.exp(t.sinks - lse_g)
        for m0 in range(0, desc.seq_q, BLOCK_M):
            m1 = min(m0 + BLOCK_M, desc.seq_q)
            do_tile, q_tile = t.tile(d_out, m0, m1), t.tile(t.q, m0, m1)
            for block in t.key_blocks(m0, m1):
                n0, n1 = block.start, block.stop
                p, dp, _, _ = probs_and_grad(m0, m1, block, q_tile, do_tile, t.tile(t.k, n0, n1), t.tile(t.v, n0, n1))
                delta[..., m0:m1, :] += (p * dp).sum(-1, keepdim=True)
                row_scale[..., m0:m1, :] += p.sum(-1, keepdim=True)
        # A row that sees no key (and has no sink) sums to 0: its P, scale and delta stay 0.
        row_scale = torch.where(row_scale > 0, 1.0 / torch.where(row_scale > 0, row_scale, 1.0), 0.0)
        delta *= row_scale

        dq = torch.zeros(b, hkv, g, desc.seq_q, desc.head_dim, dtype=t.acc, device=device) if needed.query else None
        dk = new_output((b, hkv, 1, desc.seq_kv, desc.head_dim), desc.dtype, device) if needed.key else None
        dv = new_output((b, hkv, 1, desc.seq_kv, desc.head_dim_v), desc.dtype, device) if needed.value else None
        dmask = None
        if needed.mask:
            dmask = torch.zeros(b, hkv, g, desc.seq_q, desc.seq_kv, dtype=statistics_dtype(desc.dtype), device=device)
        # Key blocks outer so dK/dV accumulate in one tile; dQ accumulates in O(L*E).
        for n0 in range(0, desc.seq_kv, BLOCK_N):
            n1 = min(n0 + BLOCK_N, desc.seq_kv)
            k_tile, v_tile = t.tile(t.k, n0, n1), t.tile(t.v, n0, n1)
            dk_acc = torch.zeros(b, hkv, 1, n1 - n0, desc.head_dim, dtype=t.acc, device=device)
            dv_acc = torch.zeros(b, hkv, 1, n1 - n0, desc.head_dim_v, dtype=t.acc, device=device)
            for rows in t.query_blocks(n0, n1):
                m0, m1 = rows.start, rows.stop
                block = Block(n0, n1, rows.needs_mask)
                q_tile, do_tile = t.tile(t.q, m0, m1), t.tile(d_out, m0, m1)
                p, dp, keep, softcap_slope = probs_and_grad(m0, m1, block, q_tile, do_tile, k_tile, v_tile)
                p = p * row_scale[..., m0:m1, :]
                p_dropped = p if keep is None else p * keep
                ds = p * (dp - delta[..., m0:m1, :])
                ds_scaled = ds if softcap_slope is None else ds * softcap_slope
                # Sum over the group's query heads (dim 2) for the shared K/V head.
                dv_acc += (p_dropped.transpose(-1, -2) @ do_tile).sum(2, keepdim=True)
                dk_acc += (ds_scaled.transpose(-1, -2) @ q_tile).sum(2, keepdim=True) * desc.scale
                if dq is not None:
                    dq[..., m0:m1, :] += (ds_scaled @ k_tile) * desc.scale
                if dmask is not None:
                    dmask[..., m0:m1, n0:n1] = ds
            if dk is not None:
                dk[..., n0:n1, :] = dk_acc
            if dv is not None:
                dv[..., n0:n1, :] = dv_acc
        flat = lambda x: None if x is None else x.flatten(1, 2)  # noqa: E731
        return (
            None if dq is None else dq.to(desc.dtype).flatten(1, 2),
            flat(dk),
            flat(dv),
            flat(dmask),
        )
