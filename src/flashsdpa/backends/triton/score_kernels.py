"""Scores from raw products: the one place the Triton kernels apply scale, softcap, ALiBi and masks.

For a visible pair (query i, key j) the score is, in this order (the order of
`flashsdpa.attention`'s docstring):

    s = scale * (q_i . k_j)
    s = softcap * tanh(s / softcap)             (SOFTCAP)
    s = s - slope * |i + key_offset - j|        (ALIBI; slope per batch and query head)
    s = s + mask[i, j]                          (MASK_FLOAT)
    s = -inf where mask[i, j] is False          (MASK_BOOL)
    s = -inf where query i does not see key j   (APPLY_EDGE_MASK; see visibility_kernels)

Without softcap, ALiBi or a float mask (NATURAL_UNITS false) the forward
keeps raw products q.k and applies the scale in the exponent, after the row
max comes off (see forward_kernels): the masks are then all there is to do.
"""

import triton
import triton.language as tl

from flashsdpa.backends.triton.common_kernels import MASK_BOOL, MASK_FLOAT
from flashsdpa.backends.triton.visibility_kernels import visible

# Below this |x|, tanh is a polynomial (Cephes' tanhf): 1 - 2 / (exp(2x) + 1)
# loses relative accuracy to cancellation as x -> 0.
TANH_POLYNOMIAL_BELOW = tl.constexpr(0.625)


@triton.jit
def tanh(x):
    """tanh of float32 x to about 1e-7 relative (Triton has no tanh of its own that the interpreter runs)."""
    z = x * x
    small = ((((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z + 1.33314422036e-1) * z
             - 3.33332819422e-1) * z * x + x
    e = tl.exp(-2.0 * tl.abs(x))
    large = (1.0 - e) / (1.0 + e)
    large = tl.where(x < 0, -large, large)
    return tl.where(tl.abs(x) < TANH_POLYNOMIAL_BELOW, small, large)


@triton.jit
def tanh_absolute(x):
    """tanh of float32 x to about 1e-7 absolute (not relative near 0): one exp2 and one division, for scores
    whose probabilities are rounded to 16 bits, where a softcapped score needs only its absolute error small."""
    return 1.0 - 2.0 / (tl.math.exp2(x * 2.8853900817779268) + 1.0)  # (2 log2(e): exp(2x))


# 2^f for |f| <= 1/2: a degree-5 polynomial fitted for relative error (2.3e-7 in float32 Horner steps).
EXP2_POLYNOMIAL = (1.0000001192092896, 0.6931469440460205, 0.24022120237350464, 0.05550713464617729,
                   0.009675541892647743, 0.0013276466634124517)
_E0, _E1, _E2, _E3, _E4, _E5 = (tl.constexpr(c) for c in EXP2_POLYNOMIAL)
# 1.5 * 2^23: x + ROUNDER holds round(x) in the low mantissa bits (|x| < 2^22); its bits are 0x4B400000 + round(x).
ROUNDER = tl.constexpr(12582912.0)


@triton.jit
def exp2_by_fma(x):
    """2^x of float32 x <= 0 without the MUFU unit (FMA and integer pipes alone): x = j + f with j = round(x),
    2^f by `EXP2_POLYNOMIAL` (2.3e-7 relative) and 2^j put in the exponent field. x < -126.5 (and -inf) give
    exactly 0, NaN gives NaN; meant for the softmax's exponents, which never exceed 0 (x > 127 is wrong)."""
    x = tl.maximum(x, -127.0, propagate_nan=tl.PropagateNan.ALL)
    rounded = x + ROUNDER
    f = x - (rounded - ROUNDER)
    p = ((((_E5 * f + _E4) * f + _E3) * f + _E2) * f + _E1) * f + _E0
    power = (rounded.to(tl.int32, bitcast=True) - (0x4B400000 - 127)) << 23  # (j + 127) << 23: 2^j, 0 at j = -127
    return p * power.to(tl.float32, bitcast=True)


@triton.jit
def scores_of_products(
    qk,
    rows,
    cols,
    scale,
    softcap,
    slope,
    key_offset,
    mask_tile,
    key_end,
    lowest_diagonal,
    highest_diagonal,
    NATURAL_UNITS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr,
    MASK_KIND: tl.constexpr,
    APPLY_EDGE_MASK: tl.constexpr,
    BOUNDED_BELOW: tl.constexpr,
    BOUNDED_ABOVE: tl.constexpr,
    ABSOLUTE_TANH: tl.constexpr = False,
):
    """(scores, dscores/ds) of a tile of raw products `qk`, in the module doc's order.

    rows and cols are the tile's query and key positions, shaped to broadcast
    into it either way round ([M, 1] and [1, N], or transposed); `slope`
    broadcasts the same way (a scalar, or one per row). NATURAL_UNITS: scores
    in natural units (scale applied); otherwise the raw products with the
    masks applied (valid only without softcap, ALiBi and a float mask).
    The derivative (of the final score by scale * q.k) is softcap's 1 - tanh^2
    with SOFTCAP, else 1.0; the backward multiplies the score gradient by it.
    ABSOLUTE_TANH: softcap's tanh is `tanh_absolute` (16-bit kernels), else `tanh`.
    """
    derivative = 1.0
    if NATURAL_UNITS:
        scores = qk * scale
        if SOFTCAP:
            if ABSOLUTE_TANH:
                capped = tanh_absolute(scores / softcap)
            else:
                capped = tanh(scores / softcap)
            scores = softcap * capped
            derivative = 1.0 - capped * capped
        if ALIBI:
            distance = tl.abs(rows + key_offset - cols).to(tl.float32)
            scores = scores - slope * distance
        if MASK_KIND == MASK_FLOAT:
            scores = scores + mask_tile.to(tl.float32)
    else:
        scores = qk
    if MASK_KIND == MASK_BOOL:
        scores = tl.where(mask_tile != 0, scores, float("-inf"))
    if APPLY_EDGE_MASK:
        seen = visible(rows, cols, key_end, lowest_diagonal, highest_diagonal, BOUNDED_BELOW, BOUNDED_ABOVE, True)
        scores = tl.where(seen, scores, float("-inf"))
    return scores, derivative
