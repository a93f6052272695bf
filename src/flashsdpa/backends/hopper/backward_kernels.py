"""Gluon backward kernels for Hopper (sm_90): warp-specialised dK/dV and dQ, each program owning its outputs.

With P = exp2(S * qk_scale - lse2) (S = Q K^T raw, `qk_scale` = softmax
scale * log2(e), lse2 the row log-sum-exp in base 2 from the preprocess)
and delta = rowsum(dO * O):

    dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta),  dK = scale dS^T Q,  dQ = scale dS K.

`hopper_attention_backward_dkdv_kernel`: a program owns `2 * BLOCK_N` keys of
one (batch, key head); its producer warp loads K and V once, then streams the
Q and dO blocks (`BLOCK_M` rows) of every query head of the GQA group through
a ring of `STAGES` slots; each of the two consumer warp groups keeps dK and dV
of its `BLOCK_N` keys in registers and per block computes S^T = K Q^T and
dP^T = V dO^T (both issued before either is waited for), P^T, dV += P^T dO,
dS^T, dK += dS^T Q. Its results leave through its own rows of the K and V
tiles (TMA stores).

`hopper_attention_backward_dq_kernel`: a program owns `2 * BLOCK_M` query rows
of one (batch, query head); its producer loads Q and dO once and streams the
K and V blocks; each consumer group per block computes S and dP, dS, and
dQ += dS K, and stores dQ through its rows of the Q tile.

The variants (`VARIANTS`, see variant_kernels): each loop visits the blocks
its rows (dQ) or keys (dK/dV) see, and masks P in the edge blocks alone;
with softcap or ALiBi, S becomes the transformed scores (natural units,
`qk_scale` = log2(e)) and dS takes softcap's derivative. Sinks need nothing
here: lse holds them (their gradient is `ops.sink_gradient`'s). The
lse2 and delta rows are read unmasked from the preprocess's scratch, whose row
stride is a multiple of 128 (rows past the sequence: lse2 = +inf, delta = 0,
so their P is 0); with STATS_IN_SHARED the dK/dV producer brings each query
block's rows by TMA into its ring slot beside Q and dO, and the consumers read
them there where they are used. PINGPONG (either kernel) makes the two
consumer groups issue each step's first products in turn; FMA_QUARTERS takes that
many quarters of each tile's exponentials by FMA arithmetic (`exponentials`).
Rows and keys past the sequence ends load as zeros through the TMA descriptors'
bounds and are never stored.

Each kernel runs one tile (the keys or rows above) a program, or with
PERSISTENT every num_programs-th tile from the program's id on a grid of at
most one program an SM: the producer loads the next tile's stationary operands
(K and V; Q and dO) into a second buffer, freed when both groups' gradient
stores of the tile before have read it (each group waits for its stores after
issuing the next tile's first products), and the streamed ring and the ping-pong
turns count on across tiles.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)

from flashsdpa.backends.hopper.forward_kernels import tile_coords  # (the dQ kernel's tiles are the forward's)
from flashsdpa.backends.triton.score_kernels import exp2_by_fma
from flashsdpa.backends.hopper.variant_kernels import (
    hide_unseen,
    is_edge,
    query_blocks_seen,
    row_slope,
    transformed_scores,
    whole_keys,
    whole_queries,
)


@gluon.jit
def _dkdv_tile(tile, heads_kv, gqa_group, seq_q, num_n_blocks, band, VARIANTS: gl.constexpr, BLOCK_M: gl.constexpr,
               BLOCK_N: gl.constexpr):
    """(batch, key head, first key, first query block, query blocks a head) of `tile`; the key blocks of one
    head are adjacent, first keys first (with causal masks, the longest tiles start first)."""
    n_block = tile % num_n_blocks
    batch_head = tile // num_n_blocks
    first_key = n_block * (2 * BLOCK_N)
    m_start, m_blocks = query_blocks_seen(first_key, first_key + 2 * BLOCK_N - 1, seq_q, band, VARIANTS, BLOCK_M)
    return batch_head // heads_kv, batch_head % heads_kv, first_key, m_start, m_blocks


@gluon.jit
def _dkdv_load_tile(tile, count, step, q_desc, k_desc, v_desc, do_desc, stats_desc, q_smem, k_smem, v_smem, do_smem,
                    stats_smem, barriers, heads_kv, gqa_group, seq_q, num_n_blocks, band,
                    VARIANTS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                    STAGES: gl.constexpr, STATS_IN_SHARED: gl.constexpr):
    """Producer, the program's `count`-th tile (`step`: the Q/dO blocks loaded before it): K and V of its keys
    into K/V buffer count % buffers, then Q and dO (and with STATS_IN_SHARED their rows' delta and lse2) of each
    (query head, query block) in order. Returns the blocks loaded so far."""
    kv_ready, kv_empty, q_ready, q_empty, _ = barriers
    KV_BUFFERS: gl.constexpr = k_smem.shape[0]
    buffer = count % KV_BUFFERS
    batch, head_kv, first_key, m_start, m_blocks = _dkdv_tile(tile, heads_kv, gqa_group, seq_q, num_n_blocks, band,
                                                              VARIANTS, BLOCK_M, BLOCK_N)
    if KV_BUFFERS > 1:  # (a buffer's first use waits on the already complete phase before its first release)
        mbarrier.wait(kv_empty.index(buffer), ((count // KV_BUFFERS) & 1) ^ 1)
    mbarrier.expect(kv_ready.index(buffer), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [batch, head_kv, first_key, 0], kv_ready.index(buffer),
                                    k_smem.index(buffer))
    tma.async_copy_global_to_shared(v_desc, [batch, head_kv, first_key, 0], kv_ready.index(buffer),
                                    v_smem.index(buffer))
    for i in range(gqa_group * m_blocks):
        head_q = head_kv * gqa_group + i // m_blocks
        first_row = (m_start + i % m_blocks) * BLOCK_M
        stage = (step + i) % STAGES
        # An "empty" barrier completes phase 0 when both consumers first free its slot; the first pass over
        # the ring waits on the (already complete) phase before that.
        mbarrier.wait(q_empty.index(stage), (((step + i) // STAGES) & 1) ^ 1)
        if STATS_IN_SHARED:
            mbarrier.expect(q_ready.index(stage), q_desc.block_type.nbytes + do_desc.block_type.nbytes
                            + stats_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(stats_desc, [0, batch * heads_kv * gqa_group + head_q, first_row],
                                            q_ready.index(stage), stats_smem.index(stage))
        else:
            mbarrier.expect(q_ready.index(stage), q_desc.block_type.nbytes + do_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [batch, head_q, first_row, 0], q_ready.index(stage),
                                        q_smem.index(stage))
        tma.async_copy_global_to_shared(do_desc, [batch, head_q, first_row, 0], q_ready.index(stage),
                                        do_smem.index(stage))
    return step + gqa_group * m_blocks


@gluon.jit
def _dkdv_load_partition(q_desc, k_desc, v_desc, do_desc, stats_desc, q_smem, k_smem, v_smem, do_smem, stats_smem,
                         barriers, heads_kv, gqa_group, seq_q, num_n_blocks, num_tiles, band,
                         VARIANTS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                         STAGES: gl.constexpr, STATS_IN_SHARED: gl.constexpr, PERSISTENT: gl.constexpr):
    """Producer: the program's tile (PERSISTENT: every num_programs-th tile from its id), one after another."""
    if PERSISTENT:
        step = 0
        count = 0
        for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            step = _dkdv_load_tile(tile, count, step, q_desc, k_desc, v_desc, do_desc, stats_desc, q_smem, k_smem,
                                   v_smem, do_smem, stats_smem, barriers, heads_kv, gqa_group, seq_q, num_n_blocks,
                                   band, VARIANTS, BLOCK_M, BLOCK_N, STAGES, STATS_IN_SHARED)
            count += 1
    else:
        _dkdv_load_tile(gl.program_id(0), 0, 0, q_desc, k_desc, v_desc, do_desc, stats_desc, q_smem, k_smem, v_smem,
                        do_smem, stats_smem, barriers, heads_kv, gqa_group, seq_q, num_n_blocks, band, VARIANTS,
                        BLOCK_M, BLOCK_N, STAGES, STATS_IN_SHARED)


@gluon.jit
def _halves(x):
    """A [rows, cols] tile in a wgmma accumulator layout (4 warps) as its two [rows, cols / 2] halves of
    columns (first, last) in that layout: each thread keeps its own elements (a column's top bit is a register
    index), so no data moves."""
    ROWS: gl.constexpr = x.shape[0]
    COLS: gl.constexpr = x.shape[1]
    half_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                          instr_shape=[16, COLS // 2, 16])
    first, last = x.reshape([ROWS, 2, COLS // 2]).permute((0, 2, 1)).split()
    return gl.convert_layout(first, half_layout), gl.convert_layout(last, half_layout)


@gluon.jit
def _joined(first, last):
    """`_halves`' inverse: the [rows, cols] tile (wgmma accumulator layout) whose halves of columns these are."""
    ROWS: gl.constexpr = first.shape[0]
    COLS: gl.constexpr = 2 * first.shape[1]
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, COLS, 16])
    return gl.convert_layout(gl.join(first, last).permute((0, 2, 1)).reshape([ROWS, COLS]), layout)


@gluon.jit
def exponentials(x, FMA_QUARTERS: gl.constexpr):
    """2^x of a [rows, cols] tile of exponents <= 0 (the probabilities' own), its last FMA_QUARTERS quarters of
    columns (0, 1 or 2) by `score_kernels.exp2_by_fma` (FMA and integer pipes) and the rest by MUFU.EX2, so that
    a warp's exponentials run on both pipes at once rather than queueing on the MUFU unit (FA3's trick for
    MUFU-bound loops). Rows of lse2 = +inf (past the sequence) give 0 either way."""
    gl.static_assert(FMA_QUARTERS == 0 or FMA_QUARTERS == 1 or FMA_QUARTERS == 2, "0, 1 or 2 quarters by FMA")
    if FMA_QUARTERS == 0:
        return gl.exp2(x)
    first, last = _halves(x)
    if FMA_QUARTERS == 2:
        last = exp2_by_fma(last)
    else:
        third, fourth = _halves(last)
        last = _joined(gl.exp2(third), exp2_by_fma(fourth))
    return _joined(gl.exp2(first), last)


@gluon.jit
def _dkdv_probabilities(st, lse2, rows, keys, first_row, whole, seq_kv, qk_scale, band, transform, slope,
                        VARIANTS: gl.constexpr, FMA_QUARTERS: gl.constexpr):
    """(P^T, d scores / d (scale q.k)) of raw S^T = K Q^T for query `rows` (starting at first_row) and `keys`."""
    derivative = 1.0
    if VARIANTS.natural_units:
        st, derivative = transformed_scores(st, gl.expand_dims(rows, 0), gl.expand_dims(keys, 1), transform, slope,
                                            VARIANTS, True)
    pt = exponentials(st * qk_scale - gl.expand_dims(lse2, 0), FMA_QUARTERS)
    if VARIANTS.banded:
        # (The mirrored band: its lower side is the band's upper one; rows past seq_q need no mask.)
        if is_edge(first_row, whole, VARIANTS.bounded_above, VARIANTS.bounded_below):
            if VARIANTS.bounded_below:
                pt = hide_unseen(pt, gl.expand_dims(rows, 0), gl.expand_dims(keys, 1), seq_kv, band, VARIANTS, False,
                                 0.0)
            else:
                # The band moved by its diagonal onto the keys (a vector the loop does not change): the same
                # pairs, one row vector fewer a step (sm_90, bf16 d=128 causal GQA: 72 B of spill stores, not 120;
                # with a window's lower side too, 176 against 124 unmoved).
                pt = hide_unseen(pt, gl.expand_dims(rows, 0), gl.expand_dims(keys - band[1], 1), seq_kv,
                                 (band[0] - band[1], 0), VARIANTS, False, 0.0)
    return pt, derivative


@gluon.jit
def _dkdv_consumer_tile(tile, count, step, q_smem, k_smem, v_smem, do_smem, stats_smem, ds_smem, dk_desc, dv_desc,
                        barriers, lse2_ptr, delta_ptr, slopes_ptr, heads_kv, gqa_group, seq_q, seq_kv, num_n_blocks,
                        stats_stride, qk_scale, scale, band, transform, GROUP: gl.constexpr, VARIANTS: gl.constexpr,
                        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                        STATS_IN_SHARED: gl.constexpr, PINGPONG: gl.constexpr, DEFER_DK: gl.constexpr,
                        FMA_QUARTERS: gl.constexpr):
    """Consumer warp group GROUP, the program's `count`-th tile (`step`: the Q/dO blocks consumed before it): dK
    and dV of keys [GROUP * BLOCK_N, (GROUP + 1) * BLOCK_N) of the tile's. Returns the blocks consumed so far.

    With PINGPONG the two groups issue each step's first products (S^T, and dP^T where no score transform
    comes between) in strict alternation, group 0 first, so that one group's exponentials run under the
    other's products rather than both groups waiting on the same Q slot in step."""
    kv_ready, kv_empty, q_ready, q_empty, turns = barriers
    KV_BUFFERS: gl.constexpr = k_smem.shape[0]
    buffer = count % KV_BUFFERS
    HEAD_DIM: gl.constexpr = k_smem.shape[4]  # (buffers, 1, 1, keys, head_dim)
    dtype: gl.constexpr = k_smem.dtype
    st_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BLOCK_M, 16])
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, HEAD_DIM, 16])
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(0, st_layout)

    batch, head_kv, first_key, m_start, m_blocks = _dkdv_tile(tile, heads_kv, gqa_group, seq_q, num_n_blocks, band,
                                                              VARIANTS, BLOCK_M, BLOCK_N)
    group_key = first_key + GROUP * BLOCK_N
    heads_q = heads_kv * gqa_group
    # Query blocks outside `whole` need the element mask (the band's edges; keys past seq_kv are not stored).
    whole = whole_queries(group_key, group_key + BLOCK_N - 1, seq_q, band, VARIANTS, BLOCK_M)
    # This group's keys of the K and V tiles: 2-D for the products, 4-D for the gradients' TMA stores.
    k_tile = k_smem.index(buffer)
    v_tile = v_smem.index(buffer)
    k = k_tile.reshape([2 * BLOCK_N, HEAD_DIM]).slice(GROUP * BLOCK_N, BLOCK_N)
    v = v_tile.reshape([2 * BLOCK_N, HEAD_DIM]).slice(GROUP * BLOCK_N, BLOCK_N)
    keys = group_key + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, st_layout))
    st_zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, st_layout)
    # The stats ring as rows (slot * 2: delta, slot * 2 + 1: lse2); TMA wrote each slot's (2, 1, BLOCK_M) unswizzled.
    stats_rows = stats_smem._reinterpret(gl.float32, [stats_smem.shape[0] * 2, BLOCK_M],
                                         gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
    dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, acc_layout)
    dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, acc_layout)
    mbarrier.wait(kv_ready.index(buffer), (count // KV_BUFFERS) & 1)
    if DEFER_DK:  # dK's product reads dS^T from this group's shared tile and runs on into the next step
        ds = ds_smem.index(GROUP)
        # dK starts as a product too (0 times this group's K rows): ptxas serialises every wgmma of the kernel when
        # the accumulator a product keeps in flight across the loop's back edge was first written by other
        # instructions (zeros).
        gl.static_assert(BLOCK_M == BLOCK_N, "the first dK product reads this group's K rows as its B operand")
        ds.store(gl.zeros([BLOCK_N, BLOCK_M], dtype, st_layout))
        fence_async_shared()
        dk = warpgroup_mma(ds, k, dk, use_acc=False, is_async=True)

    for i in range(gqa_group * m_blocks):
        head_q = head_kv * gqa_group + i // m_blocks
        first_row = (m_start + i % m_blocks) * BLOCK_M
        n = step + i  # (the ring's and the turns' position)
        stage = n % STAGES
        rows = first_row + gl.arange(0, BLOCK_M, layout=row_layout)
        if STATS_IN_SHARED:
            mbarrier.wait(q_ready.index(stage), (n // STAGES) & 1)
            lse2 = stats_rows.index(2 * stage + 1).load(row_layout)
        else:
            stats = (batch * heads_q + head_q) * stats_stride + rows
            lse2 = gl.load(lse2_ptr + stats)
            delta = gl.load(delta_ptr + stats)
            mbarrier.wait(q_ready.index(stage), (n // STAGES) & 1)
        q = q_smem.index(stage).reshape([BLOCK_M, HEAD_DIM])
        do = do_smem.index(stage).reshape([BLOCK_M, HEAD_DIM])
        q_t = q.permute((1, 0))
        do_t = do.permute((1, 0))
        if PINGPONG:  # the other group has issued its products of the previous round (group 0's first: none)
            mbarrier.wait(turns.index(GROUP), (n & 1) ^ (1 - GROUP))
        st_token = warpgroup_mma(k, q_t, st_zero, use_acc=False, is_async=True)
        # With a score transform, dP^T is issued once it is done (its accumulator is not live during it): on sm_90
        # the bf16 d=128 kernel spills 40 B so with causal softcap (196 issued first), 44 with ALiBi (248).
        if not VARIANTS.natural_units:
            dpt_token = warpgroup_mma(v, do_t, st_zero, use_acc=False, is_async=True)
        if PINGPONG:
            mbarrier.arrive(turns.index(1 - GROUP), count=1)
        if KV_BUFFERS > 1:
            if i == 0:  # the previous tile's gradient stores ran under these products: free their buffer
                tma.store_wait(0)
                mbarrier.arrive(kv_empty.index(1 - buffer), count=1, pred=count > 0)
        if DEFER_DK:  # (the previous step's dK product, issued before S^T, retires with it: its slot is free)
            if VARIANTS.natural_units:
                st, dk = warpgroup_mma_wait(0, deps=[st_token, dk, k, q_t, ds])[:2]
            else:
                st, dk = warpgroup_mma_wait(1, deps=[st_token, dk, k, q_t, ds])[:2]
            mbarrier.arrive(q_empty.index((n + STAGES - 1) % STAGES), count=1, pred=i > 0)
        elif VARIANTS.natural_units:
            st = warpgroup_mma_wait(0, deps=[st_token, k, q_t])[0]
        else:
            # Products retire in order: with one outstanding, S^T is done and dP^T may still run.
            st = warpgroup_mma_wait(1, deps=[st_token, k, q_t])[0]
        pt, derivative = _dkdv_probabilities(st, lse2, rows, keys, first_row, whole, seq_kv, qk_scale, band,
                                             transform, row_slope(slopes_ptr, transform, batch, head_q, VARIANTS),
                                             VARIANTS, FMA_QUARTERS)
        pt_op = gl.convert_layout(pt.to(dtype), op_layout)
        if VARIANTS.softcap:  # dS^T = P^T softcap' (dP^T - delta), P^T itself now in pt_op: one tile fewer live
            pt = pt * derivative
        if VARIANTS.natural_units:
            dpt_token = warpgroup_mma(v, do_t, st_zero, use_acc=False, is_async=True)
        dv_token = warpgroup_mma(pt_op, do, dv, is_async=True)
        if STATS_IN_SHARED:  # (read where it is used: no registers held across the products)
            delta = stats_rows.index(2 * stage).load(row_layout)
        dpt = warpgroup_mma_wait(1, deps=[dpt_token, v, do_t])[0]
        dst = pt * (dpt - gl.expand_dims(delta, 0))
        if DEFER_DK:
            ds.store(dst.to(dtype))
            fence_async_shared()
            dk = warpgroup_mma(ds, q, dk, is_async=True)
            dv = warpgroup_mma_wait(1, deps=[dv_token, do])[0]  # (dK, issued last, still runs)
        else:
            dst_op = gl.convert_layout(dst.to(dtype), op_layout)
            dk_token = warpgroup_mma(dst_op, q, dk, is_async=True)
            dv, dk = warpgroup_mma_wait(0, deps=[dv_token, dk_token, q, do])[:2]
            mbarrier.arrive(q_empty.index(stage), count=1)
    if DEFER_DK:
        dk = warpgroup_mma_wait(0, deps=[dk, ds])[0]

    # The group's K and V rows are read by its own products alone, all retired: they take dK and dV.
    k.store((dk * scale).to(dtype))
    v.store(dv.to(dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(dk_desc, [batch, head_kv, group_key, 0],
                                    k_tile.slice(GROUP * BLOCK_N, BLOCK_N, dim=2))
    tma.async_copy_shared_to_global(dv_desc, [batch, head_kv, group_key, 0],
                                    v_tile.slice(GROUP * BLOCK_N, BLOCK_N, dim=2))
    if KV_BUFFERS == 1:  # (persistent: the next tile's first step waits for the stores, the partition's end too)
        tma.store_wait(0)
    return step + gqa_group * m_blocks


@gluon.jit
def _dkdv_consumer_partition(q_smem, k_smem, v_smem, do_smem, stats_smem, ds_smem, dk_desc, dv_desc, barriers, lse2_ptr,
                             delta_ptr, slopes_ptr, heads_kv, gqa_group, seq_q, seq_kv, num_n_blocks, num_tiles,
                             stats_stride, qk_scale, scale, band, transform, GROUP: gl.constexpr,
                             VARIANTS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                             STAGES: gl.constexpr, STATS_IN_SHARED: gl.constexpr, PINGPONG: gl.constexpr,
                             DEFER_DK: gl.constexpr, FMA_QUARTERS: gl.constexpr, PERSISTENT: gl.constexpr):
    """Consumer warp group GROUP: the program's tile (PERSISTENT: every num_programs-th tile from its id)."""
    if PERSISTENT:
        step = 0
        count = 0
        for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            step = _dkdv_consumer_tile(tile, count, step, q_smem, k_smem, v_smem, do_smem, stats_smem, ds_smem,
                                       dk_desc, dv_desc, barriers, lse2_ptr, delta_ptr, slopes_ptr, heads_kv,
                                       gqa_group, seq_q, seq_kv, num_n_blocks, stats_stride, qk_scale, scale, band,
                                       transform, GROUP, VARIANTS, BLOCK_M, BLOCK_N, STAGES, STATS_IN_SHARED,
                                       PINGPONG, DEFER_DK, FMA_QUARTERS)
            count += 1
        tma.store_wait(0)
    else:
        _dkdv_consumer_tile(gl.program_id(0), 0, 0, q_smem, k_smem, v_smem, do_smem, stats_smem, ds_smem, dk_desc,
                            dv_desc, barriers, lse2_ptr, delta_ptr, slopes_ptr, heads_kv, gqa_group, seq_q, seq_kv,
                            num_n_blocks, stats_stride, qk_scale, scale, band, transform, GROUP, VARIANTS, BLOCK_M,
                            BLOCK_N, STAGES, STATS_IN_SHARED, PINGPONG, DEFER_DK, FMA_QUARTERS)


@gluon.jit(do_not_specialize=["band", "transform"])  # (run-time values: one compile for all)
def hopper_attention_backward_dkdv_kernel(
    q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, stats_desc, lse2_ptr, delta_ptr, slopes_ptr,
    heads_kv, gqa_group, seq_q, seq_kv, num_n_blocks, num_tiles, stats_stride, qk_scale, scale, band, transform,
    VARIANTS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    STATS_IN_SHARED: gl.constexpr, PINGPONG: gl.constexpr, DEFER_DK: gl.constexpr, FMA_QUARTERS: gl.constexpr,
    PERSISTENT: gl.constexpr, CONSUMER_REGISTERS: gl.constexpr, PRODUCER_REGISTERS: gl.constexpr,
):
    """dK and dV of `2 * BLOCK_N` keys of one (batch, key head) a tile: one tile a program, or with PERSISTENT
    (a grid of at most one program an SM) every num_programs-th tile from the program's id, the next tile's K and V
    loaded into a second buffer while the current one's run."""
    gl.static_assert(BLOCK_N == 64, "a consumer warp group owns 64 keys (one wgmma row block)")
    # (a deferred dK product leaves its last Q slot held at the tile's end)
    gl.static_assert(not (PERSISTENT and DEFER_DK), "DEFER_DK takes one tile a program")
    KV_BUFFERS: gl.constexpr = 2 if PERSISTENT else 1
    dtype: gl.constexpr = k_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [STAGES] + q_desc.block_type.shape, q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES] + do_desc.block_type.shape, do_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [KV_BUFFERS] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [KV_BUFFERS] + v_desc.block_type.shape, v_desc.layout)
    stats_smem = gl.allocate_shared_memory(gl.float32, [STAGES if STATS_IN_SHARED else 1] + stats_desc.block_type.shape,
                                           stats_desc.layout)
    kv_ready = gl.allocate_shared_memory(gl.int64, [KV_BUFFERS, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [KV_BUFFERS, 1], mbarrier.MBarrierLayout())
    q_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())  # (PINGPONG)
    ds_smem = gl.allocate_shared_memory(dtype, [2 if DEFER_DK else 1, BLOCK_N, BLOCK_M],  # (DEFER_DK)
                                        gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], dtype))
    for i in gl.static_range(KV_BUFFERS):
        mbarrier.init(kv_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=2)  # one arrival per consumer group
    for i in gl.static_range(STAGES):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=2)  # one arrival per consumer group
    for i in gl.static_range(2):
        mbarrier.init(turns.index(i), count=1)

    barriers = (kv_ready, kv_empty, q_ready, q_empty, turns)
    gl.warp_specialize([
        (_dkdv_consumer_partition, (q_smem, k_smem, v_smem, do_smem, stats_smem, ds_smem, dk_desc, dv_desc, barriers,
                                    lse2_ptr, delta_ptr, slopes_ptr, heads_kv, gqa_group, seq_q, seq_kv, num_n_blocks,
                                    num_tiles, stats_stride, qk_scale, scale, band, transform, 0, VARIANTS, BLOCK_M,
                                    BLOCK_N, STAGES, STATS_IN_SHARED, PINGPONG, DEFER_DK, FMA_QUARTERS, PERSISTENT)),
        (_dkdv_consumer_partition, (q_smem, k_smem, v_smem, do_smem, stats_smem, ds_smem, dk_desc, dv_desc, barriers,
                                    lse2_ptr, delta_ptr, slopes_ptr, heads_kv, gqa_group, seq_q, seq_kv, num_n_blocks,
                                    num_tiles, stats_stride, qk_scale, scale, band, transform, 1, VARIANTS, BLOCK_M,
                                    BLOCK_N, STAGES, STATS_IN_SHARED, PINGPONG, DEFER_DK, FMA_QUARTERS, PERSISTENT)),
        (_dkdv_load_partition, (q_desc, k_desc, v_desc, do_desc, stats_desc, q_smem, k_smem, v_smem, do_smem,
                                stats_smem, barriers, heads_kv, gqa_group, seq_q, num_n_blocks, num_tiles, band,
                                VARIANTS, BLOCK_M, BLOCK_N, STAGES, STATS_IN_SHARED, PERSISTENT)),
    ], [4, 1], [CONSUMER_REGISTERS, PRODUCER_REGISTERS])


@gluon.jit
def _dq_load_tile(tile, count, step, q_desc, k_desc, v_desc, do_desc, q_smem, k_smem, v_smem, do_smem, barriers,
                  heads_q, gqa_group, seq_kv, num_m_blocks, band,
                  VARIANTS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """Producer, the program's `count`-th tile (`step`: the K/V blocks loaded before it): Q and dO of its rows into
    Q/dO buffer count % buffers, then K and V of each key block. Returns the blocks loaded so far."""
    q_ready, q_empty, kv_ready, kv_empty, _ = barriers
    Q_BUFFERS: gl.constexpr = q_smem.shape[0]
    buffer = count % Q_BUFFERS
    batch, head_q, head_kv, first_row, first_block, end_block = tile_coords(
        tile, heads_q, gqa_group, seq_kv, num_m_blocks, band, VARIANTS, BLOCK_M, BLOCK_N)
    if Q_BUFFERS > 1:  # (a buffer's first use waits on the already complete phase before its first release)
        mbarrier.wait(q_empty.index(buffer), ((count // Q_BUFFERS) & 1) ^ 1)
    mbarrier.expect(q_ready.index(buffer), q_desc.block_type.nbytes + do_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [batch, head_q, first_row, 0], q_ready.index(buffer),
                                    q_smem.index(buffer))
    tma.async_copy_global_to_shared(do_desc, [batch, head_q, first_row, 0], q_ready.index(buffer),
                                    do_smem.index(buffer))
    for i in range(end_block - first_block):
        stage = (step + i) % STAGES
        key = (first_block + i) * BLOCK_N
        mbarrier.wait(kv_empty.index(stage), (((step + i) // STAGES) & 1) ^ 1)
        mbarrier.expect(kv_ready.index(stage), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [batch, head_kv, key, 0], kv_ready.index(stage),
                                        k_smem.index(stage))
        tma.async_copy_global_to_shared(v_desc, [batch, head_kv, key, 0], kv_ready.index(stage),
                                        v_smem.index(stage))
    return step + end_block - first_block


@gluon.jit
def _dq_load_partition(q_desc, k_desc, v_desc, do_desc, q_smem, k_smem, v_smem, do_smem, barriers,
                       heads_q, gqa_group, seq_kv, num_m_blocks, num_tiles, band,
                       VARIANTS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                       PERSISTENT: gl.constexpr):
    """Producer: the program's tile (PERSISTENT: every num_programs-th tile from its id), one after another."""
    if PERSISTENT:
        step = 0
        count = 0
        for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            step = _dq_load_tile(tile, count, step, q_desc, k_desc, v_desc, do_desc, q_smem, k_smem, v_smem, do_smem,
                                 barriers, heads_q, gqa_group, seq_kv, num_m_blocks, band, VARIANTS, BLOCK_M, BLOCK_N,
                                 STAGES)
            count += 1
    else:
        _dq_load_tile(gl.program_id(0), 0, 0, q_desc, k_desc, v_desc, do_desc, q_smem, k_smem, v_smem, do_smem,
                      barriers, heads_q, gqa_group, seq_kv, num_m_blocks, band, VARIANTS, BLOCK_M, BLOCK_N, STAGES)


@gluon.jit
def _dq_consumer_tile(tile, count, step, q_smem, k_smem, v_smem, do_smem, ds_smem, dq_desc, barriers, lse2_ptr,
                      delta_ptr, slopes_ptr,
                      heads_q, gqa_group, seq_kv, num_m_blocks, stats_stride, qk_scale, scale, band, transform,
                      GROUP: gl.constexpr, VARIANTS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                      STAGES: gl.constexpr, PINGPONG: gl.constexpr, DEFER_DQ: gl.constexpr,
                      FMA_QUARTERS: gl.constexpr):
    """Consumer warp group GROUP, the program's `count`-th tile (`step`: the K/V blocks consumed before it): dQ of
    rows [GROUP * BLOCK_M, (GROUP + 1) * BLOCK_M) of the tile's (with PINGPONG, each step's S and dP issued in
    strict alternation with the other group's, group 0 first; with DEFER_DQ, dS goes through shared memory and a
    step's dQ product is waited for with the next step's S). Returns the blocks consumed so far."""
    q_ready, q_empty, kv_ready, kv_empty, turns = barriers
    Q_BUFFERS: gl.constexpr = q_smem.shape[0]
    buffer = count % Q_BUFFERS
    HEAD_DIM: gl.constexpr = q_smem.shape[4]  # (buffers, 1, 1, rows, head_dim)
    dtype: gl.constexpr = q_smem.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, HEAD_DIM, 16])
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)

    batch, head_q, head_kv, tile_row, first_block, end_block = tile_coords(
        tile, heads_q, gqa_group, seq_kv, num_m_blocks, band, VARIANTS, BLOCK_M, BLOCK_N)
    first_row = tile_row + GROUP * BLOCK_M
    # Key blocks outside `whole` need the element mask (the sequence end, the band's edges).
    whole = whole_keys(first_row, first_row + BLOCK_M - 1, seq_kv, band, VARIANTS, BLOCK_N)
    slope = row_slope(slopes_ptr, transform, batch, head_q, VARIANTS)
    rows = first_row + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    stats = (batch * heads_q + head_q) * stats_stride + rows
    lse2 = gl.expand_dims(gl.load(lse2_ptr + stats), 1)
    delta = gl.expand_dims(gl.load(delta_ptr + stats), 1)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    dq = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, acc_layout)
    # This group's rows of the Q and dO tiles: 2-D for the products, 4-D for dQ's TMA store.
    q_tile = q_smem.index(buffer)
    q = q_tile.reshape([2 * BLOCK_M, HEAD_DIM]).slice(GROUP * BLOCK_M, BLOCK_M)
    do = do_smem.index(buffer).reshape([2 * BLOCK_M, HEAD_DIM]).slice(GROUP * BLOCK_M, BLOCK_M)
    mbarrier.wait(q_ready.index(buffer), (count // Q_BUFFERS) & 1)
    if DEFER_DQ:  # (as the dK/dV kernel's DEFER_DK: dQ starts as a product, a zero tile times the first K block)
        ds_tile = ds_smem.index(GROUP)
        ds_tile.store(gl.zeros([BLOCK_M, BLOCK_N], dtype, s_layout))
        fence_async_shared()
        mbarrier.wait(kv_ready.index(0), 0)  # (every tile visits a key block at least)
        dq = warpgroup_mma(ds_tile, k_smem.index(0).reshape([BLOCK_N, HEAD_DIM]), dq, use_acc=False, is_async=True)

    for i in range(end_block - first_block):
        j = first_block + i
        n = step + i  # (the ring's and the turns' position)
        stage = n % STAGES
        mbarrier.wait(kv_ready.index(stage), (n // STAGES) & 1)
        k = k_smem.index(stage).reshape([BLOCK_N, HEAD_DIM])
        v_t = v_smem.index(stage).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
        k_t = k.permute((1, 0))
        if PINGPONG:
            mbarrier.wait(turns.index(GROUP), (n & 1) ^ (1 - GROUP))
        s_token = warpgroup_mma(q, k_t, s_zero, use_acc=False, is_async=True)
        dp_token = warpgroup_mma(do, v_t, s_zero, use_acc=False, is_async=True)
        if PINGPONG:
            mbarrier.arrive(turns.index(1 - GROUP), count=1)
        if Q_BUFFERS > 1:
            if i == 0:  # the previous tile's dQ store ran under these products: free its buffer
                tma.store_wait(0)
                mbarrier.arrive(q_empty.index(1 - buffer), count=1, pred=count > 0)
        if DEFER_DQ:  # (the previous step's dQ product, issued before S, retires with it: its slot is free)
            s, dq = warpgroup_mma_wait(1, deps=[s_token, dq, q, k_t, ds_tile])[:2]
            mbarrier.arrive(kv_empty.index((n + STAGES - 1) % STAGES), count=1, pred=i > 0)
        else:
            s = warpgroup_mma_wait(1, deps=[s_token, q, k_t])[0]
        derivative = 1.0
        if VARIANTS.natural_units:
            cols = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            s, derivative = transformed_scores(s, gl.expand_dims(rows, 1), gl.expand_dims(cols, 0), transform, slope,
                                               VARIANTS)
        p = exponentials(s * qk_scale - lse2, FMA_QUARTERS)
        if VARIANTS.softcap:  # dS = P softcap' (dP - delta): one tile fewer live while dP completes
            p = p * derivative  # (inf * 0 = NaN only where lse is -inf, a row every edge mask hides whole)
        if is_edge(j * BLOCK_N, whole, VARIANTS.bounded_below):
            cols = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            p = hide_unseen(p, gl.expand_dims(rows, 1), gl.expand_dims(cols, 0), seq_kv, band, VARIANTS, True, 0.0)
        dp = warpgroup_mma_wait(0, deps=[dp_token, do, v_t])[0]
        ds = p * (dp - delta)
        if DEFER_DQ:
            ds_tile.store(ds.to(dtype))
            fence_async_shared()
            dq = warpgroup_mma(ds_tile, k, dq, is_async=True)
        else:
            ds_op = gl.convert_layout(ds.to(dtype), op_layout)
            dq_token = warpgroup_mma(ds_op, k, dq, is_async=True)
            dq = warpgroup_mma_wait(0, deps=[dq_token, k])[0]
            mbarrier.arrive(kv_empty.index(stage), count=1)
    if DEFER_DQ:
        dq = warpgroup_mma_wait(0, deps=[dq, ds_tile])[0]

    # The group's Q rows are read by its own products alone, all retired: they take dQ.
    q.store((dq * scale).to(dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(dq_desc, [batch, head_q, first_row, 0],
                                    q_tile.slice(GROUP * BLOCK_M, BLOCK_M, dim=2))
    if Q_BUFFERS == 1:  # (persistent: the next tile's first step waits for the store, the partition's end too)
        tma.store_wait(0)
    return step + end_block - first_block


@gluon.jit
def _dq_consumer_partition(q_smem, k_smem, v_smem, do_smem, ds_smem, dq_desc, barriers, lse2_ptr, delta_ptr,
                           slopes_ptr, heads_q, gqa_group, seq_kv, num_m_blocks, num_tiles, stats_stride, qk_scale,
                           scale, band, transform, GROUP: gl.constexpr, VARIANTS: gl.constexpr, BLOCK_M: gl.constexpr,
                           BLOCK_N: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr,
                           DEFER_DQ: gl.constexpr, FMA_QUARTERS: gl.constexpr, PERSISTENT: gl.constexpr):
    """Consumer warp group GROUP: the program's tile (PERSISTENT: every num_programs-th tile from its id)."""
    if PERSISTENT:
        step = 0
        count = 0
        for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            step = _dq_consumer_tile(tile, count, step, q_smem, k_smem, v_smem, do_smem, ds_smem, dq_desc, barriers,
                                     lse2_ptr, delta_ptr, slopes_ptr, heads_q, gqa_group, seq_kv, num_m_blocks,
                                     stats_stride, qk_scale, scale, band, transform, GROUP, VARIANTS, BLOCK_M,
                                     BLOCK_N, STAGES, PINGPONG, DEFER_DQ, FMA_QUARTERS)
            count += 1
        tma.store_wait(0)
    else:
        _dq_consumer_tile(gl.program_id(0), 0, 0, q_smem, k_smem, v_smem, do_smem, ds_smem, dq_desc, barriers,
                          lse2_ptr, delta_ptr, slopes_ptr, heads_q, gqa_group, seq_kv, num_m_blocks, stats_stride,
                          qk_scale, scale, band, transform, GROUP, VARIANTS, BLOCK_M, BLOCK_N, STAGES, PINGPONG,
                          DEFER_DQ, FMA_QUARTERS)


@gluon.jit(do_not_specialize=["band", "transform"])  # (run-time values: one compile for all)
def hopper_attention_backward_dq_kernel(
    q_desc, k_desc, v_desc, do_desc, dq_desc, lse2_ptr, delta_ptr, slopes_ptr,
    heads_q, gqa_group, seq_kv, num_m_blocks, num_tiles, stats_stride, qk_scale, scale, band, transform,
    VARIANTS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    PINGPONG: gl.constexpr, DEFER_DQ: gl.constexpr, FMA_QUARTERS: gl.constexpr, PERSISTENT: gl.constexpr,
    CONSUMER_REGISTERS: gl.constexpr, PRODUCER_REGISTERS: gl.constexpr,
):
    """dQ of `2 * BLOCK_M` query rows of one (batch, query head) a tile: one tile a program, or with PERSISTENT
    (a grid of at most one program an SM) every num_programs-th tile from the program's id, the next tile's Q and
    dO loaded into a second buffer while the current one's run."""
    gl.static_assert(BLOCK_M == 64, "a consumer warp group owns 64 rows (one wgmma row block)")
    # (a deferred dQ product leaves its last K/V slot held at the tile's end)
    gl.static_assert(not (PERSISTENT and DEFER_DQ), "DEFER_DQ takes one tile a program")
    Q_BUFFERS: gl.constexpr = 2 if PERSISTENT else 1
    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [Q_BUFFERS] + q_desc.block_type.shape, q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [Q_BUFFERS] + do_desc.block_type.shape, do_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [Q_BUFFERS, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [Q_BUFFERS, 1], mbarrier.MBarrierLayout())
    kv_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())  # (PINGPONG)
    ds_smem = gl.allocate_shared_memory(dtype, [2 if DEFER_DQ else 1, BLOCK_M, BLOCK_N],  # (DEFER_DQ)
                                        gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N], dtype))
    for i in gl.static_range(Q_BUFFERS):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=2)  # one arrival per consumer group
    for i in gl.static_range(STAGES):
        mbarrier.init(kv_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=2)  # one arrival per consumer group
    for i in gl.static_range(2):
        mbarrier.init(turns.index(i), count=1)

    barriers = (q_ready, q_empty, kv_ready, kv_empty, turns)
    gl.warp_specialize([
        (_dq_consumer_partition, (q_smem, k_smem, v_smem, do_smem, ds_smem, dq_desc, barriers, lse2_ptr, delta_ptr,
                                  slopes_ptr, heads_q, gqa_group, seq_kv, num_m_blocks, num_tiles, stats_stride,
                                  qk_scale, scale, band, transform, 0, VARIANTS, BLOCK_M, BLOCK_N, STAGES, PINGPONG,
                                  DEFER_DQ, FMA_QUARTERS, PERSISTENT)),
        (_dq_consumer_partition, (q_smem, k_smem, v_smem, do_smem, ds_smem, dq_desc, barriers, lse2_ptr, delta_ptr,
                                  slopes_ptr, heads_q, gqa_group, seq_kv, num_m_blocks, num_tiles, stats_stride,
                                  qk_scale, scale, band, transform, 1, VARIANTS, BLOCK_M, BLOCK_N, STAGES, PINGPONG,
                                  DEFER_DQ, FMA_QUARTERS, PERSISTENT)),
        (_dq_load_partition, (q_desc, k_desc, v_desc, do_desc, q_smem, k_smem, v_smem, do_smem, barriers,
                              heads_q, gqa_group, seq_kv, num_m_blocks, num_tiles, band, VARIANTS, BLOCK_M, BLOCK_N,
                              STAGES, PERSISTENT)),
    ], [4, 1], [CONSUMER_REGISTERS, PRODUCER_REGISTERS])
