"""In-kernel twin of `flashsdpa.dropout.keep_mask`: the same 32-bit hash, bit for bit."""

import triton
import triton.language as tl


@triton.jit
def fmix32(h):
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def dropout_stream(seed_lo, seed_hi, bh):
    """Per (batch, query head) stream key; `bh` = batch index * Hq + query head."""
    return fmix32(seed_lo.to(tl.uint32) ^ fmix32(bh.to(tl.uint32) + seed_hi.to(tl.uint32)))


@triton.jit
def dropout_keep(stream, rows, cols, threshold):
    """Bool tile: keep[i, j] for int row indices `rows` [M] and column indices `cols` [N]."""
    r = fmix32(stream ^ rows.to(tl.uint32))
    u = fmix32(r[:, None] + cols.to(tl.uint32)[None, :])
    return (u >> 8) >= threshold.to(tl.uint32)
