"""The public functions: torch's SDPA signature, and flashsdpa's own keyword API."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flashsdpa import call_plans, dispatch, gradient_precision, ops
from flashsdpa.descriptor import AttentionDescriptor, Fp32Precision, GradientPrecision
from flashsdpa.validation import (
    CallOptions,
    Canonical,
    Variants,
    canonicalize,
    check_no_forward_ad,
    check_options,
    check_variants,
    describe,
)


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
    window: tuple[int | None, int | None] | None = None,
    causal_alignment: str = "top_left",
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
):
    """flashsdpa's keyword API over the same machinery as `scaled_dot_product_attention`.

    The arguments shared with `scaled_dot_product_attention` mean the same
    (`causal` is its `is_causal`); README's "Attention variants" section draws the ones below.

    return_lse: also return the natural-log log-sum-exp of each row of the
        scaled, masked scores, shape (..., L), float32 (float64 for float64
        inputs); -inf for a row with no visible key. With `sinks` it includes
        the row's sink (= the sink for a row with no visible key).
    backend: "hopper", "triton", "aten", "tiled" or "reference" pins a backend (raising if it
        cannot take the problem); None chooses automatically, falling back with
        a recorded reason (see `flashsdpa.stats()`).
    fp32_precision: "ieee" (default, float32 accuracy) or "tf32" (opt-in,
        faster tensor-core products with ~1e-3 relative error) for float32 inputs.
    causal_alignment: where query i sits among the keys: "top_left" (torch's,
        at key i) or "bottom_right" (FlashAttention's, at key i + S - L: the
        last query at the last key). It applies to `causal`, `window` and `alibi_slopes`.
    window: (left, right): query i sees keys j with
        i' - left <= j <= i' + right, i' its aligned position; None or -1 on a
        side leaves it unbounded. With `causal` the right side is 0::

            window=(1, 1), L=3, S=6   top_left          bottom_right
                              keys 0 1 2 3 4 5     keys 0 1 2 3 4 5
                    query 0        x x . . . .          . . x x x .
                    query 1        x x x . . .          . . . x x x
                    query 2        . x x x . .          . . . . x x

    softcap: a float > 0 turns each scaled score s into softcap * tanh(s / softcap)
        (Gemma 2), before ALiBi and the mask are added.
    alibi_slopes: (H,) or (B, H) float32 (H query heads, B the batch dims'
        product): adds -slope * |i' - j| to the scores (FlashAttention's ALiBi), after the softcap.
        The slopes get no gradient.
    sinks: (H,) float32 or the inputs' dtype: a logit per query head that
        joins each row's softmax denominator with no value row (gpt-oss); it gets a gradient.

    In order, a visible pair's score is: s = scale * q.k; softcap; + ALiBi;
    + the float mask (a bool mask hides keys). A row with no visible key gives
    zeros, with or without a sink. The returned lse includes the sink:
    log(exp(sink) + sum_j exp(s_j)); -inf for an empty row without a sink.
    """
    if (attn_mask is None and type(dropout_p) is float and dropout_p == 0.0 and scale is None and enable_gqa is False
            and return_lse is False and backend is None and fp32_precision == "ieee" and window is None
            and causal_alignment == "top_left" and softcap is None and alibi_slopes is None and sinks is None):  # fmt: skip
        out = call_plans.plain_cpu_call(q, k, v, causal)
        if out is not None:
            return out
    signature, call = call_plans.lookup(call_plans.ATTENTION, q, k, v, attn_mask, dropout_p, causal, scale, enable_gqa,
                                        backend, fp32_precision, window, causal_alignment, softcap, alibi_slopes,
                                        sinks)  # fmt: skip
    if call is not None:  # this signature's first call was validated, described and given a backend
        return run(call, return_lse)
    variants = dict(window=window, causal_alignment=causal_alignment, softcap=softcap, alibi_slopes=alibi_slopes,
                    sinks=sinks)  # fmt: skip
    call = prepare(q, k, v, causal, scale, attn_mask, dropout_p, enable_gqa, backend, fp32_precision, **variants)
    # Edge values torch accepts whose output needs no kernel: dropout_p = 1 drops every weight (out = 0,
    # zero gradients, lse as without dropout), and a non-finite scale makes every score non-finite
    # (out = lse = NaN, NaN gradients, as torch's math backend gives). Computed as the attention at a
    # finite scale without dropout, times that value: the autograd graph and the shapes stay. (Read from
    # the caller's own scale: a resolved 1/sqrt(E) is finite, and a SymFloat under torch.compile.)
    if dropout_p >= 1.0 or (scale is not None and not math.isfinite(scale)):
        finite = scale is None or math.isfinite(scale)
        out, lse = attention(
            q, k, v, causal=causal, scale=scale if finite else 1.0, attn_mask=attn_mask, enable_gqa=enable_gqa,
            return_lse=True, backend=backend, fp32_precision=fp32_precision, **variants,
        )  # fmt: skip
        out = out * (0.0 if finite else math.nan)
        lse = lse if finite else torch.full_like(lse, math.nan)
        return (out, lse) if return_lse else out
    return run(call_plans.keep(signature, call, (q, k, v, attn_mask)), return_lse)


@dataclass
class PreparedCall:
    """A validated call in canonical form, ready for `run` (the drop-in layer checks it first)."""

    canon: Canonical
    variants: Variants  # the variant tensors (alibi_slopes, sinks) in canonical form
    options: CallOptions
    backend: str | None
    _desc: AttentionDescriptor | None = None
    # The backend that runs it, where it is known before the run (call_plans.py); None: chosen when it runs.
    choice: dispatch.Choice | None = None

    @property
    def desc(self) -> AttentionDescriptor:
        """The problem's descriptor, built once per call (on first use: the drop-in layer's backend check, or
        the eager run) and carried to the backends and the backward. A traced call (torch.compile, jit.trace)
        does not read it: its custom op describes the problem when it runs, from the same tensors and options.
        (Kept by hand: functools.cached_property takes a lock, which dynamo cannot trace on Python 3.11.)"""
        if self._desc is None:
            c, w = self.canon, self.variants
            self._desc = describe(c.query, c.key, c.value, c.mask, self.options, w.alibi_slopes is not None,
                                  w.sinks is not None)  # fmt: skip
        return self._desc

    @property
    def gradients(self) -> GradientPrecision:
        return GradientPrecision(self.options.gradients)


def prepare(
    q, k, v, causal, scale, attn_mask, dropout_p, enable_gqa, backend, fp32_precision,
    *, window=None, causal_alignment="top_left", softcap=None, alibi_slopes=None, sinks=None,
) -> PreparedCall:  # fmt: skip
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
    w = check_variants(canon, causal, window, causal_alignment, softcap, alibi_slopes, sinks)
    # From the caller's tensors: the canonical views hide their rank and broadcast dims.
    gradients = gradient_precision.at_forward(q, k, v, attn_mask, dropout_p, causal, enable_gqa)
    options = CallOptions(
        # float(): a 0-d tensor scale (torch accepts one) becomes its value.
        float(dropout_p), causal, None if scale is None else float(scale), w.window_left, w.window_right,
        w.alignment.value, w.softcap, precision.value, gradients.value,
    )  # fmt: skip
    return PreparedCall(canon, w, options, backend)


def run(call: PreparedCall, return_lse: bool = False):
    c = call.canon
    out, lse, _ = ops.forward(call, call.backend or _pinned_backend_outside_compile())
    # The caller's shape is often the canonical one already: skip the view (and its autograd node) then.
    out = out if out.shape == c.output_shape else out.reshape(c.output_shape)
    if not return_lse:
        return out
    return out, lse if lse.shape == c.lse_shape else lse.reshape(c.lse_shape)
