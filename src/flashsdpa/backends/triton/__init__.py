"""The Triton backend: flash-attention kernels for CUDA tensors.

Kernels (`*_kernels.py`) are kept apart from their launchers (`launch_*.py`)
and from the block-shape tables (`forward_configs.py`, `backward_configs.py`). The same kernels run on CPU
tensors under Triton's interpreter (TRITON_INTERPRET=1), which is how CI tests
them; the automatic dispatcher only picks this backend for CUDA tensors.
"""

from __future__ import annotations

import functools
import os

import torch

from flashsdpa.backends.base import AttentionInputs, Backend, GradientsNeeded, PackedSequences
from flashsdpa.cache import RecentValues
from flashsdpa.descriptor import AttentionDescriptor, Fp32Precision, MaskKind

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 512
# float32 at full precision: over this head dim the split products lost to
# torch's own float32 (H100, E=256, split tf32 before the float16 halves:
# 6.4e-7 relative error against 3.9e-7; the halves are not measured there).
MAX_FP32_HEAD_DIM = 128


@functools.lru_cache(maxsize=None)
def _indexed_device_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """torch.cuda.get_device_capability, asked once per device (it costs microseconds a call).

    A device without an index means the current one, which can change: not cached."""
    if device.index is None:
        return torch.cuda.get_device_capability(device)
    return _indexed_device_capability(device)


# Answers of `TritonBackend.unsupported_reasons` by descriptor and device. Bounded.
_reasons = RecentValues()


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _launchers():
    """The forward and backward launch modules, imported on the first call (an import statement costs ~1 us
    every call)."""
    from flashsdpa.backends.triton import launch_backward, launch_forward

    return launch_forward, launch_backward


class TritonBackend(Backend):
    name = "triton"
    checks_variants = True

    def unsupported_reasons(self, desc: AttentionDescriptor, device: torch.device) -> list[str]:
        # Asked on every call: the answer follows from the descriptor, the
        # device (its capability) and, for CPU tensors, TRITON_INTERPRET, so
        # it is kept per such key (a device without an index means whichever
        # is current: not kept).
        if device.type == "cpu":
            key = (desc, device, interpreter_enabled())
        elif device.index is not None:
            key = (desc, device)
        else:
            return self._reasons(desc, device)
        reasons = _reasons.get(key)
        if reasons is None:
            reasons = _reasons.keep(key, tuple(self._reasons(desc, device)))
        return list(reasons)

    def _reasons(self, desc: AttentionDescriptor, device: torch.device) -> list[str]:
        reasons = []
        try:
            import triton  # noqa: F401
        except ImportError as error:  # pragma: no cover - triton is a dependency
            return [f"triton is not importable ({error})"]
        if device.type == "cpu":
            if not interpreter_enabled():
                reasons.append("triton runs CPU tensors only under TRITON_INTERPRET=1")
        elif device.type != "cuda":
            reasons.append(f"triton does not run on device type {device.type}")
        if desc.dtype not in SUPPORTED_DTYPES:
            reasons.append(f"triton kernels take float16, bfloat16 and float32, not {desc.dtype}")
        if desc.dtype == torch.bfloat16 and device.type == "cuda" and cuda_capability(device)[0] < 8:
            reasons.append("bfloat16 needs a GPU of compute capability 8.0 or newer")
        if max(desc.head_dim, desc.head_dim_v) > MAX_HEAD_DIM:
            reasons.append(
                f"head dim {desc.head_dim}/{desc.head_dim_v} is over the triton kernels' maximum of {MAX_HEAD_DIM}"
            )
        if (
            desc.dtype == torch.float32
            and desc.fp32_precision is Fp32Precision.IEEE
            and max(desc.head_dim, desc.head_dim_v) > MAX_FP32_HEAD_DIM
        ):
            reasons.append(
                f"float32 head dim {desc.head_dim}/{desc.head_dim_v} is over the triton kernels' full-precision "
                f"maximum of {MAX_FP32_HEAD_DIM} (fp32_precision='tf32' is not limited)"
            )
        if min(desc.head_dim, desc.head_dim_v) == 0:
            reasons.append("head dim 0 is not supported by the triton kernels")
        if desc.mask is MaskKind.FLOAT and desc.mask_dtype not in SUPPORTED_DTYPES:
            reasons.append(f"attn_mask dtype {desc.mask_dtype} is not supported by triton")
        return reasons

    def forward(self, desc: AttentionDescriptor, inputs: AttentionInputs):
        return _launchers()[0].attention_forward(desc, inputs)

    runs_packed = True

    def packed_unsupported_reasons(self, desc: AttentionDescriptor, device: torch.device) -> list[str]:
        return self.unsupported_reasons(desc, device) + _launchers()[0].packed_unsupported_reasons(desc)

    def packed_forward(self, desc: AttentionDescriptor, inputs: AttentionInputs, packing: PackedSequences):
        return _launchers()[0].packed_attention_forward(desc, inputs, packing)

    def packed_backward(self, desc, inputs, out, lse, grad_out, needed: GradientsNeeded, packing: PackedSequences):
        return _launchers()[1].attention_backward(desc, inputs, out, lse, grad_out, needed, packing=packing)

    def backward(self, desc, inputs, out, lse, grad_out, needed: GradientsNeeded):
        return _launchers()[1].attention_backward(desc, inputs, out, lse, grad_out, needed)
