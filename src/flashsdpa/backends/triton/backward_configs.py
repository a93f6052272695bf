"""Block shapes of the backward kernels, per kernel variant.

Only `KernelKey` fields (its variant flags included; and the GPU's compute capability) choose a shape, so
one choice serves every sequence length, batch, head count and scale. The
launcher asks for it once per key through `kernel_cache`.

The 16-bit d=64 and d=128 sm90 shapes were timed on the H100 (see the tables);
the others were chosen by compiling every variant offline for sm_90 with
Triton 3.6.0 (ptxas register and spill counts, Triton's shared-memory figure;
no GPU involved) and keeping shapes that fit Hopper's shared memory with no or
few register spills. Time those on the H100 and record the measurements here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from flashsdpa.backends.triton.common_configs import (
    dot_precision,
    padded_head_dim,
    shared_memory_limit,
    uses_split_products,
)
from flashsdpa.descriptor import AttentionDescriptor, GradientPrecision, KernelKey, MaskKind


@dataclass(frozen=True)
class TileShape:
    """One kernel's tile: `block_m` query rows by `block_n` key rows."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class BackwardConfig:
    preprocess_block_m: int  # rows of O and dO reduced by one preprocess program
    dkdv: TileShape  # block_n keys owned by a program; block_m query rows per loop step
    dq: TileShape  # block_m queries owned by a program; block_n keys per loop step
    # tl.dot input_precision for float32 inputs (None for 16-bit inputs).
    dot_precision: str | None
    # bfloat16 under the Triton interpreter only: dots multiply float32
    # operands (the interpreter cannot multiply bfloat16, triton#11584) and
    # P / dS are rounded to bfloat16 by hand, to nearest even like the GPU
    # (the interpreter's own float32 -> bfloat16 cast truncates).
    widen_dot_operands: bool
    # EXACT (see gradient_precision.py): the next two flags are set; ROUNDED: neither.
    # Rescale each row of P to sum to 1 and take delta = sum(P * dP) from the
    # same arithmetic (an extra Q K^T and dO V^T pass in the dQ kernel) rather
    # than rowsum(dO * O): for float32, the rounding of a float32 lse
    # (|lse| * 6e-8) would otherwise dominate the gradients' error; for 16-bit
    # inputs, O rounded to 16 bits would. With split_operands this puts
    # float16 dQ/dK at torch's float32-internal math error (CPU interpreter:
    # 2.2e-4 vs 2.2e-4; FA2-style, without either, 6.8e-4), for 5 more GEMMs on 7.
    renormalize_rows: bool
    # 16-bit inputs: P and dS reach the tensor cores as hi + lo halves (two
    # products each for dV, dK and dQ) rather than rounded once, as FA2 rounds
    # them; see backward_kernels._accumulate_product.
    split_operands: bool
    # float32 at full precision: q, k, v and dO split into float16 halves
    # once per call (launch_halves), P and dS split in the kernels, three
    # float16 products per product (backward_kernels._accumulate_product).
    fp16_halves: bool = False
    # How the dK/dV kernel reads the Q and dO tiles it streams: "pointers"
    # (masked loads) or "host" (TMA through 4-D descriptors the launcher
    # builds, where both tensors qualify; sm90+).
    dkdv_tile_loads: str = "pointers"
    # The dK/dV kernel issues dP^T = V dO^T right after S^T = K Q^T, before the
    # softmax needs S^T: the tensor cores run it while exp2 runs (Triton waits
    # for every pending product before elementwise work otherwise). Costs the
    # registers of dP^T during the softmax.
    dkdv_early_dp: bool = False
    # A packed batch (varlen): the dQ and dK/dV grids take the sequences in decreasing order of work (query
    # count times key count, sorted on the device per call), so the longest sequences' programs, the longest
    # of all, start first rather than trail at the end of the grid (the bench's lengths 1..8192 in their
    # given order: the grid's last wave ran ~8% past an even split, in a list-scheduling model of 132 SMs).
    packed_longest_first: bool = False
    # dV from its own launch of the dK/dV kernel (COMPUTE_DK off) with this tile, `dkdv` then computing dK
    # alone; None: one launch computes both. Each launch holds one float32 accumulator rather than two (dV
    # needs only P, dK needs dS as well), so its tile can be larger; the cost is S^T = K Q^T computed twice.
    dv: TileShape | None = None
    # With renormalize_rows: the dQ kernel's row pass in a launch of its own with this tile (block_m queries,
    # block_n keys a step), the dQ launch then reading its row scales and delta; None: the dQ launch makes
    # the pass itself. Alone, the pass holds no dQ accumulator, so its tile can be wider.
    rows: TileShape | None = None


# (block_m, block_n, num_warps, num_stages) by padded head dim (the larger of
# E and Ev), for sm90. d=64 and d=128 16-bit shapes are the fastest of a
# quick sweep on the H100 (bf16, L=4096, non-causal, default precision; whole
# backward TFLOP/s, one kernel's tile varied at a time, the other at its old
# shape); the rest come from offline sm_90 compiles (registers, spills).
#
# dK/dV program: K and V tiles stay in shared memory for the program's life
# and Q/dO tiles stream through num_stages buffers; the two fp32
# accumulators (block_n x d each) set the register budget, so block_n * d
# shrinks as d grows. block_m 16 at d=128: 32 spills (24-280 bytes of stack
# with causal, float mask or dropout).
SM90_16BIT_DKDV = {
    64: (32, 128, 4, 2),  # 159 TFLOP/s (32x128 w8: 132, 64x128 w8: 143, 32x64 w4: 139)
    128: (64, 128, 8, 2),  # 175 (16x128 w8: 141, 32x64 w4: 174, 32x128 w8: 164)
    256: (16, 64, 8, 2),  # 96-98 KB; spills 0-24 B, 128-144 B with causal and a mask or dropout
    # 131 KB, no spill (compile_sm90 --d512: 32x16 w8 s2 spilled 8-40 B with causal or a mask, 16x16 w4
    # 20-692 B, 16x32 w8 12-868 B; 64x16 w8 s1 none, but 224 KB of shared memory). Not timed.
    512: (32, 16, 8, 1),
}
# dQ program: Q, dO and one fp32 accumulator (block_m x d) stay; K/V stream.
SM90_16BIT_DQ = {
    64: (128, 64, 4, 2),  # 138 (128x64 w8: 134; 64x64 w4, 128x32: 135-136)
    128: (64, 64, 4, 2),  # 163 (128x32 w8: 144, 128x64 w8: 164, 128x64 w4: 107)
    256: (64, 32, 8, 2),  # 128-136 KB; spills 40 B only with causal and a mask
    # 99 KB, no spill (64x16 w8 s1: 2.6-15 KB, 32x16 w4: 28-164 B, 32x32 w8: 48-56 B). Not timed.
    512: (32, 16, 8, 2),
}
# ROUNDED precision (16-bit inputs where torch would run a fused kernel):
# fewer products and no row pass, so the tiles differ. From a sweep on the
# H100 (2026-11, BENCHMARKS.md: bf16, L=4096, non-causal, whole backward TFLOP/s with one
# kernel's tile varied, the other at the EXACT table's shape; d=256 at B=4 H=8).
SM90_16BIT_ROUNDED_DKDV = {
    64: (128, 64, 4, 2),  # 333 (32x128 w4 s3: 311, 64x64 w4: 275, 64x128 w8: 253)
    128: (64, 128, 8, 2),  # 354 (64x64 w4: 336, 32x64 w4 s3: 336, 128x64 w8: 204)
    256: (64, 64, 8, 2),  # 161 (32x64 w8: 139, 64x64 w8 s1: 131, the EXACT table's 16x64 w8: 107)
    512: (32, 16, 8, 1),  # the EXACT table's (no spill): not timed
}
# Non-causal d=128 streams Q/dO three stages deep since the row statistics
# load unmasked (H100, 2026-11-26, whole backward with TMA loads and early dP):
# L=4096 407.8 (s2) -> 417.0 (s3), L=1024 313.8 -> 342.1; causal L=16384
# stays at s2 (404.7 against 380.9).
SM90_16BIT_ROUNDED_DKDV_NONCAUSAL = {**SM90_16BIT_ROUNDED_DKDV, 128: (64, 128, 8, 3)}
# 16-bit dK/dV where the score transform or a window's edges run (softcap, ALiBi, a
# window): compile_sm90 --variants (bf16, sm_90, Triton 3.6) spilled 300 (window),
# 440 (softcap) and 1924 (all four) bytes with the d=64 128x64 w4 tile, 36-320
# with the d=128 64x128 w8 ones; 64x64 (w4 at d=64, w8 at d=128) spilled none.
# Not timed on the H100 (the plain 64x64 w4 ran at 275 / 336 TFLOP/s against the
# tables' 333 / 354).
SM90_16BIT_VARIANT_DKDV = {64: (64, 64, 4, 2), 128: (64, 64, 8, 2)}
# 16-bit ROUNDED packed batches (varlen) by padded head dim: (dK/dV tile, dQ tile). compile_sm90 (VARLEN, bf16,
# sm_90, Triton 3.6, equal heads and GQA's split group; registers causal / not; REPL: the product's warps cover
# more than its tile, see compile_sm90.replicated_products):
#   d=128 dK/dV: 32x128 w8 s2 (252 / 236, no spill), s3 (254 / 238); 64x64 w8 s2 (241 / 208, no spill, but
#         REPL: its 64 keys are the rows of S^T = K Q^T and dP^T, which both warp groups of 8 warps compute
#         whole, softmax included: 483 SASS instructions and 40 HGMMA a 64x64 step against 282 and 20 for
#         32x128's step of the same area); spilled: 64x128 w8 s2 124 / 16 B (the dense table's), 64x64 w4
#         284 / 36 B, 32x128 w4 1.4 KB. Without the early dP^T product, 32x128 w8 s2: 248 / 232.
#   d=128 dQ: 128x64 w8 s2 (237 / 227), 128x32 w8 s3 (174), 128x32 w8 s4 (174), 64x32 w4 s3 (185 / 176);
#         64x64 w8 s3 REPL; spilled: 128x64 w8 s3 12 B causal (the dense table's), 128x32 w4 s3 176 B,
#         64x64 w4 s3 12 B causal.
#   d=64 dK/dV: 64x64 w4 s2 (222 / 197), 64x128 w8 s2 (216 / 199); spilled: 128x64 w4 (the dense table's)
#         216 / 100 B, 32x128 w4 s3 88 / 32 B.
#   d=64 dQ: 64x64 w4 s3 (161 / 148, the dense table's), 128x64 w8 s3 (134 / 128), 128x32 w8 s3 (122 / 112).
# H100 (bench varlen rows, lengths 1..8192, causal, B=10, H=16, whole backward against torch's varlen_attn;
# 2026-12-05, call 1): d=128 229 / 269 TFLOP/s (0.85x) with 64x64 w8 s2 (REPL) and 128x32 w8 s3; d=64 300 / 231
# (1.30x) with 64x64 w4 s2 and 64x64 w4 s3. The candidates (scripts/bench_varlen_backward_gpu.py, the same
# rows, longest sequences first; call 4): d=128 32x128 w8 s3 / 128x32 w8 s3 328 TFLOP/s (1.24x torch's 264),
# 32x128 w8 s2 / 128x64 w8 s2 307 (1.16x), 32x128 w8 s2 / 128x32 w8 s4 309, 64x64 w8 s2 / 128x32 w8 s3 229
# (0.87x); d=64 64x64 w4 s2 / 64x64 w4 s3 310-314 (1.32-1.34x torch's 235).
SM90_16BIT_PACKED_ROUNDED = {
    64: ((64, 64, 4, 2), (64, 64, 4, 3)),
    128: ((32, 128, 8, 3), (128, 32, 8, 3)),
}
# The packed grids' sequence order (BackwardConfig.packed_longest_first) on the GPU; timed by the same script.
SM90_PACKED_LONGEST_FIRST = True
# 16-bit dK/dV of a packed batch with dropout at d=128: SM90_16BIT_VARIANT_DKDV's 64x64 w8 tile spilled 28 B causal and
# serialised its wgmma (compile_sm90 --packed, bf16, sm_90); 64x32 w8 s2 none, 172 registers (32x64 w8:
# SERIAL; 64x64 w8 s1: 144 B; 64x64 w4: 208 B). Not timed.
SM90_16BIT_PACKED_DROPOUT_DKDV = {128: (64, 32, 8, 2)}
# 16-bit dQ of a packed batch (varlen) at d=128: the table's 128x64 w8 tile spilled 12 B causal (compile_sm90
# --packed, bf16, sm_90, Triton 3.6); 128x32 w8 s3 none at 175-241 registers (64x64 w4 spilled 12-104 B,
# 64x64 w8 and 64x32 w4 none at up to 255 / 226). Where it runs (EXACT, and ROUNDED with softcap, ALiBi, a
# window or dropout) not timed; the same tile is SM90_16BIT_PACKED_ROUNDED's d=128 dQ, timed there.
SM90_16BIT_PACKED_DQ = {128: (128, 32, 8, 3)}
SM90_16BIT_ROUNDED_DQ = {
    64: (64, 64, 4, 3),  # 320 (128x64 w8: 319, 128x32 w8 s3: 312, 128x128 w8 s3: 303)
    128: (128, 64, 8, 3),  # 375 (128x128 w8: 363, 128x32 w4 s3: 353, 64x64 w4: 352)
    256: (64, 64, 4, 2),  # 133 (128x32 w8: 132, 64x32 w4 s1: 130, the EXACT table's 64x32 w8: 108)
    512: (32, 16, 8, 2),  # the EXACT table's (no spill): not timed
}
# float32 with fp32_precision="tf32" (one tf32 product per dot). Shapes from
# offline compiles of split tf32 (tf32x3, three products per dot; not re-swept
# for one product). The dQ kernel's extra row pass (renormalize_rows)
# holds two more score-sized tiles, hence its smaller tiles than the 16-bit ones.
SM90_FP32_DKDV = {
    64: (32, 64, 8, 2),  # 96-104 KB; spills 0-16 B, 120-384 B with causal and a mask or dropout
    128: (16, 32, 4, 1),  # 80 KB; spills 240-376 B
    256: (16, 16, 4, 1),  # 96 KB; spills 448-840 B
    512: (16, 16, 8, 1),  # tf32 only (full precision is declined over 128); spills 20-36 B (w4: 736-1148)
}
SM90_FP32_DQ = {
    64: (64, 32, 4, 2),  # 96-104 KB; no spill (float mask 48-72 B)
    128: (16, 32, 4, 1),  # 48 KB; no spill (32 x 32 spilled 1.2 KB)
    256: (16, 16, 8, 1),  # 80 KB; spills 650-850 B (4 warps: 1.6-2.4 KB)
    512: (16, 16, 8, 1),  # tf32 only; spills 1424-1448 B (w4: 1732-1764)
}
# float32 at full precision (fp16_halves; head dims to 128, see TritonBackend's
# supports): offline sm_90 compiles only (Triton 3.6, 2026-12-05; registers,
# spills, and whether the products became wgmma or mma.sync), not yet timed.
# Each product is three float16 products and each P / dS product adds a
# float32 tile live beside its accumulator (IEEE adds), so the tiles are
# smaller than the 16-bit EXACT ones at d=128.
SM90_FP32_HALVES_DKDV = {
    64: (32, 128, 8, 2),  # 99 KB; no spill, wgmma (64x64 w8: 8 B causal; 32x128 w4: 1-1.8 KB)
    # 103 KB; wgmma; spills 4 B, 260 B causal. No spill: 32x32 w8 s2 (70 KB) and 16x32 w4,
    # but their 32-key blocks run mma.sync; 32x64 w8 spills 228-756 B, 64x64 w8 0.5-1.1 KB.
    128: (16, 64, 8, 2),
}
SM90_FP32_HALVES_DQ = {
    64: (128, 64, 8, 2),  # 132 KB; no spill, wgmma (64x64 w4 / w8 and 128x32 w8: no spill either)
    128: (128, 32, 8, 2),  # 197 KB; no spill, wgmma (64x32 w4: 96 B, 64x64 w8: 244-264 B, 128x64 w8: 332-428 B)
}
# dV in its own launch (BackwardConfig.dv) for float32 at full precision, by padded head dim; the dK/dV
# table's tile then computes dK alone. Offline sm_90 compiles (Triton 3.6, d=128, plain / causal; registers,
# spill bytes): the fused 16x64 w8 tile computes each 64-key product in both warp groups (compile_sm90's
# REPL), and no fused tile of 128 keys or of 64 keys at 4 warps fits (16x128 w8: 676 B of spills, 32x64 w4:
# 884 B); apart, dK alone at 32x128 w8 s2 takes 216 registers and dV alone 207, neither spilling or REPL.
SM90_FP32_HALVES_DV: dict[int, tuple[int, int, int, int]] = {}
# The dQ kernel's row pass in its own launch (BackwardConfig.rows) for float32 at full precision, by padded
# head dim: without the dQ accumulator beside it, its step can take more keys than the dQ tile's.
SM90_FP32_HALVES_ROWS: dict[int, tuple[int, int, int, int]] = {}

# Shared memory Triton needs beyond the operand tiles (layout conversions, reductions).
BACKWARD_SHARED_MEMORY_HEADROOM = 16 * 1024


def backward_config(
    key: KernelKey,
    capability: tuple[int, int] | None,
    precision: GradientPrecision = GradientPrecision.EXACT,
    packed: bool = False,
) -> BackwardConfig:
    """The shapes for `key` on a GPU of `capability` (None: the CPU interpreter), at `precision`, for a
    `packed` batch (varlen) or not.

    float32 is computed EXACT whatever `precision` says (gradient_precision.py). A packed batch's float32
    takes the kernels' tf32x3 products, not float16 halves, as the packed forward does: the halves' row
    unscales are indexed by batch, and a packed batch's sequences share one batch row.
    """
    if precision is GradientPrecision.AUTO:
        raise ValueError("backward_config: resolve GradientPrecision.AUTO first (gradient_precision.at_backward)")
    exact = precision is GradientPrecision.EXACT or key.dtype == torch.float32
    if capability is None:
        return interpreter_config(key, exact, packed)
    return cuda_config(key, capability, exact, packed)


def interpreter_config(key: KernelKey, exact: bool, packed: bool = False) -> BackwardConfig:
    # Every program is run by numpy, so small tiles keep tests fast, and they
    # make the short sequences used in tests span several blocks. block_m !=
    # block_n in each kernel on purpose: the causal block arithmetic must not
    # assume square tiles. 16 is tl.dot's minimum.
    # 16-bit problems take the dK/dV kernel's TMA loads and early dP (the H100's
    # d=128 path), float32 the plain ones, so the tests run both.
    sixteen_bit = key.dtype != torch.float32
    halves = uses_split_products(key) and not packed
    return BackwardConfig(
        preprocess_block_m=16,
        dkdv=TileShape(block_m=16, block_n=32, num_warps=4, num_stages=1),
        dq=TileShape(block_m=32, block_n=16, num_warps=4, num_stages=1),
        # float32: dV and the row pass in launches of their own, on tiles of their own (as the sm90 tables do)
        dv=TileShape(block_m=32, block_n=16, num_warps=4, num_stages=1) if halves else None,
        rows=TileShape(block_m=16, block_n=32, num_warps=4, num_stages=1) if halves else None,
        dot_precision=dot_precision(key),
        widen_dot_operands=key.dtype == torch.bfloat16,
        renormalize_rows=exact,
        split_operands=exact and sixteen_bit,
        fp16_halves=halves,
        dkdv_tile_loads="host" if sixteen_bit else "pointers",
        dkdv_early_dp=sixteen_bit,
        packed_longest_first=packed,
    )


def cuda_config(key: KernelKey, capability: tuple[int, int], exact: bool, packed: bool = False) -> BackwardConfig:
    fp32 = key.dtype == torch.float32
    table_key = max(64, padded_head_dim(key))
    halves = fp32 and uses_split_products(key) and not packed
    dv = rows = None
    if halves:
        dkdv_table, dq_table = SM90_FP32_HALVES_DKDV, SM90_FP32_HALVES_DQ
        if table_key in SM90_FP32_HALVES_DV:
            dv = TileShape(*SM90_FP32_HALVES_DV[table_key])
        if table_key in SM90_FP32_HALVES_ROWS:
            rows = TileShape(*SM90_FP32_HALVES_ROWS[table_key])
    elif fp32:
        dkdv_table, dq_table = SM90_FP32_DKDV, SM90_FP32_DQ
    elif exact:
        dkdv_table, dq_table = SM90_16BIT_DKDV, SM90_16BIT_DQ
    else:
        dkdv_table = SM90_16BIT_ROUNDED_DKDV if key.causal else SM90_16BIT_ROUNDED_DKDV_NONCAUSAL
        dq_table = SM90_16BIT_ROUNDED_DQ
    dkdv = TileShape(*dkdv_table[table_key])
    dq = TileShape(*dq_table[table_key])
    # Softcap, ALiBi, a window's edge, or a packed batch (compile_sm90 --packed, bf16: the tables' tiles
    # spilled 16 B at d=128 and 100 B at d=64, plain; 64x64 none).
    transformed_or_windowed = key.softcap or key.alibi or windowed(key)
    if not fp32 and table_key in SM90_16BIT_VARIANT_DKDV and (transformed_or_windowed or packed):
        dkdv = TileShape(*SM90_16BIT_VARIANT_DKDV[table_key])
    if not fp32 and packed:
        rounded = not exact and table_key in SM90_16BIT_PACKED_ROUNDED
        # The ROUNDED table's dK/dV tile takes the score transforms and windows too (compile_sm90, d=128 32x128
        # w8 s2 with softcap, ALiBi, a window, all four: no spill, 238-255 registers); its dQ tile was compiled
        # for plain problems only. Dropout keeps its tile (32x128 w8 serialised its wgmma, causal).
        if rounded and not key.dropout:
            dkdv = TileShape(*SM90_16BIT_PACKED_ROUNDED[table_key][0])
        if rounded and not (transformed_or_windowed or key.dropout):
            dq = TileShape(*SM90_16BIT_PACKED_ROUNDED[table_key][1])
        elif table_key in SM90_16BIT_PACKED_DQ:
            dq = TileShape(*SM90_16BIT_PACKED_DQ[table_key])
        if key.dropout and table_key in SM90_16BIT_PACKED_DROPOUT_DKDV:
            dkdv = TileShape(*SM90_16BIT_PACKED_DROPOUT_DKDV[table_key])
    budget = shared_memory_limit(capability) - BACKWARD_SHARED_MEMORY_HEADROOM
    # H100, whole backward, bf16 L=4096 (d=128 L=16384 causal): TMA loads and
    # early dP in the dK/dV kernel took ROUNDED d=128 from 372 to 385 TFLOP/s
    # (377 -> 386), d=256 from 230 to 252; each alone gave -2..+2%. At d=64
    # both cost 1-3%. EXACT d=128: early dP 202 -> 208 (TMA not timed).
    wide_16bit = not fp32 and table_key >= 128
    return BackwardConfig(
        preprocess_block_m=preprocess_block_m(key),
        dkdv=fit_backward_tile(dkdv, lambda tile: dkdv_shared_memory(key, tile), budget),
        dq=fit_backward_tile(dq, lambda tile: dq_shared_memory(key, tile), budget),
        dot_precision=dot_precision(key),
        widen_dot_operands=False,
        renormalize_rows=exact,
        split_operands=exact and not fp32,
        fp16_halves=halves,
        dkdv_tile_loads="host" if wide_16bit and not exact and capability >= (9, 0) else "pointers",
        dkdv_early_dp=wide_16bit,
        packed_longest_first=packed and SM90_PACKED_LONGEST_FIRST,
        dv=None if dv is None else fit_backward_tile(dv, lambda tile: dkdv_shared_memory(key, tile), budget),
        rows=None if rows is None else fit_backward_tile(rows, lambda tile: dq_shared_memory(key, tile), budget),
    )


def windowed(key: KernelKey) -> bool:
    """Whether the key's band has a window's edge: a lower bound, or an upper one without causal (in the
    canonical form `validation.check_variants` gives, causal leaves a window no right side)."""
    return key.bounded_below or (key.bounded_above and not key.causal)


def block_widths(key: KernelKey) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_DV): the padded head dims the main backward kernels tile with.

    float32 pads both to the wider one: Triton 3.6's tf32x3 dK/dV kernel made
    an illegal address on the H100 with widths 16 and 64 (E=64/Ev=8 and
    E=16/Ev=40), while equal widths, and tf32 products, ran. The float16
    halves products pad the same way (unequal widths not tried on a GPU).
    """
    if key.dtype == torch.float32:
        width = max(key.block_head_dim, key.block_head_dim_v)
        return width, width
    return key.block_head_dim, key.block_head_dim_v


def preprocess_block_m(key: KernelKey) -> int:
    # delta = rowsum(dO * O) is bandwidth bound: about 8K elements of each
    # tensor per program keeps both tiles in registers at 4 warps (64 fp32
    # values per thread per tensor) even at head dim 256.
    return max(16, min(128, 8192 // key.block_head_dim_v))


def dkdv_shared_memory(key: KernelKey, tile: TileShape) -> int:
    """Bytes of the dK/dV kernel's operand tiles: K and V resident, Q and dO (and mask) per stage.

    Without a mask this matches Triton's own figure for sm_90 compiles within
    1 KB (masks are over-counted); a float32 element is 4 bytes as float32 or
    as two float16 halves.
    """
    width = sum(block_widths(key))
    resident = tile.block_n * width * _element_bytes(key)
    per_stage = tile.block_m * width * _element_bytes(key) + _mask_tile_bytes(key, tile)
    return resident + tile.num_stages * per_stage


def dq_shared_memory(key: KernelKey, tile: TileShape) -> int:
    """Bytes of the dQ kernel's operand tiles: Q and dO resident, K and V (and mask) per stage."""
    width = sum(block_widths(key))
    resident = tile.block_m * width * _element_bytes(key)
    per_stage = tile.block_n * width * _element_bytes(key) + _mask_tile_bytes(key, tile)
    return resident + tile.num_stages * per_stage


def fit_backward_tile(tile: TileShape, shared_memory, budget: int) -> TileShape:
    """`tile`, with fewer stages, then smaller blocks, until shared_memory(tile) <= budget.

    A no-op on sm90 for the tables above; it matters on GPUs with less
    shared memory (sm86/sm89: 99 KB).
    """
    while shared_memory(tile) > budget:
        if tile.num_stages > 1:
            tile = replace(tile, num_stages=tile.num_stages - 1)
        elif tile.block_m >= tile.block_n and tile.block_m > 16:
            tile = replace(tile, block_m=tile.block_m // 2)
        elif tile.block_n > 16:
            tile = replace(tile, block_n=tile.block_n // 2)
        else:
            break  # the smallest tile; let Triton report it if even that does not fit
    return tile


def _element_bytes(key: KernelKey) -> int:
    return 4 if key.dtype == torch.float32 else 2


def _mask_tile_bytes(key: KernelKey, tile: TileShape) -> int:
    # A mask with distinct rows streams one (block_m x block_n) tile per
    # step. A float mask's dtype is not in the key: count float32, the widest.
    if key.mask is MaskKind.NONE or key.mask_rows_broadcast:
        return 0
    return tile.block_m * tile.block_n * (4 if key.mask is MaskKind.FLOAT else 1)
