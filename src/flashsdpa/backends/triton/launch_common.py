"""Launch helpers every Triton launcher shares: devices, grids, mask arguments, TMA descriptors.

The forward, backward and decode launchers import from here (never from each
other), so that one name means one thing in all of them.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from flashsdpa.backends.base import AttentionInputs
from flashsdpa.backends.triton import common_kernels, cuda_capability
from flashsdpa.descriptor import Alignment, AttentionDescriptor, MaskKind
from flashsdpa.visibility import Visibility

KERNEL_MASK_KIND = {
    MaskKind.NONE: common_kernels.MASK_NONE,
    MaskKind.BOOL: common_kernels.MASK_BOOL,
    MaskKind.FLOAT: common_kernels.MASK_FLOAT,
}
MAX_GRID_X = 2**31 - 1
MAX_GRID_YZ = 65535
TMA_ALIGNMENT_BYTES = 16


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """The CUDA compute capability, or None for CPU tensors (the Triton interpreter)."""
    if device.type != "cuda":
        return None
    return cuda_capability(device)


NOT_SWITCHING = contextlib.nullcontext()


def on_device(device: torch.device):
    """Triton launches on the current CUDA device, not the arguments': make them the same.

    Most calls find their device current already; switching it costs a few
    microseconds there (torch.cuda.device's enter and exit)."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return NOT_SWITCHING
    return torch.cuda.device(device)


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def mask_argument(desc: AttentionDescriptor, inputs: AttentionInputs) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The mask as the kernel reads it (bool viewed as uint8, no copy) and its four strides.

    Without a mask the query stands in as a never-read pointer.
    """
    mask = inputs.mask
    if desc.mask is MaskKind.NONE or mask is None:
        return inputs.query, (0, 0, 0, 0)
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    return mask, tuple(mask.stride())


def seeds_with_mask(desc: AttentionDescriptor, mask: torch.Tensor, mask_strides: tuple[int, ...]) -> bool:
    """MASK_SEED: whether the kernels feed the mask tile to q @ k^T as its accumulator (common_kernels.mask_seed).

    Only for masks with distinct rows whose row stride is not a multiple of
    16 elements or whose base is not 16-byte aligned (Triton's own
    divisibility specialisations, which decide its vector loads), which Triton
    loads element by element in a layout that made it compute the softmax
    twice (3-6 KB of spills at L=S=300). Aligned rows load through shared
    memory and spill little without it; the seed measured 6-8% slower there
    (H100, bf16 d=128 L=4096: bias forward 375 -> 346 TFLOP/s).
    """
    if desc.mask is MaskKind.NONE or desc.kernel_key.mask_rows_broadcast:
        return False
    return mask_strides[2] % 16 != 0 or mask.data_ptr() % 16 != 0


def tensor_descriptor_compatible(tensor: torch.Tensor) -> bool:
    """Whether every (batch, head) matrix of a 4-D view can be read through a TMA descriptor.

    The kernel builds one (rows, head_dim) descriptor per head at
    base + b * stride_b + h * stride_h: that base and the row stride must be
    16-byte aligned (batch/head strides of 0 are fine), and the last dim contiguous.
    """
    itemsize = tensor.element_size()
    stride_b, stride_h, stride_row, stride_col = tensor.stride()
    return (
        stride_col == 1
        and stride_row > 0
        and tensor.data_ptr() % TMA_ALIGNMENT_BYTES == 0
        and all(stride * itemsize % TMA_ALIGNMENT_BYTES == 0 for stride in (stride_b, stride_h, stride_row))
    )


def host_descriptor_strides(tensor: torch.Tensor) -> list[int] | None:
    """Strides for a 4-D (batch, heads, rows, head_dim) TMA descriptor of `tensor`, or None if TMA cannot read it.

    TMA needs a 16-byte aligned base, a contiguous last dim, and the other
    strides positive multiples of 16 bytes. A dim of size 1 is never stepped
    along, so its stride is replaced by a valid one (torch leaves any value
    there); a stride of 0 on a longer dim (an expanded view) disqualifies.
    """
    itemsize = tensor.element_size()
    if tensor.stride(3) != 1 and tensor.shape[3] > 1:
        return None
    if tensor.data_ptr() % TMA_ALIGNMENT_BYTES:
        return None
    strides = [*tensor.stride()[:3], 1]
    inner_bytes = TMA_ALIGNMENT_BYTES
    for dim in (2, 1, 0):
        if tensor.shape[dim] == 1:
            strides[dim] = inner_bytes // itemsize
        elif strides[dim] <= 0 or strides[dim] * itemsize % TMA_ALIGNMENT_BYTES:
            return None
        inner_bytes = strides[dim] * itemsize * tensor.shape[dim]
    return strides


def host_descriptor(tensor: torch.Tensor, strides: list[int], block_rows: int, block_cols: int):
    return TensorDescriptor(tensor, list(tensor.shape), strides, [1, 1, block_rows, block_cols])


def fields_without_base(descriptor: TensorDescriptor) -> dict:
    fields = dict(vars(descriptor))
    del fields["base"]  # a plan must not keep its first call's tensor alive
    return fields


def host_descriptor_like(fields: dict, tensor: torch.Tensor) -> TensorDescriptor:
    """A TensorDescriptor of `tensor` with the other fields of one that Triton validated for a tensor
    of the same shape, strides and 16-byte alignment (a launch plan's key): skips the dataclass's
    checks, ~2 us for each of the four descriptors of a launch."""
    descriptor = TensorDescriptor.__new__(TensorDescriptor)
    descriptor.__dict__.update(fields)
    descriptor.base = tensor
    return descriptor


def cdiv(a: int, b: int) -> int:
    """`triton.cdiv` without its constexpr-function wrapper (~2 us a call from host code)."""
    return -(-a // b)


@dataclass(frozen=True)
class VisibleBand:
    """The keys each query sees, as the kernels take it (see visibility_kernels): query i sees key j in
    [0, seq_kv) when lowest_diagonal <= j - i (if bounded_below) and j - i <= highest_diagonal (if
    bounded_above). The flags are compiled in; the diagonals are run-time arguments."""

    bounded_below: bool
    bounded_above: bool
    lowest_diagonal: int
    highest_diagonal: int


NO_BAND = VisibleBand(False, False, 0, 0)


def visible_band(desc: AttentionDescriptor) -> VisibleBand:
    """The band of `desc` (causal, window and alignment as `flashsdpa.visibility` defines them): query i,
    at key position i + offset, sees keys j with offset - left <= j - i <= offset + right.

    A diagonal past every pair (j - i lies in [1 - seq_q, seq_kv - 1]) is clamped there, which keeps it
    an int32 whatever the window."""
    if not (desc.causal or desc.windowed or desc.key_offset):
        return NO_BAND
    band = Visibility.of(desc)
    lowest = max(band.offset - band.left, -desc.seq_q)
    highest = min(band.offset + band.right, desc.seq_kv)
    return VisibleBand(band.left >= 0, band.right >= 0, lowest if band.left >= 0 else 0,
                       highest if band.right >= 0 else 0)


def score_arguments(desc: AttentionDescriptor, inputs: AttentionInputs, stand_in: torch.Tensor) -> tuple:
    """(alibi slopes, sinks, the slopes' (batch, head) strides) as the kernels take them; `stand_in` for the
    tensors a problem does not have (never read: ALIBI and SINKS are off)."""
    alibi = inputs.alibi_slopes if desc.alibi else stand_in
    sinks = inputs.sinks if desc.sinks else stand_in
    return alibi, sinks, (tuple(alibi.stride()) if desc.alibi else (0, 0))


def packed_alignment(desc: AttentionDescriptor) -> int:
    """The kernels' VARLEN for a packed batch of `desc` (common_kernels.VARLEN_*)."""
    if desc.alignment is Alignment.BOTTOM_RIGHT:
        return int(common_kernels.VARLEN_BOTTOM_RIGHT)
    return int(common_kernels.VARLEN_TOP_LEFT)


def packed_diagonals(desc: AttentionDescriptor) -> tuple[int, int]:
    """The band's diagonals of a packed batch, relative to each sequence's aligned position (the kernels
    add its offset), kept within the lengths' bounds so that they stay int32 whatever the window (see
    `visible_band`; the band's flags are `visible_band(desc)`'s)."""
    band = Visibility.of(desc)
    bound = desc.seq_q + desc.seq_kv
    return (max(-band.left, -bound) if band.left >= 0 else 0), (min(band.right, bound) if band.right >= 0 else 0)
