"""Launching compiled Triton kernels without `JITFunction.run`'s per-call argument binding.

`kernel[grid](*args, **constexprs)` binds every argument, asks Triton's
specializer about each one, builds a string key from the result and the
options and looks the compiled kernel up: about half of a decode call's host
time on the H100's host, twice per call. A `DirectLaunch` (from `launcher`,
one per kernel and set of constexprs and options) launches like that call.
Its first call for each argument specialization goes through `kernel[grid]`
as usual and keeps the `CompiledKernel` that `run` returned; later calls with
the same specialization call that kernel's launcher directly, with the
arguments `run` would pass. `DirectLaunch.bind(*trailing)` fixes the last
run-time arguments (a launch plan's sizes and scale): their part of the key
is computed once, and the kept kernels are shared by every binding.

Reuse is exactly as safe as `run`'s own cache because the key holds everything
Triton 3.6 specializes a kernel on (`specialization_terms` generates the code
that computes it; `tests/test_direct_launch.py` checks that it splits argument
tuples exactly as Triton's binder and key do): the current device, the
`debug` and `instrumentation_mode` options, each argument's Python type, and
per argument

    torch.Tensor     its dtype; whether data_ptr() % 16 == 0 (unless the
                     parameter is in do_not_specialize or
                     do_not_specialize_on_alignment)
    int              whether == 1 (unless do_not_specialize), and otherwise
                     whether % 16 == 0 (unless either list names it); for
                     every int, whether all of them fit int32 (else each
                     one's width: i32, i64 or u64)
    TensorDescriptor its base's dtype and its block shape
    float, bool, None  nothing but the type (fp32, u1, constexpr None)

Anything else (another argument type, annotated parameters, a callable grid,
pre-run hooks, a Triton other than 3.6, a backend without native tensor
specialization, the interpreter, `ENABLED = False`) takes `kernel[grid]` every
time. A kept kernel is used only while it is still the one in Triton's own
cache under its key (a cleared cache sends the call back through `run`), and
calls still read the current device and stream, check the kernel's global
constants and pass the launch hooks as `run` does.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch

try:  # every name the direct path needs; without one of them, kernels launch through `run`
    import triton
    import triton.language as tl
    from triton import knobs
    from triton.compiler import CompiledKernel
    from triton.knobs import HookChain
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the installed Triton
    JITFunction = None

# The Triton versions whose specialization rules (triton/runtime/jit.py and
# native_specialize_impl, python/src/specialize.cc) `specialization_terms`
# reproduces. Another version launches through `run` until checked against it.
SUPPORTED_TRITON = ((3, 6),)
# False: every kernel launches through `run` (scripts/host_overhead.py --no-direct, for comparisons).
# Read when a launcher is made: set it before the first call.
ENABLED = True
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
UNSUPPORTED = object()  # an argument layout the direct path does not handle
# What the direct path reads of each of a JITFunction's KernelParams.
PARAM_FIELDS = ("num", "name", "default", "is_constexpr", "annotation", "do_not_specialize",
                "do_not_specialize_on_alignment")
# Kernels kept per argument layout; the terms take few values, so this bound is only a guard.
MAX_KERNELS_PER_LAYOUT = 64
MAX_LAUNCHERS = 4096


def triton_version_supported() -> bool:
    if JITFunction is None:
        return False
    major, minor = triton.__version__.split(".")[:2]
    return (int(major), int(minor)) in SUPPORTED_TRITON


def int_width(value: int) -> str:
    """The type Triton gives a non-constexpr int argument: i32, i64 or u64 by its range."""
    if INT32_MIN <= value <= INT32_MAX:
        return "i32"
    if -(2**63) <= value < 2**63:
        return "i64"
    if 0 <= value < 2**64:
        return "u64"
    return "overflow"  # Triton raises OverflowError: never cached, as `run` raises first


def int_widths(values: tuple[int, ...]) -> tuple[str, ...]:
    return tuple(map(int_width, values))


def specialization_terms(params, types: tuple[type, ...], extra: tuple[str, ...] = ()) -> Callable | None:
    """A function f(a, *extra) -> tuple that tells apart every two tuples `a` of arguments of these
    exact `types` for the parameters `params` that Triton 3.6 specializes differently (the `extra`
    values are prepended to the tuple); None where the direct path does not handle them.

    `params` are the kernel's `KernelParam`s the arguments go to, in order.
    """
    if len(types) != len(params):
        return None
    terms, ints = [*extra], []
    for index, (param, arg_type) in enumerate(zip(params, types)):
        if param.is_constexpr or param.annotation:
            return None  # constexprs come as keywords; annotations change the rules
        arg = f"a{index}"
        specialize = not param.do_not_specialize
        align = specialize and not param.do_not_specialize_on_alignment
        if arg_type is int:
            ints.append(arg)
            if align:  # ("constexpr", 1), or divisible by 16 ("D") or not: one expression for the three
                terms.append(f"not {arg} & 15 if {arg} != 1 else 2")
            elif specialize:
                terms.append(f"{arg} == 1")
        elif isinstance(arg_type, type) and issubclass(arg_type, torch.Tensor):
            terms.append(f"{arg}.dtype")
            if align:
                terms.append(f"not {arg}.data_ptr() & 15")  # "D": 16-byte aligned
        elif arg_type is TensorDescriptor:
            terms.append(f"{arg}.base.dtype")
            terms.append(f"tuple({arg}.block_shape)")
        elif arg_type not in (float, bool, type(None)):
            return None
    if ints:
        listed = ", ".join(ints)
        low, high = (f"{name}({listed})" if len(ints) > 1 else listed for name in ("min", "max"))
        terms.append(f"True if {INT32_MIN} <= {low} and {high} <= {INT32_MAX} else int_widths(({listed},))")
    unpack = "".join(f"a{index}, " for index in range(len(types))) + "= a\n    " if types else ""
    parameters, values = "".join(f"{name}, " for name in extra), "".join(f"{term}, " for term in terms)
    namespace = {"int_widths": int_widths}
    # Straight-line code over locals: ~2-3 us for 24 arguments on this CPU, a third of a generic loop's time.
    exec(f"def terms(a, {parameters}):\n    {unpack}return ({values})\n", namespace)
    return namespace["terms"]


class ArgumentLayout:
    """Per tuple of leading argument types: the generated specialization function and the kernels
    found so far (shared by every `BoundLaunch` of the variant, keyed with their trailing terms)."""

    __slots__ = ("terms", "kernels")

    def __init__(self, terms: Callable) -> None:
        self.terms = terms
        # by key: (CompiledKernel, its launcher, function, packed metadata, its key in the JITFunction's cache)
        self.kernels: dict[tuple, tuple] = {}


def launcher(kernel, **constexprs) -> DirectLaunch:
    """The `DirectLaunch` of `kernel` with these constexprs and options, one per distinct set.

    Shared by every launch plan of the variant, so a plan made for a new
    call shape (a decode step whose key cache grew by one) finds the
    compiled kernels the earlier shapes' launches kept.
    """
    # The types too: True == 1, yet Triton keys them apart (and floats by repr: 0.0 == -0.0).
    values = tuple(constexprs.values())
    types = tuple(map(type, values))
    variant = (id(kernel), tuple(constexprs), values, types, float in types and tuple(map(repr, values)))
    found = _launchers.get(variant)
    if found is None or found.kernel is not kernel:
        if len(_launchers) >= MAX_LAUNCHERS:
            _launchers.clear()
        found = _launchers[variant] = DirectLaunch(kernel, constexprs)
    return found


class DirectLaunch:
    """`kernel[grid](*args, **constexprs)` for fixed `constexprs` (options such as num_warps included).

    Make them with `launcher(kernel, **constexprs)`, which shares one per
    variant. `launch(grid, *args)` launches; `launch.bind(*trailing)` fixes
    the last run-time arguments (a plan's sizes) so that their part of the
    key is computed once.
    """

    def __init__(self, kernel, constexprs: dict) -> None:
        self.kernel = kernel
        self.constexprs = dict(constexprs)
        self.enabled = (
            ENABLED
            and triton_version_supported()
            and isinstance(kernel, JITFunction)
            and all(hasattr(kernel, name) for name in ("params", "device_caches", "pre_run_hooks", "used_global_vals"))
        )
        self.layouts: dict[tuple[type, ...], ArgumentLayout | object] = {}
        self.trailing_terms: dict[tuple, Callable | object] = {}  # by (leading count, trailing types)
        # Run-time parameters, then constexprs with a value among the keywords or a default (as every
        # flashsdpa kernel has them): the run-time count and the constexpr values; else every launch
        # goes through `run`.
        self.runtime_count, self.constexpr_values = -1, ()
        params = kernel.params if self.enabled else []
        if not all(hasattr(p, name) for p in params for name in PARAM_FIELDS):
            params = []  # not Triton 3.6's KernelParam: launches go through `run`
        runtime = next((p.num for p in params if p.is_constexpr), len(params))
        values = tuple(self.constexprs.get(p.name, p.default) for p in params[runtime:])
        if (
            params
            and all(p.is_constexpr for p in params[runtime:])
            and not any(p.name in self.constexprs for p in params[:runtime])
            and not any(value is inspect.Parameter.empty for value in values)
        ):
            self.runtime_count, self.constexpr_values = runtime, values
        self._unbound = self.bind()

    def __call__(self, grid: tuple[int, ...], *args) -> None:
        self._unbound(grid, *args)

    def bind(self, *trailing) -> BoundLaunch:
        return BoundLaunch(self, trailing)

    def new_layout(self, types: tuple[type, ...]):
        """The layout of leading arguments of `types` (UNSUPPORTED where the direct path does not take them)."""
        params = self.kernel.params
        terms = None
        if len(types) <= len(params):
            terms = specialization_terms(params[:len(types)], types, ("device", "debug", "instrumentation", "trailing"))
        layout = self.layouts[types] = UNSUPPORTED if terms is None else ArgumentLayout(terms)
        return layout

    def globals_unchanged(self) -> bool:
        """`run`'s check that the globals the kernel read at compile time still hold their values."""
        for (name, _), (value, globals_dict) in self.kernel.used_global_vals.items():
            current = globals_dict.get(name, UNSUPPORTED)
            if type(current) is tl.constexpr and type(value) is tl.constexpr:
                # What constexpr's != compares, without the constexprs it builds (Triton keeps deep copies,
                # so the objects differ; ~12 us a launch on the H100's host).
                if current.value != value.value:
                    return False
            elif current != value:
                return False
        return True


class BoundLaunch:
    """A `DirectLaunch` with its last run-time arguments fixed: `bound(grid, *leading)`."""

    __slots__ = ("launch", "trailing", "leading_count", "tail", "trailing_key")

    def __init__(self, launch: DirectLaunch, trailing: tuple) -> None:
        self.launch = launch
        self.trailing = trailing
        # -1 where the direct path does not take this launch: every call goes through `run`.
        self.leading_count, self.tail, self.trailing_key = -1, (), None
        leading_count = launch.runtime_count - len(trailing)
        if launch.runtime_count < 0 or leading_count < 0:
            return
        trailing_types = tuple(map(type, trailing))
        terms = launch.trailing_terms.get((leading_count, trailing_types))
        if terms is None:  # one function per layout of trailing arguments: plans are made per call shape
            params = launch.kernel.params[leading_count:launch.runtime_count]
            terms = specialization_terms(params, trailing_types) or UNSUPPORTED
            launch.trailing_terms[leading_count, trailing_types] = terms
        if terms is UNSUPPORTED:
            return
        self.leading_count = leading_count
        self.tail = (*trailing, *launch.constexpr_values)  # the launcher takes every argument, constexprs too
        self.trailing_key = (trailing_types, terms(trailing))

    def __call__(self, grid: tuple[int, ...], *args) -> None:
        launch = self.launch
        fn = launch.kernel
        if len(args) != self.leading_count or type(grid) is not tuple or fn.pre_run_hooks:
            fn[grid](*args, *self.trailing, **launch.constexprs)
            return
        types = tuple(map(type, args))
        layout = launch.layouts.get(types)
        if layout is None:
            layout = launch.new_layout(types)
        if layout is UNSUPPORTED:
            fn[grid](*args, *self.trailing, **launch.constexprs)
            return
        if not layout.kernels:  # nothing launched yet: the driver may not even be there (compile-only tools)
            self._run_and_keep(grid, args, layout)
            return
        active, runtime = driver.active, knobs.runtime
        device = active.get_current_device()
        key = layout.terms(
            args, device, launch.constexprs.get("debug", fn.debug) or runtime.debug,  # as `run` sets it
            knobs.compilation.instrumentation_mode, self.trailing_key,
        )  # fmt: skip
        cached = layout.kernels.get(key)
        caches = fn.device_caches.get(device)
        if (
            cached is None
            or caches is None
            or caches[0].get(cached[4]) is not cached[0]  # Triton's cache was cleared
            or (fn.used_global_vals and not launch.globals_unchanged())
        ):
            self._run_and_keep(grid, args, layout, key)
            return
        kernel, launcher, function, packed_metadata, _ = cached
        stream = active.get_current_stream(device)
        enter_hook, exit_hook = runtime.launch_enter_hook, runtime.launch_exit_hook
        # An empty HookChain calls nothing: pass None, as `run` does for no hook, and skip the metadata.
        if type(enter_hook) is HookChain and not enter_hook.calls:
            enter_hook = None
        if type(exit_hook) is HookChain and not exit_hook.calls:
            exit_hook = None
        all_args = args + self.tail
        metadata = None
        if enter_hook is not None or exit_hook is not None:
            metadata = kernel.launch_metadata(grid, stream, *all_args)
        grid_size = len(grid)
        launcher(
            grid[0], grid[1] if grid_size > 1 else 1, grid[2] if grid_size > 2 else 1, stream,
            function, packed_metadata, metadata, enter_hook, exit_hook, *all_args,
        )  # fmt: skip

    def _run_and_keep(self, grid, args: tuple, layout: ArgumentLayout, key: tuple | None = None) -> None:
        """`run` itself (it compiles on a miss and raises for changed globals or bad arguments); keeps
        the kernel it launched if that is a CompiledKernel in Triton's cache for a backend that
        specializes natively (the rules `specialization_terms` follows)."""
        launch = self.launch
        fn = launch.kernel
        kernel = fn[grid](*args, *self.trailing, **launch.constexprs)
        # Set once `run` has launched it (Triton 3.6's names; a kernel without them is not kept).
        launcher, function = getattr(kernel, "_run", None), getattr(kernel, "function", None)
        packed_metadata = getattr(kernel, "packed_metadata", None)
        if not isinstance(kernel, CompiledKernel) or launcher is None or function is None:  # None, a future
            return
        device = driver.active.get_current_device()
        caches = fn.device_caches.get(device)
        if caches is None or not getattr(caches[3], "supports_native_tensor_specialization", False):
            return
        triton_key = next((k for k, v in caches[0].items() if v is kernel), None)
        if triton_key is None:
            return
        if key is None:
            debug = launch.constexprs.get("debug", fn.debug) or knobs.runtime.debug
            key = layout.terms(args, device, debug, knobs.compilation.instrumentation_mode, self.trailing_key)
        if len(layout.kernels) >= MAX_KERNELS_PER_LAYOUT:
            layout.kernels.clear()
        layout.kernels[key] = (kernel, launcher, function, packed_metadata, triton_key)


_launchers: dict[tuple, DirectLaunch] = {}
