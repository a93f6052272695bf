"""Argument checks and the canonical (B, H, L, E) form, before any kernel runs.

`canonicalize` checks what `torch.nn.functional.scaled_dot_product_attention`
accepts and turns the caller's tensors into canonical 4D views with
differentiable view ops (unsqueeze, expand, reshape): autograd then reduces
gradients over broadcast dims by itself, and nothing is copied except where
several broadcast batch dims cannot be merged into one by a view.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from flashsdpa.cache import RecentValues
from flashsdpa.descriptor import (
    AttentionDescriptor,
    Alignment,
    Fp32Precision,
    GradientPrecision,
    MaskKind,
    statistics_dtype,
)


class Canonical(NamedTuple):  # a NamedTuple: built on every call, in a third of a frozen dataclass's time
    query: torch.Tensor  # (B, Hq, L, E)
    key: torch.Tensor  # (B, Hkv, S, E)
    value: torch.Tensor  # (B, Hkv, S, Ev)
    mask: torch.Tensor | None  # (B, Hq, L, S) view, stride 0 on broadcast dims
    output_shape: tuple[int, ...]  # the caller's (..., L, Ev)
    lse_shape: tuple[int, ...]  # the caller's (..., L)


class Variants(NamedTuple):
    """The variant arguments of `flashsdpa.attention`, checked and in canonical form."""

    window_left: int = -1  # -1: unbounded
    window_right: int = -1  # -1: unbounded; always -1 under causal (causal already bounds it at 0)
    # (a side that hides no key of this problem is -1 too)
    alignment: Alignment = Alignment.TOP_LEFT  # top-left wherever the alignment cannot change the result
    softcap: float = 0.0  # 0: off
    alibi_slopes: torch.Tensor | None = None  # (B, Hq) view in statistics_dtype, stride 0 over a broadcast batch
    sinks: torch.Tensor | None = None  # (Hq,) in statistics_dtype (differentiable conversion of the caller's)


NO_VARIANTS = Variants()


class CallOptions(NamedTuple):
    """A call's scalar options, resolved, in the order of the custom ops' arguments (ops.attention_forward):
    what a descriptor is built from, next to the canonical tensors."""

    dropout_p: float
    causal: bool
    scale: float | None  # None: 1/sqrt(head_dim), resolved by AttentionDescriptor
    window_left: int
    window_right: int
    alignment: str  # an Alignment value
    softcap: float
    fp32_precision: str  # an Fp32Precision value
    gradients: str  # a GradientPrecision value

    @staticmethod
    def of(desc: AttentionDescriptor) -> CallOptions:
        return CallOptions(
            desc.dropout_p, desc.causal, desc.scale, desc.window_left, desc.window_right, desc.alignment.value,
            desc.softcap, desc.fp32_precision.value, desc.gradients.value,
        )  # fmt: skip


def _shapes(**tensors) -> str:
    return ", ".join(
        f"{name} {tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"
        for name, t in tensors.items()
        if t is not None
    )


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype} (shape {tuple(t.shape)})")
    if t.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dims (..., seq, head_dim), got shape {tuple(t.shape)}")


# The two helpers below skip the view op when it would change nothing: each
# costs a few microseconds of host time on every attention call.
def _with_leading_ones(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t if t.dim() == ndim else t.reshape((1,) * (ndim - t.dim()) + tuple(t.shape))


def _expand(t: torch.Tensor, shape: tuple[int, ...], current: tuple[int, ...] | None = None) -> torch.Tensor:
    """t expanded to `shape`; `current` is t's shape where the caller has it at hand."""
    return t if (t.shape if current is None else current) == shape else t.expand(shape)


def _flatten_batch(t: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """Merge the leading `batch_dims` dims into one (a view when strides allow, else a copy)."""
    if batch_dims == 1:
        return t
    if batch_dims == 0:
        return t.unsqueeze(0)
    # reshape copies only when broadcast (stride-0) batch dims cannot merge as a view.
    return t.reshape(-1, *t.shape[batch_dims:])


def _is_real(x) -> bool:
    """A real number and not a bool; a float is answered first (the numbers.Real ABC check costs ~0.4 us)."""
    return type(x) is float or (isinstance(x, numbers.Real) and not isinstance(x, bool))


def check_options(dropout_p, is_causal, scale) -> None:
    if not _is_real(dropout_p) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {is_causal!r}")
    if scale is not None and (not _is_real(scale) or not math.isfinite(scale)):
        raise ValueError(f"scale must be None or a finite float, got {scale!r}")


def canonicalize(query, key, value, attn_mask=None, enable_gqa: bool = False) -> Canonical:
    # Every attention call runs this: each shape is read once into a local
    # (a `t.shape` is a new torch.Size each time), and views that would change
    # nothing are skipped (see `_expand`).
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_tensor(name, t)
    def shapes() -> str:  # built only when raising: dynamo cannot trace it with dynamic shapes
        return _shapes(query=query, key=key, value=value, attn_mask=attn_mask)

    if not query.dtype == key.dtype == value.dtype:
        raise TypeError(
            f"query, key and value must have one dtype, got {query.dtype}, {key.dtype}, {value.dtype} ({shapes()})"
        )
    if not query.device == key.device == value.device:
        raise ValueError(
            f"query, key and value must be on one device, got {query.device}, {key.device}, {value.device}"
        )
    q_shape, k_shape, v_shape = query.shape, key.shape, value.shape
    if q_shape[-1] != k_shape[-1]:
        raise ValueError(f"query and key must have the same head dim (last dim), got {shapes()}")
    if k_shape[-2] != v_shape[-2]:
        raise ValueError(f"key and value must have the same sequence length (dim -2), got {shapes()}")

    given_ndim = max(len(q_shape), len(k_shape), len(v_shape))
    ndim = max(given_ndim, 3)
    q, k, v = query, key, value
    if ndim != given_ndim or len(k_shape) != len(q_shape) or len(v_shape) != len(q_shape):
        q, k, v = _with_leading_ones(query, ndim), _with_leading_ones(key, ndim), _with_leading_ones(value, ndim)
        q_shape, k_shape, v_shape = q.shape, k.shape, v.shape
    heads_q, heads_k, heads_v = q_shape[-3], k_shape[-3], v_shape[-3]
    if heads_k != heads_v:
        if heads_k != 1 and heads_v != 1:
            raise ValueError(f"key and value must have the same number of heads (dim -3), got {shapes()}")
        heads_k = max(heads_k, heads_v)
    if heads_q == heads_k or heads_k == 1 and not enable_gqa:
        heads_kv = heads_q = max(heads_q, heads_k)  # plain broadcasting of a single head
    elif heads_q == 1 and not enable_gqa:
        heads_kv = heads_q = heads_k
    elif enable_gqa and heads_q % heads_k == 0:
        heads_kv = heads_k
    elif enable_gqa:
        raise ValueError(
            f"enable_gqa=True needs the query heads ({heads_q}) to be a multiple of the key/value heads "
            f"({heads_k}); got {shapes()}"
        )
    else:
        raise ValueError(
            f"query heads ({heads_q}) and key/value heads ({heads_k}) differ (dim -3): pass enable_gqa=True "
            f"for grouped-query attention; got {shapes()}"
        )
    batch_shape = q_shape[:-3]
    broadcast_batch = not batch_shape == k_shape[:-3] == v_shape[:-3]
    if broadcast_batch:  # equal is the common case; broadcast_shapes costs ~40 us
        try:
            batch_shape = torch.broadcast_shapes(q_shape[:-3], k_shape[:-3], v_shape[:-3])
        except RuntimeError:
            raise ValueError(
                f"the leading (batch) dims of query, key and value do not broadcast: {shapes()}"
            ) from None

    seq_q, seq_kv, head_dim, head_dim_v = q_shape[-2], k_shape[-2], q_shape[-1], v_shape[-1]
    # With the batch dims equal, a tensor is already its target shape unless its head count differs.
    if broadcast_batch or q_shape[-3] != heads_q:
        q = _expand(q, (*batch_shape, heads_q, seq_q, head_dim), q_shape)
    if broadcast_batch or k_shape[-3] != heads_kv:
        k = _expand(k, (*batch_shape, heads_kv, seq_kv, head_dim), k_shape)
    if broadcast_batch or v_shape[-3] != heads_kv:
        v = _expand(v, (*batch_shape, heads_kv, seq_kv, head_dim_v), v_shape)
    nb = len(batch_shape)

    mask = None
    if attn_mask is not None:
        mask = _canonical_mask(attn_mask, query, batch_shape, heads_q, seq_q, seq_kv, shapes)

    out_lead = (*batch_shape, heads_q) if given_ndim >= 3 else ()
    if nb != 1:
        q, k, v = _flatten_batch(q, nb), _flatten_batch(k, nb), _flatten_batch(v, nb)
    return Canonical(q, k, v, mask, (*out_lead, seq_q, head_dim_v), (*out_lead, seq_q))


def _canonical_mask(attn_mask, query, batch_shape, heads, seq_q, seq_kv, shapes) -> torch.Tensor:
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
        raise TypeError(
            f"attn_mask dtype {attn_mask.dtype} is not supported: use bool (True = may attend), float32 or the "
            f"query's dtype {query.dtype}"
        )
    if attn_mask.device != query.device:
        raise ValueError(f"attn_mask is on {attn_mask.device} but query is on {query.device}")
    score_shape = (*batch_shape, heads, seq_q, seq_kv)
    try:
        broadcast = torch.broadcast_shapes(attn_mask.shape, score_shape)
    except RuntimeError:
        broadcast = None
    if broadcast != torch.Size(score_shape):
        raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to the scores' shape "
                         f"{score_shape} (L = query dim -2, S = key dim -2); got {shapes()}")
    if attn_mask.requires_grad and attn_mask.dtype in (torch.float16, torch.bfloat16):
        # Its gradient is summed over the broadcast dims by autograd: let that
        # sum run in float32 and round once (the kernels read float32 masks).
        attn_mask = attn_mask.float()
    # Merge the batch dims while only they are expanded, then broadcast over
    # heads and rows: a merge that needs a copy then copies the mask's own
    # (H, L, S) extent per batch item, never the whole score shape, and a
    # key-padding mask keeps its stride-0 rows.
    nb = len(batch_shape)
    mask = _with_leading_ones(attn_mask, len(score_shape))
    mask = _flatten_batch(_expand(mask, (*batch_shape, *mask.shape[nb:])), nb)
    return _expand(mask, (mask.shape[0], heads, seq_q, seq_kv))


# Descriptors of recent call shapes, keyed on everything `describe` reads: a
# repeated call is a dict lookup and keeps its descriptor object (and with it
# the descriptor's kernel_key and the launchers' plans). Bounded: cleared when full.
_descriptors = RecentValues()


def describe(query, key, value, mask, options: CallOptions, alibi: bool, sinks: bool) -> AttentionDescriptor:
    """The descriptor of a problem given in canonical form (a cached object for a repeated call shape)."""
    if torch.compiler.is_compiling():  # built while tracing (the drop-in layer's backend check): not kept
        return _descriptor(query, key, value, mask, options, alibi, sinks)
    scale = options.scale
    facts = (
        query.shape, key.shape, value.shape, query.dtype, query.device.type,
        None if mask is None else (mask.dtype, mask.shape, mask.stride()),
        options, None if scale is None else math.copysign(1.0, scale), alibi, sinks,  # the sign: -0.0 == 0.0 as keys
    )  # fmt: skip
    desc = _descriptors.get(facts)
    if desc is None:
        desc = _descriptors.keep(facts, _descriptor(query, key, value, mask, options, alibi, sinks))
    return desc


def _descriptor(query, key, value, mask, options: CallOptions, alibi: bool, sinks: bool) -> AttentionDescriptor:
    b, hq, l, e = query.shape
    mask_kind = MaskKind.NONE
    if mask is not None:
        mask_kind = MaskKind.BOOL if mask.dtype == torch.bool else MaskKind.FLOAT
    return AttentionDescriptor(
        batch_shape=(b,),
        heads_q=hq,
        heads_kv=key.shape[1],
        seq_q=l,
        seq_kv=key.shape[2],
        head_dim=e,
        head_dim_v=value.shape[3],
        dtype=query.dtype,
        device_type=query.device.type,
        causal=options.causal,
        mask=mask_kind,
        mask_dtype=None if mask is None else mask.dtype,
        mask_broadcast=(
            (False,) * 4 if mask is None else tuple(st == 0 or n == 1 for st, n in zip(mask.stride(), mask.shape))
        ),
        dropout_p=float(options.dropout_p),
        scale=None if options.scale is None else float(options.scale),
        fp32_precision=_as_member(Fp32Precision, options.fp32_precision),
        gradients=_as_member(GradientPrecision, options.gradients),
        window_left=options.window_left,
        window_right=options.window_right,
        alignment=_as_member(Alignment, options.alignment),
        softcap=float(options.softcap),
        alibi=alibi,
        sinks=sinks,
    )


def _as_member(enum_type, value):
    """`enum_type(value)`, skipped for a member: under torch.compile (torch 2.11) dynamo failed to trace
    GradientPrecision(GradientPrecision.AUTO) ("SourcelessBuilder ... <class 'method'>")."""
    if isinstance(value, enum_type):
        return value
    member = enum_type._value2member_map_.get(value)  # a dict lookup; enum_type(value) costs ~1 us
    return enum_type(value) if member is None else member


def check_variants(
    canon: Canonical, causal: bool, window, causal_alignment, softcap, alibi_slopes, sinks
) -> Variants:
    """Check `flashsdpa.attention`'s variant arguments against the canonical problem; their canonical form."""
    if window is None and causal_alignment == "top_left" and softcap is None and alibi_slopes is None and sinks is None:
        return NO_VARIANTS
    query = canon.query
    batch, heads, seq_q, _ = query.shape
    seq_kv = canon.key.shape[2]
    left, right = _window(window)
    try:
        alignment = Alignment(causal_alignment)
    except ValueError:
        choices = [a.value for a in Alignment]
        raise ValueError(f"causal_alignment must be one of {choices}, got {causal_alignment!r}") from None
    if softcap is not None and (not _is_real(softcap) or not 0.0 < softcap < math.inf):
        raise ValueError(f"softcap must be None (off) or a finite float > 0, got {softcap!r}")
    accepted = (torch.float32,) if query.dtype != torch.float64 else (torch.float32, torch.float64)
    stats = statistics_dtype(query.dtype)
    slopes = None
    if alibi_slopes is not None:
        _check_small_tensor("alibi_slopes", alibi_slopes, query, accepted)
        if alibi_slopes.requires_grad:
            raise ValueError("alibi_slopes receive no gradient: pass a tensor that does not require grad (detach it)")
        if tuple(alibi_slopes.shape) not in ((heads,), (1, heads), (batch, heads)):
            raise ValueError(
                f"alibi_slopes must have shape (H,) or (B, H) = ({heads},) or ({batch}, {heads}) (H: query heads, "
                f"B: the batch dims' product), got {tuple(alibi_slopes.shape)}"
            )
        slopes = _expand(_with_leading_ones(alibi_slopes, 2).to(stats), (batch, heads))
    sink_logits = None
    if sinks is not None:
        _check_small_tensor("sinks", sinks, query, (torch.float32, query.dtype))
        if tuple(sinks.shape) != (heads,):
            raise ValueError(f"sinks must have shape (H,) = ({heads},) (H: query heads), got {tuple(sinks.shape)}")
        sink_logits = sinks.to(stats)
    # Sides that hide no key are unbounded: one descriptor (and kernel) per problem.
    offset = seq_kv - seq_q if alignment is Alignment.BOTTOM_RIGHT else 0
    if causal or right >= seq_kv - 1 - offset:
        right = -1  # causal bounds every row at its aligned position already
    if left >= seq_q - 1 + offset:
        left = -1
    positional = causal or left >= 0 or right >= 0 or slopes is not None
    if seq_q == seq_kv or not positional:
        alignment = Alignment.TOP_LEFT  # the same result either way: one descriptor, one compiled variant
    return Variants(left, right, alignment, 0.0 if softcap is None else float(softcap), slopes, sink_logits)


def _window(window) -> tuple[int, int]:
    if window is None:
        return -1, -1
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"window must be None or a pair (left, right) of ints >= -1 or None, got {window!r}")
    sides = []
    for name, side in zip(("left", "right"), window):
        if side is None:
            side = -1
        if isinstance(side, bool) or not isinstance(side, numbers.Integral) or side < -1:
            raise ValueError(f"window's {name} side must be None or an int >= -1 (-1 = unbounded), got {window!r}")
        sides.append(int(side))
    return sides[0], sides[1]


def _check_small_tensor(name: str, t, query: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dict.fromkeys(dtypes))
        raise TypeError(f"{name} must be {allowed}, got {t.dtype} (shape {tuple(t.shape)})")
    if t.device != query.device:
        raise ValueError(f"{name} is on {t.device} but query is on {query.device}")
