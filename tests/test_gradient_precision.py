"""The triton backward's two 16-bit precisions, and the choice between them (gradient_precision.py).

On a GPU the default follows torch: ROUNDED (FA2's arithmetic) where torch's
own fused kernels would run, EXACT where torch would fall back to its
float32-internal math. The rest of the suite runs whatever that choice gives
(EXACT on the CPU interpreter, where torch's CPU kernels are float32-internal),
so ROUNDED is pinned here to test it on the CPU too.
"""

from __future__ import annotations

import pytest
import torch

from flashsdpa.backends.base import AttentionInputs
from flashsdpa.backends.triton import gradient_precision
from flashsdpa.backends.triton.gradient_precision import GradientPrecision
from flashsdpa.api import prepare
from helpers import HALF_DTYPES, ON_CUDA, Case, check_backward, generator, qkv, random_bool_mask, seq


@pytest.fixture
def pin_precision(monkeypatch):
    def pin(precision: GradientPrecision | None) -> None:
        monkeypatch.setattr(gradient_precision, "pinned", precision)

    return pin


def _problem(dtype, device, **options):
    gen = generator(71)
    q, k, v = qkv((1, 4), (1, 2), seq(19), seq(23), 32, gen, dtype, device)
    return Case(q, k, v, enable_gqa=True, **options), gen


def _descriptor_and_inputs(case: Case):
    """What a backend's backward is given for `case`: its descriptor and canonical (B, H, L, E) inputs."""
    call = prepare(case.q, case.k, case.v, case.causal, case.scale, case.attn_mask, 0.0, case.enable_gqa, None, "ieee")
    canon = call.canon
    return call.describe(), AttentionInputs(canon.query, canon.key, canon.value, canon.mask)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("options", [{}, {"causal": True}, {"mask": True}], ids=["plain", "causal", "bool mask"])
def test_rounded_gradients_are_close_to_exact(dtype, options, device, pin_precision):
    """ROUNDED gradients meet the dtype's bar and stay within 3x EXACT's error on the same problem
    (on the H100 FA2-style gradients measured 1.6-2.6x the float32-internal error EXACT matches)."""
    case, gen = _problem(dtype, device, causal=options.get("causal", False))
    if options.get("mask"):
        case.attn_mask = random_bool_mask((1, 1, case.q.shape[-2], case.k.shape[-2]), gen, device)
    grad_out = torch.randn(case.q.shape, generator=gen).to(dtype).to(device)
    errors = {}
    grads = {}
    for precision in GradientPrecision:
        pin_precision(precision)
        grads[precision] = check_backward("triton", case, precision.value, grad_out=grad_out, check_torch=False)
        errors[precision] = _errors_against_float64(case, grads[precision], grad_out)
    for name, rounded, exact in zip("qkv", errors[GradientPrecision.ROUNDED], errors[GradientPrecision.EXACT]):
        assert rounded <= 3.0 * exact, f"d{name}: ROUNDED error {rounded:.3g} over 3x EXACT's {exact:.3g}"
    # The pin reached the kernels: the two precisions are different arithmetic.
    assert any(
        not torch.equal(a, b) for a, b in zip(grads[GradientPrecision.ROUNDED][:3], grads[GradientPrecision.EXACT][:3])
    )


def _errors_against_float64(case: Case, grads, grad_out) -> list[float]:
    from helpers import oracle, rel_err

    leaves = [t.detach().double().requires_grad_() for t in (case.q, case.k, case.v)]
    out, _ = oracle(*leaves, case.attn_mask, case.causal, case.scale, case.enable_gqa)
    out.backward(grad_out.double())
    return [rel_err(g, leaf.grad) for g, leaf in zip(grads[:3], leaves)]


def test_float32_is_always_exact(device, monkeypatch):
    monkeypatch.setattr(gradient_precision, "torch_runs_fused_kernel", lambda desc, inputs: True)
    case, _ = _problem(torch.float32, device)
    assert gradient_precision.matching_torch(*_descriptor_and_inputs(case)) is GradientPrecision.EXACT


@pytest.mark.parametrize("fused", [True, False])
def test_half_precision_follows_torch(fused, device, monkeypatch):
    monkeypatch.setattr(gradient_precision, "torch_runs_fused_kernel", lambda desc, inputs: fused)
    case, _ = _problem(torch.bfloat16, device)
    expected = GradientPrecision.ROUNDED if fused else GradientPrecision.EXACT
    assert gradient_precision.matching_torch(*_descriptor_and_inputs(case)) is expected


@pytest.mark.skipif(ON_CUDA, reason="CPU tensors only")
def test_cpu_tensors_are_exact():
    # torch's CPU attention kernels accumulate in float32, so the interpreter's default is EXACT.
    case, _ = _problem(torch.float16, "cpu")
    assert not gradient_precision.torch_runs_fused_kernel(*_descriptor_and_inputs(case))


@pytest.mark.skipif(not ON_CUDA, reason="asks torch's CUDA SDPA dispatch")
def test_choice_agrees_with_torchs_own_dispatch():
    """ROUNDED exactly where torch's SDPA would pick its flash or mem-efficient kernel
    (torch._fused_sdp_choice, the function its dispatch calls), EXACT where it would pick math."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = generator(72)
    new = lambda *shape, dtype=torch.bfloat16: torch.randn(*shape, generator=gen).to("cuda", dtype)  # noqa: E731
    problems = {
        "bf16 d=64": (new(2, 4, 64, 64), new(2, 4, 64, 64), new(2, 4, 64, 64), {}),
        "fp16 E=12 Ev=20": tuple(new(2, 4, 64, e, dtype=torch.float16) for e in (12, 12, 20)) + ({},),
        "bf16 GQA causal": (new(1, 8, 33, 128), new(1, 2, 33, 128), new(1, 2, 33, 128), {"causal": True}),
        "bf16 bool mask": (new(1, 2, 40, 64), new(1, 2, 48, 64), new(1, 2, 48, 64),
                           {"attn_mask": torch.ones(1, 1, 40, 48, dtype=torch.bool, device="cuda")}),
        # shapes flashsdpa's canonical 4-D views hide from torch (torch's fused kernels refuse them)
        "bf16 3-D": (new(4, 64, 64), new(4, 64, 64), new(4, 64, 64), {}),
        "bf16 k/v batch broadcast": (new(2, 4, 64, 64), new(1, 4, 64, 64), new(1, 4, 64, 64), {}),
        "bf16 one k/v head broadcast": (new(2, 4, 64, 64), new(2, 1, 64, 64), new(2, 1, 64, 64),
                                        {"enable_gqa": False}),
    }
    seen = set()
    for contexts in ([], [SDPBackend.MATH], [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        for name, (q, k, v, options) in problems.items():
            gqa = options.get("enable_gqa", q.dim() == 4 and q.shape[1] != k.shape[1])
            case = Case(q, k, v, enable_gqa=gqa, causal=options.get("causal", False),
                        attn_mask=options.get("attn_mask"))
            # torch's SDPA turns a bool mask into an additive one of q's dtype before it chooses
            mask = case.attn_mask
            if mask is not None and mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, dtype=q.dtype, device="cuda").masked_fill(~mask, float("-inf"))
            with sdpa_kernel(contexts) if contexts else torch.enable_grad():
                try:
                    choice = SDPBackend(torch._fused_sdp_choice(
                        q, k, v, attn_mask=mask, is_causal=case.causal, enable_gqa=case.enable_gqa))
                except RuntimeError:  # shapes its chooser rejects outright: no fused kernel, EXACT expected
                    choice = SDPBackend.MATH
                precision = gradient_precision.matching_torch(*_descriptor_and_inputs(case))
            if choice == SDPBackend.CUDNN_ATTENTION:  # (pybind enums: compare by value)
                continue  # left out on purpose (see torch_runs_fused_kernel)
            fused = choice in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)
            assert precision is (GradientPrecision.ROUNDED if fused else GradientPrecision.EXACT), (name, contexts, choice)
            seen.add(fused)
    assert seen == {True, False}, "both precisions should occur among these problems"
