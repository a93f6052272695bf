"""Flash decoding (split-KV) for a handful of query rows: a split kernel and a merge kernel.

With few query rows the main kernel has too few programs (one per query
head) to fill the GPU, and each reads all of its head's keys. Here the keys
are split across programs instead, and a GQA group's query heads share one
program, so K and V are read once per group. The online softmax itself is the
main kernel's (`attend_keys`, `finish_rows`).
"""

import triton
import triton.language as tl

from flashsdpa.backends.triton.common_kernels import LOAD_POINTERS, MASK_NONE, to_dtype
from flashsdpa.backends.triton.forward_kernels import attend_keys, finish_rows
from flashsdpa.backends.triton.visibility_kernels import blocks_seen


# Lengths and counts only enter divisions and bounds: specialising on them
# would only recompile whenever a shape changes class.
@triton.jit(do_not_specialize=["heads_q", "heads_kv", "gqa_group", "seq_q", "seq_kv", "row_chunks", "split_len",
                               "lowest_diagonal", "highest_diagonal", "key_offset"])
def attention_decode_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    mask_ptr,
    partial_out_ptr,
    partial_lse_ptr,
    out_ptr,
    lse_ptr,
    alibi_ptr,
    sinks_ptr,
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
    stride_alibi_b,
    stride_alibi_h,
    stride_out_row,
    heads_q,
    heads_kv,
    gqa_group,
    seq_q,
    seq_kv,
    head_dim,
    head_dim_v,
    row_chunks,
    num_splits,
    split_len,
    lowest_diagonal,
    highest_diagonal,
    key_offset,
    softmax_scale,
    softcap,
    BOUNDED_BELOW: tl.constexpr,
    BOUNDED_ABOVE: tl.constexpr,
    MASK_KIND: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr,
    SINKS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WIDEN_DOT_OPERANDS: tl.constexpr,
):
    """Flash decoding, stage 1: one key range of one (batch, kv head) against its query rows.

    The gqa_group * seq_q query rows that read this kv head are packed into the
    M dimension (row r is query head kv_head * gqa_group + r // seq_q, query
    row r % seq_q), in chunks of BLOCK_M, so K/V are read once per group rather
    than once per query head. Grid: (batch * heads_kv * row_chunks, num_splits).
    Writes each row's normalised partial output and natural lse to
    partial_out (rows, num_splits, head_dim_v) and partial_lse (rows, num_splits),
    rows ordered (batch, query head, query row); with one split, the output
    and lse themselves (rows stride_out_row apart in out, lse contiguous)
    and no merge follows.
    """
    split = tl.program_id(1)
    batch, kv_head, head, query_row, row_valid = group_rows(tl.program_id(0), row_chunks, heads_kv, gqa_group, seq_q,
                                                            BLOCK_M)  # fmt: skip
    offs_d = tl.arange(0, BLOCK_D)

    q_row_ptrs = (
        q_ptr + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh + query_row.to(tl.int64) * stride_qm
    )
    q = tl.load(q_row_ptrs[:, None] + offs_d[None, :] * stride_qk, mask=offs_d[None, :] < head_dim, other=0.0)
    k_head_ptr = k_ptr + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_head_ptr = v_ptr + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    mask_row_ptrs = mask_ptr
    if MASK_KIND != MASK_NONE:
        mask_row_ptrs = (
            mask_ptr
            + batch.to(tl.int64) * stride_mb
            + head.to(tl.int64) * stride_mh
            + query_row.to(tl.int64) * stride_mm
        )
    # split_len is a multiple of BLOCK_N, so only the last split has a partial block.
    split_start = split * split_len
    key_ranges = blocks_seen(
        tl.min(query_row, 0), tl.max(query_row, 0), split_start, tl.minimum(split_start + split_len, seq_kv),
        lowest_diagonal, highest_diagonal, BOUNDED_BELOW, BOUNDED_ABOVE, BLOCK_N,
    )
    slope = 0.0
    if ALIBI:  # one slope per row: the rows span a GQA group's heads
        slope = tl.load(alibi_ptr + batch.to(tl.int64) * stride_alibi_b + head.to(tl.int64) * stride_alibi_h)[:, None]
    row_sink = None
    if SINKS:  # the sink joins one split's softmax (the first); the merge weighs it in once
        row_sink = tl.where(split == 0, tl.load(sinks_ptr + head), float("-inf"))
    acc, row_sum, row_max = attend_keys(
        q, q, None, None, batch, kv_head, k_head_ptr, v_head_ptr, None, mask_row_ptrs,
        key_ranges, query_row, seq_kv, head_dim, head_dim_v,
        stride_kn, stride_kk, stride_vn, stride_vk, stride_mn,
        softmax_scale, 0, 0, (lowest_diagonal, highest_diagonal), (softcap, slope, key_offset), row_sink,
        BOUNDED_BELOW, BOUNDED_ABOVE, MASK_KIND, SOFTCAP, ALIBI, SINKS, False, False, BLOCK_M, BLOCK_N, BLOCK_D,
        BLOCK_DV,
        DOT_PRECISION, WIDEN_DOT_OPERANDS, False, LOAD_POINTERS, False, False,
    )
    out, lse = finish_rows(acc, row_sum, row_max, 1.0)
    row = (batch * heads_q + head).to(tl.int64) * seq_q + query_row
    store_split(out, lse, row, row_valid, split, num_splits, partial_out_ptr, partial_lse_ptr, out_ptr, lse_ptr,
                stride_out_row, head_dim_v, BLOCK_DV, WIDEN_DOT_OPERANDS)


@triton.jit
def group_rows(pid, row_chunks, heads_kv, gqa_group, seq_q, BLOCK_M: tl.constexpr):
    """(batch, kv_head, head, query_row, row_valid) of stage 1's program `pid` (of batch * heads_kv *
    row_chunks): its BLOCK_M packed rows r of the kv head's group are query head kv_head * gqa_group +
    r // seq_q, query row r % seq_q. Padding rows repeat the group's last row (loads stay in bounds);
    row_valid masks their stores."""
    batch_kv = pid // row_chunks
    chunk = pid % row_chunks
    batch = batch_kv // heads_kv
    kv_head = batch_kv % heads_kv
    rows_per_group = gqa_group * seq_q
    packed = chunk * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = packed < rows_per_group
    packed = tl.minimum(packed, rows_per_group - 1)
    return batch, kv_head, kv_head * gqa_group + packed // seq_q, packed % seq_q, row_valid


@triton.jit
def store_split(
    out,
    lse,
    row,
    row_valid,
    split,
    num_splits,
    partial_out_ptr,
    partial_lse_ptr,
    out_ptr,
    lse_ptr,
    stride_out_row,
    head_dim_v,
    BLOCK_DV: tl.constexpr,
    WIDEN_DOT_OPERANDS: tl.constexpr,
):
    """Stage 1's result of rows `row` (normalised out [rows, BLOCK_DV], natural lse): the split's partial
    output (rows, num_splits, head_dim_v) and lse (rows, num_splits); with one split, the output (rows
    stride_out_row apart) and lse (contiguous) themselves, as the merge would write them."""
    offs_dv = tl.arange(0, BLOCK_DV)
    if num_splits == 1:
        tl.store(
            out_ptr + row[:, None] * stride_out_row + offs_dv[None, :],
            to_dtype(out, out_ptr.dtype.element_ty, WIDEN_DOT_OPERANDS),
            mask=row_valid[:, None] & (offs_dv[None, :] < head_dim_v),
        )
        tl.store(lse_ptr + row, lse, mask=row_valid)
    else:
        partial_index = row * num_splits + split
        tl.store(
            partial_out_ptr + partial_index[:, None] * head_dim_v + offs_dv[None, :],
            out,
            mask=row_valid[:, None] & (offs_dv[None, :] < head_dim_v),
        )
        tl.store(partial_lse_ptr + partial_index, lse, mask=row_valid)


@triton.jit
def merge_decode_splits_kernel(
    partial_out_ptr,
    partial_lse_ptr,
    out_ptr,
    lse_ptr,
    num_splits,
    head_dim_v,
    stride_out_row,
    BLOCK_SPLITS: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    ROUND_BFLOAT16: tl.constexpr,
):
    """Flash decoding, stage 2: one output row from its splits, each weighted by exp(lse_split - lse).

    Grid: (rows,), rows ordered (batch, query head, query row); out rows are
    stride_out_row apart, lse is contiguous. BLOCK_SPLITS >= num_splits.
    ROUND_BFLOAT16: bfloat16 output under the interpreter (see to_dtype).
    """
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_SPLITS)
    offs_dv = tl.arange(0, BLOCK_DV)
    split_lse = tl.load(partial_lse_ptr + row * num_splits + offs_s, mask=offs_s < num_splits, other=float("-inf"))
    lse_max = tl.max(split_lse, 0)
    shift = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    total = tl.sum(tl.exp(split_lse - shift), 0)
    lse = shift + tl.log(total)  # -inf when every split was empty
    inv_total = 1.0 / tl.where(total == 0.0, 1.0, total)

    acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
    for split in range(0, num_splits):
        weight = tl.exp(tl.load(partial_lse_ptr + row * num_splits + split) - shift) * inv_total
        part = tl.load(
            partial_out_ptr + (row * num_splits + split) * head_dim_v + offs_dv, mask=offs_dv < head_dim_v, other=0.0
        )
        acc += weight * part
    out = to_dtype(acc, out_ptr.dtype.element_ty, ROUND_BFLOAT16)
    tl.store(out_ptr + row * stride_out_row + offs_dv, out, mask=offs_dv < head_dim_v)
    tl.store(lse_ptr + row, lse)
