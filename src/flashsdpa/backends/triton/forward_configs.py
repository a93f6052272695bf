"""Block shapes and launch settings of the forward kernels, as small pure functions.

Everything compiled into a forward kernel variant is chosen here from the
`KernelKey` (plus the GPU's compute capability), never from sequence lengths,
batch, heads or the softmax scale, so one compiled variant serves every problem
with the same key. Run-time choices that do not recompile anything (which
kernel serves a problem, how many key splits flash decoding uses) are here too.

The tables are first guesses for an H100 (sm90, 227 KB of shared memory per
block), written before any measurement on it: every entry is a place to tune.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
# Programs per SM the split count aims for: a memory-bound program of 4 warps
# does not saturate an SM's share of HBM bandwidth alone.
DECODE_PROGRAMS_PER_SM = 4


@dataclass(frozen=True)
class DecodeConfig:
    block_m: int  # packed (query head, query row) pairs per program
    block_n: int  # keys per loop step
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class ForwardConfig:
    """What a forward kernel variant compiles in (besides the KernelKey's own fields)."""

    block_m: int  # query rows per program
    block_n: int  # keys per loop step
    num_warps: int
    num_stages: int
    # tl.dot input_precision for float32 inputs; None for 16-bit inputs (the
    # tensor-core product of fp16/bf16 is exact, with float32 accumulation).
    dot_precision: str | None
    # Multiply dot operands as float32: only for bfloat16 under the Triton
    # interpreter, which cannot multiply bfloat16 (triton#11584).
    widen_dot_operands: bool
    # Load Q/K/V and store O through device-side tensor descriptors (TMA on
    # sm90+) when the tensors qualify; the launcher falls back to pointers otherwise.
    tensor_descriptors: bool
    # Warp-specialise the unmasked key loop (needs tensor descriptors on Hopper).
    warp_specialize: bool
    decode: DecodeConfig


# (block_m, block_n, num_warps, num_stages) for 16-bit inputs, by padded head
# dim (the larger of E and Ev). Not yet measured. Why these: 128 query rows
# amortise each K/V tile over enough MMA work to stay compute-bound on H100
# (~295 FLOP/byte ridge, with L2 reuse across the m-blocks of a head).
# d<=64: one warpgroup, a 128x64 fp32 score tile is 64 registers a thread
# (block_n stays <= head dim, as Triton's Hopper tutorial asserts). d=128:
# 8 warps (two wgmma warpgroups) halve the per-thread score and accumulator
# registers; block_n 64 lets 3 stages of K and V fit beside Q in shared memory.
# d=256 halves block_m to keep the fp32 accumulator at 128 registers a thread.
SM90_16BIT_BLOCKS = {
    16: (128, 64, 4, 3),
    32: (128, 64, 4, 3),
    64: (128, 64, 4, 3),
    128: (128, 64, 8, 3),
    256: (64, 64, 4, 2),
}

# float32 inputs: tiles take twice the bytes and tf32x3 triples the MMA work
# (this path is for accuracy, not speed), so blocks shrink to keep the operands
# in shared memory and the accumulators out of spills. Not yet measured.
SM90_FP32_BLOCKS = {
    16: (64, 64, 4, 3),
    32: (64, 64, 4, 3),
    64: (64, 64, 4, 3),
    128: (64, 32, 4, 3),
    256: (64, 16, 4, 2),
}

# Shared memory a block may use, by compute capability (CUDA's documented
# maxima for opt-in dynamic shared memory).
SHARED_MEMORY_BYTES = {(9, 0): 227 * 1024, (8, 0): 163 * 1024, (8, 7): 163 * 1024}
SHARED_MEMORY_BYTES_DEFAULT = 99 * 1024  # sm86, sm89 and others
# Left for Triton's own scratch (layout conversions, reductions, barriers).
SHARED_MEMORY_HEADROOM = 16 * 1024

# Under the interpreter the block shapes are the sm90 ones divided by this (at
# least 16), so small test problems still cross several blocks and every
# loop boundary the GPU sees (the block_m / block_n ratio is kept).
INTERPRETER_BLOCK_DIVISOR = 4


def padded_head_dim(key: KernelKey) -> int:
    return max(key.block_head_dim, key.block_head_dim_v)


def dot_precision(key: KernelKey) -> str | None:
    if key.dtype != torch.float32:
        return None
    if key.fp32_precision is Fp32Precision.TF32:
        return "tf32"
    # tf32x3 (split-precision tensor cores) keeps float32 accuracy on the GPU;
    # the interpreter computes dots in numpy, where "ieee" is the exact product.
    return "tf32x3" if key.device_type == "cuda" else "ieee"


def shared_memory_limit(capability: tuple[int, int]) -> int:
    if capability >= (9, 0):
        return SHARED_MEMORY_BYTES[(9, 0)]
    return SHARED_MEMORY_BYTES.get(capability, SHARED_MEMORY_BYTES_DEFAULT)


def forward_shared_memory(key: KernelKey, block_m: int, block_n: int, num_stages: int) -> int:
    """Bytes of Q plus num_stages buffered K and V tiles (the main kernel's shared-memory bulk)."""
    itemsize = key.dtype.itemsize
    q_tile = block_m * key.block_head_dim
    kv_tiles = num_stages * block_n * (key.block_head_dim + key.block_head_dim_v)
    return itemsize * (q_tile + kv_tiles)


def fit_shared_memory(key: KernelKey, blocks: tuple[int, int, int, int], limit: int) -> tuple[int, int, int, int]:
    """Drop pipeline stages (down to 2), then halve block_n, then block_m (down to 16), until the tiles fit."""
    block_m, block_n, num_warps, num_stages = blocks
    budget = limit - SHARED_MEMORY_HEADROOM
    while forward_shared_memory(key, block_m, block_n, num_stages) > budget:
        if num_stages > 2:
            num_stages -= 1
        elif block_n > 16:
            block_n //= 2
        elif block_m > 16:
            block_m //= 2
        else:
            break
    return block_m, block_n, num_warps, num_stages


def choose_decode_config(key: KernelKey, interpreted: bool) -> DecodeConfig:
    # Decode is bound by reading K and V: wide key blocks keep loads long, while
    # block_n * head_dim stays near 8K elements so 3 stages fit on any sm80+.
    block_n = max(16, min(128, 8192 // padded_head_dim(key)))
    if key.dtype == torch.float32:
        block_n = max(16, block_n // 2)
    if interpreted:
        block_n = max(16, block_n // INTERPRETER_BLOCK_DIVISOR)
    return DecodeConfig(block_m=DECODE_BLOCK_M, block_n=block_n, num_warps=4, num_stages=3)


def choose_forward_config(key: KernelKey, capability: tuple[int, int] | None) -> ForwardConfig:
    """The forward config for `key` on a GPU of `capability` (None: the CPU interpreter)."""
    table = SM90_FP32_BLOCKS if key.dtype == torch.float32 else SM90_16BIT_BLOCKS
    blocks = table[padded_head_dim(key)]
    interpreted = capability is None
    if interpreted:
        block_m, block_n, num_warps, num_stages = blocks
        divided = (max(16, block_m // INTERPRETER_BLOCK_DIVISOR), max(16, block_n // INTERPRETER_BLOCK_DIVISOR))
        blocks = (*divided, num_warps, num_stages)
    else:
        blocks = fit_shared_memory(key, blocks, shared_memory_limit(capability))
    block_m, block_n, num_warps, num_stages = blocks
    # TMA exists from sm90 on; the interpreter runs the descriptor path too so CI covers it.
    tensor_descriptors = interpreted or capability >= (9, 0)
    return ForwardConfig(
        block_m=block_m,
        block_n=block_n,
        num_warps=num_warps,
        num_stages=num_stages,
        dot_precision=dot_precision(key),
        widen_dot_operands=interpreted and key.dtype == torch.bfloat16,
        tensor_descriptors=tensor_descriptors,
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
    wanted = -(-DECODE_PROGRAMS_PER_SM * sm_count // programs_per_split)
    longest_useful = -(-seq_kv // DECODE_MIN_KEYS_PER_SPLIT)
    return max(1, min(wanted, longest_useful, DECODE_MAX_SPLITS))
