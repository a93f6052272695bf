"""Gradients: dq, dk, dv and the float mask's, against float64 autograd of the oracle and torch's own error.

Also: partial requires_grad, odd grad_output layouts, bitwise determinism,
gradcheck in float64, the double-backward error, and that the forward saves
O(L) per row (never an L x S matrix).
"""

from __future__ import annotations

import math

import pytest
import torch

import flashsdpa
from flashsdpa.backends import base
from flashsdpa.backends.base import poisoned_outputs
from helpers import (
    BACKENDS,
    FP32_FLOOR_GRAD,
    GRAD_TOL,
    SPLIT_PRODUCTS_TORCH_FACTOR,
    Case,
    check_backward,
    generator,
    oracle,
    qkv,
    randn,
    random_bool_mask,
    random_float_mask,
    seq,
    torch_sdpa,
)


def small(backend):
    """(L, S) for a backward case: tiny for the interpreted triton backend."""
    return (seq(18), seq(21)) if backend == "triton" else (300, 530)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_dtypes(backend, dtype, device):
    gen = generator(51)
    seq_q, seq_kv = small(backend)
    heads = (1, 2) if backend == "triton" else (2, 3)
    q, k, v = qkv(heads, heads, seq_q, seq_kv, 32, gen, dtype, device)
    check_backward(backend, Case(q, k, v), str(dtype), gen=gen)
    check_backward(backend, Case(q, k, v, causal=True), f"{dtype} causal", gen=gen)


@pytest.mark.parametrize("backend", ["tiled", "reference"])
def test_grad_float64(backend, device):
    gen = generator(52)
    q, k, v = qkv((2, 2), (2, 2), 99, 35, 16, gen, torch.float64, device)
    mask = random_float_mask((2, 1, 99, 35), gen, torch.float64, device)
    check_backward(backend, Case(q, k, v, attn_mask=mask, causal=True), mask_grad=True, gen=gen)


@pytest.mark.parametrize("scale", [0.1, 1 / math.sqrt(8), 1.0, 10.0, 1e-3, None], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scales(backend, scale, device):
    gen = generator(53)
    seq_q, seq_kv = (seq(17), seq(20)) if backend == "triton" else (130, 260)
    q, k, v = qkv((1, 2), (1, 2), seq_q, seq_kv, 8, gen, torch.float32, device)
    check_backward(backend, Case(q, k, v, scale=scale), f"scale={scale}", gen=gen)
    check_backward(backend, Case(q, k, v, scale=scale, causal=True), f"scale={scale} causal", gen=gen)


def test_grad_scale_is_not_ignored(device):
    """dq at scale=0.5 differs from dq at the default scale (E=16: 0.25), and each is right."""
    gen = generator(54)
    q, k, v = qkv((1, 2), (1, 2), seq(18), seq(20), 16, gen, torch.float32, device)
    for backend in BACKENDS:
        half = check_backward(backend, Case(q, k, v, scale=0.5), "scale=0.5", gen=generator(1))
        default = check_backward(backend, Case(q, k, v), "default", gen=generator(1))
        for a, b in zip(half[:3], default[:3]):
            assert (a - b).norm() > 0.05 * b.norm()


@pytest.mark.parametrize("lengths", [(19, 45), (45, 19), (37, 37)], ids=["L<S", "L>S", "L=S"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_causal(backend, lengths, device):
    gen = generator(55)
    seq_q, seq_kv = (seq(lengths[0]), seq(lengths[1])) if backend == "triton" else (lengths[0] * 13, lengths[1] * 13)
    q, k, v = qkv((1, 2), (1, 2), seq_q, seq_kv, 16, gen, torch.float16, device)
    check_backward(backend, Case(q, k, v, causal=True), f"causal {lengths}", gen=gen)


MASK_GRAD_PATTERNS = {
    "LS": lambda L, S: (L, S),
    "B11S": lambda L, S: (2, 1, 1, S),
    "1HLS": lambda L, S: (1, 2, L, S),
    "BHLS": lambda L, S: (2, 2, L, S),
    "1S": lambda L, S: (1, S),  # (a 1-D (S,) mask is rejected, as torch rejects it)
    "B1LS": lambda L, S: (2, 1, L, S),
}


@pytest.mark.parametrize("pattern", list(MASK_GRAD_PATTERNS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_float_mask(backend, pattern, device):
    """The float mask's gradient (float32), reduced by autograd to the mask's own (broadcast) shape."""
    gen = generator(56 + list(MASK_GRAD_PATTERNS).index(pattern))
    seq_q, seq_kv = (seq(18), seq(21)) if backend == "triton" else (140, 270)
    q, k, v = qkv((2, 2), (2, 2), seq_q, seq_kv, 16, gen, torch.float32, device)
    mask = random_float_mask(MASK_GRAD_PATTERNS[pattern](seq_q, seq_kv), gen, torch.float32, device)
    grads = check_backward(
        backend, Case(q, k, v, attn_mask=mask, causal=True), f"mask {pattern}", mask_grad=True, gen=gen
    )
    assert grads[3].shape == mask.shape and grads[3].dtype == mask.dtype
    assert torch.isfinite(grads[3]).all()


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.float16], ids=["float32", "query_dtype"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_float_mask_half_precision(backend, mask_dtype, device):
    """float16 queries with a float mask that requires grad (torch then runs its math path, float32 inside)."""
    gen = generator(57)
    seq_q, seq_kv = (seq(18), seq(21)) if backend == "triton" else (140, 270)
    q, k, v = qkv((2, 2), (2, 2), seq_q, seq_kv, 16, gen, torch.float16, device)
    mask = random_float_mask((2, 1, 1, seq_kv), gen, mask_dtype, device)
    grads = check_backward(backend, Case(q, k, v, attn_mask=mask, causal=True), "fp16 + mask", mask_grad=True, gen=gen)
    assert grads[3].shape == mask.shape and grads[3].dtype == mask.dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_bool_mask(backend, device):
    gen = generator(57)
    seq_q, seq_kv = small(backend)
    q, k, v = qkv((2, 2), (2, 2), seq_q, seq_kv, 16, gen, torch.float32, device)
    for shape in ((2, 1, 1, seq_kv), (seq_q, seq_kv)):
        mask = random_bool_mask(shape, gen, device)
        check_backward(backend, Case(q, k, v, attn_mask=mask), f"bool mask {shape}", gen=gen)


@pytest.mark.parametrize("backend", BACKENDS + ("reference",))
def test_grad_fully_masked_rows(backend, device):
    """Rows that see no key: zero dq there, no NaN anywhere."""
    gen = generator(58)
    seq_q, seq_kv = seq(18), seq(21)
    q, k, v = qkv((1, 2), (1, 2), seq_q, seq_kv, 16, gen, torch.float32, device)
    mask = random_bool_mask((seq_q, seq_kv), gen, device)
    mask[[1, 7]] = False
    dq, dk, dv, _ = check_backward(backend, Case(q, k, v, attn_mask=mask), "empty rows", gen=gen, check_torch=False)
    assert torch.equal(dq[:, :, [1, 7]], torch.zeros_like(dq[:, :, [1, 7]]))
    for g in (dq, dk, dv):
        assert not torch.isnan(g).any()


@pytest.mark.parametrize("heads_q, heads_kv", [(4, 2), (4, 1), (8, 2)], ids=["group2", "mqa", "group4"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_gqa(backend, heads_q, heads_kv, device):
    """dk, dv of a shared K/V head sum over its group of query heads."""
    gen = generator(59)
    seq_q, seq_kv = (seq(17), seq(20)) if backend == "triton" else (150, 333)
    q, k, v = qkv((1, heads_q), (1, heads_kv), seq_q, seq_kv, 16, gen, torch.float16, device)
    check_backward(backend, Case(q, k, v, enable_gqa=True, causal=True), "gqa", gen=gen)


@pytest.mark.parametrize("split", [False, True], ids=["per kv head", "per query head"])
@pytest.mark.parametrize("options", [{"causal": True}, {"mask": True}, {"dropout_p": 0.2}],
                         ids=["causal", "bool mask", "dropout"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_grad_gqa_split_group(split, options, dtype, device, monkeypatch):
    """The triton dK/dV kernel per kv head (looping over its group) and per query head (SPLIT_GROUP: float32
    shares summed by the launcher), whichever the GPU's size would pick: both give the float64 gradients."""
    from flashsdpa.backends.triton import launch_backward

    taken = []
    monkeypatch.setattr(launch_backward, "splits_gqa_group", lambda *args: taken.append(split) or split)
    gen = generator(61)
    q, k, v = qkv((2, 6), (2, 2), seq(19), seq(37), 16, gen, dtype, device)
    mask = random_bool_mask((2, 1, q.shape[2], k.shape[2]), gen, device) if options.get("mask") else None
    case = Case(q, k, v, attn_mask=mask, causal=options.get("causal", False), enable_gqa=True)
    check_backward("triton", case, f"gqa split={split}", gen=gen, dropout_p=options.get("dropout_p", 0.0))
    assert taken == [split], taken


@pytest.mark.parametrize("feature", ["plain", "causal", "gqa", "float_mask"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_dropout(backend, feature, device):
    """Dropout gradients regenerate the forward's pattern: float64 autograd through full_keep_mask."""
    gen = generator(60)
    seq_q, seq_kv = (seq(18), seq(21)) if backend == "triton" else (260, 530)
    heads_kv = 2 if feature == "gqa" else 4
    q, k, v = qkv((1, 4), (1, heads_kv), seq_q, seq_kv, 16, gen, torch.float32, device)
    mask = random_float_mask((seq_q, seq_kv), gen, torch.float32, device) if feature == "float_mask" else None
    case = Case(q, k, v, attn_mask=mask, causal=feature == "causal", enable_gqa=feature == "gqa")
    check_backward(backend, case, f"dropout {feature}", dropout_p=0.3, mask_grad=mask is not None, gen=gen)


LAYOUTS = {
    # leaves shaped like the storage; the view is taken inside the graph
    "bshd_transposed": lambda q, k, v: (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)),
    "sliced_with_step": lambda q, k, v: (q[:, :, ::2], k[:, ::2], v[:, :, 1::3]),
    "expanded_kv": lambda q, k, v: (q, k.expand(2, 2, -1, -1), v.expand(2, 2, -1, -1)),
    "strided_head_dim": lambda q, k, v: (q[..., ::2], k[..., 1::2], v[..., 0]),
}


def layout_leaves(name, gen, dtype, device, seq_q, seq_kv, head_dim=16):
    if name == "bshd_transposed":
        shapes = [(2, seq_q, 2, head_dim), (2, seq_kv, 2, head_dim), (2, seq_kv, 2, head_dim)]
    elif name == "sliced_with_step":
        shapes = [(2, 2, 2 * seq_q, head_dim), (2, 4, seq_kv, head_dim), (2, 2, 3 * seq_kv, head_dim)]
    elif name == "expanded_kv":
        shapes = [(2, 2, seq_q, head_dim), (2, 1, seq_kv, head_dim), (1, 2, seq_kv, head_dim)]
    else:
        shapes = [(2, 2, seq_q, 2 * head_dim), (2, 2, seq_kv, 2 * head_dim), (2, 2, seq_kv, head_dim, 2)]
    return [randn(s, gen, dtype, device) for s in shapes]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_layouts(backend, layout, device):
    gen = generator(61)
    seq_q, seq_kv = (seq(17), seq(20)) if backend == "triton" else (200, 300)
    q, k, v = layout_leaves(layout, gen, torch.float32, device, seq_q, seq_kv)
    check_backward(backend, Case(q, k, v, causal=True), layout, prepare=LAYOUTS[layout], gen=gen)


@pytest.mark.parametrize(
    "seq_q, seq_kv", [(1, 1), (1, 37), (10, 3), (33, 1), (0, 5), (5, 0)], ids=["1x1", "L=1", "10x3", "S=1", "L=0", "S=0"]
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_odd_lengths(backend, seq_q, seq_kv, device):
    gen = generator(62)
    q, k, v = qkv((1, 2), (1, 2), seq_q, seq_kv, 16, gen, torch.float32, device)
    # S = 1: dq and dk are exactly zero in exact math (one visible key, softmax = 1), so their "relative" error
    # is absolute rounding noise; the dtype bar still bounds it, the ratio to torch's own noise is not asked.
    with_torch = seq_q > 0 and seq_kv > 1
    grads = check_backward(backend, Case(q, k, v), f"L={seq_q} S={seq_kv}", gen=gen, check_torch=with_torch)
    if seq_q * seq_kv == 0:
        for g in grads[:3]:
            assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("backend", ["tiled"])
@pytest.mark.parametrize("seq_q, seq_kv", [(99, 35), (777, 199), (257, 513)])
def test_grad_tiled_awkward_sizes(backend, seq_q, seq_kv, device):
    gen = generator(63)
    q, k, v = qkv((1, 2), (1, 2), seq_q, seq_kv, 24, gen, torch.bfloat16, device)
    check_backward(backend, Case(q, k, v, causal=True), gen=gen)


@pytest.mark.parametrize("head_dim", [1, 8, 40, 72, 128, 256])
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_head_dims(backend, head_dim, device):
    gen = generator(64 + head_dim)
    seq_q, seq_kv = (seq(17), seq(19)) if backend == "triton" else (100, 150)
    q, k, v = qkv((1, 1), (1, 1), seq_q, seq_kv, head_dim, gen, torch.float16, device)
    check_backward(backend, Case(q, k, v, causal=True), f"E={head_dim}", gen=gen)


@pytest.mark.parametrize("head_dim, head_dim_v", [(16, 40), (64, 8), (40, 128)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_head_dim_v_differs(backend, head_dim, head_dim_v, device):
    gen = generator(65)
    seq_q, seq_kv = (seq(17), seq(20)) if backend == "triton" else (150, 200)
    q, k, v = qkv((1, 2), (1, 2), seq_q, seq_kv, head_dim, gen, torch.float32, device, head_dim_v=head_dim_v)
    check_backward(backend, Case(q, k, v), f"E={head_dim} Ev={head_dim_v}", gen=gen)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_half_precision_head_dim_v_differs(backend, device):
    """float16, E=8 != Ev=16, scale 2 (a peaked softmax): torch runs its math path here (float32 inside)."""
    gen = generator(66)
    seq_q, seq_kv = (seq(24), seq(24)) if backend == "triton" else (64, 64)
    q, k, v = qkv((1, 2), (1, 2), seq_q, seq_kv, 8, gen, torch.float16, device, head_dim_v=16)
    check_backward(backend, Case(q, k, v, scale=2.0), "fp16 E=8 Ev=16", gen=gen)


@pytest.mark.parametrize(
    "shape_q, shape_kv",
    [((13, 16), (9, 16)), ((2, 1, 2, 13, 16), (3, 2, 9, 16)), ((2, 3, 13, 16), (2, 1, 9, 16))],
    ids=["2d", "broadcast-batch-5d", "broadcast-head"],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_input_ranks(backend, shape_q, shape_kv, device):
    """Gradients of broadcast inputs are summed back to each input's own shape."""
    gen = generator(66)
    q = randn(shape_q, gen, torch.float32, device)
    k, v = (randn(shape_kv, gen, torch.float32, device) for _ in range(2))
    check_backward(backend, Case(q, k, v, causal=True), gen=gen)


# --------------------------------------------------------------------------- what is required


@pytest.mark.parametrize(
    "needs, mask_grad",
    [((True, False, False), False), ((False, True, False), False), ((False, False, True), False),
     ((False, True, True), False), ((True, False, False), True), ((False, False, False), True)],
    ids=["q", "k", "v", "kv", "q+mask", "mask"],
)  # fmt: skip
@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_requires_grad(backend, needs, mask_grad, device):
    gen = generator(67)
    seq_q, seq_kv = (seq(17), seq(20)) if backend == "triton" else (130, 140)
    q, k, v = qkv((1, 2), (1, 2), seq_q, seq_kv, 16, gen, torch.float32, device)
    mask = random_float_mask((1, 2, seq_q, seq_kv), gen, torch.float32, device)
    check_backward(backend, Case(q, k, v, attn_mask=mask), str(needs), needs=needs, mask_grad=mask_grad, gen=gen)


@pytest.mark.parametrize("kind", ["transposed", "expanded", "sliced"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_grad_output(backend, kind, device):
    gen = generator(68)
    seq_q, seq_kv = (seq(17), seq(20)) if backend == "triton" else (130, 140)
    q, k, v = qkv((2, 2), (2, 2), seq_q, seq_kv, 16, gen, torch.float32, device)
    if kind == "transposed":
        grad_out = randn((2, seq_q, 2, 16), gen, torch.float32, device).transpose(1, 2)
    elif kind == "expanded":
        grad_out = randn((1, 1, seq_q, 16), gen, torch.float32, device).expand(2, 2, seq_q, 16)
    else:
        grad_out = randn((2, 2, seq_q, 48), gen, torch.float32, device)[..., ::3]
    check_backward(backend, Case(q, k, v, causal=True), kind, grad_out=grad_out)


@pytest.mark.parametrize("backend", BACKENDS + ("reference",))
def test_backward_is_deterministic(backend, device):
    """Two runs of the same backward give bitwise equal gradients (also with GQA and dropout)."""
    gen = generator(69)
    seq_q, seq_kv = (seq(18), seq(21)) if backend != "tiled" else (300, 530)
    q, k, v = qkv((1, 4), (1, 2), seq_q, seq_kv, 16, gen, torch.float16, device)
    mask = random_float_mask((seq_q, seq_kv), gen, torch.float16, device)
    grad_out = randn((1, 4, seq_q, 16), gen, torch.float16, device)

    def grads():
        leaves = [t.clone().requires_grad_() for t in (q, k, v, mask)]
        torch.manual_seed(0)
        with poisoned_outputs():
            out = flashsdpa.attention(*leaves[:3], attn_mask=leaves[3], causal=True, enable_gqa=True,
                                      dropout_p=0.2, backend=backend)  # fmt: skip
            out.backward(grad_out)
        return [t.grad for t in leaves]

    for a, b in zip(grads(), grads()):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- autograd machinery


@pytest.mark.parametrize("backend", ["tiled", "reference"])
def test_gradcheck_float64(backend, device):
    gen = generator(70)
    q, k, v = qkv((1, 2), (1, 1), 5, 6, 3, gen, torch.float64, device)
    mask = random_float_mask((1, 1, 5, 6), gen, torch.float64, device)
    leaves = [t.requires_grad_() for t in (q, k, v, mask)]

    def attention(q, k, v, mask):
        return flashsdpa.attention(q, k, v, attn_mask=mask, causal=True, enable_gqa=True, scale=0.7, backend=backend)

    assert torch.autograd.gradcheck(attention, leaves)

    def with_dropout(q, k, v, mask):
        torch.manual_seed(0)  # one pattern for every evaluation gradcheck makes
        return flashsdpa.attention(q, k, v, attn_mask=mask, dropout_p=0.3, enable_gqa=True, backend=backend)

    assert torch.autograd.gradcheck(with_dropout, leaves)


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_raises_clearly(backend, device):
    gen = generator(71)
    q, k, v = (t.requires_grad_() for t in qkv((1, 2), (1, 2), 8, 9, 16, gen, torch.float32, device))
    out = flashsdpa.attention(q, k, v, backend=backend)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.sum(), (q, k, v), create_graph=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_saves_linear_memory(backend, device):
    """The tensors saved for backward are inputs, output and O(L) row statistics: none holds L x S values."""
    gen = generator(72)
    seq_q, seq_kv = (seq(32), seq(40)) if backend == "triton" else (256, 512)
    q, k, v = (t.requires_grad_() for t in qkv((1, 1), (1, 1), seq_q, seq_kv, 8, gen, torch.float32, device))
    for mask in (None, random_bool_mask((1, 1, 1, seq_kv), gen, device)):
        saved = []

        def pack(t):
            saved.append((tuple(t.shape), t.untyped_storage().nbytes(), t.element_size()))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = flashsdpa.attention(q, k, v, attn_mask=mask, causal=True, dropout_p=0.1, backend=backend)
        assert saved, "nothing saved for backward?"
        for shape, nbytes, itemsize in saved:
            assert nbytes // itemsize < seq_q * seq_kv, f"a saved tensor {shape} holds {nbytes // itemsize} values"
        out.sum().backward()
        assert q.grad is not None


# --------------------------------------------------------------------------- test hooks themselves


class _NoLaunch:
    """Stands in for a @triton.jit kernel: `kernel[grid](...)` launches nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def test_triton_outputs_are_poisonable(device, monkeypatch):
    """Inside poisoned_outputs a triton kernel that writes nothing must leave NaN, as every backend promises
    (base.new_output): otherwise a forgotten element can pass a test with stale memory."""
    from flashsdpa.backends.triton import decode_kernels, forward_kernels, launch_backward

    for module, name in [
        (forward_kernels, "attention_forward_kernel"),
        (decode_kernels, "attention_decode_split_kernel"),
        (decode_kernels, "merge_decode_splits_kernel"),
        (launch_backward, "attention_backward_preprocess_kernel"),
        (launch_backward, "attention_backward_dkdv_kernel"),
        (launch_backward, "attention_backward_dq_kernel"),
    ]:
        monkeypatch.setattr(module, name, _NoLaunch())
    gen = generator(73)
    for seq_q in (4, 20):  # decode and main kernels
        q, k, v = (t.requires_grad_() for t in qkv((1, 2), (1, 2), seq_q, 24, 16, gen, torch.float32, device))
        with poisoned_outputs():
            out, lse = flashsdpa.attention(q, k, v, backend="triton", return_lse=True)
            assert torch.isnan(out).all() and torch.isnan(lse).all(), "triton forward outputs bypass new_output"
            out.backward(torch.ones_like(out))
        for t in (q, k, v):
            assert torch.isnan(t.grad).all(), "triton gradients bypass new_output"


def test_backward_outputs_are_poisoned(device, monkeypatch):
    """poisoned_outputs() reaches the backward pass too (autograd may run it on another thread, e.g. on CUDA)."""
    from flashsdpa.backends import tiled

    states = []
    original = tiled.new_output

    def spy(*args, **kwargs):
        states.append(base._poison_depth > 0)
        return original(*args, **kwargs)

    monkeypatch.setattr(tiled, "new_output", spy)
    gen = generator(74)
    q, k, v = (t.requires_grad_() for t in qkv((1, 2), (1, 2), 8, 9, 16, gen, torch.float32, device))
    with poisoned_outputs():
        out = flashsdpa.attention(q, k, v, backend="tiled")
        forward_calls = len(states)
        out.backward(torch.ones_like(out))
    assert len(states) > forward_calls, "the tiled backward allocates dk/dv through new_output"
    assert all(states), f"poisoning was off for {states.count(False)} of {len(states)} allocations"


def test_run_helper_poisons(device):
    """Sanity of the hook the whole suite relies on: new_output is NaN inside poisoned_outputs only."""
    with poisoned_outputs():
        assert torch.isnan(base.new_output((3,), torch.float32, device)).all()
        assert (base.new_output((3,), torch.int32, device) == -1).all()
    with poisoned_outputs():
        with poisoned_outputs():
            pass
        assert torch.isnan(base.new_output((3,), torch.float32, device)).all(), "nesting must restore the flag"


# The triton float32 backward multiplies float16 halves (launch_halves, backward_kernels.FP16_HALVES): q, k, v
# and dO split per row once per call, P and dS split per row in the kernels, each row with its own power of two.


@pytest.mark.parametrize("options", [{}, {"causal": True}, {"enable_gqa": True}], ids=["plain", "causal", "gqa"])
def test_float32_gradients_of_faint_keys_and_spread_rows(options, device):
    """Every row of dq, dk and dv within the float32 bar of its own size, against float64 and torch's own
    per-row error: keys that every query barely sees (P ~ e**-20 of the others: their dK and dV rows are
    that small) and rows of dO and v spread over 8 decades. A fixed power-of-two scale for P's and dS's halves
    (as the forward gives P, which is <= 1) fails it (seen by swapping one in): the spread rows overflow float16
    (NaN in dq), and at e**-60 the faint keys' dK and dV rows were flushed to zero (relative error 1.0)."""
    from flashsdpa.backends.triton import launch_backward

    gen = generator(75)
    seq_q, seq_kv, heads_kv = seq(37), seq(45), 1 if options.get("enable_gqa") else 2
    q, k, v = qkv((1, 2), (1, heads_kv), seq_q, seq_kv, 24, gen, torch.float32, device)
    v = v * 10.0 ** (torch.rand(1, heads_kv, seq_kv, 1, generator=gen) * 8 - 4).to(device)
    grad_out = randn((1, 2, seq_q, 24), gen, torch.float32, device)
    grad_out = grad_out * 10.0 ** (torch.rand(1, 2, seq_q, 1, generator=gen) * 8 - 4).to(device)
    faint = torch.tensor([3, seq_kv // 2, seq_kv - 1])
    mask = torch.zeros(seq_q, seq_kv, device=device)
    mask[:, faint] = -20.0

    splits = []
    original = launch_backward.split_rows_into_halves

    def spy(tensor):
        splits.append(tensor.shape)
        return original(tensor)

    def gradients(attend, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        with poisoned_outputs():
            out = attend(*leaves, mask.to(dtype))
        out.backward(grad_out.to(dtype))
        return [leaf.grad for leaf in leaves]

    causal, gqa = options.get("causal", False), options.get("enable_gqa", False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(launch_backward, "split_rows_into_halves", spy)
        ours = gradients(lambda *a: flashsdpa.attention(*a[:3], attn_mask=a[3], backend="triton", **options),
                         torch.float32)
    assert len(splits) == 4, f"q, k, v and dO split once each: {splits}"
    ref = gradients(lambda *a: oracle(*a, causal=causal, enable_gqa=gqa)[0], torch.float64)
    theirs = gradients(lambda *a: torch_sdpa(*a, causal, None, gqa), torch.float32)
    for name, mine, truth, torch_grad in zip(("dq", "dk", "dv"), ours, ref, theirs):
        rows = truth.norm(dim=-1) > 0  # (causal: the first query sees one key, its dq is exactly 0)
        row_err = ((mine.double() - truth).norm(dim=-1) / truth.norm(dim=-1))[rows].amax().item()
        torch_row_err = ((torch_grad.double() - truth).norm(dim=-1) / truth.norm(dim=-1))[rows].amax().item()
        bar = min(GRAD_TOL[torch.float32], max(FP32_FLOOR_GRAD, SPLIT_PRODUCTS_TORCH_FACTOR * torch_row_err))
        assert row_err <= bar, f"{options} {name}: worst row {row_err:.3g} over {bar:.3g} (torch {torch_row_err:.3g})"


@pytest.mark.parametrize(
    "apart, options",
    [*(((dv, rows), options) for dv, rows in ((True, True), (False, False))
       for options in ({}, {"causal": True}, {"enable_gqa": True})),
     ((True, False), {}), ((False, True), {})],
    ids=lambda value: ("dv apart" if value[0] else "dv with dk") + (", rows apart" if value[1] else ", rows in dq")
    if isinstance(value, tuple) else "gqa" if "enable_gqa" in value else "causal" if value else "plain",
)
def test_float32_launches_of_the_backward_structures(apart, options, device, monkeypatch):
    """The triton float32 backward in each structure: dK and dV from one launch of the dK/dV kernel, or two
    (BackwardConfig.dv: dK alone on the dK/dV tile, then dV alone), and the dQ kernel's row pass in the dQ
    launch or in one of its own (BackwardConfig.rows); the launches' tiles differ in sizes, so that each grid
    is its own. Each gives the float64 gradients, and the launch plan holds exactly the launches the config
    asks for."""
    import dataclasses

    from flashsdpa.backends.triton import launch_backward
    from flashsdpa.backends.triton.backward_configs import TileShape

    cache, plans = launch_backward.kernel_cache, []
    dv_apart, rows_apart = apart
    tiles = dict(dv=TileShape(block_m=32, block_n=16, num_warps=4, num_stages=1) if dv_apart else None,
                 rows=TileShape(block_m=16, block_n=32, num_warps=4, num_stages=1) if rows_apart else None)

    class Pinned:
        def get(self, key, build):
            config = cache.get(key, build)
            return dataclasses.replace(config, **tiles) if key[0] == "backward" else config

    plan_of = launch_backward.backward_launch_plan
    monkeypatch.setattr(launch_backward, "kernel_cache", Pinned())
    monkeypatch.setattr(launch_backward, "backward_launch_plan", lambda *a: plans.append(plan_of(*a)) or plans[-1])
    gen = generator(76)
    gqa = options.get("enable_gqa", False)
    q, k, v = qkv((2, 4), (2, 2 if gqa else 4), seq(19), seq(37), 24, gen, torch.float32, device)
    case = Case(q, k, v, causal=options.get("causal", False), enable_gqa=gqa)
    check_backward("triton", case, f"apart={apart}", gen=gen)
    launched = [(plan.rows is not None, plan.dq is not None, plan.dkdv is not None, plan.dv is not None)
                for plan in plans]
    assert launched == [(rows_apart, True, True, dv_apart)], plans
