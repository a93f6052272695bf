"""Gluon forward kernel for Hopper (sm_90): warp-specialised, persistent flash attention.

A tile is `2 * BLOCK_M` query rows of one (batch, query head) against every
key they may attend to. Each program walks the tiles `program_id`,
`program_id + num_programs`, ... (a grid of one program per tile is the
plain, non-persistent launch). Its warps split into partitions:

- a producer (one warp, few registers) loads each tile's Q into one of
  `Q_BUFFERS` slots and streams K and V blocks through a ring of `STAGES`
  slots by TMA, each slot guarded by a "ready" mbarrier (the copy landed) and
  an "empty" one (both consumers are done with it). With two Q slots it
  loads the next tile's Q and first K/V blocks while the consumers finish
  the current one;
- two consumer warp groups (the default partition and one worker) own
  `BLOCK_M` rows each. Each issues S = Q K^T for block j asynchronously, then
  O += P V for block j-1, waits for S alone and runs the softmax of block j
  while P V is still on the tensor cores; the groups do not wait for each
  other, so one group's softmax also runs under the other's products.

Scores are kept in base 2 (`qk_scale` = softmax scale * log2(e), positive:
the launcher negates q for a negative scale; log2(e) alone where softcap or
ALiBi transform the scores, which then are in natural units; softcap *
log2(e) where the scores are the hardware tanh's values, `TANH`; see
`HopperForwardSpec.qk_scale`); the row
log-sum-exp is written in natural log. The variants (`VARIANTS`, see
variant_kernels): a tile visits the key blocks its rows see (causal, windows,
either alignment), masks only the edge blocks, and a row that sees no key
gets out 0 and lse -inf; a sink logit starts each row's softmax (a key of
weight exp(sink) and no value row). Q, K, V and O go through 4-D host TMA
descriptors (batch, heads, rows, head_dim), whose bounds clip tiles at the
sequence ends: out-of-range rows load as zeros and are never stored. O
leaves through the consumer's own rows of its tile's Q slot.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from flashsdpa.backends.hopper.variant_kernels import (
    hide_unseen,
    is_edge,
    key_blocks_seen,
    row_slope,
    forward_scores,
    whole_keys,
)
from flashsdpa.backends.triton.score_kernels import exp2_by_fma

LN2: gl.constexpr = gl.constexpr(0.6931471805599453)
LOG2E: gl.constexpr = gl.constexpr(1.4426950408889634)


@gluon.jit
def tile_coords(tile, heads_q, gqa_group, seq_kv, num_m_blocks, band, VARIANTS: gl.constexpr, BLOCK_M: gl.constexpr,
                BLOCK_N: gl.constexpr):
    """(batch, query head, key head, first row, first key block, end key block) of `tile`; row tiles of one
    head are adjacent (their programs share its K/V in L2), longest causal tiles first."""
    m_block = tile % num_m_blocks
    if VARIANTS.longest_rows_last:
        m_block = num_m_blocks - 1 - m_block
    batch_head = tile // num_m_blocks
    head_q = batch_head % heads_q
    first_row = m_block * (2 * BLOCK_M)
    first_block, end_block = key_blocks_seen(first_row, first_row + 2 * BLOCK_M - 1, seq_kv, band, VARIANTS,
                                             BLOCK_N)
    return batch_head // heads_q, head_q, head_q // gqa_group, first_row, first_block, end_block


@gluon.jit
def _load_partition(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, barriers, heads_q, gqa_group, seq_kv,
                    num_m_blocks, num_tiles, band,
                    VARIANTS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                    Q_BUFFERS: gl.constexpr):
    """Producer: each tile's Q, then K and V of its key blocks into the ring of `STAGES` slots."""
    q_ready, q_empty, k_ready, v_ready, k_empty, v_empty, turns = barriers
    loaded = 0  # key blocks loaded so far, over every tile: their ring position
    count = 0  # tiles started by this program
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        batch, head_q, head_kv, first_row, first_block, end_block = tile_coords(
            tile, heads_q, gqa_group, seq_kv, num_m_blocks, band, VARIANTS, BLOCK_M, BLOCK_N)
        q_slot = count % Q_BUFFERS
        # An "empty" barrier completes phase 0 when the consumers first free its slot; the first pass
        # over a ring waits on the (already complete) phase before that.
        mbarrier.wait(q_empty.index(q_slot), ((count // Q_BUFFERS) & 1) ^ 1)
        mbarrier.expect(q_ready.index(q_slot), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [batch, head_q, first_row, 0], q_ready.index(q_slot),
                                        q_smem.index(q_slot))
        for j in range(first_block, end_block):
            stage = loaded % STAGES
            free_phase = ((loaded // STAGES) & 1) ^ 1
            mbarrier.wait(k_empty.index(stage), free_phase)
            mbarrier.expect(k_ready.index(stage), k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [batch, head_kv, j * BLOCK_N, 0], k_ready.index(stage),
                                            k_smem.index(stage))
            mbarrier.wait(v_empty.index(stage), free_phase)
            mbarrier.expect(v_ready.index(stage), v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(v_desc, [batch, head_kv, j * BLOCK_N, 0], v_ready.index(stage),
                                            v_smem.index(stage))
            loaded += 1
        count += 1


@gluon.jit
def _take_turn(turns, rounds, GROUP: gl.constexpr, PINGPONG: gl.constexpr):
    """With PINGPONG, wait until the other consumer group has issued its products of the previous round.

    The groups issue their tensor-core work in strict alternation (group 0 first), so that one group's
    products run while the other computes its softmax. `rounds` counts this group's earlier turns."""
    if PINGPONG:
        mbarrier.wait(turns.index(GROUP), (rounds & 1) ^ (1 - GROUP))


@gluon.jit
def _pass_turn(turns, GROUP: gl.constexpr, PINGPONG: gl.constexpr):
    if PINGPONG:
        mbarrier.arrive(turns.index(1 - GROUP), count=1)


@gluon.jit
def _softmax_block(s, m_i, l_i, j, rows, whole, seq_kv, band, transform, slope, qk_scale,
                   VARIANTS: gl.constexpr, BLOCK_N: gl.constexpr, TANH: gl.constexpr, FMA_EXP2: gl.constexpr,
                   s_layout: gl.constexpr):
    """Online-softmax step on raw products `s` of key block j for query `rows` ([BLOCK_M]; `whole`: their
    whole key blocks, variant_kernels): (p, new max, alpha, new row sum). FMA_EXP2: p's exponentials by
    `score_kernels.exp2_by_fma` (FMA and integer pipes) instead of MUFU.EX2."""
    if VARIANTS.natural_units:
        cols = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        s = forward_scores(s, gl.expand_dims(rows, 1), gl.expand_dims(cols, 0), transform, slope, VARIANTS, TANH)
    edge = is_edge(j * BLOCK_N, whole, VARIANTS.bounded_below)
    if edge:
        cols = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        s = hide_unseen(s, gl.expand_dims(rows, 1), gl.expand_dims(cols, 0), seq_kv, band, VARIANTS, True,
                        float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    m_used = m_new
    if VARIANTS.banded:
        if edge:  # a row that has seen no key yet: its p and alpha are 0, not exp2(-inf + inf)
            m_used = gl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = gl.exp2(m_i - m_used)
    if FMA_EXP2:
        p = exp2_by_fma(s * qk_scale - gl.expand_dims(m_used, 1))
    else:
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_used, 1))
    l_new = l_i * alpha + gl.sum(p, 1)
    return p, m_new, alpha, l_new


@gluon.jit
def _consumer_partition(q_smem, k_smem, v_smem, o_desc, barriers, lse_ptr, slopes_ptr, sinks_ptr, heads_q, gqa_group,
                        seq_q, seq_kv, num_m_blocks, num_tiles, qk_scale, band, transform,
                        GROUP: gl.constexpr, VARIANTS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                        STAGES: gl.constexpr, Q_BUFFERS: gl.constexpr, PINGPONG: gl.constexpr,
                        TANH: gl.constexpr, FMA_EXP2: gl.constexpr):
    """Consumer warp group GROUP: rows [GROUP * BLOCK_M, (GROUP + 1) * BLOCK_M) of every tile of this program."""
    q_ready, q_empty, k_ready, v_ready, k_empty, v_empty, turns = barriers
    HEAD_DIM: gl.constexpr = q_smem.shape[4]  # (slot, 1, 1, rows, head_dim)
    HEAD_DIM_V: gl.constexpr = v_smem.shape[4]
    dtype: gl.constexpr = q_smem.dtype

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM_V, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)

    consumed = 0  # key blocks consumed so far, over every tile: their ring position
    count = 0
    rounds = 0  # product issues so far (PINGPONG turns)
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        batch, head_q, head_kv, tile_row, first_block, end_block = tile_coords(
            tile, heads_q, gqa_group, seq_kv, num_m_blocks, band, VARIANTS, BLOCK_M, BLOCK_N)
        key_blocks = end_block - first_block
        first_row = tile_row + GROUP * BLOCK_M
        rows = first_row + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
        # Key blocks outside `whole` need the element mask (the sequence end, the band's edges).
        whole = whole_keys(first_row, first_row + BLOCK_M - 1, seq_kv, band, VARIANTS, BLOCK_N)
        slope = row_slope(slopes_ptr, transform, batch, head_q, VARIANTS)

        q_slot = count % Q_BUFFERS
        q_tile = q_smem.index(q_slot)
        # This group's rows of the Q slot: 2-D for the products, 4-D for the output's TMA store.
        q = q_tile.reshape([2 * BLOCK_M, HEAD_DIM]).slice(GROUP * BLOCK_M, BLOCK_M)
        q_rows = q_tile.slice(GROUP * BLOCK_M, BLOCK_M, dim=2)
        mbarrier.wait(q_ready.index(q_slot), (count // Q_BUFFERS) & 1)

        # Key block 0: scores, then its softmax; its P V product is issued in the loop.
        stage = consumed % STAGES
        mbarrier.wait(k_ready.index(stage), (consumed // STAGES) & 1)
        k_first = k_smem.index(stage).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
        _take_turn(turns, rounds, GROUP, PINGPONG)
        s_token = warpgroup_mma(q, k_first, s_zero, use_acc=False, is_async=True)
        _pass_turn(turns, GROUP, PINGPONG)
        rounds += 1
        if Q_BUFFERS > 1:
            if count > 0:
                # The previous tile's output store has read its Q slot by now: hand the slot back.
                tma.store_wait(0)
                mbarrier.arrive(q_empty.index((count - 1) % Q_BUFFERS), count=1)
        s = warpgroup_mma_wait(0, deps=[s_token, q, k_first])[0]
        mbarrier.arrive(k_empty.index(stage), count=1)
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
        if VARIANTS.sinks:  # the sink: a key of logit `sink` (natural units) and no value row
            sink = gl.load(sinks_ptr + head_q)
            m_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout)) + sink * LOG2E
            l_i = gl.where(m_i == float("-inf"), 0.0, 1.0)
        p, m_i, alpha, l_i = _softmax_block(s, m_i, l_i, first_block, rows, whole, seq_kv, band, transform, slope,
                                            qk_scale, VARIANTS, BLOCK_N, TANH, FMA_EXP2, s_layout)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        acc = gl.zeros([BLOCK_M, HEAD_DIM_V], gl.float32, o_layout)

        for j in range(1, key_blocks):
            stage = (consumed + j) % STAGES
            previous = (consumed + j - 1) % STAGES
            mbarrier.wait(k_ready.index(stage), ((consumed + j) // STAGES) & 1)
            k_t = k_smem.index(stage).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
            _take_turn(turns, rounds, GROUP, PINGPONG)
            s_token = warpgroup_mma(q, k_t, s_zero, use_acc=False, is_async=True)
            # V is waited for once S is issued, so that S starts as soon as K lands (H100, d=128 L=4096, one
            # program per tile: 609 TFLOP/s so, 571 waiting for V first).
            mbarrier.wait(v_ready.index(previous), ((consumed + j - 1) // STAGES) & 1)
            v = v_smem.index(previous).reshape([BLOCK_N, HEAD_DIM_V])
            acc_token = warpgroup_mma(p_op, v, acc, is_async=True)
            _pass_turn(turns, GROUP, PINGPONG)
            rounds += 1
            # Products retire in order: with one left outstanding, S is done and P V may still run.
            s = warpgroup_mma_wait(1, deps=[s_token, q, k_t])[0]
            mbarrier.arrive(k_empty.index(stage), count=1)
            p, m_i, alpha, l_i = _softmax_block(s, m_i, l_i, first_block + j, rows, whole, seq_kv, band, transform,
                                                slope, qk_scale, VARIANTS, BLOCK_N, TANH, FMA_EXP2, s_layout)
            acc = warpgroup_mma_wait(0, deps=[acc_token, v])[0]
            mbarrier.arrive(v_empty.index(previous), count=1)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, o_rows), 1)
            p_op = gl.convert_layout(p.to(dtype), p_layout)

        consumed += key_blocks
        last = (consumed - 1) % STAGES
        mbarrier.wait(v_ready.index(last), ((consumed - 1) // STAGES) & 1)
        v_last = v_smem.index(last).reshape([BLOCK_N, HEAD_DIM_V])
        _take_turn(turns, rounds, GROUP, PINGPONG)
        acc_token = warpgroup_mma(p_op, v_last, acc, is_async=True)
        _pass_turn(turns, GROUP, PINGPONG)
        rounds += 1
        acc = warpgroup_mma_wait(0, deps=[acc_token, v_last])[0]
        mbarrier.arrive(v_empty.index(last), count=1)

        l_o = gl.convert_layout(l_i, o_rows)
        if VARIANTS.banded or VARIANTS.sinks:  # a row that saw no key (nor sink): out 0, lse -inf
            acc = acc / gl.expand_dims(gl.where(l_o == 0.0, 1.0, l_o), 1)
        else:
            acc = acc / gl.expand_dims(l_o, 1)
        # lse in natural log; rows past the sequence end are not stored.
        out_rows = first_row + gl.arange(0, BLOCK_M, layout=o_rows)
        lse = (gl.convert_layout(m_i, o_rows) + gl.log2(l_o)) * LN2
        gl.store(lse_ptr + (batch * heads_q + head_q) * seq_q + out_rows, lse, mask=out_rows < seq_q)
        q.store(acc.to(dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(o_desc, [batch, head_q, first_row, 0], q_rows)
        if Q_BUFFERS == 1:
            tma.store_wait(0)
            mbarrier.arrive(q_empty.index(q_slot), count=1)
        count += 1
    tma.store_wait(0)


@gluon.jit(do_not_specialize=["band", "transform"])  # (run-time values: one compile for all)
def hopper_attention_forward_kernel(
    q_desc, k_desc, v_desc, o_desc, lse_ptr, slopes_ptr, sinks_ptr,
    heads_q, gqa_group, seq_q, seq_kv, num_m_blocks, num_tiles, qk_scale, band, transform,
    VARIANTS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    Q_BUFFERS: gl.constexpr, PINGPONG: gl.constexpr, CONSUMER_REGISTERS: gl.constexpr,
    PRODUCER_REGISTERS: gl.constexpr, TANH: gl.constexpr, EXP2_BY_FMA: gl.constexpr,
):
    """out and lse of `num_tiles` tiles (`2 * BLOCK_M` query rows of one batch and query head each).

    band: (lowest_diagonal, highest_diagonal); transform: (scale, softcap, key_offset, ALiBi slope strides of
    batch and head); slopes_ptr (ALiBi, float32) and sinks_ptr (float32, one logit a query head) are read only
    where VARIANTS says so (variant_kernels); TANH: softcap's tanh, "precise" or "hardware" (`forward_scores`);
    EXP2_BY_FMA: consumer group 1 takes its softmax's exponentials by FMA arithmetic, group 0 by MUFU.EX2 (the
    two groups share each SM sub-partition's MUFU unit: 1.5 MUFU operations a score with the hardware tanh)."""
    gl.static_assert(BLOCK_M == 64, "a consumer warp group owns 64 rows (one wgmma row block)")
    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [Q_BUFFERS] + q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [Q_BUFFERS, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [Q_BUFFERS, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(turns.index(i), count=1)
    for i in gl.static_range(Q_BUFFERS):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=2)  # one arrival per consumer group
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)
        mbarrier.init(v_empty.index(i), count=2)

    barriers = (q_ready, q_empty, k_ready, v_ready, k_empty, v_empty, turns)
    gl.warp_specialize([
        (_consumer_partition, (q_smem, k_smem, v_smem, o_desc, barriers, lse_ptr, slopes_ptr, sinks_ptr, heads_q,
                               gqa_group, seq_q, seq_kv, num_m_blocks, num_tiles, qk_scale, band, transform, 0,
                               VARIANTS, BLOCK_M, BLOCK_N, STAGES, Q_BUFFERS, PINGPONG, TANH, False)),
        (_consumer_partition, (q_smem, k_smem, v_smem, o_desc, barriers, lse_ptr, slopes_ptr, sinks_ptr, heads_q,
                               gqa_group, seq_q, seq_kv, num_m_blocks, num_tiles, qk_scale, band, transform, 1,
                               VARIANTS, BLOCK_M, BLOCK_N, STAGES, Q_BUFFERS, PINGPONG, TANH, EXP2_BY_FMA)),
        (_load_partition, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, barriers, heads_q, gqa_group, seq_kv,
                           num_m_blocks, num_tiles, band, VARIANTS, BLOCK_M, BLOCK_N, STAGES, Q_BUFFERS)),
    ], [4, 1], [CONSUMER_REGISTERS, PRODUCER_REGISTERS])
