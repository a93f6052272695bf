"""Launches the backward kernels (`backward_kernels.py`) for one attention problem.

`attention_backward(...)` is what `TritonBackend.backward` calls. Inputs keep
their strides (nothing is made contiguous); gradients are contiguous tensors
from `new_output` (the kernels write them through their strides), dmask a
(B, Hq, L, S) float32 one. Up to three launches, in this order: the
preprocess (lse in base 2, and delta = rowsum(dO * O) without the row pass);
the dQ kernel if dQ or dmask is needed, or with the row pass (it computes the
row scales of P and delta); the dK/dV kernel if dK or dV is needed (for GQA
with too few kv heads to fill the GPU, one program per query head writing
float32 shares that a torch sum folds per group: `splits_gqa_group`). A
launch plan per descriptor, config and gradients keeps the grids and the
three kernels as `direct_launch` launchers (`backward_launch_plan`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from flashsdpa import gradient_precision
from flashsdpa.backends.base import AttentionInputs, GradientsNeeded, PackedSequences, new_output
from flashsdpa.backends.triton.backward_configs import (
    BackwardConfig,
    TileShape,
    backward_config,
    block_widths,
)
from flashsdpa.backends.triton.backward_kernels import (
    attention_backward_dkdv_kernel,
    attention_backward_dq_kernel,
    attention_backward_preprocess_kernel,
)
from flashsdpa.backends.triton.direct_launch import BoundLaunch, launcher
from flashsdpa.backends.triton.common_kernels import LOAD_HOST_DESCRIPTORS, LOAD_POINTERS
from flashsdpa.backends.triton.kernel_specs import BackwardDkdvKernelSpec, BackwardDqKernelSpec, backward_common
from flashsdpa.backends.triton.launch_halves import split_rows_into_halves
from flashsdpa.backends.triton.launch_common import (
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
    score_arguments,
    sm_count,
    visible_band,
)
from flashsdpa.cache import RecentValues, kernel_cache
from flashsdpa.descriptor import AttentionDescriptor
from flashsdpa.dropout import drop_threshold


def attention_backward(
    desc: AttentionDescriptor,
    inputs: AttentionInputs,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    needed: GradientsNeeded,
    config: BackwardConfig | None = None,
    packing: PackedSequences | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dq, dk, dv, dmask) for `desc`; see `Backend.backward`. Requires seq_q, seq_kv >= 1.

    `packing`: a packed batch (see `PackedSequences`; every tensor a (1, H, total, d) view whose batch
    stride is 0, out and lse too): the kernels read each sequence's offsets on the device, and the
    gradients come back as such views of packed (total, H, d) tensors. No mask; dK/dV reads q and dO
    through pointers, one program per query head with GQA (SPLIT_GROUP).

    `config` pins the block shapes and precision (tests, benchmarks); by
    default they come from `kernel_cache`, keyed on the descriptor's
    `KernelKey` and `desc.gradients`, the precision torch itself would
    compute this call's gradients at, chosen at the forward (AUTO resolved
    here: `gradient_precision.at_backward`).
    """
    if not (needed.query or needed.key or needed.value or needed.mask):
        return None, None, None, None
    query, key, value = inputs.query, inputs.key, inputs.value
    device = query.device
    if config is None:
        capability = device_capability(device)  # tiles differ per GPU generation
        precision = gradient_precision.at_backward(desc, inputs)
        config = kernel_cache.get(
            ("backward", desc.kernel_key, capability, precision, packing is not None),
            lambda cache_key: backward_config(*cache_key[1:]),
        )
    if packing is not None and config.dkdv_tile_loads != "pointers":
        config = dataclasses.replace(config, dkdv_tile_loads="pointers")  # 4-D descriptors step by batch
    if needed.mask and not config.renormalize_rows:
        # The mask gradient is dS itself: the exact row pass keeps delta from
        # the half-precision output's rounding (it put dmask at 2x torch's error).
        config = dataclasses.replace(config, renormalize_rows=True)
    batch, heads_q, seq_q, head_dim = query.shape
    heads_kv, seq_kv, head_dim_v = key.shape[1], key.shape[2], value.shape[3]
    if packing is None:
        dq = new_output(query.shape, desc.dtype, device) if needed.query else None
        dk = new_output(key.shape, desc.dtype, device) if needed.key else None
        dv = new_output(value.shape, desc.dtype, device) if needed.value else None
    else:
        zeroed = not packing.covers_keys  # key rows of no sequence: their gradient is 0
        dq = _packed_gradient(query, desc.dtype, False) if needed.query else None
        dk = _packed_gradient(key, desc.dtype, zeroed) if needed.key else None
        dv = _packed_gradient(value, desc.dtype, zeroed) if needed.value else None
    dmask = new_output((batch, heads_q, seq_q, seq_kv), torch.float32, device) if needed.mask else None

    computed = needed
    if seq_kv == 1 and not desc.sinks:
        # One key (and no sink): each row's softmax is a constant (1, or 0
        # where the key is hidden), so dS, and with it dq, dk and dmask, is
        # exactly 0; the kernels would return rounding noise (dP - delta) in its place.
        for gradient in (dq, dk, dmask):
            if gradient is not None:
                gradient.zero_()
        computed = GradientsNeeded(query=False, key=False, value=needed.value, mask=False)
        if dv is None:
            return dq, dk, dv, dmask
    run_dkdv = computed.key or computed.value
    # The dQ kernel runs for dq or dmask, and (row pass) for the row scales and delta the dK/dV kernel reads.
    run_dq = computed.query or computed.mask or (config.renormalize_rows and run_dkdv)

    # Scratch, not outputs: every element is written before it is read. One allocation, its rows
    # 16-byte aligned: delta, lse in base 2 and, with renormalized rows, the row scales.
    row_count = desc.batch * heads_q * stats_row_stride(desc.seq_q)  # per sequence of a packed batch
    scratch = torch.empty((3 if config.renormalize_rows else 2, row_count), dtype=torch.float32, device=device)
    parts = scratch.unbind(0)
    delta, lse_log2, row_scale = parts[0], parts[1], parts[-1] if config.renormalize_rows else parts[0]
    # An output that is not computed gets a stand-in pointer; its COMPUTE_*/WRITE_* flag keeps it untouched.
    stand_in = delta

    mask, mask_strides = mask_argument(desc, inputs)
    alibi, sinks, alibi_strides = score_arguments(desc, inputs, stand_in)
    # The main kernels' q, k, v and dO: the inputs, or (fp16_halves) their float16 halves, whose rows' unscales
    # the kernels take too (otherwise stand-ins, never read).
    operands, unscales = (query, key, value, grad_out), (stand_in,) * 4
    if config.fp16_halves:
        with on_device(device):
            operands, unscales = zip(*(split_rows_into_halves(tensor) for tensor in operands))
    kernel_query, kernel_key, kernel_value, kernel_grad_out = operands
    q_source, do_source, tile_loads = _streamed_tiles(config, desc, kernel_query, kernel_grad_out) if run_dkdv else (
        kernel_query, kernel_grad_out, int(LOAD_POINTERS))
    # A packed batch splits every GQA group: its dK/dV group loop spilled 32-272 B on sm_90 (compile_sm90 --packed).
    split_group = run_dkdv and (desc.heads_q != desc.heads_kv if packing is not None
                                else splits_gqa_group(desc, config, device))
    varlen = 0 if packing is None else packed_alignment(desc)
    plan = backward_launch_plan(desc, config, computed, run_dq, run_dkdv, seeds_with_mask(desc, mask, mask_strides),
                                tile_loads, split_group, varlen)
    # The packed batch's offsets (stand-ins, never read, without one), and for the dQ and dK/dV kernels the
    # order their grids take the sequences in (LONGEST_FIRST; a stand-in without it).
    sequences = (stand_in,) * 3 if packing is None else (packing.cu_seq_q, packing.cu_seq_k, packing.key_counts)
    sequence_order = stand_in
    if packing is not None and config.packed_longest_first:
        sequence_order = longest_sequences_first(packing)
    run_time = ()  # with dropout, the arguments after the strides (the seeds change per call)
    if desc.dropout_p > 0.0:
        if inputs.dropout_seed is None:
            raise ValueError("attention_backward: dropout_p > 0 needs inputs.dropout_seed")
        seed_lo, seed_hi = inputs.dropout_seed
        run_time = (seed_lo, seed_hi, drop_threshold(desc.dropout_p), 1.0 / (1.0 - desc.dropout_p))

    with on_device(device):
        if plan.preprocess is not None:
            plan.preprocess(
                plan.preprocess_grid,
                out, grad_out, lse, delta, lse_log2, *sequences, *out.stride(), *grad_out.stride(), *lse.stride(),
            )  # fmt: skip

        input_strides = (*kernel_query.stride(), *kernel_key.stride(), *kernel_value.stride(), *mask_strides,
                         *kernel_grad_out.stride())
        # Before the dK/dV kernel: the row pass writes the row scales that kernel reads.
        for launch, grid in ((plan.rows, plan.rows_grid), (plan.dq, plan.dq_grid)):
            if launch is None:
                continue
            launch(
                grid,
                kernel_query, kernel_key, kernel_value, mask, kernel_grad_out,
                stand_in if dq is None else dq, stand_in if dmask is None else dmask, delta, lse_log2, row_scale,
                out, lse, alibi, sinks, *sequences, sequence_order, *unscales,
                *input_strides, *_strides_or_zeros(dq), *out.stride(), *lse.stride(), *alibi_strides, *plan.dq_sizes,
                *run_time,
            )  # fmt: skip

        if run_dkdv:
            # SPLIT_GROUP: each query head's float32 share, summed over its group below
            dk_out = _group_shares(dk, heads_q, packing) if split_group else dk
            dv_out = _group_shares(dv, heads_q, packing) if split_group else dv
            # The dK/dV launch, and with config.dv the dV launch (through pointers: the descriptors' boxes
            # are the dK/dV tile's).
            for launch, grid, streamed in ((plan.dkdv, plan.dkdv_grid, (q_source, do_source)),
                                           (plan.dv, plan.dv_grid, (kernel_query, kernel_grad_out))):
                if launch is None:
                    continue
                launch(
                    grid,
                    streamed[0], kernel_key, kernel_value, mask, streamed[1],
                    stand_in if dk_out is None else dk_out, stand_in if dv_out is None else dv_out,
                    delta, lse_log2, row_scale, alibi, *sequences, sequence_order, *unscales,
                    *input_strides, *_strides_or_zeros(dk_out), *_strides_or_zeros(dv_out), *alibi_strides,
                    *plan.dkdv_sizes, *run_time,
                )  # fmt: skip
            if split_group:
                for gradient, shares in ((dk, dk_out), (dv, dv_out)):
                    if gradient is not None:  # a fixed-order sum: results stay bitwise reproducible
                        gradient.copy_(shares.unflatten(1, (heads_kv, heads_q // heads_kv)).sum(2))

    return dq, dk, dv, dmask


def longest_sequences_first(packing: PackedSequences) -> torch.Tensor:
    """The packed batch's sequence indices (int64, on its device) in decreasing order of work, query count
    times key count, ties in index order (stable: the same order every call). No host read."""
    work = (packing.cu_seq_q[1:] - packing.cu_seq_q[:-1]).to(torch.int64) * packing.key_counts
    return torch.argsort(work, descending=True, stable=True)


def _packed_gradient(like: torch.Tensor, dtype: torch.dtype, zeroed: bool) -> torch.Tensor:
    """A (1, H, total, d) view, batch stride 0, of a new packed (total, H, d) gradient."""
    _, heads, total, width = like.shape
    packed = (torch.zeros if zeroed else new_output)((total, heads, width), dtype=dtype, device=like.device)
    return packed.as_strided((1, heads, total, width), (0, *packed.transpose(0, 1).stride()))


def splits_gqa_group(desc: AttentionDescriptor, config: BackwardConfig, device: torch.device) -> bool:
    """Whether the dK/dV kernel runs one program per query head (SPLIT_GROUP) rather than per kv head.

    With GQA, programs per kv head loop over the whole group: a Llama-like
    layer (B=1, 16 query / 4 kv heads, L=4096) made 128 programs, fewer than
    the H100's SMs, each with 4 heads' work. Per query head there are
    gqa_group times as many, for float32 shares written and summed (2
    passes over B*Hq*S*d floats each for dK and dV). Taken while the
    per-kv-head grid would fill the GPU less than twice.
    """
    if desc.heads_q == desc.heads_kv:
        return False
    programs = cdiv(desc.seq_kv, max(tile.block_n for tile in dkdv_tiles(config))) * desc.batch * desc.heads_kv
    return programs < 2 * sm_count(device)


def _group_shares(gradient: torch.Tensor | None, heads_q: int, packing: PackedSequences | None = None
                  ) -> torch.Tensor | None:
    """Each query head's float32 share of `gradient`; for a packed batch, a (1, Hq, total, d) view with batch
    stride 0 (zeroed where key rows lie outside every sequence, as the gradient is)."""
    if gradient is None:
        return None
    batch, _, seq_kv, width = gradient.shape
    if packing is None:
        return torch.empty((batch, heads_q, seq_kv, width), dtype=torch.float32, device=gradient.device)
    shares = (torch.empty if packing.covers_keys else torch.zeros)((heads_q, seq_kv, width), dtype=torch.float32,
                                                                   device=gradient.device)  # fmt: skip
    return shares.as_strided((1, heads_q, seq_kv, width), (0, *shares.stride()))


@dataclass(frozen=True)
class BackwardLaunchPlan:
    """Grids, run-time sizes and kernels of one backward's launches (see `backward_launch_plan`)."""

    preprocess_grid: tuple[int]
    preprocess: BoundLaunch | None  # the lengths bound; None where the dQ kernel computes the row statistics
    rows_grid: tuple[int]
    # With BackwardConfig.rows: the dQ kernel's row pass alone, before `dq` (the dQ launch, if dq or dmask is
    # needed, then reads what it wrote).
    rows: BoundLaunch | None
    dq_grid: tuple[int]
    # With dropout, the dQ kernel's scale, lengths and head counts (the seeds follow, per call);
    # without, () and the kernel holds every argument after the strides.
    dq_sizes: tuple
    dq: BoundLaunch | None  # None where the dQ kernel does not run
    dkdv_grid: tuple[int]
    dkdv_sizes: tuple  # (the dV launch's too)
    dkdv: BoundLaunch | None  # dK and dV, or dK alone where `dv` runs
    dv_grid: tuple[int]
    dv: BoundLaunch | None  # with BackwardConfig.dv and dV needed: dV alone, in its own launch


# Plans of recent backward launches; they follow from their key's fields. Bounded.
_backward_plans = RecentValues()


def backward_launch_plan(
    desc: AttentionDescriptor, config: BackwardConfig, computed: GradientsNeeded, run_dq: bool, run_dkdv: bool,
    mask_seed: bool, tile_loads: int, split_group: bool, varlen: int = 0,
) -> BackwardLaunchPlan:
    """`varlen`: the kernels' VARLEN (a packed batch: `launch_common.packed_alignment`), else 0."""
    kernels = (id(attention_backward_preprocess_kernel), id(attention_backward_dq_kernel),
               id(attention_backward_dkdv_kernel))  # the kernel objects, as in launch_forward.main_launch_plan
    plan_key = (desc, config, computed, run_dq, run_dkdv, mask_seed, tile_loads, split_group, varlen, kernels)
    plan = _backward_plans.get(plan_key)
    if plan is None:
        plan = _backward_plans.keep(plan_key, _new_backward_launch_plan(
            desc, config, computed, run_dq, run_dkdv, mask_seed, tile_loads, split_group, varlen,
        ))  # fmt: skip
    return plan


def _new_backward_launch_plan(
    desc: AttentionDescriptor, config: BackwardConfig, computed: GradientsNeeded, run_dq: bool, run_dkdv: bool,
    mask_seed: bool, tile_loads: int, split_group: bool, varlen: int,
) -> BackwardLaunchPlan:
    kernel_key = desc.kernel_key
    batch, heads_q, heads_kv, seq_q, seq_kv = desc.batch, desc.heads_q, desc.heads_kv, desc.seq_q, desc.seq_kv
    block_d, block_dv = block_widths(kernel_key)
    band = visible_band(desc)
    # A packed batch's diagonals are relative to each sequence's aligned position (the kernels add its offset).
    lowest, highest, key_offset = (band.lowest_diagonal, band.highest_diagonal, desc.key_offset) if not varlen \
        else (*packed_diagonals(desc), 0)  # fmt: skip
    stats_stride = stats_row_stride(seq_q)
    # Without the row pass, the dQ kernel computes lse in base 2 and delta itself where its row blocks
    # cover the dK/dV kernel's (block sizes are powers of two): no preprocess launch.
    dq_row_stats = run_dq and not config.renormalize_rows and all(
        tile.block_m <= config.dq.block_m for tile in dkdv_tiles(config))
    preprocess = None if dq_row_stats else launcher(
        attention_backward_preprocess_kernel,
        HEAD_DIM_V=desc.head_dim_v, BLOCK_M=config.preprocess_block_m, BLOCK_DV=kernel_key.block_head_dim_v,
        # delta is for whatever is built from dS; with renormalized rows the dQ kernel computes it
        COMPUTE_DELTA=(computed.query or computed.key or computed.mask) and not config.renormalize_rows,
        VARLEN=varlen,
    ).bind(seq_q, heads_q, stats_stride)  # fmt: skip
    scale, gqa_group = float(desc.scale), heads_q // heads_kv
    diagonals = (lowest, highest, key_offset, float(desc.softcap))
    dq_sizes = (scale, seq_q, seq_kv, heads_q, gqa_group, stats_stride, *diagonals)
    dkdv_sizes = (scale, seq_q, seq_kv, heads_kv, gqa_group, stats_stride, *diagonals)
    # Without dropout every argument after the strides is the plan's: bound once. With it the
    # seeds, which change per call, come last: the sizes are passed per call too.
    sizes_per_call = desc.dropout_p > 0.0

    def main_kernel(kernel, spec_type, tile, sizes: tuple, **flags) -> BoundLaunch:
        bound = () if sizes_per_call else (*sizes, 0, 0, 0, 1.0)
        spec = spec_type(**backward_common(desc, config, tile, (block_d, block_dv), mask_seed, varlen), **flags)
        return launcher(kernel, **spec.launch_arguments()).bind(*bound)

    def dkdv_grid(tile: TileShape) -> tuple[int]:
        return (cdiv(seq_kv, tile.block_n) * batch * (heads_q if split_group else heads_kv),)

    def dkdv_kernel(tile: TileShape, compute_dk: bool, compute_dv: bool, tile_loads: int) -> BoundLaunch | None:
        if not (compute_dk or compute_dv):
            return None
        return main_kernel(attention_backward_dkdv_kernel, BackwardDkdvKernelSpec, tile, dkdv_sizes,
                           compute_dk=compute_dk, compute_dv=compute_dv, tile_loads=int(tile_loads),
                           early_dp=config.dkdv_early_dp, split_group=split_group, gqa=gqa_group > 1)

    def dq_kernel(tile: TileShape, compute_dq: bool, write_dmask: bool, row_pass_done: bool) -> BoundLaunch:
        return main_kernel(attention_backward_dq_kernel, BackwardDqKernelSpec, tile, dq_sizes, compute_dq=compute_dq,
                           write_dmask=write_dmask, row_stats=dq_row_stats, sinks=desc.kernel_key.sinks,
                           row_pass_done=row_pass_done)

    apart = config.dv is not None  # dV in its own launch
    rows_apart = run_dq and config.renormalize_rows and config.rows is not None  # the row pass in its own
    return BackwardLaunchPlan(
        preprocess_grid=(cdiv(stats_stride, config.preprocess_block_m) * batch * heads_q,),
        preprocess=preprocess,
        rows_grid=(cdiv(seq_q, config.rows.block_m) * batch * heads_q,) if rows_apart else (0,),
        rows=dq_kernel(config.rows, False, False, False) if rows_apart else None,
        dq_grid=(cdiv(seq_q, config.dq.block_m) * batch * heads_q,),
        dq_sizes=dq_sizes if sizes_per_call else (),
        dq=dq_kernel(config.dq, computed.query, computed.mask, rows_apart)
        if run_dq and (computed.query or computed.mask or not rows_apart) else None,
        dkdv_grid=dkdv_grid(config.dkdv),
        dkdv_sizes=dkdv_sizes if sizes_per_call else (),
        dkdv=dkdv_kernel(config.dkdv, computed.key, computed.value and not apart, tile_loads) if run_dkdv else None,
        dv_grid=dkdv_grid(config.dv) if apart else (0,),
        dv=dkdv_kernel(config.dv, False, computed.value, LOAD_POINTERS) if apart and run_dkdv else None,
    )


def dkdv_tiles(config: BackwardConfig) -> tuple[TileShape, ...]:
    """The tiles of the dK/dV kernel's launches: `config.dkdv`, and `config.dv` where dV has its own."""
    return (config.dkdv,) if config.dv is None else (config.dkdv, config.dv)


def _streamed_tiles(config: BackwardConfig, desc: AttentionDescriptor, query: torch.Tensor,
                    grad_out: torch.Tensor) -> tuple:
    """(q, dO, TILE_LOADS) as the dK/dV kernel reads them: 4-D TMA descriptors where the config asks for them
    and both tensors qualify, else the tensors themselves (pointer loads)."""
    if config.dkdv_tile_loads == "host":
        layout = (query.shape, query.stride(), query.data_ptr() % TMA_ALIGNMENT_BYTES, grad_out.shape,
                  grad_out.stride(), grad_out.data_ptr() % TMA_ALIGNMENT_BYTES, query.dtype, config.dkdv.block_m)
        fields = _streamed_tile_fields.get(layout)
        if fields is None:
            fields = _streamed_tile_fields.keep(layout, _new_streamed_tile_fields(config, desc, query, grad_out))
        if fields:
            return (host_descriptor_like(fields[0], query), host_descriptor_like(fields[1], grad_out),
                    int(LOAD_HOST_DESCRIPTORS))
    return query, grad_out, int(LOAD_POINTERS)


# The fields of q's and dO's descriptors by their shapes, strides and 16-byte alignment (as the
# forward's launch plans keep them: building TensorDescriptors anew cost ~20 us a backward); () where
# TMA cannot read them.
_streamed_tile_fields = RecentValues()


def _new_streamed_tile_fields(config: BackwardConfig, desc: AttentionDescriptor, query: torch.Tensor,
                              grad_out: torch.Tensor) -> tuple:
    strides = [host_descriptor_strides(t) for t in (query, grad_out)]
    if None in strides:
        return ()
    block_m = config.dkdv.block_m
    block_d, block_dv = block_widths(desc.kernel_key)
    return (fields_without_base(host_descriptor(query, strides[0], block_m, block_d)),
            fields_without_base(host_descriptor(grad_out, strides[1], block_m, block_dv)))


def _strides_or_zeros(tensor: torch.Tensor | None) -> tuple[int, ...]:
    return tuple(tensor.stride()) if tensor is not None else (0, 0, 0, 0)


def stats_row_stride(seq_q: int) -> int:
    """Row stride of the delta / lse_log2 / row-scale scratch: seq_q rounded up to 128, so that the dK/dV
    kernel reads whole BLOCK_M slices unmasked and 16-byte aligned (rows past seq_q: lse +inf, delta 0)."""
    return cdiv(seq_q, 128) * 128
