"""The triton backward's two 16-bit precisions, and the choice between them (gradient_precision.py).

On a GPU the default follows torch: ROUNDED (FA2's arithmetic) where torch's
own fused kernels would run, EXACT where torch would fall back to its
float32-internal math. The rest of the suite runs whatever that choice gives
(EXACT on the CPU interpreter, where torch's CPU kernels are float32-internal),
so ROUNDED is pinned here to test it on the CPU too, and torch's answer is
stood in for to test the choice (made at the forward, from the caller's tensors).
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

import flashsdpa
from flashsdpa import gradient_precision
from flashsdpa.api import prepare
from flashsdpa.descriptor import GradientPrecision
from helpers import (
    HALF_DTYPES,
    ON_CUDA,
    Case,
    check_backward,
    generator,
    qkv,
    random_bool_mask,
    randn,
    record_backward_precisions,
    seq,
)

EXACT, ROUNDED, AUTO = GradientPrecision.EXACT, GradientPrecision.ROUNDED, GradientPrecision.AUTO


@pytest.fixture
def pin_precision(monkeypatch):
    def pin(precision: GradientPrecision | None) -> None:
        monkeypatch.setattr(gradient_precision, "pinned", precision)

    return pin


class TorchAnswer:
    """Stands in for torch's own answer (`torch_runs_fused_kernel`): `fused`, settable mid-test; counts the asks."""

    def __init__(self, fused: bool):
        self.fused = fused
        self.asked = 0

    def __call__(self, *arguments) -> bool:
        self.asked += 1
        return self.fused


@pytest.fixture
def torch_answers(monkeypatch):
    def answer(fused: bool) -> TorchAnswer:
        stand_in = TorchAnswer(fused)
        monkeypatch.setattr(gradient_precision, "torch_runs_fused_kernel", stand_in)
        return stand_in

    return answer


def _problem(dtype, device, **options):
    gen = generator(71)
    q, k, v = qkv((1, 4), (1, 2), seq(19), seq(23), 32, gen, dtype, device)
    return Case(q, k, v, enable_gqa=True, **options), gen


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
    for precision in (ROUNDED, EXACT):
        pin_precision(precision)
        grads[precision] = check_backward("triton", case, precision.value, grad_out=grad_out, check_torch=False)
        errors[precision] = _errors_against_float64(case, grads[precision], grad_out)
    for name, rounded, exact in zip("qkv", errors[ROUNDED], errors[EXACT]):
        assert rounded <= 3.0 * exact, f"d{name}: ROUNDED error {rounded:.3g} over 3x EXACT's {exact:.3g}"
    # The pin reached the kernels: the two precisions are different arithmetic.
    assert any(not torch.equal(a, b) for a, b in zip(grads[ROUNDED][:3], grads[EXACT][:3]))


def _errors_against_float64(case: Case, grads, grad_out) -> list[float]:
    from helpers import oracle, rel_err

    leaves = [t.detach().double().requires_grad_() for t in (case.q, case.k, case.v)]
    out, _ = oracle(*leaves, case.attn_mask, case.causal, case.scale, case.enable_gqa)
    out.backward(grad_out.double())
    return [rel_err(g, leaf.grad) for g, leaf in zip(grads[:3], leaves)]




def _grad_leaves(*shapes, dtype=torch.bfloat16, device="cpu"):
    gen = generator(74)
    return [randn(shape, gen, dtype, device).requires_grad_() for shape in shapes]


QKV_SHAPES = {
    "4-D": ((2, 4, 9, 16), (2, 4, 11, 16), (2, 4, 11, 16), False, ROUNDED),
    "4-D GQA": ((2, 4, 9, 16), (2, 2, 11, 16), (2, 2, 11, 16), True, ROUNDED),
    # ranks and broadcast dims torch's fused kernels refuse (torch runs math), all hidden by the canonical views
    "3-D": ((4, 9, 16), (4, 11, 16), (4, 11, 16), False, EXACT),
    "5-D": ((2, 3, 4, 9, 16), (2, 3, 4, 11, 16), (2, 3, 4, 11, 16), False, EXACT),
    "k/v batch broadcast": ((2, 4, 9, 16), (1, 4, 11, 16), (1, 4, 11, 16), False, EXACT),
    "one k/v head broadcast": ((2, 4, 9, 16), (2, 1, 11, 16), (2, 1, 11, 16), False, EXACT),
    "one query head broadcast": ((2, 1, 9, 16), (2, 4, 11, 16), (2, 4, 11, 16), False, EXACT),
    "GQA, k and v heads differ": ((2, 4, 9, 16), (2, 1, 11, 16), (2, 2, 11, 16), True, EXACT),
}


@pytest.mark.parametrize("name", QKV_SHAPES)
def test_choice_follows_the_callers_shapes(name, device, torch_answers):
    """Where torch's own answer is "fused", only the caller's 4-D calls with equal batch and head
    counts get ROUNDED; the rest are what torch runs its math backend on."""
    q_shape, k_shape, v_shape, enable_gqa, expected = QKV_SHAPES[name]
    answer = torch_answers(True)
    q, k, v = _grad_leaves(q_shape, k_shape, v_shape, device=device)
    assert prepare(q, k, v, False, None, None, 0.0, enable_gqa, None, "ieee").gradients is expected
    assert answer.asked == (expected is ROUNDED), "torch is asked only where its shape rule lets a fused kernel run"


def test_half_precision_follows_torchs_answer(device, torch_answers):
    q, k, v = _grad_leaves((2, 4, 9, 16), (2, 4, 11, 16), (2, 4, 11, 16), device=device)
    for fused, expected in ((True, ROUNDED), (False, EXACT)):
        torch_answers(fused)
        assert prepare(q, k, v, False, None, None, 0.0, False, None, "ieee").gradients is expected


def test_float32_and_calls_without_a_backward_are_exact_unasked(device, torch_answers):
    """float32 is always EXACT; without a backward to come the value is never read: torch is not asked."""
    answer = torch_answers(True)
    shapes = ((2, 4, 9, 16), (2, 4, 11, 16), (2, 4, 11, 16))
    q, k, v = _grad_leaves(*shapes, dtype=torch.float32, device=device)
    assert prepare(q, k, v, False, None, None, 0.0, False, None, "ieee").gradients is EXACT
    q, k, v = _grad_leaves(*shapes, device=device)
    with torch.no_grad():
        assert prepare(q, k, v, False, None, None, 0.0, False, None, "ieee").gradients is EXACT
    q, k, v = (t.detach() for t in (q, k, v))
    assert prepare(q, k, v, False, None, None, 0.0, False, None, "ieee").gradients is EXACT
    assert answer.asked == 0
    mask = torch.zeros(1, 1, 9, 11, device=device, requires_grad=True)  # the mask's gradient is a backward too
    assert prepare(q, k, v, False, None, mask, 0.0, False, None, "ieee").gradients is ROUNDED


class _OpPath(TorchFunctionMode):
    """A pass-through torch function mode: calls go through the custom ops, not the eager fast path."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("path", ["eager", "op"])
@pytest.mark.parametrize("fused_at_forward", [False, True], ids=["math at forward", "fused at forward"])
def test_the_forward_decides(path, fused_at_forward, device, torch_answers, monkeypatch):
    """torch chooses its backward's kernel at the forward: a change of answer by the backward changes nothing
    (as with `sdpa_kernel([SDPBackend.MATH])` around the forward only), and torch is asked once."""
    answer = torch_answers(fused_at_forward)
    precisions = record_backward_precisions(monkeypatch)
    case, _ = _problem(torch.bfloat16, device)
    q, k, v = (t.requires_grad_() for t in (case.q, case.k, case.v))
    with _OpPath() if path == "op" else torch.enable_grad():
        out = flashsdpa.attention(q, k, v, enable_gqa=True, backend="triton")
        answer.fused = not fused_at_forward
        out.backward(torch.ones_like(out))
    assert precisions == [ROUNDED if fused_at_forward else EXACT]
    assert answer.asked == 1


def test_compiled_calls_ask_torch_when_the_backward_runs(device, torch_answers, monkeypatch):
    """Under torch.compile the trace asks torch nothing: the shape rule decides what it can (3-D: EXACT),
    and a 4-D call carries AUTO, which the backward resolves with torch's answer then."""
    answer = torch_answers(False)
    precisions = record_backward_precisions(monkeypatch)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: flashsdpa.attention(q, k, v, backend="triton"), fullgraph=True,
                             backend="aot_eager")  # fmt: skip
    four_d = _grad_leaves((1, 2, 9, 16), (1, 2, 11, 16), (1, 2, 11, 16), device=device)
    three_d = _grad_leaves((2, 9, 16), (2, 11, 16), (2, 11, 16), device=device)
    for tensors in (four_d, three_d):
        answer.fused = False
        out = compiled(*tensors)
        answer.fused = True
        out.backward(torch.ones_like(out))
    torch._dynamo.reset()
    assert precisions == [ROUNDED, EXACT]
    assert answer.asked == 1, "asked once: by the 4-D call's backward"


def test_auto_is_resolved_before_the_config(device):
    from flashsdpa.backends.triton.backward_configs import backward_config

    key = flashsdpa.AttentionDescriptor((1,), 1, 1, 8, 8, 16, 16, torch.bfloat16, device).kernel_key
    with pytest.raises(ValueError, match="AUTO"):
        backward_config(key, None, AUTO)


@pytest.mark.skipif(ON_CUDA, reason="CPU tensors only")
def test_cpu_tensors_follow_torchs_cpu_dispatch():
    # torch's fused CPU flash kernel (flashsdpa's aten backend) for 4-D inputs, its math path for 3-D ones
    # and inside sdpa_kernel([MATH]); the math path's 16-bit gradients are up to 2x more precise.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = _grad_leaves((2, 4, 9, 16), (2, 4, 11, 16), (2, 4, 11, 16))
    assert gradient_precision.torch_runs_fused_kernel(q, k, v, False, 0.0, False, False)
    assert prepare(q, k, v, False, None, None, 0.0, False, None, "ieee").gradients is ROUNDED
    with sdpa_kernel([SDPBackend.MATH]):
        assert prepare(q, k, v, False, None, None, 0.0, False, None, "ieee").gradients is EXACT
    q3, k3, v3 = (t[0] for t in (q, k, v))
    assert prepare(q3, k3, v3, False, None, None, 0.0, False, None, "ieee").gradients is EXACT


@pytest.mark.skipif(not ON_CUDA, reason="asks torch's CUDA SDPA dispatch")
def test_choice_agrees_with_torchs_own_dispatch():
    """ROUNDED exactly where torch's SDPA would pick its flash or mem-efficient kernel
    (torch._fused_sdp_choice, the function its dispatch calls), EXACT where it would pick math.
    flashsdpa's choice is the public API's, made from the caller's tensors (`api.prepare`)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = generator(72)

    def new(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=gen).to("cuda", dtype).requires_grad_()

    problems = {
        "bf16 d=64": (new(2, 4, 64, 64), new(2, 4, 64, 64), new(2, 4, 64, 64), {}),
        "fp16 E=12 Ev=20": tuple(new(2, 4, 64, e, dtype=torch.float16) for e in (12, 12, 20)) + ({},),
        "bf16 GQA causal": (new(1, 8, 33, 128), new(1, 2, 33, 128), new(1, 2, 33, 128), {"causal": True}),
        "bf16 bool mask": (new(1, 2, 40, 64), new(1, 2, 48, 64), new(1, 2, 48, 64),
                           {"attn_mask": torch.ones(1, 1, 40, 48, dtype=torch.bool, device="cuda")}),
        # shapes flashsdpa's canonical 4-D views hide from torch (torch's fused kernels refuse them)
        "bf16 3-D": (new(4, 64, 64), new(4, 64, 64), new(4, 64, 64), {}),
        "bf16 5-D": (new(2, 2, 4, 64, 64), new(2, 2, 4, 64, 64), new(2, 2, 4, 64, 64), {}),
        "bf16 k/v batch broadcast": (new(2, 4, 64, 64), new(1, 4, 64, 64), new(1, 4, 64, 64), {}),
        "bf16 one k/v head broadcast": (new(2, 4, 64, 64), new(2, 1, 64, 64), new(2, 1, 64, 64),
                                        {"enable_gqa": False}),
    }
    seen = set()
    for contexts in ([], [SDPBackend.MATH], [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        for name, (q, k, v, options) in problems.items():
            gqa = options.get("enable_gqa", q.dim() == 4 and q.shape[1] != k.shape[1])
            causal, attn_mask = options.get("causal", False), options.get("attn_mask")
            # torch's SDPA turns a bool mask into an additive one of q's dtype before it chooses
            mask = attn_mask
            if mask is not None and mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, dtype=q.dtype, device="cuda").masked_fill(~mask, float("-inf"))
            with sdpa_kernel(contexts) if contexts else torch.enable_grad():
                try:
                    choice = SDPBackend(torch._fused_sdp_choice(
                        q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa))
                except RuntimeError:  # shapes its chooser rejects outright: no fused kernel, EXACT expected
                    choice = SDPBackend.MATH
                precision = prepare(q, k, v, causal, None, attn_mask, 0.0, gqa, None, "ieee").gradients
            if choice == SDPBackend.CUDNN_ATTENTION:  # (pybind enums: compare by value)
                continue  # left out on purpose (see torch_runs_fused_kernel)
            fused = choice in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)
            assert precision is (ROUNDED if fused else EXACT), (name, contexts, choice)
            seen.add(fused)
    assert seen == {True, False}, "both precisions should occur among these problems"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_plain_cpu_rule_is_torchs_answer(dtype):
    """`of_plain_cpu_call` reads only torch's flash flag for the calls `call_plans.plain_cpu_call` takes: it must
    be what `at_forward` (which asks torch's own CPU dispatch) says for them, with flash enabled and not."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator().manual_seed(9)
    shapes = ((2, 3, 17, 29, 40), (1, 2, 33, 33, 64), (1, 1, 40, 7, 96), (1, 4, 1, 300, 256))  # (B, H, L, S, E)
    for backends in ([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH], [SDPBackend.MATH]):
        with sdpa_kernel(backends):
            for b, h, l, s, e in shapes:
                q = torch.randn(b, h, l, e, generator=gen).to(dtype).requires_grad_()
                k, v = (torch.randn(b, h, s, e, generator=gen).to(dtype) for _ in range(2))
                for causal in (False, True):
                    expected = gradient_precision.at_forward(q, k, v, None, 0.0, causal, False)
                    assert gradient_precision.of_plain_cpu_call() is expected, (backends, (b, h, l, s, e), causal)
