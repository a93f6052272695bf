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
`flashsdpa.enable()` / `flashsdpa.sdpa()` (integrations/sdpa.py; both use integrations/switch.py),
without its backward-thread rule: varlen_attn's backward does not depend on the switch.
"""

from __future__ import annotations

import torch.nn.attention.varlen as torch_varlen_module

from flashsdpa.integrations.switch import Mode, Switch, tensor_reasons
from flashsdpa.varlen import check_arguments, varlen_attn as flashsdpa_varlen_attn


def current_mode() -> Mode:
    """The Mode in force for a call made now from this thread."""
    return _switch.current_mode()


def torch_varlen_attn():
    """The function flashsdpa falls back to: the one the patch replaced, else the current one."""
    return _switch.torch_function()


def unsupported_reasons(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, enable_gqa=False, seqused_k=None,
                        block_table=None, window_size=(-1, -1), **_ignored) -> list[str]:  # fmt: skip
    """Why flashsdpa would not run this `varlen_attn` call; empty if it would. Reads no tensor value."""
    reasons = []
    for name, t in (("query", query), ("key", key), ("value", value), ("cu_seq_q", cu_seq_q)):
        reasons.extend(tensor_reasons(name, t))
    for name, t in (("cu_seq_k", cu_seq_k), ("seqused_k", seqused_k), ("block_table", block_table)):
        if t is not None:
            reasons.extend(tensor_reasons(name, t))
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
    _switch.fall_back(reasons, mode.strict)
    return torch_varlen_attn()(*args, **kwargs)


varlen_attn.__doc__ = (
    "torch.nn.attention.varlen.varlen_attn, patched by flashsdpa (see flashsdpa.integrations.torch_varlen).\n\n"
    + (torch_varlen_module.varlen_attn.__doc__ or "")
)


_switch = Switch(torch_varlen_module, "varlen_attn", varlen_attn, backward_follows_blocks=False)


def enable(strict: bool | None = None) -> None:
    """Route every `torch.nn.attention.varlen.varlen_attn` call through flashsdpa (idempotent).

    strict: raise instead of falling back to torch; None reads FLASHSDPA_STRICT now.
    """
    _switch.enable(strict)


def disable() -> None:
    """Turn the process-wide default off; torch's function is restored once no block is open."""
    _switch.disable()


def varlen(enabled: bool = True, *, strict: bool | None = None):
    """Within the block, this thread's `varlen_attn` calls go through flashsdpa (or, enabled=False, to torch)."""
    return _switch.block(enabled, strict=strict)
