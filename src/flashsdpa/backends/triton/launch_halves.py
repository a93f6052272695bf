"""Launcher of `halves_kernels`: float32 q, k and v (and the backward's dO) as float16 halves for the main kernels.

Each split reads its float32 tensor through its strides once and writes the
same number of bytes (two float16 halves), plus a small float32 buffer of
the powers of two that undo the scales.
"""

from __future__ import annotations

import torch
import triton

from flashsdpa.backends.base import new_output
from flashsdpa.backends.triton.direct_launch import launcher
from flashsdpa.backends.triton.halves_kernels import split_into_halves_kernel

# About this many elements a program for row-wise splits (32 rows of d=128), 16 a thread.
ROW_SPLIT_ELEMENTS = 4096
SPLIT_WARPS = 8


def split_rows_into_halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, H, R, C) float32 as (halves, unscale), each row scaled on its own (q and k; the backward's v and dO).

    halves: (B, 2H, R, C) float16, the hi halves in heads [0, H) and the lo
    halves in [H, 2H); unscale: (B, H, R) float32.
    """
    block_c = triton.next_power_of_2(x.shape[3])
    return _split(x, max(1, ROW_SPLIT_ELEMENTS // block_c), per_column=False)


def split_key_blocks_into_halves(x: torch.Tensor, block_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, H, R, C) float32 as (halves, unscale), each column of each block of `block_rows` rows scaled
    on its own (v, in the main kernel's key blocks: block_rows is its BLOCK_N).

    halves as in `split_rows_into_halves`; unscale: (B, H, ceil(R / block_rows), C) float32.
    """
    return _split(x, block_rows, per_column=True)


def _split(x: torch.Tensor, block_rows: int, per_column: bool) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads, rows, cols = x.shape
    row_blocks = -(-rows // block_rows)
    halves = new_output((batch, 2 * heads, rows, cols), torch.float16, x.device)
    unscale_shape = (batch, heads, row_blocks, cols) if per_column else (batch, heads, rows)
    unscale = new_output(unscale_shape, torch.float32, x.device)
    kernel = launcher(
        split_into_halves_kernel,
        BLOCK_R=block_rows,
        BLOCK_C=triton.next_power_of_2(cols),
        PER_COLUMN=per_column,
        num_warps=SPLIT_WARPS,
    )
    kernel((row_blocks * batch * heads,), x, halves, unscale, *x.stride(), heads, rows, cols, row_blocks)
    return halves, unscale
