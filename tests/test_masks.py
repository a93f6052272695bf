"""attn_mask: every broadcast pattern, bool and float (float32 and the query's dtype), with causal, GQA,
odd layouts, and extreme additive values. Gradients of float masks are in test_backward.py."""

from __future__ import annotations

import pytest
import torch

from helpers import (
    BACKENDS,
    ON_CUDA,
    Case,
    assert_forward_close,
    assert_grad_close,
    check_forward,
    generator,
    oracle,
    qkv,
    randn,
    random_bool_mask,
    random_float_mask,
    rel_err,
    run,
    seq,
)

B, H = 2, 3
# mask shapes as functions of (L, S), all broadcastable to (B, H, L, S)
PATTERNS = {
    "LS": lambda L, S: (L, S),
    "11LS": lambda L, S: (1, 1, L, S),
    "B11S": lambda L, S: (B, 1, 1, S),
    "BH1S": lambda L, S: (B, H, 1, S),
    "1HLS": lambda L, S: (1, H, L, S),
    "BHLS": lambda L, S: (B, H, L, S),
    # (a 1-D (S,) mask is rejected, as torch rejects it: tests/test_validation.py)
    "1S": lambda L, S: (1, S),
    "H1S": lambda L, S: (H, 1, S),
    "B1LS": lambda L, S: (B, 1, L, S),
    "1111": lambda L, S: (1, 1, 1, 1),
    "L1": lambda L, S: (L, 1),
}
MASK_DTYPES = ["bool", "float32", "query_dtype"]


def make_mask(kind, shape, query_dtype, gen, device):
    if kind == "bool":
        # a (.., 1) pattern cannot keep "key 0" without keeping everything: let whole rows be masked then
        return random_bool_mask(shape, gen, device, ensure_first_key=shape[-1] != 1 or len(shape) == 1)
    dtype = torch.float32 if kind == "float32" else query_dtype
    return random_float_mask(shape, gen, dtype, device, with_neg_inf=shape[-1] != 1)


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_broadcast_patterns(backend, pattern, mask_dtype, device):
    gen = generator(list(PATTERNS).index(pattern) * 10 + MASK_DTYPES.index(mask_dtype))
    if backend == "triton":
        # float16 queries (so "query_dtype" is a float16 mask); decode-sized and causal main-kernel problems
        dtype, problems = torch.float16, [(seq(5), seq(21), False), (seq(19), seq(21), True)]
    else:
        dtype, problems = torch.bfloat16, [(70, 600, False), (300, 290, True)]
    for seq_q, seq_kv, causal in problems:
        q, k, v = qkv((B, H), (B, H), seq_q, seq_kv, 16, gen, dtype, device)
        mask = make_mask(mask_dtype, PATTERNS[pattern](seq_q, seq_kv), dtype, gen, device)
        # fully masked rows (possible for the L1 bool pattern) make torch's own result differ: oracle only then
        has_empty_rows = mask.dtype == torch.bool and not bool(mask.any(-1).all())
        check_forward(
            backend, Case(q, k, v, attn_mask=mask, causal=causal), f"{pattern} {mask_dtype} causal={causal}",
            check_torch=not has_empty_rows,
        )  # fmt: skip


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("lengths", [(19, 37), (37, 19)], ids=["L<S", "L>S"])
@pytest.mark.parametrize("backend", BACKENDS + ("reference",))
def test_causal_and_mask_apply_both(backend, lengths, mask_kind, device):
    """attn_mask with is_causal applies both (torch's math backend would raise; the oracle composes them)."""
    gen = generator(31)
    seq_q, seq_kv = (seq(lengths[0]), seq(lengths[1])) if backend != "tiled" else (lengths[0] * 11, lengths[1] * 11)
    q, k, v = qkv((1, 2), (1, 2), seq_q, seq_kv, 16, gen, torch.float32, device)
    if mask_kind == "bool":
        mask = random_bool_mask((1, 2, seq_q, seq_kv), gen, device)
    else:
        mask = random_float_mask((seq_q, seq_kv), gen, torch.float32, device)
    out, _ = check_forward(backend, Case(q, k, v, attn_mask=mask, causal=True), f"causal+{mask_kind}")
    # and it is neither the mask alone nor causal alone
    assert not torch.allclose(out, run(backend, q, k, v, attn_mask=mask), atol=1e-3)
    assert not torch.allclose(out, run(backend, q, k, v, causal=True), atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_with_gqa(backend, device):
    gen = generator(32)
    seq_q, seq_kv = (seq(18), seq(20)) if backend == "triton" else (200, 333)
    q, k, v = qkv((2, 4), (2, 2), seq_q, seq_kv, 16, gen, torch.float16, device)
    per_head = random_float_mask((2, 4, seq_q, seq_kv), gen, torch.float32, device)
    check_forward(backend, Case(q, k, v, attn_mask=per_head, enable_gqa=True), "per-query-head float mask")
    padding = random_bool_mask((2, 1, 1, seq_kv), gen, device)
    check_forward(backend, Case(q, k, v, attn_mask=padding, enable_gqa=True, causal=True), "key padding")


@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded_rows", "expanded_keys"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_layouts(backend, layout, device):
    """Masks that are views: transposed storage, strided slices, and user-expanded (stride-0) tensors."""
    gen = generator(33)
    seq_q, seq_kv = (seq(18), seq(21)) if backend == "triton" else (260, 530)
    q, k, v = qkv((2, 2), (2, 2), seq_q, seq_kv, 16, gen, torch.float32, device)
    if layout == "transposed":
        mask = random_bool_mask((2, 2, seq_kv, seq_q), gen, device, ensure_first_key=False).transpose(-1, -2)
        mask[..., 0] = True
    elif layout == "sliced":
        mask = random_float_mask((2, 4, seq_q, 2 * seq_kv), gen, torch.float32, device)[:, ::2, :, ::2]
    elif layout == "expanded_rows":
        mask = random_float_mask((2, 1, 1, seq_kv), gen, torch.float32, device).expand(2, 2, seq_q, seq_kv)
    else:
        mask = random_bool_mask((seq_q, 1), gen, device, ensure_first_key=False).expand(seq_q, seq_kv).clone()
        mask[:, : seq_kv // 2] = True
        mask = mask[:, :1].expand(seq_q, seq_kv) | random_bool_mask((1, seq_kv), gen, device)
    check_forward(backend, Case(q, k, v, attn_mask=mask, causal=True), layout)


@pytest.mark.parametrize("backend", BACKENDS + ("reference",))
def test_float_mask_extreme_values(backend, device):
    """float32 masks at finfo.min: a row that is all finfo.min has uniform weights (plain softmax), it is not empty;
    finfo.min on some keys hides them like -inf."""
    gen = generator(34)
    seq_q, seq_kv = seq(18), seq(21)
    q, k, v = qkv((1, 2), (1, 2), seq_q, seq_kv, 16, gen, torch.float32, device)
    lowest = torch.finfo(torch.float32).min
    mask = randn((seq_q, seq_kv), gen, torch.float32, device)
    mask[2] = lowest  # whole row
    mask[5, 1::2] = lowest  # every other key
    out, _ = check_forward(backend, Case(q, k, v, attn_mask=mask), "finfo.min")
    assert torch.isfinite(out).all()
    uniform = v.double().mean(dim=-2)
    assert torch.allclose(out[:, :, 2].double(), uniform, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_on_2d_and_5d_inputs(backend, device):
    gen = generator(35)
    seq_q, seq_kv = seq(18), seq(21)
    q, k, v = (randn((n, 16), gen, torch.float16, device) for n in (seq_q, seq_kv, seq_kv))
    check_forward(backend, Case(q, k, v, attn_mask=random_bool_mask((seq_q, seq_kv), gen, device)), "2d")
    q = randn((2, 2, 1, seq_q, 16), gen, torch.float16, device)
    k, v = (randn((2, 2, 1, seq_kv, 16), gen, torch.float16, device) for _ in range(2))
    mask = random_float_mask((2, 1, 1, 1, seq_kv), gen, torch.float16, device)
    check_forward(backend, Case(q, k, v, attn_mask=mask, causal=True), "5d")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_is_applied_per_batch_and_head(backend, device):
    """A mask that differs per (batch, head) item: each item matches its own oracle slice."""
    gen = generator(36)
    seq_q, seq_kv = seq(17), seq(20)
    q, k, v = qkv((2, 2), (2, 2), seq_q, seq_kv, 16, gen, torch.float32, device)
    mask = torch.ones(2, 2, seq_q, seq_kv, dtype=torch.bool, device=device)
    mask[0, 1, :, seq_kv // 2 :] = False
    mask[1, 0, :, : seq_kv // 2] = False
    out = run(backend, q, k, v, attn_mask=mask)
    for b in range(2):
        for h in range(2):
            ref, _ = oracle(q[b, h], k[b, h], v[b, h], mask[b, h])
            assert_forward_close(f"{backend} item {b},{h}", out[b, h], ref, None, torch.float32)


@pytest.mark.parametrize("pattern", ["BHLS", "B11S"])
def test_hidden_keys_with_inf_stay_hidden(pattern, device):
    """Keys a bool mask hides whose K rows hold inf add nothing: the output and dV equal those with the rows
    zeroed, bit for bit. The triton kernels feed the mask to q @ k^T as its accumulator (a layout choice, see
    forward_kernels.mask_seed) and must still hide the -inf + inf = NaN it makes there. (dQ = dS K is NaN either
    way, as in torch's math; so is any output under a float -inf mask, inf + -inf.)"""
    # BHLS at these lengths has unaligned rows, so the triton kernels take the mask-seeded path there.
    gen = generator(36 + ["BHLS", "B11S"].index(pattern))
    seq_q, seq_kv = seq(18), seq(21)
    q, k, v = qkv((B, H), (B, H), seq_q, seq_kv, 16, gen, torch.float16, device)
    mask = random_bool_mask(PATTERNS[pattern](seq_q, seq_kv), gen, device)
    mask[..., 1] = False
    mask[..., 7] = False
    finite_k = k.clone()
    finite_k[..., [1, 7], :] = 0
    inf_k = finite_k.clone()
    inf_k[..., 1, :] = float("inf")
    inf_k[..., 7, :] = float("-inf")
    results = []
    for keys in (finite_k, inf_k):
        q_, k_, v_ = (t.clone().requires_grad_() for t in (q, keys, v))
        out = run("triton", q_, k_, v_, attn_mask=mask)
        out.backward(torch.ones_like(out))
        results.append((out.detach(), v_.grad))
    for name, expected, got in zip(("out", "dv"), *results):
        assert torch.isfinite(expected).all(), name
        assert torch.equal(expected, got), name


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_mask_seed_path_matches_plain_path(kind, device, monkeypatch):
    """The triton kernels seed q @ k^T with mask rows that are not 16-byte aligned (MASK_SEED, a layout
    choice) and not with aligned ones. Under the interpreter both paths run the same arithmetic and
    give the same bits. On a GPU the seed changes the register layout the softmax runs in (that is
    its purpose), and with it the order of the row reductions: there each path must meet the
    float64 bar, and the two may differ by rounding (the H100 gave different bits for bool masks)."""
    from flashsdpa.backends.triton import launch_backward, launch_forward

    chosen = []
    decide = launch_forward.seeds_with_mask

    def spy(*args):
        chosen.append(decide(*args))
        return chosen[-1]

    monkeypatch.setattr(launch_forward, "seeds_with_mask", spy)
    monkeypatch.setattr(launch_backward, "seeds_with_mask", spy)
    gen = generator(38)
    seq_q, seq_kv = seq(18), 32  # 32 keys: rows of a contiguous mask are 16-element aligned
    q, k, v = qkv((B, H), (B, H), seq_q, seq_kv, 16, gen, torch.float16, device)
    if kind == "bool":
        values = random_bool_mask((B, H, seq_q, seq_kv), gen, device)
    else:
        values = random_float_mask((B, H, seq_q, seq_kv), gen, torch.float16, device)
    unaligned = torch.zeros((B, H, seq_q, seq_kv + 1), dtype=values.dtype, device=device)[..., :seq_kv]
    unaligned.copy_(values)  # the same values, rows 33 elements apart
    results = []
    for mask in (values, unaligned):
        chosen.clear()
        q_, k_, v_ = (t.clone().requires_grad_() for t in (q, k, v))
        out = run("triton", q_, k_, v_, attn_mask=mask)
        out.backward(torch.ones_like(out))
        results.append((out.detach(), q_.grad, k_.grad, v_.grad))
        assert chosen == [mask is unaligned] * 2, chosen  # forward and backward launches
    if not ON_CUDA:
        for name, plain, seeded in zip(("out", "dq", "dk", "dv"), *results):
            assert torch.equal(plain, seeded), name
        return
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, _ = oracle(*leaves, values)
    ref.backward(torch.ones_like(ref))
    expected = (ref, *(leaf.grad for leaf in leaves))
    for name, plain, seeded, ref in zip(("out", "dq", "dk", "dv"), *results, expected):
        close = assert_forward_close if name == "out" else assert_grad_close
        for path, got in (("plain", plain), ("seeded", seeded)):
            close(f"{name} ({path})", got, ref, None, torch.float16)
        # Reordered float32 sums round to the same float16 value almost everywhere: one float16 ulp (2**-10) at most.
        assert rel_err(seeded, plain) <= 2.0**-10, name
