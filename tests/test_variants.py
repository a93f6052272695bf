"""The attention variants (window, alignment, softcap, ALiBi, sinks) against a direct float64 formula.

`helpers.variants_oracle` decides visibility pair by pair and is differentiated by
autograd; every backend that computes the variants is compared with it, outputs,
lse and gradients (q, k, v, the sinks, a float mask), on odd sizes with L < S and
L > S, both alignments, GQA and E != Ev.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

import flashsdpa
from flashsdpa import api
from flashsdpa.backends import tiled
from flashsdpa.backends.base import poisoned_outputs
from flashsdpa.backends.triton import TritonBackend
from flashsdpa.descriptor import Alignment
from helpers import (
    assert_forward_close,
    assert_grad_close,
    generator,
    keep_mask_for,
    predict_seed,
    qkv,
    random_bool_mask,
    random_float_mask,
    randn,
    rel_err,
    variants_oracle,
)

# name -> the variant arguments ("alibi": "heads" for (H,) slopes, "batch" for (B, H); "sinks": True)
VARIANTS = {
    "window": dict(window=(3, 2)),
    "window_right": dict(window=(None, 1)),
    "causal": dict(causal=True),
    "causal_window": dict(causal=True, window=(4, None)),
    "softcap": dict(softcap=1.5),
    "alibi_heads": dict(alibi="heads"),
    "alibi_batch": dict(alibi="batch"),
    "sinks": dict(sinks=True),
    "all": dict(causal=True, window=(3, 5), softcap=2.0, alibi="batch", sinks=True),
}
SHAPES = ((7, 12), (12, 5))  # (L, S): L < S and L > S (bottom-right puts the first queries before key 0)
ALIGNMENTS = ("top_left", "bottom_right")
B, HQ, HKV, E, EV = 2, 4, 2, 8, 6


def problem(variant: dict, seq_q, seq_kv, dtype, gen, mask_kind="none", scale=None, dims=(B, HQ, HKV, E, EV),
            device="cpu"):
    """(q, k, v, flashsdpa keyword arguments) on `device` (drawn on the CPU); q, k, v, sinks and a float mask
    require grad. dims: (B, Hq, Hkv, E, Ev)."""
    B, HQ, HKV, E, EV = dims  # noqa: N806
    q, k, v = qkv((B, HQ), (B, HKV), seq_q, seq_kv, E, gen, dtype, device, head_dim_v=EV)
    options = {name: value for name, value in variant.items() if name not in ("alibi", "sinks")}
    options["enable_gqa"] = True
    if scale is not None:
        options["scale"] = scale
    if variant.get("alibi"):
        shape = (HQ,) if variant["alibi"] == "heads" else (B, HQ)
        options["alibi_slopes"] = torch.rand(shape, generator=gen, dtype=torch.float64).to(
            torch.float64 if dtype == torch.float64 else torch.float32
        ).to(device)
    if variant.get("sinks"):
        options["sinks"] = (randn((HQ,), gen, torch.float64) * 2).to(dtype).to(device).requires_grad_()
    if mask_kind == "bool":  # with rows and whole heads hidden, to meet rows that see nothing
        options["attn_mask"] = random_bool_mask((B, 1, seq_q, seq_kv), gen, device, ensure_first_key=False)
    elif mask_kind == "float":
        options["attn_mask"] = random_float_mask((1, HQ, seq_q, seq_kv), gen, dtype, device).requires_grad_()
    for t in (q, k, v):
        t.requires_grad_()
    return q, k, v, options


def oracle_of(q, k, v, options, alignment, dtype=torch.float64):
    names = ("causal", "window", "softcap", "alibi_slopes", "sinks", "attn_mask", "scale")  # GQA: from the shapes
    return variants_oracle(q, k, v, alignment=alignment, dtype=dtype, **{n: options[n] for n in names if n in options})


def leaves(q, k, v, options):
    found = {"q": q, "k": k, "v": v}
    for name in ("sinks", "attn_mask"):
        t = options.get(name)
        if t is not None and t.requires_grad:
            found[name] = t
    return found


def run_and_grads(fn, tensors, grad_out):
    out, lse = fn()
    grads = torch.autograd.grad(out, list(tensors.values()), grad_out)
    return out, lse, dict(zip(tensors, grads))


def check_against_oracle(backend, variant, seq_q, seq_kv, alignment, mask_kind, dtype=torch.float64, seed=0, bar=1e-10):
    gen = generator(seed)
    q, k, v, options = problem(variant, seq_q, seq_kv, dtype, gen, mask_kind, scale=0.8 if seed % 2 else None)
    tensors = leaves(q, k, v, options)
    grad_out = randn((B, HQ, seq_q, EV), gen, dtype)
    with poisoned_outputs():
        out, lse, grads = run_and_grads(
            lambda: flashsdpa.attention(
                q, k, v, causal_alignment=alignment, backend=backend, return_lse=True, **options
            ),
            tensors,
            grad_out,
        )
    ref_out, ref_lse, ref_grads = run_and_grads(lambda: oracle_of(q, k, v, options, alignment), tensors, grad_out)
    what = f"{backend} {variant} L={seq_q} S={seq_kv} {alignment} mask={mask_kind}"
    assert rel_err(out, ref_out) <= bar, f"{what}: out {rel_err(out, ref_out):.3g}"
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), f"{what}: rows with no visible key differ"
    finite = torch.isfinite(ref_lse)
    assert rel_err(lse[finite], ref_lse[finite]) <= bar, f"{what}: lse"
    for name, grad in grads.items():
        assert rel_err(grad, ref_grads[name]) <= bar, f"{what}: d{name} {rel_err(grad, ref_grads[name]):.3g}"


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 4 queries x 3 keys: the tiny problems here span many blocks, partly visible and skipped."""
    monkeypatch.setattr(tiled, "BLOCK_M", 4)
    monkeypatch.setattr(tiled, "BLOCK_N", 3)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
@pytest.mark.parametrize("alignment", ALIGNMENTS)
@pytest.mark.parametrize("seq_q,seq_kv", SHAPES)
@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("backend", ["reference", "tiled"])
def test_matches_formula_float64(backend, name, seq_q, seq_kv, alignment, mask_kind, small_tiles):
    check_against_oracle(backend, VARIANTS[name], seq_q, seq_kv, alignment, mask_kind, seed=len(name) + seq_q)


@pytest.mark.parametrize("name", ["window", "causal_window", "softcap", "alibi_batch", "sinks", "all"])
@pytest.mark.parametrize("backend", ["reference", "tiled"])
def test_gradcheck(backend, name, small_tiles):
    """float64 gradcheck (the full Jacobian) of q, k, v, the sinks and a float mask, with GQA."""
    gen = generator(3)
    # 1 x 2 query heads on 1 key/value head, E=4, Ev=3: the full Jacobian stays small (~160 columns)
    q, k, v, options = problem(VARIANTS[name], 5, 7, torch.float64, gen, "float", dims=(1, 2, 1, 4, 3))
    tensors = leaves(q, k, v, options)

    def fn(*args):
        given = dict(zip(tensors, args))
        extra = {n: given.get(n, options.get(n)) for n in ("sinks", "attn_mask") if n in options}
        rest = {n: o for n, o in options.items() if n not in extra}
        return flashsdpa.attention(
            given["q"], given["k"], given["v"], causal_alignment="bottom_right", backend=backend, **rest, **extra
        )

    assert torch.autograd.gradcheck(fn, tuple(tensors.values()))


@pytest.mark.parametrize("backend", ["reference", "tiled"])
def test_sink_with_rows_that_see_nothing(backend):
    """A row with no visible key: zeros, lse = the sink; the sink gets no gradient from it."""
    gen = generator(4)
    q, k, v = qkv((1, 2), (1, 2), 3, 6, 8, gen, torch.float64, "cpu")
    sinks = torch.tensor([0.5, -1.0], dtype=torch.float64, requires_grad=True)
    hidden = torch.zeros(1, 1, 3, 6, dtype=torch.bool)
    out, lse = flashsdpa.attention(q, k, v, attn_mask=hidden, sinks=sinks, backend=backend, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(lse, sinks.detach().view(1, 2, 1).expand(1, 2, 3))
    out.sum().backward()
    assert torch.equal(sinks.grad, torch.zeros_like(sinks))


@pytest.mark.parametrize("backend", ["reference", "tiled"])
def test_sink_gradient_in_inputs_dtype_and_without_other_grads(backend):
    """Sinks given in the inputs' dtype get their gradient in that dtype, also when q, k, v need none."""
    gen = generator(5)
    q, k, v = qkv((1, 2), (1, 2), 5, 5, 8, gen, torch.float32, "cpu")
    sinks = torch.randn(2, generator=gen).requires_grad_()
    out = flashsdpa.attention(q, k, v, sinks=sinks, backend=backend)
    out.square().sum().backward()
    s64 = sinks.detach().double().requires_grad_()
    ref, _ = variants_oracle(q, k, v, sinks=s64)
    ref.square().sum().backward()
    assert sinks.grad.dtype == torch.float32
    assert rel_err(sinks.grad, s64.grad) < 1e-5


@pytest.mark.parametrize("backend", ["reference", "tiled"])
def test_empty_keys_with_sinks(backend):
    gen = generator(6)
    q, k, v = qkv((2, 3), (2, 3), 4, 0, 8, gen, torch.float32, "cpu")
    sinks = torch.randn(3, generator=gen).requires_grad_()
    out, lse = flashsdpa.attention(q, k, v, sinks=sinks, backend=backend, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(lse, sinks.detach().view(1, 3, 1).expand(2, 3, 4))
    out.sum().backward()
    assert torch.equal(sinks.grad, torch.zeros(3))


def test_alignment_is_canonical():
    """bottom-right and top-left are one problem where the alignment cannot change the result."""
    gen = generator(7)
    q, k, v = qkv((1, 2), (1, 2), 5, 9, 8, gen, torch.float32, "cpu")
    args = (None, None, 0.0, False, None, "ieee")

    def describe(q, k, v, **kw):
        return api.prepare(q, k, v, kw.pop("causal", False), *args, **kw).desc

    assert describe(q, k, v, causal_alignment="bottom_right").alignment is Alignment.TOP_LEFT
    assert describe(q, q, q, causal=True, causal_alignment="bottom_right").alignment is Alignment.TOP_LEFT
    desc = describe(q, k, v, causal=True, causal_alignment="bottom_right")
    assert desc.alignment is Alignment.BOTTOM_RIGHT and desc.key_offset == 4
    assert describe(q, k, v, causal=True, window=(2, 3)).window_right == -1  # causal bounds it at 0 already
    assert describe(q, k, v, softcap=3).softcap == 3.0


def _q(shape=(2, 3, 5, 8), dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


BAD_VARIANTS = [
    (dict(window=3), ValueError, ["window", "pair"]),
    (dict(window=(1, 2, 3)), ValueError, ["window"]),
    (dict(window=(-2, 0)), ValueError, ["left", "-1"]),
    (dict(window=(0, 1.5)), ValueError, ["right"]),
    (dict(window=(True, 0)), ValueError, ["left"]),
    (dict(causal_alignment="bottom-right"), ValueError, ["causal_alignment", "bottom_right"]),
    (dict(softcap=0.0), ValueError, ["softcap", "> 0"]),
    (dict(softcap=-1.0), ValueError, ["softcap"]),
    (dict(softcap=float("inf")), ValueError, ["softcap", "finite"]),
    (dict(softcap="2"), ValueError, ["softcap"]),
    (dict(alibi_slopes=[0.5] * 3), TypeError, ["alibi_slopes", "Tensor"]),
    (dict(alibi_slopes=torch.ones(3, dtype=torch.float16)), TypeError, ["alibi_slopes", "float32"]),
    (dict(alibi_slopes=torch.ones(4)), ValueError, ["alibi_slopes", "(3,)", "(2, 3)", "(4,)"]),
    (dict(alibi_slopes=torch.ones(3, 3)), ValueError, ["alibi_slopes", "(3, 3)"]),
    (dict(alibi_slopes=torch.ones(3, requires_grad=True)), ValueError, ["alibi_slopes", "gradient"]),
    (dict(alibi_slopes=torch.ones(3, device="meta")), ValueError, ["alibi_slopes", "meta"]),
    (dict(sinks=torch.ones(2)), ValueError, ["sinks", "(3,)", "(2,)"]),
    (dict(sinks=torch.ones(1, 3)), ValueError, ["sinks", "(1, 3)"]),
    (dict(sinks=torch.ones(3, dtype=torch.float64)), TypeError, ["sinks", "float32", "float64"]),
    (dict(sinks=torch.ones(3, dtype=torch.int64)), TypeError, ["sinks"]),
]


@pytest.mark.parametrize("kwargs,error,fragments", BAD_VARIANTS, ids=[str(i) for i in range(len(BAD_VARIANTS))])
def test_bad_variant_arguments_raise_clearly(kwargs, error, fragments, monkeypatch):
    monkeypatch.setattr(flashsdpa.ops, "forward_impl", lambda *a: pytest.fail("a backend ran"))
    with pytest.raises(error) as raised:
        flashsdpa.attention(_q(), _q(), _q(), **kwargs)
    for fragment in fragments:
        assert fragment in str(raised.value), (fragment, str(raised.value))


def test_sinks_in_the_inputs_dtype_and_float64_slopes_for_float64_inputs():
    q = _q(dtype=torch.bfloat16)
    out = flashsdpa.attention(q, q, q, sinks=torch.ones(3, dtype=torch.bfloat16), backend="reference")
    assert out.dtype == torch.bfloat16
    q = _q(dtype=torch.float64)
    flashsdpa.attention(q, q, q, alibi_slopes=torch.ones(3, dtype=torch.float64), backend="reference")


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(window=(2, 2)),
        dict(causal=True, causal_alignment="bottom_right"),
        dict(softcap=3.0),
        dict(alibi_slopes=torch.ones(3)),
        dict(sinks=torch.ones(3)),
    ],
)
def test_triton_takes_each_variant(kwargs):
    """The triton kernels compute every variant (tests/test_triton_variants.py): no reason beyond the plain
    problem's."""
    q, k = _q((2, 3, 5, 16)), _q((2, 3, 9, 16))
    causal = kwargs.pop("causal", False)
    desc = api.prepare(q, k, k, causal, None, None, 0.0, False, None, "ieee", **kwargs).desc
    plain = api.prepare(q, k, k, causal, None, None, 0.0, False, None, "ieee").desc
    device = torch.device("cuda", 0) if torch.cuda.is_available() else q.device
    assert TritonBackend()._reasons(desc, device) == TritonBackend()._reasons(plain, device)


@pytest.mark.parametrize("backend", ["reference", "tiled"])
def test_compiled_fullgraph_matches_eager(backend):
    gen = generator(8)
    q, k, v, options = problem(VARIANTS["all"], 6, 9, torch.float32, gen, "float")
    tensors = leaves(q, k, v, options)

    def fn(q, k, v, sinks, mask):
        rest = {n: o for n, o in options.items() if n not in ("sinks", "attn_mask")}
        return flashsdpa.attention(
            q, k, v, sinks=sinks, attn_mask=mask, causal_alignment="bottom_right", backend=backend,
            return_lse=True, **rest,
        )

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    grad_out = randn((B, HQ, 6, EV), gen, torch.float32)
    results = []
    for f in (fn, compiled):
        out, lse = f(*tensors.values())
        results.append((out, lse, torch.autograd.grad(out, list(tensors.values()), grad_out)))
    (out_e, lse_e, grads_e), (out_c, lse_c, grads_c) = results
    assert torch.equal(out_e, out_c) and torch.equal(lse_e, lse_c)
    for name, ge, gc in zip(tensors, grads_e, grads_c):
        assert torch.equal(ge, gc), name


def test_oracle_matches_torch_where_torch_has_the_variant():
    """The oracle's causal/window/alignment/ALiBi, as a float mask given to torch's float64 SDPA."""
    gen = generator(9)
    for seq_q, seq_kv in SHAPES:
        q, k, v = qkv((B, HQ), (B, HQ), seq_q, seq_kv, E, gen, torch.float64, "cpu")
        slopes = torch.rand(HQ, generator=gen, dtype=torch.float64)
        for alignment, (left, right) in itertools.product(ALIGNMENTS, [(2, 1), (None, 0), (0, None)]):
            offset = seq_kv - seq_q if alignment == "bottom_right" else 0
            i = torch.arange(seq_q).view(-1, 1) + offset
            j = torch.arange(seq_kv).view(1, -1)
            visible = torch.ones(seq_q, seq_kv, dtype=torch.bool)
            if left is not None:
                visible &= j >= i - left
            if right is not None:
                visible &= j <= i + right
            bias = (-slopes.view(-1, 1, 1) * (i - j).abs()).masked_fill(~visible, float("-inf"))
            ours, _ = variants_oracle(q, k, v, window=(left, right), alignment=alignment, alibi_slopes=slopes)
            theirs = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            empty = ~visible.any(-1)  # torch gives NaN for rows with nothing visible; flashsdpa gives zeros
            assert torch.equal(ours[..., empty, :], torch.zeros_like(ours[..., empty, :]))
            assert rel_err(ours[..., ~empty, :], theirs[..., ~empty, :]) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", ["window", "softcap", "alibi_heads", "sinks", "all"])
def test_tiled_within_torchs_own_error(name, dtype, small_tiles):
    """In 16 and 32 bits, against float64, within 1.5x the error of the same formula computed in the inputs'
    dtype (torch has none of these variants itself: the formula, as torch's math backend would compute it)."""
    gen = generator(10 + len(name))
    q, k, v, options = problem(VARIANTS[name], 13, 21, dtype, gen, "float", scale=None)
    tensors = leaves(q, k, v, options)
    grad_out = randn((B, HQ, 13, EV), gen, dtype)
    results = {}
    for label, fn in (
        ("tiled", lambda: flashsdpa.attention(q, k, v, causal_alignment="bottom_right", backend="tiled",
                                              return_lse=True, **options)),
        ("truth", lambda: oracle_of(q, k, v, options, "bottom_right")),
        ("torch", lambda: oracle_of(q, k, v, options, "bottom_right", dtype=dtype)),
    ):  # fmt: skip
        results[label] = run_and_grads(fn, tensors, grad_out)
    (out, _, grads), (ref, _, ref_grads), (theirs, _, their_grads) = (results[n] for n in ("tiled", "truth", "torch"))
    assert_forward_close(f"{name} out", out, ref, theirs, dtype)
    for leaf in grads:
        assert_grad_close(f"{name} d{leaf}", grads[leaf], ref_grads[leaf], their_grads[leaf], dtype)


@pytest.mark.parametrize("backend", ["reference", "tiled"])
def test_dropout_with_variants(backend, small_tiles):
    """Dropout drops the keys' probabilities only, never the sink's share: out and every gradient as the
    formula with flashsdpa's own keep-mask."""
    gen = generator(11)
    p = 0.3
    q, k, v, options = problem(VARIANTS["all"], 9, 14, torch.float64, gen, "float")
    tensors = leaves(q, k, v, options)
    grad_out = randn((B, HQ, 9, EV), gen, torch.float64)
    keep = keep_mask_for(predict_seed(1234), p, (B, HQ), 9, 14, "cpu")
    torch.manual_seed(1234)
    out, _, grads = run_and_grads(
        lambda: flashsdpa.attention(q, k, v, dropout_p=p, causal_alignment="bottom_right", backend=backend,
                                    return_lse=True, **options),
        tensors, grad_out,
    )  # fmt: skip
    names = ("causal", "window", "softcap", "alibi_slopes", "sinks", "attn_mask")
    ref, _, ref_grads = run_and_grads(
        lambda: variants_oracle(q, k, v, alignment="bottom_right", keep=keep, dropout_p=p,
                                **{n: options[n] for n in names if n in options}),
        tensors, grad_out,
    )  # fmt: skip
    assert rel_err(out, ref) < 1e-10
    for leaf in grads:
        assert rel_err(grads[leaf], ref_grads[leaf]) < 1e-10, leaf


@pytest.mark.parametrize("backend", ["reference", "tiled"])
def test_strided_inputs_with_variants(backend, small_tiles):
    """q, k, v as (B, L, H, E) projections viewed as (B, H, L, E); sinks and slopes as strided views."""
    gen = generator(12)
    seq_q, seq_kv = 10, 15
    q = randn((B, seq_q, HQ, E + 3), gen, torch.float64)[..., :E].transpose(1, 2).requires_grad_()
    kv = randn((B, seq_kv, 2, HKV, E), gen, torch.float64)
    k, v = (t.transpose(1, 2).detach().requires_grad_() for t in kv.unbind(2))
    sinks = randn((2 * HQ,), gen, torch.float64)[::2].detach().requires_grad_()
    slopes = torch.rand(HQ, B, generator=gen).t()
    options = dict(causal=True, window=(4, None), softcap=2.0, alibi_slopes=slopes, sinks=sinks)
    out = flashsdpa.attention(q, k, v, enable_gqa=True, causal_alignment="bottom_right", backend=backend, **options)
    ref, _ = variants_oracle(q, k, v, alignment="bottom_right", **options)
    assert rel_err(out, ref) < 1e-10
    grads = torch.autograd.grad(out.square().sum(), (q, k, v, sinks))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v, sinks))
    for name, got, want in zip("qkvs", grads, ref_grads):
        assert rel_err(got, want) < 1e-10, name


def _counted_tiles(monkeypatch) -> list:
    """The (query block, key block) tiles the tiled backend computes scores for."""
    seen = []
    original = tiled._Tiles.scores

    def counting(self, m0, m1, block, q_tile, k_tile):
        seen.append((m0, block.start))
        return original(self, m0, m1, block, q_tile, k_tile)

    monkeypatch.setattr(tiled._Tiles, "scores", counting)
    return seen


@pytest.mark.parametrize("alignment", ALIGNMENTS)
def test_tiled_window_visits_key_blocks_in_proportion_to_the_window(alignment, monkeypatch):
    """A window of w keys visits about L/BM * (w + BM + BN)/BN tiles in the forward, not L*S/(BM*BN):
    counted, for two lengths (the count doubles with L at a fixed window) and against the plain problem."""
    monkeypatch.setattr(tiled, "BLOCK_M", 16)
    monkeypatch.setattr(tiled, "BLOCK_N", 16)
    seen = _counted_tiles(monkeypatch)
    counts = {}
    gen = generator(13)
    for seq in (256, 512):
        q, k, v = qkv((1, 1), (1, 1), seq, seq + 7, 8, gen, torch.float32, "cpu")
        for window in ((24, 0), None):
            seen.clear()
            flashsdpa.attention(q, k, v, window=window, causal_alignment=alignment, backend="tiled")
            counts[seq, window] = len(seen)
    blocks_m = lambda seq: seq // 16  # noqa: E731
    for seq in (256, 512):
        # each query block sees at most 24 + 16 keys: 3 or 4 key blocks of 16
        assert counts[seq, (24, 0)] <= 4 * blocks_m(seq), counts
        assert counts[seq, None] == blocks_m(seq) * -(-(seq + 7) // 16), counts
    assert counts[512, (24, 0)] <= 2 * counts[256, (24, 0)] + 4, counts


def test_tiled_backward_skips_blocks_too(monkeypatch):
    monkeypatch.setattr(tiled, "BLOCK_M", 16)
    monkeypatch.setattr(tiled, "BLOCK_N", 16)
    seen = _counted_tiles(monkeypatch)
    gen = generator(14)
    q, k, v = qkv((1, 1), (1, 1), 256, 256, 8, gen, torch.float32, "cpu")
    q.requires_grad_()
    out = flashsdpa.attention(q, k, v, window=(20, 10), backend="tiled")
    seen.clear()
    out.sum().backward()
    # two passes (delta, then dK/dV/dQ), each over <= 4 key blocks per query block of 16 rows
    assert len(seen) <= 2 * 4 * 16, len(seen)


SINGLE_VARIANTS = {
    "window": dict(window=(2, 1)),
    "bottom_right": dict(causal=True, causal_alignment="bottom_right"),
    "softcap": dict(softcap=1.5),
    "alibi": dict(alibi_slopes=torch.tensor([0.3, 0.7])),
    "sinks": dict(sinks=torch.tensor([0.5, -1.0])),
}


@pytest.mark.parametrize("variant", SINGLE_VARIANTS)
@pytest.mark.parametrize("backend", [*flashsdpa.dispatch.backend_names(), None])
def test_every_backend_computes_or_declines_each_variant(backend, variant):
    """No backend may ignore a variant it does not compute (a silent wrong answer): pinned, it computes the
    formula or raises UnsupportedError; the automatic choice (None) always computes it."""
    gen = generator(15)
    q, k, v = qkv((1, 2), (1, 2), 6, 9, 16, gen, torch.float32, "cpu")
    options = dict(SINGLE_VARIANTS[variant])
    alignment = options.pop("causal_alignment", "top_left")
    try:
        out = flashsdpa.attention(q, k, v, causal_alignment=alignment, backend=backend, **options)
    except flashsdpa.UnsupportedError:
        assert backend is not None, "the automatic choice found no backend"
        return
    ref, _ = variants_oracle(q, k, v, alignment=alignment, **options)
    assert rel_err(out, ref) < 1e-5, (backend, variant)


def test_a_backend_that_does_not_check_variants_is_never_given_one(monkeypatch):
    """Capabilities as data: a backend without `checks_variants` is declined for every variant by dispatch."""
    from flashsdpa import dispatch
    from flashsdpa.backends.base import Backend

    class Plain(Backend):  # computes torch's SDPA problems only, and says nothing about variants
        name = "plain"

        def unsupported_reasons(self, desc, device):
            return []

        def forward(self, desc, inputs):
            return tiled.TiledBackend().forward(dataclasses.replace(desc, softcap=0.0), inputs)

        def backward(self, *args):
            raise NotImplementedError

    monkeypatch.setitem(dispatch.BACKENDS, "plain", Plain())
    monkeypatch.setitem(dispatch.AUTOMATIC_ORDER, "cpu", ("plain", "tiled"))
    gen = generator(16)
    q, k, v = qkv((1, 2), (1, 2), 6, 9, 16, gen, torch.float32, "cpu")
    with pytest.raises(flashsdpa.UnsupportedError, match="the plain backend does not compute softcap"):
        flashsdpa.attention(q, k, v, softcap=1.5, backend="plain")
    flashsdpa.reset_stats()
    out = flashsdpa.attention(q, k, v, softcap=1.5)
    assert rel_err(out, variants_oracle(q, k, v, softcap=1.5)[0]) < 1e-5
    assert flashsdpa.stats() == {"calls": {"tiled": 1},
                                 "fallbacks": {"plain: the plain backend does not compute softcap": 1}}
    flashsdpa.attention(q, k, v)  # no variant: the plain backend takes it
    assert flashsdpa.stats()["calls"] == {"tiled": 1, "plain": 1}
