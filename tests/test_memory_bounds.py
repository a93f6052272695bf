"""The interpreter's memory-bounds checker (memory_bounds.py) fails an access outside the kernel's tensors."""

from __future__ import annotations

import os

import pytest
import torch
import triton
import triton.language as tl

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), reason="the checker runs under Triton's interpreter"
)


@triton.jit
def copy_kernel(src, dst, n, OVERRUN: tl.constexpr):
    offsets = tl.arange(0, 16)
    tl.store(dst + offsets, tl.load(src + offsets + OVERRUN, mask=offsets < n))


def test_in_bounds_access_passes():
    src, dst = torch.arange(16, dtype=torch.float32), torch.zeros(16)
    copy_kernel[(1,)](src, dst, 16, OVERRUN=0)
    assert torch.equal(src, dst)


def test_read_past_the_end_fails():
    src, dst = torch.arange(16, dtype=torch.float32), torch.zeros(16)
    with pytest.raises(Exception, match="outside every tensor argument"):
        copy_kernel[(1,)](src, dst, 16, OVERRUN=1)
