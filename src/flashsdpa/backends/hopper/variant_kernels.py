"""The Hopper kernels' variants: which blocks a tile visits, which of them need an element mask, and the scores.

Every question is the portable kernels' own, asked through their jit helpers
(Gluon compiles them too): `visibility_kernels.blocks_seen` for the block
ranges and `visible` for an edge block's element mask, `score_kernels`'
`scores_of_products` for softcap and ALiBi (the forward's softcap may take the
hardware's tanh instead: `forward_scores`). `VARIANTS` is a
`variants.HopperVariants` (constexpr); `band` is (lowest_diagonal,
highest_diagonal) and `transform` (scale, softcap, key_offset, the ALiBi
slopes' batch and head strides), both run-time.

Query-stationary loops (forward, dQ) walk key blocks; the key-stationary
dK/dV loop walks query blocks and asks the same questions of the mirrored
band (j - i in [lo, hi] <=> i - j in [-hi, -lo]). A block at position p is
an edge block (element mask) unless whole_start <= p < whole_end.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from flashsdpa.backends.triton.common_kernels import MASK_NONE
from flashsdpa.backends.triton.score_kernels import scores_of_products
from flashsdpa.backends.triton.visibility_kernels import blocks_seen, visible


@gluon.jit
def key_blocks_seen(first_row, last_row, seq_kv, band, VARIANTS: gl.constexpr, BLOCK_N: gl.constexpr):
    """(first, end): the key blocks rows [first_row, last_row] see, never empty. Rows that see no key visit one
    block inside [0, seq_kv), wholly masked (the loops peel their first block)."""
    start, _, _, end = blocks_seen(first_row, last_row, 0, seq_kv, band[0], band[1], VARIANTS.bounded_below,
                                   VARIANTS.bounded_above, BLOCK_N)
    first = start // BLOCK_N
    if VARIANTS.bounded_below:
        first = gl.minimum(first, gl.cdiv(seq_kv, BLOCK_N) - 1)
    return first, gl.maximum(gl.cdiv(end, BLOCK_N), first + 1)


@gluon.jit
def whole_keys(first_row, last_row, seq_kv, band, VARIANTS: gl.constexpr, BLOCK_N: gl.constexpr):
    """(whole_start, whole_end): key blocks there are seen whole by every row of [first_row, last_row]."""
    _, whole_start, whole_end, _ = blocks_seen(first_row, last_row, 0, seq_kv, band[0], band[1],
                                               VARIANTS.bounded_below, VARIANTS.bounded_above, BLOCK_N)
    return whole_start, whole_end


@gluon.jit
def query_blocks_seen(first_key, last_key, seq_q, band, VARIANTS: gl.constexpr, BLOCK_M: gl.constexpr):
    """(first, count): the query blocks that see some key of [first_key, last_key] (count may be 0)."""
    start, _, _, end = blocks_seen(first_key, last_key, 0, seq_q, -band[1], -band[0], VARIANTS.bounded_above,
                                   VARIANTS.bounded_below, BLOCK_M, True)
    first = start // BLOCK_M
    return first, gl.maximum(gl.cdiv(end, BLOCK_M) - first, 0)


@gluon.jit
def whole_queries(first_key, last_key, seq_q, band, VARIANTS: gl.constexpr, BLOCK_M: gl.constexpr):
    """(whole_start, whole_end): query blocks there see every key of [first_key, last_key] (rows past seq_q
    count as seeing them: their P is 0 through lse +inf)."""
    _, whole_start, whole_end, _ = blocks_seen(first_key, last_key, 0, seq_q, -band[1], -band[0],
                                               VARIANTS.bounded_above, VARIANTS.bounded_below, BLOCK_M, True)
    return whole_start, whole_end


@gluon.jit
def is_edge(position, whole, LOWER_SIDE: gl.constexpr, UPPER_SIDE: gl.constexpr = True):
    """Whether the block at `position` lies outside whole = (whole_start, whole_end). LOWER_SIDE: whole_start
    may be above 0 (the loop's band is bounded on the side of its first blocks); UPPER_SIDE: whole_end may lie
    before the loop's end."""
    edge = False
    if UPPER_SIDE:
        edge = position >= whole[1]
    if LOWER_SIDE:
        edge = edge | (position < whole[0])
    return edge


@gluon.jit
def hide_unseen(x, rows, cols, seq_kv, band, VARIANTS: gl.constexpr, CHECK_KEY_END: gl.constexpr, fill):
    """x where query `rows` sees key `cols` (shaped to broadcast into x, either way round), else `fill`;
    CHECK_KEY_END: keys past seq_kv are hidden too."""
    seen = visible(rows, cols, seq_kv, band[0], band[1], VARIANTS.bounded_below, VARIANTS.bounded_above,
                   CHECK_KEY_END)
    return gl.where(seen, x, fill)


@gluon.jit
def row_slope(slopes_ptr, transform, batch, head_q, VARIANTS: gl.constexpr):
    """The ALiBi slope of (batch, query head), 0.0 without ALiBi."""
    slope = 0.0
    if VARIANTS.alibi:
        slope = gl.load(slopes_ptr + batch * transform[3] + head_q * transform[4])
    return slope


@gluon.jit
def transformed_scores(s, rows, cols, transform, slope, VARIANTS: gl.constexpr, ABSOLUTE_TANH: gl.constexpr = False):
    """(scores in natural units, d scores / d (scale q.k)) of raw products `s`: scale, softcap, ALiBi.

    ABSOLUTE_TANH: softcap's tanh is `score_kernels.tanh_absolute` (enough where P is rounded to 16 bits);
    the dK/dV kernel takes it for its fewer live values (sm_90, bf16 d=128 causal softcap: 40 B of spill
    stores, 156 with the polynomial one), the others spill more with it (the forward 92 B, not 0)."""
    return scores_of_products(s, rows, cols, transform[0], transform[1], slope, transform[2], None, 0, 0, 0,
                              True, VARIANTS.softcap, VARIANTS.alibi, MASK_NONE, False, False, False, ABSOLUTE_TANH)


@gluon.jit
def hardware_tanh(x):
    """tanh of float32 x by tanh.approx.f32 (MUFU.TANH, sm_75 on): at most 1.1e-5 relative error over float32
    (scripts/bench_softcap_gpu.py measures it on the GPU); tanh(+-inf) = +-1, NaN stays NaN."""
    return gl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=gl.float32, is_pure=True, pack=1)


@gluon.jit
def forward_scores(s, rows, cols, transform, slope, VARIANTS: gl.constexpr, TANH: gl.constexpr):
    """The forward's scores of raw products `s` where softcap or ALiBi transform them, in the units its
    qk_scale takes to base 2 (`HopperForwardSpec.qk_scale`).

    TANH "precise": `transformed_scores` (natural units). "hardware": softcap's tanh is `hardware_tanh` of
    s * (scale / softcap); without ALiBi the scores are tanh's values (qk_scale is softcap * log2(e): no
    multiply an element for softcap), with ALiBi they go on to natural units."""
    if TANH == "hardware":
        capped = hardware_tanh(s * (transform[0] / transform[1]))
        if VARIANTS.alibi:
            scores, _ = scores_of_products(capped * transform[1], rows, cols, 1.0, 0.0, slope, transform[2], None,
                                           0, 0, 0, True, False, True, MASK_NONE, False, False, False)
        else:
            scores = capped
    else:
        scores, _ = transformed_scores(s, rows, cols, transform, slope, VARIANTS)
    return scores
