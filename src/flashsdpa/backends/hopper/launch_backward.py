"""Launcher of the Hopper backward kernels: row statistics, descriptors, grids and arguments; no computation of its own."""

from __future__ import annotations

import contextlib
import functools

import torch

from flashsdpa.backends.base import AttentionInputs, new_output
from flashsdpa.backends.hopper.backward_specs import HopperBackwardSpec, backward_spec
from flashsdpa.backends.hopper.forward_specs import LOG2E
from flashsdpa.backends.hopper.launch_forward import cached_descriptor, tma_descriptor, tma_readable
from flashsdpa.backends.hopper.variants import HopperVariants, band_arguments, score_arguments
from flashsdpa.backends.triton.backward_kernels import attention_backward_preprocess_kernel
from flashsdpa.backends.triton.launch_backward import stats_row_stride
from flashsdpa.backends.triton.launch_common import MAX_GRID_X, cdiv, on_device, sm_count
from flashsdpa.descriptor import AttentionDescriptor

PREPROCESS_BLOCK_M = 128  # (stats_row_stride is a multiple of it)


@functools.lru_cache(maxsize=None)
def _kernels():
    """The kernel module, imported on first use (Gluon needs a CUDA build of Triton)."""
    from flashsdpa.backends.hopper import backward_kernels

    return backward_kernels


@functools.lru_cache(maxsize=None)
def _side_stream(device_index: int) -> torch.cuda.Stream:
    """The stream the dQ kernel runs on beside the dK/dV kernel (`HopperBackwardSpec.dq_concurrent`), one a device."""
    return torch.cuda.Stream(torch.device("cuda", device_index))


def _forked_stream(spec: HopperBackwardSpec, device: torch.device) -> torch.cuda.Stream | None:
    """With `dq_concurrent`, the side stream for the dQ kernel, made to wait for the current stream's work so far
    (the row statistics); else None (the dQ kernel follows the dK/dV kernel on the current stream)."""
    if not spec.dq_concurrent or device.type != "cuda":
        return None
    side = _side_stream(device.index if device.index is not None else torch.cuda.current_device())
    side.wait_stream(torch.cuda.current_stream(device))
    return side


def backward_readable(inputs: AttentionInputs, out: torch.Tensor, grad_out: torch.Tensor) -> bool:
    """Whether the kernels' TMA descriptors can read q, k, v and dO (out is read by pointers)."""
    return tma_readable(inputs.query, inputs.key, inputs.value, grad_out)


def stats_descriptor(stats: torch.Tensor, rows: int):
    """A TMA descriptor of the (2, rows of every (batch, query head), stats stride) float32 row statistics
    (delta, lse2), with blocks of (2, 1, rows): one query block's delta and lse2 together, unswizzled."""

    def build():
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

        layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=3)
        return TensorDescriptor(stats, list(stats.shape), list(stats.stride()), [2, 1, rows], layout)

    return cached_descriptor(("stats", stats.shape, rows), stats, build)


def attention_backward(
    desc: AttentionDescriptor, inputs: AttentionInputs, out: torch.Tensor, lse: torch.Tensor,
    grad_out: torch.Tensor, spec: HopperBackwardSpec | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in desc.dtype, the shapes of q, k, v (GQA: dk, dv summed over each group's query heads).

    lse is the forward's (natural log, (B, Hq, L) float32); q, k, v and grad_out must pass
    `backward_readable`, and desc.scale be nonzero (the backend checks)."""
    spec = spec or backward_spec(desc.head_dim)
    kernels = _kernels()
    q, k, v = inputs.query, inputs.key, inputs.value
    batch, heads_q, heads_kv = desc.batch, desc.heads_q, desc.heads_kv
    seq_q, seq_kv, device = desc.seq_q, desc.seq_kv, q.device
    dq = new_output(q.shape, desc.dtype, device)
    dk = new_output(k.shape, desc.dtype, device)
    dv = new_output(v.shape, desc.dtype, device)

    # Row statistics (scratch, every row written): delta = rowsum(dO * O) and lse in base 2, rows padded to
    # stats_stride (past seq_q: lse2 +inf, delta 0) so that the kernels read whole blocks unmasked.
    stats_stride = stats_row_stride(seq_q)
    stats = torch.empty((2, batch * heads_q, stats_stride), dtype=torch.float32, device=device)
    delta, lse2 = stats.flatten(1).unbind(0)

    num_n_blocks = cdiv(seq_kv, 2 * spec.dkdv_block_n)
    num_m_blocks = cdiv(seq_q, 2 * spec.dq_block_m)
    dkdv_programs = num_n_blocks * batch * heads_kv
    dq_programs = num_m_blocks * batch * heads_q
    if max(dkdv_programs, dq_programs) > MAX_GRID_X:
        raise ValueError(f"hopper backward: {max(dkdv_programs, dq_programs)} programs exceed the grid limit")
    scale = float(desc.scale)
    variants = HopperVariants.of(desc)
    transform, (slopes, _) = score_arguments(desc, inputs, scale, delta)
    band = band_arguments(desc)
    # Raw products are scaled in the exponent; transformed scores are in natural units already.
    qk_scale = LOG2E if variants.natural_units else scale * LOG2E
    # Persistent kernels only where every tile takes as long (a band's tiles do not: one program a tile serves them
    # longest first, as the forward does), and, as the exponentials by FMA, only on plain scores: with a score
    # transform they spill more (sm_90 bf16 d=128, softcap: persistent dK/dV 144/200 B with loads in the query loop;
    # softcap, ALiBi and sinks with FMA exponentials: dQ 1268/1296 B, against 52/68 with neither).
    plain = not variants.banded and not variants.natural_units
    dkdv_persistent, dq_persistent = spec.dkdv_persistent and plain, spec.dq_persistent and plain
    dkdv_grid = min(dkdv_programs, sm_count(device)) if dkdv_persistent else dkdv_programs
    dq_grid = min(dq_programs, sm_count(device)) if dq_persistent else dq_programs
    dkdv_fma, dq_fma = (spec.dkdv_exp2_by_fma, spec.dq_exp2_by_fma) if not variants.natural_units else (0, 0)
    common = dict(VARIANTS=variants, CONSUMER_REGISTERS=spec.consumer_registers,
                  PRODUCER_REGISTERS=spec.producer_registers, num_warps=spec.num_warps, maxnreg=spec.max_registers)
    with on_device(device):
        attention_backward_preprocess_kernel[(cdiv(stats_stride, PREPROCESS_BLOCK_M) * batch * heads_q,)](
            out, grad_out, lse, delta, lse2, delta, delta, delta,  # (no packed batch: offsets not read)
            *out.stride(), *grad_out.stride(), *lse.stride(),
            seq_q, heads_q, stats_stride,
            HEAD_DIM_V=desc.head_dim_v, BLOCK_M=PREPROCESS_BLOCK_M, BLOCK_DV=desc.head_dim_v, COMPUTE_DELTA=True,
        )
        # With dq_concurrent the dQ kernel runs on a side stream forked here, its programs queued behind the dK/dV
        # kernel's and filling the SMs that kernel's last wave leaves idle; the current stream joins it at the end.
        side = _forked_stream(spec, device)
        kernels.hopper_attention_backward_dkdv_kernel[(dkdv_grid,)](
            tma_descriptor(q, spec.dkdv_block_m), tma_descriptor(k, 2 * spec.dkdv_block_n),
            tma_descriptor(v, 2 * spec.dkdv_block_n), tma_descriptor(grad_out, spec.dkdv_block_m),
            tma_descriptor(dk, spec.dkdv_block_n), tma_descriptor(dv, spec.dkdv_block_n),
            stats_descriptor(stats, spec.dkdv_block_m), lse2, delta, slopes, heads_kv, desc.gqa_group, seq_q, seq_kv,
            num_n_blocks, dkdv_programs, stats_stride, qk_scale, scale, band, transform, BLOCK_M=spec.dkdv_block_m,
            BLOCK_N=spec.dkdv_block_n, STAGES=spec.dkdv_stages, STATS_IN_SHARED=spec.dkdv_stats_in_shared,
            PINGPONG=spec.dkdv_pingpong, DEFER_DK=spec.dkdv_defer_dk, FMA_QUARTERS=dkdv_fma,
            PERSISTENT=dkdv_persistent, **common,
        )
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            kernels.hopper_attention_backward_dq_kernel[(dq_grid,)](
                tma_descriptor(q, 2 * spec.dq_block_m), tma_descriptor(k, spec.dq_block_n),
                tma_descriptor(v, spec.dq_block_n), tma_descriptor(grad_out, 2 * spec.dq_block_m),
                tma_descriptor(dq, spec.dq_block_m), lse2, delta, slopes,
                heads_q, desc.gqa_group, seq_kv, num_m_blocks, dq_programs, stats_stride, qk_scale, scale, band,
                transform, BLOCK_M=spec.dq_block_m, BLOCK_N=spec.dq_block_n, STAGES=spec.dq_stages,
                PINGPONG=spec.dq_pingpong, DEFER_DQ=spec.dq_defer_dq, FMA_QUARTERS=dq_fma,
                PERSISTENT=dq_persistent, **common,
            )
        if side is not None:
            torch.cuda.current_stream(device).wait_stream(side)
    return dq, dk, dv
