"""The direct launch path (`backends/triton/direct_launch.py`) reuses a compiled kernel exactly when Triton would.

No GPU is needed: Triton's own binder (`create_function_from_signature`
with the sm_90 CUDA backend, the code `JITFunction.run` runs) gives the
specialization of each argument tuple, and `compute_cache_key` the key under
which `run` looks its kernel up. The generated specialization terms must
split argument tuples exactly as that key does: never one term for two keys
(a wrong kernel would launch), and no more than one term per key (each extra
one is a needless trip through `run`). A run that does what Triton's does on
a cache hit, with stand-in kernels that record their launches, checks the
whole path: which kernel launches, with which arguments, and when `run` is
asked instead; with JITFunction twins of flashsdpa's kernels it checks the
launch plans' direct launches against run's for the same calls.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import triton.language as tl
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import CompiledKernel, make_backend
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction, compute_cache_key, create_function_from_signature
from triton.tools.tensor_descriptor import TensorDescriptor

from flashsdpa.backends.triton import backward_kernels, decode_kernels, direct_launch, forward_kernels
from flashsdpa.backends.triton.direct_launch import DirectLaunch, int_width, launcher, specialization_terms

pytestmark = pytest.mark.skipif(
    not direct_launch.triton_version_supported(), reason="the direct path follows Triton 3.6's specialization"
)

SM90 = GPUTarget("cuda", 90, 32)
BACKEND = make_backend(SM90)
RUN_OPTIONS = {"debug": False, "instrumentation_mode": ""}  # what `run` adds to the launch's keywords
EXTRA = ("device", "debug", "instrumentation", "trailing")


def toy_kernel(x_ptr, y_ptr, z_ptr, n, count, width, stride, scale, flag, maybe, desc, BLOCK: tl.constexpr,
               MODE: tl.constexpr = 0):
    pass


def as_jit(kernel) -> JITFunction:
    """The JITFunction of a kernel (under the interpreter, rebuilt from the same function and lists)."""
    if isinstance(kernel, JITFunction):
        return kernel
    lists = ("do_not_specialize", "do_not_specialize_on_alignment")
    return JITFunction(kernel.fn, **{name: kernel.kwargs.get(name) for name in lists})


TOY = JITFunction(toy_kernel, do_not_specialize=["count", "z_ptr"], do_not_specialize_on_alignment=["width", "y_ptr"])


_binders: dict[int, tuple] = {}
_terms: dict[tuple, object] = {}


def binder_of(fn: JITFunction):
    """Triton's binder for `fn` (what `run` calls first), made once per function."""
    if id(fn) not in _binders:
        _binders[id(fn)] = (fn, create_function_from_signature(fn.signature, fn.params, BACKEND))
    return _binders[id(fn)][1]


def triton_key(fn: JITFunction, args: tuple, keywords: dict) -> str:
    """The key `run` looks the kernel up by, from Triton's own binder, for a launch with these keywords."""
    _, specialization, options = binder_of(fn)(*args, **keywords, **RUN_OPTIONS)
    return compute_cache_key({}, specialization, options)


def terms_of(fn: JITFunction, types: tuple):
    if (id(fn), types) not in _terms:
        _terms[id(fn), types] = specialization_terms(fn.params[: len(types)], types, EXTRA)
    return _terms[id(fn), types]


def our_key(fn: JITFunction, args: tuple, terms=None):
    types = tuple(map(type, args))
    terms = terms or terms_of(fn, types)
    assert terms is not None, types
    return types, terms(args, 0, False, "", ())


def tensor(dtype: torch.dtype, offset: int, numel: int = 64) -> torch.Tensor:
    """A 1-D view starting `offset` elements into a fresh 16-byte aligned buffer."""
    return torch.zeros(numel + offset, dtype=dtype)[offset:]


TENSORS = [tensor(dtype, offset) for dtype in (torch.float16, torch.float32) for offset in (0, 1, 2, 4, 8)]
INTS = [0, 1, 2, 15, 16, 17, 32, 33, 48, -16, -1, -17, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, -(2**31),
        -(2**31) - 1, -(2**31) - 16, 2**40, 2**40 + 1, 2**63 - 1, 2**63, 2**63 + 16, 2**64 - 16]
DESCRIPTORS = [TensorDescriptor(torch.zeros(64, 64, dtype=dtype), [64, 64], [64, 1], block)
               for dtype in (torch.float16, torch.bfloat16) for block in ([16, 16], [32, 16])]
DOMAINS = {  # the values each toy_kernel argument takes
    "x_ptr": TENSORS, "y_ptr": TENSORS, "z_ptr": TENSORS[:6], "n": INTS, "count": INTS, "width": INTS,
    "stride": INTS, "scale": [0.5, -1.0, 1.0, 16.0, float("nan")], "flag": [True, False],
    "maybe": [TENSORS[0], None, TENSORS[1], TENSORS[5]], "desc": DESCRIPTORS,
}


def toy_args(rng: random.Random) -> tuple:
    return tuple(rng.choice(values) for values in DOMAINS.values())


def one_at_a_time() -> list[tuple]:
    """From a base tuple, each argument through its whole domain (every aspect on its own)."""
    base = tuple(values[0] for values in DOMAINS.values())
    return [base[:i] + (value,) + base[i + 1:] for i, values in enumerate(DOMAINS.values()) for value in values]


def partition_mismatches(fn: JITFunction, argument_tuples, constexprs: dict, terms_for=None) -> list[str]:
    """Pairs of argument tuples that our terms and Triton's key split differently."""
    ours_by_triton, triton_by_ours = {}, {}
    for args in argument_tuples:
        try:
            theirs = triton_key(fn, args, constexprs)
        except OverflowError:  # `run` raises before any kernel is looked up; never kept
            assert "overflow" in map(int_width, (a for a in args if type(a) is int))
            continue
        types = tuple(map(type, args))
        ours = our_key(fn, args, terms_for(types) if terms_for else None)
        ours_by_triton.setdefault(theirs, set()).add(ours)
        triton_by_ours.setdefault(ours, set()).add(theirs)
    return [f"one term for {len(t)} Triton keys: {sorted(t)[:2]}" for t in triton_by_ours.values() if len(t) > 1] + [
        f"Triton key {k} has {len(o)} terms" for k, o in ours_by_triton.items() if len(o) > 1]


def test_terms_split_argument_tuples_as_triton_does():
    rng = random.Random(0)
    tuples = one_at_a_time() + [toy_args(rng) for _ in range(3000)]
    assert partition_mismatches(TOY, tuples, {"BLOCK": 16, "num_warps": 4}) == []


def test_every_term_is_needed():
    """Dropping any one term of the generated function merges argument tuples Triton keeps apart,
    so the test above would catch a key that missed that aspect."""
    rng = random.Random(1)
    maybe = list(DOMAINS).index("maybe")
    tuples = one_at_a_time() + [toy_args(rng) for _ in range(500)]
    tuples = [args for args in tuples if args[maybe] is not None]  # one layout: each term index is one term
    full = terms_of(TOY, tuple(map(type, tuples[0])))
    width = len(full(tuples[0], 0, False, "", ()))
    assert width >= len(EXTRA) + 12
    for dropped in range(len(EXTRA), width):  # the extra values are constants here

        def terms_for(arg_types, dropped=dropped):
            terms = terms_of(TOY, arg_types)
            return lambda *a: (lambda t: t[:dropped] + t[dropped + 1:])(terms(*a))

        mismatches = partition_mismatches(TOY, tuples, {"BLOCK": 16, "num_warps": 4}, terms_for)
        assert any(m.startswith("one term for") for m in mismatches), f"term {dropped} is never needed"


@pytest.mark.parametrize("value", INTS + [2**64, -(2**63) - 1])
def test_int_width_is_tritons_type(value):
    try:
        kind, _ = triton_key_parts(value)
    except OverflowError:
        assert int_width(value) == "overflow"
        return
    assert int_width(value) == kind


def triton_key_parts(value: int):
    args = list(one_at_a_time()[0])
    args[4] = value  # `count`: not specialized, so 1 is an integer too
    return binder_of(TOY)(*args, BLOCK=16)[1][4]


def real_kernel_arguments(name: str) -> tuple[JITFunction, tuple, dict]:
    """A flashsdpa kernel with arguments as its launcher passes them (bf16 decode-sized problem)."""
    q, k, out = tensor(torch.bfloat16, 0, 4096), tensor(torch.bfloat16, 0, 4096), tensor(torch.bfloat16, 0, 4096)
    f32 = tensor(torch.float32, 0, 4096)
    strides = (4096, 128, 128, 1)
    if name == "decode split":
        args = (q, k, k, q, f32, f32, out, f32, f32, f32, *strides, *strides, *strides, 0, 0, 0, 0, 0, 0, 128,
                32, 8, 4, 1, 4096, 128, 128, 1, 5, 832, 0, 0, 0, 0.088, 0.0)
        return as_jit(decode_kernels.attention_decode_split_kernel), args, {
            "BOUNDED_BELOW": False, "BOUNDED_ABOVE": False, "MASK_KIND": 0, "SOFTCAP": False, "ALIBI": False,
            "SINKS": False, "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_D": 128, "BLOCK_DV": 128,
            "DOT_PRECISION": None, "WIDEN_DOT_OPERANDS": False}
    if name == "forward":
        args = (q, k, k, q, out, f32, f32, f32, f32, f32, f32, f32, f32, f32, *strides, *strides, *strides, 0, 0, 0, 0, *strides,
                0, 0, 16, 1, 1024, 1024, 128, 128, 8, 0, 0, 0, 0.088, 0.0, 0, 0, 0, 1.0)
        return as_jit(forward_kernels.attention_forward_kernel), args, {
            "BOUNDED_BELOW": False, "BOUNDED_ABOVE": False, "MASK_KIND": 0, "SOFTCAP": False, "ALIBI": False,
            "SINKS": False, "MASK_ROWS_BROADCAST": False, "DROPOUT": False, "BLOCK_M": 128,
            "BLOCK_N": 64, "BLOCK_D": 128, "BLOCK_DV": 128, "DOT_PRECISION": None, "WIDEN_DOT_OPERANDS": False,
            "FP16_HALVES": False, "TILE_LOADS": 0, "WARP_SPECIALIZE": False}
    args = (q, k, k, q, q, out, out, *(f32,) * 12, *strides, *strides, *strides, 0, 0, 0, 0, *strides, *strides,
            *strides, 0, 0, 0.088, 1024, 1024, 8, 2, 1024, 0, 0, 0, 0.0, 0, 0, 0, 1.0)
    return as_jit(backward_kernels.attention_backward_dkdv_kernel), args, {
        "HEAD_DIM": 128, "HEAD_DIM_V": 128, "BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_D": 128, "BLOCK_DV": 128,
        "BOUNDED_BELOW": False, "BOUNDED_ABOVE": False, "SOFTCAP": False, "ALIBI": False, "MASK_KIND": 0,
        "MASK_ROWS_BROADCAST": False, "DROPOUT": False,
        "RENORMALIZE": False,
        "COMPUTE_DK": True, "COMPUTE_DV": True, "DOT_PRECISION": None, "WIDEN_DOT_OPERANDS": False,
        "SPLIT_OPERANDS": False, "FP16_HALVES": False, "MASK_SEED": False, "TILE_LOADS": 0, "EARLY_DP": True,
        "SPLIT_GROUP": False, "GQA": False}


@pytest.mark.parametrize("name", ["decode split", "forward", "dkdv"])
def test_terms_of_flashsdpa_kernels(name):
    """Each argument of a real kernel varied on its own (alignment, 1, 16, 17, int32 overflow) and in
    random combinations: the terms split the tuples exactly as Triton's key does."""
    fn, base, constexprs = real_kernel_arguments(name)
    rng = random.Random(2)
    tuples = [base]
    for i, arg in enumerate(base):
        if type(arg) is int:
            tuples += [base[:i] + (value,) + base[i + 1:] for value in (0, 1, 16, 17, 32, 2**31, 2**33 + 16)]
        elif isinstance(arg, torch.Tensor):
            tuples += [base[:i] + (tensor(arg.dtype, offset, 4096),) + base[i + 1:] for offset in (1, 2, 8)]
            tuples.append(base[:i] + (tensor(torch.float16, 0, 4096),) + base[i + 1:])
    for _ in range(300):
        tuples.append(tuple(rng.choice(column) for column in zip(*tuples)))
    assert partition_mismatches(fn, tuples, {**constexprs, "num_warps": 8, "num_stages": 2}) == []


# The whole path, with a run that does what Triton's does on a cache hit (and keeps a stand-in on a miss).


class Driver:
    device = 0

    def get_current_device(self) -> int:
        return self.device

    def get_current_stream(self, device: int) -> int:
        return 1000 + device


class Recorder:
    def __init__(self) -> None:
        self.launches: list[dict] = []
        self.runs = 0


def stand_in(key: str, recorder: Recorder) -> CompiledKernel:
    kernel = CompiledKernel.__new__(CompiledKernel)
    kernel.module, kernel.function, kernel.packed_metadata = object(), hash(key), (4, 1, 0)
    kernel.name, kernel.src = key, None

    def launch(*launch_args):
        grid_x, grid_y, grid_z, stream, function, _, metadata, enter, exit_, *args = launch_args
        recorder.launches.append(dict(key=key, grid=(grid_x, grid_y, grid_z), stream=stream, function=function,
                                      args=args, enter=enter, exit=exit_, metadata=metadata))

    kernel._run = launch
    return kernel


def install_run(fn: JITFunction, recorder: Recorder) -> None:
    """Triton 3.6's `run` (jit.py) with stand-in kernels in place of compiling and launching."""
    binder = create_function_from_signature(fn.signature, fn.params, BACKEND)

    def run(*args, grid, warmup, **kwargs):
        recorder.runs += 1
        kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        device = driver.active.get_current_device()
        stream = driver.active.get_current_stream(device)
        if device not in fn.device_caches:
            fn.device_caches[device] = ({}, {}, SM90, BACKEND, binder)
        kernel_cache, key_cache, _, _, _ = fn.device_caches[device]
        bound_args, specialization, options = binder(*args, **kwargs)
        if callable(grid):
            grid = grid(bound_args)
        key = compute_cache_key(key_cache, specialization, options)
        kernel = kernel_cache.get(key)
        if kernel is None:
            kernel = kernel_cache[key] = stand_in(key, recorder)
        for (name, _), (value, globals_dict) in fn.used_global_vals.items():
            if globals_dict.get(name) != value:
                raise RuntimeError(f"Global variable {name} has changed")
        grid = grid + (1,) * (3 - len(grid))
        metadata = kernel.launch_metadata(grid, stream, *bound_args.values())
        kernel.run(*grid, stream, kernel.function, kernel.packed_metadata, metadata,
                   knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *bound_args.values())
        return kernel

    fn.run = run


@pytest.fixture
def toy(monkeypatch):
    fn = JITFunction(toy_kernel, do_not_specialize=["count", "z_ptr"],
                     do_not_specialize_on_alignment=["width", "y_ptr"])
    recorder = Recorder()
    install_run(fn, recorder)
    fake_driver = Driver()
    monkeypatch.setattr(driver, "_active", fake_driver)
    return fn, recorder, fake_driver


def expected_launch(fn: JITFunction, args: tuple, constexprs: dict) -> tuple[str, list]:
    bound_args, _, _ = binder_of(fn)(*args, **constexprs)
    return triton_key(fn, args, constexprs), list(bound_args.values())


def test_direct_launches_the_kernel_run_would(toy):
    fn, recorder, fake_driver = toy
    constexprs = {"BLOCK": 16, "num_warps": 4}
    launch = DirectLaunch(fn, constexprs)
    rng = random.Random(3)
    pool = [toy_args(rng) for _ in range(40)]
    pool = [args for args in pool if "overflow" not in map(int_width, (a for a in args if type(a) is int))]
    calls = [rng.choice(pool) for _ in range(400)]
    seen = set()
    for args in calls:
        launch((3, 2), *args)
        key, bound = expected_launch(fn, args, constexprs)
        seen.add((tuple(map(type, args)), key))
        last = recorder.launches[-1]
        assert last["key"] == key
        assert last["args"] == bound and all(a is b for a, b in zip(last["args"], bound))
        assert last["grid"] == (3, 2, 1) and last["stream"] == 1000
        assert last["enter"] in (None, knobs.runtime.launch_enter_hook)  # None: an empty HookChain, direct
    assert len(recorder.launches) == len(calls)
    assert recorder.runs == len(seen) < len(calls)  # run once per (argument types, Triton key); the rest direct


def test_bound_trailing_arguments_are_in_the_key(toy):
    fn, recorder, _ = toy
    launch = DirectLaunch(fn, {"BLOCK": 16})
    base = one_at_a_time()[0]
    for trailing_stride in (1, 17, 16, 1, 17, 16):  # `stride` is specialized: 1, D and neither
        bound = launch.bind(trailing_stride, *base[7:])
        bound((1,), *base[:6])
        assert recorder.launches[-1]["key"] == expected_launch(fn, (*base[:6], trailing_stride, *base[7:]),
                                                               {"BLOCK": 16})[0]
    assert recorder.runs == 3


def test_run_is_asked_whenever_triton_would_look_again(toy, monkeypatch):
    fn, recorder, fake_driver = toy
    launch = launcher(fn, BLOCK=16)
    args = one_at_a_time()[0]
    call = lambda: launch((1,), *args)  # noqa: E731
    call(), call()
    assert recorder.runs == 1 and len(recorder.launches) == 2

    fn.device_caches[0][0].clear()  # a cleared Triton cache: the kept kernel may be stale
    call(), call()
    assert recorder.runs == 2

    fake_driver.device = 1  # another device has its own kernels and stream
    call(), call()
    assert recorder.runs == 3 and recorder.launches[-1]["stream"] == 1001

    monkeypatch.setattr(knobs.runtime, "debug", True)  # an option in Triton's key
    call(), call()
    assert recorder.runs == 4 and "'debug': True" in recorder.launches[-1]["key"]
    monkeypatch.setattr(knobs.runtime, "debug", False)
    call()
    assert recorder.runs == 4

    scope = {"G": 1}
    fn.used_global_vals = {("G", id(scope)): (1, scope)}
    call()
    assert recorder.runs == 4
    scope["G"] = 2  # run raises for a global changed since compiling; so must the direct path
    with pytest.raises(RuntimeError, match="Global variable G"):
        call()
    scope["G"] = 1
    call()
    # Module constants are tl.constexpr objects, kept by Triton as deep copies: equal values pass, others do not.
    import triton.language as tl

    scope["G"] = tl.constexpr(1)
    fn.used_global_vals = {("G", id(scope)): (tl.constexpr(1), scope)}
    runs = recorder.runs
    call()
    assert recorder.runs == runs
    scope["G"] = tl.constexpr(2)
    with pytest.raises(RuntimeError, match="Global variable G"):
        call()
    scope["G"] = tl.constexpr(1)
    call()

    hook_calls = []
    knobs.runtime.launch_enter_hook.add(hook_calls.append)
    try:
        call()
        assert recorder.launches[-1]["enter"] is knobs.runtime.launch_enter_hook
        assert recorder.launches[-1]["metadata"].get()["name"] == recorder.launches[-1]["key"]
    finally:
        knobs.runtime.launch_enter_hook.remove(hook_calls.append)
    runs = recorder.runs

    fn.pre_run_hooks.append(lambda *a, **k: None)  # run calls them: the direct path steps aside
    call()
    assert recorder.runs == runs + 1
    fn.pre_run_hooks.clear()
    launch(lambda meta: (1,), *args)  # a callable grid is run's to evaluate
    assert recorder.runs == runs + 2


def test_unhandled_arguments_always_go_through_run(toy):
    import numpy as np

    fn, recorder, _ = toy
    launch = DirectLaunch(fn, {"BLOCK": 16})
    args = list(one_at_a_time()[0])
    args[3] = np.int64(16)  # Triton would raise for it; run is the one to say so
    with pytest.raises(TypeError):
        launch((1,), *args)
    assert recorder.runs == 1 and recorder.launches == []


def test_variants_share_one_launcher():
    """One launcher per call site's variant (keywords in the site's order); values Triton keys apart
    (True and 1, 0.0 and -0.0) get launchers of their own."""
    fn = as_jit(decode_kernels.merge_decode_splits_kernel)
    first = launcher(fn, BLOCK_SPLITS=128, BLOCK_DV=64, ROUND_BFLOAT16=False, num_warps=4)
    assert launcher(fn, BLOCK_SPLITS=128, BLOCK_DV=64, ROUND_BFLOAT16=False, num_warps=4) is first
    assert launcher(fn, BLOCK_SPLITS=128, BLOCK_DV=64, ROUND_BFLOAT16=0, num_warps=4) is not first
    signed = launcher(TOY, BLOCK=16, MODE=0.0)
    assert launcher(TOY, BLOCK=16, MODE=-0.0) is not signed and launcher(TOY, BLOCK=16, MODE=0.0) is signed


def test_interpreted_kernels_launch_through_run():
    if isinstance(decode_kernels.merge_decode_splits_kernel, JITFunction):
        pytest.skip("the kernels are compiled here")
    assert not launcher(decode_kernels.merge_decode_splits_kernel, BLOCK_SPLITS=4).enabled


def test_domains_reach_every_case():
    """The test domains hold what each rule tells apart (a guard for edits to them)."""
    assert {1, 16, 17, 2**31, 2**63} <= set(INTS)
    assert {t.data_ptr() % 16 == 0 for t in TENSORS} == {True, False}
    assert len({(d.base.dtype, tuple(d.block_shape)) for d in DESCRIPTORS}) == 4
    assert list(itertools.islice(DOMAINS, 3)) == ["x_ptr", "y_ptr", "z_ptr"]


def normalized(value):
    """A launch argument as what the launch depends on: tensors by dtype, shape, strides and alignment."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, tuple(value.shape), value.stride(), value.data_ptr() % 16)
    if isinstance(value, TensorDescriptor):
        return ("descriptor", normalized(value.base), tuple(value.shape), tuple(value.strides),
                tuple(value.block_shape), value.padding)
    return (type(value), value)


def test_flashsdpa_launches_match_run(monkeypatch, device):
    """flashsdpa's own launchers (decode split and merge, the main forward with TMA descriptors, the
    three backward kernels), each call made three times: the first through run, the others direct.
    Every launch runs the kernel Triton's key picks for its arguments, with all of them in the
    signature's order, and a direct launch passes what run passed for the same call."""
    import flashsdpa
    from flashsdpa.backends.triton import launch_backward, launch_forward

    if device != "cpu":
        pytest.skip("stand-in kernels replace the interpreted ones on the CPU")
    recorder = Recorder()
    kernels = [(forward_kernels, "attention_forward_kernel"), (decode_kernels, "attention_decode_split_kernel"),
               (decode_kernels, "merge_decode_splits_kernel")]
    kernels += [(launch_backward, f"attention_backward_{name}_kernel") for name in ("preprocess", "dq", "dkdv")]
    by_name = {}
    for module, name in kernels:
        fn = as_jit(getattr(module, name))
        install_run(fn, recorder)
        monkeypatch.setattr(module, name, fn)
        by_name[fn.fn.__name__] = fn
    monkeypatch.setattr(driver, "_active", Driver())
    monkeypatch.setattr(launch_forward, "sm_count", lambda device: 132)  # 3 decode splits: the merge runs
    # The exact backward, whose preprocess kernel is the sixth (a 4-D bf16 call on a CPU follows torch's
    # fused CPU kernel, ROUNDED, which has none).
    monkeypatch.setattr(flashsdpa.gradient_precision, "pinned", flashsdpa.descriptor.GradientPrecision.EXACT)
    gen = torch.Generator().manual_seed(0)
    new = lambda *shape: torch.randn(*shape, generator=gen).to(torch.bfloat16)  # noqa: E731
    q, k, v = (new(1, 2, 33, 16).requires_grad_() for _ in range(3))
    dq, dk, dv = new(1, 4, 1, 16), new(1, 2, 600, 16), new(1, 2, 600, 16)
    grad = new(1, 2, 33, 16)

    calls = []
    for _ in range(3):
        start = len(recorder.launches)
        flashsdpa.attention(dq, dk, dv, enable_gqa=True, backend="triton")
        torch.autograd.grad(flashsdpa.attention(q, k, v, causal=True, backend="triton"), (q, k, v), grad)
        calls.append(recorder.launches[start:])
    assert recorder.runs == 6  # each kernel once, on the first call
    assert [len(c) for c in calls] == [6, 6, 6]
    for launch in (entry for call in calls for entry in call):
        fn = by_name[next(name for name, f in by_name.items() if launch["key"] in
                          {k for caches in f.device_caches.values() for k in caches[0]})]
        runtime = sum(not p.is_constexpr for p in fn.params)
        assert len(launch["args"]) == len(fn.params)
        constexprs = {p.name: value for p, value in zip(fn.params[runtime:], launch["args"][runtime:])}
        _, specialization, _ = binder_of(fn)(*launch["args"][:runtime], **constexprs)
        assert launch["key"].startswith(str(specialization) + "{")  # the key: specialization, then options
    for first, direct in zip(calls[0], calls[2]):
        assert first["key"] == direct["key"] and first["grid"] == direct["grid"]
        assert list(map(normalized, first["args"])) == list(map(normalized, direct["args"]))
