"""torch.library custom ops and autograd: the one place where backends are run.

`flashsdpa::attention_forward` and `flashsdpa::attention_backward` take the
canonical 4D tensors (see `validation.canonicalize`) and plain scalars, choose
a backend inside the op (so `stats()` counts real runs, compiled or not), and
have fake implementations so `torch.compile(fullgraph=True)` traces them
without graph breaks. The forward saves only its inputs, the output and the
row log-sum-exp; the backward recomputes the scores tile by tile.
"""

from __future__ import annotations

import torch

from flashsdpa import dispatch
from flashsdpa.backends.base import AttentionInputs, GradientsNeeded
from flashsdpa.descriptor import statistics_dtype
from flashsdpa.dropout import draw_seed, split_seed
from flashsdpa.validation import describe

Tensor = torch.Tensor


def _describe(q, k, v, mask, dropout_p, causal, scale, fp32_precision):
    return describe(q, k, v, mask, causal=causal, dropout_p=dropout_p, scale=scale, fp32_precision=fp32_precision)


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
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (out, lse, dropout_seed); the seed (int64 (2,), empty without
    dropout) is drawn here, at run time, from torch's default generator, so
    eager and compiled runs draw the same pattern after torch.manual_seed."""
    desc = _describe(query, key, value, mask, dropout_p, causal, scale, fp32_precision)
    name = dispatch.choose_backend(desc, query.device, backend or None)
    dispatch.record_call(name)
    dropout_seed = draw_seed() if dropout_p > 0.0 else torch.empty(0, dtype=torch.int64)
    if _is_degenerate(desc):
        return (*_empty_forward(desc, query), dropout_seed)
    out, lse = dispatch.BACKENDS[name].forward(desc, _inputs(query, key, value, mask, dropout_seed))
    return _as_declared(out), _as_declared(lse), dropout_seed


def _as_declared(t: Tensor) -> Tensor:
    """The fake implementations declare contiguous outputs and compiled graphs
    assert that; every backend allocates them so, and this never copies in practice."""
    return t if t.is_contiguous() else t.contiguous()  # copy needed because outputs must match the fake's layout


@attention_forward.register_fake
def _(query, key, value, mask, dropout_p, causal, scale, backend, fp32_precision):
    b, h, l, _ = query.shape
    out = query.new_empty(b, h, l, value.shape[-1])
    seed = torch.empty(2 if dropout_p > 0.0 else 0, dtype=torch.int64)
    return out, query.new_empty(b, h, l, dtype=statistics_dtype(query.dtype)), seed


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
    needed: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv, dmask); a gradient not `needed` comes back as an empty tensor."""
    desc = _describe(query, key, value, mask, dropout_p, causal, scale, fp32_precision)
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
    return tuple(_as_declared(g) if g is not None else query.new_empty(0) for g in grads)


@attention_backward.register_fake
def _(grad_out, query, key, value, out, lse, mask, dropout_seed, dropout_p, causal, scale, backend, fp32_precision, needed):
    b, h, l, _ = query.shape
    dmask_shape = (b, h, l, key.shape[2])
    return (
        query.new_empty(query.shape) if needed[0] else query.new_empty(0),
        key.new_empty(key.shape) if needed[1] else query.new_empty(0),
        value.new_empty(value.shape) if needed[2] else query.new_empty(0),
        query.new_empty(dmask_shape, dtype=statistics_dtype(query.dtype)) if needed[3] else query.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    query, key, value, mask, dropout_p, causal, scale, backend, fp32_precision = inputs
    out, lse, dropout_seed = output
    ctx.save_for_backward(query, key, value, mask, dropout_seed, out, lse)
    ctx.options = (dropout_p, causal, scale, backend, fp32_precision)
    ctx.mark_non_differentiable(lse, dropout_seed)


def _backward(ctx, grad_out, _grad_lse, _grad_seed):
    if torch.is_grad_enabled():
        raise RuntimeError(
            "flashsdpa does not support double backward (create_graph=True through attention); "
            "use torch's scaled_dot_product_attention for higher-order gradients"
        )
    query, key, value, mask, dropout_seed, out, lse = ctx.saved_tensors
    needed = [bool(n) for n in ctx.needs_input_grad[:4]]
    if mask is None or not mask.is_floating_point():
        needed[3] = False
    dq, dk, dv, dmask = attention_backward(
        grad_out, query, key, value, out, lse, mask, dropout_seed, *ctx.options, needed
    )
    grads = [g if n else None for g, n in zip((dq, dk, dv, dmask), needed)]
    if grads[3] is not None:
        grads[3] = grads[3].to(mask.dtype)
    return (*grads, None, None, None, None, None)


attention_forward.register_autograd(_backward, setup_context=_setup_context)
