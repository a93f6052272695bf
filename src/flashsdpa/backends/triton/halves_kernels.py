"""float32 tensors split into float16 halves, for the main forward kernel's full-precision products.

A float32 x is written as hi + lo, both float16, after a power-of-two scale
that puts the largest finite magnitude of its row (q, k) or of its column in
a block of rows (v, a block per key block of the kernel) in [2**14, 2**15):
hi = x * scale rounded to float16, lo = the rest rounded to float16. A float16
keeps 11 significant bits, so hi + lo holds x to 2**-22 of that magnitude, and
three float16 tensor-core products (hi hi + hi lo + lo hi, each exact in the
float32 accumulator) give a float32 product to about 2**-21: the accuracy of
three tf32 products, at twice their rate and half their shared memory. The
scale keeps the largest element below float16's overflow (65504) and every lo
part of a value within 2**17 of it out of float16's subnormals; smaller
values lose bits only below 2**-38 of the largest one. The kernel undoes the
scale with `unscale` = 1 / scale (exact: both are powers of two).

Infinities and NaNs stay in hi, with lo = 0 (an inf - inf rest would make a
NaN where float32 math has an inf); a row whose only large values are
infinite is scaled by its finite ones.

The backward (backward_kernels) multiplies halves too: q, k, v and dO split
here per row, and P and dS split in registers per row (`row_scaled_halves`).

Per column, v's blocks of rows are the main kernel's key blocks: each
block's P @ V product is unscaled before it joins the output (a per-head
column scale would need a pass over all of v first). The kernel scales P
(<= 1) by P_HALVES_SCALE for its halves too, and v's unscale undoes that as
well, so the output accumulates in true units (a v near float32's largest
value must not overflow on the way).
"""

import triton
import triton.language as tl

# The largest finite magnitude of a row or column is scaled into [2**14, 2**15).
TOP_EXPONENT = tl.constexpr(14)
# The forward kernel's P (<= 1) is scaled by 2**P_HALVES_SCALE_EXPONENT before its split, as the other
# operands are.
P_HALVES_SCALE_EXPONENT = tl.constexpr(14)
P_HALVES_SCALE = tl.constexpr(2.0**P_HALVES_SCALE_EXPONENT.value)
# Scales stop at 2**126 (2**112 with P's scale to undo as well), so every unscale stays a normal float32.
MAX_UNSCALE_EXPONENT = tl.constexpr(126)


@triton.jit
def scale_and_unscale(largest, UNSCALE_SHIFT: tl.constexpr):
    """(scale, unscale): powers of two with largest * scale in [2**14, 2**15) and
    unscale = 2**-UNSCALE_SHIFT / scale.

    Read from the exponent bits, so exact. A zero or tiny `largest` is scaled
    less (by 2**(126 - UNSCALE_SHIFT) at most)."""
    biased_exponent = ((largest.to(tl.uint32, bitcast=True) >> 23) & 0xFF).to(tl.int32)
    scale_exponent = tl.minimum(TOP_EXPONENT + 127 - biased_exponent, MAX_UNSCALE_EXPONENT - UNSCALE_SHIFT)
    scale = ((scale_exponent + 127) << 23).to(tl.float32, bitcast=True)
    unscale = ((127 - scale_exponent - UNSCALE_SHIFT) << 23).to(tl.float32, bitcast=True)
    return scale, unscale


@triton.jit
def largest_finite(x, axis: tl.constexpr):
    """The largest finite magnitude of x along `axis` (0 where there is none)."""
    magnitude = tl.abs(x)
    return tl.max(tl.where(magnitude < float("inf"), magnitude, 0.0), axis)  # NaN < inf is false too


@triton.jit
def float16_halves(scaled):
    """(hi, lo): float16 halves of float32 `scaled` (already scaled into float16's range), hi + lo ~ scaled.

    An infinite or NaN hi keeps lo = 0 (see the module doc)."""
    hi = scaled.to(tl.float16)
    hi_wide = hi.to(tl.float32)
    lo = tl.where(tl.abs(hi_wide) < float("inf"), scaled - hi_wide, 0.0).to(tl.float16)
    return hi, lo


@triton.jit
def row_scaled_halves(x):
    """(hi, lo, unscale) of a float32 [R, C] tile split in registers, each row scaled on its own.

    As the split kernel's rows: x[r, :] ~ (hi[r, :] + lo[r, :]) * unscale[r].
    The backward splits P and dS so before their products."""
    scale, unscale = scale_and_unscale(largest_finite(x, 1), 0)
    hi, lo = float16_halves(x * scale[:, None])
    return hi, lo, unscale


# Sizes only bound loops and offsets: specialising on them would recompile as shapes change.
@triton.jit(do_not_specialize=["heads", "n_rows", "n_cols", "n_row_blocks"])
def split_into_halves_kernel(
    x_ptr,
    halves_ptr,
    unscale_ptr,
    stride_xb,
    stride_xh,
    stride_xr,
    stride_xc,
    heads,
    n_rows,
    n_cols,
    n_row_blocks,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PER_COLUMN: tl.constexpr,
):
    """Rows [BLOCK_R * row_block, +BLOCK_R) of one (batch, head) matrix of x, split into float16 halves.

    Grid: (n_row_blocks * batch * heads,), the row block varying fastest.
    halves is contiguous (batch, 2, heads, n_rows, n_cols): hi, then lo, so
    that the kernel reads lo as `heads` heads past hi. Scaled per row
    (unscale: (batch, heads, n_rows)), or with PER_COLUMN per column of this
    block of rows (unscale: (batch, heads, n_row_blocks, n_cols), which also
    undoes P_HALVES_SCALE).
    """
    pid = tl.program_id(0)
    bh = pid // n_row_blocks
    row_block = pid % n_row_blocks
    batch = bh // heads
    head = bh % heads
    rows = row_block * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    in_bounds = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    x_head_ptr = x_ptr + batch.to(tl.int64) * stride_xb + head.to(tl.int64) * stride_xh
    x = tl.load(
        x_head_ptr + rows.to(tl.int64)[:, None] * stride_xr + cols[None, :] * stride_xc, mask=in_bounds, other=0.0
    )
    if PER_COLUMN:
        scale, unscale = scale_and_unscale(largest_finite(x, 0), P_HALVES_SCALE_EXPONENT)
        hi, lo = float16_halves(x * scale[None, :])
        unscale_offsets = (bh * n_row_blocks + row_block).to(tl.int64) * n_cols + cols
        tl.store(unscale_ptr + unscale_offsets, unscale, mask=cols < n_cols)
    else:
        hi, lo, unscale = row_scaled_halves(x)
        tl.store(unscale_ptr + bh.to(tl.int64) * n_rows + rows, unscale, mask=rows < n_rows)
    matrix = n_rows.to(tl.int64) * n_cols
    hi_offsets = (batch * 2 * heads + head) * matrix + rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    tl.store(halves_ptr + hi_offsets, hi, mask=in_bounds)
    tl.store(halves_ptr + heads * matrix + hi_offsets, lo, mask=in_bounds)
