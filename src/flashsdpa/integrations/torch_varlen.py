"""Route torch's `torch.nn.attention.varlen.varlen_attn` through `flashsdpa.varlen_attn`.

    from flashsdpa.integrations import torch_varlen
    torch_varlen.enable()                   # process-wide, until torch_varlen.disable()
    with torch_varlen.varlen():             # this thread, for the block
        out = torch.nn.attention.varlen.varlen_attn(q, k, v, cu_seq, cu_seq, max_len, max_len)

What is patched: the attribute `torch.nn.attention.varlen.varlen_attn`, so code that looks it up
when it calls (`varlen.varlen_attn(...)`, or `from torch.nn.attention.varlen import varlen_attn`
inside the calling function) runs unchanged, also on CPU tensors and in float32/float64, which
torch's own function (CUDA, bf16/fp16) does not take. Not covered: a reference taken before the
patch, and `varlen_attn_out`.

A call flashsdpa cannot take (a tensor subclass, arguments it rejects) goes to torch's own function
with the caller's arguments, so results and errors are torch's, and the reason is counted in
`flashsdpa.stats()["fallbacks"]`; in strict mode (`enable(strict=True)`, `varlen(strict=True)`, or
FLASHSDPA_STRICT=1) it raises `flashsdpa.UnsupportedError` instead. The on/off semantics are those of
`flashsdpa.enable()` / `flashsdpa.sdpa()` (integrations/sdpa.py), without its backward-thread rule:
varlen_attn's backward does not depend on the switch.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.attention.varlen as torch_varlen_module

from flashsdpa import dispatch
from flashsdpa.dispatch import UnsupportedError
from flashsdpa.integrations.sdpa import TORCH, Mode, _tensor_reasons, strict_from_env
from flashsdpa.varlen import check_arguments, varlen_attn as flashsdpa_varlen_attn

_OFF = Mode(enabled=False, strict=False)
_lock = threading.Lock()
_thread = threading.local()  # .mode: the innermost varlen() block's Mode in this thread
_state = {"process": _OFF, "blocks": 0, "original": None}


def current_mode() -> Mode:
    mode = getattr(_thread, "mode", None)
    return mode if mode is not None else _state["process"]


def torch_varlen_attn():
    """The function flashsdpa falls back to: the one the patch replaced, else the current one."""
    original = _state["original"]
    return original if original is not None else torch_varlen_module.varlen_attn


def unsupported_reasons(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, enable_gqa=False, seqused_k=None,
                        block_table=None, window_size=(-1, -1), **_ignored) -> list[str]:  # fmt: skip
    """Why flashsdpa would not run this `varlen_attn` call; empty if it would. Reads no tensor value."""
    reasons = []
    for name, t in (("query", query), ("key", key), ("value", value), ("cu_seq_q", cu_seq_q)):
        reasons.extend(_tensor_reasons(name, t))
    for name, t in (("cu_seq_k", cu_seq_k), ("seqused_k", seqused_k), ("block_table", block_table)):
        if t is not None:
            reasons.extend(_tensor_reasons(name, t))
    if reasons:
        return reasons
    try:
        check_arguments(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, enable_gqa, seqused_k, block_table)
        if len(window_size) != 2 or min(window_size) < -1:
            raise ValueError(f"window_size {window_size!r}")
    except Exception as error:  # noqa: BLE001 - whatever flashsdpa rejects goes to torch, which decides
        return [f"invalid arguments: {error}"]
    return []


def _call(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
          window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):  # fmt: skip
    """torch's signature, run on flashsdpa."""
    return flashsdpa_varlen_attn(
        query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, return_aux=return_aux, scale=scale,
        window_size=window_size, enable_gqa=enable_gqa, seqused_k=seqused_k, block_table=block_table,
        num_splits=num_splits,
    )  # fmt: skip


def varlen_attn(*args, **kwargs):
    mode = current_mode()
    if not mode.enabled:
        return torch_varlen_attn()(*args, **kwargs)
    try:
        reasons = unsupported_reasons(*args, **kwargs)
    except TypeError:  # a call torch rejects by its signature: let torch raise its own error
        return torch_varlen_attn()(*args, **kwargs)
    if not reasons:
        return _call(*args, **kwargs)
    if mode.strict:
        raise UnsupportedError(
            "flashsdpa cannot run this varlen_attn call (strict mode, no fallback to torch): " + "; ".join(reasons),
            reasons,
        )
    if not torch.compiler.is_compiling():  # the stats lock cannot be traced
        dispatch.record_call(TORCH)
        for reason in reasons:
            dispatch.record_fallback(reason)
    return torch_varlen_attn()(*args, **kwargs)


varlen_attn.__doc__ = (
    "torch.nn.attention.varlen.varlen_attn, patched by flashsdpa (see flashsdpa.integrations.torch_varlen).\n\n"
    + (torch_varlen_module.varlen_attn.__doc__ or "")
)


def _update() -> None:
    """(Un)patch to match the default and the open blocks; call with the lock held."""
    wanted = _state["process"].enabled or _state["blocks"] > 0
    installed = torch_varlen_module.varlen_attn is varlen_attn
    if wanted and not installed:
        _state["original"] = torch_varlen_module.varlen_attn
        torch_varlen_module.varlen_attn = varlen_attn
    elif not wanted and installed:
        torch_varlen_module.varlen_attn = _state["original"]
        _state["original"] = None


def enable(strict: bool | None = None) -> None:
    """Route every `torch.nn.attention.varlen.varlen_attn` call through flashsdpa (idempotent).

    strict: raise instead of falling back to torch; None reads FLASHSDPA_STRICT now.
    """
    with _lock:
        _state["process"] = Mode(enabled=True, strict=strict_from_env() if strict is None else bool(strict))
        _update()


def disable() -> None:
    """Turn the process-wide default off; torch's function is restored once no block is open."""
    with _lock:
        _state["process"] = _OFF
        _update()


@contextlib.contextmanager
def varlen(enabled: bool = True, *, strict: bool | None = None):
    """Within the block, this thread's `varlen_attn` calls go through flashsdpa (or, enabled=False, to torch)."""
    mode = Mode(enabled=bool(enabled), strict=strict_from_env() if strict is None else bool(strict))
    with _lock:
        _state["blocks"] += 1
        _update()
    previous = getattr(_thread, "mode", None)
    _thread.mode = mode
    try:
        yield
    finally:
        _thread.mode = previous
        with _lock:
            _state["blocks"] -= 1
            _update()
