"""torch.library custom ops and autograd: the one place where backends are run.

`flashsdpa::attention_forward` and `flashsdpa::attention_backward` take the
canonical 4D tensors (see `validation.canonicalize`) and plain scalars, choose
a backend inside the op (so `stats()` counts real runs, compiled or not), and
have fake implementations so `torch.compile(fullgraph=True)` traces them
without graph breaks. The forward saves only its inputs, the output and the
row log-sum-exp; the backward recomputes the scores tile by tile.

`forward` is what the public API calls: in plain eager mode it runs the ops'
implementations (`forward_impl`, `backward_impl`) without the ops' dispatcher
layers, which cost more host time than a small GPU kernel (see `_plain_eager`).
"""

from __future__ import annotations

import math

import torch
from torch.autograd import forward_ad

from flashsdpa import dispatch
from flashsdpa.backends.base import AttentionInputs, GradientsNeeded
from flashsdpa.cache import RecentValues
from flashsdpa.descriptor import statistics_dtype
from flashsdpa.dropout import draw_seed, split_seed
from flashsdpa.validation import describe

Tensor = torch.Tensor


# Descriptors of recent call shapes, keyed on everything `describe` reads: a
# repeated call is a dict lookup and keeps its descriptor object (and with it
# the descriptor's kernel_key and the launchers' plans). Bounded: cleared when full.
_descriptors = RecentValues()


def _describe(q, k, v, mask, dropout_p, causal, scale, fp32_precision, gradients):
    facts = (
        q.shape, k.shape, v.shape, q.dtype, q.device.type,
        None if mask is None else (mask.dtype, mask.shape, mask.stride()),
        dropout_p, causal, scale, math.copysign(1.0, scale), fp32_precision, gradients,  # the sign: -0.0 == 0.0 as keys
    )  # fmt: skip
    desc = _descriptors.get(facts)
    if desc is None:
        desc = _descriptors.keep(facts, describe(
            q, k, v, mask, causal=causal, dropout_p=dropout_p, scale=scale, fp32_precision=fp32_precision,
            gradients=gradients,
        ))  # fmt: skip
    return desc


def _inputs(q, k, v, mask, dropout_seed) -> AttentionInputs:
    return AttentionInputs(q, k, v, mask, split_seed(dropout_seed) if dropout_seed.numel() else None)


def _is_degenerate(desc) -> bool:
    """No (query, key) pair exists: backends are not called."""
    return desc.seq_q == 0 or desc.seq_kv == 0 or desc.batch * desc.heads_q == 0


def _empty_forward(desc, q):
    """Every row sees no key: out = 0 and lse = -inf, as torch gives."""
    shape = (desc.batch, desc.heads_q, desc.seq_q)
    out = q.new_zeros(*shape, desc.head_dim_v)
    return out, torch.full(shape, float("-inf"), dtype=statistics_dtype(q.dtype), device=q.device)


def forward_impl(query, key, value, mask, dropout_p, causal, scale, backend, fp32_precision, gradients):
    """The body of `attention_forward` (see there), callable without the op's dispatcher layers."""
    desc = _describe(query, key, value, mask, dropout_p, causal, scale, fp32_precision, gradients)
    name = dispatch.choose_backend(desc, query.device, backend or None)
    dispatch.record_call(name)
    dropout_seed = draw_seed() if dropout_p > 0.0 else torch.empty(0, dtype=torch.int64)
    if _is_degenerate(desc):
        return (*_empty_forward(desc, query), dropout_seed)
    out, lse = dispatch.BACKENDS[name].forward(desc, _inputs(query, key, value, mask, dropout_seed))
    return out, lse, dropout_seed


@torch.library.custom_op("flashsdpa::attention_forward", mutates_args=())
def attention_forward(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None,
    dropout_p: float,
    causal: bool,
    scale: float,
    backend: str,
    fp32_precision: str,
    gradients: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (out, lse, dropout_seed); the seed (int64 (2,), empty without
    dropout) is drawn here, at run time, from torch's default generator, so
    eager and compiled runs draw the same pattern after torch.manual_seed.
    `gradients` is the backward's 16-bit precision, chosen with the call
    (`gradient_precision.at_forward`); the forward only carries it."""
    out, lse, seed = forward_impl(query, key, value, mask, dropout_p, causal, scale, backend, fp32_precision, gradients)
    return _as_declared(out), _as_declared(lse), seed


def _as_declared(t: Tensor) -> Tensor:
    """The fake implementations declare contiguous outputs and compiled graphs
    assert that: the ops make them so. The eager path (`forward`, `_backward`)
    hands autograd a backend's outputs in the layout they come in: torch's CPU
    flash kernel (the aten backend) gives (B, L, H, E)-strided gradients, and a
    copy would add memory torch's own call does not take."""
    return t if t.is_contiguous() else t.contiguous()  # copy needed because outputs must match the fake's layout


@attention_forward.register_fake
def _(query, key, value, mask, dropout_p, causal, scale, backend, fp32_precision, gradients):
    b, h, l, _ = query.shape
    out = query.new_empty(b, h, l, value.shape[-1])
    seed = torch.empty(2 if dropout_p > 0.0 else 0, dtype=torch.int64)
    return out, query.new_empty(b, h, l, dtype=statistics_dtype(query.dtype)), seed


def backward_impl(
    grad_out, query, key, value, out, lse, mask, dropout_seed, dropout_p, causal, scale, backend, fp32_precision,
    gradients, needed,
):
    """The body of `attention_backward` (see there), callable without the op's dispatcher layers."""
    desc = _describe(query, key, value, mask, dropout_p, causal, scale, fp32_precision, gradients)
    need = GradientsNeeded(*needed)
    if _is_degenerate(desc):
        grads = (
            query.new_zeros(query.shape) if need.query else None,
            key.new_zeros(key.shape) if need.key else None,
            value.new_zeros(value.shape) if need.value else None,
            query.new_zeros(desc.batch, desc.heads_q, desc.seq_q, desc.seq_kv, dtype=statistics_dtype(query.dtype))
            if need.mask
            else None,
        )
    else:
        name = dispatch.choose_backend(desc, query.device, backend or None)
        grads = dispatch.BACKENDS[name].backward(
            desc, _inputs(query, key, value, mask, dropout_seed), out, lse, grad_out, need
        )
    return tuple(g if g is not None else query.new_empty(0) for g in grads)


@torch.library.custom_op("flashsdpa::attention_backward", mutates_args=())
def attention_backward(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    out: Tensor,
    lse: Tensor,
    mask: Tensor | None,
    dropout_seed: Tensor,
    dropout_p: float,
    causal: bool,
    scale: float,
    backend: str,
    fp32_precision: str,
    gradients: str,
    needed: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv, dmask); a gradient not `needed` comes back as an empty tensor."""
    grads = backward_impl(
        grad_out, query, key, value, out, lse, mask, dropout_seed, dropout_p, causal, scale, backend, fp32_precision,
        gradients, needed,
    )
    return tuple(_as_declared(g) for g in grads)


@attention_backward.register_fake
def _(
    grad_out, query, key, value, out, lse, mask, dropout_seed, dropout_p, causal, scale, backend, fp32_precision,
    gradients, needed,
):
    b, h, l, _ = query.shape
    dmask_shape = (b, h, l, key.shape[2])
    return (
        query.new_empty(query.shape) if needed[0] else query.new_empty(0),
        key.new_empty(key.shape) if needed[1] else query.new_empty(0),
        value.new_empty(value.shape) if needed[2] else query.new_empty(0),
        query.new_empty(dmask_shape, dtype=statistics_dtype(query.dtype)) if needed[3] else query.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    query, key, value, mask, dropout_p, causal, scale, backend, fp32_precision, gradients = inputs
    out, lse, dropout_seed = output
    ctx.save_for_backward(query, key, value, mask, dropout_seed, out, lse)
    ctx.options = (dropout_p, causal, scale, backend, fp32_precision, gradients)
    ctx.mark_non_differentiable(lse, dropout_seed)
    # lse and the seed never get a gradient: without this autograd would fill
    # a zero tensor for each on every backward (a fill kernel, and host time).
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, _grad_lse, _grad_seed):
    if torch.is_grad_enabled():
        raise RuntimeError(
            "flashsdpa does not support double backward (create_graph=True through attention); "
            "use torch's scaled_dot_product_attention for higher-order gradients"
        )
    query, key, value, mask, dropout_seed, out, lse = ctx.saved_tensors
    if grad_out is None:  # not materialized (see _setup_context); never seen, as out is the only differentiable output
        grad_out = torch.zeros_like(out)
    needed = [bool(n) for n in ctx.needs_input_grad[:4]]
    if mask is None or not mask.is_floating_point():
        needed[3] = False
    arguments = (grad_out, query, key, value, out, lse, mask, dropout_seed, *ctx.options, needed)
    dq, dk, dv, dmask = backward_impl(*arguments) if _plain_eager(arguments[:7]) else attention_backward(*arguments)
    grads = [g if n else None for g, n in zip((dq, dk, dv, dmask), needed)]
    if grads[3] is not None:
        grads[3] = grads[3].to(mask.dtype)
    return (*grads, None, None, None, None, None, None)


attention_forward.register_autograd(_backward, setup_context=_setup_context)


# The eager fast path. Calling a custom op costs tens of microseconds of host
# time in torch's layers (dispatcher round trips, the generated autograd
# function, the dynamo-disable wrapper, argument default filling): on small
# GPU problems more than the kernel. Where no tracer, mode, transform,
# profiler or tensor subclass is there to see the op, `forward` runs the same
# implementation directly (with `_EagerAttention` for autograd, using the
# same context and backward), and everything else goes through the ops.


def _plain_eager(tensors) -> bool:
    """Whether nothing could tell a direct call of the implementations from a call of the custom ops."""
    return not (
        torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack()  # dispatch modes: fake tensors, make_fx, FlopCounterMode
        or torch._C._is_torch_function_mode_enabled()  # function modes see the op as one call
        or torch._C._functorch.peek_interpreter_stack() is not None  # vmap, grad, functionalize
        or torch._C._autograd._profiler_enabled()  # the profiler records the op by name
        or forward_ad._current_level >= 0  # forward-mode AD
        or torch._C._get_tracing_state() is not None  # torch.jit.trace records the op
        # subclasses (FakeTensor, DTensor, ...); meta tensors get the op's fake implementation
        or any(type(t) is not Tensor or t.is_meta for t in tensors if t is not None)
    )


class _EagerAttention(torch.autograd.Function):
    """`attention_forward`'s autograd, without the op: same context (`_setup_context`) and backward.

    Old-style (forward takes ctx): with a separate setup_context, `apply` binds
    the arguments through `inspect.signature` on every call (~30 us)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = forward_impl(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad_out, grad_lse, grad_seed):
        return _backward(ctx, grad_out, grad_lse, grad_seed)


def forward(query, key, value, mask, dropout_p, causal, scale, backend, fp32_precision, gradients):
    """`attention_forward(...)`, skipping the op's layers where nothing can observe them (see `_plain_eager`)."""
    arguments = (query, key, value, mask, dropout_p, causal, scale, backend, fp32_precision, gradients)
    if not _plain_eager((query, key, value, mask)):
        return attention_forward(*arguments)
    needs_graph = (
        torch.is_grad_enabled()
        and (query.requires_grad or key.requires_grad or value.requires_grad
             or (mask is not None and mask.requires_grad))
        # below autograd (inside another op's implementation) the op records no graph either
        and not torch._C._dispatch_tls_is_dispatch_key_excluded(torch._C.DispatchKey.AutogradFunctionality)
    )
    return _EagerAttention.apply(*arguments) if needs_graph else forward_impl(*arguments)
