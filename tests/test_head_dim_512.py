"""Head dims 257-512 on the triton kernels (Gemma's global layers: E = Ev = 512), against float64.

The tiles are padded to 512 (BLOCK_D = BLOCK_DV = 512), so 384 and 320 take the
same kernels with masked columns. Forward (main kernel and flash decoding), dQ,
dK/dV, with the variants; float32 at full precision is declined above
MAX_FP32_HEAD_DIM, and head dims over MAX_HEAD_DIM with a reason. Kept small: the
interpreter's cost grows with the head dim.
"""

from __future__ import annotations

import pytest
import torch

import flashsdpa
from flashsdpa.backends.base import poisoned_outputs
from flashsdpa.backends.triton import MAX_HEAD_DIM
from flashsdpa.dispatch import UnsupportedError
from helpers import (
    Case,
    assert_forward_close,
    assert_grad_close,
    assert_lse_close,
    check_backward,
    check_forward,
    generator,
    qkv,
    randn,
    seq,
)
from test_triton_variants import assert_sink_gradient_close
from test_variants import VARIANTS, leaves, oracle_of, problem, run_and_grads

@pytest.mark.parametrize("dtype, head_dim, head_dim_v", [(torch.bfloat16, 512, 512), (torch.float16, 384, 320)],
                         ids=["bf16-512", "fp16-384-320"])
def test_forward_and_gradients(dtype, head_dim, head_dim_v, device):
    gen = generator(head_dim + head_dim_v)
    q, k, v = qkv((1, 2), (1, 2), seq(19), seq(23), head_dim, gen, dtype, device, head_dim_v=head_dim_v)
    case = Case(q, k, v, causal=True)
    out, _ = check_forward("triton", case, f"E={head_dim} Ev={head_dim_v} causal")
    assert out.shape[-1] == head_dim_v
    check_backward("triton", case, f"E={head_dim} Ev={head_dim_v} causal", gen=gen)


def test_decode(device):
    """A few query rows against a longer cache, with GQA: flash decoding."""
    gen = generator(512)
    q, k, v = qkv((1, 4), (1, 2), 3, seq(45), 512, gen, torch.bfloat16, device)
    check_forward("triton", Case(q, k, v, enable_gqa=True), "E=512 decode")


@pytest.mark.parametrize("seq_q, seq_kv, alignment", [(5, 19, "top_left"), (21, 13, "bottom_right")],
                         ids=["decode", "main"])
def test_variants(seq_q, seq_kv, alignment):
    """Window, softcap, ALiBi and sinks at once, E=512 / Ev=320, GQA: outputs, lse and every gradient
    (the sinks' included) against the float64 formula, within the bar torch's own dtype sets (the formula
    in the inputs' dtype stands in for torch, which has none of these variants)."""
    dtype, (batch, heads_q, heads_kv, head_dim, head_dim_v) = torch.float16, (1, 2, 1, 512, 320)
    gen = generator(seq_q)
    q, k, v, options = problem(VARIANTS["all"] if seq_q > 16 else {**VARIANTS["all"], "causal": False}, seq_q,
                               seq_kv, dtype, gen, dims=(batch, heads_q, heads_kv, head_dim, head_dim_v))
    tensors = leaves(q, k, v, options)
    grad_out = randn((batch, heads_q, seq_q, head_dim_v), gen, dtype)
    with poisoned_outputs():
        out, lse, grads = run_and_grads(lambda: flashsdpa.attention(
            q, k, v, causal_alignment=alignment, backend="triton", return_lse=True, **options), tensors, grad_out)
    ref, ref_lse, ref_grads = run_and_grads(lambda: oracle_of(q, k, v, options, alignment), tensors, grad_out)
    their_out, _, their_grads = run_and_grads(lambda: oracle_of(q, k, v, options, alignment, dtype=dtype), tensors,
                                              grad_out)
    what = f"E=512 Ev=320 all variants L={seq_q} S={seq_kv} {alignment}"
    assert_forward_close(f"{what} out", out, ref, their_out, dtype)
    finite = torch.isfinite(ref_lse)
    assert_lse_close(lse[finite], ref_lse[finite], dtype)
    for leaf in ("q", "k", "v"):
        assert_grad_close(f"{what} d{leaf}", grads[leaf], ref_grads[leaf], their_grads[leaf], dtype)
    assert_sink_gradient_close(what, grads["sinks"], ref_grads["sinks"], their_grads["sinks"], ref, ref_lse, options,
                               grad_out, dtype)


def test_declines_past_the_maximum_and_full_precision_float32():
    q = torch.randn(1, 1, 4, MAX_HEAD_DIM + 8)
    with pytest.raises(UnsupportedError, match=f"maximum of {MAX_HEAD_DIM}"):
        flashsdpa.attention(q, q, q, backend="triton")
    q = torch.randn(1, 1, 4, 512)
    with pytest.raises(UnsupportedError, match="full-precision maximum"):
        flashsdpa.attention(q, q, q, backend="triton")
