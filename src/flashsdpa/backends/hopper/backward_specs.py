"""What one compiled variant of the Hopper backward kernels is: a frozen spec per head dim, and the table.

Two Gluon kernels, each warp-specialised as the forward is (a producer warp
streaming tiles by TMA, two consumer warp groups of `BLOCK` rows each):

- dK/dV, key-stationary: a program owns `2 * dkdv_block_n` keys of one
  (batch, key head) and walks the query blocks of every query head of its
  GQA group (`dkdv_block_m` rows a step) in a fixed order;
- dQ, query-stationary: a program owns `2 * dq_block_m` query rows of one
  (batch, query head) and walks its key blocks (`dq_block_n` keys a step).

Neither adds into memory another program writes, so the gradients are the
same bits every call. Both compute S and dP: 7 products a tile pair, against
5 with dQ inside the dK/dV kernel, which measured slower on the H100 (NOTES,
"Issue 14: the fused-dQ variant removed"). Shared memory (d=128, two
stages): dK/dV 64 KB of K and V plus 2 x 32 KB of Q and dO; dQ 64 KB of Q
and dO plus 2 x 32 KB of K and V. Registers: 12 warps a program, so a cap of 168 a thread, re-balanced
to 240 a consumer and 24 for the producer (dK and dV accumulators: 2 x 64 a
thread at d=128). Head dim 256 would need 2 x 128 accumulator registers a
thread: not taken (triton's backward runs it).
"""

from __future__ import annotations

from dataclasses import dataclass

BACKWARD_HEAD_DIMS = (64, 128)  # what the kernels take
# Where the backend runs them: the head dims where they measured at or above triton's backward on the H100
# (BENCHMARKS.md, issue 14); elsewhere it runs triton's backward, recording why.
# H200, bf16, backward alone, TFLOP/s Gluon / triton's: d=128 L=4096 463/423, L=16384 causal 460/416, L=1024
# 385/358; d=64 L=4096 355/353.
GLUON_BACKWARD_HEAD_DIMS: tuple[int, ...] = (64, 128)


@dataclass(frozen=True)
class HopperBackwardSpec:
    """Tiles and register split of the two backward kernels for one head dim (the dtype comes with the tensors)."""

    head_dim: int
    dkdv_block_n: int  # keys a consumer warp group owns (the program: twice this)
    dkdv_block_m: int  # query rows streamed a step
    dkdv_stages: int  # Q/dO ring depth
    dq_block_n: int  # keys streamed a step
    dq_stages: int  # K/V ring depth
    dq_block_m: int = 64  # query rows a consumer warp group owns (one wgmma row block)
    consumer_registers: int = 240
    producer_registers: int = 24
    max_registers: int = 168
    num_warps: int = 4  # the default partition: consumer group 0


_TILES = {  # head dim: (dkdv_block_n, dkdv_block_m, dkdv_stages, dq_block_n, dq_stages)
    64: (64, 64, 3, 128, 2),
    128: (64, 64, 2, 64, 2),
}


def backward_spec(head_dim: int) -> HopperBackwardSpec:
    return HopperBackwardSpec(head_dim, *_TILES[head_dim])
