"""Count the kernel variants Triton itself compiles (or, under the interpreter, would compile) during a block.

A test that claims "no recompilation" must count what Triton keys its compiled
kernels on, not a flashsdpa cache whose key cannot change by construction. On a
GPU that is each kernel's own cache; under the interpreter, which compiles
nothing, every launch is bound and specialised as Triton's JITFunction.run does
for an sm_90 target (the binder compile_sm90 uses), and the distinct keys are
counted.
"""

from __future__ import annotations

import contextlib

from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction, compute_cache_key, create_function_from_signature

TARGET_BACKEND = make_backend(GPUTarget("cuda", 90, 32))


class CompiledVariants:
    def __init__(self) -> None:
        self.keys: set[tuple] = set()

    def __len__(self) -> int:
        return len(self.keys)


_binders: dict[int, object] = {}


def _cache_key(fn: InterpretedFunction, args, kwargs) -> tuple:
    jit = JITFunction(fn.fn, **{name: fn.kwargs.get(name) for name in ("do_not_specialize",
                                                                        "do_not_specialize_on_alignment")})
    binder = _binders.get(id(fn))
    if binder is None:
        binder = _binders[id(fn)] = create_function_from_signature(jit.signature, jit.params, TARGET_BACKEND)
    kwargs = {name: value for name, value in kwargs.items() if name not in ("grid", "warmup")}
    kwargs.setdefault("debug", False)
    kwargs.setdefault("instrumentation_mode", "")
    _, specialization, options = binder(*args, **kwargs)
    return fn.fn.__qualname__, compute_cache_key({}, specialization, options)


@contextlib.contextmanager
def triton_compiles():
    """Yields a CompiledVariants that collects the Triton cache key of every kernel launch in the block."""
    variants = CompiledVariants()
    run = InterpretedFunction.run

    def recording(self, *args, grid, warmup, **kwargs):
        variants.keys.add(_cache_key(self, args, kwargs))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording
    try:
        yield variants
    finally:
        InterpretedFunction.run = run
