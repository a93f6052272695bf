"""Launcher of the Hopper forward kernel: descriptors, grid and arguments; no computation of its own."""

from __future__ import annotations

import functools

import torch

from flashsdpa.backends.base import AttentionInputs
from flashsdpa.backends.hopper.forward_specs import HopperForwardSpec, forward_spec
from flashsdpa.backends.hopper.variants import HopperVariants, band_arguments, score_arguments
from flashsdpa.backends.triton.launch_common import MAX_GRID_X, cdiv, host_descriptor_strides, on_device, sm_count
from flashsdpa.backends.triton.launch_forward import allocate_outputs, kernel_query, kernel_scale
from flashsdpa.cache import RecentValues
from flashsdpa.descriptor import AttentionDescriptor


@functools.lru_cache(maxsize=None)
def _gluon():
    """The kernel module and Gluon's host pieces, imported on first use (Gluon needs a CUDA build of Triton)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from flashsdpa.backends.hopper import forward_kernels

    return forward_kernels, gl, TensorDescriptor


def tma_readable(*tensors: torch.Tensor) -> bool:
    """Whether each 4-D tensor can be read through a TMA descriptor (`host_descriptor_strides`)."""
    return all(host_descriptor_strides(t) is not None for t in tensors)


# Validated descriptor fields (all but the base) by what shapes the descriptor: building and validating a
# Gluon TensorDescriptor and its layout costs ~35 us on this CPU, four a call. Bounded.
_descriptor_fields = RecentValues()


def cached_descriptor(key, tensor: torch.Tensor, build):
    """A TMA descriptor of `tensor`: `build()`'s (a TensorDescriptor of `tensor`) validated fields, kept under
    `key` (everything the descriptor depends on but the tensor's address), with `tensor` as its base."""
    fields = _descriptor_fields.get(key)
    if fields is None:
        fields = _descriptor_fields.keep(key, {name: value for name, value in vars(build()).items()
                                               if name != "base"})  # (a kept base would keep a tensor alive)
    _, _, TensorDescriptor = _gluon()
    descriptor = TensorDescriptor.__new__(TensorDescriptor)  # the fields were validated for this key
    descriptor.__dict__.update(fields)
    descriptor.base = tensor
    return descriptor


def tma_descriptor(tensor: torch.Tensor, rows: int):
    """A TMA descriptor of a 4-D tensor that passed `tma_readable`, with blocks of (1, 1, rows, head_dim)."""

    def build():
        _, gl, TensorDescriptor = _gluon()
        element = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}[tensor.dtype]
        block = [1, 1, rows, tensor.shape[3]]
        layout = gl.NVMMASharedLayout.get_default_for(block, element)
        return TensorDescriptor(tensor, list(tensor.shape), host_descriptor_strides(tensor), block, layout)

    return cached_descriptor(("tile", tensor.shape, tensor.stride(), tensor.dtype, rows), tensor, build)


def attention_forward(
    desc: AttentionDescriptor, inputs: AttentionInputs, spec: HopperForwardSpec | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, Hq, L, Ev) in desc.dtype and lse (B, Hq, L) float32 (natural log); see `Backend.forward`.

    q, k, v must pass `tma_readable` (the backend checks)."""
    variants = HopperVariants.of(desc)
    spec = spec or forward_spec(desc.head_dim, variants)
    kernels, _, _ = _gluon()
    q = kernel_query(desc, inputs)
    k, v = inputs.key, inputs.value
    out, lse = allocate_outputs(desc, q)
    scale = kernel_scale(desc)
    transform, (slopes, sinks) = score_arguments(desc, inputs, scale, lse)
    qk_scale = spec.qk_scale(scale, float(desc.softcap))
    num_m_blocks = cdiv(desc.seq_q, spec.rows_per_program)
    num_tiles = num_m_blocks * desc.batch * desc.heads_q
    if num_tiles > MAX_GRID_X:
        raise ValueError(f"hopper forward: {num_tiles} tiles exceed the grid limit of {MAX_GRID_X}")
    programs = min(num_tiles, sm_count(q.device)) if spec.persistent else num_tiles
    # (q_desc's block is a tile's rows; each consumer stores O by its own rows.)
    descriptors = (tma_descriptor(q, spec.rows_per_program), tma_descriptor(k, spec.block_n),
                   tma_descriptor(v, spec.block_n), tma_descriptor(out, spec.block_m))
    with on_device(q.device):
        kernels.hopper_attention_forward_kernel[(programs,)](
            *descriptors, lse, slopes, sinks,
            desc.heads_q, desc.gqa_group, desc.seq_q, desc.seq_kv, num_m_blocks, num_tiles, qk_scale,
            band_arguments(desc), transform,
            VARIANTS=spec.variants, BLOCK_M=spec.block_m, BLOCK_N=spec.block_n, STAGES=spec.stages,
            Q_BUFFERS=spec.q_buffers, PINGPONG=spec.pingpong, TANH=spec.tanh, EXP2_BY_FMA=spec.exp2_by_fma,
            CONSUMER_REGISTERS=spec.consumer_registers, PRODUCER_REGISTERS=spec.producer_registers,
            num_warps=spec.num_warps, maxnreg=spec.max_registers,
        )
    return out, lse

