"""Route `torch.nn.functional.scaled_dot_product_attention` through flashsdpa.

    flashsdpa.enable()              # process-wide, until flashsdpa.disable()
    with flashsdpa.sdpa():          # this thread, for the block
        model(x)

What is patched: the attribute `torch.nn.functional.scaled_dot_product_attention`.
Every caller that looks it up when it calls is covered: `F.scaled_dot_product_attention(...)`
in user code, transformers and diffusers, and `F.multi_head_attention_forward`
(used by `nn.MultiheadAttention`, hence `nn.TransformerEncoderLayer` and
`nn.TransformerDecoderLayer`), which calls the name `scaled_dot_product_attention`
from torch.nn.functional's module globals, the same attribute. Not covered:
`torch._C._nn.scaled_dot_product_attention` called directly, a reference taken
before the patch (`from torch.nn.functional import scaled_dot_product_attention`
at import time), `nn.MultiheadAttention` with `need_weights=True` (it does not
call SDPA) and the fused inference fast path of `nn.MultiheadAttention` /
`nn.TransformerEncoderLayer` (eval mode without grad: a native kernel, no SDPA call).

Which calls run on flashsdpa: a call whose arguments flashsdpa supports. Any
other call goes to the function the patch replaced (torch's own) with the same
arguments, so it gives torch's result or raises torch's error, and the reason
is counted in `flashsdpa.stats()["fallbacks"]`; `stats()["calls"]["torch"]`
counts those calls, next to the flashsdpa backends' counts. In strict mode
(`enable(strict=True)`, `sdpa(strict=True)`, or `FLASHSDPA_STRICT=1` in the
environment when they are called) such a call raises `flashsdpa.UnsupportedError`
with the reasons instead. Differences that remain on calls flashsdpa runs:
dropout draws a different (equally distributed) random pattern than torch, and
double backward (`create_graph=True` through attention) is not supported.
`torch.nn.attention.sdpa_kernel(...)`: a list that allows none of torch's fused
backends (flash, memory-efficient, cuDNN), e.g. `sdpa_kernel([SDPBackend.MATH])`,
asks for torch's math path, and those calls go to torch (counted as fallbacks
with that reason). A list that allows a fused backend does not turn flashsdpa
off (use `sdpa(enabled=False)` for that); flashsdpa's 16-bit backward follows
it to choose its precision (see `flashsdpa.gradient_precision`).
Tensor subclasses and TorchFunctionModes see a call (routed or not) as torch's
own function would let them. `torch.nn.attention.bias.causal_upper_left` runs
on flashsdpa as `is_causal`, and `causal_lower_right` with L != S as
bottom-right alignment (`causal_alignment="bottom_right"`, no mask
materialised; rows with no visible key give zeros, as torch's do); a backend
that cannot take the alignment leaves it to `CausalBias`, which calls again
with its materialised bool mask. TorchScript: scripted code (a scripted `nn.MultiheadAttention`,
`nn.Transformer*`) calls torch's own operator: flashsdpa cannot run in it.
Calls under a `torch.func` transform or forward-mode AD (dual tensors) go to
torch; batched gradients of a call flashsdpa ran (`gradcheck`'s
`check_batched_grad`, `autograd.grad(is_grads_batched=True)`, `vmap` over a
backward) run flashsdpa's backward once per batch entry.

On/off semantics:
* `enable(strict=None)` / `disable()` set the process-wide default. They are
  idempotent switches, not counted: enabling twice is enabling once, and one
  `disable()` turns the default off.
* `with sdpa(enabled=True, strict=None):` overrides the default in the current
  thread only, for the duration of the block, and restores what the thread had
  before in `finally` (also on an exception). Blocks nest; the innermost wins.
  Inside a block, `disable()` changes the default (for other threads, and for
  this one once its blocks have exited) but not the block: to switch flashsdpa
  off within a block, nest `with sdpa(enabled=False):`.
* The attribute is patched while the default is on or any thread is inside a
  block, and restored to the original when neither holds (under a lock, so
  concurrent enable/disable/blocks from several threads are safe). The per-call
  decision reads a `threading.local` (not a ContextVar, which dynamo cannot
  trace), so a thread without a block follows the default and does not see
  another thread's block, with one exception: a backward pass. On CUDA,
  autograd runs backward passes in threads of its own, and activation
  checkpointing recomputes the forward there; the recomputation must take the
  same path as the forward (torch.utils.checkpoint raises otherwise). So a
  thread running a backward pass, with no block of its own, follows the most
  recently entered block still open in any thread. Keep the backward of a
  checkpointed model inside the block (or between enable() and disable()) that
  its forward ran in.

torch.compile: the patched function and the support check are traceable, so a
model compiled under `enable()` or called inside a block traces flashsdpa's
custom ops with `fullgraph=True` (enter blocks outside compiled code: their
lock is not traceable). Dynamo guards on the patched attribute and on the
switch, so enabling or disabling later recompiles rather than reusing a stale
graph. In compiled code the decision is made once, at trace time: calls that
run on flashsdpa are still counted per run (inside the op), fallbacks are not
counted, and a strict-mode refusal is raised while tracing (with
`fullgraph=True` dynamo reports it as its own error, pointing at the raise).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias, CausalVariant
from torch.overrides import handle_torch_function, has_torch_function

from flashsdpa import api, call_plans, dispatch, validation
from flashsdpa.integrations.switch import (  # noqa: F401 (STRICT_ENV, TORCH: re-exported for callers of this module)
    STRICT_ENV,
    TORCH,
    Mode,
    Switch,
    strict_from_env,
    tensor_reasons,
)


def current_mode() -> Mode:
    """The Mode in force for a call made now from this thread."""
    return _switch.current_mode()


# ---- the support check ------------------------------------------------------


def _tensor_reasons(name: str, t) -> list[str]:
    return [] if t is None and name == "attn_mask" else tensor_reasons(name, t)


def _option_reasons(attn_mask, dropout_p, is_causal, scale, enable_gqa) -> list[str]:
    """Arguments torch accepts (or rejects with its own error) that flashsdpa does not take."""
    reasons = []
    if not isinstance(enable_gqa, bool):
        reasons.append(f"enable_gqa {enable_gqa!r} is not a bool")
    if attn_mask is not None and is_causal is True:
        # torch's math/CUDA kernels raise, its CPU flash kernel applies both: leave it to torch.
        reasons.append("attn_mask together with is_causal=True is left to torch")
    if isinstance(attn_mask, torch.Tensor) and attn_mask.dim() < 2:
        reasons.append(f"attn_mask with {attn_mask.dim()} dims is not supported (needs (..., L, S))")
    if isinstance(dropout_p, numbers.Real) and not isinstance(dropout_p, bool) and dropout_p >= 1.0:
        reasons.append(f"dropout_p {dropout_p} is not supported (must be below 1)")
    if isinstance(scale, numbers.Real) and not isinstance(scale, bool) and not math.isfinite(scale):
        reasons.append(f"scale {scale} is not supported (must be finite)")
    return reasons


MATH_ONLY_REASON = "torch.nn.attention.sdpa_kernel allows none of torch's fused backends (torch's math path was asked for)"


def _sdpa_kernel_reasons() -> list[str]:
    """A caller who restricts torch to its math backend (`sdpa_kernel([SDPBackend.MATH])`, or any list
    without a fused backend) asked for torch's reference path: such calls go to torch. Not read under
    torch.compile (the flags are not traced): compiled code follows the flags of its trace's first call."""
    if torch.compiler.is_compiling():
        return []
    fused = (
        torch.backends.cuda.flash_sdp_enabled()
        or torch.backends.cuda.mem_efficient_sdp_enabled()
        or torch.backends.cuda.cudnn_sdp_enabled()
    )
    return [] if fused else [MATH_ONLY_REASON]


def _backend_reasons(desc, device: torch.device) -> list[str]:
    """What `dispatch.choose_backend` would decide, without recording fallbacks (the op records them
    when it runs). A `use_backend` pin is an explicit request: it is left to fail loudly in the op."""
    if not torch.compiler.is_compiling() and dispatch.pinned_backend() is not None:
        return []
    name, skipped = dispatch.automatic_choice(desc, device)
    return [] if name is not None else skipped


def unsupported_reasons(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
) -> list[str]:
    """Why flashsdpa would not run this `scaled_dot_product_attention` call; empty if it would.

    Runs no kernel. Invalid arguments (for flashsdpa, and mostly for torch too)
    give the validation message as the reason.
    """
    return _check(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)[0]


def _check(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, causal_alignment="top_left"):
    """(reasons, the validated call when there are none)."""
    reasons = []
    for name, t in (("query", query), ("key", key), ("value", value), ("attn_mask", attn_mask)):
        reasons.extend(_tensor_reasons(name, t))
    reasons.extend(_option_reasons(attn_mask, dropout_p, is_causal, scale, enable_gqa))
    reasons.extend(_sdpa_kernel_reasons())
    if not reasons and validation.under_forward_ad(query, key, value, attn_mask):
        reasons.append("forward-mode AD (dual tensors, jvp) is not supported")
    if reasons:
        return reasons, None
    if isinstance(attn_mask, torch.Tensor) and isinstance(query, torch.Tensor):
        allowed = (torch.bool, torch.float32, query.dtype)
        if attn_mask.dtype not in allowed:
            return [f"attn_mask dtype {str(attn_mask.dtype).removeprefix('torch.')} is not supported"], None
    try:
        call = api.prepare(
            query, key, value, is_causal, scale, attn_mask, dropout_p, enable_gqa, None, "ieee",
            causal_alignment=causal_alignment,
        )  # fmt: skip
        desc = call.desc
    except Exception as error:  # noqa: BLE001 - whatever flashsdpa rejects goes to torch, which decides
        return [f"invalid arguments: {error}"], None
    return _backend_reasons(desc, call.canon.query.device), call


# ---- one call -----------------------------------------------------------------


def torch_sdpa():
    """The SDPA function flashsdpa falls back to: the one the patch replaced, else the current one."""
    return _switch.torch_function()


def _route(arguments: tuple, strict: bool, torch_call):
    """Run `arguments` (torch's SDPA arguments, in order) on flashsdpa, else `torch_call()`."""
    signature, call = call_plans.lookup(call_plans.SDPA, *arguments)
    if call is not None:  # this signature's first call passed the checks below
        return api.run(call)
    reasons, call = _check(*arguments)
    if reasons:
        _switch.fall_back(reasons, strict)
        return torch_call()
    return api.run(call_plans.keep(signature, call, arguments[:4]))


def route(
    query,
    key,
    value,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    *,
    strict: bool = False,
):
    """One SDPA call: on flashsdpa if it supports the arguments, else on torch (or raise if `strict`)."""
    arguments = (query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    return _route(
        arguments,
        strict,
        lambda: torch_sdpa()(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa),
    )


def _sdpa_arguments(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False):
    """torch's signature (scale and enable_gqa keyword-only), as a tuple."""
    return query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa


_TENSOR_ARGUMENTS = ("query", "key", "value", "attn_mask")


def _overridable_tensors(args: tuple, kwargs: dict) -> tuple:
    """The tensors among an SDPA call's arguments whose type or mode may override it (`__torch_function__`)."""
    tensors = [a for a in args[:4] if isinstance(a, torch.Tensor)]
    tensors.extend(kwargs[name] for name in _TENSOR_ARGUMENTS if isinstance(kwargs.get(name), torch.Tensor))
    return tuple(tensors)


# ---- torch's causal masks (torch.nn.attention.bias.CausalBias) --------------------------


@dataclass(frozen=True)
class CausalBiasCall:
    """An SDPA call whose mask is a `CausalBias`, as the causal call it stands for."""

    arguments: tuple  # torch's SDPA arguments in order, with attn_mask=None and is_causal=True
    alignment: str  # flashsdpa's causal_alignment: "top_left" (torch's is_causal) or "bottom_right"


def _causal_bias_call(args: tuple, kwargs: dict) -> CausalBiasCall | None:
    """`causal_upper_left(L, S)` is `is_causal=True`; `causal_lower_right(L, S)` is bottom-right alignment
    (the same when L == S). Rows with no visible key (lower right, L > S) give zeros, as torch's do.
    None when the mask is not a CausalBias of the call's lengths, when is_causal is also set (torch raises),
    or under a TorchFunctionMode (which must see the call): those go to `CausalBias.__torch_function__`."""
    try:
        query, key, value, mask, dropout_p, is_causal, scale, enable_gqa = _sdpa_arguments(*args, **kwargs)
    except TypeError:
        return None
    if type(mask) is not CausalBias or is_causal is not False or torch._C._is_torch_function_mode_enabled():
        return None
    if not all(isinstance(t, torch.Tensor) and t.dim() >= 2 for t in (query, key)):
        return None
    if (mask.seq_len_q, mask.seq_len_kv) != (query.shape[-2], key.shape[-2]):
        return None  # torch broadcasts (or rejects) the materialised mask: left to it
    lower_right = mask.variant == CausalVariant.LOWER_RIGHT and mask.seq_len_q != mask.seq_len_kv
    return CausalBiasCall(
        (query, key, value, None, dropout_p, True, scale, enable_gqa), "bottom_right" if lower_right else "top_left"
    )


def scaled_dot_product_attention(*args, **kwargs):
    mode = current_mode()
    overridable = _overridable_tensors(args, kwargs)
    if has_torch_function(overridable):
        bias_call = _causal_bias_call(args, kwargs) if mode.enabled else None
        if bias_call is not None:
            reasons, call = _check(*bias_call.arguments, causal_alignment=bias_call.alignment)
            if not reasons:
                return api.run(call)
        # As torch's own function does, switched on or off: a tensor subclass or a TorchFunctionMode sees
        # the call first, as a call of the public name (`CausalBias` recognises only that), and calls this
        # function again with its override disabled. (A CausalBias flashsdpa cannot run as an alignment
        # comes back here as `is_causal` or as its materialised bool mask, and is routed as such.)
        return handle_torch_function(scaled_dot_product_attention, overridable, *args, **kwargs)
    if not mode.enabled:
        return torch_sdpa()(*args, **kwargs)
    try:
        arguments = _sdpa_arguments(*args, **kwargs)
    except TypeError:  # a call torch rejects by its signature: let torch raise its own error
        return torch_sdpa()(*args, **kwargs)
    # A fallback passes torch the caller's own arguments, so its errors read exactly as without flashsdpa.
    return _route(arguments, mode.strict, lambda: torch_sdpa()(*args, **kwargs))


# TorchScript cannot compile this function (it takes *args/**kwargs and calls Python); scripted code
# that calls the patched name (`F.multi_head_attention_forward` in a scripted nn.MultiheadAttention or
# nn.Transformer*) calls torch's own operator instead, as it would without flashsdpa.
torch.jit._builtins._register_builtin(scaled_dot_product_attention, "aten::scaled_dot_product_attention")

scaled_dot_product_attention.__doc__ = (
    "torch.nn.functional.scaled_dot_product_attention, patched by flashsdpa (see flashsdpa.integrations.sdpa).\n\n"
    + (F.scaled_dot_product_attention.__doc__ or "")
)


# ---- the switch ---------------------------------------------------------------

_switch = Switch(F, "scaled_dot_product_attention", scaled_dot_product_attention, backward_follows_blocks=True)


def is_patched() -> bool:
    return _switch.is_patched()


def enable(strict: bool | None = None) -> None:
    """Route every `F.scaled_dot_product_attention` call in the process through flashsdpa.

    strict: raise `flashsdpa.UnsupportedError` for a call flashsdpa cannot run
        instead of falling back to torch; None reads FLASHSDPA_STRICT now.
    Idempotent; undone by `disable()`. See this module's docstring for threads and blocks.
    """
    _switch.enable(strict)


def disable() -> None:
    """Turn the process-wide default off; the original function is restored once no block is open."""
    _switch.disable()


def is_enabled() -> bool:
    """Whether a call made now from this thread would be routed through flashsdpa."""
    return current_mode().enabled


def sdpa(enabled: bool = True, *, strict: bool | None = None):
    """Within the block, this thread's SDPA calls go through flashsdpa (or, enabled=False, to torch).

    strict: as in `enable`; None reads FLASHSDPA_STRICT on entry.
    """
    return _switch.block(enabled, strict=strict)
