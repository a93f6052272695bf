"""The variants (window, alignment, softcap, ALiBi, sinks) on the interpreted Triton kernels.

Outputs, lse and gradients (q, k, v, the sinks, a float mask) against the float64
formula (`helpers.variants_oracle`), within the bar the suite uses against torch's
own error: torch has none of these variants, so its stand-in is the same formula
computed in the inputs' dtype. Forward (main kernel and flash decoding), dQ and
dK/dV; odd sizes with L < S and L > S, both alignments, GQA and E != Ev. Then the
block skipping: a window problem's key-block visits are counted.
"""

from __future__ import annotations

import pytest
import torch

import flashsdpa
from flashsdpa.backends.base import poisoned_outputs
from flashsdpa.backends.triton import backward_kernels, forward_kernels, interpreter_enabled
from helpers import assert_forward_close, assert_grad_close, assert_lse_close, generator, qkv, randn
from test_variants import ALIGNMENTS, EV, VARIANTS, B, HQ, leaves, oracle_of, problem, run_and_grads

# (L, S): L < S, L > S; 13 query rows take flash decoding (up to 16 rows, not causal), 37 the main kernel.
SHAPES = ((13, 21), (37, 19))


def check_triton(name, seq_q, seq_kv, alignment, dtype, device, mask_kind="none", seed=0):
    """The Triton kernels on `device` (interpreted on the CPU) against the float64 formula, computed on the same
    device (float64 matmuls take no TF32 shortcut on CUDA), with the stand-in for torch's error in `dtype` there."""
    gen = generator(seed)
    q, k, v, options = problem(VARIANTS[name], seq_q, seq_kv, dtype, gen, mask_kind, device=device)
    tensors = leaves(q, k, v, options)
    grad_out = randn((B, HQ, seq_q, EV), gen, dtype, device)
    with poisoned_outputs():
        ours = run_and_grads(
            lambda: flashsdpa.attention(q, k, v, causal_alignment=alignment, backend="triton", return_lse=True,
                                        **options),
            tensors, grad_out,
        )  # fmt: skip
    truth = run_and_grads(lambda: oracle_of(q, k, v, options, alignment), tensors, grad_out)
    theirs = run_and_grads(lambda: oracle_of(q, k, v, options, alignment, dtype=dtype), tensors, grad_out)
    what = f"{name} L={seq_q} S={seq_kv} {alignment} mask={mask_kind} {dtype}"
    assert_matches_formula(what, ours, truth, theirs, options, grad_out, dtype)


def assert_matches_formula(what, ours, truth, theirs, options, grad_out, dtype):
    """ours, truth (the formula in float64) and theirs (in `dtype`): (out, lse, gradients by leaf) each."""
    (out, lse, grads), (ref, ref_lse, ref_grads), (their_out, _, their_grads) = ours, truth, theirs
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), f"{what}: rows with no visible key differ"
    assert_forward_close(f"{what} out", out, ref, their_out, dtype)
    finite = torch.isfinite(ref_lse)
    assert_lse_close(lse[finite], ref_lse[finite], dtype)
    for leaf in grads:
        if leaf == "sinks":
            assert_sink_gradient_close(what, grads[leaf], ref_grads[leaf], their_grads[leaf], ref, ref_lse, options,
                                       grad_out, dtype)
        else:
            assert_grad_close(f"{what} d{leaf}", grads[leaf], ref_grads[leaf], their_grads[leaf], dtype)


def assert_sink_gradient_close(what, got, ref, theirs, ref_out, ref_lse, options, grad_out, dtype):
    """dsink_h = -sum_i exp(sink_h - lse_i) * delta_i sums terms of both signs (ops.sink_gradient): its error
    relative to itself grows with the cancellation (60x on random problems), the same in any backend whose
    rows carry a normalisation error of one rounding. So each head's error is taken relative to the sum of
    its terms' magnitudes, against the same measure of the formula computed in the inputs' dtype."""
    shares = torch.exp(options["sinks"].detach().double().view(1, -1, 1) - ref_lse.detach().double())
    delta = (grad_out.double() * ref_out.detach().double()).sum(-1)
    magnitude = (shares * delta).abs().sum((0, 2))
    error = ((got.double() - ref.double()).abs() / magnitude).max().item()
    their_error = ((theirs.double() - ref.double()).abs() / magnitude).max().item()
    bound = max(2.0 * their_error, 4.0 * torch.finfo(dtype).eps)
    assert error <= bound, f"{what} dsinks: error {error:.3g} of the terms' magnitude, bound {bound:.3g}"


# Each variant with each shape, the shapes taking the alignments in turn (L < S top-left, L > S bottom-right,
# where the first queries sit before key 0); the combination of all with the other pairing too.
CASES = [(name, *shape, alignment) for name in VARIANTS for shape, alignment in zip(SHAPES, ALIGNMENTS)] + [
    ("all", *shape, alignment) for shape, alignment in zip(SHAPES, reversed(ALIGNMENTS))
]


@pytest.mark.parametrize("name,seq_q,seq_kv,alignment", CASES)
def test_float32_matches_formula(name, seq_q, seq_kv, alignment, device):
    check_triton(name, seq_q, seq_kv, alignment, torch.float32, device, seed=len(name) + seq_q)


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("name", ["causal_window", "all"])
def test_with_masks(name, mask_kind, device):
    check_triton(name, 37, 19, "bottom_right", torch.float32, device, mask_kind, seed=3)
    check_triton(name, 13, 21, "top_left", torch.float32, device, mask_kind, seed=4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_matches_formula(dtype, device):
    for (seq_q, seq_kv), alignment in zip(SHAPES, ALIGNMENTS):
        check_triton("all", seq_q, seq_kv, alignment, dtype, device, "float", seed=5)


def counted(monkeypatch, module, name: str) -> list:
    """Replaces module.name, a jit helper the interpreter calls as Python, by one that counts its calls."""
    calls = []
    original = getattr(module, name)

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return calls


@pytest.mark.skipif(not interpreter_enabled(), reason="counts the interpreter's Python calls of the kernels' jit "
                    "helpers (TRITON_INTERPRET=1); compiled kernels make none")
@pytest.mark.parametrize("alignment", ALIGNMENTS)
def test_window_visits_key_blocks_in_proportion_to_the_window(alignment, monkeypatch):
    """A window of w keys makes each program visit at most (w + BLOCK_M - 1) // BLOCK_N + 2 key blocks (forward,
    dQ) or (w + BLOCK_N - 1) // BLOCK_M + 2 query blocks (dK/dV), not all S / BLOCK_N: counted for two lengths (the
    totals double with L at a fixed window), and the counting itself against the plain problem, which visits
    every block."""
    loads = counted(monkeypatch, forward_kernels, "load_rows")  # q once, then k and v per key block
    dq_blocks = counted(monkeypatch, backward_kernels, "_dq_key_block")
    dkdv_blocks = counted(monkeypatch, backward_kernels, "_dkdv_query_block")
    gen = generator(17)
    counts = {}
    for seq, window in ((128, (8, 0)), (256, (8, 0)), (128, None)):
        q, k, v = qkv((1, 1), (1, 1), seq, seq + 7, 16, gen, torch.bfloat16, "cpu")
        for calls in (loads, dq_blocks, dkdv_blocks):
            calls.clear()
        tensors = [t.requires_grad_() for t in (q, k, v)]
        out = flashsdpa.attention(*tensors, window=window, causal_alignment=alignment, backend="triton")
        forward_visits = (len(loads) - -(-seq // 32)) // 2
        out.backward(torch.ones_like(out))
        counts[seq, window] = forward_visits, len(dq_blocks), len(dkdv_blocks)
    # interpreter tiles (forward_configs, backward_configs): forward 32 x 16, dQ 32 x 16, dK/dV 16 x 32
    q_blocks, k_blocks = -(-128 // 32), -(-(128 + 7) // 16)
    assert counts[128, None] == (q_blocks * k_blocks, q_blocks * k_blocks, -(-(128 + 7) // 32) * (128 // 16)), counts
    for seq in (128, 256):
        forward, dq, dkdv = counts[seq, (8, 0)]
        # 32 queries see 8 + 32 keys, which span at most (40 - 1) // 16 + 2 = 4 key blocks of 16; 32 keys are
        # seen by 8 + 32 queries, at most 4 query blocks of 16
        assert forward <= 4 * (seq // 32) and dq <= 4 * (seq // 32), counts
        assert dkdv <= 4 * -(-(seq + 7) // 32), counts
    for part in range(3):
        assert counts[256, (8, 0)][part] <= 2 * counts[128, (8, 0)][part] + 3, counts
