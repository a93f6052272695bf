"""What each Triton kernel variant compiles in, as frozen specs with named fields.

A spec names every compiled-in choice of one kernel (dtype-dependent flags,
padded head dims, tiles, variant flags) and nothing that varies per call
(lengths, scale, strides, the band's diagonals, softcap's value): its fields
are the kernel's constexpr parameters, lower-cased, plus the launch options.
It is built in one function per kernel (`*_spec`) from the descriptor's
`KernelKey` (the problem's compiled-in fields, variants included), the head
dims, the block-shape tables' config for that key and the launch's layout flags
(tile loads, mask seed, split group, which outputs): nothing else. It is what
the launchers key their compiled launchers on (`launcher(kernel,
**spec.launch_arguments())`), and where the constexpr arguments come from.
tests/test_kernel_specs.py checks the fields against the kernels' constexpr
names, and that two problems with one key, head dims and config get one spec.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from flashsdpa.backends.triton.launch_common import KERNEL_MASK_KIND
from flashsdpa.descriptor import AttentionDescriptor

# Fields that are launch options, not constexpr parameters (Triton's names as values).
LAUNCH_OPTIONS = {"num_warps": "num_warps", "num_stages": "num_stages", "max_registers": "maxnreg"}


@dataclass(frozen=True)
class KernelSpec:
    def launch_arguments(self) -> dict:
        """The constexpr arguments (upper-case names) and launch options of this variant."""
        arguments = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in LAUNCH_OPTIONS:
                if value is not None:
                    arguments[LAUNCH_OPTIONS[field.name]] = value
            else:
                arguments[field.name.upper()] = value
        return arguments

    @classmethod
    def constexpr_names(cls) -> set[str]:
        return {field.name.upper() for field in dataclasses.fields(cls) if field.name not in LAUNCH_OPTIONS}


@dataclass(frozen=True)
class ScoreVariant:
    """The variant flags every attention kernel compiles in (visibility_kernels, score_kernels)."""

    bounded_below: bool
    bounded_above: bool
    mask_kind: int
    softcap: bool
    alibi: bool


def score_variant(desc: AttentionDescriptor) -> ScoreVariant:
    key = desc.kernel_key
    return ScoreVariant(key.bounded_below, key.bounded_above, int(KERNEL_MASK_KIND[key.mask]), key.softcap, key.alibi)


@dataclass(frozen=True)
class ForwardKernelSpec(ScoreVariant, KernelSpec):
    """forward_kernels.attention_forward_kernel."""

    sinks: bool
    mask_rows_broadcast: bool
    dropout: bool
    block_m: int
    block_n: int
    block_d: int
    block_dv: int
    dot_precision: str | None
    widen_dot_operands: bool
    fp16_halves: bool
    tile_loads: int
    warp_specialize: bool
    mask_seed: bool
    num_warps: int
    num_stages: int
    max_registers: int | None
    varlen: int = 0  # common_kernels.VARLEN_*


def forward_spec(desc: AttentionDescriptor, config, tile_loads: int, mask_seed: bool,
                 warp_specialize: bool, varlen: int = 0) -> ForwardKernelSpec:
    key = desc.kernel_key
    return ForwardKernelSpec(
        **dataclasses.asdict(score_variant(desc)),
        sinks=key.sinks,
        mask_rows_broadcast=key.mask_rows_broadcast,
        dropout=key.dropout,
        block_m=config.block_m,
        block_n=config.block_n,
        block_d=key.block_head_dim,
        block_dv=key.block_head_dim_v,
        dot_precision=config.dot_precision,
        widen_dot_operands=config.widen_dot_operands,
        fp16_halves=config.split_products,
        tile_loads=int(tile_loads),
        warp_specialize=warp_specialize,
        mask_seed=mask_seed,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        max_registers=config.max_registers,
        varlen=varlen,
    )


@dataclass(frozen=True)
class DecodeTiles:
    """The tiles and products flash decoding's kernels (the split kernel and the paged one) compile in."""

    block_m: int
    block_n: int
    block_d: int
    block_dv: int
    dot_precision: str | None
    widen_dot_operands: bool
    num_warps: int
    num_stages: int


def decode_tiles(desc: AttentionDescriptor, config, decode) -> DecodeTiles:
    """`desc`'s decode tiles (`decode`, a DecodeConfig) and products under the forward `config`.

    float32 at full precision multiplies in float32 ("ieee": FMAs, as torch's own float32 kernels), not in the
    forward's split products: decode is bound by reading K and V, and on the H100 the split tf32 products
    gave 5.2e-7 relative error on a 100-key decode row where torch's float32 gave 1.5e-7 (`flashsdpa check`)."""
    key = desc.kernel_key
    return DecodeTiles(
        block_m=decode.block_m,
        block_n=decode.block_n,
        block_d=key.block_head_dim,
        block_dv=key.block_head_dim_v,
        dot_precision="ieee" if config.split_products else config.dot_precision,
        widen_dot_operands=config.widen_dot_operands,
        num_warps=decode.num_warps,
        num_stages=decode.num_stages,
    )


@dataclass(frozen=True)
class DecodeSplitKernelSpec(ScoreVariant, DecodeTiles, KernelSpec):
    """decode_kernels.attention_decode_split_kernel."""

    sinks: bool


def decode_split_spec(desc: AttentionDescriptor, config) -> DecodeSplitKernelSpec:
    return DecodeSplitKernelSpec(
        **dataclasses.asdict(score_variant(desc)),
        **dataclasses.asdict(decode_tiles(desc, config, config.decode)),
        sinks=desc.kernel_key.sinks,
    )


@dataclass(frozen=True)
class BackwardCommon(ScoreVariant):
    """The constexprs the dQ and dK/dV kernels share."""

    head_dim: int
    head_dim_v: int
    block_m: int
    block_n: int
    block_d: int
    block_dv: int
    mask_rows_broadcast: bool
    dropout: bool
    renormalize: bool
    dot_precision: str | None
    widen_dot_operands: bool
    split_operands: bool
    fp16_halves: bool
    mask_seed: bool
    num_warps: int
    num_stages: int
    varlen: int = 0  # common_kernels.VARLEN_*
    longest_first: bool = False  # with varlen: BackwardConfig.packed_longest_first


@dataclass(frozen=True)
class BackwardDqKernelSpec(BackwardCommon, KernelSpec):
    """backward_kernels.attention_backward_dq_kernel."""

    compute_dq: bool = False
    write_dmask: bool = False
    row_stats: bool = False
    sinks: bool = False
    row_pass_done: bool = False


@dataclass(frozen=True)
class BackwardDkdvKernelSpec(BackwardCommon, KernelSpec):
    """backward_kernels.attention_backward_dkdv_kernel."""

    compute_dk: bool = False
    compute_dv: bool = False
    tile_loads: int = 0
    early_dp: bool = False
    split_group: bool = False
    gqa: bool = False


def backward_common(desc: AttentionDescriptor, config, tile, block_widths: tuple[int, int],
                    mask_seed: bool, varlen: int = 0) -> dict:
    """The shared fields of the dQ and dK/dV specs, for the kernel whose tile is `tile`."""
    key = desc.kernel_key
    return dict(
        head_dim=desc.head_dim,
        head_dim_v=desc.head_dim_v,
        block_m=tile.block_m,
        block_n=tile.block_n,
        block_d=block_widths[0],
        block_dv=block_widths[1],
        **dataclasses.asdict(score_variant(desc)),
        mask_rows_broadcast=key.mask_rows_broadcast,
        dropout=key.dropout,
        renormalize=config.renormalize_rows,
        dot_precision=config.dot_precision,
        widen_dot_operands=config.widen_dot_operands,
        split_operands=config.split_operands,
        fp16_halves=config.fp16_halves,
        mask_seed=mask_seed,
        num_warps=tile.num_warps,
        num_stages=tile.num_stages,
        varlen=varlen,
        longest_first=bool(varlen) and config.packed_longest_first,
    )


@dataclass(frozen=True)
class PagedDecodeKernelSpec(DecodeTiles, KernelSpec):
    """paged_kernels.attention_paged_decode_kernel (its band follows each sequence's length: only the flags
    are compiled in)."""

    bounded_below: bool
    bounded_above: bool
    paged: bool
    # Paged: the page size where it is a power of two (compiled in: a key's page and slot without a division,
    # and one table read per key block where the pages hold whole blocks), else 0 (a division per key). H100,
    # bf16 d=128 B=16 Hq/Hkv=32/8 (scripts/sweep_paged_gpu.py): 2.51 / 2.66 / 2.84 TB/s at S = 16k / 32k /
    # 128k over pages of 16 keys against 2.19 / 2.41 / 2.61 dividing; pages of 256: 2.64 / 2.74 / 3.03
    # against 2.29 / 2.42 / 2.80.
    fixed_page_size: int
    tma_blocks: bool  # K/V blocks by TMA boxes (launch_paged.tma_block_views), not per-row addresses
    # 1, or num_warps: each warp on its own slice of every key block (paged_kernels' doc; launch_paged.PAGED_LAYOUTS)
    key_slices: int
    # 1, or num_warps: each warp on its own kv head of that many adjacent ones (paged_kernels' doc)
    head_slices: int
    # Paged: how many key blocks ahead of the one in hand its page numbers are read (1 or 2; paged_kernels'
    # attend_cache_blocks); 1 for a contiguous cache, which reads no table.
    page_lookahead: int
    softcap: bool
    alibi: bool
    sinks: bool


def paged_decode_spec(desc: AttentionDescriptor, config, decode, page_size: int | None,
                      tma_blocks: bool = False) -> PagedDecodeKernelSpec:  # fmt: skip
    """The spec for `desc`, which describes the cache's problem with seq_kv = its capacity and bottom-right
    alignment (`kvcache.cache_descriptor`), under the forward `config` with the tiles of `decode` (a
    launch_paged.PagedTiles), over a cache of pages of `page_size` keys (None: contiguous), its K/V blocks
    read by TMA if `tma_blocks`."""
    key = desc.kernel_key
    slices = decode.key_slices
    if slices > 1 and (slices != decode.num_warps or decode.block_n % slices or decode.block_n // slices < 16):
        raise ValueError(f"paged decode tiles {decode}: key_slices must equal num_warps and split block_n into "
                         "slices of at least 16 keys")  # fmt: skip
    heads = decode.head_slices
    if heads > 1 and (heads != decode.num_warps or slices > 1 or desc.heads_kv % heads or decode.block_n < 16):
        raise ValueError(f"paged decode tiles {decode}: head_slices must equal num_warps, divide the kv heads "
                         f"({desc.heads_kv}) and go without key slices, over key blocks of at least 16")  # fmt: skip
    if decode.page_lookahead not in (0, 1):
        raise ValueError(f"paged decode tiles {decode}: page_lookahead must be 0 or 1")
    return PagedDecodeKernelSpec(
        bounded_below=key.bounded_below,
        bounded_above=key.bounded_above,
        paged=page_size is not None,
        fixed_page_size=fixed_page_size(page_size),
        tma_blocks=tma_blocks,
        key_slices=slices,
        head_slices=heads,
        page_lookahead=decode.page_lookahead if page_size is not None else 1,
        softcap=key.softcap,
        alibi=key.alibi,
        sinks=key.sinks,
        **dataclasses.asdict(decode_tiles(desc, config, decode)),
    )



def fixed_page_size(page_size: int | None) -> int:
    """PagedDecodeKernelSpec.fixed_page_size of pages of `page_size` keys (None: a contiguous cache)."""
    return page_size if page_size is not None and page_size & (page_size - 1) == 0 else 0
