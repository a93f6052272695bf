"""Flash decoding over a KV cache: keys read through `block_table` (or a contiguous cache), lengths on the device.

`kvcache_attention`'s kernel. Each batch item b attends to its first
K_b = cache_seqlens[b] + new_tokens keys, read on the device (never on the
host, so a decode step replays from a CUDA graph), with its queries
bottom-right aligned: query i sits at key position K_b - seq_q + i. Key j of
item b lives in

    paged:       cache[block_table[b, j // page_size], j % page_size, kv_head]
    contiguous:  cache[b, j, kv_head]

any page size (each key row's address is computed on its own, so a block of
keys may span pages; a power-of-two page size is compiled in: FIXED_PAGE_SIZE).
As in decode_kernels, the gqa_group * seq_q query rows of one kv head share
one program (K and V are read once per group), the keys are split across
programs (the split count follows the capacity, a host value; a split past K_b
visits no key block), and the splits are merged in a fixed order by
decode_kernels.merge_decode_splits_kernel. The scores are score_kernels' and
the visible keys visibility_kernels' (a band around the diagonal
j - i = K_b - seq_q, computed per item).

KEY_SLICES > 1 gives each warp its own slice of every key block (block keys
[w * BLOCK_N / KEY_SLICES, (w + 1) * BLOCK_N / KEY_SLICES) to warp w, as
batched 3-D products whose batch Triton lays one per warp): each warp keeps
its own running max, sum and output rows, so a block's row max and sum never
cross warps (no barrier for them; with KEY_SLICES 1 the warps split a block's
keys of one product and meet in shared memory for every row reduction), and
the slices are merged once after the loop (merge_key_slices).

HEAD_SLICES > 1 gives each warp its own kv head of HEAD_SLICES adjacent ones
(a program per group of them), in the same batched 3-D products: every warp
reads every key block of its head (16 x d query rows of its GQA group, its own
running max, sum and output rows, stored as they are: no merge). The heads of
one key sit side by side in the cache (HEAD_SLICES * d * 2 bytes of bf16 for
one key row), and a page's table entry is read once for all of them.
"""

import triton
import triton.language as tl

from flashsdpa.backends.triton.common_kernels import LOG2E, matmul, to_dtype
from flashsdpa.backends.triton.decode_kernels import group_rows, store_split
from flashsdpa.backends.triton.forward_kernels import exponent_below_max, finish_rows
from flashsdpa.backends.triton.score_kernels import scores_of_products
from flashsdpa.backends.triton.visibility_kernels import blocks_seen


@triton.jit
def block_pages(table_row_ptr, start, offs_n, key_end, page_size, stride_table_page, PAGED: tl.constexpr,
                FIXED_PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """The page numbers of the key block at `start` (a multiple of BLOCK_N; keys start + offs_n) of one batch
    item: one per key (or per run of keys in one page, offs_n holding each run's first key: a key slice of
    the sliced program), or where the pages hold whole blocks (FIXED_PAGE_SIZE >= BLOCK_N) the block's one
    page, a scalar. With FIXED_PAGE_SIZE (the page size compiled in, a power of two) a key's table index is
    start's plus a constant; else (0: the page_size argument) it costs a division per key. 0 past key_end,
    where the table is not read, and for a contiguous cache."""
    if PAGED and FIXED_PAGE_SIZE >= BLOCK_N:
        index = start // FIXED_PAGE_SIZE
        page = tl.load(table_row_ptr + index * stride_table_page, mask=start < key_end, other=0)
    elif PAGED and FIXED_PAGE_SIZE > 0:
        index = start // FIXED_PAGE_SIZE + offs_n // FIXED_PAGE_SIZE
        page = tl.load(table_row_ptr + index * stride_table_page, mask=start + offs_n < key_end, other=0)
    elif PAGED:
        cols = start + offs_n
        page = tl.load(table_row_ptr + (cols // page_size) * stride_table_page, mask=cols < key_end, other=0)
    else:
        page = tl.zeros_like(offs_n)
    return page  # one return: Triton checks every return statement's type, even under a constexpr `if`


@triton.jit
def key_rows(page, batch, start, offs_n, key_end, page_size, k_strides, v_strides, PAGED: tl.constexpr,
             FIXED_PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """(K row offsets, V row offsets, in range) of the keys start + offs_n of one batch item (`start` a
    multiple of BLOCK_N), whose page numbers are `page` (block_pages, under the same FIXED_PAGE_SIZE):
    int64 element offsets of each key's row from the kv head's base, by the caches' (page or batch item,
    slot) strides."""
    cols = start + offs_n
    in_range = cols < key_end
    if PAGED:
        if FIXED_PAGE_SIZE >= BLOCK_N:
            slot = start % FIXED_PAGE_SIZE + offs_n
        elif FIXED_PAGE_SIZE > 0:
            slot = offs_n % FIXED_PAGE_SIZE
        else:
            slot = cols % page_size
        page = page.to(tl.int64)
        return page * k_strides[0] + slot * k_strides[1], page * v_strides[0] + slot * v_strides[1], in_range
    position = cols.to(tl.int64)
    item = batch.to(tl.int64)
    return item * k_strides[0] + position * k_strides[1], item * v_strides[0] + position * v_strides[1], in_range


@triton.jit
def cache_rows(head_ptr, row_offsets, in_range, offs_d, width, stride_dim):
    """The rows at `row_offsets` ([N], or [KEY_SLICES, N] of a sliced block) from `head_ptr`: [*rows' shape,
    len(offs_d)], zero out of range or past width (nothing is read there)."""
    ptrs = tl.expand_dims(row_offsets, -1) + offs_d * stride_dim
    return tl.load(head_ptr + ptrs, mask=tl.expand_dims(in_range, -1) & (offs_d < width), other=0.0)


@triton.jit
def cache_slices_transposed(head_ptr, row_offsets, in_range, offs_d, width, stride_dim):
    """The rows at `row_offsets` [KEY_SLICES, N] from `head_ptr`, transposed per slice: [KEY_SLICES,
    len(offs_d), N] (the second operand of the slices' score products, read so, not transposed in
    registers, which would keep Triton from staging the copy in shared memory), zero where cache_rows is."""
    ptrs = row_offsets[:, None, :] + offs_d[None, :, None] * stride_dim
    return tl.load(head_ptr + ptrs, mask=in_range[:, None, :] & (offs_d[None, :, None] < width), other=0.0)


@triton.jit
def merge_key_slices(acc, row_sum, row_max, exponent_scale):
    """The online-softmax state of KEY_SLICES warps' slices ([KEY_SLICES, M, DV], [KEY_SLICES, M] twice)
    as one ([M, DV], [M], [M]), in a fixed order. `exponent_scale` turns a difference of row maxima into a
    base-2 exponent (the loop's units). A row no slice has seen keeps max -inf, sum 0 and acc 0."""
    merged_max = tl.max(row_max, 0)
    shift = tl.where(merged_max == float("-inf"), 0.0, merged_max)
    weight = tl.math.exp2((row_max - shift[None, :]) * exponent_scale)
    return tl.sum(acc * weight[:, :, None], 0), tl.sum(row_sum * weight, 0), merged_max


@triton.jit
def cache_block(desc, page, kv_head, slot, in_range, EDGE: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """Rows [slot, slot + BLOCK_N) of page `page` (a contiguous cache: batch item) of kv head `kv_head` by
    TMA, `desc` a host descriptor of the cache viewed as (page, head, slot, dim): zero past the head dim, and
    in EDGE blocks past key_end (`in_range`; rows there are read, holding whatever the cache holds)."""
    tile = desc.load([page, kv_head, slot, 0]).reshape([BLOCK_N, BLOCK_D])
    if EDGE:
        tile = tl.where(in_range[:, None], tile, 0.0)
    return tile


@triton.jit
def attend_cache_blocks(
    acc,
    row_sum,
    row_max,
    q,
    k_head_ptr,
    v_head_ptr,
    k_desc,
    v_desc,
    table_row_ptr,
    batch,
    kv_head,
    key_start,
    key_stop,
    query_rows,
    key_end,
    head_dim,
    head_dim_v,
    page_size,
    k_strides,
    v_strides,
    stride_table_page,
    score_scale,
    band,
    transform,
    EDGE: tl.constexpr,
    NATURAL_UNITS: tl.constexpr,
    BOUNDED_BELOW: tl.constexpr,
    BOUNDED_ABOVE: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr,
    PAGED: tl.constexpr,
    FIXED_PAGE_SIZE: tl.constexpr,
    TMA_BLOCKS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WIDEN_DOT_OPERANDS: tl.constexpr,
    KEY_SLICES: tl.constexpr,
    HEAD_SLICES: tl.constexpr,
    PAGE_LOOKAHEAD: tl.constexpr,
):
    """Fold key blocks [key_start, key_stop) into the online softmax of `query_rows` (forward_kernels'
    attend_key_blocks with the cache's row addressing, no mask tensor and no dropout). EDGE blocks hold
    keys some row does not see (or past key_end) and are masked element by element. The strides
    are (page or batch item, slot, head, dim); k_head_ptr and v_head_ptr point at the kv head. TMA_BLOCKS
    (a contiguous cache, or pages holding whole blocks): each block is one TMA box of k_desc / v_desc
    (cache_block) instead of per-row addresses. KEY_SLICES > 1 (the module doc): q is [KEY_SLICES, M, D],
    the state [KEY_SLICES, M, DV] and [KEY_SLICES, M] twice, query_rows [1, M, 1]; else q [M, D], the
    state [M, DV], [M], [M], query_rows [M, 1]. HEAD_SLICES > 1 (the module doc): q, the state and query_rows
    as with key slices, one slice per kv head, whose heads' offsets k_head_ptr and v_head_ptr hold ([HEAD_SLICES,
    1, 1] pointers); every slice reads the block's keys. PAGE_LOOKAHEAD: a block's page numbers are read in the
    iteration before its own (1) or in its own (0), as the comment at the loop says."""
    tl.static_assert(not (TMA_BLOCKS and PAGED) or FIXED_PAGE_SIZE >= BLOCK_N, "a TMA box needs a block in one page")
    tl.static_assert(KEY_SLICES == 1 or not TMA_BLOCKS, "key slices read rows")
    tl.static_assert(PAGE_LOOKAHEAD == 0 or PAGE_LOOKAHEAD == 1, "page numbers are read 0 or 1 iterations ahead")
    SLICED: tl.constexpr = KEY_SLICES > 1 or HEAD_SLICES > 1  # 3-D products, one slice per warp
    KEY_AXIS: tl.constexpr = 2 if SLICED else 1  # the axis of a block's keys in the scores
    if KEY_SLICES > 1:  # key start + offs_n[w, n] is warp w's n-th key of the block
        SLICE_N: tl.constexpr = BLOCK_N // KEY_SLICES
        offs_n = tl.arange(0, KEY_SLICES)[:, None] * SLICE_N + tl.arange(0, SLICE_N)[None, :]
    elif HEAD_SLICES > 1:  # every slice (warp) reads the block's keys of its own kv head
        offs_n = tl.arange(0, BLOCK_N)[None, :]
    else:
        offs_n = tl.arange(0, BLOCK_N)
    if KEY_SLICES > 1 and FIXED_PAGE_SIZE >= BLOCK_N // KEY_SLICES:  # a slice in one page: one table read a slice
        offs_page = tl.arange(0, KEY_SLICES)[:, None] * (BLOCK_N // KEY_SLICES)
    else:
        offs_page = offs_n
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    # PAGE_LOOKAHEAD 1: the next block's page numbers are read one iteration ahead (a loop-carried value), so
    # that a block's K/V addresses do not wait on a table load of the same iteration; Triton's pipeliner then
    # stages the K/V copies as it does a contiguous cache's (two blocks in flight), and the table is read by
    # plain loads one block ahead of the copies (compile_sm90 --dump, sm_90, 3 stages). PAGE_LOOKAHEAD 0: each
    # block reads its own page numbers; the pipeliner then copies the table entries into shared memory
    # asynchronously too (cp.async, waited on with the K/V copies), one block ahead of the K/V copies, and takes
    # stages for them: 5 stages give two K/V blocks in flight (3 stages, one).
    if PAGE_LOOKAHEAD == 1:
        page = block_pages(table_row_ptr, key_start, offs_page, key_end, page_size, stride_table_page, PAGED,
                           FIXED_PAGE_SIZE, BLOCK_N)
    for start_n in range(key_start, key_stop, BLOCK_N):
        cols = start_n + offs_n
        if PAGE_LOOKAHEAD == 0:
            page = block_pages(table_row_ptr, start_n, offs_page, key_end, page_size, stride_table_page, PAGED,
                               FIXED_PAGE_SIZE, BLOCK_N)  # fmt: skip
        k_rows, v_rows, in_range = key_rows(page, batch, start_n, offs_n, key_end, page_size, k_strides, v_strides,
                                            PAGED, FIXED_PAGE_SIZE, BLOCK_N)
        if SLICED and not EDGE:  # every key of a whole block is below key_end (blocks_seen): no row mask
            in_range = tl.full(cols.shape, True, tl.int1)
        if TMA_BLOCKS and PAGED:  # the block's box (pages holding whole blocks)
            box_page, box_slot = page, start_n % FIXED_PAGE_SIZE
        else:
            box_page, box_slot = batch, start_n
        if PAGE_LOOKAHEAD == 1:
            page = block_pages(table_row_ptr, start_n + BLOCK_N, offs_page, key_end, page_size, stride_table_page,
                               PAGED, FIXED_PAGE_SIZE, BLOCK_N)  # fmt: skip
        if TMA_BLOCKS:
            k = cache_block(k_desc, box_page, kv_head, box_slot, in_range, EDGE, BLOCK_N, BLOCK_D)
        elif SLICED:
            k = cache_slices_transposed(k_head_ptr, k_rows, in_range, offs_d, head_dim, k_strides[3])
        else:
            k = cache_rows(k_head_ptr, k_rows, in_range, offs_d, head_dim, k_strides[3])
        if SLICED:
            qk = matmul(q, k, None, DOT_PRECISION, WIDEN_DOT_OPERANDS)
        else:
            qk = matmul(q, tl.trans(k), None, DOT_PRECISION, WIDEN_DOT_OPERANDS)
        if EDGE or NATURAL_UNITS:
            softcap, slope, key_offset = transform
            scores, _ = scores_of_products(
                qk, query_rows, tl.expand_dims(cols, KEY_AXIS - 1), score_scale, softcap, slope, key_offset, qk,
                key_end, band[0], band[1], NATURAL_UNITS, SOFTCAP, ALIBI, 0, EDGE, BOUNDED_BELOW, BOUNDED_ABOVE,
            )
        else:
            scores = qk
        # A row that has seen no visible key keeps a max of -inf and is shifted by 0 (forward_kernels' doc).
        new_max = tl.maximum(row_max, tl.max(scores, KEY_AXIS))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        if NATURAL_UNITS:
            p = tl.math.exp2((scores - tl.expand_dims(shift, KEY_AXIS)) * LOG2E)
            alpha = tl.math.exp2((row_max - shift) * LOG2E)
        else:
            p = tl.math.exp2(exponent_below_max(scores, shift, score_scale, q.dtype == tl.float32))
            alpha = tl.math.exp2((row_max - shift) * score_scale)
        row_sum = row_sum * alpha + tl.sum(p, KEY_AXIS)
        if TMA_BLOCKS:
            v = cache_block(v_desc, box_page, kv_head, box_slot, in_range, EDGE, BLOCK_N, BLOCK_DV)
        else:
            v = cache_rows(v_head_ptr, v_rows, in_range, offs_dv, head_dim_v, v_strides[3])
        p = to_dtype(p, v.dtype, WIDEN_DOT_OPERANDS)
        acc = matmul(p, v, acc * tl.expand_dims(alpha, KEY_AXIS), DOT_PRECISION, WIDEN_DOT_OPERANDS)
        row_max = new_max
    return acc, row_sum, row_max


# Lengths, counts and the window only enter divisions and bounds: specialising
# on them would only recompile whenever a shape changes class.
@triton.jit(do_not_specialize=["heads_q", "gqa_group", "seq_q", "new_tokens", "row_chunks", "split_len",
                               "page_size", "window_left", "window_right"])
def attention_paged_decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    k_desc,
    v_desc,
    block_table_ptr,
    cache_seqlens_ptr,
    partial_out_ptr,
    partial_lse_ptr,
    out_ptr,
    lse_ptr,
    alibi_ptr,
    sinks_ptr,
    stride_qb,
    stride_qm,
    stride_qh,
    stride_qk,
    stride_k_page,
    stride_k_slot,
    stride_kh,
    stride_kk,
    stride_v_page,
    stride_v_slot,
    stride_vh,
    stride_vk,
    stride_table_b,
    stride_table_page,
    stride_alibi_b,
    stride_alibi_h,
    heads_q,
    gqa_group,
    seq_q,
    new_tokens,
    head_dim,
    head_dim_v,
    row_chunks,
    num_splits,
    split_len,
    page_size,
    window_left,
    window_right,
    softmax_scale,
    softcap,
    BOUNDED_BELOW: tl.constexpr,
    BOUNDED_ABOVE: tl.constexpr,
    PAGED: tl.constexpr,
    FIXED_PAGE_SIZE: tl.constexpr,
    TMA_BLOCKS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr,
    SINKS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WIDEN_DOT_OPERANDS: tl.constexpr,
    KEY_SLICES: tl.constexpr,
    HEAD_SLICES: tl.constexpr,
    PAGE_LOOKAHEAD: tl.constexpr,
):
    """Stage 1: one key range of one (batch item, kv head) against its query rows.

    q (B, seq_q, Hq, E) by its strides; caches by (page, slot, head, dim)
    strides (contiguous: (batch item, position, head, dim)); block_table
    (B, pages per item); cache_seqlens (B,). With TMA_BLOCKS, k_desc and
    v_desc are host descriptors of the caches viewed as (page or batch item,
    head, slot, dim) with (1, 1, BLOCK_N, BLOCK_D or BLOCK_DV) boxes (else
    unused). Query row r of the packed group
    is head kv_head * gqa_group + r // seq_q, query r % seq_q. The visible band
    is K_b - seq_q - window_left <= j - i (BOUNDED_BELOW) and
    j - i <= K_b - seq_q + window_right (BOUNDED_ABOVE; causal is right = 0).
    KEY_SLICES: warps on slices of every key block (the module doc; num_warps of
    them), or 1. HEAD_SLICES: warps each on its own kv head of HEAD_SLICES
    adjacent ones (the module doc; num_warps of them), or 1. PAGE_LOOKAHEAD: a
    block's page numbers are read an iteration ahead (1) or in its own (0;
    attend_cache_blocks). Grid: (batch * heads_kv // HEAD_SLICES * row_chunks,
    num_splits). Writes partial (rows, num_splits, head_dim_v) outputs and
    (rows, num_splits) lse, rows ordered (batch, query head, query row), or with
    one split out (rows, head_dim_v) and lse (rows,) themselves.
    """
    split = tl.program_id(1)
    batch, kv_head, head, query_row, row_valid = group_rows(tl.program_id(0), row_chunks,
                                                            heads_q // gqa_group // HEAD_SLICES, gqa_group, seq_q,
                                                            BLOCK_M)  # fmt: skip
    if HEAD_SLICES > 1:  # kv_head is the program's group of HEAD_SLICES kv heads: kv head [S, 1], head [S, M]
        kv_group = kv_head
        kv_head = kv_group * HEAD_SLICES + tl.arange(0, HEAD_SLICES)[:, None]
        head = kv_head * gqa_group + (head - kv_group * gqa_group)[None, :]
        row_valid = tl.broadcast_to(row_valid[None, :], (HEAD_SLICES, BLOCK_M))
    offs_d = tl.arange(0, BLOCK_D)

    key_end = tl.load(cache_seqlens_ptr + batch).to(tl.int32) + new_tokens
    key_offset = key_end - seq_q
    lowest_diagonal = key_offset - window_left
    highest_diagonal = key_offset + window_right
    split_start = split * split_len
    # A split past key_end is empty (not a range ending below its start).
    split_stop = tl.maximum(tl.minimum(split_start + split_len, key_end), split_start)
    key_ranges = blocks_seen(
        tl.min(query_row, 0), tl.max(query_row, 0), split_start, split_stop,
        lowest_diagonal, highest_diagonal, BOUNDED_BELOW, BOUNDED_ABOVE, BLOCK_N,
    )

    q_row_ptrs = (
        q_ptr + batch.to(tl.int64) * stride_qb + query_row.to(tl.int64) * stride_qm + head.to(tl.int64) * stride_qh
    )
    if HEAD_SLICES > 1:  # [S, M, D]
        q = tl.load(q_row_ptrs[:, :, None] + offs_d[None, None, :] * stride_qk, mask=offs_d[None, None, :] < head_dim,
                    other=0.0)  # fmt: skip
    else:
        q = tl.load(q_row_ptrs[:, None] + offs_d[None, :] * stride_qk, mask=offs_d[None, :] < head_dim, other=0.0)
    slope = 0.0
    if ALIBI:  # one slope per row: the rows span a GQA group's heads
        slope = tl.load(alibi_ptr + batch.to(tl.int64) * stride_alibi_b + head.to(tl.int64) * stride_alibi_h)
        slope = tl.expand_dims(slope, -1)  # [(S,) M, 1]
    NATURAL_UNITS: tl.constexpr = SOFTCAP or ALIBI or SINKS
    if NATURAL_UNITS:
        score_scale = softmax_scale
    else:
        score_scale = softmax_scale * LOG2E
    # The online-softmax state: one per key slice ([KEY_SLICES, ...], merged after the loop), one per kv head
    # ([HEAD_SLICES, ...]) or one.
    if KEY_SLICES > 1:
        q = tl.broadcast_to(q[None, :, :], (KEY_SLICES, BLOCK_M, BLOCK_D))
        rows = query_row[None, :, None]
        acc = tl.zeros([KEY_SLICES, BLOCK_M, BLOCK_DV], dtype=tl.float32)
        slice_index = tl.arange(0, KEY_SLICES)[:, None]
        row_max = tl.full([KEY_SLICES, BLOCK_M], float("-inf"), dtype=tl.float32)
    elif HEAD_SLICES > 1:
        rows = query_row[None, :, None]
        acc = tl.zeros([HEAD_SLICES, BLOCK_M, BLOCK_DV], dtype=tl.float32)
        slice_index = 0  # every slice is its own heads' softmax
        row_max = tl.full([HEAD_SLICES, BLOCK_M], float("-inf"), dtype=tl.float32)
    else:
        rows = query_row[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        slice_index = 0
        row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    if SINKS:  # the sink joins the first split's softmax (its first slice's); the merges weigh it in once
        first = (split == 0) & (slice_index == 0)
        row_max = tl.where(first, tl.load(sinks_ptr + head).to(tl.float32), row_max)
    row_sum = tl.where(row_max == float("-inf"), 0.0, 1.0)
    table_row_ptr = block_table_ptr + batch.to(tl.int64) * stride_table_b
    k_head_ptr = k_ptr + kv_head.to(tl.int64) * stride_kh
    v_head_ptr = v_ptr + kv_head.to(tl.int64) * stride_vh
    if HEAD_SLICES > 1:  # [S, 1, 1]: each slice's rows from its own kv head
        k_head_ptr = tl.expand_dims(k_head_ptr, -1)
        v_head_ptr = tl.expand_dims(v_head_ptr, -1)
    k_strides = (stride_k_page, stride_k_slot, stride_kh, stride_kk)
    v_strides = (stride_v_page, stride_v_slot, stride_vh, stride_vk)
    # Lower edge blocks, blocks every row sees whole, upper edge blocks (visibility_kernels).
    for part in tl.static_range(3):
        if part != 0 or BOUNDED_BELOW:
            acc, row_sum, row_max = attend_cache_blocks(
                acc, row_sum, row_max, q, k_head_ptr, v_head_ptr, k_desc, v_desc, table_row_ptr, batch, kv_head,
                key_ranges[part], key_ranges[part + 1], rows, key_end, head_dim, head_dim_v, page_size,
                k_strides, v_strides, stride_table_page, score_scale, (lowest_diagonal, highest_diagonal),
                (softcap, slope, key_offset), part != 1, NATURAL_UNITS, BOUNDED_BELOW, BOUNDED_ABOVE, SOFTCAP,
                ALIBI, PAGED, FIXED_PAGE_SIZE, TMA_BLOCKS, BLOCK_N, BLOCK_D, BLOCK_DV, DOT_PRECISION,
                WIDEN_DOT_OPERANDS, KEY_SLICES, HEAD_SLICES, PAGE_LOOKAHEAD,
            )  # fmt: skip
    if KEY_SLICES > 1:
        acc, row_sum, row_max = merge_key_slices(acc, row_sum, row_max, LOG2E if NATURAL_UNITS else score_scale)
    if HEAD_SLICES > 1:  # the slices' rows as one list of S * M
        ROWS: tl.constexpr = HEAD_SLICES * BLOCK_M
        acc = tl.reshape(acc, (ROWS, BLOCK_DV))
        row_sum, row_max = tl.reshape(row_sum, (ROWS,)), tl.reshape(row_max, (ROWS,))
        row_valid = tl.reshape(row_valid, (ROWS,))
        head = tl.reshape(head, (ROWS,))
        query_row = tl.reshape(tl.broadcast_to(query_row[None, :], (HEAD_SLICES, BLOCK_M)), (ROWS,))
    if not NATURAL_UNITS:
        row_max = row_max * softmax_scale
    out, lse = finish_rows(acc, row_sum, row_max, 1.0)
    row = (batch * heads_q + head).to(tl.int64) * seq_q + query_row
    store_split(out, lse, row, row_valid, split, num_splits, partial_out_ptr, partial_lse_ptr, out_ptr, lse_ptr,
                head_dim_v, head_dim_v, BLOCK_DV, WIDEN_DOT_OPERANDS)  # out is contiguous (rows, head_dim_v)
