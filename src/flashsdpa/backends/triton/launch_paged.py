"""Launcher of flash decoding over a KV cache (paged_kernels): argument plumbing and split choice.

`paged_decode(desc, ...)` runs `kvcache_attention`'s attention on the triton
backend. `desc` (from `kvcache.cache_descriptor`) describes the problem with the
cache's capacity as its key count: everything the launch decides on the host
follows from it and from tensor shapes, never from a tensor's values
(cache_seqlens and block_table are read by the kernel), so one launch serves
every decode step and replays from a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from flashsdpa.backends.base import AttentionInputs, new_output
from flashsdpa.backends.triton import paged_kernels
from flashsdpa.backends.triton.direct_launch import launcher
from flashsdpa.backends.triton.forward_configs import DECODE_MAX_SPLITS, DecodeConfig, choose_forward_config, \
    decode_split_count  # fmt: skip
from flashsdpa.backends.triton.kernel_specs import fixed_page_size, paged_decode_spec
from flashsdpa.backends.triton.launch_common import MAX_GRID_X, MAX_GRID_YZ, cdiv, device_capability, \
    host_descriptor, host_descriptor_strides, on_device, score_arguments, sm_count  # fmt: skip
from flashsdpa.backends.triton.launch_forward import kernel_query, kernel_scale, merge_launcher
from flashsdpa.cache import kernel_cache
from flashsdpa.descriptor import AttentionDescriptor
from flashsdpa.visibility import Visibility

Tensor = torch.Tensor
# Warps per program of the "rows" layout (PAGED_LAYOUTS): flash decoding's tiles
# (forward_configs.choose_decode_config) with 8 warps, not 4. With
# 4, the per-key row addresses of a paged cache cost registers: compile_sm90 --paged (bf16, sm_90, Triton
# 3.6, pages of 16 keys, page numbers read a block ahead) takes 146-196 registers and spills 4 bytes with
# softcap+ALiBi+sinks at d=128; with 8, 98-141 at d=128 and no spills.
# Timed on one H100 80GB (scripts/sweep_paged_gpu.py, 2026-12-05, bf16 B=16 Hq/Hkv=32/8 d=128, one query
# row, S=16384, pages of 16, medians of 15 calls timed one after another, ~8% run-to-run drift; torch
# flash 0.367 ms): these tiles (64 keys, 8 warps, 3 stages, one split) 0.382 ms; 4 warps x 128 keys x 3
# stages 0.371 (255 registers, 4-12 B spilled with a window or softcap+ALiBi+sinks), 8 x 64 x 4 0.380, 4 x
# 64 x 4 0.382, 8 x 128 x 3 0.383; two splits at best 0.373 (4 x 128 x 2, 4 x 32 x 4), four or more
# 0.40-0.46; 1 or 2 warps 0.38-0.84 with 2-4 splits. Over S = 4k-128k the 4 x 128 x 3 tiles read 0-6%
# more than these (pages of 16 and 256), within the drift: these stay.
PAGED_DECODE_WARPS = 8
# Packed rows per program: flash decoding's 16 (a GQA group's heads at one query row each), or for 16-bit
# inputs this many where a kv head's group has more rows (chunked prefill, speculative decoding), so that
# a program reads its keys once for 64 rows rather than 16, in blocks of at most 64 keys. compile_sm90
# --paged (bf16, sm_90, 8 warps): 154-176 registers at d=128, no spills; d=64 with 128-key blocks took
# 255 registers. float32 keeps 16 rows (its FMA products, `kernel_specs.decode_tiles`, are not compiled for 64).
PAGED_MANY_ROWS_BLOCK_M = 64
PAGED_MANY_ROWS_BLOCK_N = 64


@dataclass(frozen=True)
class PagedTiles(DecodeConfig):
    """A paged decode program's shape: flash decoding's tiles, plus the key slices (paged_kernels' doc: 1,
    or num_warps warps each on its own slice of every key block, block_n // key_slices >= 16 keys), the head
    slices (1, or num_warps warps each on its own kv head of that many), the programs per SM that the split
    count aims at (forward_configs.decode_split_count on that many SMs) and whether a block's page numbers
    are read an iteration ahead (1) or in its own (0: PagedDecodeKernelSpec.page_lookahead)."""

    key_slices: int = 1
    head_slices: int = 1
    programs_per_sm: int = 1
    page_lookahead: int = 1


# The paged decode program's shapes for one query row per head (a GQA group in one 16-row program) at head
# dims up to 128 and 16-bit products, by name; PAGED_DECODE_LAYOUTS picks the launcher's for each class of
# cache. "rows" is flash decoding's program (paged_tiles: the tiles of forward_configs.choose_decode_config,
# PAGED_DECODE_WARPS warps on every key block, a cross-warp row max and sum per block: 9 CTA barriers a 64-key
# block at d=128); "slices WxN stS [xP] [ahead0]": W warps on their own N keys of every key block (N * W keys
# a block, 2 CTA barriers a block, the copy's), S stages, P programs per SM (splits), "ahead0": page numbers
# read in their block's iteration (PagedTiles.page_lookahead 0: the pipeliner copies them by cp.async; 5
# stages keep two K/V blocks in flight, as 3 do with lookahead 1). compile_sm90 --paged (bf16 d=128, sm_90,
# Triton 3.6): the sliced layouts take 227-255 registers and spill nothing (plain, causal, a window, softcap
# + ALiBi + sinks; pages of 16 and 256, contiguous) but "ahead0" with a window (4 B); 4 warps x 32 keys
# spilled 8-100 B (pages of 16: 68-380 B) and 2 stages 16 B over pages of 16: not listed. The loop over whole
# blocks ("slices 4x16 st3", plain): 298 SASS instructions a thread over pages of 16 (2 table loads), 350 over
# pages of 256 (1), 354 contiguous, each with 32 HMMA, 16 LDGSTS and 2 BAR.SYNC ("ahead0" over pages of 16:
# 305, the table by 2 LDGSTS); the edge blocks' loop 392 / 435 / 421. "heads WxN stS": W warps each on its own
# kv head of W adjacent ones (a program per W kv heads: more splits fill the SMs), N keys a block; at W = 8 a
# block of 16 keys reads a page of 16 whole (16 x 8 kv heads x d, 32 KB at d=128, contiguous) with one table
# read where key slices read it in 8 programs. compile_sm90 --paged: 168-226 registers, no spills, 80 KB (4
# warps) and 160 KB (8) of shared memory; whole-block loop 359 instructions a thread a 16-key block of W heads
# (16 LDGSTS, 2 BAR.SYNC, 1 table load); 4 warps x 32 keys spilled 176-504 B: not listed.
# H100 (scripts/sweep_paged_gpu.py, bf16 d=128 B=16 Hq/Hkv 32/8, interleaved with torch flash on the same keys
# unpaged; 2026-12-05), TB/s at S = 16k / 32k / 128k and the ratio to torch flash: pages of 16, rows 0.96 /
# 0.96 / 0.94x (bench), "slices 4x16 st3" 0.99 / 0.98 / 0.99x; pages of 256 rows 1.00 / 0.98 / 0.97x, slices
# 4x16 st3 1.02 / 1.00 / 1.00x; contiguous rows 1.02 / 1.02 / 1.00x, slices 4x16 st3 1.03 / 1.02 / 1.02x
# (geometric mean over S >= 16k and the three caches 1.005x against rows' 0.984x; the others 0.985-0.998x).
PAGED_LAYOUTS: dict[str, PagedTiles | None] = {
    "rows": None,
    "slices 4x16 st3": PagedTiles(block_m=16, block_n=64, num_warps=4, num_stages=3, key_slices=4),
    "slices 4x16 st3 x2": PagedTiles(block_m=16, block_n=64, num_warps=4, num_stages=3, key_slices=4,
                                     programs_per_sm=2),
    "slices 4x16 st4": PagedTiles(block_m=16, block_n=64, num_warps=4, num_stages=4, key_slices=4),
    "slices 8x16 st3": PagedTiles(block_m=16, block_n=128, num_warps=8, num_stages=3, key_slices=8),
    "slices 2x16 st3 x4": PagedTiles(block_m=16, block_n=32, num_warps=2, num_stages=3, key_slices=2,
                                     programs_per_sm=4),
    "slices 4x16 st5 ahead0": PagedTiles(block_m=16, block_n=64, num_warps=4, num_stages=5, key_slices=4,
                                         page_lookahead=0),
    "heads 4x16 st3": PagedTiles(block_m=16, block_n=16, num_warps=4, num_stages=3, head_slices=4),
    "heads 4x16 st3 x2": PagedTiles(block_m=16, block_n=16, num_warps=4, num_stages=3, head_slices=4,
                                    programs_per_sm=2),
    "heads 8x16 st3": PagedTiles(block_m=16, block_n=16, num_warps=8, num_stages=3, head_slices=8),
}
# A cache's class for the layout choice: "contiguous", "small pages" (fewer keys than SMALL_PAGE_KEYS: a page
# smaller than the sliced layouts' 64-key block, so one block reads several pages' table entries) or "large
# pages". PAGED_DECODE_LAYOUTS names the launcher's layout (a PAGED_LAYOUTS name) for each class.
PAGE_CLASSES = ("small pages", "large pages", "contiguous")
SMALL_PAGE_KEYS = 64
PAGED_DECODE_LAYOUTS = {
    "small pages": "slices 4x16 st3",
    "large pages": "slices 4x16 st3",
    "contiguous": "slices 4x16 st3",
}
# The head dims (padded) up to which a PAGED_LAYOUTS entry applies: each warp holds a slice's 16 x d float32
# output rows and 16 x d query (d / 2 + d / 4 registers a thread), with the K/V fragments on top.
PAGED_SLICED_MAX_HEAD_DIM = 128

# K/V blocks by TMA (spec field tma_blocks) where the cache allows it (a contiguous cache, or power-of-two
# pages holding whole key blocks; TMA-readable strides; sm_90+ or the interpreter). Off: on the H100 (the
# sweep of PAGED_DECODE_WARPS' comment, the "rows" tiles, one split) TMA boxes read 1.35 / 2.24 / 2.44 / 3.06
# TB/s at S = 4k / 16k / 32k / 128k over pages of 256 keys against 2.53 / 2.64 / 2.74 / 3.03 for the per-row
# cp.async copies (contiguous cache: 1.34 / 2.30 / 2.50 / 3.11 against 2.55 / 2.83 / 2.87 / 3.11).
PAGED_TMA_BLOCKS = False


def tma_block_views(k_cache: Tensor, v_cache: Tensor, page_size: int | None, block_n: int,
                    capability: tuple[int, int] | None) -> tuple | None:  # fmt: skip
    """((K view, strides), (V view, strides)) of the caches as (page or batch item, head, slot, dim) for
    TMA descriptors of whole key blocks, or None where the blocks are read row by row."""
    whole_blocks = page_size is None or (fixed_page_size(page_size) and page_size % block_n == 0)
    if not PAGED_TMA_BLOCKS or not whole_blocks or (capability is not None and capability < (9, 0)):
        return None
    views = tuple(cache.permute(0, 2, 1, 3) for cache in (k_cache, v_cache))
    strides = tuple(host_descriptor_strides(view) for view in views)
    return None if None in strides else tuple(zip(views, strides))


def sliced_layout_applies(desc: AttentionDescriptor, layout: PagedTiles) -> bool:
    """Whether `layout` (key or head slices) serves `desc`: 16-bit inputs (the layouts were compiled and timed for
    them; float32 keeps the rows program), a GQA group's rows in one program, kv heads that the head slices
    divide, head dims up to PAGED_SLICED_MAX_HEAD_DIM."""
    key = desc.kernel_key
    return (desc.dtype in (torch.float16, torch.bfloat16) and desc.gqa_group * desc.seq_q <= layout.block_m
            and desc.heads_kv % layout.head_slices == 0
            and key.block_head_dim <= PAGED_SLICED_MAX_HEAD_DIM
            and key.block_head_dim_v <= PAGED_SLICED_MAX_HEAD_DIM)  # fmt: skip


def page_class(page_size: int | None) -> str:
    """The PAGE_CLASSES entry of a cache of pages of `page_size` keys (None: contiguous)."""
    if page_size is None:
        return "contiguous"
    return "small pages" if page_size < SMALL_PAGE_KEYS else "large pages"


def paged_tiles(desc: AttentionDescriptor, decode: DecodeConfig, page_size: int | None) -> PagedTiles:
    """The paged program's tiles for `desc` over pages of `page_size` keys (None: a contiguous cache):
    PAGED_DECODE_LAYOUTS' layout for the cache's class where it applies, else from flash decoding's
    (`decode`), with 64-row programs for a group of more than 16 rows of 16-bit inputs."""
    layout = PAGED_LAYOUTS[PAGED_DECODE_LAYOUTS[page_class(page_size)]]
    if layout is not None and sliced_layout_applies(desc, layout):
        return layout
    group_rows, dtype = desc.gqa_group * desc.seq_q, desc.dtype
    tiles = PagedTiles(decode.block_m, decode.block_n, PAGED_DECODE_WARPS, decode.num_stages)
    if group_rows > tiles.block_m and dtype != torch.float32:
        tiles = replace(tiles, block_m=PAGED_MANY_ROWS_BLOCK_M, block_n=min(tiles.block_n, PAGED_MANY_ROWS_BLOCK_N))
    return tiles


def paged_decode(
    desc: AttentionDescriptor,
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    block_table: Tensor | None,
    new_tokens: int,
    alibi_slopes: Tensor | None,
    sinks: Tensor | None,
    num_splits: int | None = None,
    tiles: PagedTiles | None = None,
) -> tuple[Tensor, Tensor]:
    """out (B, Hq, Lq, Ev) in q's dtype and lse (B, Hq, Lq) float32 of q (B, Lq, Hq, E) over each sequence's
    first cache_seqlens[b] + new_tokens keys of the caches (paged with `block_table`, else contiguous).
    `alibi_slopes` (B, Hq) (stride 0 over a broadcast batch). `num_splits` (default: from the capacity and
    the SM count) pins the split count, rounded so every split holds whole key blocks; `tiles` (default:
    paged_tiles) pins the program's rows, key block, warps, stages, key slices and programs per SM
    (scripts/sweep_paged_gpu.py)."""
    capability = device_capability(q.device)
    config = kernel_cache.get(
        ("forward", desc.kernel_key, capability, False),
        lambda cache_key: choose_forward_config(cache_key[1], capability, cache_key[3]),
    )
    batch, heads_q, heads_kv, seq_q = desc.batch, desc.heads_q, desc.heads_kv, desc.seq_q
    out = new_output((batch, heads_q, seq_q, desc.head_dim_v), desc.dtype, q.device)
    lse = new_output((batch, heads_q, seq_q), torch.float32, q.device)
    if batch * heads_q * seq_q == 0:
        return out, lse
    gqa_group = desc.gqa_group
    paged = block_table is not None
    page_size = k_cache.shape[1] if paged else None
    decode = tiles or paged_tiles(desc, config.decode, page_size)
    row_chunks = cdiv(gqa_group * seq_q, decode.block_m)
    programs_per_split = batch * heads_kv // decode.head_slices * row_chunks
    if programs_per_split > MAX_GRID_X:
        raise ValueError(f"triton paged decode: {programs_per_split} programs exceed the grid limit of {MAX_GRID_X}")
    capacity = max(desc.seq_kv, 1)
    if num_splits is None:
        num_splits = decode_split_count(programs_per_split, capacity, sm_count(q.device) * decode.programs_per_sm)
    num_splits = max(1, min(num_splits, DECODE_MAX_SPLITS, MAX_GRID_YZ))
    split_len = cdiv(cdiv(capacity, num_splits), decode.block_n) * decode.block_n
    num_splits = cdiv(capacity, split_len)

    inputs = AttentionInputs(q, k_cache, v_cache, alibi_slopes=alibi_slopes, sinks=sinks)
    query = kernel_query(desc, inputs)
    alibi, sink_logits, alibi_strides = score_arguments(desc, inputs, lse)
    band = Visibility.of(desc)
    table = block_table if paged else cache_seqlens  # never read unless paged
    table_strides = tuple(block_table.stride()) if paged else (0, 0)
    rows = batch * heads_q * seq_q
    if num_splits > 1:
        partial_out = torch.empty(rows * num_splits * desc.head_dim_v, dtype=torch.float32, device=q.device)
        partial_lse = torch.empty(rows * num_splits, dtype=torch.float32, device=q.device)
    else:
        partial_out = partial_lse = lse  # not written: the kernel writes out and lse itself
    sliced = decode.key_slices > 1 or decode.head_slices > 1
    tma_views = None if sliced else tma_block_views(k_cache, v_cache, page_size, decode.block_n, capability)
    spec = paged_decode_spec(desc, config, decode, page_size, tma_views is not None)
    k_desc, v_desc = k_cache, v_cache  # not read unless spec.tma_blocks
    if tma_views is not None:
        (k_view, k_tma), (v_view, v_tma) = tma_views
        k_desc = host_descriptor(k_view, k_tma, spec.block_n, spec.block_d)
        v_desc = host_descriptor(v_view, v_tma, spec.block_n, spec.block_dv)
    split_kernel = launcher(paged_kernels.attention_paged_decode_kernel, **spec.launch_arguments())
    with on_device(q.device):
        split_kernel(
            (programs_per_split, num_splits),
            query, k_cache, v_cache, k_desc, v_desc, table, cache_seqlens, partial_out, partial_lse, out, lse, alibi,
            sink_logits,
            *query.stride(), *k_cache.stride(), *v_cache.stride(), *table_strides, *alibi_strides,
            heads_q, gqa_group, seq_q, new_tokens, desc.head_dim, desc.head_dim_v, row_chunks, num_splits,
            split_len, page_size or 1, max(band.left, 0), max(band.right, 0),
            kernel_scale(desc), float(desc.softcap),
        )  # fmt: skip
        if num_splits > 1:
            merge = merge_launcher(spec.block_dv, spec.widen_dot_operands)
            merge((rows,), partial_out, partial_lse, out, lse, num_splits, desc.head_dim_v, desc.head_dim_v)
    return out, lse
