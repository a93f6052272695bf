"""The per-call caches (descriptors, launch plans) never serve one call's result to another.

flashsdpa memoises per-call work on cheap facts of a call (shapes, strides,
dtypes, options). A key that forgot an argument would hand the second of two
calls differing only in that argument the first one's setup: here calls that
differ in exactly one argument run back to back on one set of tensors, and
each must match its own float64 reference (outputs and, for the scale, the
gradients: the backward reads the cached descriptor too).
"""

from __future__ import annotations

import pytest
import torch

import flashsdpa
from flashsdpa import gradient_precision
from flashsdpa.descriptor import GradientPrecision
from helpers import BACKENDS, generator, keep_mask_for, oracle, predict_seed, randn, record_backward_precisions, rel_err

BAR = 1e-5  # float32 inputs; the variants differ from one another by O(1)


def _tensors(device, heads_kv=4):
    gen = generator(11)
    q = randn((2, 4, 13, 16), gen, torch.float32, device)
    k, v = (randn((2, heads_kv, 11, 16), gen, torch.float32, device) for _ in range(2))
    return q, k, v


VARIANTS = {
    "defaults": {},
    "scale 0.3": {"scale": 0.3},
    "scale -0.3": {"scale": -0.3},
    "scale 0": {"scale": 0.0},
    "scale -0": {"scale": -0.0},
    "causal": {"causal": True},
    "bool mask": {"attn_mask": "bool"},
    "key padding mask": {"attn_mask": "pad"},
    "float mask": {"attn_mask": "float"},
    "float mask, causal": {"attn_mask": "float", "causal": True},
}


def _mask(kind, device):
    gen = generator(12)
    if kind == "bool":
        return randn((2, 4, 13, 11), gen, torch.float32, device) > -0.5
    if kind == "pad":
        return randn((2, 1, 1, 11), gen, torch.float32, device) > -0.5
    return randn((2, 4, 13, 11), gen, torch.float32, device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_calls_differing_in_one_argument(backend, device):
    q, k, v = _tensors(device)
    results = {}
    for _ in range(2):  # the second round runs every variant from warm caches
        for name, options in VARIANTS.items():
            options = dict(options)
            if isinstance(options.get("attn_mask"), str):
                options["attn_mask"] = _mask(options["attn_mask"], device)
            out = flashsdpa.attention(q, k, v, backend=backend, **options)
            ref, _ = oracle(q, k, v, options.get("attn_mask"), options.get("causal", False), options.get("scale"))
            assert rel_err(out, ref) <= BAR, name
            results.setdefault(name, out)
            assert torch.equal(out, results[name]), f"{name}: the warm call differs from the cold one"


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_follow_the_scale(backend, device):
    q, k, v = (t.requires_grad_() for t in _tensors(device))
    for scale in (0.3, 0.7, -0.3, 0.3):
        out = flashsdpa.attention(q, k, v, scale=scale, backend=backend)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        ref = oracle(q, k, v, scale=scale)[0]
        ref_grads = torch.autograd.grad(ref, (q, k, v), torch.ones_like(ref))
        for name, got, want in zip("qkv", grads, ref_grads):
            assert rel_err(got, want) <= 10 * BAR, f"d{name} at scale {scale}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_gqa_and_precision_are_in_the_key(backend, device):
    q, k, v = _tensors(device)
    plain = flashsdpa.attention(q, k, v, backend=backend)
    assert rel_err(plain, oracle(q, k, v)[0]) <= BAR
    seed_pair = predict_seed(5)
    torch.manual_seed(5)
    dropped = flashsdpa.attention(q, k, v, dropout_p=0.3, backend=backend)
    keep = keep_mask_for(seed_pair, 0.3, (2, 4), 13, 11, device)
    assert rel_err(dropped, oracle(q, k, v, dropout_p=0.3, keep=keep)[0]) <= BAR
    # float32 at tf32 precision: a different kernel variant, ~1e-3 off (triton; tiled computes in float32 anyway)
    tf32 = flashsdpa.attention(q, k, v, backend=backend, fp32_precision="tf32")
    assert rel_err(tf32, oracle(q, k, v)[0]) <= 1e-2
    assert rel_err(flashsdpa.attention(q, k, v, backend=backend), oracle(q, k, v)[0]) <= BAR
    # grouped-query heads: same query, keys with fewer heads
    qg, kg, vg = _tensors(device, heads_kv=2)
    gqa = flashsdpa.attention(qg, kg, vg, enable_gqa=True, backend=backend)
    assert rel_err(gqa, oracle(qg, kg, vg, enable_gqa=True)[0]) <= BAR


def test_calls_differing_in_gradient_precision(device, monkeypatch):
    """Same tensors, other backward precisions (chosen at the forward, cached with the descriptor and the
    call plan): each backward gets its own call's. torch's answer is stood in for ("fused": ROUNDED), read
    as torch's is from the flags `sdpa_kernel` sets."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    monkeypatch.setattr(gradient_precision, "torch_runs_fused_kernel",
                        lambda *arguments: torch.backends.cuda.flash_sdp_enabled())  # fmt: skip
    precisions = record_backward_precisions(monkeypatch)
    q, k, v = (t.to(torch.bfloat16) for t in _tensors(device))
    expected = []
    for requires_grad, answer in ((False, True), (True, True), (True, False), (True, True)):
        leaves = [t.detach().requires_grad_(requires_grad) for t in (q, k, v)]
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH] if answer else [SDPBackend.MATH]):
            out = flashsdpa.attention(*leaves, backend="triton")  # no grad: EXACT, and no backward
        if requires_grad:
            out.backward(torch.ones_like(out))
            expected.append(GradientPrecision.ROUNDED if answer else GradientPrecision.EXACT)
    assert precisions == expected


def test_strided_inputs_after_contiguous_ones(device):
    """Same shapes, other strides (the triton launch plan is keyed on them): each matches its reference."""
    q, k, v = _tensors(device)
    for layout in ("contiguous", "transposed", "contiguous"):
        if layout == "transposed":
            q2, k2, v2 = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
        else:
            q2, k2, v2 = q, k, v
        out = flashsdpa.attention(q2, k2, v2, backend="triton")
        assert rel_err(out, oracle(q, k, v)[0]) <= BAR, layout


def _shape_variants(device):
    """(name, q, k, v): one shape fact changed at a time from the first, then the first again.

    40 queries: over the decode kernel's limit, so the main kernel and its launch plan run.
    """
    gen = generator(13)
    new = lambda *shape: randn(shape, gen, torch.float32, device)  # noqa: E731
    base = (new(2, 4, 40, 16), new(2, 4, 11, 16), new(2, 4, 11, 16))
    wide = new(2, 4, 11, 24)
    return [
        ("base", *base),
        # the batch and head count are in no stride of a contiguous tensor's last dims
        ("batch 3", new(3, 4, 40, 16), new(3, 4, 11, 16), new(3, 4, 11, 16)),
        ("heads 2", new(2, 2, 40, 16), new(2, 2, 11, 16), new(2, 2, 11, 16)),
        ("queries 35", new(2, 4, 35, 16), base[1], base[2]),
        ("queries 9 (the decode kernel)", new(2, 4, 9, 16), base[1], base[2]),
        ("keys 7", base[0], new(2, 4, 7, 16), new(2, 4, 7, 16)),
        ("value head dim 8", *base[:2], new(2, 4, 11, 8)),
        ("value one element into its storage", *base[:2], wide[..., 1:17]),
        ("base again", *base),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_calls_differing_in_one_shape(backend, device):
    """Calls that differ in one shape fact (or a view's offset) back to back: each matches its reference.

    A cache keyed on a kernel key, or on strides alone, would reuse the first call's grid or sizes.
    """
    from flashsdpa.backends.base import poisoned_outputs

    for _ in range(2):
        for name, q, k, v in _shape_variants(device):
            with poisoned_outputs():
                out = flashsdpa.attention(q, k, v, backend=backend)
            assert rel_err(out, oracle(q, k, v)[0]) <= BAR, name


def test_backward_tile_loads_follow_alignment(device, monkeypatch):
    """The dK/dV kernel reads q and dO through TMA descriptors whose fields are kept per shape, strides
    and 16-byte alignment: a query one element into its storage, after an aligned one of the same shape
    and strides, gets pointer loads again (TMA needs aligned bases), and both match the reference.
    (Head dim 128, ROUNDED: the GPU configs take TMA there; the interpreter's for every 16-bit problem.)"""
    from flashsdpa import gradient_precision
    from flashsdpa.backends.triton import launch_backward
    from flashsdpa.descriptor import GradientPrecision

    monkeypatch.setattr(gradient_precision, "pinned", GradientPrecision.ROUNDED)

    chosen = []
    streamed = launch_backward._streamed_tiles

    def spy(*args):
        chosen.append(streamed(*args)[2])
        return streamed(*args)

    monkeypatch.setattr(launch_backward, "_streamed_tiles", spy)
    gen = generator(17)
    size = 2 * 4 * 40 * 128
    storage = randn((size + 8,), gen, torch.float16, device)
    k, v = (randn((2, 4, 11, 128), gen, torch.float16, device).requires_grad_() for _ in range(2))
    for offset in (0, 1, 0):
        q = storage[offset:offset + size].view(2, 4, 40, 128)
        k.grad = v.grad = None
        out = flashsdpa.attention(q, k, v, backend="triton")
        out.backward(torch.ones_like(out))
        ref_k = k.detach().double().requires_grad_()
        ref, _ = oracle(q.detach().double(), ref_k, v.detach().double())
        ref.backward(torch.ones_like(ref))
        assert rel_err(k.grad, ref_k.grad) <= 5e-3, offset
    pointers, tma = int(launch_backward.LOAD_POINTERS), int(launch_backward.LOAD_HOST_DESCRIPTORS)
    assert chosen == [tma, pointers, tma], chosen
