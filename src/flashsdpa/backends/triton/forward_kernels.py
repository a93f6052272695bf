"""Forward flash-attention kernels: the main kernel, and the online-softmax pieces flash decoding shares.

Online softmax with float32 accumulators. The running row max is kept over
the raw products q.k, and for 16-bit inputs each weight is
exp2((q.k - max) * scale * log2(e)): the subtraction is exact near the max, so
the largest weight of a row is exactly 1. Taking the max of scaled scores, or
folding the scale into one FFMA (q.k * c - max * c), leaves the largest weight
at exp2(rounding residual), up to 1 +- 3.5e-4 for scores near 1e4; rounded to
float16 for P @ V, that put a near-one-hot row's output at 12x torch's error
on the H100. float32 inputs take the FFMA (see exponent_below_max). Needs a
positive scale: the launchers pass -q and -scale for a negative one, and q * 0
with scale 1 for zero. With a float mask the scores stay in natural units
(q.k * scale + mask) until exponentiated: a mask of finfo(float32).min times
log2(e) would overflow to -inf and turn a row whose every key carries that
mask into an empty row, while plain softmax gives it uniform weights.

Tensors arrive as (batch, heads, rows, head_dim) views with arbitrary strides.
Per-head base offsets are int64 (batch * stride can pass 2**31), offsets inside
a tile stay int32, and the key position of each loop step is added as an int64
scalar, so no index product overflows however long the sequence.

A row that may attend to no key (fully masked, or causal with nothing visible)
keeps a running max of -inf; it is exponentiated against 0 instead, so it
yields output 0 and lse -inf rather than NaN. Without a mask no row can be
empty, and whole unmasked blocks take a cheaper softmax (FAST_SOFTMAX: no
masking at all).

On an H100 (Triton 3.6) Q/K/V/O tiles move by TMA through 4-D descriptors the
launcher builds once per call; descriptors built by each program cost 6-26%
at L=1024-4096 (d=128, bf16), and pointer loads are the fallback for any
layout TMA cannot read.
"""

import triton
import triton.language as tl

from flashsdpa.backends.triton.common_kernels import (
    LOAD_DEVICE_DESCRIPTORS,
    LOAD_HOST_DESCRIPTORS,
    LOG2E,
    MASK_BOOL,
    MASK_FLOAT,
    MASK_NONE,
    VARLEN_OFF,
    load_rows,
    mask_seed,
    matmul,
    matmul_split,
    packed_sequence,
    to_dtype,
)
from flashsdpa.backends.triton.dropout_hash import dropout_keep, dropout_stream
from flashsdpa.backends.triton.halves_kernels import P_HALVES_SCALE
from flashsdpa.backends.triton.score_kernels import scores_of_products
from flashsdpa.backends.triton.visibility_kernels import blocks_seen

@triton.jit
def exponent_below_max(qk, row_max, score_scale, FUSED: tl.constexpr):
    """(qk - row_max) * score_scale per score: the base-2 exponent of its weight (row_max has qk's shape
    without its last axis, the keys).

    16-bit inputs subtract first, so the largest weight of a row is exactly 1
    before P is rounded to 16 bits (see the module doc). float32 inputs take
    one FFMA (qk * c - row_max * c) instead: their P is split, not rounded,
    for the tensor cores, and one rounding of the exponent is the more
    accurate (at scale 10, subtracting first put the output at 1.7x torch's
    own float32 error).
    """
    if FUSED:
        return qk * score_scale - tl.expand_dims(row_max * score_scale, -1)
    return (qk - tl.expand_dims(row_max, -1)) * score_scale


@triton.jit
def load_mask_tile(mask_row_ptrs, start_n, offs_n, seq_kv, stride_mn, MASK_ROWS_BROADCAST: tl.constexpr,
                   BOUNDARY: tl.constexpr):
    """The mask entries of keys start_n + offs_n for each row of `mask_row_ptrs` ([1, BLOCK_N] if broadcast)."""
    cols = start_n + offs_n
    col_offsets = tl.cast(start_n, tl.int64) * stride_mn + offs_n * stride_mn
    if MASK_ROWS_BROADCAST:
        return tl.load(mask_row_ptrs + col_offsets, mask=cols < seq_kv, other=0)[None, :]
    if BOUNDARY:
        return tl.load(mask_row_ptrs[:, None] + col_offsets[None, :], mask=cols[None, :] < seq_kv, other=0)
    return tl.load(mask_row_ptrs[:, None] + col_offsets[None, :])


@triton.jit
def attend_key_blocks(
    acc,
    row_sum,
    row_max,
    q,
    q_lo,
    k_desc,
    v_desc,
    desc_batch,
    desc_kv_head,
    k_head_ptr,
    v_head_ptr,
    halves,
    mask_row_ptrs,
    key_start,
    key_end,
    offs_m,
    seq_kv,
    head_dim,
    head_dim_v,
    stride_kn,
    stride_kk,
    stride_vn,
    stride_vk,
    stride_mn,
    score_scale,
    dropout_key,
    dropout_threshold,
    band,
    transform,
    BOUNDARY: tl.constexpr,
    FAST_SOFTMAX: tl.constexpr,
    BOUNDED_BELOW: tl.constexpr,
    BOUNDED_ABOVE: tl.constexpr,
    MASK_KIND: tl.constexpr,
    NATURAL_UNITS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr,
    MASK_ROWS_BROADCAST: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WIDEN_DOT_OPERANDS: tl.constexpr,
    FP16_HALVES: tl.constexpr,
    TILE_LOADS: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
    MASK_SEED: tl.constexpr,
):
    """Fold keys [key_start, key_end) into the running (acc, row_sum, row_max) of the rows `offs_m`.

    BOUNDARY blocks may reach past seq_kv or hold keys some row does not see
    (see visibility_kernels) and are masked element by element; the others
    skip that work. FAST_SOFTMAX (only
    for unmasked whole blocks) also drops what masking needs from the softmax.
    `mask_row_ptrs` points at each row's mask
    entries for key 0 ([BLOCK_M] pointers), or at the one shared row when
    MASK_ROWS_BROADCAST. FP16_HALVES: float32 products as three float16
    products of halves the launcher split (see halves_kernels): q and q_lo,
    the k/v tiles, and the tuple `halves` = (lo_kv_heads, k_lo_head_ptr,
    v_lo_head_ptr, q_unscale [BLOCK_M], k_unscale_head_ptr,
    v_unscale_head_ptr): where the lo halves are (`lo_kv_heads` heads past
    the hi ones) and what undoes their scales. Otherwise q_lo and halves are
    unused. MASK_SEED: the mask tile seeds q @ k^T's accumulator
    (see `mask_seed`; not with split products). `band` = (lowest, highest)
    diagonal (visibility_kernels), `transform` = (softcap, ALiBi slope,
    key_offset) (score_kernels). NATURAL_UNITS: scores, row_max and
    score_scale in natural units (see attend_keys).
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in tl.range(key_start, key_end, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        cols = start_n + offs_n
        k = load_rows(
            k_desc, desc_batch, desc_kv_head, k_head_ptr, start_n, offs_n, offs_d, seq_kv, head_dim,
            stride_kn, stride_kk, BOUNDARY, TILE_LOADS,
        )
        if MASK_SEED and not FAST_SOFTMAX and not FP16_HALVES:
            # The mask enters the product's accumulator for the layout's sake (see mask_seed).
            mask_tile = load_mask_tile(mask_row_ptrs, start_n, offs_n, seq_kv, stride_mn, MASK_ROWS_BROADCAST, BOUNDARY)
            qk = matmul(q, tl.trans(k), mask_seed(mask_tile, MASK_KIND == MASK_BOOL, q.shape[0], BLOCK_N),
                        DOT_PRECISION, WIDEN_DOT_OPERANDS)
        else:
            if FP16_HALVES:
                lo_kv_heads, k_lo_head_ptr, _, q_unscale, k_unscale_head_ptr, _ = halves
                k_lo = load_rows(
                    k_desc, desc_batch, desc_kv_head + lo_kv_heads, k_lo_head_ptr, start_n, offs_n, offs_d, seq_kv,
                    head_dim, stride_kn, stride_kk, BOUNDARY, TILE_LOADS,
                )
                key_unscale = tl.load(k_unscale_head_ptr + cols, mask=cols < seq_kv, other=1.0)
                qk = matmul_split(q, q_lo, tl.trans(k), tl.trans(k_lo))
                qk = qk * q_unscale[:, None] * key_unscale[None, :]
            else:
                qk = matmul(q, tl.trans(k), None, DOT_PRECISION, WIDEN_DOT_OPERANDS)
            mask_tile = mask_row_ptrs  # not read without a mask
            if MASK_KIND != MASK_NONE and not FAST_SOFTMAX:
                mask_tile = load_mask_tile(mask_row_ptrs, start_n, offs_n, seq_kv, stride_mn, MASK_ROWS_BROADCAST,
                                           BOUNDARY)
        if not FAST_SOFTMAX:
            softcap, slope, key_offset = transform
            # Natural units: scores = q.k * scale, transformed and masked.
            # Raw products otherwise: the scale is applied after the max comes
            # off (see the module doc).
            scores, _ = scores_of_products(
                qk, offs_m[:, None], cols[None, :], score_scale, softcap, slope, key_offset, mask_tile, seq_kv,
                band[0], band[1], NATURAL_UNITS, SOFTCAP, ALIBI, MASK_KIND, BOUNDARY, BOUNDED_BELOW, BOUNDED_ABOVE,
            )
            # Rows that have seen no visible key yet keep a max of -inf and are
            # shifted by 0 instead (see the module doc).
            new_max = tl.maximum(row_max, tl.max(scores, 1))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            if NATURAL_UNITS:
                p = tl.math.exp2((scores - shift[:, None]) * LOG2E)
                alpha = tl.math.exp2((row_max - shift) * LOG2E)
            else:
                # score_scale > 0 (the launchers guarantee it), so a hidden
                # score stays -inf once scaled and its weight is exactly 0.
                p = tl.math.exp2(exponent_below_max(scores, shift, score_scale, q.dtype == tl.float32 or FP16_HALVES))
                alpha = tl.math.exp2((row_max - shift) * score_scale)
        else:
            # FAST_SOFTMAX: no mask, whole blocks. Every score is visible and
            # finite, so the new max is finite and needs no -inf guard (a row
            # max of -inf from edge blocks before gives alpha = 0).
            new_max = tl.maximum(row_max, tl.max(qk, 1))
            p = tl.math.exp2(exponent_below_max(qk, new_max, score_scale, q.dtype == tl.float32 or FP16_HALVES))
            alpha = tl.math.exp2((row_max - new_max) * score_scale)
        # The row sum (and so lse) counts every weight; dropout only thins P@V.
        row_sum = row_sum * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(dropout_keep(dropout_key, offs_m, cols, dropout_threshold), p, 0.0)

        v = load_rows(
            v_desc, desc_batch, desc_kv_head, v_head_ptr, start_n, offs_n, offs_dv, seq_kv, head_dim_v,
            stride_vn, stride_vk, BOUNDARY, TILE_LOADS,
        )
        if FP16_HALVES:
            lo_kv_heads, _, v_lo_head_ptr, _, _, v_unscale_head_ptr = halves
            v_lo = load_rows(
                v_desc, desc_batch, desc_kv_head + lo_kv_heads, v_lo_head_ptr, start_n, offs_n, offs_dv, seq_kv,
                head_dim_v, stride_vn, stride_vk, BOUNDARY, TILE_LOADS,
            )
            # p <= 1, scaled by 2**14 (exact) like the other halves; v's unscale,
            # per column of this key block, undoes both scales.
            p = p * P_HALVES_SCALE
            p_hi = p.to(tl.float16)
            p_lo = (p - p_hi.to(tl.float32)).to(tl.float16)
            block_unscale = tl.load(v_unscale_head_ptr + (start_n // BLOCK_N) * head_dim_v + offs_dv,
                                    mask=offs_dv < head_dim_v, other=1.0)
            block = matmul_split(p_hi, p_lo, v, v_lo)
            acc = acc * alpha[:, None] + block * block_unscale[None, :]
        else:
            p = to_dtype(p, v.dtype, WIDEN_DOT_OPERANDS)
            acc = matmul(p, v, acc * alpha[:, None], DOT_PRECISION, WIDEN_DOT_OPERANDS)
        row_max = new_max
    return acc, row_sum, row_max


@triton.jit
def attend_keys(
    q,
    q_lo,
    k_desc,
    v_desc,
    desc_batch,
    desc_kv_head,
    k_head_ptr,
    v_head_ptr,
    halves,
    mask_row_ptrs,
    key_ranges,
    offs_m,
    seq_kv,
    head_dim,
    head_dim_v,
    stride_kn,
    stride_kk,
    stride_vn,
    stride_vk,
    stride_mn,
    softmax_scale,
    dropout_key,
    dropout_threshold,
    band,
    transform,
    row_sink,
    BOUNDED_BELOW: tl.constexpr,
    BOUNDED_ABOVE: tl.constexpr,
    MASK_KIND: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr,
    SINKS: tl.constexpr,
    MASK_ROWS_BROADCAST: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WIDEN_DOT_OPERANDS: tl.constexpr,
    FP16_HALVES: tl.constexpr,
    TILE_LOADS: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
    MASK_SEED: tl.constexpr,
):
    """Online softmax of rows `offs_m` over the keys of `key_ranges`: returns (acc, row_sum, row_max), row_max
    in natural units (the row's largest score).

    key_ranges = (key_start, whole_start, whole_end, key_end) from
    visibility_kernels.blocks_seen: [whole_start, whole_end) are whole blocks
    every row sees; the edge blocks around them (a partial last block, blocks
    crossing the visible band's edges) take the element-masked BOUNDARY pass.
    The running max is over raw q.k products, or over natural-unit scores where any
    score is more than q.k * scale (a float mask, softcap, ALiBi) or a sink
    logit joins the rows: SINKS starts each row's softmax from its sink
    (`row_sink` [BLOCK_M], natural units) as a key of weight exp(sink) and no
    value row. See attend_key_blocks for the other arguments.
    """
    NATURAL_UNITS: tl.constexpr = MASK_KIND == MASK_FLOAT or SOFTCAP or ALIBI or SINKS
    if NATURAL_UNITS:
        score_scale = softmax_scale  # scores in natural units; exp2 gets * LOG2E
    else:
        score_scale = softmax_scale * LOG2E  # (q.k - max) * score_scale is a base-2 exponent
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    if SINKS:
        row_max = row_sink
        row_sum = tl.where(row_sink == float("-inf"), 0.0, 1.0)
    else:
        row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    # Lower edge blocks, whole blocks (the fast softmax when nothing needs
    # masking or transforming; it needs no -inf guard even after edge blocks:
    # see attend_key_blocks), upper edge blocks.
    for part in tl.static_range(3):
        if part != 0 or BOUNDED_BELOW:
            acc, row_sum, row_max = attend_key_blocks(
                acc, row_sum, row_max, q, q_lo, k_desc, v_desc, desc_batch, desc_kv_head, k_head_ptr, v_head_ptr,
                halves, mask_row_ptrs,
                key_ranges[part], key_ranges[part + 1], offs_m, seq_kv, head_dim, head_dim_v,
                stride_kn, stride_kk, stride_vn, stride_vk, stride_mn,
                score_scale, dropout_key, dropout_threshold, band, transform,
                part != 1, part == 1 and MASK_KIND == MASK_NONE and not NATURAL_UNITS, BOUNDED_BELOW, BOUNDED_ABOVE,
                MASK_KIND, NATURAL_UNITS, SOFTCAP, ALIBI, MASK_ROWS_BROADCAST, DROPOUT, BLOCK_N, BLOCK_D, BLOCK_DV,
                DOT_PRECISION, WIDEN_DOT_OPERANDS, FP16_HALVES, TILE_LOADS, part == 1 and WARP_SPECIALIZE,
                MASK_SEED,
            )  # fmt: skip
    if not NATURAL_UNITS:
        row_max = row_max * softmax_scale
    return acc, row_sum, row_max


@triton.jit
def finish_rows(acc, row_sum, row_max, output_scale):
    """(output rows in float32, natural-log lse) from the online-softmax state.

    An empty row has row_sum 0 and acc 0: it is divided by 1, giving output 0,
    and its lse is -inf + log(0) = -inf (with a sink: the sink). row_max is in
    natural units (see attend_keys). `output_scale` multiplies every row
    (dropout's 1/(1-p), the same for every kept weight, is applied here once).
    """
    out = acc * (output_scale / tl.where(row_sum == 0.0, 1.0, row_sum))[:, None]
    return out, row_max + tl.log(row_sum)


# The seed changes every call and the threshold with p: specialising on their
# values (divisibility by 16, equality to 1) would compile new variants at random.
# Head counts and lengths only enter divisions and bounds, where specialising
# buys nothing but a recompilation whenever a shape changes class.
@triton.jit(
    do_not_specialize=[
        "dropout_threshold", "dropout_seed_lo", "dropout_seed_hi",
        "heads_q", "gqa_group", "seq_q", "seq_kv", "num_m_blocks", "lowest_diagonal", "highest_diagonal",
        "key_offset",
    ]
)
def attention_forward_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    mask_ptr,
    out_ptr,
    lse_ptr,
    q_unscale_ptr,
    k_unscale_ptr,
    v_unscale_ptr,
    alibi_ptr,
    sinks_ptr,
    cu_seq_q_ptr,
    cu_seq_k_ptr,
    key_counts_ptr,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qk,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kk,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vk,
    stride_mb,
    stride_mh,
    stride_mm,
    stride_mn,
    stride_ob,
    stride_oh,
    stride_om,
    stride_ok,
    stride_alibi_b,
    stride_alibi_h,
    heads_q,
    gqa_group,
    seq_q,
    seq_kv,
    head_dim,
    head_dim_v,
    num_m_blocks,
    lowest_diagonal,
    highest_diagonal,
    key_offset,
    softmax_scale,
    softcap,
    dropout_threshold,
    dropout_seed_lo,
    dropout_seed_hi,
    dropout_output_scale,
    BOUNDED_BELOW: tl.constexpr,
    BOUNDED_ABOVE: tl.constexpr,
    MASK_KIND: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr,
    SINKS: tl.constexpr,
    MASK_ROWS_BROADCAST: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WIDEN_DOT_OPERANDS: tl.constexpr,
    FP16_HALVES: tl.constexpr,
    TILE_LOADS: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
    MASK_SEED: tl.constexpr = False,
    VARLEN: tl.constexpr = VARLEN_OFF,
):
    """One program: BLOCK_M query rows of one (batch, query head); writes out rows and lse.

    Grid: (num_m_blocks * batch * heads_q,), the m-block varying fastest, so
    programs running together share one head's K/V in L2 (and a GQA group's
    heads are neighbours). lse is a contiguous (batch * heads_q, seq_q) buffer.
    FP16_HALVES (float32 problems): q, k and v are float16 halves from
    halves_kernels, each tensor's lo halves as many heads past its hi ones as
    it has heads, and the *_unscale pointers their unscale buffers (otherwise
    unused). The visible band (BOUNDED_*, the diagonals) is visibility_kernels';
    SOFTCAP, ALIBI (float32 slopes at alibi_ptr, (batch, head) strides) and
    key_offset are score_kernels'; SINKS: a float32 logit per query head at
    sinks_ptr (see attend_keys).

    VARLEN (not VARLEN_OFF): packed sequences, `batch` of them. q/out are
    (1, heads_q, total_q, E) views of the packed (total_q, heads_q, E) rows,
    k/v likewise; sequence b is query rows [cu_seq_q[b], cu_seq_q[b + 1]) and
    key_counts[b] key rows from cu_seq_k[b] (int32 or int64, read here).
    seq_q is total_q (lse is (heads_q, total_q)), seq_kv unused; each
    program takes its sequence's own lengths, and one past its sequence's
    last query block exits. num_m_blocks covers the longest sequence. The
    diagonals are relative to the sequence's aligned position (key_offset
    unused): VARLEN_BOTTOM_RIGHT adds its key count minus its query count.
    Not with FP16_HALVES, a mask or host descriptors.
    """
    pid = tl.program_id(0)
    bh = pid // num_m_blocks  # batch * heads_q + query head, the dropout stream index
    m_block = pid % num_m_blocks
    if BOUNDED_ABOVE and not BOUNDED_BELOW:
        # Causal row blocks grow with m: start each head's longest ones first
        # so the short ones fill the last wave.
        m_block = num_m_blocks - 1 - m_block
    batch = bh // heads_q
    head = bh % heads_q
    kv_head = head // gqa_group
    m_start = m_block * BLOCK_M
    lse_head_ptr = lse_ptr + bh.to(tl.int64) * seq_q
    if VARLEN != VARLEN_OFF:
        total_q = seq_q
        q_first, k_first, seq_q, seq_kv, lowest_diagonal, highest_diagonal, key_offset = packed_sequence(
            cu_seq_q_ptr, cu_seq_k_ptr, key_counts_ptr, batch, lowest_diagonal, highest_diagonal, VARLEN)
        if m_start >= seq_q:
            return
        lse_head_ptr = lse_ptr + head.to(tl.int64) * total_q + q_first
        # The sequence's rows as a batch of one (the launcher passes batch strides of 0).
        q_ptr += q_first * stride_qm
        out_ptr += q_first * stride_om
        k_ptr += k_first * stride_kn
        v_ptr += k_first * stride_vn
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    if TILE_LOADS == LOAD_HOST_DESCRIPTORS:
        # q_ptr, k_ptr, v_ptr and out_ptr are 4-D tensor descriptors.
        q_desc, k_desc, v_desc, out_desc = q_ptr, k_ptr, v_ptr, out_ptr
        q_head_ptr, k_head_ptr, v_head_ptr, out_head_ptr = q_ptr, k_ptr, v_ptr, out_ptr
    else:
        q_head_ptr = q_ptr + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
        k_head_ptr = k_ptr + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
        v_head_ptr = v_ptr + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
        out_head_ptr = out_ptr + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
        if TILE_LOADS == LOAD_DEVICE_DESCRIPTORS:
            # One 2-D descriptor per head: zero-fill stops at this head's last
            # row, and batch/head strides of 0 (expanded views) need no TMA support.
            # (Not with FP16_HALVES: the launcher passes host descriptors or pointers.)
            q_desc = tl.make_tensor_descriptor(q_head_ptr, [seq_q, head_dim], [stride_qm, 1], [BLOCK_M, BLOCK_D])
            k_desc = tl.make_tensor_descriptor(k_head_ptr, [seq_kv, head_dim], [stride_kn, 1], [BLOCK_N, BLOCK_D])
            v_desc = tl.make_tensor_descriptor(v_head_ptr, [seq_kv, head_dim_v], [stride_vn, 1], [BLOCK_N, BLOCK_DV])
            out_desc = tl.make_tensor_descriptor(
                out_head_ptr, [seq_q, head_dim_v], [stride_om, 1], [BLOCK_M, BLOCK_DV]
            )
        else:
            q_desc = None
            k_desc = None
            v_desc = None
            out_desc = None

    q = load_rows(
        q_desc, batch, head, q_head_ptr, m_start, tl.arange(0, BLOCK_M), offs_d, seq_q, head_dim,
        stride_qm, stride_qk, True, TILE_LOADS,
    )
    q_lo = q
    halves = None
    if FP16_HALVES:
        # Every lo half is as many heads past its hi half as the tensor has heads.
        heads_kv = heads_q // gqa_group
        if TILE_LOADS == LOAD_HOST_DESCRIPTORS:
            q_lo_head_ptr, k_lo_head_ptr, v_lo_head_ptr = q_ptr, k_ptr, v_ptr  # unused: tiles come by descriptor
        else:
            q_lo_head_ptr = q_head_ptr + heads_q.to(tl.int64) * stride_qh
            k_lo_head_ptr = k_head_ptr + heads_kv.to(tl.int64) * stride_kh
            v_lo_head_ptr = v_head_ptr + heads_kv.to(tl.int64) * stride_vh
        q_lo = load_rows(
            q_desc, batch, head + heads_q, q_lo_head_ptr, m_start, tl.arange(0, BLOCK_M), offs_d, seq_q, head_dim,
            stride_qm, stride_qk, True, TILE_LOADS,
        )
        q_unscale = tl.load(q_unscale_ptr + bh.to(tl.int64) * seq_q + offs_m, mask=offs_m < seq_q, other=1.0)
        kv_bh = (batch * heads_kv + kv_head).to(tl.int64)
        halves = (
            heads_kv,
            k_lo_head_ptr,
            v_lo_head_ptr,
            q_unscale,
            k_unscale_ptr + kv_bh * seq_kv,
            v_unscale_ptr + kv_bh * tl.cdiv(seq_kv, BLOCK_N) * head_dim_v,
        )

    mask_row_ptrs = mask_ptr
    if MASK_KIND != MASK_NONE:
        mask_head_ptr = mask_ptr + batch.to(tl.int64) * stride_mb + head.to(tl.int64) * stride_mh
        if MASK_ROWS_BROADCAST:
            mask_row_ptrs = mask_head_ptr
        else:
            # Rows past seq_q read the last row instead: in bounds, and discarded.
            mask_rows = tl.minimum(offs_m, seq_q - 1)
            mask_row_ptrs = mask_head_ptr + mask_rows.to(tl.int64) * stride_mm

    dropout_key = 0
    if DROPOUT:
        dropout_key = dropout_stream(dropout_seed_lo, dropout_seed_hi, bh)

    key_ranges = blocks_seen(
        m_start, tl.minimum(m_start + BLOCK_M, seq_q) - 1, 0, seq_kv, lowest_diagonal, highest_diagonal,
        BOUNDED_BELOW, BOUNDED_ABOVE, BLOCK_N,
    )
    slope = 0.0
    if ALIBI:
        slope = tl.load(alibi_ptr + batch.to(tl.int64) * stride_alibi_b + head.to(tl.int64) * stride_alibi_h)
    row_sink = None
    if SINKS:
        row_sink = tl.full([BLOCK_M], 0.0, dtype=tl.float32) + tl.load(sinks_ptr + head)
    acc, row_sum, row_max = attend_keys(
        q, q_lo, k_desc, v_desc, batch, kv_head, k_head_ptr, v_head_ptr, halves, mask_row_ptrs,
        key_ranges, offs_m, seq_kv, head_dim, head_dim_v,
        stride_kn, stride_kk, stride_vn, stride_vk, stride_mn,
        softmax_scale, dropout_key, dropout_threshold, (lowest_diagonal, highest_diagonal),
        (softcap, slope, key_offset), row_sink,
        BOUNDED_BELOW, BOUNDED_ABOVE, MASK_KIND, SOFTCAP, ALIBI, SINKS, MASK_ROWS_BROADCAST, DROPOUT, BLOCK_M, BLOCK_N,
        BLOCK_D, BLOCK_DV, DOT_PRECISION, WIDEN_DOT_OPERANDS, FP16_HALVES, TILE_LOADS, WARP_SPECIALIZE,
        MASK_SEED,
    )
    out, lse = finish_rows(acc, row_sum, row_max, dropout_output_scale)
    if TILE_LOADS == LOAD_HOST_DESCRIPTORS:
        out = to_dtype(out, out_desc.dtype, WIDEN_DOT_OPERANDS)
        out_desc.store([batch, head, m_start, 0], out.reshape([1, 1, BLOCK_M, BLOCK_DV]))
    elif TILE_LOADS == LOAD_DEVICE_DESCRIPTORS:
        out_desc.store([m_start, 0], to_dtype(out, out_desc.dtype, WIDEN_DOT_OPERANDS))
    else:
        out = to_dtype(out, out_ptr.dtype.element_ty, WIDEN_DOT_OPERANDS)
        out_ptrs = out_head_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_dv[None, :] * stride_ok
        tl.store(out_ptrs, out, mask=(offs_m[:, None] < seq_q) & (offs_dv[None, :] < head_dim_v))
    tl.store(lse_head_ptr + offs_m, lse, mask=offs_m < seq_q)
