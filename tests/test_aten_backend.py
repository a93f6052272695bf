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
from flashsdpa.backends.base import poisoned_outputs
from helpers import (
    HALF_DTYPES,
    Case,
    assert_forward_close,
    assert_grad_close,
    check_backward,
    check_forward,
    generator,
    qkv,
    random_bool_mask,
    random_float_mask,
    rel_err,
    run,
    variants_oracle,
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
    the kernel then runs on float32 copies (never the tiled backward), else on the 16-bit inputs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from flashsdpa.backends import aten
    from flashsdpa.backends.tiled import TiledBackend

    monkeypatch.setattr(TiledBackend, "backward", lambda *args: pytest.fail("the tiled backward ran"))
    kernel_dtypes = []
    forward_kernel, backward_kernel = aten.KERNELS
    monkeypatch.setattr(aten, "KERNELS", (forward_kernel, lambda *a, **k: kernel_dtypes.append(a[1].dtype) or
                                           backward_kernel(*a, **k)))  # fmt: skip
    gen = generator(1690)
    lead = (4,) if where.startswith("3-D") else (2, 4)
    q, k, v = qkv(lead, lead, 150, 230, 64, gen, torch.bfloat16, "cpu")
    pinned = sdpa_kernel([SDPBackend.MATH]) if where == "math pinned" else contextlib.nullcontext()
    with pinned:
        check_backward("aten", Case(q, k, v, causal=True), where)
    assert kernel_dtypes == [torch.bfloat16 if where.startswith("4-D") else torch.float32]


# The variants the kernel computes (all but softcap), as `flashsdpa.attention` takes them; "alibi": "heads" for
# (H,) slopes, "batch" for (B, H); "sinks": True.
VARIANTS = {
    "window": dict(window=(3, 2)),
    "window_right": dict(window=(None, 1)),
    "causal": dict(causal=True),
    "causal_window": dict(causal=True, window=(4, None)),
    "alibi_heads": dict(alibi="heads"),
    "alibi_batch": dict(alibi="batch", causal=True),
    "sinks": dict(sinks=True),
    "all": dict(causal=True, window=(3, 5), alibi="batch", sinks=True),
}
VARIANT_SHAPES = ((7, 12), (12, 5), (13, 13))  # L < S, L > S (bottom-right: queries before key 0), L = S


def variant_problem(variant, seq_q, seq_kv, dtype, gen, mask_kind="none"):
    """(q, k, v, keyword arguments): B=2, Hq=4, Hkv=2 (GQA), E=8; q, k, v and sinks require grad (a float mask
    does not: its gradient is the tiled backward's)."""
    q, k, v = (t.requires_grad_() for t in qkv((2, 4), (2, 2), seq_q, seq_kv, 8, gen, dtype, "cpu"))
    options = {name: value for name, value in variant.items() if name not in ("alibi", "sinks")}
    if variant.get("alibi"):
        slopes = torch.rand((4,) if variant["alibi"] == "heads" else (2, 4), generator=gen, dtype=torch.float64)
        options["alibi_slopes"] = slopes.to(torch.float64 if dtype == torch.float64 else torch.float32)
    if variant.get("sinks"):
        options["sinks"] = (torch.randn(4, generator=gen, dtype=torch.float64) * 2).to(dtype).requires_grad_()
    if mask_kind == "bool":  # with rows hidden whole, to meet rows that see nothing
        options["attn_mask"] = random_bool_mask((2, 1, seq_q, seq_kv), gen, "cpu", ensure_first_key=False)
    elif mask_kind == "float":
        options["attn_mask"] = random_float_mask((1, 4, seq_q, seq_kv), gen, dtype, "cpu")
    return q, k, v, options


def outputs_and_grads(fn, leaves, grad_out):
    out, lse = fn()
    return out, lse, torch.autograd.grad(out, leaves, grad_out)


def variant_results(variant, seq_q, seq_kv, alignment, dtype, gen, mask_kind="none"):
    """{"aten", "truth" (float64 formula), "dtype" (the formula in the inputs' dtype)}: (out, lse, grads)."""
    q, k, v, options = variant_problem(variant, seq_q, seq_kv, dtype, gen, mask_kind)
    leaves = [q, k, v] + ([options["sinks"]] if "sinks" in options else [])
    grad_out = torch.randn(2, 4, seq_q, 8, generator=gen, dtype=torch.float64).to(dtype)
    oracle_options = {n: t for n, t in options.items() if n != "enable_gqa"}
    with poisoned_outputs():
        ours = outputs_and_grads(lambda: flashsdpa.attention(
            q, k, v, enable_gqa=True, causal_alignment=alignment, backend="aten", return_lse=True, **options
        ), leaves, grad_out)  # fmt: skip
    return {
        "aten": ours,
        "truth": outputs_and_grads(lambda: variants_oracle(q, k, v, alignment=alignment, **oracle_options), leaves,
                                   grad_out),
        "dtype": outputs_and_grads(lambda: variants_oracle(q, k, v, alignment=alignment, dtype=dtype,
                                                           **oracle_options), leaves, grad_out),
    }  # fmt: skip


@pytest.fixture
def small_blocks(monkeypatch):
    """Query blocks of 5 rows: the tiny problems here span several kernel calls, some seeing no key."""
    from flashsdpa.backends import aten

    monkeypatch.setattr(aten, "QUERY_BLOCK", 5)
    monkeypatch.setattr(aten, "WINDOW_QUERY_BLOCK", 5)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
@pytest.mark.parametrize("name", VARIANTS)
def test_variants_match_the_formula_in_float64(name, alignment, mask_kind, small_blocks):
    """Window, alignment, ALiBi and sinks on the kernel (per-block masks, the sinks' merge): out, lse, rows
    with no visible key and the gradients of q, k, v and the sinks, against the float64 formula."""
    gen = generator(1700 + len(name))
    for seq_q, seq_kv in VARIANT_SHAPES:
        results = variant_results(VARIANTS[name], seq_q, seq_kv, alignment, torch.float64, gen, mask_kind)
        (out, lse, grads), (ref, ref_lse, ref_grads) = results["aten"], results["truth"]
        what = f"{name} {alignment} L={seq_q} S={seq_kv} mask={mask_kind}"
        assert rel_err(out, ref) < 1e-12, what
        assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), f"{what}: rows with no visible key"
        finite = torch.isfinite(ref_lse)
        assert rel_err(lse[finite], ref_lse[finite]) < 1e-12, what
        for index, (grad, ref_grad) in enumerate(zip(grads, ref_grads)):
            assert rel_err(grad, ref_grad) < 1e-12, f"{what}: gradient {index}"
    assert flashsdpa.stats()["calls"] == {"aten": len(VARIANT_SHAPES)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("name", ["causal_window", "alibi_heads", "sinks", "all"])
def test_variants_within_torchs_own_error(name, dtype, small_blocks):
    """In 16 and 32 bits, against float64, within 1.5x the error of the same formula computed in the inputs'
    dtype (torch has none of these variants: the formula as torch's math backend would compute it)."""
    gen = generator(1720 + len(name))
    results = variant_results(VARIANTS[name], 13, 21, "bottom_right", dtype, gen, "float")
    (out, _, grads), (ref, _, ref_grads), (theirs, _, their_grads) = (
        results[n] for n in ("aten", "truth", "dtype")
    )
    assert_forward_close(f"{name} out", out, ref, theirs, dtype)
    for index, (grad, ref_grad, their_grad) in enumerate(zip(grads, ref_grads, their_grads)):
        assert_grad_close(f"{name} gradient {index}", grad, ref_grad, their_grad, dtype)


def test_softcap_goes_to_tiled_and_the_other_variants_stay():
    gen = generator(1740)
    q, k, v = qkv((1, 2), (1, 2), 9, 11, 16, gen, torch.float32, "cpu")
    flashsdpa.attention(q, k, v, causal=True, window=(4, None), sinks=torch.zeros(2), alibi_slopes=torch.ones(2))
    assert flashsdpa.stats() == {"calls": {"aten": 1}, "fallbacks": {}}
    flashsdpa.reset_stats()
    flashsdpa.attention(q, k, v, softcap=5.0)
    stats = flashsdpa.stats()
    assert stats["calls"] == {"tiled": 1}
    assert any(r.startswith("aten: softcap") for r in stats["fallbacks"]), stats


def test_a_decode_step_is_one_plain_call(monkeypatch):
    """Bottom-right causal with one query row (a KV-cache decode step) sees every key: one kernel call,
    not causal, no band (no reversed copy of the cache)."""
    from flashsdpa.backends import aten

    monkeypatch.setattr(aten, "Band", lambda *args: pytest.fail("the band was built"))
    gen = generator(1750)
    q, k, v = qkv((2, 4), (2, 2), 1, 37, 16, gen, torch.float64, "cpu")
    out = flashsdpa.attention(q, k, v, causal=True, causal_alignment="bottom_right", enable_gqa=True)
    ref, _ = variants_oracle(q, k, v, causal=True, alignment="bottom_right")
    assert rel_err(out, ref) < 1e-12
    assert flashsdpa.stats() == {"calls": {"aten": 1}, "fallbacks": {}}
