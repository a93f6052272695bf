"""What the forward and backward block-shape tables share: the GPU's shared memory, padded widths, dot precision."""

from __future__ import annotations

import torch

from flashsdpa.descriptor import Fp32Precision, KernelKey

# Shared memory a block may use, by compute capability (CUDA's documented
# maxima for opt-in dynamic shared memory).
SHARED_MEMORY_BYTES = {(9, 0): 227 * 1024, (8, 0): 163 * 1024, (8, 7): 163 * 1024}
SHARED_MEMORY_BYTES_DEFAULT = 99 * 1024  # sm86, sm89 and others


def padded_head_dim(key: KernelKey) -> int:
    return max(key.block_head_dim, key.block_head_dim_v)


def dot_precision(key: KernelKey) -> str | None:
    if key.dtype != torch.float32:
        return None
    if key.fp32_precision is Fp32Precision.TF32:
        return "tf32"
    # tf32x3 (split-precision tensor cores) keeps float32 accuracy on the GPU;
    # the interpreter computes dots in numpy, where "ieee" is the exact product.
    return "tf32x3" if key.device_type == "cuda" else "ieee"


def uses_split_products(key: KernelKey) -> bool:
    """float32 at full precision: the main kernels multiply float16 halves of their operands (halves_kernels)."""
    return key.dtype == torch.float32 and key.fp32_precision is Fp32Precision.IEEE


def shared_memory_limit(capability: tuple[int, int]) -> int:
    if capability >= (9, 0):
        return SHARED_MEMORY_BYTES[(9, 0)]
    return SHARED_MEMORY_BYTES.get(capability, SHARED_MEMORY_BYTES_DEFAULT)
