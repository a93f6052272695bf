"""Kernel pieces every flash-attention kernel shares: constants, tile loads, products, roundings.

The forward, backward and decode kernels import from here (never from each
other's modules), so one name means one thing in all of them.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)

# MASK_KIND values (the launcher maps descriptor.MaskKind onto them).
MASK_NONE = tl.constexpr(0)
MASK_BOOL = tl.constexpr(1)  # uint8 view of a bool mask: nonzero = may attend
MASK_FLOAT = tl.constexpr(2)  # added to the scaled scores

# TILE_LOADS values: how Q/K/V tiles are read and output tiles written.
LOAD_POINTERS = tl.constexpr(0)  # masked pointer loads: any strides, any GPU
# TMA (sm90+) through one 2-D (rows, head_dim) descriptor per head, built by
# each program in global scratch (costs every program a few microseconds of
# serial prologue on an H100; works with batch/head strides of 0).
LOAD_DEVICE_DESCRIPTORS = tl.constexpr(1)
# TMA through 4-D (batch, heads, rows, head_dim) descriptors the launcher
# builds once per call and passes as kernel arguments.
LOAD_HOST_DESCRIPTORS = tl.constexpr(2)

# VARLEN values: whether a kernel reads one (batch, head) problem per program or packed sequences, whose
# offsets it loads from cu_seq_q / cu_seq_k (and their key counts) on the device, and how each sequence's
# queries align with its keys (the visible band's diagonals and ALiBi's offset follow the sequence's lengths).
VARLEN_OFF = tl.constexpr(0)
VARLEN_TOP_LEFT = tl.constexpr(1)  # query i of a sequence sits at its key i
VARLEN_BOTTOM_RIGHT = tl.constexpr(2)  # the sequence's last query sits at its last key


@triton.jit
def load_rows(
    desc,
    desc_batch,
    desc_head,
    head_ptr,
    start,
    offs_rows,
    offs_cols,
    n_rows,
    n_cols,
    stride_row,
    stride_col,
    CHECK_ROWS: tl.constexpr,
    TILE_LOADS: tl.constexpr,
):
    """Rows [start, start + len(offs_rows)) of one head's (n_rows, n_cols) matrix, zero-padded to the block.

    The head is (desc_batch, desc_head) of a 4-D host descriptor, the 2-D
    device descriptor `desc` itself, or the matrix at `head_ptr`.
    """
    if TILE_LOADS == LOAD_HOST_DESCRIPTORS:
        tile = desc.load([desc_batch, desc_head, start, 0])
        return tile.reshape([offs_rows.shape[0], offs_cols.shape[0]])
    elif TILE_LOADS == LOAD_DEVICE_DESCRIPTORS:
        return desc.load([start, 0])
    else:
        tile_offsets = offs_rows[:, None] * stride_row + offs_cols[None, :] * stride_col
        ptrs = head_ptr + tl.cast(start, tl.int64) * stride_row + tile_offsets
        in_bounds = offs_cols[None, :] < n_cols
        if CHECK_ROWS:
            in_bounds = in_bounds & (start + offs_rows[:, None] < n_rows)
        return tl.load(ptrs, mask=in_bounds, other=0.0)


@triton.jit
def matmul(a, b, acc, DOT_PRECISION: tl.constexpr, WIDEN_DOT_OPERANDS: tl.constexpr):
    """a @ b + acc (acc may be None) with a float32 accumulator; WIDEN_DOT_OPERANDS multiplies in float32.

    Widening exists for the Triton interpreter, whose tl.dot multiplies the raw
    bit patterns of bfloat16 (triton#11584). It changes no result: a product of
    two bfloat16 values is exact in float32, as in the tensor cores.

    float32 at full precision (tf32x3 on a GPU, ieee under the interpreter)
    adds each product to acc with IEEE adds: the tensor cores' float32
    accumulation truncates, and with acc fed to them the bias grows with every
    block of a long loop (H100: 7e-6 relative error at 1024 keys, 2e-5 at 3001).
    """
    if WIDEN_DOT_OPERANDS:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if (DOT_PRECISION == "tf32x3" or DOT_PRECISION == "ieee") and acc is not None:
        return acc + tl.dot(a, b, input_precision=DOT_PRECISION)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def round_to_bfloat16(x):
    """float32 x rounded to the nearest bfloat16 (ties to even), kept in float32; NaN stays NaN.

    For the Triton interpreter only, whose float32 -> bfloat16 cast truncates
    where the GPU rounds to nearest: truncation biases every rounded P, dS and
    stored output the same way (about 1.7-2.5x the error of torch's own
    bfloat16 backward). A value rounded here casts to bfloat16 exactly, so the
    interpreter then matches the GPU.
    """
    bits = x.to(tl.uint32, bitcast=True)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return tl.where(x != x, x, rounded)


@triton.jit
def to_dtype(x, dtype: tl.constexpr, WIDEN_DOT_OPERANDS: tl.constexpr):
    """x.to(dtype), rounding to nearest under the interpreter too (WIDEN_DOT_OPERANDS marks interpreted bfloat16)."""
    if WIDEN_DOT_OPERANDS:
        x = round_to_bfloat16(x)
    return x.to(dtype)


@triton.jit
def matmul_split(a_hi, a_lo, b_hi, b_lo):
    """a @ b to about float32 accuracy from three tensor-core products of split operands.

    The halves are float16 (see halves_kernels). a_lo @ b_lo (under 2**-22 of
    the product) is dropped; the small terms are accumulated first. As in
    Triton's tf32x3, non-finite small terms are dropped: they come from an
    infinite operand (its lo part is 0 with a float16 hi; a lo times an inf
    is +-inf or NaN, of either sign), and the main product alone then gives
    IEEE's inf (or NaN, where the inputs make one).
    """
    small = tl.dot(a_lo, b_hi)
    small = tl.dot(a_hi, b_lo, small)
    small = tl.where(tl.abs(small) < float("inf"), small, 0.0)
    return tl.dot(a_hi, b_hi, small)


@triton.jit
def mask_seed(mask_tile, IS_BOOL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A [BLOCK_M, BLOCK_N] accumulator for q @ k^T made from the mask tile: 0 or -inf (bool), +-0 (float).

    It changes no score (0 + x = x; a hidden score becomes -inf, and the
    caller still applies the mask itself, so an inf or NaN product stays
    hidden exactly as before). It is there for Triton's layout choice
    (sm_90, Triton 3.6): a mask tile loaded into registers keeps the load's
    coalesced layout, and the remove-layout-conversions pass then computed
    the whole softmax a second time in that layout (row max, exp2, row sum),
    up to 64 rows per thread with 1-byte loads; compile_sm90 showed 3-6 KB of
    spills. Fed to the dot as its accumulator, the mask is converted to the
    MMA layout at once and the softmax stays there (d=64 bool, L=S=300:
    6172 -> 1204 spill bytes; S=512: 496 -> 168). The launchers use it only
    for unaligned mask rows (MASK_SEED, see launch_forward.seeds_with_mask):
    with aligned rows it measured slower on the H100.
    """
    if IS_BOOL:
        seed = tl.where(mask_tile != 0, 0.0, float("-inf"))
    else:
        seed = tl.where(mask_tile.to(tl.float32) > 0, 0.0, -0.0)
    return tl.broadcast_to(seed, [BLOCK_M, BLOCK_N])


@triton.jit
def packed_sequence(cu_seq_q_ptr, cu_seq_k_ptr, key_counts_ptr, index, lowest_diagonal, highest_diagonal,
                    VARLEN: tl.constexpr):
    """Packed sequence `index` (see VARLEN): (q_first, k_first, seq_q, seq_kv, lowest_diagonal,
    highest_diagonal, key_offset). q_first and k_first are its first query and key rows (int64);
    the launcher's diagonals are relative to the sequence's aligned position, the returned ones
    absolute, kept within [-seq_q, seq_kv] as the launchers keep theirs (int32 whatever the window)."""
    q_first = tl.load(cu_seq_q_ptr + index).to(tl.int64)
    k_first = tl.load(cu_seq_k_ptr + index).to(tl.int64)
    seq_q = (tl.load(cu_seq_q_ptr + index + 1) - q_first).to(tl.int32)
    seq_kv = tl.load(key_counts_ptr + index).to(tl.int32)
    if VARLEN == VARLEN_BOTTOM_RIGHT:
        key_offset = seq_kv - seq_q
    else:
        key_offset = seq_kv * 0
    lowest = tl.maximum(lowest_diagonal + key_offset, -seq_q)
    highest = tl.minimum(highest_diagonal + key_offset, seq_kv)
    return q_first, k_first, seq_q, seq_kv, lowest, highest, key_offset


@triton.jit
def sequence_index(sequence_order_ptr, grid_index, LONGEST_FIRST: tl.constexpr):
    """The packed sequence that the grid's `grid_index`-th sequence of programs works on: with LONGEST_FIRST,
    sequence_order_ptr[grid_index] (the sequences sorted by decreasing work, so the grid starts with the
    longest programs), else grid_index itself. int64."""
    if LONGEST_FIRST:
        return tl.load(sequence_order_ptr + grid_index).to(tl.int64)
    return grid_index.to(tl.int64)
