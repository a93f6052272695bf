"""merge_attention: partial results over disjoint key sets combine into attention over all keys."""

from __future__ import annotations

import math

import pytest
import torch

import flashsdpa
from helpers import assert_forward_close, assert_lse_close, generator, oracle, qkv, rel_err, run, torch_sdpa


def _split_keys(seq_kv: int, parts: int, gen) -> list[torch.Tensor]:
    """Disjoint, non-contiguous index sets covering 0..seq_kv-1 (some may be empty)."""
    owner = torch.randint(0, parts, (seq_kv,), generator=gen)
    return [torch.nonzero(owner == p).flatten() for p in range(parts)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("parts", [1, 3])
def test_merge_equals_attention_over_all_keys(dtype, parts):
    gen = generator(17 + parts)
    q, k, v = qkv((2, 4), (2, 2), 37, 53, 24, gen, dtype, "cpu", head_dim_v=20)
    index_sets = _split_keys(53, parts, gen)
    mask = torch.rand(2, 1, 37, 53, generator=gen) < 0.8  # some rows lose every key of some part
    outs, lses = [], []
    for keys in index_sets:
        out, lse = run("tiled", q, k[..., keys, :], v[..., keys, :], attn_mask=mask[..., keys],
                       enable_gqa=True, scale=0.3, return_lse=True)
        outs.append(out)
        lses.append(lse)
    merged, merged_lse = flashsdpa.merge_attention(outs, lses)
    ref, ref_lse = oracle(q, k, v, mask, scale=0.3, enable_gqa=True)
    assert merged.dtype == dtype and merged_lse.dtype == torch.float32
    torch_out = torch_sdpa(q, k, v, mask, False, 0.3, True)
    # Each part is rounded to `dtype` before the merge, the merged sum once more: at most 2x torch's error.
    assert_forward_close("merged", merged, ref, torch_out, dtype, torch_factor=2.0)
    assert_lse_close(merged_lse, ref_lse)


def test_rows_with_no_key_anywhere_give_zeros_and_minus_inf():
    gen = generator(5)
    outs = [torch.randn(3, 7, 4, generator=gen) for _ in range(2)]
    lses = [torch.randn(3, 7, generator=gen) for _ in range(2)]
    for part in range(2):
        lses[part][1, 2] = float("-inf")
        outs[part][1, 2] = 0.0
    lses[0][0, 0] = float("-inf")  # one part empty: the other alone decides
    outs[0][0, 0] = 0.0
    out, lse = flashsdpa.merge_attention(outs, lses)
    assert torch.isneginf(lse[1, 2]) and torch.equal(out[1, 2], torch.zeros(4))
    torch.testing.assert_close(out[0, 0], outs[1][0, 0])
    torch.testing.assert_close(lse[0, 0], lses[1][0, 0])
    assert torch.isfinite(out).all() and (torch.isfinite(lse) | torch.isneginf(lse)).all()


def test_gradients_by_gradcheck_including_empty_rows():
    gen = generator(8)
    outs = [torch.randn(2, 5, 3, generator=gen, dtype=torch.float64) for _ in range(3)]
    lses = [torch.randn(2, 5, generator=gen, dtype=torch.float64) * 3 for _ in range(3)]
    for part in range(3):
        lses[part][1, 4] = float("-inf")
        outs[part][1, 4] = 0.0
    lses[2][0, 1] = float("-inf")
    leaves = [t.requires_grad_() for t in (*outs, *lses)]

    def merged(*tensors):
        out, lse = flashsdpa.merge_attention(tensors[:3], tensors[3:])
        return out, torch.where(torch.isneginf(lse), 0.0, lse)  # gradcheck cannot difference -inf outputs

    assert torch.autograd.gradcheck(merged, leaves)
    out, lse = flashsdpa.merge_attention(outs, lses)
    (out.sum() + torch.where(torch.isneginf(lse), 0.0, lse).sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)
    assert all(t.grad[1, 4].abs().sum() == 0 for t in leaves), "a row with no key has zero gradients"


def _differentiable_part(q, k, v, scale):
    """float64 attention over one key set with a differentiable lse (the oracle detaches its lse)."""
    scores = (q @ k.transpose(-1, -2)) * scale
    return torch.softmax(scores, dim=-1) @ v, torch.logsumexp(scores, dim=-1)


def test_gradients_through_the_merge_equal_full_attention():
    gen = generator(9)
    q, k, v = qkv((2, 3), (2, 3), 11, 19, 8, gen, torch.float64, "cpu")
    grad_out = torch.randn(2, 3, 11, 8, generator=gen, dtype=torch.float64)
    scale = 1 / math.sqrt(8)

    def gradients(split):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        parts = [_differentiable_part(leaves[0], leaves[1][..., s, :], leaves[2][..., s, :], scale) for s in split]
        out, _ = flashsdpa.merge_attention([p[0] for p in parts], [p[1] for p in parts])
        out.backward(grad_out)
        return [t.grad for t in leaves]

    whole = gradients([slice(0, 19)])
    pieces = gradients([slice(0, 5), slice(5, 6), slice(6, 19)])
    for name, a, b in zip("qkv", whole, pieces):
        assert rel_err(b, a) < 1e-12, f"d{name}"


def test_out_dtype_and_float64():
    outs = [torch.randn(4, 3, dtype=torch.bfloat16) for _ in range(2)]
    lses = [torch.randn(4) for _ in range(2)]
    out, lse = flashsdpa.merge_attention(outs, lses, out_dtype=torch.float32)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    out, lse = flashsdpa.merge_attention([o.double() for o in outs], lses)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64


def test_an_out_with_gradient_and_an_lse_without_raises():
    """flashsdpa.attention's lse carries no gradient: merging its parts under autograd would drop a term."""
    q, k, v = qkv((1, 2), (1, 2), 5, 8, 4, generator(3), torch.float32, "cpu")
    q.requires_grad_()
    parts = [flashsdpa.attention(q, k[..., s, :], v[..., s, :], return_lse=True) for s in (slice(0, 3), slice(3, 8))]
    with pytest.raises(ValueError, match=r"outs\[0\] requires grad but lses\[0\] does not"):
        flashsdpa.merge_attention([p[0] for p in parts], [p[1] for p in parts])
    with torch.no_grad():
        flashsdpa.merge_attention([p[0] for p in parts], [p[1] for p in parts])


@pytest.mark.parametrize(
    "outs, lses, match",
    [
        ([], [], "at least one"),
        ([torch.zeros(2, 3)], [], "1 outs but 0 lses"),
        ([torch.zeros(2, 3), torch.zeros(2, 4)], [torch.zeros(2), torch.zeros(2)], r"outs\[1\] has shape \(2, 4\)"),
        ([torch.zeros(2, 3)], [torch.zeros(3)], r"lses\[0\] has shape \(3,\), expected \(2,\)"),
        ([torch.zeros(2, 3, dtype=torch.int32)], [torch.zeros(2)], "must be floating"),
    ],
)
def test_bad_input_is_named(outs, lses, match):
    with pytest.raises((ValueError, TypeError), match=match):
        flashsdpa.merge_attention(outs, lses)
