"""The `aten` backend (torch's fused CPU flash kernel, backends/aten.py): flashsdpa's semantics on every
point its docstring lists, forward and backward, against float64 math and torch's own error; what it
declines goes to `tiled` with a recorded reason."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

import flashsdpa
from flashsdpa.dispatch import UnsupportedError
from helpers import (
    HALF_DTYPES,
    Case,
    check_backward,
    check_forward,
    generator,
    qkv,
    random_bool_mask,
    random_float_mask,
    run,
)
from test_backward import LAYOUTS, layout_leaves
from test_masks import MASK_DTYPES, PATTERNS, make_mask

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The kernel's lse for 16-bit inputs is off by up to 6.3e-5 (measured, bf16 and fp16, L = 37-300): 1e-5
# relative at |lse| ~ 4. It changes the weights by a factor exp(6e-5), 60x under bfloat16's and 8x under
# float16's rounding of the output; float32 and float64 inputs keep the 1e-5 bar.
HALF_LSE_ATOL = 1e-4

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the aten backend runs CPU tensors")


def lse_atol(dtype):
    return HALF_LSE_ATOL if dtype in HALF_DTYPES else 1e-5


def check(case: Case, what: str, backward: bool = True, **backward_options):
    check_forward("aten", case, what, lse_atol=lse_atol(case.dtype))
    if backward:
        check_backward("aten", case, what, **backward_options)


def semantic_cases(dtype, gen):
    """Every option the kernel must compute as flashsdpa does, at odd sizes."""
    q, k, v = qkv((2, 4), (2, 4), 67, 131, 64, gen, dtype, "cpu")
    gq, gk, gv = qkv((2, 6), (2, 2), 67, 131, 64, gen, dtype, "cpu")
    long_q = qkv((1, 2), (1, 2), 131, 67, 32, gen, dtype, "cpu")
    bool_mask = random_bool_mask((2, 1, 67, 131), gen, "cpu")
    bool_mask[1, 0, 5] = False  # a row with no visible key
    float_mask = random_float_mask((67, 131), gen, torch.float32 if dtype != torch.float64 else dtype, "cpu")
    float_mask[9] = float("-inf")
    return {
        "plain": Case(q, k, v),
        "causal L<S": Case(q, k, v, causal=True),
        "causal L>S": Case(*long_q, causal=True),
        "gqa causal": Case(gq, gk, gv, causal=True, enable_gqa=True),
        "bool mask + causal, empty row": Case(q, k, v, attn_mask=bool_mask, causal=True),
        "float mask, empty row, gqa": Case(gq, gk, gv, attn_mask=float_mask, enable_gqa=True),
        "scale -0.7": Case(q, k, v, scale=-0.7),
        "scale 0": Case(q, k, v, scale=0.0),
        "scale 3": Case(q, k, v, scale=3.0),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_semantics(dtype):
    gen = generator(1600 + DTYPES.index(dtype))
    for what, case in semantic_cases(dtype, gen).items():
        check(case, f"{dtype} {what}")
    assert flashsdpa.stats() == {"calls": {"aten": 9 * 2}, "fallbacks": {}}, "every forward (2 per case) ran on aten"


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_mask_broadcast_patterns(pattern, mask_dtype):
    """Every broadcast pattern of test_masks, bool and float, read through its strides (bool: converted at
    its compact shape)."""
    gen = generator(1610 + list(PATTERNS).index(pattern) * 10 + MASK_DTYPES.index(mask_dtype))
    q, k, v = qkv((2, 3), (2, 3), 45, 77, 32, gen, torch.bfloat16, "cpu")
    mask = make_mask(mask_dtype, PATTERNS[pattern](45, 77), q.dtype, gen, "cpu")
    check(Case(q, k, v, attn_mask=mask), f"{pattern} {mask_dtype}", backward=pattern in ("BHLS", "B11S", "L1"))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts(layout):
    """Transposed, sliced, expanded and last-dim-strided views (the last copied; the kernel assumes stride 1)."""
    gen = generator(1620)
    q, k, v = layout_leaves(layout, gen, torch.float32, "cpu", 70, 90)
    check_backward("aten", Case(q, k, v, causal=True), layout, prepare=LAYOUTS[layout], gen=gen)
    assert flashsdpa.stats()["calls"] == {"aten": 1}


def test_rows_without_keys_are_zero_with_lse_neg_inf():
    """The kernel's lse 0 on a fully masked row becomes -inf; the output row is zeros and no gradient is NaN.
    Rows whose true lse is 0 are not marked."""
    gen = generator(1630)
    q, k, v = qkv((1, 2), (1, 2), 6, 5, 8, gen, torch.float32, "cpu")
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[2] = False
    mask[4, 1:] = False  # row 4 sees key 0 only: its lse is its one score
    k[..., 0, :] = 0.0  # score 0 there: a true lse of exactly 0
    out, lse = run("aten", q, k, v, attn_mask=mask, return_lse=True)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    assert torch.isneginf(lse[:, :, 2]).all() and torch.isfinite(lse[:, :, [0, 1, 3, 4, 5]]).all()
    assert torch.equal(lse[:, :, 4], torch.zeros_like(lse[:, :, 4]))
    check(Case(q, k, v, attn_mask=mask), "fully masked row")
    check(Case(q, k, v, attn_mask=torch.where(mask, 0.0, float("-inf")), causal=True), "float, causal")


def test_float_mask_gradient_takes_the_tiled_backward():
    gen = generator(1640)
    q, k, v = qkv((2, 2), (2, 2), 37, 53, 32, gen, torch.float32, "cpu")
    mask = random_float_mask((2, 1, 37, 53), gen, torch.float32, "cpu")
    check_backward("aten", Case(q, k, v, attn_mask=mask), "mask grad", mask_grad=True)


def test_same_bits_every_call():
    gen = generator(1650)
    q, k, v = (t.requires_grad_() for t in qkv((2, 4), (2, 4), 300, 500, 64, gen, torch.float32, "cpu"))
    results = []
    for _ in range(3):
        out = flashsdpa.attention(q, k, v, causal=True)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        results.append((out, *grads))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_automatic_choice_on_cpu():
    gen = generator(1660)
    q, k, v = qkv((1, 2), (1, 2), 9, 11, 16, gen, torch.bfloat16, "cpu")
    flashsdpa.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert flashsdpa.stats() == {"calls": {"aten": 1}, "fallbacks": {}}


def declined_problems(gen):
    q, k, v = qkv((1, 2), (1, 2), 9, 11, 16, gen, torch.float32, "cpu")
    q64, k64, v64 = (t.double() for t in (q, k, v))
    return {
        "dropout": ((q, k, v), dict(dropout_p=0.3), "dropout"),
        "value head dim": ((q, k, torch.randn(1, 2, 11, 8)), {}, "value head dim 8"),
        "head dim 0": ((q[..., :0], k[..., :0], v), {}, "head dim 0"),
        "causal, scale <= 0": ((q, k, v), dict(causal=True, scale=-0.0), "causal with scale -0.0"),
        "float32 mask, float64 queries": (
            (q64, k64, v64), dict(attn_mask=torch.zeros(9, 11)), "torch.float32 mask with torch.float64"
        ),
    }


@pytest.mark.parametrize(
    "problem", ["dropout", "value head dim", "head dim 0", "causal, scale <= 0", "float32 mask, float64 queries"]
)
def test_declined_problems_go_to_tiled_with_a_reason(problem):
    (q, k, v), options, reason = declined_problems(generator(1670))[problem]
    flashsdpa.attention(q, k, v, **options)
    stats = flashsdpa.stats()
    assert stats["calls"] == {"tiled": 1}
    assert any(r.startswith("aten: ") and reason in r for r in stats["fallbacks"]), stats
    with pytest.raises(UnsupportedError, match=reason):
        flashsdpa.attention(q, k, v, backend="aten", **options)


def test_float64_mask_of_float64_queries_is_taken():
    gen = generator(1680)
    q, k, v = qkv((2, 2), (2, 2), 21, 33, 16, gen, torch.float64, "cpu")
    mask = random_float_mask((21, 33), gen, torch.float64, "cpu")
    check(Case(q, k, v, attn_mask=mask, scale=math.pi), "float64 mask")


@pytest.mark.parametrize("where", ["4-D: torch runs this kernel", "3-D: torch runs math", "math pinned"])
def test_16bit_gradients_are_as_precise_as_torchs_own(where, monkeypatch):
    """Where torch's own call would run its math path, its 16-bit gradients have half the kernel's error:
    flashsdpa's backward is then the tiled one (float32 throughout), else the kernel's."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from flashsdpa.backends.tiled import TiledBackend

    tiled_backwards = []
    original = TiledBackend.backward
    monkeypatch.setattr(TiledBackend, "backward", lambda *args: tiled_backwards.append(1) or original(*args))
    gen = generator(1690)
    lead = (4,) if where.startswith("3-D") else (2, 4)
    q, k, v = qkv(lead, lead, 150, 230, 64, gen, torch.bfloat16, "cpu")
    pinned = sdpa_kernel([SDPBackend.MATH]) if where == "math pinned" else contextlib.nullcontext()
    with pinned:
        check_backward("aten", Case(q, k, v, causal=True), where)
    assert len(tiled_backwards) == (0 if where.startswith("4-D") else 1)
