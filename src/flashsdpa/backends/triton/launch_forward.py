"""Launchers of the forward kernels: argument plumbing, path choice, no computation of their own.

`attention_forward(desc, inputs)` is what `TritonBackend.forward` calls. It
takes the compiled-variant config from `kernel_cache` (keyed on
`desc.kernel_key`, which the kernel specs are built from), then runs either the main kernel or, for a handful of query
rows, flash decoding. `launch_main_kernel` and `launch_decode_kernels` take an
explicit config (and split count) so tests and benchmarks can pin a path.
Inputs are read through their strides as they are; the query alone is copied:
negated for a negative softmax scale, zeroed for scale 0 (`kernel_query`).
float32 at full precision (the float32 default) splits q, k and v into
float16 halves first (`launch_halves`; flash decoding splits in-kernel). On
sm90 the main kernel reads Q/K/V and writes O by TMA through 4-D descriptors
(`host_descriptor`), whose validated fields a launch plan keeps per call
shape (`main_launch_plan`). Plans also keep their kernels as `direct_launch`
launchers with the plan's own arguments (sizes, scale) bound, so a repeated
call shape computes only its grid-free per-call arguments and Triton's
argument binding is skipped (`decode_launch_plan` does the same for flash
decoding).
"""

from __future__ import annotations

import contextvars
import dataclasses
from dataclasses import dataclass

import torch
import triton

from flashsdpa.backends.base import AttentionInputs, PackedSequences, new_output
from flashsdpa.backends.triton import common_kernels, decode_kernels, forward_kernels
from flashsdpa.backends.triton.direct_launch import BoundLaunch, DirectLaunch, launcher
from flashsdpa.backends.triton.forward_configs import (
    DECODE_MAX_SPLITS,
    LONG_KEYS,
    ForwardConfig,
    choose_forward_config,
    decode_split_count,
    uses_decode_kernel,
)
from flashsdpa.backends.triton.kernel_specs import DecodeSplitKernelSpec, decode_split_spec, forward_spec
from flashsdpa.backends.triton.launch_common import (
    MAX_GRID_X,
    MAX_GRID_YZ,
    TMA_ALIGNMENT_BYTES,
    cdiv,
    device_capability,
    fields_without_base,
    host_descriptor,
    host_descriptor_like,
    host_descriptor_strides,
    mask_argument,
    on_device,
    packed_alignment,
    packed_diagonals,
    seeds_with_mask,
    sm_count,
    tensor_descriptor_compatible,
    score_arguments,
    visible_band,
)
from flashsdpa.backends.triton.launch_halves import split_key_blocks_into_halves, split_rows_into_halves
from flashsdpa.cache import RecentValues, kernel_cache
from flashsdpa.descriptor import AttentionDescriptor, MaskKind
from flashsdpa.dropout import drop_threshold

# As a plain int: comparing with the tl.constexpr itself costs ~1 us a call.
DEVICE_DESCRIPTORS = int(common_kernels.LOAD_DEVICE_DESCRIPTORS)


def attention_forward(
    desc: AttentionDescriptor, inputs: AttentionInputs, config: ForwardConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, Hq, L, Ev) in desc.dtype and lse (B, Hq, L) float32 (natural log); see `Backend.forward`."""
    if config is None:
        config = forward_config(desc, device_capability(inputs.query.device))
    if uses_decode_kernel(desc):
        return launch_decode_kernels(desc, inputs, config)
    return launch_main_kernel(desc, inputs, config)


def forward_config(desc: AttentionDescriptor, capability: tuple[int, int] | None) -> ForwardConfig:
    """The forward's tiles for `desc` on a GPU of `capability` (part of the key: tiles and TMA use differ per
    GPU generation)."""
    long_keys = desc.seq_kv >= LONG_KEYS
    return kernel_cache.get(
        ("forward", desc.kernel_key, capability, long_keys),
        lambda cache_key: choose_forward_config(cache_key[1], capability, cache_key[3]),
    )


def allocate_outputs(desc: AttentionDescriptor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads_q, seq_q, _ = query.shape
    out = new_output((batch, heads_q, seq_q, desc.head_dim_v), desc.dtype, query.device)
    lse = new_output((batch, heads_q, seq_q), torch.float32, query.device)
    return out, lse


def kernel_query(desc: AttentionDescriptor, inputs: AttentionInputs) -> torch.Tensor:
    """The query the forward kernels get with `kernel_scale`, which is always positive.

    The kernels take the row max over raw q.k products and scale the
    difference to it, which needs scale > 0. The other scales are rare, so each is
    served by one copy of the query rather than a slower loop for every call:
    a negative scale by -q (exact); scale 0 by q * 0 with scale 1 (every score
    0, and NaN where q or k holds inf or NaN, as in torch's math).
    """
    if desc.scale < 0:
        return -inputs.query
    if desc.scale == 0:
        return inputs.query * 0.0
    return inputs.query


def kernel_scale(desc: AttentionDescriptor) -> float:
    """The softmax scale the forward kernels get with `kernel_query`'s query (launch plans bind it)."""
    if desc.scale == 0:
        return 1.0
    return abs(float(desc.scale))



def torch_scratch_allocator(device: torch.device):
    def allocate(size: int, alignment: int, stream) -> torch.Tensor:
        # torch's allocators hand out blocks aligned far beyond the 128 bytes TMA descriptors need.
        return torch.empty(size, dtype=torch.int8, device=device)

    return allocate


def run_with_scratch_allocator(device: torch.device, launch) -> None:
    """Run `launch()` with a torch allocator for in-kernel tensor descriptors.

    Triton keeps its allocator in a ContextVar; setting it inside a copy of the
    current context leaves the caller's own allocator setting untouched.
    """

    def launch_in_context() -> None:
        triton.set_allocator(torch_scratch_allocator(device))
        launch()

    contextvars.copy_context().run(launch_in_context)


@dataclass(frozen=True)
class MainLaunchPlan:
    """What a main-kernel launch takes besides the tensors and run-time scalars (see `main_launch_plan`)."""

    grid: tuple[int]
    tile_loads: int
    # per tensor (q, k, v, out) with host TMA descriptors: the fields of a
    # descriptor Triton validated for this plan's shapes, strides and alignment
    descriptor_fields: tuple[dict, ...] | None
    # with dropout, the kernel's sizes and scale after the strides (the seeds follow, per call);
    # without, () and the kernels hold every argument after the strides
    sizes: tuple
    # the kernel with this plan's constexprs and options, by MASK_SEED (False, True)
    kernels: tuple[BoundLaunch, BoundLaunch]


# Plans of recent launches. A plan follows from the descriptor (shapes, dtype,
# options), the config and the strides and 16-byte alignment of q, k, v and
# out, which is its key: a repeated call shape is a dict lookup. Bounded.
_main_plans = RecentValues()


def main_launch_plan(desc: AttentionDescriptor, config: ForwardConfig, tensors, strides) -> MainLaunchPlan:
    """The grid, tile-load path and kernel for `tensors` = (q, k, v, out) as the kernel gets them, whose
    `strides` are given (the launch passes them too)."""
    q, k, v, out = tensors
    plan_key = (
        desc, config, *strides,
        q.data_ptr() % TMA_ALIGNMENT_BYTES, k.data_ptr() % TMA_ALIGNMENT_BYTES,
        v.data_ptr() % TMA_ALIGNMENT_BYTES, out.data_ptr() % TMA_ALIGNMENT_BYTES,
        id(forward_kernels.attention_forward_kernel),  # the kernel object: a swapped one (tests) gets new plans
    )  # fmt: skip
    plan = _main_plans.get(plan_key)
    if plan is None:
        plan = _main_plans.keep(plan_key, _new_main_launch_plan(desc, config, tensors))
    return plan


def _new_main_launch_plan(desc: AttentionDescriptor, config: ForwardConfig, tensors) -> MainLaunchPlan:
    key = desc.kernel_key
    num_m_blocks = cdiv(desc.seq_q, config.block_m)
    programs = num_m_blocks * desc.batch * desc.heads_q
    if programs > MAX_GRID_X:
        raise ValueError(f"triton forward: {programs} programs exceed the grid limit of {MAX_GRID_X}")
    tile_loads, strides = choose_tile_loads(config, tensors)
    descriptor_fields = None
    if tile_loads == common_kernels.LOAD_HOST_DESCRIPTORS:
        blocks = [(config.block_m, key.block_head_dim), (config.block_n, key.block_head_dim),
                  (config.block_n, key.block_head_dim_v), (config.block_m, key.block_head_dim_v)]
        descriptor_fields = tuple(
            fields_without_base(host_descriptor(tensor, tensor_strides, *block))
            for tensor, tensor_strides, block in zip(tensors, strides, blocks)
        )
    band = visible_band(desc)
    warp_specialize = config.warp_specialize and tile_loads != common_kernels.LOAD_POINTERS
    sizes = (desc.heads_q, desc.heads_q // desc.heads_kv, desc.seq_q, desc.seq_kv, desc.head_dim, desc.head_dim_v,
             num_m_blocks, band.lowest_diagonal, band.highest_diagonal, desc.key_offset, kernel_scale(desc),
             float(desc.softcap))
    # Without dropout every argument after the strides is the plan's: bound once (the seeds change per call).
    tail = () if desc.dropout_p > 0.0 else (*sizes, 0, 0, 0, 1.0)
    kernels = tuple(
        launcher(
            forward_kernels.attention_forward_kernel,
            **forward_spec(desc, config, tile_loads, mask_seed, warp_specialize).launch_arguments(),
        ).bind(*tail)
        for mask_seed in (False, True)
    )
    return MainLaunchPlan((programs,), int(tile_loads), descriptor_fields, sizes if desc.dropout_p > 0.0 else (),
                          kernels)



def launch_main_kernel(
    desc: AttentionDescriptor, inputs: AttentionInputs, config: ForwardConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    q = kernel_query(desc, inputs)
    k, v = inputs.key, inputs.value
    out, lse = allocate_outputs(desc, q)
    mask, mask_strides = mask_argument(desc, inputs)

    unscales = lse, lse, lse  # never read unless config.split_products
    if config.split_products:
        with on_device(q.device):
            q, q_unscale = split_rows_into_halves(q)
            k, k_unscale = split_rows_into_halves(k)
            v, v_unscale = split_key_blocks_into_halves(v, config.block_n)
        unscales = q_unscale, k_unscale, v_unscale
    strides = q.stride(), k.stride(), v.stride(), out.stride()
    plan = main_launch_plan(desc, config, (q, k, v, out), strides)
    if plan.descriptor_fields is not None:
        q_fields, k_fields, v_fields, out_fields = plan.descriptor_fields
        q_arg = host_descriptor_like(q_fields, q)
        k_arg = host_descriptor_like(k_fields, k)
        v_arg = host_descriptor_like(v_fields, v)
        out_arg = host_descriptor_like(out_fields, out)
    else:
        q_arg, k_arg, v_arg, out_arg = q, k, v, out
    run_time = ()
    if desc.dropout_p > 0.0:
        seed_lo, seed_hi = inputs.dropout_seed
        run_time = (*plan.sizes, drop_threshold(desc.dropout_p), seed_lo, seed_hi, 1.0 / (1.0 - desc.dropout_p))
    kernel = plan.kernels[seeds_with_mask(desc, mask, mask_strides)]
    alibi, sinks, alibi_strides = score_arguments(desc, inputs, lse)

    def launch() -> None:
        kernel(
            plan.grid,
            q_arg, k_arg, v_arg, mask, out_arg, lse, *unscales, alibi, sinks, lse, lse, lse,
            *strides[0], *strides[1], *strides[2], *mask_strides, *strides[3], *alibi_strides, *run_time,
        )  # fmt: skip

    with on_device(q.device):
        if plan.tile_loads == DEVICE_DESCRIPTORS:
            run_with_scratch_allocator(q.device, launch)
        else:
            launch()
    return out, lse


def packed_forward_config(desc: AttentionDescriptor, capability: tuple[int, int] | None) -> ForwardConfig:
    """The main kernel's config for a packed batch: the dense problem's of the longest sequences, with
    float32 products split in the kernel (tf32x3) rather than into float16 halves (whose value unscales
    come per BLOCK_N keys of each head, which a sequence's key rows do not start on), and with dropout without
    the table's register cap (compile_sm90 --packed, bf16 d=128 causal, sm_90: capped at 128 it spilled 152 B)."""
    config = forward_config(desc, capability)
    if config.split_products:
        config = dataclasses.replace(config, split_products=False)
    if desc.kernel_key.dropout and config.max_registers is not None:
        config = dataclasses.replace(config, max_registers=None)
    return config


def packed_unsupported_reasons(desc: AttentionDescriptor) -> list[str]:
    """Why the main kernel cannot run `desc` as a packed batch (the triton backend's reasons come first)."""
    if desc.mask is not MaskKind.NONE:
        return ["triton's packed-sequence kernel takes no attention mask"]
    return []


def packed_attention_forward(
    desc: AttentionDescriptor, inputs: AttentionInputs, packing: PackedSequences, config: ForwardConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """out (1, Hq, total_q, Ev) and lse (1, Hq, total_q) of a packed batch (see `PackedSequences`), in one
    launch: one program per (query block of the longest sequence, query head, sequence); programs past
    their sequence's last query block exit at once."""
    q = kernel_query(desc, inputs)
    k, v = inputs.key, inputs.value
    if config is None:
        config = packed_forward_config(desc, device_capability(q.device))
    out, lse = allocate_outputs(desc, q)
    total_q = q.shape[2]
    num_m_blocks = cdiv(desc.seq_q, config.block_m)
    programs = num_m_blocks * desc.batch * desc.heads_q
    if programs > MAX_GRID_X:
        raise ValueError(f"triton forward: {programs} programs exceed the grid limit of {MAX_GRID_X}")
    tensors = q, k, v, out
    tile_loads = common_kernels.LOAD_POINTERS
    if config.tile_loads in ("host", "device") and all(tensor_descriptor_compatible(t) for t in tensors):
        tile_loads = common_kernels.LOAD_DEVICE_DESCRIPTORS
    spec = forward_spec(desc, config, tile_loads, False, False, packed_alignment(desc))
    kernel = launcher(forward_kernels.attention_forward_kernel, **spec.launch_arguments())
    lowest, highest = packed_diagonals(desc)
    seed_lo, seed_hi = inputs.dropout_seed if desc.dropout_p > 0.0 else (0, 0)
    dropout = (drop_threshold(desc.dropout_p), seed_lo, seed_hi, 1.0 / (1.0 - desc.dropout_p)) \
        if desc.dropout_p > 0.0 else (0, 0, 0, 1.0)  # fmt: skip
    alibi, sinks, alibi_strides = score_arguments(desc, inputs, lse)
    # Batch strides of 0: each program moves its pointers to its sequence's first row.
    strides = [(0, *t.stride()[1:]) for t in tensors]

    def launch() -> None:
        kernel(
            (programs,),
            q, k, v, q, out, lse, lse, lse, lse, alibi, sinks, packing.cu_seq_q, packing.cu_seq_k, packing.key_counts,
            *strides[0], *strides[1], *strides[2], 0, 0, 0, 0, *strides[3], *alibi_strides,
            desc.heads_q, desc.heads_q // desc.heads_kv, total_q, desc.seq_kv, desc.head_dim, desc.head_dim_v,
            num_m_blocks, lowest, highest, 0, kernel_scale(desc), float(desc.softcap), *dropout,
        )  # fmt: skip

    with on_device(q.device):
        if tile_loads == DEVICE_DESCRIPTORS:
            run_with_scratch_allocator(q.device, launch)
        else:
            launch()
    return out, lse


def choose_tile_loads(config: ForwardConfig, tensors) -> tuple[int, list | None]:
    """The kernel's TILE_LOADS (the config's TMA descriptors where every tensor qualifies, else the next
    best) and, for host descriptors, each tensor's descriptor strides."""
    if config.tile_loads == "host":
        strides = [host_descriptor_strides(t) for t in tensors]
        if all(s is not None for s in strides):
            return common_kernels.LOAD_HOST_DESCRIPTORS, strides
    # Per-head device descriptors cannot reach split products' lo halves (heads past the tensor's view).
    device_ok = config.tile_loads in ("host", "device") and not config.split_products
    if device_ok and all(tensor_descriptor_compatible(t) for t in tensors):
        return common_kernels.LOAD_DEVICE_DESCRIPTORS, None
    return common_kernels.LOAD_POINTERS, None


@dataclass(frozen=True)
class DecodeLaunchPlan:
    """Grids, split lengths, run-time sizes and kernels of a flash-decoding launch (see `decode_launch_plan`)."""

    split_grid: tuple[int, int]
    merge_grid: tuple[int]
    # float32 elements of the one scratch buffer that holds the partial outputs and
    # then (from partial_lse_offset, 16-byte aligned) the partial lse; 0: one split, none
    scratch_size: int
    partial_lse_offset: int
    # the kernels, with their arguments after the strides (the plan's) bound
    split_kernel: BoundLaunch
    merge_kernel: BoundLaunch | None


# Plans of recent decode launches: they follow from the descriptor, the config,
# the requested split count and the device (its SM count). Bounded.
_decode_plans = RecentValues()


def decode_launch_plan(
    desc: AttentionDescriptor, config: ForwardConfig, num_splits: int | None, device: torch.device
) -> DecodeLaunchPlan:
    kernels = id(decode_kernels.attention_decode_split_kernel), id(decode_kernels.merge_decode_splits_kernel)
    plan_key = (desc, config, num_splits, device, kernels)  # the kernel objects, as in main_launch_plan
    plan = _decode_plans.get(plan_key)
    if plan is None:
        plan = _decode_plans.keep(plan_key, _new_decode_launch_plan(desc, config, num_splits, device))
    return plan


def _new_decode_launch_plan(
    desc: AttentionDescriptor, config: ForwardConfig, num_splits: int | None, device: torch.device
) -> DecodeLaunchPlan:
    decode = config.decode
    gqa_group = desc.heads_q // desc.heads_kv
    row_chunks = cdiv(gqa_group * desc.seq_q, decode.block_m)
    programs_per_split = desc.batch * desc.heads_kv * row_chunks
    if programs_per_split > MAX_GRID_X:
        raise ValueError(f"triton decode: {programs_per_split} programs exceed the grid limit of {MAX_GRID_X}")
    if num_splits is None:
        num_splits = decode_split_count(programs_per_split, desc.seq_kv, sm_count(device))
    num_splits = max(1, min(num_splits, DECODE_MAX_SPLITS, MAX_GRID_YZ))
    split_len = cdiv(cdiv(desc.seq_kv, num_splits), decode.block_n) * decode.block_n
    num_splits = cdiv(desc.seq_kv, split_len)
    rows = desc.batch * desc.heads_q * desc.seq_q
    scratch_size = partial_lse_offset = 0
    if num_splits > 1:
        partial_lse_offset = cdiv(rows * num_splits * desc.head_dim_v, 4) * 4  # 16 bytes of float32
        scratch_size = partial_lse_offset + rows * num_splits
    band = visible_band(desc)
    split_kernel, merge_kernel = decode_launchers(decode_split_spec(desc, config))
    split_kernel = split_kernel.bind(
        # out is freshly allocated and contiguous: its (batch, head, row) rows are head_dim_v apart.
        desc.head_dim_v,
        desc.heads_q, desc.heads_kv, gqa_group, desc.seq_q, desc.seq_kv, desc.head_dim, desc.head_dim_v,
        row_chunks, num_splits, split_len, band.lowest_diagonal, band.highest_diagonal, desc.key_offset,
        kernel_scale(desc), float(desc.softcap),
    )  # fmt: skip
    # The last: out's row stride.
    merge_kernel = merge_kernel.bind(num_splits, desc.head_dim_v, desc.head_dim_v) if num_splits > 1 else None
    return DecodeLaunchPlan((programs_per_split, num_splits), (rows,), scratch_size, partial_lse_offset,
                            split_kernel, merge_kernel)


def decode_launchers(spec: DecodeSplitKernelSpec) -> tuple[DirectLaunch, DirectLaunch]:
    """The split and merge kernels of the split kernel's `spec`, asked once per variant (plans are made per
    call shape: a decode loop whose cache grows makes one per step)."""
    kernels = id(decode_kernels.attention_decode_split_kernel), id(decode_kernels.merge_decode_splits_kernel)
    found = _decode_launchers.get((spec, kernels))  # the kernel objects, as in main_launch_plan
    if found is None:
        split = launcher(decode_kernels.attention_decode_split_kernel, **spec.launch_arguments())
        merge = merge_launcher(spec.block_dv, spec.widen_dot_operands)
        found = _decode_launchers.keep((spec, kernels), (split, merge))
    return found


_decode_launchers = RecentValues()  # (split, merge) DirectLaunch pairs


def merge_launcher(block_dv: int, round_bfloat16: bool) -> DirectLaunch:
    """merge_decode_splits_kernel's launcher for output rows of block_dv (padded) values."""
    return launcher(decode_kernels.merge_decode_splits_kernel, BLOCK_SPLITS=DECODE_MAX_SPLITS, BLOCK_DV=block_dv,
                    ROUND_BFLOAT16=round_bfloat16, num_warps=4)  # fmt: skip


def launch_decode_kernels(
    desc: AttentionDescriptor, inputs: AttentionInputs, config: ForwardConfig, num_splits: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash decoding: split the keys across programs, then merge the splits by their lse (one split: no merge).

    Supports masks; not causal or dropout (see `uses_decode_kernel`).
    `num_splits` (default: `decode_split_count`) is rounded so every split
    holds whole key blocks.
    """
    if desc.causal or desc.dropout_p > 0.0:
        raise ValueError("triton flash decoding does not apply causal masks or dropout")
    q = kernel_query(desc, inputs)
    k, v = inputs.key, inputs.value
    device = q.device
    plan = decode_launch_plan(desc, config, num_splits, device)
    out, lse = allocate_outputs(desc, q)
    mask, mask_strides = mask_argument(desc, inputs)
    if plan.merge_kernel is None:
        partial_out = partial_lse = lse  # not written: the split kernel writes out and lse itself
    else:
        # One allocation for both (each is written before it is read): (rows, splits, head_dim_v) and (rows, splits).
        scratch = torch.empty(plan.scratch_size, dtype=torch.float32, device=device)
        partial_out, partial_lse = scratch, scratch[plan.partial_lse_offset:]
    with on_device(device):
        alibi, sinks, alibi_strides = score_arguments(desc, inputs, lse)
        plan.split_kernel(
            plan.split_grid,
            q, k, v, mask, partial_out, partial_lse, out, lse, alibi, sinks,
            *q.stride(), *k.stride(), *v.stride(), *mask_strides, *alibi_strides,
        )  # fmt: skip
        if plan.merge_kernel is not None:
            plan.merge_kernel(plan.merge_grid, partial_out, partial_lse, out, lse)
    return out, lse
