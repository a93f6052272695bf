"""What one compiled variant of the Hopper backward kernels is: a frozen spec per head dim, and the table.

Two Gluon kernels, each warp-specialised as the forward is (a producer warp
streaming tiles by TMA, two consumer warp groups of `BLOCK` rows each):

- dK/dV, key-stationary: a program owns `2 * dkdv_block_n` keys of one
  (batch, key head) and walks the query blocks of every query head of its
  GQA group (`dkdv_block_m` rows a step) in a fixed order;
- dQ, query-stationary: a program owns `2 * dq_block_m` query rows of one
  (batch, query head) and walks its key blocks (`dq_block_n` keys a step).

With `dkdv_persistent` / `dq_persistent` a kernel runs on at most one program
an SM, each taking every num_programs-th of those tiles (not for banded
problems, whose tiles differ in length). Neither adds into memory another
program writes, so the gradients are the same bits every call. Both compute S and dP: 7 products a tile pair, against
5 with dQ inside the dK/dV kernel, which measured slower on the H100 (NOTES,
"Issue 14: the fused-dQ variant removed"). Shared memory (d=128, two
stages): dK/dV 64 KB of K and V plus 2 x 32 KB of Q and dO; dQ 64 KB of Q
and dO plus 2 x 32 KB of K and V. Registers: 12 warps a program, so a cap of 168 a thread, re-balanced
to 240 a consumer and 24 for the producer (dK and dV accumulators: 2 x 64 a
thread at d=128). Head dim 256 would need 2 x 128 accumulator registers a
thread: not taken (triton's backward runs it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

BACKWARD_HEAD_DIMS = (64, 128)  # what the kernels take
# Where the backend runs them: the head dims where they measured at or above triton's backward on the H100
# (BENCHMARKS.md, issue 14); elsewhere it runs triton's backward, recording why.
# H200, bf16, backward alone, TFLOP/s Gluon / triton's: d=128 L=4096 463/423, L=16384 causal 460/416, L=1024
# 385/358; d=64 L=4096 355/353.
GLUON_BACKWARD_HEAD_DIMS: tuple[int, ...] = (64, 128)


@dataclass(frozen=True)
class HopperBackwardSpec:
    """Tiles, schedule and register split of the two backward kernels for one head dim (the dtype comes with the
    tensors)."""

    head_dim: int
    dkdv_block_n: int  # keys a consumer warp group owns (the program: twice this)
    dkdv_block_m: int  # query rows streamed a step
    dkdv_stages: int  # Q/dO ring depth
    dq_block_n: int  # keys streamed a step
    dq_stages: int  # K/V ring depth
    dq_block_m: int = 64  # query rows a consumer warp group owns (one wgmma row block)
    # dK/dV: each query block's delta and lse2 rows come by TMA with its Q and dO into the ring and are read from
    # shared memory where used (off: loaded from global memory at each step's start and held in registers)
    dkdv_stats_in_shared: bool = False
    # dK/dV: the consumer groups issue each step's first products in strict alternation (FA3's ping-pong), so that
    # one group's exponentials overlap the other's products
    dkdv_pingpong: bool = False
    dq_pingpong: bool = False  # dQ: the same for each step's S and dP
    # dK/dV: dS^T goes through shared memory and dK's product is waited for once the next step's S^T is issued, so
    # the tensor cores keep this group's work across the step's end (its register operand could not cross it)
    dkdv_defer_dk: bool = False
    dq_defer_dq: bool = False  # dQ: the same for dS and dQ's product
    # dK/dV: quarters of each P^T tile's exponentials (0, 1 or 2) by FMA arithmetic (`score_kernels.exp2_by_fma`),
    # the rest by MUFU.EX2, which a warp otherwise queues 32 of a step on (a 64-key group at BLOCK_M 64); scores
    # without a transform (softcap, ALiBi) only (the launcher: with one the kernels spill)
    dkdv_exp2_by_fma: int = 0
    dq_exp2_by_fma: int = 0  # dQ: the same for each P tile
    # The dQ kernel on a second stream beside the dK/dV kernel (the two write different tensors): its programs
    # fill the SMs that the dK/dV kernel's last wave leaves idle, rather than starting after it
    dq_concurrent: bool = False
    # dK/dV: a grid of one program an SM, each taking every num_programs-th tile, the next tile's K and V loaded into
    # a second buffer (+64 KB shared memory at d=128) while the current one's run, so that a tile's start (K, V and
    # the first Q/dO blocks) and end (the gradients' stores) overlap its neighbours' work; causal and windowed
    # problems (one program a tile, longest first) and score transforms (spills) keep the one-tile kernels
    dkdv_persistent: bool = False
    # dQ: the same, the next tile's Q and dO in a second buffer (+64 KB at d=128: 128-key steps would not fit)
    dq_persistent: bool = False
    consumer_registers: int = 240
    producer_registers: int = 24
    max_registers: int = 168
    num_warps: int = 4  # the default partition: consumer group 0


# What runs, by head dim: the fastest of CANDIDATES on the H100 (scripts/bench_hopper_backward_gpu.py; bf16,
# backward alone, TFLOP/s, B*H*L = 16384*2048/d; every candidate checked against float64 and giving the same
# bits as the spec before them). d=64 L=4096: "before" 320, with dkdv_stats_in_shared 381, and dkdv_pingpong too
# 386 (cuDNN 419). d=128 L=4096 / L=16384 causal / L=1024: "before" 407 / 433 / 305, dkdv_stats_in_shared with
# dq_block_n 128 447 / 490 / 349, dkdv_stats_in_shared with dkdv_pingpong 442 / 481 / 350 (cuDNN 489 / 501 / 378).
SPECS = {
    64: HopperBackwardSpec(64, dkdv_block_n=64, dkdv_block_m=64, dkdv_stages=3, dq_block_n=128, dq_stages=2,
                           dkdv_stats_in_shared=True, dkdv_pingpong=True),
    128: HopperBackwardSpec(128, dkdv_block_n=64, dkdv_block_m=64, dkdv_stages=2, dq_block_n=128, dq_stages=2,
                            dkdv_stats_in_shared=True),
}

# Changes to SPECS timed against it on the H100 (scripts/bench_hopper_backward_gpu.py; each checked against
# float64 and for the same bits every call there). What they answer, from an ncu profile of the bf16 d=64 L=4096
# backward with the statistics in registers ("before"; H100; NOTES.md, "the Gluon backward toward cuDNN"): the
# dK/dV kernel took 2.51 of 3.8 ms at 45% tensor-pipe use, the dQ kernel 1.28 ms at 67%; in dK/dV's loop, 19% of
# the consumer warps' stall samples sat on the first use of each step's lse2 (what `dkdv_stats_in_shared`
# answers), and both groups start every step together on the same Q slot, so their exponentials leave the tensor
# cores idle at once (the ping-pong). "before" is the spec the figures above started from. sm_90 compile
# figures: compile_sm90.py --hopper-candidates (and NOTES.md).
CANDIDATES: dict[str, dict[int, dict]] = {
    "before": {64: dict(dkdv_stats_in_shared=False, dkdv_pingpong=False),
               128: dict(dkdv_stats_in_shared=False, dq_block_n=64)},
    "pingpong": {128: dict(dkdv_pingpong=True)},  # d=128: each alone 442 (ping-pong) / 447 (128-key dQ) at L=4096
    "pingpong2": {64: dict(dq_pingpong=True), 128: dict(dkdv_pingpong=True, dq_pingpong=True)},
    "defer": {64: dict(dkdv_defer_dk=True, dq_defer_dq=True), 128: dict(dq_block_n=64, dkdv_defer_dk=True,
                                                                          dq_defer_dq=True)},
    "stages": {64: dict(dkdv_stages=4), 128: dict(dkdv_stages=3)},
    # (deferred dK at d=64 only: at d=128 it spills 24-52 B; deferred dQ with 128-key steps would need 229 KB)
    "all": {64: dict(dkdv_defer_dk=True, dq_defer_dq=True, dq_pingpong=True),
            128: dict(dq_block_n=64, dq_defer_dq=True, dkdv_pingpong=True, dq_pingpong=True)},
    # A quarter of each tile's exponentials by FMA arithmetic (MUFU.EX2 a step and warp: dK/dV 32 -> 24, dQ 64 -> 48;
    # an SM sub-partition's MUFU unit takes a warp's EX2 in 8 cycles, so a warp's 32 queue for 256 while its FMA pipe
    # idles). sm_90 bf16 spills (B): d=64 0/0; d=128 dK/dV 4/4 (0/0 before), causal 16/20 and GQA 24/28 (4/4, 12/12);
    # dQ 0/0.
    "fma": {64: dict(dkdv_exp2_by_fma=1, dq_exp2_by_fma=1), 128: dict(dkdv_exp2_by_fma=1, dq_exp2_by_fma=1)},
    # The dQ kernel beside the dK/dV kernel on a second stream (the dK/dV kernel's last wave leaves SMs idle: at
    # d=128 L=4096 B=4 H=16, 2048 programs over 132 SMs, 15.5 waves)
    "concurrent": {64: dict(dq_concurrent=True), 128: dict(dq_concurrent=True)},
    # Persistent dK/dV (not causal): a tile's start and end overlap the neighbouring tiles' products. sm_90 bf16: d=64
    # 0/0 B spilled, 117 KB shared memory; d=128 84/120 B (per tile, outside the query loop), 198 KB.
    "persistent": {64: dict(dkdv_persistent=True), 128: dict(dkdv_persistent=True)},
    # Both kernels persistent (at d=128 the dQ kernel's 64-key steps: two Q/dO buffers and 128-key steps need 256 KB)
    "persistent2": {64: dict(dkdv_persistent=True, dq_persistent=True),
                    128: dict(dkdv_persistent=True, dq_persistent=True, dq_block_n=64)},
    # The above together (and at d=128 the dK/dV ping-pong, which d=64 ships): with the dQ kernel concurrent, or
    # persistent (its programs' tiles are dealt out in advance: it does not start behind another kernel).
    "combined": {64: dict(dkdv_exp2_by_fma=1, dq_exp2_by_fma=1, dkdv_persistent=True, dq_concurrent=True),
                 128: dict(dkdv_pingpong=True, dkdv_exp2_by_fma=1, dq_exp2_by_fma=1, dkdv_persistent=True,
                           dq_concurrent=True)},
    "combined2": {64: dict(dkdv_exp2_by_fma=1, dq_exp2_by_fma=1, dkdv_persistent=True, dq_persistent=True),
                  128: dict(dkdv_pingpong=True, dkdv_exp2_by_fma=1, dq_exp2_by_fma=1, dkdv_persistent=True,
                            dq_persistent=True, dq_block_n=64)},
}


def backward_spec(head_dim: int, candidate: str | None = None) -> HopperBackwardSpec:
    """SPECS' entry, or with a candidate's changes (none where the candidate names no change at this head dim)."""
    spec = SPECS[head_dim]
    if candidate is None:
        return spec
    return replace(spec, **CANDIDATES[candidate].get(head_dim, {}))
