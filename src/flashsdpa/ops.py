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
There the call's descriptor, built once by `api.prepare` (`PreparedCall.desc`),
is carried to the backend and, in the autograd context, to the backward. The
ops themselves take only tensors and scalars (`validation.CallOptions`), so
their bodies describe the problem from those (a cached lookup per call shape).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.autograd import forward_ad

from flashsdpa import dispatch
from flashsdpa.backends.base import AttentionInputs, GradientsNeeded
from flashsdpa.descriptor import statistics_dtype
from flashsdpa.dropout import draw_seed, split_seed
from flashsdpa.validation import CallOptions, describe

if TYPE_CHECKING:
    from flashsdpa.api import PreparedCall

Tensor = torch.Tensor


def _inputs(q, k, v, mask, alibi_slopes, sinks, dropout_seed) -> AttentionInputs:
    seed = split_seed(dropout_seed) if dropout_seed.numel() else None
    return AttentionInputs(q, k, v, mask, seed, alibi_slopes, sinks)


def _is_degenerate(desc) -> bool:
    """No (query, key) pair exists: backends are not called."""
    return desc.seq_q == 0 or desc.seq_kv == 0 or desc.batch * desc.heads_q == 0


def _empty_forward(desc, q, sinks):
    """Every row sees no key: out = 0 and lse = -inf (as torch gives), or the row's sink logit."""
    shape = (desc.batch, desc.heads_q, desc.seq_q)
    out = q.new_zeros(*shape, desc.head_dim_v)
    if sinks is not None:
        lse = torch.empty(shape, dtype=statistics_dtype(q.dtype), device=q.device)
        return out, lse.copy_(sinks.detach().view(1, -1, 1).expand(shape))
    return out, torch.full(shape, float("-inf"), dtype=statistics_dtype(q.dtype), device=q.device)


def forward_impl(desc, backend, query, key, value, mask, alibi_slopes, sinks, choice=None):
    """The body of `attention_forward` (see there) for a described problem, without the op's dispatcher layers.
    `choice`: the dispatcher's answer for this problem where the caller has it (call_plans.py), else asked here."""
    if choice is None:
        choice = dispatch.decide(desc, query.device, backend or None)
    dispatch.record_run(choice)
    name = choice.backend
    dropout_seed = draw_seed() if desc.dropout_p > 0.0 else torch.empty(0, dtype=torch.int64)
    if _is_degenerate(desc):
        return (*_empty_forward(desc, query, sinks), dropout_seed)
    inputs = _inputs(query, key, value, mask, alibi_slopes, sinks, dropout_seed)
    out, lse = dispatch.BACKENDS[name].forward(desc, inputs)
    return out, lse, dropout_seed


@torch.library.custom_op("flashsdpa::attention_forward", mutates_args=())
def attention_forward(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None,
    alibi_slopes: Tensor | None,
    sinks: Tensor | None,
    dropout_p: float,
    causal: bool,
    scale: float | None,
    window_left: int,
    window_right: int,
    alignment: str,
    softcap: float,
    fp32_precision: str,
    gradients: str,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (out, lse, dropout_seed); the seed (int64 (2,), empty without
    dropout) is drawn here, at run time, from torch's default generator, so
    eager and compiled runs draw the same pattern after torch.manual_seed.
    The scalars are `validation.CallOptions` (the variants in canonical form;
    `gradients` is the backward's 16-bit precision, chosen with the call by
    `gradient_precision.at_forward`, which the forward only carries)."""
    options = CallOptions(
        dropout_p, causal, scale, window_left, window_right, alignment, softcap, fp32_precision, gradients
    )
    desc = describe(query, key, value, mask, options, alibi_slopes is not None, sinks is not None)
    out, lse, seed = forward_impl(desc, backend, query, key, value, mask, alibi_slopes, sinks)
    return _as_declared(out), _as_declared(lse), seed


def _as_declared(t: Tensor) -> Tensor:
    """The fake implementations declare contiguous outputs and compiled graphs
    assert that: the ops make them so. The eager path (`forward`, `_backward`)
    hands autograd a backend's outputs in the layout they come in: torch's CPU
    flash kernel (the aten backend) gives (B, L, H, E)-strided gradients, and a
    copy would add memory torch's own call does not take."""
    return t if t.is_contiguous() else t.contiguous()  # copy needed because outputs must match the fake's layout


@attention_forward.register_fake
def _(query, key, value, mask, alibi_slopes, sinks, dropout_p, *_options):
    b, h, l, _ = query.shape
    out = query.new_empty(b, h, l, value.shape[-1])
    seed = torch.empty(2 if dropout_p > 0.0 else 0, dtype=torch.int64)
    return out, query.new_empty(b, h, l, dtype=statistics_dtype(query.dtype)), seed


def backward_impl(desc, backend, grad_out, query, key, value, out, lse, mask, alibi_slopes, sinks, dropout_seed, needed):
    """The body of `attention_backward` (see there) for a described problem, without the op's dispatcher layers."""
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
        inputs = _inputs(query, key, value, mask, alibi_slopes, sinks, dropout_seed)
        grads = dispatch.BACKENDS[name].backward(desc, inputs, out, lse, grad_out, need)
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
    alibi_slopes: Tensor | None,
    sinks: Tensor | None,
    dropout_seed: Tensor,
    dropout_p: float,
    causal: bool,
    scale: float | None,
    window_left: int,
    window_right: int,
    alignment: str,
    softcap: float,
    fp32_precision: str,
    gradients: str,
    backend: str,
    needed: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv, dmask); a gradient not `needed` comes back as an empty tensor.
    The sinks' gradient is not a backend's: `sink_gradient` computes it from out and lse."""
    options = CallOptions(
        dropout_p, causal, scale, window_left, window_right, alignment, softcap, fp32_precision, gradients
    )
    desc = describe(query, key, value, mask, options, alibi_slopes is not None, sinks is not None)
    grads = backward_impl(
        desc, backend, grad_out, query, key, value, out, lse, mask, alibi_slopes, sinks, dropout_seed, needed
    )
    return tuple(_as_declared(g) for g in grads)


@attention_backward.register_fake
def _(grad_out, query, key, value, out, lse, mask, *_rest):
    needed = _rest[-1]
    b, h, l, _ = query.shape
    dmask_shape = (b, h, l, key.shape[2])
    return (
        query.new_empty(query.shape) if needed[0] else query.new_empty(0),
        key.new_empty(key.shape) if needed[1] else query.new_empty(0),
        value.new_empty(value.shape) if needed[2] else query.new_empty(0),
        query.new_empty(dmask_shape, dtype=statistics_dtype(query.dtype)) if needed[3] else query.new_empty(0),
    )


_TENSOR_INPUTS = 6  # query, key, value, mask, alibi_slopes, sinks; then CallOptions, then the backend


def _setup_context(ctx, inputs, output):
    """The custom op's autograd context: its tensors and its scalars (the problem is described again, from them,
    by the backward op; under torch.compile this runs while tracing, where no descriptor is built)."""
    _save(ctx, inputs[:_TENSOR_INPUTS], output)
    ctx.desc, ctx.options, ctx.backend = None, CallOptions(*inputs[_TENSOR_INPUTS:-1]), inputs[-1]
    ctx.tensors_at = 0  # where the tensors are among the inputs (ctx.needs_input_grad)


def _save(ctx, tensors, output):
    out, lse, dropout_seed = output
    ctx.save_for_backward(*tensors, dropout_seed, out, lse)
    ctx.mark_non_differentiable(lse, dropout_seed)
    # lse and the seed never get a gradient: without this autograd would fill
    # a zero tensor for each on every backward (a fill kernel, and host time).
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, _grad_lse, _grad_seed):
    """(dq, dk, dv, dmask, d alibi_slopes (None), dsinks), for either autograd (the op's, `_EagerAttention`)."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "flashsdpa does not support double backward (create_graph=True through attention); "
            "use torch's scaled_dot_product_attention for higher-order gradients"
        )
    query, key, value, mask, alibi_slopes, sinks, dropout_seed, out, lse = ctx.saved_tensors
    if grad_out is None:  # not materialized (see _save); never seen, as out is the only differentiable output
        grad_out = torch.zeros_like(out)
    needs = ctx.needs_input_grad[ctx.tensors_at : ctx.tensors_at + _TENSOR_INPUTS]
    needed = [bool(n) for n in needs[:4]]
    if mask is None or not mask.is_floating_point():
        needed[3] = False
    dsinks = sink_gradient(sinks, out, lse, grad_out) if needs[5] else None
    dq = dk = dv = dmask = None
    tensors = (grad_out, query, key, value, out, lse, mask, alibi_slopes, sinks, dropout_seed)
    if any(needed) and _plain_eager(tensors[:9]):
        desc = ctx.desc
        if desc is None:
            desc = describe(query, key, value, mask, ctx.options, alibi_slopes is not None, sinks is not None)
        dq, dk, dv, dmask = backward_impl(desc, ctx.backend, *tensors, needed)
    elif any(needed):
        options = ctx.options if ctx.desc is None else CallOptions.of(ctx.desc)
        dq, dk, dv, dmask = attention_backward(*tensors, *options, ctx.backend, needed)
    grads = [g if n else None for g, n in zip((dq, dk, dv, dmask), needed)]
    if grads[3] is not None:
        grads[3] = grads[3].to(mask.dtype)
    return (*grads, None, dsinks)


def _op_backward(ctx, grad_out, grad_lse, grad_seed):
    return (*_backward(ctx, grad_out, grad_lse, grad_seed), *(None,) * (len(ctx.options) + 1))


def sink_gradient(sinks: Tensor, out: Tensor, lse: Tensor, grad_out: Tensor) -> Tensor:
    """d loss / d sinks, for every backend: the sink's share of row i is p_i = exp(sink - lse_i), and

        d loss / d sink_h = -sum over batch and rows of p_i * delta_i,   delta_i = rowsum(dO_i * O_i)

    (the sink has no value row; dropout, which only drops the keys' shares, is inside O). A row with
    no visible key has O = 0, so its sink, whose share there is 1, gets no gradient from it.

    The sum over rows cancels (delta takes both signs), so it runs in float64 on (B, H, L) values: in
    float32 the float32 gradient's error reached 4x torch's float32 formula's."""
    stats = lse.dtype
    delta = (grad_out.to(stats) * out.to(stats)).sum(-1, dtype=torch.float64)
    share = torch.exp(sinks.double().view(1, -1, 1) - lse.double())
    return (-(share * delta).sum((0, 2))).to(sinks.dtype)


attention_forward.register_autograd(_op_backward, setup_context=_setup_context)


# The eager fast path. Calling a custom op costs tens of microseconds of host
# time in torch's layers (dispatcher round trips, the generated autograd
# function, the dynamo-disable wrapper, argument default filling): on small
# GPU problems more than the kernel. Where no tracer, mode, transform,
# profiler or tensor subclass is there to see the op, `forward` runs the same
# implementation directly (with `_EagerAttention` for autograd, using the
# same context and backward), and everything else goes through the ops.


# What `_plain_eager` asks, bound once: every eager call asks it, and after a kernel has streamed MBs through
# the caches each attribute lookup of `torch._C._functorch.*` costs a cache miss.
_is_compiling = torch.compiler.is_compiling
_dispatch_stack_len = torch._C._len_torch_dispatch_stack
_function_mode_enabled = torch._C._is_torch_function_mode_enabled
_interpreter_stack = torch._C._functorch.peek_interpreter_stack
_profiler_enabled = torch._C._autograd._profiler_enabled
_tracing_state = torch._C._get_tracing_state
is_legacy_batched = torch._C._functorch.is_legacy_batchedtensor


def op_observed() -> bool:
    """Whether a tracer, mode, transform or profiler in force now could tell a direct call of the
    implementations from a call of the custom ops (the tensors aside: `_plain_eager`)."""
    return (
        _is_compiling()
        or _dispatch_stack_len() > 0  # dispatch modes: fake tensors, make_fx, FlopCounterMode
        or _function_mode_enabled()  # function modes see the op as one call
        or _interpreter_stack() is not None  # vmap, grad, functionalize
        or _profiler_enabled()  # the profiler records the op by name
        or forward_ad._current_level >= 0  # forward-mode AD
        or _tracing_state() is not None  # torch.jit.trace records the op
    )  # fmt: skip


def _plain_eager(tensors) -> bool:
    """Whether nothing could tell a direct call of the implementations from a call of the custom ops."""
    if op_observed():
        return False
    for t in tensors:
        # subclasses (FakeTensor, DTensor, ...); meta tensors get the op's fake implementation; batched
        # gradients (`autograd.grad(is_grads_batched=True)`, gradcheck's check_batched_grad) run under
        # torch's legacy vmap, which has no interpreter on the stack (`is_legacy_batched`: the lane of
        # `call_plans.plain_cpu_call` asks it too)
        if t is not None and (type(t) is not Tensor or t.is_meta or is_legacy_batched(t)):
            return False
    return True


class _EagerAttention(torch.autograd.Function):
    """`attention_forward`'s autograd, without the op, carrying the call's descriptor to the backward.

    Old-style (forward takes ctx): with a separate setup_context, `apply` binds
    the arguments through `inspect.signature` on every call (~30 us)."""

    @staticmethod
    def forward(ctx, desc, backend, choice, *tensors):
        output = forward_impl(desc, backend, *tensors, choice)
        _save(ctx, tensors, output)
        ctx.desc, ctx.options, ctx.backend = desc, None, backend
        ctx.tensors_at = 3
        return output

    @staticmethod
    def backward(ctx, grad_out, grad_lse, grad_seed):
        return None, None, None, *_backward(ctx, grad_out, grad_lse, grad_seed)


def forward(call: PreparedCall, backend: str):
    """`attention_forward(...)` of a prepared call, skipping the op's layers where nothing can observe them (see
    `_plain_eager`): then the call's descriptor is built (once) and carried to the backward, and the backend
    choice a call plan holds (`PreparedCall.choice`) is used as it is."""
    c, w = call.canon, call.variants
    tensors = (c.query, c.key, c.value, c.mask, w.alibi_slopes, w.sinks)
    if not _plain_eager(tensors):
        return attention_forward(*tensors, *call.options, backend)
    query, key, value, mask, _, sinks = tensors
    needs_graph = (
        torch.is_grad_enabled()
        and (query.requires_grad or key.requires_grad or value.requires_grad
             or (mask is not None and mask.requires_grad) or (sinks is not None and sinks.requires_grad))
        # below autograd (inside another op's implementation) the op records no graph either
        and not torch._C._dispatch_tls_is_dispatch_key_excluded(torch._C.DispatchKey.AutogradFunctionality)
    )  # fmt: skip
    desc, choice = call.desc, call.choice
    if needs_graph:
        return _EagerAttention.apply(desc, backend, choice, *tensors)
    return forward_impl(desc, backend, *tensors, choice)
