"""Call plans: a call whose signature was seen before runs after one key build and one dict lookup.

The first call of a signature is validated (`api.prepare`, and the drop-in layer's own checks), described
and given to the dispatcher; its `CallPlan` keeps what those decided: the canonical options and variants,
the descriptor, the dispatcher's `Choice` (whose fallbacks are recorded again on every run, so `stats()`
counts as without plans) and how the canonical views are made from the caller's tensors. A later call with
the same signature skips all of that and runs the plan's backend.

The signature holds everything validation, the descriptor, the gradient precision or the backend choice
reads (`signature`): each tensor's type, shape, strides, dtype, device and requires_grad; every scalar
option by type and value (True, 1 and 1.0 are one dict key otherwise; the scale also by its sign, as -0.0 ==
0.0); and the global state those read: grad mode, the `use_backend` pin, torch's SDPA backend flags
(`sdpa_kernel`), deterministic algorithms, a pinned gradient precision and the automatic backend order.
Not in it, and taken as fixed for the process: the registered backends and their code, the environment
(TRITON_INTERPRET) and the GPU's properties behind a device index. Run-time values (tensor contents, data
pointers, the dropout seed) never enter a plan: the backends read them on every call.

No plan is made or used where its shortcuts could be seen or would be wrong: while torch.compile, dynamo
or torch.jit traces, under forward-mode AD or a functorch transform (`api.prepare` then raises or routes
differently), for tensor subclasses and layouts without strides, and for scalars of other types (a 0-d
tensor scale can change in place). A call that fails validation or has no backend makes no plan, so it
raises the same error every time; so do edge calls that run no kernel (`dropout_p=1`, non-finite scales).
Plans are bounded (cleared when full, `RecentValues`); `clear()` empties them.

Before any plan, `plain_cpu_call` takes the plainest CPU call, with or without an autograd graph, straight to
torch's fused CPU kernel (the aten backend's one kernel call). A plan's signature reads about 45 values; right
after a kernel has streamed MBs through the caches that costs 70-230 us a call on the 2-core CPU, where the
checks that decide a plain call cost 14-17 us over torch's own SDPA call (24 MB streamed through the caches
before each call; BENCHMARKS.md, issue 16's bar runs).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.autograd import forward_ad

from flashsdpa import api, dispatch, gradient_precision, ops  # (api imports this module: api.PreparedCall is read at calls)
from flashsdpa.backends import aten as aten_backend
from flashsdpa.cache import RecentValues
from flashsdpa.descriptor import AttentionDescriptor, GradientPrecision
from flashsdpa.validation import Canonical, CallOptions, Variants, canonicalize, check_variants

# Entry points, part of the signature: the drop-in layer's checks are not `attention`'s.
ATTENTION = "attention"
SDPA = "sdpa"

Tensor = torch.Tensor
_SCALAR_TYPES = frozenset((bool, int, float, str, type(None)))  # the scalar option types plans take
_NO_EXPANSION = (None, None, None, None)
_SIXTEEN_BIT = (torch.float16, torch.bfloat16)


class CallPlan(NamedTuple):
    """What the first call of a signature decided, for the next ones."""

    # The canonical query, key, value and mask as the caller's tensors expanded: per tensor None (the
    # caller's own) or the shape it is expanded to. None where other view ops are needed (`canonicalize`).
    expansion: tuple | None
    output_shape: tuple[int, ...]
    lse_shape: tuple[int, ...]
    variants: Variants | None  # None: the call has variant tensors (ALiBi slopes, sinks), made canonical per call
    options: CallOptions
    desc: AttentionDescriptor
    choice: dispatch.Choice


_plans = RecentValues(limit=512)


def plain_cpu_call(q, k, v, causal) -> Tensor | None:
    """The output of `attention(q, k, v, causal=causal)` with every other argument at its default, computed by
    the aten backend's kernel call itself, where the call is plain; None where it is not (the caller takes the
    general path, which gives the same bits where both run). Plain: three CPU tensors of one floating dtype the
    kernel takes, (B, H, L, E) queries and (B, H, S, E) keys and values with every size > 0 and a unit last
    stride, the automatic backend order starting with aten and no `use_backend` pin, nothing that could tell
    the op's call apart (`ops._plain_eager`). Such a call is, in `AtenBackend.forward`, one kernel call with the
    default scale (top-left causal leaves every row a key).

    Where the call records an autograd graph, the kernel's own autograd records it (torch's derivative of the
    op is its backward kernel on the same tensors and arguments, which is `AtenBackend.backward`'s call for
    ROUNDED 16-bit gradients and for float32/float64), so only where `gradient_precision` says
    ROUNDED for 16-bit inputs (`gradient_precision.of_plain_cpu_call`). Its gradients are then torch's own nodes:
    a second derivative through them raises torch's error where it is taken (as after torch's CPU SDPA), not at
    `create_graph=True` as flashsdpa's own backward does (a pre-hook on the node raising there costs 15-30 us
    a call after a kernel, more than the rest of this lane's checks)."""
    if type(q) is not Tensor or type(k) is not Tensor or type(v) is not Tensor or type(causal) is not bool:
        return None
    shape, key_shape, dtype = q.shape, k.shape, q.dtype
    if (
        not (q.is_cpu and k.is_cpu and v.is_cpu)  # (one CPU device; so no meta tensors)
        or len(shape) != 4 or len(key_shape) != 4 or v.shape != key_shape
        or key_shape[0] != shape[0] or key_shape[1] != shape[1] or key_shape[3] != shape[3]
        or 0 in shape or key_shape[2] == 0
        or dtype not in _KERNEL_DTYPES or k.dtype != dtype or v.dtype != dtype
        or q.stride(3) != 1 or k.stride(3) != 1 or v.stride(3) != 1
        or _pinned_backend() is not None
        or _AUTOMATIC_ORDER.get("cpu", ())[:1] != ("aten",)
        or _KERNELS is None
        or _op_observed()  # (ops._plain_eager: its tensor checks are the ones above and these three)
        or _is_legacy_batched(q) or _is_legacy_batched(k) or _is_legacy_batched(v)
    ):  # fmt: skip
        return None
    if (
        dtype in _SIXTEEN_BIT
        and _grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)  # records a graph
        and gradient_precision.of_plain_cpu_call() is not GradientPrecision.ROUNDED
    ):  # fmt: skip
        return None
    next(dispatch.plain_aten_calls)  # (stats: an "aten" call)
    return _KERNELS[0](q, k, v, 0.0, causal)[0]  # the default scale, 1 / sqrt(E) in double as in Python


# What `plain_cpu_call` reads on every call, bound once: right after a kernel has streamed MBs through the caches
# each module attribute lookup is a cache miss (with 24 MB streamed before each call, the lane cost 22-24 us a
# call over torch's SDPA with them looked up through their modules, 14-17 us bound; torch's own call 40-46 us).
_KERNELS = aten_backend.KERNELS
_KERNEL_DTYPES = aten_backend.KERNEL_DTYPES
_AUTOMATIC_ORDER = dispatch.AUTOMATIC_ORDER
_pinned_backend = dispatch.pinned_backend
_op_observed = ops.op_observed
_is_legacy_batched = ops.is_legacy_batched
_grad_enabled = torch.is_grad_enabled


def clear() -> None:
    """Forget every plan (for code that changes what the signature takes as fixed: backends, environment)."""
    _plans.clear()


def signature(
    entry, q, k, v, attn_mask, dropout_p, causal, scale, enable_gqa, backend=None, fp32_precision="ieee",
    window=None, causal_alignment="top_left", softcap=None, alibi_slopes=None, sinks=None,
) -> tuple | None:  # fmt: skip
    """The call's signature (module docstring), or None where no plan may be made or used.

    One flat tuple (built and compared on every call: nesting costs time). The scalar options' types are in
    it (True == 1 == 1.0) and must be plain Python ones: a 0-d tensor scale, say, can change in place."""
    scalar_types = (type(dropout_p), type(causal), type(enable_gqa), type(scale), type(backend), type(fp32_precision),
                    type(causal_alignment), type(softcap))  # fmt: skip
    if (
        type(q) is not Tensor or type(k) is not Tensor or type(v) is not Tensor
        or not _SCALAR_TYPES.issuperset(scalar_types)
        or torch.compiler.is_compiling()
        or torch._C._get_tracing_state() is not None
        or forward_ad._current_level >= 0
        or torch._C._functorch.peek_interpreter_stack() is not None
    ):  # fmt: skip
        return None
    try:
        device = q.device
        return (
            entry,
            q.shape, q.stride(), q.dtype, device, q.requires_grad,
            k.shape, k.stride(), k.dtype, k.device, k.requires_grad,
            v.shape, v.stride(), v.dtype, v.device, v.requires_grad,
            *_optional_tensor(attn_mask), *_optional_tensor(alibi_slopes), *_optional_tensor(sinks),
            scalar_types, dropout_p, causal, enable_gqa, backend, fp32_precision, causal_alignment, softcap,
            scale, None if scale is None else math.copysign(1.0, scale), None if window is None else _window(window),
            # the global state
            torch.is_grad_enabled(),
            dispatch.pinned_backend(),
            torch._C._get_flash_sdp_enabled(),
            torch._C._get_mem_efficient_sdp_enabled(),
            torch._C._get_cudnn_sdp_enabled(),
            torch._C._get_math_sdp_enabled(),
            torch._C._get_deterministic_algorithms(),
            gradient_precision.pinned,
            dispatch.AUTOMATIC_ORDER.get(device.type, dispatch.DEFAULT_ORDER),
        )  # fmt: skip
    except (TypeError, RuntimeError):  # a window that is no pair, a tensor without strides (nested, sparse)
        return None


_NO_TENSOR = (None,) * 5


def _optional_tensor(t) -> tuple:
    if t is None:
        return _NO_TENSOR
    if type(t) is not Tensor:
        raise TypeError
    return t.shape, t.stride(), t.dtype, t.device, t.requires_grad


def _window(window) -> tuple:
    if type(window) not in (tuple, list):
        raise TypeError
    return (*window, *map(type, window))


def lookup(
    entry, q, k, v, attn_mask, dropout_p, causal, scale, enable_gqa, backend=None, fp32_precision="ieee",
    window=None, causal_alignment="top_left", softcap=None, alibi_slopes=None, sinks=None,
):  # fmt: skip
    """(the call's signature, the call as `api.prepare` would give it from that signature's plan); the call is
    None where there is no plan, the signature None where no plan may be made or used."""
    key = signature(entry, q, k, v, attn_mask, dropout_p, causal, scale, enable_gqa, backend, fp32_precision, window,
                    causal_alignment, softcap, alibi_slopes, sinks)  # fmt: skip
    try:
        plan = None if key is None else _plans.get(key)
    except TypeError:  # an unhashable window side: no plan
        return None, None
    if plan is None:
        return key, None
    expansion = plan.expansion
    if expansion is None:
        canon = canonicalize(q, k, v, attn_mask, enable_gqa)
    else:
        if expansion is not _NO_EXPANSION:
            q, k, v, attn_mask = (t if shape is None else t.expand(shape)
                                  for t, shape in zip((q, k, v, attn_mask), expansion))  # fmt: skip
        canon = Canonical(q, k, v, attn_mask, plan.output_shape, plan.lse_shape)
    variants = plan.variants
    if variants is None:
        variants = check_variants(canon, causal, window, causal_alignment, softcap, alibi_slopes, sinks)
    return key, api.PreparedCall(canon, variants, plan.options, backend, plan.desc, plan.choice)


def keep(signature, call, given: tuple):
    """`call` (just prepared from the caller's tensors `given`: query, key, value, mask) with its backend
    choice, kept as the plan of `signature` (None: not kept). A call no backend takes is returned as it is,
    to raise when it runs."""
    if signature is None:
        return call
    try:
        choice = dispatch.decide(call.desc, call.canon.query.device, call.backend)
    except dispatch.UnsupportedError:
        return call
    call.choice = choice
    w = call.variants
    variants = w if w.alibi_slopes is None and w.sinks is None else None
    c = call.canon
    _plans.keep(signature, CallPlan(_expansion(given, c[:4]), c.output_shape, c.lse_shape, variants, call.options,
                                    call.desc, choice))  # fmt: skip
    return call


def _expansion(given: tuple, canonical: tuple) -> tuple | None:
    """Per tensor None (canonical is given) or the shape `given.expand` makes canonical with; None if any
    canonical tensor is another view or a copy."""
    shapes = []
    for t, c in zip(given, canonical):
        if c is t:
            shapes.append(None)
            continue
        if t.dim() != c.dim() or t.dtype != c.dtype:
            return None
        expanded = t.expand(c.shape)
        if (expanded.stride(), expanded.storage_offset(), expanded.data_ptr()) != (
            c.stride(), c.storage_offset(), c.data_ptr()
        ):
            return None
        shapes.append(c.shape)
    shapes = tuple(shapes)
    return _NO_EXPANSION if shapes == _NO_EXPANSION else shapes
