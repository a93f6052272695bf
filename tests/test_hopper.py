"""The hopper backend: what it declines, and (on an sm_90 GPU) its forward and backward against float64.

Its Gluon kernels do not run under Triton's interpreter: on the CPU these
tests check only the reasons it gives; the kernels' accuracy is tested on an
H100/H200, where the suite runs with CUDA.
"""

from __future__ import annotations

import functools
import zlib

import pytest
import torch
import triton
import triton.language as tl

import flashsdpa
from flashsdpa import dispatch, gradient_precision
from flashsdpa.backends import hopper
from flashsdpa.backends.base import AttentionInputs
from flashsdpa.backends.hopper import backward_specs, launch_backward, variants
from flashsdpa.backends.triton.score_kernels import exp2_by_fma
from flashsdpa.descriptor import Alignment, AttentionDescriptor, GradientPrecision, MaskKind
from flashsdpa.dispatch import UnsupportedError
from flashsdpa.backends.base import poisoned_outputs
from helpers import (ON_CUDA, Case, assert_forward_close, assert_grad_close, assert_lse_close, check_backward,
                     check_forward, generator, oracle, qkv, randn)
from test_triton_variants import assert_matches_formula
from test_variants import leaves, oracle_of, problem, run_and_grads

ON_SM90 = ON_CUDA and torch.cuda.get_device_capability() == (9, 0)
sm90_only = pytest.mark.skipif(not ON_SM90, reason="the hopper kernels need an sm_90 GPU")


def describe(**fields) -> AttentionDescriptor:
    problem = dict(batch_shape=(2,), heads_q=4, heads_kv=2, seq_q=33, seq_kv=47, head_dim=128, head_dim_v=128,
                   dtype=torch.bfloat16, device_type="cuda")
    return AttentionDescriptor(**{**problem, **fields})


def test_declines_cpu_tensors_and_the_automatic_choice_passes_it_by():
    q = torch.randn(1, 2, 9, 64, dtype=torch.bfloat16)
    with pytest.raises(UnsupportedError, match="CUDA tensors only"):
        flashsdpa.attention(q, q, q, backend="hopper")
    assert "hopper" not in dispatch.AUTOMATIC_ORDER.get("cpu", dispatch.DEFAULT_ORDER)
    assert dispatch.AUTOMATIC_ORDER["cuda"][:2] == ("hopper", "triton")


def test_reasons_on_an_sm90_device(monkeypatch):
    """Asked about a CUDA device of capability 9.0 (no GPU needed): it takes the problems its kernel covers and
    names each thing it does not."""
    monkeypatch.setattr(hopper, "cuda_capability", lambda device: (9, 0))
    backend, device = dispatch.BACKENDS["hopper"], torch.device("cuda", 0)
    for head_dim in (64, 128, 256):
        for dtype in (torch.float16, torch.bfloat16):
            for causal in (False, True):
                desc = describe(head_dim=head_dim, head_dim_v=head_dim, dtype=dtype, causal=causal)
                assert backend.unsupported_reasons(desc, device) == []
    declined = {
        "float16 and bfloat16": describe(dtype=torch.float32),
        "head dims": describe(head_dim=80, head_dim_v=80),
        "equal for values": describe(head_dim_v=64),
        "no attention mask": describe(mask=MaskKind.BOOL, mask_dtype=torch.bool),
        "no dropout": describe(dropout_p=0.1),
    }
    for words, desc in declined.items():
        reasons = backend.unsupported_reasons(desc, device)
        assert len(reasons) == 1 and words in reasons[0], (words, reasons)
    taken = {  # every variant, alone and together: the backend checks them itself (capabilities as data)
        "window": describe(causal=True, window_left=16), "bottom-right alignment": describe(
            causal=True, alignment=Alignment.BOTTOM_RIGHT), "softcap": describe(softcap=30.0),
        "ALiBi": describe(alibi=True), "sinks": describe(sinks=True),
        "all": describe(causal=True, window_left=5, window_right=3, alignment=Alignment.BOTTOM_RIGHT, softcap=2.0,
                        alibi=True, sinks=True),
    }
    assert backend.checks_variants and set(variants.COMPUTED) == {name for name in taken if name != "all"}
    for name, desc in taken.items():
        assert desc.variants and dispatch.backend_reasons(backend, desc, device) == [], name
    for capability in ((8, 0), (8, 9), (10, 0), (12, 0)):  # wgmma is sm_90's alone
        monkeypatch.setattr(hopper, "cuda_capability", lambda device: capability)
        assert backend.unsupported_reasons(describe(), device) == [
            f"hopper kernels need compute capability 9.0, not {capability[0]}.{capability[1]}"]


def test_softcap_forward_choices_are_data(monkeypatch):
    """`variants.SOFTCAP_FORWARD` picks the forward kernel's tanh (compiled in as TANH) and the units its
    qk_scale takes; "triton" leaves the Gluon spec alone (no GPU needed)."""
    from flashsdpa.backends.hopper.forward_specs import LOG2E, SOFTCAP_KERNELS, HopperForwardSpec, forward_spec

    assert set(SOFTCAP_KERNELS) == set(variants.SOFTCAP_FORWARDS)

    softcap, alibi_too = variants.HopperVariants(softcap=True), variants.HopperVariants(softcap=True, alibi=True)
    monkeypatch.setitem(variants.SOFTCAP_FORWARD, 64, "precise")
    for choice in variants.SOFTCAP_FORWARDS:
        monkeypatch.setitem(variants.SOFTCAP_FORWARD, 128, choice)
        spec = forward_spec(128, softcap)
        assert spec.tanh == ("hardware" if choice.startswith("hardware") else "precise"), choice
        assert spec.exp2_by_fma == (choice == "hardware-fma"), choice
        assert forward_spec(128, variants.HopperVariants(bounded_above=True)).tanh == "precise"
        assert forward_spec(64, softcap).tanh == "precise"  # (the other head dims' entries stay)
        assert variants.softcap_forward(describe(softcap=30.0)) == choice
        assert variants.softcap_forward(describe()) is None
    # The factor to base-2 exponents: raw products, natural units, tanh's values (hardware tanh alone).
    plain = forward_spec(128, variants.HopperVariants())
    assert plain.qk_scale(0.125, 0.0) == 0.125 * LOG2E
    assert forward_spec(128, alibi_too).qk_scale(0.125, 30.0) == LOG2E
    hardware = HopperForwardSpec(128, softcap, block_n=128, stages=2, q_buffers=2, tanh="hardware")
    assert hardware.qk_scale(0.125, 30.0) == 30.0 * LOG2E
    assert HopperForwardSpec(128, alibi_too, 128, 2, 2, tanh="hardware").qk_scale(0.125, 30.0) == LOG2E
    with pytest.raises(ValueError, match="'precise' or 'hardware'"):
        HopperForwardSpec(128, softcap, 128, 2, 2, tanh="triton")
    with pytest.raises(ValueError, match="only for kernels with softcap"):
        HopperForwardSpec(128, variants.HopperVariants(), 128, 2, 2, tanh="hardware")


@pytest.mark.parametrize("head_dim", [64, 128])
def test_softcap_forward_on_triton_is_triton_s_forward(monkeypatch, device, head_dim):
    """SOFTCAP_FORWARD "triton": the hopper backend's forward is the triton backend's, bit for bit, recorded as
    a fallback, and its out and lse are what the Gluon backward reads (the Gluon forward's layouts: one
    allocation function; lse in natural log). Runs on the CPU too (triton interpreted): the choice is made
    before any Gluon launch."""
    from flashsdpa.backends import triton as triton_backend
    from flashsdpa.backends.hopper import launch_forward as hopper_launch
    from flashsdpa.backends.triton import launch_forward as triton_launch

    assert hopper_launch.allocate_outputs is triton_launch.allocate_outputs
    monkeypatch.setitem(variants.SOFTCAP_FORWARD, head_dim, "triton")
    gen = generator(29)
    q, k, v = qkv((1, 2), (1, 1), 33, 47, head_dim, gen, torch.float16, device)
    desc = describe(batch_shape=(1,), heads_q=2, heads_kv=1, head_dim=head_dim, head_dim_v=head_dim,
                    dtype=torch.float16, device_type=device, causal=True, softcap=5.0)
    inputs = AttentionInputs(q, k, v)
    dispatch.reset_stats()
    with poisoned_outputs():
        out, lse = hopper.HopperBackend().forward(desc, inputs)
    expected = chosen_forward_reasons("softcap", head_dim)
    assert len(expected) == 1 and dispatch.stats()["fallbacks"] == dict.fromkeys(expected, 1)
    theirs = triton_backend.TritonBackend().forward(desc, inputs)
    assert torch.equal(out, theirs[0]) and torch.equal(lse, theirs[1])
    assert out.shape == (1, 2, 33, head_dim) and out.dtype == torch.float16
    assert lse.shape == (1, 2, 33) and lse.dtype == torch.float32 and lse.is_contiguous()
    ref_out, ref_lse = oracle_of(q, k, v, dict(causal=True, softcap=5.0), "top_left")
    assert_forward_close("softcap forward on triton", out, ref_out, None, torch.float16, torch_ratio=False)
    assert_lse_close(lse, ref_lse, torch.float16)  # (natural log; the Gluon backward of this forward is tested
    # against float64 on the GPU: test_softcap_forwards_against_float64)


@triton.jit
def _exp2_by_fma_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    tl.store(y_ptr + offsets, exp2_by_fma(tl.load(x_ptr + offsets, mask=inside)), mask=inside)


def test_exp2_by_fma_against_float64(device):
    """The "hardware-fma" forward's exponentials (score_kernels.exp2_by_fma, a Triton helper: interpreted on the
    CPU) over the softmax's range: 2.3e-7 relative where 2^x is a normal float32, exactly 0 below 2^-126.5 and
    at -inf, NaN for NaN."""
    gen = generator(37)
    x = torch.cat([-130 * torch.rand(60_000, generator=gen), -2 * torch.rand(20_000, generator=gen),
                   torch.tensor([0.0, -0.0, -1e-30, -0.5, -1.5, -126.4, -126.6, -127.0, -1e4, float("-inf"),
                                 float("nan")])]).to(device)
    y = torch.full_like(x, 123.0)
    _exp2_by_fma_kernel[(triton.cdiv(x.numel(), 4096),)](x, y, x.numel(), BLOCK=4096)
    truth = torch.exp2(x.double())
    normal = truth >= torch.finfo(torch.float32).tiny
    assert ((y.double() - truth).abs() / truth)[normal].max().item() <= 2.5e-7
    assert (y.double() - truth)[~normal & ~x.isnan()].abs().max().item() <= 2 * torch.finfo(torch.float32).tiny
    assert y[x <= -126.6].eq(0).all() and y[x.isnan()].isnan().all()


# (Hq, Hkv, L, S): odd lengths cross the 128-row program tiles and the key blocks; L != S for causal alignment.
SHAPES = [(2, 2, 1, 1), (2, 2, 77, 300), (4, 2, 300, 77), (3, 1, 257, 513), (2, 2, 1024, 1024)]


@sm90_only
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_against_float64(head_dim, dtype, causal, shape):
    heads_q, heads_kv, seq_q, seq_kv = shape
    gen = generator(hash((head_dim, causal, shape)) % 2**31)
    q, k, v = qkv((2, heads_q), (2, heads_kv), seq_q, seq_kv, head_dim, gen, dtype, "cuda")
    dispatch.reset_stats()
    check_forward("hopper", Case(q, k, v, causal=causal, enable_gqa=heads_q != heads_kv),
                  f"d={head_dim} {dtype} causal={causal} {shape}")
    assert dispatch.stats()["calls"] == {"hopper": 1}


@sm90_only
def test_forward_reads_strided_views_and_scales():
    """(B, L, H, E) storage seen as (B, H, L, E), as models hand it over; a negative and a large scale."""
    gen = generator(7)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in qkv((2, 4), (2, 4), 301, 299, 128, gen,
                                                                          torch.bfloat16, "cuda"))
    for scale in (None, -0.2, 1.5):
        check_forward("hopper", Case(q, k, v, scale=scale), f"scale={scale}")


@sm90_only
def test_same_bits_every_call():
    gen = generator(3)
    q, k, v = qkv((2, 4), (2, 4), 513, 700, 128, gen, torch.bfloat16, "cuda")
    first = flashsdpa.attention(q, k, v, causal=True, backend="hopper")
    for _ in range(3):
        assert torch.equal(flashsdpa.attention(q, k, v, causal=True, backend="hopper"), first)


@sm90_only
@pytest.mark.parametrize("causal", [False, True])
def test_chosen_automatically_with_a_backward(causal):
    """bf16 d=128 on sm_90 goes to hopper with no fallback; the backward (Gluon, or triton's where torch's is
    EXACT) takes its out and lse (held to the dtype's bar: the 1.5x-torch rule is in the backward tests)."""
    gen = generator(11)
    q, k, v = (t.requires_grad_() for t in qkv((2, 4), (2, 2), 300, 411, 128, gen, torch.bfloat16, "cuda"))
    dispatch.reset_stats()
    with poisoned_outputs():
        out = flashsdpa.attention(q, k, v, causal=causal, enable_gqa=True)
    assert dispatch.stats() == {"calls": {"hopper": 1}, "fallbacks": {}}
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_out, _ = oracle(q, k, v, causal=causal, enable_gqa=True)
    ref_grads = torch.autograd.grad(ref_out, (q, k, v), grad_out.double())
    for name, got, ref in zip("qkv", grads, ref_grads):
        assert_grad_close(f"d{name}", got, ref, None, torch.bfloat16)


@sm90_only
def test_views_tma_cannot_read_run_triton_with_a_recorded_reason():
    """A query starting one element into its storage is not 16-byte aligned: triton's forward serves it."""
    gen = generator(5)
    q, k, v = qkv((2, 4), (2, 4), 200, 300, 64, gen, torch.float16, "cuda")
    q = torch.cat([q, q[..., :1]], dim=-1)[..., 1:]  # (the same shape, an odd row stride and offset)
    dispatch.reset_stats()
    check_forward("hopper", Case(q, k, v, causal=True), "unaligned query")
    stats = dispatch.stats()
    assert stats["calls"] == {"hopper": 1}
    assert [reason for reason in stats["fallbacks"] if "TMA" in reason], stats


@pytest.fixture
def gluon_backward(monkeypatch):
    """The Gluon backward at every head dim its kernels cover (whatever the measured table enables)."""
    monkeypatch.setattr(backward_specs, "GLUON_BACKWARD_HEAD_DIMS", backward_specs.BACKWARD_HEAD_DIMS)


def test_gluon_backward_reasons(gluon_backward):
    """What the Gluon backward leaves to triton's (no GPU needed: the reasons read shapes and strides)."""
    def reasons(head_dim=128, seq_kv=47, scale=None, grad_out_offset=0, gradients=GradientPrecision.ROUNDED):
        q = torch.randn(2, 4, 33, head_dim, dtype=torch.bfloat16)
        k = v = torch.randn(2, 2, seq_kv, head_dim, dtype=torch.bfloat16)
        grad_out = torch.randn(2, 4, 33, head_dim + grad_out_offset, dtype=torch.bfloat16)[..., grad_out_offset:]
        desc = describe(head_dim=head_dim, head_dim_v=head_dim, seq_kv=seq_kv, gradients=gradients,
                        **({} if scale is None else dict(scale=scale)))
        return hopper.gluon_backward_reasons(desc, AttentionInputs(q, k, v), grad_out)

    assert reasons() == [] and reasons(head_dim=64) == []
    assert reasons(head_dim=256) == ["the Gluon backward takes head dims (64, 128), not 256"]
    assert reasons(scale=0.0) == ["the Gluon backward takes a nonzero scale"]
    assert "float32-internal one (EXACT)" in reasons(gradients=GradientPrecision.EXACT)[0]
    assert "one key" in reasons(seq_kv=1)[0]
    assert reasons(grad_out_offset=1) == ["q, k, v or dO strides or alignment are not TMA-readable"]
    for head_dim, taken in variants.BACKWARD_COMPUTED.items():  # the variants, as the table says
        for name, fields in (("window", dict(window_left=8)), ("softcap", dict(softcap=5.0)),
                             ("ALiBi", dict(alibi=True)), ("sinks", dict(sinks=True))):
            q = torch.randn(2, 4, 33, head_dim, dtype=torch.bfloat16)
            k = torch.randn(2, 2, 47, head_dim, dtype=torch.bfloat16)
            desc = describe(head_dim=head_dim, head_dim_v=head_dim, gradients=GradientPrecision.ROUNDED, **fields)
            got = hopper.gluon_backward_reasons(desc, AttentionInputs(q, k, k), q)
            assert got == ([] if name in taken else
                           [f"the Gluon backward does not compute {name} at head dim {head_dim}"]), (name, got)
    backward_specs.GLUON_BACKWARD_HEAD_DIMS = (64,)  # (the fixture restores it)
    assert reasons() == ["triton's backward is the faster at head dim 128 (backward_specs)"]


BACKWARD_SHAPES = [(2, 2, 77, 300), (4, 2, 300, 77), (3, 1, 257, 513), (2, 2, 1024, 1024)]


def check_gluon_backward(monkeypatch, case: Case, what: str, gen) -> None:
    """The 1.5x-torch rule on whichever backward the backend picks; where that is triton's (torch's backward
    here is its float32-internal one), the Gluon kernels again, pinned to ROUNDED, at the dtype's bar."""
    dispatch.reset_stats()
    check_backward("hopper", case, what, gen=gen)
    fallbacks = dispatch.stats()["fallbacks"]
    assert all("EXACT" in reason for reason in fallbacks), fallbacks
    if fallbacks:
        monkeypatch.setattr(gradient_precision, "pinned", GradientPrecision.ROUNDED)
        dispatch.reset_stats()
        check_backward("hopper", case, f"{what} (rounded)", gen=gen, check_torch=False)
        assert dispatch.stats()["fallbacks"] == {}
        monkeypatch.setattr(gradient_precision, "pinned", None)


@sm90_only
@pytest.mark.parametrize("head_dim", backward_specs.BACKWARD_HEAD_DIMS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", BACKWARD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gluon_backward_against_float64(gluon_backward, monkeypatch, head_dim, dtype, causal, shape):
    heads_q, heads_kv, seq_q, seq_kv = shape
    gen = generator(zlib.crc32(repr((head_dim, causal, shape, "backward")).encode()))
    q, k, v = qkv((2, heads_q), (2, heads_kv), seq_q, seq_kv, head_dim, gen, dtype, "cuda")
    check_gluon_backward(monkeypatch, Case(q, k, v, causal=causal, enable_gqa=heads_q != heads_kv),
                         f"d={head_dim} {dtype} causal={causal} {shape}", gen)


@sm90_only
def test_gluon_backward_of_strided_views_and_scales(gluon_backward, monkeypatch):
    """(B, L, H, E) storage seen as (B, H, L, E); a negative and a large scale."""
    gen = generator(17)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in qkv((2, 4), (2, 2), 301, 299, 128, gen,
                                                                          torch.bfloat16, "cuda"))
    for scale in (-0.2, 1.5):
        check_gluon_backward(monkeypatch, Case(q, k, v, scale=scale, causal=True, enable_gqa=True),
                             f"scale={scale}", gen)


@sm90_only
@pytest.mark.parametrize("head_dim,heads_kv,variant", [
    (64, 8, {}), (128, 4, dict(window=(200, None), softcap=20.0, enable_gqa=True)),
])
def test_gluon_backward_same_bits_every_call(gluon_backward, monkeypatch, head_dim, heads_kv, variant):
    # Rounded 16-bit gradients pinned: for GQA with causal L != S torch runs neither fused kernel, so the automatic
    # choice is EXACT, which the Gluon backward declines (to triton's).
    monkeypatch.setattr(gradient_precision, "pinned", GradientPrecision.ROUNDED)
    gen = generator(23)
    q, k, v = (t.requires_grad_() for t in qkv((2, 8), (2, heads_kv), 700, 513, head_dim, gen, torch.bfloat16,
                                               "cuda"))
    grad_out = randn((2, 8, 700, head_dim), gen, torch.bfloat16, "cuda")

    def gradients():
        out = flashsdpa.attention(q, k, v, causal=True, backend="hopper", **variant)
        return out, *torch.autograd.grad(out, (q, k, v), grad_out)

    dispatch.reset_stats()
    first = gradients()
    assert dispatch.stats()["fallbacks"] == {}, dispatch.stats()
    for _ in range(3):
        assert all(torch.equal(a, b) for a, b in zip(gradients(), first))


# The variants on the GPU: each against the float64 formula (test_triton_variants' check, with the hopper backend
# pinned and head dims its kernels take). Windows of tens of keys over a few hundred, so that tiles see whole blocks
# and edge blocks; L > S bottom-right puts the first queries before key 0 (rows that see no key: out 0, lse -inf).
HOPPER_VARIANTS = {
    "causal_window": dict(causal=True, window=(70, None)),
    "window": dict(window=(90, 40)),
    "window_right": dict(window=(None, 33)),
    "causal": dict(causal=True),
    "softcap": dict(softcap=1.5),
    "alibi": dict(alibi="batch"),
    "sinks": dict(sinks=True),
    "all": dict(causal=True, window=(100, 5), softcap=2.0, alibi="heads", sinks=True),
    # Gemma 2's softcap with scores spread over its whole curve (scale 1: scores of sd ~ sqrt(d), up to ~4 sd).
    "softcap_steep": dict(softcap=30.0, scale=1.0, causal=True),
}
VARIANT_SHAPES = (((300, 517), "top_left"), ((517, 300), "bottom_right"), ((129, 700), "bottom_right"))


def check_hopper_variant(name, seq_q, seq_kv, alignment, head_dim, dtype, seed=0):
    gen = generator(seed)
    dims = (2, 4, 2, head_dim, head_dim)
    q, k, v, options = problem(HOPPER_VARIANTS[name], seq_q, seq_kv, dtype, gen, dims=dims, device="cuda")
    tensors = leaves(q, k, v, options)
    grad_out = randn((2, 4, seq_q, head_dim), gen, dtype, "cuda")
    dispatch.reset_stats()
    with poisoned_outputs():
        ours = run_and_grads(
            lambda: flashsdpa.attention(q, k, v, causal_alignment=alignment, backend="hopper", return_lse=True,
                                        **options),
            tensors, grad_out,
        )  # fmt: skip
    fallbacks = dispatch.stats()["fallbacks"]
    truth = run_and_grads(lambda: oracle_of(q, k, v, options, alignment), tensors, grad_out)
    theirs = run_and_grads(lambda: oracle_of(q, k, v, options, alignment, dtype=dtype), tensors, grad_out)
    what = f"hopper {name} L={seq_q} S={seq_kv} {alignment} d={head_dim} {dtype} (fallbacks {fallbacks})"
    assert_matches_formula(what, ours, truth, theirs, options, grad_out, dtype)
    return fallbacks


def chosen_forward_reasons(name: str, head_dim: int) -> set[str]:
    """The fallback a variant's forward records by choice (`variants.SOFTCAP_FORWARD` "triton"), else none."""
    if "softcap" in HOPPER_VARIANTS[name] and variants.SOFTCAP_FORWARD[head_dim] == "triton":
        return {f"hopper: softcap's forward at head dim {head_dim} is triton's (hopper.variants.SOFTCAP_FORWARD); "
                "ran triton"}
    return set()


@sm90_only
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("name", list(HOPPER_VARIANTS))
def test_variants_against_float64(gluon_backward, monkeypatch, name, head_dim):
    """Forward and Gluon backward (pinned ROUNDED: torch has no variants to ask) of each variant and alignment."""
    monkeypatch.setattr(gradient_precision, "pinned", GradientPrecision.ROUNDED)
    for number, ((seq_q, seq_kv), alignment) in enumerate(VARIANT_SHAPES):
        fallbacks = check_hopper_variant(name, seq_q, seq_kv, alignment, head_dim, torch.bfloat16, seed=number)
        fallbacks = set(fallbacks) - chosen_forward_reasons(name, head_dim)
        if name in ("alibi", "all") and "ALiBi" not in variants.BACKWARD_COMPUTED[head_dim]:
            assert all("does not compute" in reason for reason in fallbacks), fallbacks
        else:
            assert fallbacks == set(), fallbacks
    check_hopper_variant(name, 300, 517, "bottom_right", head_dim, torch.float16, seed=7)


@sm90_only
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("choice", variants.SOFTCAP_FORWARDS)
def test_softcap_forwards_against_float64(gluon_backward, monkeypatch, choice, head_dim):
    """Each of `variants.SOFTCAP_FORWARD`'s choices, forward and the Gluon backward of its out and lse, with
    softcap alone, steep, and with every other variant; the hardware tanh gives the same bits every call."""
    monkeypatch.setattr(gradient_precision, "pinned", GradientPrecision.ROUNDED)
    monkeypatch.setitem(variants.SOFTCAP_FORWARD, head_dim, choice)
    for name in ("softcap", "softcap_steep", "all"):
        for number, ((seq_q, seq_kv), alignment) in enumerate(VARIANT_SHAPES):
            fallbacks = check_hopper_variant(name, seq_q, seq_kv, alignment, head_dim, torch.bfloat16, seed=number)
            assert set(fallbacks) == chosen_forward_reasons(name, head_dim), fallbacks
    gen = generator(31)
    q, k, v = qkv((2, 8), (2, 2), 700, 513, head_dim, gen, torch.bfloat16, "cuda")
    first = flashsdpa.attention(q, k, v, causal=True, softcap=30.0, enable_gqa=True, backend="hopper")
    for _ in range(3):
        again = flashsdpa.attention(q, k, v, causal=True, softcap=30.0, enable_gqa=True, backend="hopper")
        assert torch.equal(again, first)


@sm90_only
@pytest.mark.parametrize("name", ["causal_window", "all"])
def test_variants_forward_at_head_dim_256(name):
    """d=256: the forward's one-Q-buffer tiles (its backward is triton's)."""
    for number, ((seq_q, seq_kv), alignment) in enumerate(VARIANT_SHAPES):
        check_hopper_variant(name, seq_q, seq_kv, alignment, 256, torch.bfloat16, seed=number)


def test_backward_specs_and_candidates_are_whole_specs():
    """Every candidate names fields of the spec (a misspelt field fails here, not on the GPU) and changes
    something at a head dim the kernels take; the shipped table covers those head dims."""
    assert set(backward_specs.SPECS) == set(backward_specs.BACKWARD_HEAD_DIMS)
    for name, changes in backward_specs.CANDIDATES.items():
        assert set(changes) <= set(backward_specs.BACKWARD_HEAD_DIMS), name
        assert any(backward_specs.backward_spec(d, name) != backward_specs.SPECS[d] for d in changes), name


@pytest.fixture(params=list(backward_specs.CANDIDATES))
def backward_candidate(request, monkeypatch, gluon_backward):
    """The Gluon backward built with one of the candidate specs (scripts/bench_hopper_backward_gpu.py times them)."""
    monkeypatch.setattr(launch_backward, "backward_spec",
                        functools.partial(backward_specs.backward_spec, candidate=request.param))
    return request.param


@sm90_only
@pytest.mark.parametrize("head_dim", backward_specs.BACKWARD_HEAD_DIMS)
def test_backward_candidates_against_float64(backward_candidate, monkeypatch, head_dim):
    """Each candidate spec: causal GQA with partial blocks at the 1.5x-torch rule, the same not causal with several
    tiles a persistent program, and every variant together against the float64 formula (both alignments), as the
    shipped spec is tested above."""
    gen = generator(zlib.crc32(repr((head_dim, backward_candidate)).encode()))  # (hash(str) varies by process)
    q, k, v = qkv((2, 4), (2, 2), 257, 513, head_dim, gen, torch.bfloat16, "cuda")
    check_gluon_backward(monkeypatch, Case(q, k, v, causal=True, enable_gqa=True),
                         f"{backward_candidate} d={head_dim}", gen)
    # Not causal, as if the GPU had 3 SMs: a persistent kernel's programs take 8 tiles each (24 of each kernel).
    monkeypatch.setattr(launch_backward, "sm_count", lambda device: 3)
    q, k, v = qkv((2, 4), (2, 2), 300, 700, head_dim, gen, torch.bfloat16, "cuda")
    check_gluon_backward(monkeypatch, Case(q, k, v, enable_gqa=True), f"{backward_candidate} d={head_dim} 3 SMs", gen)
    monkeypatch.setattr(gradient_precision, "pinned", GradientPrecision.ROUNDED)
    for number, ((seq_q, seq_kv), alignment) in enumerate(VARIANT_SHAPES[:2]):
        assert check_hopper_variant("all", seq_q, seq_kv, alignment, head_dim, torch.bfloat16, seed=number) == {}
