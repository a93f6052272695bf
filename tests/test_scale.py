"""The softmax scale: the classic regression where a layer (API, descriptor, cache key, kernel) ignores it.

* every scale on small and larger sizes matches float64 math;
* scale=0.5 and the default give different results, each right (fails if any layer drops `scale`);
* switching scales between calls of one shape is right each time and compiles nothing new;
* scale=None is 1/sqrt(E) of the caller's head dim, not the kernel's padded one;
* a zero or negative scale (which the triton launcher serves with q * 0 or -q)
  matches float64 math, forward and backward, with masks, empty rows and decode sizes.
"""

from __future__ import annotations

import math

import pytest
import torch

import flashsdpa
from flashsdpa.backends.base import poisoned_outputs
from helpers import (
    BACKENDS,
    Case,
    check_backward,
    check_forward,
    generator,
    qkv,
    random_bool_mask,
    rel_err,
    run,
    seq,
)

SCALES = [0.1, 0.25, 1 / math.sqrt(8), 0.5, 1.0, 1e-3, 10.0]
TRITON_SIZES = [(4, 4), (8, 8), (16, 16), (32, 32)]
TILED_SIZES = [(4, 4), (32, 32), (130, 300), (600, 700)]


@pytest.mark.parametrize("scale", SCALES, ids=lambda s: f"{s:g}")
@pytest.mark.parametrize("backend", BACKENDS)
def test_scales_forward(backend, scale, device):
    gen = generator(int(scale * 1000) + 1)
    sizes = TRITON_SIZES if backend == "triton" else TILED_SIZES
    # float32 shows a dropped or mangled scale most plainly; float16 exercises the 16-bit kernels.
    dtype = torch.float32 if SCALES.index(scale) % 2 == 0 else torch.float16
    for seq_q, seq_kv in sizes:
        if backend == "triton":
            seq_q, seq_kv = seq(seq_q), seq(seq_kv)
        q, k, v = qkv((1, 2), (1, 2), seq_q, seq_kv, 8, gen, dtype, device)
        # non-causal small problems take triton's decode kernel; causal ones the main kernel
        for causal in (False, True):
            check_forward(backend, Case(q, k, v, scale=scale, causal=causal), f"scale={scale:g} {seq_q}x{seq_kv}")


@pytest.mark.parametrize("backend", BACKENDS + ("reference",))
def test_scale_is_not_ignored(backend, device):
    """scale=0.5 vs the default 1/sqrt(16)=0.25: the outputs differ clearly, and each matches its own reference."""
    gen = generator(21)
    for seq_q, causal in ((seq(7), False), (seq(20), True)):
        q, k, v = qkv((1, 2), (1, 2), seq_q, seq(20), 16, gen, torch.float32, device)
        out_half, lse_half = check_forward(backend, Case(q, k, v, scale=0.5, causal=causal), "scale=0.5")
        out_default, lse_default = check_forward(backend, Case(q, k, v, causal=causal), "default scale")
        assert rel_err(out_half, out_default) > 0.05, "scale=0.5 gave (nearly) the default-scale result"
        assert not torch.allclose(lse_half, lse_default)
        # the drop-in layer passes the scale through too
        with flashsdpa.use_backend(backend), poisoned_outputs():
            out_sdpa = flashsdpa.scaled_dot_product_attention(q, k, v, scale=0.5, is_causal=causal)
        assert torch.equal(out_sdpa, out_half)


def triton_jit_cache_sizes() -> dict[str, int]:
    """Compiled variants held by each @triton.jit kernel of the triton backend (CUDA only)."""
    from flashsdpa.backends.triton import backward_kernels, decode_kernels, forward_kernels

    sizes = {}
    for module in (forward_kernels, decode_kernels, backward_kernels):
        for name, obj in vars(module).items():
            if hasattr(obj, "device_caches"):
                sizes[f"{module.__name__}.{name}"] = sum(len(entry[0]) for entry in obj.device_caches.values())
            elif isinstance(getattr(obj, "cache", None), dict):
                sizes[f"{module.__name__}.{name}"] = sum(len(c) for c in obj.cache.values())
    return sizes


@pytest.mark.parametrize("backend", BACKENDS)
def test_switching_scales_between_calls(backend, device):
    """Identical shapes, alternating scales: every call right, and (triton) no kernel variant that Triton
    compiles (under the interpreter: would compile) after the first call."""
    from triton_compiles import triton_compiles

    gen = generator(22)
    for seq_q, causal in ((seq(5), False), (seq(19), True)):  # decode and main triton kernels
        q, k, v = qkv((1, 2), (1, 2), seq_q, seq(21), 16, gen, torch.float16, device)
        with triton_compiles() as first:
            check_forward(backend, Case(q, k, v, scale=0.3, causal=causal), "first scale")
        jit = triton_jit_cache_sizes() if device == "cuda" and backend == "triton" else None
        previous = None
        with triton_compiles() as later:
            for scale in (0.7, 0.3, 2.0, 1e-3):
                out, _ = check_forward(backend, Case(q, k, v, scale=scale, causal=causal), f"switched to {scale}")
                if previous is not None:
                    assert not torch.equal(out, previous)
                previous = out
        if backend == "triton" and device == "cpu":
            assert len(first) > 0 and later.keys <= first.keys, "triton compiled a new variant for a new scale"
        if jit is not None:
            assert triton_jit_cache_sizes() == jit, "triton compiled a new variant for a new scale"


@pytest.mark.parametrize("backend", BACKENDS)
def test_switching_scales_in_backward(backend, device):
    """Alternating scales in the backward: every gradient right, and (triton) no kernel variant that Triton
    compiles (under the interpreter: would compile) after the first call."""
    from triton_compiles import triton_compiles

    gen = generator(23)
    q, k, v = qkv((1, 2), (1, 2), seq(18), seq(21), 16, gen, torch.float32, device)
    with triton_compiles() as compiled_first:
        check_backward(backend, Case(q, k, v, scale=0.3, causal=True), "scale=0.3")
    jit = triton_jit_cache_sizes() if device == "cuda" and backend == "triton" else None
    with triton_compiles() as compiled_later:
        first = check_backward(backend, Case(q, k, v, scale=1.7, causal=True), "scale=1.7")
        second = check_backward(backend, Case(q, k, v, scale=0.3, causal=True), "scale=0.3 again")
    assert not torch.equal(first[0], second[0])
    if backend == "triton" and device == "cpu":
        assert len(compiled_first) > 0 and compiled_later.keys <= compiled_first.keys, (
            "triton compiled a new variant for a new scale")
    if jit is not None:
        assert triton_jit_cache_sizes() == jit


@pytest.mark.parametrize("backend", BACKENDS + ("reference",))
def test_default_scale_uses_callers_head_dim(backend, device):
    """E=40 (kernels pad it to 64): scale=None is exactly 1/sqrt(40), not 1/sqrt(64)."""
    gen = generator(24)
    for seq_q, causal in ((seq(6), False), (seq(19), True)):
        q, k, v = qkv((1, 2), (1, 2), seq_q, seq(22), 40, gen, torch.float32, device)
        out_none, lse_none = check_forward(backend, Case(q, k, v, causal=causal), "scale=None")
        out_explicit, lse_explicit = run(backend, q, k, v, scale=1 / math.sqrt(40), causal=causal, return_lse=True)
        assert torch.equal(out_none, out_explicit) and torch.equal(lse_none, lse_explicit)
        out_padded = run(backend, q, k, v, scale=1 / math.sqrt(64), causal=causal)
        assert rel_err(out_none, out_padded) > 1e-2


@pytest.mark.parametrize("scale", [0.0, -0.0, -0.7, -3.0], ids=lambda s: f"{s:g}")
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_positive_scales(backend, scale, device):
    gen = generator(31)
    for dtype in (torch.float32, torch.float16):
        # decode-sized (triton's split-KV kernel) and main-kernel sizes
        for seq_q, seq_kv in ((seq(3), seq(19)), (seq(18), seq(21))):
            q, k, v = qkv((1, 2), (1, 2), seq_q, seq_kv, 16, gen, dtype, device)
            # A few dozen scores per head: the ratio to torch's error is rounding noise (see test_properties).
            versus_torch = True if seq_q * seq_kv >= 128 else "conditioning"
            check_forward(backend, Case(q, k, v, scale=scale), f"scale={scale:g} {dtype}", check_torch=versus_torch)
            # torch 2.13's CPU SDPA returns NaN for is_causal with a scale <= 0: no torch peer there
            check_forward(backend, Case(q, k, v, scale=scale, causal=True), f"scale={scale:g} causal", check_torch=False)
            mask = random_bool_mask((1, 2, seq_q, seq_kv), gen, device)
            mask[:, :, 1] = False  # an empty row: output 0, lse -inf, whatever the scale
            out, lse = check_forward(backend, Case(q, k, v, attn_mask=mask, scale=scale), "empty row", check_torch=False)
            assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1])) and torch.isneginf(lse[:, :, 1]).all()
    q, k, v = qkv((1, 2), (1, 2), seq(18), seq(21), 16, gen, torch.float32, device)
    check_backward(backend, Case(q, k, v, scale=scale), f"scale={scale:g}", gen=gen)
    check_backward(backend, Case(q, k, v, scale=scale, causal=True), f"scale={scale:g} causal", gen=gen,
                   check_torch=False)
