"""The public functions: torch's SDPA signature, and flashsdpa's own keyword API."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flashsdpa import dispatch, gradient_precision, ops
from flashsdpa.descriptor import AttentionDescriptor, Fp32Precision, GradientPrecision
from flashsdpa.validation import Canonical, canonicalize, check_no_forward_ad, check_options, describe


def _pinned_backend_outside_compile() -> str:
    """The `use_backend` pin, captured at the call so the backward uses it too.

    Under torch.compile the pin is not read here (dynamo cannot trace a
    ContextVar); the op reads it itself when it runs ("" = automatic or pinned).
    """
    if torch.compiler.is_compiling():
        return ""
    return dispatch.pinned_backend() or ""


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Drop-in for `torch.nn.functional.scaled_dot_product_attention` (torch >= 2.5 semantics).

    query (..., Hq, L, E), key (..., Hkv, S, E), value (..., Hkv, S, Ev) -> (..., Hq, L, Ev).
    Computes softmax(query @ key^T * scale + mask) @ value, `scale` defaulting
    to 1/sqrt(E). A bool `attn_mask` marks keys that may be attended (True), a
    float one is added to the scaled scores; both broadcast to (..., L, S).
    `is_causal` is aligned top-left: query i sees keys j <= i, also when L != S::

        L=3, S=5     keys 0 1 2 3 4
        query 0           x . . . .
        query 1           x x . . .
        query 2           x x x . .

    Unlike torch's math backend (which raises), `attn_mask` together with
    `is_causal` applies both, as torch's CPU flash kernel does. A row with no
    key it may attend to gives zeros. `enable_gqa` lets Hq be a multiple of Hkv.
    """
    return attention(
        query,
        key,
        value,
        causal=is_causal,
        scale=scale,
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        enable_gqa=enable_gqa,
    )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    enable_gqa: bool = False,
    return_lse: bool = False,
    backend: str | None = None,
    fp32_precision: str = "ieee",
):
    """flashsdpa's keyword API over the same machinery as `scaled_dot_product_attention`.

    return_lse: also return the natural-log log-sum-exp of each row of the
        scaled, masked scores, shape (..., L), float32 (float64 for float64
        inputs); -inf for a row with no visible key.
    backend: "triton", "tiled" or "reference" pins a backend (raising if it
        cannot take the problem); None chooses automatically, falling back with
        a recorded reason (see `flashsdpa.stats()`).
    fp32_precision: "ieee" (default, float32 accuracy) or "tf32" (opt-in,
        faster tensor-core products with ~1e-3 relative error) for float32 inputs.
    """
    call = prepare(q, k, v, causal, scale, attn_mask, dropout_p, enable_gqa, backend, fp32_precision)
    # Edge values torch accepts whose output needs no kernel: dropout_p = 1 drops every weight (out = 0,
    # zero gradients, lse as without dropout), and a non-finite scale makes every score non-finite
    # (out = lse = NaN, NaN gradients, as torch's math backend gives). Computed as the attention at a
    # finite scale without dropout, times that value: the autograd graph and the shapes stay. (Read from
    # the caller's own scale: a resolved 1/sqrt(E) is finite, and a SymFloat under torch.compile.)
    if dropout_p >= 1.0 or (scale is not None and not math.isfinite(scale)):
        finite = scale is None or math.isfinite(scale)
        out, lse = attention(
            q, k, v, causal=causal, scale=scale if finite else 1.0, attn_mask=attn_mask, enable_gqa=enable_gqa,
            return_lse=True, backend=backend, fp32_precision=fp32_precision,
        )  # fmt: skip
        out = out * (0.0 if finite else math.nan)
        lse = lse if finite else torch.full_like(lse, math.nan)
        return (out, lse) if return_lse else out
    return run(call, return_lse)


@dataclass(frozen=True)
class PreparedCall:
    """A validated call in canonical form, ready for `run` (the drop-in layer checks it first)."""

    canon: Canonical
    causal: bool
    scale: float  # resolved: 1/sqrt(the caller's head dim) when None was given
    dropout_p: float
    backend: str | None
    precision: Fp32Precision
    gradients: GradientPrecision  # the 16-bit backward's, chosen here as torch chooses at its forward

    def describe(self) -> AttentionDescriptor:
        c = self.canon
        return describe(
            c.query, c.key, c.value, c.mask, causal=self.causal, dropout_p=self.dropout_p, scale=self.scale,
            fp32_precision=self.precision, gradients=self.gradients,
        )


def prepare(q, k, v, causal, scale, attn_mask, dropout_p, enable_gqa, backend, fp32_precision) -> PreparedCall:
    """Validate every argument (raising with the argument's name and the shapes) before anything runs."""
    check_options(dropout_p, causal, scale)
    if backend is not None:
        dispatch.get_backend(backend)
    try:
        precision = Fp32Precision(fp32_precision)
    except ValueError:
        choices = [p.value for p in Fp32Precision]
        raise ValueError(f"fp32_precision must be one of {choices}, got {fp32_precision!r}") from None
    check_no_forward_ad(q, k, v, attn_mask)
    canon = canonicalize(q, k, v, attn_mask, enable_gqa)
    head_dim = canon.query.shape[-1]
    # float(): a 0-d tensor scale (torch accepts one) becomes its value.
    resolved_scale = float(scale) if scale is not None else (1.0 / math.sqrt(head_dim) if head_dim else 1.0)
    # From the caller's tensors: the canonical views hide their rank and broadcast dims.
    gradients = gradient_precision.at_forward(q, k, v, attn_mask, dropout_p, causal, enable_gqa)
    return PreparedCall(canon, causal, resolved_scale, float(dropout_p), backend, precision, gradients)


def run(call: PreparedCall, return_lse: bool = False):
    c = call.canon
    out, lse, _ = ops.forward(
        c.query,
        c.key,
        c.value,
        c.mask,
        call.dropout_p,
        call.causal,
        call.scale,
        call.backend or _pinned_backend_outside_compile(),
        call.precision.value,
        call.gradients.value,
    )
    # The caller's shape is often the canonical one already: skip the view (and its autograd node) then.
    out = out if out.shape == c.output_shape else out.reshape(c.output_shape)
    if not return_lse:
        return out
    return out, lse if lse.shape == c.lse_shape else lse.reshape(c.lse_shape)
