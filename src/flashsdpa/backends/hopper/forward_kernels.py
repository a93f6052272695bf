"""Gluon forward kernel for Hopper (sm_90): warp-specialised flash attention.

One program computes `CONSUMERS * BLOCK_M` query rows of one (batch, query
head) against every key it may attend to. Its warps split into partitions:

- a producer (one warp, few registers) loads the Q tile once and streams K
  and V tiles through `STAGES` shared-memory slots by TMA, each slot guarded
  by a "ready" mbarrier (the copy landed) and an "empty" one (every consumer
  is done with it);
- `CONSUMERS` consumer warp groups (the default partition and worker
  partitions, one warp group each) own `BLOCK_M` query rows apiece. Each issues
  S = Q K^T for block j asynchronously, then O += P V for block j-1, waits for
  S alone and runs the softmax of block j while the P V product is still on
  the tensor cores; the groups do not wait for each other, so one group's
  softmax also runs under the other's products.

Scores are kept in base 2 (`qk_scale` = softmax scale * log2(e), which the
launcher keeps positive); the row log-sum-exp is written in natural log.
Causal masks are top-left aligned (key j visible to row i when j <= i).
Q, K, V and O are read and written through 4-D host TMA descriptors
(batch, heads, rows, head_dim), whose bounds clip the tiles at the sequence
ends: out-of-range rows load as zeros and are never stored.
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

LN2: gl.constexpr = gl.constexpr(0.6931471805599453)


@gluon.jit
def _load_partition(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, barriers, coords, key_blocks,
                    STAGES: gl.constexpr):
    """Producer: Q once, then K and V of every key block into the ring of `STAGES` slots."""
    q_ready, k_ready, v_ready, k_empty, v_empty = barriers
    batch, head_q, head_kv, first_row = coords
    mbarrier.expect(q_ready, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [batch, head_q, first_row, 0], q_ready, q_smem)
    block_n: gl.constexpr = k_desc.block_type.shape[2]
    for j in range(key_blocks):
        stage = j % STAGES
        # A slot's "empty" barrier completes phase 0 when the consumers first free it; the first
        # pass over the ring waits on the (already complete) phase before that.
        free_phase = ((j // STAGES) & 1) ^ 1
        mbarrier.wait(k_empty.index(stage), free_phase)
        mbarrier.expect(k_ready.index(stage), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [batch, head_kv, j * block_n, 0], k_ready.index(stage),
                                        k_smem.index(stage))
        mbarrier.wait(v_empty.index(stage), free_phase)
        mbarrier.expect(v_ready.index(stage), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [batch, head_kv, j * block_n, 0], v_ready.index(stage),
                                        v_smem.index(stage))


@gluon.jit
def _softmax_block(s, m_i, l_i, j, first_row, seq_kv, masked_from, qk_scale,
                   CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                   s_layout: gl.constexpr):
    """Online-softmax step on raw scores `s` of key block j: (p, new max, alpha, new row sum)."""
    if j >= masked_from:
        cols = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        visible = gl.expand_dims(cols < seq_kv, 0)
        if CAUSAL:
            rows = first_row + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
            visible = visible & (gl.expand_dims(cols, 0) <= gl.expand_dims(rows, 1))
        s = gl.where(visible, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
    l_new = l_i * alpha + gl.sum(p, 1)
    return p, m_new, alpha, l_new


@gluon.jit
def _consumer_partition(q_smem, k_smem, v_smem, o_desc, barriers, coords, lse_ptr, lse_row0, seq_q, seq_kv,
                        key_blocks, qk_scale,
                        GROUP: gl.constexpr, CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                        STAGES: gl.constexpr):
    """Consumer warp group GROUP: rows [first_row + GROUP*BLOCK_M, +BLOCK_M) of the program's tile."""
    q_ready, k_ready, v_ready, k_empty, v_empty = barriers
    batch, head_q, head_kv, program_row = coords
    HEAD_DIM: gl.constexpr = q_smem.shape[3]
    HEAD_DIM_V: gl.constexpr = v_smem.shape[4]  # (stage, 1, 1, rows, head_dim)
    dtype: gl.constexpr = q_smem.dtype
    first_row = program_row + GROUP * BLOCK_M

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM_V, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)

    # Key blocks from `masked_from` on need the sequence-end or causal mask.
    masked_from = seq_kv // BLOCK_N
    if CAUSAL:
        masked_from = gl.minimum(masked_from, (first_row + 1) // BLOCK_N)

    # This group's rows of the Q tile: a 2-D view for the products, a 4-D one for the output's TMA store.
    q = q_smem.reshape([2 * BLOCK_M, HEAD_DIM]).slice(GROUP * BLOCK_M, BLOCK_M)
    q_tile = q_smem.slice(GROUP * BLOCK_M, BLOCK_M, dim=2)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    mbarrier.wait(q_ready, 0)

    # Key block 0: scores, then its softmax; its P V product is issued in the loop.
    mbarrier.wait(k_ready.index(0), 0)
    k_first = k_smem.index(0).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
    s_token = warpgroup_mma(q, k_first, s_zero, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(0, deps=[s_token, q, k_first])[0]
    mbarrier.arrive(k_empty.index(0), count=1)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
    p, m_i, alpha, l_i = _softmax_block(s, m_i, l_i, 0, first_row, seq_kv, masked_from, qk_scale,
                                        CAUSAL, BLOCK_M, BLOCK_N, s_layout)
    p_op = gl.convert_layout(p.to(dtype), p_layout)
    acc = gl.zeros([BLOCK_M, HEAD_DIM_V], gl.float32, o_layout)

    for j in range(1, key_blocks):
        stage = j % STAGES
        previous = (j - 1) % STAGES
        mbarrier.wait(k_ready.index(stage), (j // STAGES) & 1)
        k_t = k_smem.index(stage).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
        s_token = warpgroup_mma(q, k_t, s_zero, use_acc=False, is_async=True)
        mbarrier.wait(v_ready.index(previous), ((j - 1) // STAGES) & 1)
        v = v_smem.index(previous).reshape([BLOCK_N, HEAD_DIM_V])
        acc_token = warpgroup_mma(p_op, v, acc, is_async=True)
        # Groups retire in order: with one left outstanding, S is done and P V may still run.
        s = warpgroup_mma_wait(1, deps=[s_token, q, k_t])[0]
        mbarrier.arrive(k_empty.index(stage), count=1)
        p, m_i, alpha, l_i = _softmax_block(s, m_i, l_i, j, first_row, seq_kv, masked_from, qk_scale,
                                            CAUSAL, BLOCK_M, BLOCK_N, s_layout)
        acc = warpgroup_mma_wait(0, deps=[acc_token, v])[0]
        mbarrier.arrive(v_empty.index(previous), count=1)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, o_rows), 1)
        p_op = gl.convert_layout(p.to(dtype), p_layout)

    last = (key_blocks - 1) % STAGES
    mbarrier.wait(v_ready.index(last), ((key_blocks - 1) // STAGES) & 1)
    v_last = v_smem.index(last).reshape([BLOCK_N, HEAD_DIM_V])
    acc_token = warpgroup_mma(p_op, v_last, acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=[acc_token, v_last])[0]
    mbarrier.arrive(v_empty.index(last), count=1)

    l_o = gl.convert_layout(l_i, o_rows)
    acc = acc / gl.expand_dims(l_o, 1)
    # lse in natural log; rows past the sequence end are not stored.
    rows = first_row + gl.arange(0, BLOCK_M, layout=o_rows)
    lse = (gl.convert_layout(m_i, o_rows) + gl.log2(l_o)) * LN2
    gl.store(lse_ptr + lse_row0 + rows, lse, mask=rows < seq_q)
    # The output goes out through this group's slice of the Q tile, which no product reads any more.
    q.store(acc.to(dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [batch, head_q, first_row, 0], q_tile)
    tma.store_wait(0)


@gluon.jit
def hopper_attention_forward_kernel(
    q_desc, k_desc, v_desc, o_desc, lse_ptr,
    heads_q, gqa_group, seq_q, seq_kv, num_m_blocks, qk_scale,
    CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    CONSUMER_REGISTERS: gl.constexpr, PRODUCER_REGISTERS: gl.constexpr,
):
    """out/lse of `2 * BLOCK_M` query rows of one (batch, query head); program ids run over row tiles fastest
    (programs of one head share its K/V in L2), longest causal tiles first."""
    gl.static_assert(BLOCK_M == 64, "a consumer warp group owns 64 rows (one wgmma row block)")
    pid = gl.program_id(0)
    m_block = pid % num_m_blocks
    if CAUSAL:
        m_block = num_m_blocks - 1 - m_block
    batch_head = pid // num_m_blocks
    batch = batch_head // heads_q
    head_q = batch_head % heads_q
    head_kv = head_q // gqa_group
    program_row = m_block * (2 * BLOCK_M)

    key_end = seq_kv
    if CAUSAL:
        key_end = gl.minimum(seq_kv, program_row + 2 * BLOCK_M)
    key_blocks = gl.cdiv(key_end, BLOCK_N)

    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_ready, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)  # one arrival per consumer group
        mbarrier.init(v_empty.index(i), count=2)

    barriers = (q_ready, k_ready, v_ready, k_empty, v_empty)
    coords = (batch, head_q, head_kv, program_row)
    lse_row0 = batch_head * seq_q
    gl.warp_specialize([
        (_consumer_partition, (q_smem, k_smem, v_smem, o_desc, barriers, coords, lse_ptr, lse_row0, seq_q, seq_kv,
                               key_blocks, qk_scale, 0, CAUSAL, BLOCK_M, BLOCK_N, STAGES)),
        (_consumer_partition, (q_smem, k_smem, v_smem, o_desc, barriers, coords, lse_ptr, lse_row0, seq_q, seq_kv,
                               key_blocks, qk_scale, 1, CAUSAL, BLOCK_M, BLOCK_N, STAGES)),
        (_load_partition, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, barriers, coords, key_blocks, STAGES)),
    ], [4, 1], [CONSUMER_REGISTERS, PRODUCER_REGISTERS])
