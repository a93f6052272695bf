"""Drop-in conformance: what a torch user relies on keeps working under `flashsdpa.enable()` (issue 18).

Each test is one defect PyTorch's own SDPA suite (test/test_transformers.py, see
scripts/torch_conformance.py) found: a silently wrong `CausalBias` result, TorchScript
failing on the patched function, batched gradients and forward-mode AD, empty
shapes, `sdpa_kernel`, and the edge values torch accepts or rejects.
"""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right, causal_upper_left
from torch.overrides import TorchFunctionMode

import flashsdpa
from flashsdpa.backends.base import poisoned_outputs
from helpers import assert_forward_close, assert_grad_close, generator, oracle, rel_err


def assert_ran_on_flashsdpa(calls: int | None = None):
    """Every call ran on a flashsdpa backend (whichever the automatic choice took), none on torch."""
    counted = flashsdpa.stats()["calls"]
    assert counted and "torch" not in counted, counted
    if calls is not None:
        assert sum(counted.values()) == calls, counted


def qkv(shape_q, shape_kv, gen, dtype=torch.float32, requires_grad=False):
    q = torch.randn(shape_q, generator=gen, dtype=dtype)
    k = torch.randn(shape_kv, generator=gen, dtype=dtype)
    v = torch.randn(shape_kv, generator=gen, dtype=dtype)
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))


@pytest.fixture
def enabled():
    flashsdpa.enable()
    try:
        yield
    finally:
        flashsdpa.disable()


# ---- torch.nn.attention.bias.CausalBias ------------------------------------------


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("variant", ["upper_left", "lower_right"])
@pytest.mark.parametrize("lengths", [(5, 9), (9, 5), (6, 6)], ids=["L<S", "L>S", "L=S"])
def test_causal_bias_runs_as_its_alignment(lengths, variant, compiled, enabled, monkeypatch):
    """`causal_upper_left(L, S)` runs on flashsdpa as is_causal, `causal_lower_right(L, S)` as bottom-right
    alignment (no mask materialised), eager and compiled; forward and gradients against float64, within
    torch's own float32 error. With L > S lower right, the first L - S rows see no key: zeros, as torch."""
    L, S = lengths
    q, k, v = qkv((2, 3, L, 16), (2, 3, S, 16), generator(180 + L), requires_grad=True)
    grad_out = torch.randn(2, 3, L, 16, generator=generator(190 + S))
    make = causal_upper_left if variant == "upper_left" else causal_lower_right
    visible = torch.ones(L, S, dtype=torch.bool).tril(0 if variant == "upper_left" else S - L)
    with warnings.catch_warnings():  # causal_lower_right(L > S) warns of NaN rows; torch gives zeros there
        warnings.simplefilter("ignore")
        bias = make(L, S)
    ran = []  # (mask, causal, alignment) of each call flashsdpa ran (constants: compiled code records them too)
    run = flashsdpa.api.run
    monkeypatch.setattr(
        flashsdpa.api, "run",
        lambda call, *a: ran.append((call.canon.mask, call.options.causal, call.options.alignment)) or run(call, *a),
    )  # fmt: skip

    def forward_and_grads(q, k, v):
        call = lambda a, b, c, m: F.scaled_dot_product_attention(a, b, c, attn_mask=m)  # noqa: E731 (F read per call)
        if compiled:
            torch._dynamo.reset()
            call = torch.compile(call, fullgraph=True, backend="aot_eager")
        out = call(q, k, v, bias)
        return (out, *torch.autograd.grad(out, (q, k, v), grad_out))

    with poisoned_outputs():
        got = forward_and_grads(q, k, v)
    alignment = "bottom_right" if variant == "lower_right" and L != S else "top_left"
    assert ran == [(None, True, alignment)], ran
    assert_ran_on_flashsdpa(calls=1)
    with flashsdpa.sdpa(enabled=False):  # patched, switched off in this thread: torch's own CausalBias path
        torch_results = forward_and_grads(q, k, v)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out, _ = oracle(q64, k64, v64, attn_mask=visible)
    refs = (ref_out, *torch.autograd.grad(ref_out, (q64, k64, v64), grad_out.double()))
    for what, g, r, t in zip(("out", "dq", "dk", "dv"), got, refs, torch_results):
        assert torch.isfinite(g).all(), what
        assert rel_err(t, r) < 1e-5, f"torch's own {what} (flashsdpa switched off in the thread)"
        check = assert_forward_close if what == "out" else assert_grad_close
        check(f"{variant} L={L} S={S} {what}", g, r, t, torch.float32)
    if L > S and variant == "lower_right":
        assert torch.equal(got[0][..., : L - S, :], torch.zeros_like(got[0][..., : L - S, :]))
        assert torch.equal(got[0][..., : L - S, :], torch_results[0][..., : L - S, :])


def test_a_torch_function_mode_sees_a_causal_bias_call_first(enabled):
    """Under a TorchFunctionMode the mode sees the call (with the CausalBias) as torch's function would let it;
    the mode's own call then runs on flashsdpa as bottom-right alignment."""
    L, S = 4, 7
    q, k, v = qkv((1, 2, L, 8), (1, 2, S, 8), generator(195))
    seen = []

    class SeesSdpa(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.scaled_dot_product_attention:
                seen.append(type(kwargs["attn_mask"]).__name__)
            return func(*args, **kwargs)

    with SeesSdpa():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(L, S))
    assert seen == ["CausalBias"]
    ref, _ = oracle(q, k, v, attn_mask=torch.ones(L, S, dtype=torch.bool).tril(S - L))
    assert rel_err(out, ref) < 1e-6
    assert_ran_on_flashsdpa(calls=1)


# ---- TorchScript ------------------------------------------------------------------


def test_torchscript_of_torch_modules_with_enable_and_after_disable():
    """TorchScript compiles `F.multi_head_attention_forward`, which calls the patched name: it sees torch's
    operator (not a Python function of *args), and scripting still works once flashsdpa is disabled."""
    torch.manual_seed(181)
    x = torch.randn(3, 5, 16)
    flashsdpa.enable()
    try:
        for module in (
            nn.MultiheadAttention(16, 4, batch_first=True),
            nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True),
            nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, 0.0, batch_first=True), 2,
                                  enable_nested_tensor=False),
            nn.Transformer(16, 4, 1, 1, 32, dropout=0.0, batch_first=True),
        ):  # fmt: skip
            args = (x, x, x) if isinstance(module, nn.MultiheadAttention) else (x, x) if isinstance(
                module, nn.Transformer) else (x,)  # fmt: skip
            scripted = torch.jit.script(module)
            assert rel_err(scripted(*args)[0] if isinstance(module, nn.MultiheadAttention) else scripted(*args),
                           module(*args)[0] if isinstance(module, nn.MultiheadAttention) else module(*args)) < 1e-5
    finally:
        flashsdpa.disable()
    torch.jit.script(nn.MultiheadAttention(16, 2))
    torch.jit.script(nn.TransformerEncoderLayer(16, 2, 32))


# ---- batched gradients and forward-mode AD ----------------------------------------


@pytest.mark.parametrize("how", ["enable", "direct"])
def test_batched_gradients(how):
    """gradcheck(check_batched_grad=True) runs the backward under torch's legacy vmap (batched grad_out)."""
    q, k, v = qkv((1, 2, 3, 4), (1, 2, 5, 4), generator(182), torch.float64, requires_grad=True)
    mask = torch.rand(3, 5, generator=generator(183), dtype=torch.float64).requires_grad_()
    if how == "direct":
        fn = lambda a, b, c, m: flashsdpa.scaled_dot_product_attention(a, b, c, attn_mask=m)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (q, k, v, mask), check_batched_grad=True)
        return
    with flashsdpa.sdpa():
        fn = lambda a, b, c, m: F.scaled_dot_product_attention(a, b, c, attn_mask=m)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (q, k, v, mask), check_batched_grad=True)
    assert_ran_on_flashsdpa()


@pytest.mark.parametrize("vmap", ["is_grads_batched", "torch.func.vmap"])
def test_vmap_over_a_backward_matches_torch(vmap, enabled):
    q, k, v = qkv((2, 3, 6, 8), (2, 3, 7, 8), generator(184), requires_grad=True)
    grad_outs = torch.randn(4, 2, 3, 6, 8, generator=generator(185))

    def batched_grads(out):
        if vmap == "is_grads_batched":  # torch's legacy vmap
            return torch.autograd.grad(out, (q, k, v), grad_outs, is_grads_batched=True)
        with warnings.catch_warnings():  # "performance drop": no batching rule (torch's own backward has none)
            warnings.simplefilter("ignore")
            return torch.func.vmap(lambda g: torch.autograd.grad(out, (q, k, v), g, retain_graph=True))(grad_outs)

    got = batched_grads(F.scaled_dot_product_attention(q, k, v, is_causal=True))
    with flashsdpa.sdpa(enabled=False):
        ref = batched_grads(F.scaled_dot_product_attention(q, k, v, is_causal=True))
    for g, r in zip(got, ref):
        assert g.shape == r.shape and rel_err(g, r) < 1e-5
    assert_ran_on_flashsdpa(calls=1)


def test_forward_mode_ad_is_declined_never_dropped():
    """flashsdpa's ops have no forward-mode rule: the drop-in leaves dual tensors to torch (its result or
    its error), and the direct API raises; a lost tangent (zeros, or None) would be silently wrong."""
    q, k, v = qkv((1, 2, 3, 4), (1, 2, 5, 4), generator(186), torch.float64)
    tangent = torch.randn_like(q)

    def tangent_of(fn):
        with forward_ad.dual_level():
            return forward_ad.unpack_dual(fn(forward_ad.make_dual(q, tangent), k, v)).tangent

    with sdpa_kernel([SDPBackend.MATH]):  # torch's math path has a forward-mode rule
        ref = tangent_of(F.scaled_dot_product_attention)
    with flashsdpa.sdpa(), sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
        try:
            torch_error = None
            torch_tangent = tangent_of(torch.ops.aten.scaled_dot_product_attention)
        except NotImplementedError as error:  # torch's CPU flash kernel has none: it raises
            torch_error = str(error)
        if torch_error is None:
            assert rel_err(tangent_of(F.scaled_dot_product_attention), torch_tangent) < 1e-12
        else:
            with pytest.raises(NotImplementedError) as error:
                tangent_of(F.scaled_dot_product_attention)
            assert str(error.value) == torch_error
    assert flashsdpa.stats()["fallbacks"] == {"forward-mode AD (dual tensors, jvp) is not supported": 1}
    assert ref is not None and ref.abs().max() > 0
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        tangent_of(flashsdpa.scaled_dot_product_attention)
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jvp(lambda a: flashsdpa.attention(a, k, v), (q,), (tangent,))


# ---- empty shapes -----------------------------------------------------------------

_TORCH_BEFORE_2_13 = tuple(int(part) for part in torch.__version__.split(".")[:2]) < (2, 13)


def _forward_and_grads(fn, q, k, v, **options):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **options)
    return (out, *torch.autograd.grad(out.sum(), (q, k, v)))


@pytest.mark.parametrize("how", ["enable", "direct"])
def test_every_empty_shape_gives_torch_s_result(how):
    """Zero batch, heads, query or key length, or head dims: torch's output and gradients (zeros, or empty)."""
    gen = generator(187)
    sizes = {"B": (0, 2), "H": (0, 3), "L": (0, 4), "S": (0, 5), "E": (0, 6), "Ev": (0, 7)}
    checked = 0
    for B, H, L, S, E, Ev in itertools.product(*sizes.values()):
        if 0 not in (B, H, L, S, E, Ev):
            continue
        if H == 0 and L and S and E == 0 and Ev == 0 and _TORCH_BEFORE_2_13:
            # torch 2.11's own CPU SDPA dies of SIGFPE on these shapes (every option): nothing to compare against
            checked += 3
            continue
        q, k = torch.randn(B, H, L, E, generator=gen), torch.randn(B, H, S, E, generator=gen)
        v = torch.randn(B, H, S, Ev, generator=gen)
        for options in ({}, {"is_causal": True}, {"attn_mask": torch.ones(L, S, dtype=torch.bool)}):
            ref = _forward_and_grads(F.scaled_dot_product_attention, q, k, v, **options)
            if how == "enable":
                with flashsdpa.sdpa(strict=True):
                    got = _forward_and_grads(F.scaled_dot_product_attention, q, k, v, **options)
            else:
                got = _forward_and_grads(flashsdpa.scaled_dot_product_attention, q, k, v, **options)
            for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
                assert g.shape == r.shape and g.dtype == r.dtype, ((B, H, L, S, E, Ev), options, name)
                torch.testing.assert_close(g, r, msg=lambda m: f"{(B, H, L, S, E, Ev)} {options} {name}: {m}")
            checked += 1
    assert checked == 3 * (2**6 - 1)


# ---- torch.nn.attention.sdpa_kernel -----------------------------------------------


def test_sdpa_kernel_without_fused_backends_gets_torch_s_math(enabled):
    """Restricting torch to MATH asks for torch's math path: the call goes to torch, with the reason in stats."""
    q, k, v = qkv((2, 3, 9, 16), (2, 3, 11, 16), generator(188))
    with sdpa_kernel([SDPBackend.MATH]):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        with flashsdpa.sdpa(enabled=False):
            ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.equal(out, ref)
    from flashsdpa.integrations.sdpa import MATH_ONLY_REASON

    assert flashsdpa.stats() == {"calls": {"torch": 1}, "fallbacks": {MATH_ONLY_REASON: 1}}
    flashsdpa.reset_stats()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):  # a fused backend allowed: flashsdpa runs
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert_ran_on_flashsdpa(calls=1)


# ---- edge values of the direct API -------------------------------------------------


def test_edge_values_torch_accepts():
    q, k, v = qkv((2, 3, 5, 8), (2, 3, 6, 8), generator(189), requires_grad=True)
    # a 0-d tensor scale is its value
    out = flashsdpa.scaled_dot_product_attention(q, k, v, scale=torch.tensor(0.3))
    assert torch.equal(out, flashsdpa.scaled_dot_product_attention(q, k, v, scale=0.3))
    # dropout_p = 1 drops every weight: zeros, and zero gradients, as torch gives
    with poisoned_outputs():
        out, lse = flashsdpa.attention(q, k, v, dropout_p=1.0, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(lse, flashsdpa.attention(q, k, v, return_lse=True)[1]), "lse is taken before dropout"
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    # a non-finite scale makes every score non-finite: NaN everywhere, as torch's math backend gives
    for scale in (math.nan, math.inf, -math.inf):
        out = flashsdpa.scaled_dot_product_attention(q, k, v, scale=scale)
        with sdpa_kernel([SDPBackend.MATH]):
            ref = F.scaled_dot_product_attention(q, k, v, scale=scale)
        assert out.isnan().all() and ref.isnan().all(), scale


def test_edge_values_torch_rejects():
    q, k, v = qkv((2, 3, 5, 8), (2, 3, 6, 8), generator(190))
    mask = torch.ones(6, dtype=torch.bool)
    with pytest.raises(IndexError):  # torch's own error (its dispatch cannot take a 1-D mask)
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with pytest.raises(ValueError, match=r"attn_mask must have at least 2 dims .*\(6,\)"):
        flashsdpa.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with flashsdpa.sdpa(), pytest.raises(IndexError):
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_where_torch_is_wrong_flashsdpa_keeps_its_answer():
    """torch's CPU kernel gives NaN for causal attention at a scale <= 0 (README, Conformance)."""
    q, k, v = qkv((1, 2, 6, 8), (1, 2, 6, 8), generator(191))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = flashsdpa.scaled_dot_product_attention(q, k, v, is_causal=True, scale=-0.5)
    ref, _ = oracle(q.double(), k.double(), v.double(), causal=True, scale=-0.5)
    assert rel_err(out, ref) < 2e-6
