"""Block shapes and launch settings of the forward kernels, as small pure functions.

Everything compiled into a forward kernel variant is chosen here from the
`KernelKey` (its variant flags included; plus the GPU's compute capability), never from sequence lengths,
batch, heads or the softmax scale, so one compiled variant serves every problem
with the same key. Run-time choices that do not recompile anything (which
kernel serves a problem, how many key splits flash decoding uses) are here too.

The 16-bit and float32 tables were chosen by timing on an H100 (sm90, 227 KB
of shared memory per block; see the comments at each table); the decode
settings and the entries marked "not measured" are still first guesses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashsdpa.backends.triton.common_configs import (
    dot_precision,
    padded_head_dim,
    shared_memory_limit,
    uses_split_products,
)
from flashsdpa.descriptor import AttentionDescriptor, Fp32Precision, KernelKey

# Query rows up to which flash decoding (split-KV) replaces the main kernel.
DECODE_MAX_SEQ_Q = 16
# Packed (query head, query row) pairs per decode program: tl.dot's smallest
# comfortable M; a GQA group with 1 query row per head (the common decode
# step) fits in one program, so K/V are read once per group.
DECODE_BLOCK_M = 16
DECODE_MAX_SPLITS = 128
# A split shorter than this reads too little to pay for its share of the merge.
DECODE_MIN_KEYS_PER_SPLIT = 256
# Splits aim at about one program per SM: on the H100 one 4-warp program
# (64-key blocks, 3 stages) per SM already reads at full bandwidth, and every
# extra split adds partial outputs and a merge launch. q (16, 32, 1, 128)
# against K/V (16, 8, S, 128) bf16, 128 programs per split (bench_forward_gpu.py
# --decode-sweep): one split read K+V at 2.59 / 2.99 / 3.09 TB/s for S = 4096
# / 16384 / 32768, two at 2.48 / 2.92 / 3.02; five (the old rule of 4
# programs per SM) read 2.38 and 2.93 at S = 4096 and 32768 (H100, 2026-11).
DECODE_PROGRAMS_PER_SM = 1


@dataclass(frozen=True)
class DecodeConfig:
    block_m: int  # packed (query head, query row) pairs per program
    block_n: int  # keys per loop step
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class ForwardConfig:
    """What a forward kernel variant compiles in (besides the KernelKey's own fields): a function of the key."""

    block_m: int  # query rows per program
    block_n: int  # keys per loop step
    num_warps: int
    num_stages: int
    # Register cap a thread (None: the compiler's choice). Lower caps let more
    # programs share an SM, whose softmax then overlaps the others' products.
    max_registers: int | None
    # tl.dot input_precision for float32 inputs; None for 16-bit inputs (the
    # tensor-core product of fp16/bf16 is exact, with float32 accumulation).
    dot_precision: str | None
    # float32 in IEEE precision: each product as three tensor-core products
    # of explicitly split operands, float16 halves the launcher splits for
    # the main kernel (halves_kernels; flash decoding multiplies in FMAs
    # instead, kernel_specs.decode_tiles); Triton's tf32x3 rounds in code
    # that spills registers on sm90. See SM90_FP32_HALVES_BLOCKS.
    split_products: bool
    # Multiply dot operands as float32: only for bfloat16 under the Triton
    # interpreter, which cannot multiply bfloat16 (triton#11584).
    widen_dot_operands: bool
    # How the main kernel moves Q/K/V/O tiles: "host" (TMA through 4-D
    # descriptors built once per launch), "device" (TMA through per-head
    # descriptors each program builds) or "pointers". The launcher falls back
    # host -> device -> pointers for tensors TMA cannot read.
    tile_loads: str
    # Warp-specialise the unmasked key loop (needs tensor descriptors on Hopper).
    warp_specialize: bool
    decode: DecodeConfig


# (block_m, block_n, num_warps, num_stages, max_registers) by padded head dim
# (the larger of E and Ev), for non-causal and causal problems.
#
# Chosen by a sweep on one H100 80GB HBM3 (bf16, 16k tokens a batch, heads =
# 2048/d, Triton 3.6, medians; same-config repeats in one run differ by up to
# 5%). TFLOP/s per L (causal L marked c):
#   d=128: 128x64 w8 s2 maxnreg 128 (two programs an SM, so one's softmax
#          overlaps the other's products): L1024 430, L4096 511, L1024c 325,
#          L4096c 440, L16384c 495. Beaten only at short causal L by 64x64 w4 s3
#          (L1024c 351, L4096c 450, but L16384c 466); 128x128 w8 s3 (one
#          program an SM): L1024 400, L4096 500, L1024c 290, L16384c 501.
#   d=64:  non-causal 128x64 w4 s3 maxnreg 168 (three programs an SM): L1024
#          396, L4096 423 (128x128 w8 s2 maxnreg 128: 379, 433); causal 64x64
#          w4 s3: L4096c 399 (128x64 w4 s3: 365).
#   d<=32 take d=64's shapes and d=256 its first guess: not measured.
#   d=512 (head dims 257-512, padded): 64x32 w8 s2, the one shape of those
#          compiled for sm_90 (compile_sm90 --d512, Triton 3.6) whose 64 x 512
#          float32 accumulator fits without spills (243-255 registers, 192 KB of
#          shared memory, window+softcap+ALiBi+sinks included). Not timed.
SM90_16BIT_BLOCKS = {
    16: {False: (128, 64, 4, 3, 168), True: (64, 64, 4, 3, None)},
    32: {False: (128, 64, 4, 3, 168), True: (64, 64, 4, 3, None)},
    64: {False: (128, 64, 4, 3, 168), True: (64, 64, 4, 3, None)},
    128: {False: (128, 64, 8, 2, 128), True: (128, 64, 8, 2, 128)},
    256: {False: (64, 64, 4, 2, None), True: (64, 64, 4, 2, None)},
    512: {False: (64, 32, 8, 2, None), True: (64, 32, 8, 2, None)},
}
# Problems with at least LONG_KEYS keys, where they differ. d=64: 128x128 w8
# s2 maxnreg 128 (H100 sweeps of 2026-11-26, kernel time, against the table's
# shapes): non-causal L=4096 419 against 402 (L=2048 395 against 396, L=1024
# 359 against 374); causal L=4096 370 against 362, L=8192 402 against 375,
# L=16384 401 against 374.
LONG_KEYS = 4096
SM90_16BIT_LONG_KEYS_BLOCKS = {64: (128, 128, 8, 2, 128)}

# float32 at full precision (the default): ForwardConfig.split_products,
# three float16 products of halves the launcher split, each block's P @ V
# product added to acc with IEEE adds. The halves take as much shared
# memory as float32 tiles. H100, d=128, L=4096 (split included), TFLOP/s:
# 128x64 w8 s2 129; 128x128 w8 s1 109, 128x32 w8 s3 105, 64x64 w4 s3 103,
# 128x64 w8 s2 maxnreg 168 101, 128x32 w8 s2 97, 64x32 w4 s3 75. Relative
# error 4.1e-7 at the default scale and 3.1e-6 at scale 10, against torch's
# own float32 7.3e-7 and 3.7e-6. (Three tf32 products of operands split in
# the kernel, before: 39 TFLOP/s at 128x32 w8 s2; error 6.0e-7 and 4.0e-6.)
# Other head dims take d=128's shape, not measured.
SM90_FP32_HALVES_BLOCKS = {
    16: (128, 64, 8, 2, None),
    32: (128, 64, 8, 2, None),
    64: (128, 64, 8, 2, None),
    128: (128, 64, 8, 2, None),
    256: (64, 32, 4, 2, None),
    512: (16, 16, 4, 2, None),  # unreachable: full-precision float32 is declined over MAX_FP32_HEAD_DIM
}
# float32 with the opt-in tf32 precision (one tf32 product): 112 TFLOP/s at
# d=128, L=4096 with 128x64 w8 s2 on the H100, relative error 1.1e-3 to 1.8e-3.
SM90_TF32_BLOCKS = {
    16: (128, 64, 8, 2, None),
    32: (128, 64, 8, 2, None),
    64: (128, 64, 8, 2, None),
    128: (128, 64, 8, 2, None),
    256: (64, 16, 4, 2, None),
    # spills 700-736 B (compile_sm90 --d512; 32x16 w4 2264 B, 32x16 w8 1892 B, 64x16 w8 s1 2372 B): not timed
    512: (16, 16, 4, 2, None),
}

# VARIANT_REGISTERS: where softcap or ALiBi transform the scores, the forward drops the tables' register
# cap. compile_sm90 --variants (bf16, sm_90, Triton 3.6): capped at 168 (d=64) and 128 (d=128), softcap
# spilled 100 bytes, ALiBi 32, all four variants 40; uncapped none, and no serialised wgmma. Not timed on
# the H100.

# Left for Triton's own scratch (barriers, reductions). Triton's own count
# for 128x128 tiles, 3 stages, d=128 bf16 is 225 KB against this estimate's
# 224 KB, so the sm90 tables (checked against Triton's count by compiling
# for sm90) pass untouched; the fit is a guard for smaller GPUs.
FORWARD_SHARED_MEMORY_HEADROOM = 2 * 1024

# Under the interpreter the block shapes are the sm90 ones divided by this (at
# least 16), so small test problems still cross several blocks and every
# loop boundary the GPU sees (the block_m / block_n ratio is kept).
INTERPRETER_BLOCK_DIVISOR = 4



def forward_shared_memory(key: KernelKey, block_m: int, block_n: int, num_stages: int) -> int:
    """Bytes of Q plus num_stages buffered K and V tiles (float32's two float16 halves: 4 bytes, as float32)."""
    itemsize = key.dtype.itemsize
    q_tiles = block_m * key.block_head_dim
    kv_tiles = num_stages * block_n * (key.block_head_dim + key.block_head_dim_v)
    return itemsize * (q_tiles + kv_tiles)


def fit_forward_blocks(key: KernelKey, blocks: tuple, limit: int) -> tuple:
    """Drop pipeline stages (down to 2), then halve block_n, then block_m (down to 16), until the tiles fit."""
    block_m, block_n, num_warps, num_stages, max_registers = blocks
    budget = limit - FORWARD_SHARED_MEMORY_HEADROOM
    while forward_shared_memory(key, block_m, block_n, num_stages) > budget:
        if num_stages > 2:
            num_stages -= 1
        elif block_n > 16:
            block_n //= 2
        elif block_m > 16:
            block_m //= 2
        else:
            break
    return block_m, block_n, num_warps, num_stages, max_registers


def choose_decode_config(key: KernelKey, interpreted: bool) -> DecodeConfig:
    # Decode is bound by reading K and V: wide key blocks keep loads long, while
    # block_n * head_dim stays near 8K elements so 3 stages fit on any sm80+.
    block_n = max(16, min(128, 8192 // padded_head_dim(key)))
    if key.dtype == torch.float32:
        block_n = max(16, block_n // 2)
    if interpreted:
        block_n = max(16, block_n // INTERPRETER_BLOCK_DIVISOR)
    return DecodeConfig(block_m=DECODE_BLOCK_M, block_n=block_n, num_warps=4, num_stages=3)


def choose_forward_config(key: KernelKey, capability: tuple[int, int] | None, long_keys: bool = False) -> ForwardConfig:
    """The forward config for `key` on a GPU of `capability` (None: the CPU interpreter); `long_keys`: the
    problem has at least LONG_KEYS keys (the block shapes may differ, see SM90_16BIT_LONG_KEYS_BLOCKS)."""
    if uses_split_products(key):
        blocks = SM90_FP32_HALVES_BLOCKS[padded_head_dim(key)]
    elif key.dtype == torch.float32 and key.fp32_precision is Fp32Precision.TF32:
        blocks = SM90_TF32_BLOCKS[padded_head_dim(key)]
    elif long_keys and padded_head_dim(key) in SM90_16BIT_LONG_KEYS_BLOCKS:
        blocks = SM90_16BIT_LONG_KEYS_BLOCKS[padded_head_dim(key)]
    else:
        blocks = SM90_16BIT_BLOCKS[padded_head_dim(key)][key.causal]
    interpreted = capability is None
    if interpreted:
        block_m, block_n, num_warps, num_stages, max_registers = blocks
        divided = (max(16, block_m // INTERPRETER_BLOCK_DIVISOR), max(16, block_n // INTERPRETER_BLOCK_DIVISOR))
        blocks = (*divided, num_warps, num_stages, None)
    else:
        blocks = fit_forward_blocks(key, blocks, shared_memory_limit(capability))
    block_m, block_n, num_warps, num_stages, max_registers = blocks
    if key.softcap or key.alibi:
        max_registers = None  # see VARIANT_REGISTERS
    # TMA exists from sm90 on; the interpreter runs the descriptor path too so CI covers it.
    tile_loads = "host" if interpreted or capability >= (9, 0) else "pointers"
    return ForwardConfig(
        block_m=block_m,
        block_n=block_n,
        num_warps=num_warps,
        num_stages=num_stages,
        max_registers=max_registers,
        dot_precision=dot_precision(key),
        widen_dot_operands=interpreted and key.dtype == torch.bfloat16,
        split_products=uses_split_products(key),
        tile_loads=tile_loads,
        # Off until measured: Triton 3.6's Hopper auto-WS has known failures
        # (triton#8260, #9728); benchmarks turn it on with dataclasses.replace.
        warp_specialize=False,
        decode=choose_decode_config(key, interpreted),
    )


def uses_decode_kernel(desc: AttentionDescriptor) -> bool:
    """Few query rows: split the keys across programs instead of the queries (flash decoding).

    Causal problems with so few rows see at most DECODE_MAX_SEQ_Q keys (top-left
    alignment), and dropout is a training feature; both stay on the main kernel.
    """
    return desc.seq_q <= DECODE_MAX_SEQ_Q and not desc.causal and desc.dropout_p == 0.0


def decode_split_count(programs_per_split: int, seq_kv: int, sm_count: int) -> int:
    """How many key ranges flash decoding splits each (batch, kv head, row chunk) into.

    A run-time choice (the split range is a kernel argument), so it may follow
    the sequence length without compiling anything.
    """
    # Rounded to nearest: 128 programs on 132 SMs is one split, not two.
    wanted = (2 * DECODE_PROGRAMS_PER_SM * sm_count + programs_per_split) // (2 * programs_per_split)
    longest_useful = -(-seq_kv // DECODE_MIN_KEYS_PER_SPLIT)
    return max(1, min(wanted, longest_useful, DECODE_MAX_SPLITS))
