"""Under Triton's interpreter, fail any kernel access outside the tensors it was given.

On a GPU an out-of-bounds access is at best an "illegal memory access" that
poisons the CUDA context for every later test, and at worst a silent read of a
neighbouring tensor. The interpreter runs kernels on real host addresses, so
every load and store can be checked: each launch records the byte extent of
each tensor argument (the span its view covers through its strides, not its
whole storage), and every masked-in address of a load or store must fall
inside one of them. `install()` patches the interpreter; the conftest calls it
when the kernels run interpreted.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

_launch = threading.local()


class OutOfBoundsAccess(AssertionError):
    pass


def tensor_extent(tensor: torch.Tensor) -> tuple[int, int] | None:
    """[first byte, one past the last byte) that the view `tensor` covers, or None when it is empty."""
    if tensor.numel() == 0:
        return None
    low = sum(min(0, stride) * (size - 1) for size, stride in zip(tensor.shape, tensor.stride()))
    high = sum(max(0, stride) * (size - 1) for size, stride in zip(tensor.shape, tensor.stride()))
    itemsize = tensor.element_size()
    return tensor.data_ptr() + low * itemsize, tensor.data_ptr() + (high + 1) * itemsize


def _extents_of(args) -> list[tuple[int, int]]:
    from triton.tools.tensor_descriptor import TensorDescriptor

    extents = []
    for arg in args:
        if isinstance(arg, TensorDescriptor):
            arg = arg.base
        if isinstance(arg, torch.Tensor):
            extent = tensor_extent(arg)
            if extent is not None:
                extents.append(extent)
    return extents


def _check(kernel_name: str, what: str, ptrs, mask) -> None:
    extents = getattr(_launch, "extents", None)
    if extents is None:
        return
    addresses = np.broadcast_to(ptrs.data, np.broadcast_shapes(ptrs.data.shape, np.shape(mask.data)))
    addresses = addresses[np.broadcast_to(mask.data, addresses.shape)].astype(np.uint64)
    if addresses.size == 0:
        return
    itemsize = ptrs.get_element_ty().primitive_bitwidth // 8
    starts = np.array([start for start, _ in extents], dtype=np.uint64)
    ends = np.array([end for _, end in extents], dtype=np.uint64)
    inside = ((addresses[:, None] >= starts[None, :]) & (addresses[:, None] + itemsize <= ends[None, :])).any(1)
    if not inside.all():
        bad = int(addresses[~inside][0])
        raise OutOfBoundsAccess(
            f"{kernel_name}: {what} of {int((~inside).sum())} element(s) outside every tensor argument, "
            f"first at {bad:#x}; argument extents: " + ", ".join(f"[{s:#x}, {e:#x})" for s, e in extents)
        )


def install() -> None:
    from triton.runtime import interpreter

    executor_call = interpreter.GridExecutor.__call__
    masked_load = interpreter.InterpreterBuilder.create_masked_load
    masked_store = interpreter.InterpreterBuilder.create_masked_store

    def call(self, *args, **kwargs):
        outer = getattr(_launch, "extents", None), getattr(_launch, "kernel", None)
        _launch.extents = _extents_of([*args, *kwargs.values()])
        _launch.kernel = getattr(self.fn, "__name__", "kernel")
        try:
            return executor_call(self, *args, **kwargs)
        finally:
            _launch.extents, _launch.kernel = outer

    def load(self, ptrs, mask, other, *args, **kwargs):
        _check(_launch.kernel, "load", ptrs, mask)
        return masked_load(self, ptrs, mask, other, *args, **kwargs)

    def store(self, ptrs, value, mask, *args, **kwargs):
        _check(_launch.kernel, "store", ptrs, mask)
        return masked_store(self, ptrs, value, mask, *args, **kwargs)

    interpreter.GridExecutor.__call__ = call
    interpreter.InterpreterBuilder.create_masked_load = load
    interpreter.InterpreterBuilder.create_masked_store = store
