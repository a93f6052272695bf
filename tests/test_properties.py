"""Property-based tests (hypothesis): random shapes, strides, masks, causal, GQA and scales against the oracle.

Budgets are small for CI (derandomized, so each run draws the same examples):
40 forward and 25 backward examples on the tiled backend, 20 forward and 10
backward on the interpreted triton backend.

The backward strategies draw head dims >= 8 and lengths >= 4: with one to
three keys (or E = 1) a gradient is a small difference of O(1) terms, or
exactly zero, so its relative error is ill-conditioned (torch's own float16
dk error reaches 1e-2 on a 2 x 2, E = 1 problem, twice the 5e-3 bar). Those
shapes are covered by test_backward.py's explicit edge cases. The backward
properties run in float32: half-precision gradients have a known gap to
torch's float32-internal math path (see test_backward.py's
test_grad_float_mask_half_precision and test_grad_head_dim_v_differs), which
would hide any other finding here.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashsdpa.descriptor import causal_pairs
from helpers import SIZE, Case, check_backward, check_forward, generator, randn

COMMON = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))


@st.composite
def problems(draw, max_len, head_dims, dtypes, max_batch_heads, min_len=0):
    batch = draw(st.integers(1, 2))
    heads_kv = draw(st.integers(1, max(1, max_batch_heads // batch)))
    group = draw(st.sampled_from([g for g in (1, 2, 3) if batch * heads_kv * g <= max(max_batch_heads, 1)] or [1]))
    heads_q = heads_kv * group
    lengths = st.integers(min_len, max_len) if draw(st.integers(0, 9)) == 0 else st.integers(max(min_len, 1), max_len)
    seq_q = draw(lengths)
    seq_kv = draw(lengths)
    head_dim = draw(st.sampled_from(head_dims))
    head_dim_v = draw(st.sampled_from([head_dim, *head_dims]))
    dtype = draw(st.sampled_from(dtypes))
    layout = draw(st.sampled_from(["contiguous", "bshd", "sliced"]))
    causal = draw(st.booleans())
    scale = draw(st.one_of(st.none(), st.floats(0.01, 5.0)))
    mask_kind = draw(st.sampled_from(["none", "bool", "float32", "query_dtype"]))
    keep_dims = [draw(st.booleans()) for _ in range(4)]
    drop_leading = draw(st.integers(0, 2))
    seed = draw(st.integers(0, 2**16))
    return dict(batch=batch, heads_q=heads_q, heads_kv=heads_kv, seq_q=seq_q, seq_kv=seq_kv, head_dim=head_dim,
                head_dim_v=head_dim_v, dtype=dtype, layout=layout, causal=causal, scale=scale, mask_kind=mask_kind,
                keep_dims=keep_dims, drop_leading=drop_leading, seed=seed)  # fmt: skip


def build(p, device) -> tuple[Case, bool]:
    """The Case for a drawn problem, and whether torch's own result is comparable (no fully masked rows)."""
    gen = generator(p["seed"])
    dtype = p["dtype"]

    def tensor(heads, length, dim):
        if p["layout"] == "bshd":
            return randn((p["batch"], length, heads, dim), gen, dtype, device).transpose(1, 2)
        if p["layout"] == "sliced":
            return randn((p["batch"], heads, 2 * length, dim + 1), gen, dtype, device)[:, :, ::2, 1:]
        return randn((p["batch"], heads, length, dim), gen, dtype, device)

    q = tensor(p["heads_q"], p["seq_q"], p["head_dim"])
    k = tensor(p["heads_kv"], p["seq_kv"], p["head_dim"])
    v = tensor(p["heads_kv"], p["seq_kv"], p["head_dim_v"])
    mask, comparable = None, True
    if p["mask_kind"] != "none":
        full = (p["batch"], p["heads_q"], p["seq_q"], p["seq_kv"])
        shape = tuple(n if keep else 1 for n, keep in zip(full, p["keep_dims"]))[p["drop_leading"]:]
        if p["mask_kind"] == "bool":
            mask = (torch.rand(shape, generator=gen) < 0.75).to(device)
            comparable = p["seq_kv"] == 0 or bool(mask.any(-1).all())
        else:
            mask_dtype = torch.float32 if p["mask_kind"] == "float32" else dtype
            mask = (torch.randn(shape, generator=gen) * 2).to(mask_dtype).to(device)
    case = Case(q, k, v, attn_mask=mask, causal=p["causal"], scale=p["scale"], enable_gqa=p["heads_q"] != p["heads_kv"])
    # The ratio to torch's own error is a ratio of two rounding noises: on a problem of a handful of visible
    # scores it is not a measurement (measured over 20 seeds of a causal 4 x 97 float16 problem: tiled's dq error
    # is 0.91x torch's on average but up to 1.9x; at 16 x 16 at most 1.04x). Below 128 visible scores per head,
    # or 8 queries or keys, only the absolute bar applies; explicit tests compare small problems with torch.
    # (With one key dq and dk are exactly zero in exact math: their error is absolute noise, bounded by the bar.)
    seq_q, seq_kv = p["seq_q"], p["seq_kv"]
    visible = causal_pairs(seq_q, seq_kv) if p["causal"] else seq_q * seq_kv
    return case, comparable and visible >= 128 and min(seq_q, seq_kv) >= 8


def mask_needs_grad(case) -> bool:
    return case.attn_mask is not None and case.attn_mask.is_floating_point()


@settings(max_examples=40, **COMMON)
@given(p=problems(max_len=300, head_dims=[1, 3, 8, 16, 33], dtypes=[torch.float32, torch.float16, torch.bfloat16],
                  max_batch_heads=6))  # fmt: skip
def test_tiled_forward_property(p, device):
    case, comparable = build(p, device)
    check_forward("tiled", case, str(p), check_torch=True if comparable else "conditioning")


@settings(max_examples=25, **COMMON)
@given(p=problems(max_len=120, head_dims=[8, 16, 33], dtypes=[torch.float32], max_batch_heads=4, min_len=4))
def test_tiled_backward_property(p, device):
    case, comparable = build(p, device)
    mask_grad = mask_needs_grad(case)
    check_backward("tiled", case, str(p), mask_grad=mask_grad, check_torch=True if comparable else "conditioning")


@settings(max_examples=20, **COMMON)
@given(p=problems(max_len=40 * SIZE, head_dims=[8, 16, 40], dtypes=[torch.float32, torch.float16],
                  max_batch_heads=4))  # fmt: skip
def test_triton_forward_property(p, device):
    case, comparable = build(p, device)
    check_forward("triton", case, str(p), check_torch=True if comparable else "conditioning")


@settings(max_examples=10, **COMMON)
@given(p=problems(max_len=36 * SIZE, head_dims=[8, 16], dtypes=[torch.float32], max_batch_heads=4, min_len=4))
def test_triton_backward_property(p, device):
    case, comparable = build(p, device)
    mask_grad = mask_needs_grad(case)
    check_backward("triton", case, str(p), mask_grad=mask_grad, check_torch=True if comparable else "conditioning")


def test_property_strategy_covers_features():
    """The strategies can reach every feature (guards against a strategy silently narrowed to trivia)."""
    seen = set()

    @settings(max_examples=200, **COMMON)
    @given(p=problems(max_len=40, head_dims=[8, 16], dtypes=[torch.float32], max_batch_heads=4))
    def collect(p):
        seen.update({p["layout"], p["mask_kind"], f"causal={p['causal']}", f"gqa={p['heads_q'] != p['heads_kv']}",
                     f"scale={p['scale'] is None}", f"empty={p['seq_q'] * p['seq_kv'] == 0}"})  # fmt: skip

    collect()
    expected = {"contiguous", "bshd", "sliced", "none", "bool", "float32", "query_dtype", "causal=True",
                "causal=False", "gqa=True", "gqa=False", "scale=True", "scale=False", "empty=True", "empty=False"}
    assert expected <= seen, expected - seen
