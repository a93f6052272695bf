"""The triton backend's packed-batch kernels: `varlen_attn` in one launch per kernel, each program reading its
sequence's offsets from cu_seq_q / cu_seq_k on the device (interpreted on the CPU, bounds-checked loads).

Every result is checked against the per-sequence float64 reference (`varlen_attn` on the reference backend,
itself checked against explicit softmax math in test_varlen.py), with the same bars as the dense triton tests.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import flashsdpa
from flashsdpa import dispatch
from flashsdpa.backends.base import poisoned_outputs
from flashsdpa.backends.triton import backward_kernels, forward_kernels, interpreter_enabled

from helpers import assert_forward_close, assert_lse_close, generator, randn, rel_err
from test_kvcache import host_reads_forbidden
from test_triton_variants import counted
from test_varlen import VARIANTS, Lse, offsets, packed

# One ragged batch with what test_varlen.RAGGED's three hold: equal lengths, an empty query and an empty key
# sequence, 1-token sequences, fewer and more queries than keys (where the alignment matters).
LENS_Q = [5, 0, 1, 17, 9, 1, 7, 2]
LENS_K = [5, 3, 1, 17, 0, 9, 3, 30]


@pytest.fixture(autouse=True)
def _triton_runs(device):
    if device == "cpu" and flashsdpa.dispatch.BACKENDS["triton"].unsupported_reasons(
        flashsdpa.AttentionDescriptor((1,), 1, 1, 1, 1, 16, 16, torch.float32, "cpu"), torch.device("cpu")
    ):
        pytest.skip("the triton backend needs a GPU or TRITON_INTERPRET=1")


def _run(q, k, v, lens_q, lens_k, backend, grad=None, **options):
    """(out, lse, (dq, dk, dv[, dsinks])) of varlen_attn on `backend` (gradients only with `grad`)."""
    return _run_offsets(q, k, v, offsets(lens_q).to(q.device), offsets(lens_k).to(q.device), max(lens_q),
                        max(lens_k), backend, grad, **options)  # fmt: skip


def _run_offsets(q, k, v, cu_q, cu_k, max_q, max_k, backend, grad=None, **options):
    leaves = [q, k, v] + ([options["sinks"]] if options.get("sinks") is not None else [])
    out, lse = flashsdpa.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, return_aux=Lse(),
                                     enable_gqa=True, backend=backend, **options)  # fmt: skip
    grads = torch.autograd.grad(out, leaves, grad) if grad is not None else ()
    return out, lse, grads


def _float64(tensors):
    return [None if t is None else t.detach().cpu().double().requires_grad_(t.requires_grad) for t in tensors]


def _check(lens_q, lens_k, dtype, device, gen, gradients=True, heads=(2, 1), dims=(16, 8), **options):
    """The packed kernels against the float64 reference: one triton call (no host read of a tensor value, no
    per-sequence fallback), poisoned outputs, float32 bars of the dense triton tests."""
    q, k, v = (t.to(device).requires_grad_(gradients) for t in packed(lens_q, lens_k, *heads, dims[0], gen, dtype,
                                                                     head_dim_v=dims[1]))  # fmt: skip
    grad = randn((sum(lens_q), heads[0], dims[1]), gen, dtype, device) if gradients else None
    sinks = options.get("sinks")
    cu_q, cu_k = offsets(lens_q).to(device), offsets(lens_k).to(device)
    dispatch.reset_stats()
    with poisoned_outputs(), host_reads_forbidden():
        out, lse, grads = _run_offsets(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), "triton", grad, validate=False,
                                       **options)  # fmt: skip
    assert dispatch.stats()["calls"] == ({"triton": 2} if gradients else {"triton": 1}), dispatch.stats()
    q64, k64, v64, sinks64 = _float64([q, k, v, sinks])
    # the reference runs on the CPU: every tensor option goes there too (alibi_slopes; sinks as float64 leaves)
    ref_options = {name: value.cpu() if isinstance(value, torch.Tensor) else value for name, value in options.items()}
    if sinks is not None:
        ref_options["sinks"] = sinks64
    ref_out, ref_lse, ref_grads = _run(q64, k64, v64, lens_q, lens_k, "reference",
                                       None if grad is None else grad.cpu().double(), **ref_options)  # fmt: skip
    assert out.shape == ref_out.shape and out.dtype == dtype
    assert rel_err(out, ref_out) <= 2e-6
    assert_lse_close(lse, ref_lse, dtype)
    for name, got, want in zip(("dq", "dk", "dv", "dsinks"), grads, ref_grads):
        assert rel_err(got, want) <= 1e-5, name
    return out, grads


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
def test_forward_matches_float64(variant, device):
    """A ragged batch with empty and 1-token sequences, GQA, head_dim_v != head_dim; causal with either
    alignment and windows, each sequence aligned by its own lengths."""
    gen = generator(len(VARIANTS[0]) * 13 + sum(LENS_K))
    bottom_right = variant.get("bottom_right", True)
    _check(LENS_Q, LENS_K, torch.float32, device, gen, gradients=False, causal=variant["causal"],
           window_size=variant["window"], causal_alignment="bottom_right" if bottom_right else "top_left")  # fmt: skip


@pytest.mark.parametrize("variant", [
    dict(causal=True), dict(causal=True, causal_alignment="top_left"), dict(window_size=(2, 1)),
    dict(window_size=(3, 0), causal_alignment="top_left"),
], ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))  # fmt: skip
def test_gradients_match_float64(variant, device):
    _check(LENS_Q, LENS_K, torch.float32, device, generator(41), **variant)


@pytest.mark.parametrize("variant", [
    dict(softcap=0.7), dict(alibi_slopes="per sequence"), dict(alibi_slopes="per head", causal=True),
    dict(sinks=True, window_size=(3, 1)), dict(softcap=2.0, alibi_slopes="per head", sinks=True, causal=True),
], ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))  # fmt: skip
def test_score_variants_match_float64(variant, device):
    """softcap, ALiBi (one slope row per sequence, or shared) and sinks, forward and gradients (sinks' too)."""
    lens_q, lens_k = [3, 0, 1, 6, 2], [5, 2, 0, 6, 9]
    gen = generator(43)
    options = dict(variant)
    if variant.get("alibi_slopes") == "per sequence":
        options["alibi_slopes"] = torch.rand(len(lens_q), 2, generator=gen).to(device)
    elif variant.get("alibi_slopes") == "per head":
        options["alibi_slopes"] = torch.rand(2, generator=gen).to(device)
    if variant.get("sinks"):
        options["sinks"] = randn((2,), gen, torch.float32, device).requires_grad_()
    _check(lens_q, lens_k, torch.float32, device, gen, **options)


def test_seqused_k_keys_past_the_count_get_zero_gradients(device):
    lens_q, lens_k, used = [4, 1, 6], [7, 3, 6], [5, 0, 2]
    gen = generator(44)
    q, k, v = (t.to(device).requires_grad_() for t in packed(lens_q, lens_k, 2, 2, 16, gen, torch.float32))
    grad = randn((sum(lens_q), 2, 16), gen, torch.float32, device)
    seqused = torch.tensor(used, dtype=torch.int32, device=device)
    cu_q, cu_k = offsets(lens_q).to(device), offsets(lens_k).to(device)
    with poisoned_outputs(), host_reads_forbidden():
        out = flashsdpa.varlen_attn(q, k, v, cu_q, cu_k, 6, 7, seqused_k=seqused, causal=True, backend="triton",
                                    validate=False)  # fmt: skip
        got = torch.autograd.grad(out, (q, k, v), grad)
    q64, k64, v64 = _float64([q, k, v])
    ref = flashsdpa.varlen_attn(q64, k64, v64, cu_q.cpu(), cu_k.cpu(), 6, 7, seqused_k=seqused.cpu(), causal=True,
                                backend="reference")  # fmt: skip
    want = torch.autograd.grad(ref, (q64, k64, v64), grad.cpu().double())
    assert rel_err(out, ref) <= 2e-6
    for name, g, w in zip("qkv", got, want):
        assert rel_err(g, w) <= 1e-5, name
    for unused in (slice(5, 10), slice(12, 16)):  # keys past seqused_k
        assert not got[1][unused].any() and not got[2][unused].any()


def test_bfloat16_within_torchs_own_error(device):
    lens = [33, 1, 70, 0, 12]
    gen = generator(45)
    q, k, v = (t.to(device) for t in packed(lens, lens, 4, 1, 16, gen, torch.bfloat16))
    cu = offsets(lens).to(device)
    out = flashsdpa.varlen_attn(q, k, v, cu, cu, 70, 70, window_size=(-1, 0), enable_gqa=True, backend="triton")
    q64, k64, v64 = _float64([q, k, v])
    ref = flashsdpa.varlen_attn(q64, k64, v64, cu.cpu(), cu.cpu(), 70, 70, causal=True, enable_gqa=True,
                                backend="reference")  # fmt: skip
    bounds = offsets(lens).tolist()
    torch_out = torch.cat([
        torch.nn.functional.scaled_dot_product_attention(
            *(t.cpu().transpose(0, 1) for t in (q[a:b], k[a:b], v[a:b])), is_causal=True, enable_gqa=True
        ).transpose(0, 1) for a, b in zip(bounds[:-1], bounds[1:]) if b > a
    ])  # fmt: skip
    assert_forward_close("packed bf16", out.cpu(), ref, torch_out, torch.bfloat16)


def test_dropout_gradients_equal_the_per_sequence_path(device):
    """Dropout draws each sequence's streams as batch items of an (N, Hq) batch, in the packed kernels as on
    the per-sequence tiled path: the same seed gives the same outputs and gradients."""
    lens = [7, 12, 1]
    gen = generator(46)
    q, k, v = (t.to(device).requires_grad_() for t in packed(lens, lens, 2, 2, 16, gen, torch.float32))
    grad = randn((sum(lens), 2, 16), gen, torch.float32, device)
    cu = offsets(lens).to(device)
    results = []
    for backend in ("triton", "tiled"):
        torch.manual_seed(6)
        out = flashsdpa.varlen_attn(q, k, v, cu, cu, 12, 12, dropout_p=0.3, causal=True, backend=backend)
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    for got, want in zip(*results):
        assert rel_err(got, want) <= 1e-5


def test_work_is_the_sum_of_the_sequences_work(monkeypatch):
    """Lengths (2, 37, 150, 5), a scaled-down (1, 37, 1000, 5), causal: the packed kernels visit exactly the
    key blocks (forward, dQ) and query blocks (dK/dV) the four sequences' own dense problems visit, under a
    third of what a padded (4, 150, 150) batch would (sum of squares 23,898 against 90,000). (Dense causal
    problems all take the main kernel, whose loads are counted; a 1-token sequence's dense backward skips
    its dQ, so the shortest here has 2.)"""
    if not interpreter_enabled():
        pytest.skip("counts the interpreter's calls of the kernels' jit helpers (TRITON_INTERPRET=1)")
    lens = [2, 37, 150, 5]
    device = "cpu"
    loads = counted(monkeypatch, forward_kernels, "load_rows")  # q once a program, k and v per key block
    dq_blocks = counted(monkeypatch, backward_kernels, "_dq_key_block")
    dkdv_blocks = counted(monkeypatch, backward_kernels, "_dkdv_query_block")
    gen = generator(47)
    q, k, v = (t.to(device).requires_grad_() for t in packed(lens, lens, 1, 1, 16, gen, torch.bfloat16))
    cu = offsets(lens).to(device)

    def counts(run) -> tuple[int, int, int]:
        for calls in (loads, dq_blocks, dkdv_blocks):
            calls.clear()
        out = run()
        forward_loads = len(loads)
        out.backward(torch.ones_like(out))
        return forward_loads, len(dq_blocks), len(dkdv_blocks)

    packed_counts = counts(lambda: flashsdpa.varlen_attn(q, k, v, cu, cu, 150, 150, causal=True, backend="triton"))
    dense = [counts(lambda: flashsdpa.attention(*(t[a:b].transpose(0, 1)[None] for t in (q, k, v)), causal=True,
                                                backend="triton"))
             for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]  # fmt: skip
    assert packed_counts == tuple(map(sum, zip(*dense))), (packed_counts, dense)
    padded = [4 * n for n in dense[2]]  # four batch items of the longest sequence's problem
    assert all(3 * p < full for p, full in zip(packed_counts, padded)), (packed_counts, padded)


def test_longest_first_order_changes_no_bit(device, monkeypatch):
    """The packed dQ and dK/dV grids take the sequences in decreasing order of work (query count times key
    count, ties in index order): only when each program runs changes, so every gradient is bitwise the one
    the given order gives."""
    from flashsdpa.backends.base import PackedSequences
    from flashsdpa.backends.triton import launch_backward
    from flashsdpa.cache import kernel_cache

    cu_q, cu_k = offsets(LENS_Q).to(device), offsets(LENS_K).to(device)
    order = launch_backward.longest_sequences_first(
        PackedSequences(cu_q, cu_k, cu_k[1:] - cu_k[:-1]))  # fmt: skip
    work = [q * k for q, k in zip(LENS_Q, LENS_K)]
    assert order.tolist() == sorted(range(len(work)), key=lambda i: -work[i])
    gen = generator(48)
    q, k, v = (t.to(device).requires_grad_() for t in packed(LENS_Q, LENS_K, 2, 1, 16, gen, torch.bfloat16))
    grad = randn((sum(LENS_Q), 2, 16), gen, torch.bfloat16, device)
    results = []
    build = launch_backward.backward_config
    try:
        for longest_first in (True, False):
            monkeypatch.setattr(launch_backward, "backward_config", lambda *args: dataclasses.replace(
                build(*args), packed_longest_first=longest_first))  # fmt: skip
            kernel_cache.clear()
            with poisoned_outputs():
                _, _, grads = _run_offsets(q, k, v, cu_q, cu_k, max(LENS_Q), max(LENS_K), "triton", grad,
                                           causal=True)  # fmt: skip
            results.append(grads)
    finally:
        kernel_cache.clear()
    for name, first, given in zip("qkv", *results):
        assert torch.equal(first, given), name


@pytest.mark.parametrize("head_dim", [64, 128])
def test_sm90_packed_tiles_give_each_warp_its_own_rows(head_dim):
    """The sm_90 16-bit ROUNDED packed backward's products have at least 16 rows a warp (wgmma: 64 rows a
    warp group): the dK/dV kernel's rows are its keys (S^T, dP^T, dV, dK), the dQ kernel's its queries. With
    fewer, Triton 3.6 has two warp groups compute the same product and its softmax (compile_sm90's REPL; the
    64x64 8-warp dK/dV tile did so at d=128)."""
    from flashsdpa.backends.triton.backward_configs import backward_config
    from flashsdpa.descriptor import AttentionDescriptor, GradientPrecision

    for variant in (dict(), dict(causal=True), dict(causal=True, window_left=8), dict(softcap=2.0),
                    dict(alibi=True), dict(sinks=True)):  # fmt: skip
        desc = AttentionDescriptor((3,), 16, 16, 300, 300, head_dim, head_dim, torch.bfloat16, "cuda", **variant)
        config = backward_config(desc.kernel_key, (9, 0), GradientPrecision.ROUNDED, packed=True)
        assert config.dkdv.block_n >= 16 * config.dkdv.num_warps, (variant, config.dkdv)
        assert config.dq.block_m >= 16 * config.dq.num_warps, (variant, config.dq)
        assert config.packed_longest_first
