"""Dropout on the attention weights: one counter-based pattern shared by every backend.

The pattern is read back exactly with a probe: q = 0 makes the weights uniform
over the visible keys and v = identity(S) makes out[i, j] = keep[i, j] / (n_i (1 - p)),
so `round(out * n_i * (1 - p))` is the keep-mask the backend applied.
Dropout gradients are in test_backward.py.
"""

from __future__ import annotations

import math

import pytest
import torch

import flashsdpa
from helpers import (
    BACKENDS,
    Case,
    assert_forward_close,
    causal_visible,
    generator,
    keep_mask_for,
    oracle,
    output_lead_shape,
    predict_seed,
    qkv,
    random_bool_mask,
    rel_err,
    run,
    seq,
)


def read_keep_mask(backend, batch, heads_q, heads_kv, seq_q, seq_kv, p, device, causal=False, torch_seed=0):
    """(applied keep-mask (B, Hq, L, S), flashsdpa's predicted one) via the probe."""
    q = torch.zeros(batch, heads_q, seq_q, 8, device=device)
    k = torch.randn(batch, heads_kv, seq_kv, 8, device=device)
    v = torch.eye(seq_kv, device=device).expand(batch, heads_kv, seq_kv, seq_kv)
    seed_pair = predict_seed(torch_seed)
    torch.manual_seed(torch_seed)
    out = run(backend, q, k, v, dropout_p=p, causal=causal, enable_gqa=heads_q != heads_kv)
    assert torch.isfinite(out).all()
    visible = causal_visible(seq_q, seq_kv, device) if causal else torch.ones(seq_q, seq_kv, dtype=torch.bool)
    visible = visible.to(device)
    counts = visible.sum(-1, keepdim=True).to(torch.float64)
    scaled = out.double() * counts * (1.0 - p)
    applied = torch.round(scaled)
    assert torch.allclose(scaled, applied, atol=1e-4), "dropout output is not keep / (n (1 - p))"
    assert bool(((applied == 0) | (applied == 1)).all())
    assert not bool(applied[..., ~visible].any()), "a hidden key got weight"
    expected = keep_mask_for(seed_pair, p, (batch, heads_q), seq_q, seq_kv, device) & visible
    return applied.bool(), expected


@pytest.mark.parametrize("p", [0.2, 0.5])
@pytest.mark.parametrize("backend", BACKENDS + ("reference",))
def test_pattern_is_full_keep_mask(backend, p, device):
    """Every backend drops exactly the weights flashsdpa.dropout.full_keep_mask says (bh = batch * Hq + head)."""
    if backend == "triton":
        shapes = [(1, 2, 2, seq(19), seq(24), False), (1, 4, 2, seq(17), seq(20), True)]
    else:
        shapes = [(2, 3, 3, 270, 520, False), (1, 4, 1, 150, 140, True)]
    for batch, heads_q, heads_kv, seq_q, seq_kv, causal in shapes:
        applied, expected = read_keep_mask(backend, batch, heads_q, heads_kv, seq_q, seq_kv, p, device, causal)
        assert torch.equal(applied, expected), f"{backend}: {(applied != expected).sum()} weights differ"


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("backend", BACKENDS)
def test_kept_fraction(backend, p, device):
    """The fraction of kept weights is 1 - p within 5 standard deviations."""
    size = (1, 2, 2, seq(20), seq(30)) if backend == "triton" else (2, 2, 2, 256, 300)
    applied, _ = read_keep_mask(backend, *size, p, device, torch_seed=int(p * 100))
    n = applied.numel()
    fraction = applied.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(fraction - (1 - p)) <= 5 * sigma, f"kept {fraction:.4f}, expected {1 - p} +- {5 * sigma:.4f}"


def test_hash_kept_fraction_and_independence():
    """The shared hash itself over a million weights: kept fraction, and rows/columns/heads not correlated."""
    for p in (0.1, 0.37, 0.9):
        keep = flashsdpa.dropout.full_keep_mask((12345, 678), p, 16, 256, 256, "cpu").double()
        sigma = math.sqrt(p * (1 - p) / keep.numel())
        assert abs(keep.mean().item() - (1 - p)) <= 5 * sigma
        # per-row and per-column kept fractions spread like independent draws (a stuck row or column would not)
        for dim, n in ((-1, 256), (-2, 256)):
            per_line = keep.mean(dim)
            expected_sd = math.sqrt(p * (1 - p) / n)
            assert 0.8 * expected_sd < per_line.std().item() < 1.2 * expected_sd
        # neighbouring heads and neighbouring seeds give unrelated patterns
        agree = (keep[0] == keep[1]).double().mean().item()
        assert abs(agree - (p * p + (1 - p) ** 2)) < 0.01
        other = flashsdpa.dropout.full_keep_mask((12346, 678), p, 1, 256, 256, "cpu").double()
        agree = (keep[0] == other[0]).double().mean().item()
        assert abs(agree - (p * p + (1 - p) ** 2)) < 0.01


@pytest.mark.parametrize("backend", BACKENDS)
def test_expectation_preserved(backend, device):
    """The mean over many seeds of the dropout output approaches the output without dropout (1/(1-p) rescaling)."""
    gen = generator(41)
    p = 0.3
    if backend == "triton":
        q, k, v = qkv((1, 2), (1, 2), seq(17), seq(16), 8, gen, torch.float32, device)
        draws = 40
    else:
        q, k, v = qkv((1, 2), (1, 2), 32, 48, 16, gen, torch.float32, device)
        draws = 150
    torch.manual_seed(41)
    outs = torch.stack([run(backend, q, k, v, dropout_p=p, causal=True).double() for _ in range(draws)])
    reference, _ = oracle(q, k, v, causal=True)
    mean = outs.mean(0)
    var = outs.var(0)
    stochastic = var > 0  # row 0 of a causal problem sees one key: its weight is 0 or 1/(1-p)
    z2 = (mean - reference)[stochastic] ** 2 / (var[stochastic] / draws)
    assert z2.mean().item() < 2.0, f"mean of {draws} dropout runs is off the no-dropout output (z^2 {z2.mean():.2f})"
    # without the 1/(1-p) rescaling the same mean would be far off
    z2_unscaled = (mean * (1 - p) - reference)[stochastic] ** 2 / (var[stochastic] * (1 - p) ** 2 / draws)
    assert z2_unscaled.mean().item() > 5


@pytest.mark.parametrize("backend", BACKENDS + ("reference",))
def test_reproducible_under_manual_seed(backend, device):
    gen = generator(42)
    q, k, v = qkv((1, 2), (1, 2), seq(18), seq(20), 16, gen, torch.float16, device)
    torch.manual_seed(7)
    first = run(backend, q, k, v, dropout_p=0.25)
    second = run(backend, q, k, v, dropout_p=0.25)  # the generator moved on: a new pattern
    torch.manual_seed(7)
    again = run(backend, q, k, v, dropout_p=0.25)
    torch.manual_seed(8)
    other = run(backend, q, k, v, dropout_p=0.25)
    assert torch.equal(first, again)
    assert not torch.equal(first, second)
    assert not torch.equal(first, other)
    assert rel_err(first, other) > 0.05


def test_no_dropout_draws_no_random_numbers(device):
    """dropout_p = 0 leaves torch's generator untouched (inference code stays reproducible)."""
    gen = generator(43)
    q, k, v = qkv((1, 2), (1, 2), 9, 12, 16, gen, torch.float32, device)
    torch.manual_seed(3)
    flashsdpa.attention(q, k, v, backend="tiled")
    after = torch.rand(4)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(4))


def dropout_case(backend, gen, dtype, device, feature):
    if backend == "triton":
        shape_q, shape_kv, seq_q, seq_kv = (1, 4), (1, 4), seq(18), seq(21)
    else:
        shape_q, shape_kv, seq_q, seq_kv = (2, 4), (2, 4), 130, 270
    mask, causal, gqa = None, False, False
    if feature == "gqa":
        shape_kv, gqa = (shape_kv[0], 2), True
    if feature == "5d":
        shape_q = shape_kv = (2, 1, 2)
    q, k, v = qkv(shape_q, shape_kv, seq_q, seq_kv, 16, gen, dtype, device)
    if feature == "causal_mask":
        causal = True
        mask = random_bool_mask((seq_q, seq_kv), gen, device)
    if feature == "float_mask":
        mask = torch.randn(shape_q[0], 1, seq_q, seq_kv, generator=gen).to(device)
    return Case(q, k, v, attn_mask=mask, causal=causal, enable_gqa=gqa)


@pytest.mark.parametrize("feature", ["plain", "causal_mask", "float_mask", "gqa", "5d"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_matches_oracle(backend, feature, device):
    """Random data with dropout: float64 math applying full_keep_mask, to the dtype's bar and 1.5x torch's formula."""
    gen = generator(44)
    p = 0.3
    for dtype in (torch.float32, torch.float16):
        case = dropout_case(backend, gen, dtype, device, feature)
        lead = output_lead_shape(case.q, case.k, case.v, case.enable_gqa)
        keep = keep_mask_for(predict_seed(5), p, lead, case.q.shape[-2], case.k.shape[-2], device)
        torch.manual_seed(5)
        out = run(backend, case.q, case.k, case.v, dropout_p=p, **case.options())
        reference, _ = case.oracle(dropout_p=p, keep=keep)
        assert_forward_close(f"{backend} dropout {feature} {dtype}", out, reference, case.torch(keep=keep, dropout_p=p), dtype)
        # the same data under another seed is clearly different from this reference
        other = run(backend, case.q, case.k, case.v, dropout_p=p, **case.options())
        assert rel_err(other, reference) > 0.05


@pytest.mark.parametrize("backend", ["tiled", "reference"])
def test_dropout_float64_equals_oracle(backend, device):
    """In float64 the dropout result is the oracle's to rounding: the very same pattern and rescaling."""
    gen = generator(45)
    q, k, v = qkv((2, 3), (2, 3), 70, 90, 16, gen, torch.float64, device)
    keep = keep_mask_for(predict_seed(6), 0.4, (2, 3), 70, 90, device)
    torch.manual_seed(6)
    out = run(backend, q, k, v, dropout_p=0.4, causal=True)
    reference, _ = oracle(q, k, v, causal=True, dropout_p=0.4, keep=keep)
    assert rel_err(out, reference) < 1e-13


def test_backends_agree_on_dropout(device):
    """triton, tiled and reference give one result for one seed (float32, to float32 rounding)."""
    gen = generator(46)
    q, k, v = qkv((1, 2), (1, 2), seq(18), seq(19), 16, gen, torch.float32, device)
    results = {}
    for backend in BACKENDS + ("reference",):
        torch.manual_seed(9)
        results[backend] = run(backend, q, k, v, dropout_p=0.5, causal=True)
    for backend in BACKENDS:
        assert rel_err(results[backend], results["reference"]) < 2e-6, backend


def test_dropout_lse_is_before_dropout(device):
    """lse describes the softmax denominator, untouched by dropout."""
    gen = generator(47)
    q, k, v = qkv((1, 2), (1, 2), seq(18), seq(19), 16, gen, torch.float32, device)
    for backend in BACKENDS:
        _, lse_dropped = run(backend, q, k, v, dropout_p=0.5, return_lse=True)
        _, lse_plain = run(backend, q, k, v, return_lse=True)
        assert torch.allclose(lse_dropped, lse_plain, rtol=1e-6, atol=1e-6), backend
