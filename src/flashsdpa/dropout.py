"""Counter-based dropout randomness shared by every backend.

Each attention weight (batch*head `bh`, query row `i`, key column `j`) gets a
32-bit hash of (seed, bh, i, j). The Triton kernels compute the same hash in
registers (`backends/triton/dropout_hash.py`), so forward and backward regenerate
one pattern from the saved seed without storing it, and the tiled and reference
backends reproduce it bit for bit. The seed itself is drawn from torch's default
generator, so `torch.manual_seed` reproduces a run.

Hash: murmur3's 32-bit finaliser, chained:
    stream = fmix32(seed_lo ^ fmix32(seed_hi + bh))
    u      = fmix32(fmix32(stream ^ i) + j)
    keep   = (u >> 8) >= threshold,  threshold = round(p * 2**24)
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
FMIX_C1 = 0x85EBCA6B
FMIX_C2 = 0xC2B2AE35
UNIFORM_BITS = 24


def draw_seed() -> torch.Tensor:
    """A fresh 62-bit seed from torch's default CPU generator, as an int64 tensor of shape (2,)."""
    seed = torch.randint(0, 2**31, (2,), dtype=torch.int64, device="cpu")
    return seed


def split_seed(seed: torch.Tensor) -> tuple[int, int]:
    """(seed_lo, seed_hi) as Python ints, each < 2**31."""
    lo, hi = seed.tolist()
    return int(lo), int(hi)


def drop_threshold(p: float) -> int:
    """Hash values (top 24 bits) below this are dropped: P(drop) = threshold / 2**24."""
    return int(round(p * (1 << UNIFORM_BITS)))


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    # int64 arithmetic, masked back to 32 bits after each multiply (the low 32
    # bits of a wrapped 64-bit product are exact).
    h = h ^ (h >> 16)
    h = (h * FMIX_C1) & MASK32
    h = h ^ (h >> 13)
    h = (h * FMIX_C2) & MASK32
    return h ^ (h >> 16)


def keep_mask(
    seed: tuple[int, int],
    p: float,
    bh: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
) -> torch.Tensor:
    """Bool keep-mask broadcast over `bh`, `rows`, `cols` (int64 index tensors).

    Shapes follow broadcasting, e.g. bh (BH,1,1), rows (1,L,1), cols (1,1,S)
    gives (BH, L, S).
    """
    seed_lo, seed_hi = seed
    stream = _fmix32((seed_lo ^ _fmix32((bh + seed_hi) & MASK32)) & MASK32)
    u = _fmix32((_fmix32(stream ^ rows) + cols) & MASK32)
    return (u >> 8) >= drop_threshold(p)


def full_keep_mask(seed: tuple[int, int], p: float, batch_heads: int, seq_q: int, seq_kv: int, device) -> torch.Tensor:
    """The whole (batch_heads, seq_q, seq_kv) keep-mask; for the reference backend and tests."""
    bh = torch.arange(batch_heads, device=device, dtype=torch.int64).view(-1, 1, 1)
    rows = torch.arange(seq_q, device=device, dtype=torch.int64).view(1, -1, 1)
    cols = torch.arange(seq_kv, device=device, dtype=torch.int64).view(1, 1, -1)
    return keep_mask(seed, p, bh, rows, cols)
