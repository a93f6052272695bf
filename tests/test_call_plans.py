"""Call plans (call_plans.py): a warm plan never serves a call that differs from its signature's.

Each test warms the plans with a base call, then runs calls that differ from it in exactly one
argument or one piece of global state, each followed by the base call again. Every result is held to
the float64 formula (or the call must raise the same error as without plans, or take the backend and
record the stats it would without plans). The base problem runs on the aten backend (torch's CPU
kernel) on a CPU, the triton backend on a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

import flashsdpa
from flashsdpa import api, call_plans, dispatch, gradient_precision
from flashsdpa.backends.base import poisoned_outputs
from flashsdpa.descriptor import GradientPrecision
from helpers import generator, keep_mask_for, oracle, predict_seed, randn, rel_err, variants_oracle

BAR = 1e-5  # float32 (float64 inputs: far below); the calls differ from one another by O(1)
L, S, E = 13, 11, 16


def _tensors(device, dtype=torch.float32, heads_kv=4, seed=31):
    gen = generator(seed)
    q = randn((2, 4, L, E), gen, dtype, device)
    k, v = (randn((2, heads_kv, S, E), gen, dtype, device) for _ in range(2))
    return q, k, v


def _masks(device):
    gen = generator(32)
    return {
        "bool": randn((2, 4, L, S), gen, torch.float32, device) > -0.5,
        "key padding": randn((2, 1, 1, S), gen, torch.float32, device) > -0.5,
        "float": randn((2, 4, L, S), gen, torch.float32, device),
        "float (L, S)": randn((L, S), gen, torch.float32, device),
    }


def _expected(q, k, v, **options):
    """float64 (out, lse) of `flashsdpa.attention(q, k, v, **options)` (no dropout)."""
    variant_names = ("window", "causal_alignment", "softcap", "alibi_slopes", "sinks")
    if any(options.get(name) is not None for name in variant_names if name != "causal_alignment") or (
        options.get("causal_alignment", "top_left") != "top_left"
    ):
        k2, v2 = k, v
        if options.get("enable_gqa"):
            group = q.shape[1] // k.shape[1]
            k2, v2 = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        mask = options.get("attn_mask")
        return variants_oracle(
            q, k2, v2, causal=options.get("causal", False), window=options.get("window"),
            alignment=options.get("causal_alignment", "top_left"), softcap=options.get("softcap"),
            alibi_slopes=options.get("alibi_slopes"), sinks=options.get("sinks"),
            attn_mask=None if mask is None else mask.expand(q.shape[0], q.shape[1], L, S), scale=options.get("scale"),
        )  # fmt: skip
    return oracle(q, k, v, options.get("attn_mask"), options.get("causal", False), options.get("scale"),
                  options.get("enable_gqa", False))  # fmt: skip


def _check(q, k, v, what, **options):
    with poisoned_outputs():
        out, lse = flashsdpa.attention(q, k, v, return_lse=True, **options)
    ref, ref_lse = _expected(q, k, v, **options)
    assert rel_err(out, ref) <= BAR, what
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), what
    assert (lse[finite].double() - ref_lse[finite]).abs().max() <= 1e-4, what
    return out


def _flips(device):
    """(name, tensors, options): each differs from the base call ("base") in one argument."""
    q, k, v = _tensors(device)
    masks = _masks(device)
    gen = generator(33)
    transposed = tuple(t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    wide = randn((2, 4, L, E + 3), gen, torch.float32, device)[..., 1 : E + 1]  # one element into its storage
    return [
        ("scale 0.3", (q, k, v), {"scale": 0.3}),
        ("scale -0.3", (q, k, v), {"scale": -0.3}),
        ("scale 2 (an int)", (q, k, v), {"scale": 2}),
        ("scale 0", (q, k, v), {"scale": 0.0}),
        ("causal", (q, k, v), {"causal": True}),
        ("bool mask", (q, k, v), {"attn_mask": masks["bool"]}),
        ("key padding mask", (q, k, v), {"attn_mask": masks["key padding"]}),
        ("float mask", (q, k, v), {"attn_mask": masks["float"]}),
        ("float mask (L, S)", (q, k, v), {"attn_mask": masks["float (L, S)"]}),
        ("float mask, causal", (q, k, v), {"attn_mask": masks["float"], "causal": True}),
        ("window", (q, k, v), {"window": (3, 2)}),
        ("window, other sides", (q, k, v), {"window": (2, 3)}),
        ("bottom-right causal", (q, k, v), {"causal": True, "causal_alignment": "bottom_right"}),
        ("softcap", (q, k, v), {"softcap": 0.5}),
        ("ALiBi", (q, k, v), {"alibi_slopes": torch.rand(4, generator=gen).to(device)}),
        ("sinks", (q, k, v), {"sinks": randn((4,), gen, torch.float32, device)}),
        ("enable_gqa on equal heads", (q, k, v), {"enable_gqa": True}),
        ("GQA", (q, *_tensors(device, heads_kv=2)[1:]), {"enable_gqa": True}),
        ("tf32", (q, k, v), {"fp32_precision": "tf32"}),
        ("reference backend", (q, k, v), {"backend": "reference"}),
        ("tiled backend", (q, k, v), {"backend": "tiled"}),
        ("other strides", transposed, {}),
        ("query one element into its storage", (wide, k, v), {}),
        ("fewer queries", (q[:, :, :7], k, v), {}),
        ("fewer keys", (q, k[:, :, :5], v[:, :, :5]), {}),
        ("one batch", (q[:1], k[:1], v[:1]), {}),
        ("3-D", (q[0], k[0], v[0]), {}),
        ("float64", _tensors(device, torch.float64), {}),
    ]


def test_each_argument_flipped_against_warm_plans(device):
    q, k, v = _tensors(device)
    base = _check(q, k, v, "base")
    for name, tensors, options in _flips(device):
        for _ in range(2):  # cold, then from its own plan
            bar = 1e-2 if options.get("fp32_precision") == "tf32" else BAR
            with poisoned_outputs():
                out, lse = flashsdpa.attention(*tensors, return_lse=True, **options)
            ref, _ = _expected(*tensors, **{n: o for n, o in options.items() if n not in ("backend", "fp32_precision")})
            assert rel_err(out, ref) <= bar, name
            assert torch.equal(_check(q, k, v, f"base after {name}"), base), f"base after {name}"


def test_dropout_flipped_against_warm_plans(device):
    q, k, v = _tensors(device)
    _check(q, k, v, "base")
    for p in (0.3, 0.5):
        seed_pair = predict_seed(5)
        torch.manual_seed(5)
        out = flashsdpa.attention(q, k, v, dropout_p=p)
        keep = keep_mask_for(seed_pair, p, (2, 4), L, S, device)
        assert rel_err(out, oracle(q, k, v, dropout_p=p, keep=keep)[0]) <= BAR, p
        _check(q, k, v, f"base after dropout {p}")


def test_a_0d_tensor_scale_changed_in_place(device):
    q, k, v = _tensors(device)
    scale = torch.tensor(0.5)
    for value in (0.5, 0.25):
        scale.fill_(value)
        out = flashsdpa.attention(q, k, v, scale=scale)
        assert rel_err(out, oracle(q, k, v, scale=value)[0]) <= BAR, value


@pytest.mark.parametrize(
    "warm, bad, error",
    [
        ({"scale": 1.0}, {"scale": True}, TypeError),
        ({"causal": True}, {"causal": 1}, TypeError),
        ({"dropout_p": 0.0}, {"dropout_p": False}, ValueError),
        ({"window": (1, 2)}, {"window": (1.0, 2)}, ValueError),
        ({"window": (1, 2)}, {"window": (True, 2)}, ValueError),
        ({"fp32_precision": "ieee"}, {"fp32_precision": "fp64"}, ValueError),
        ({"backend": "tiled"}, {"backend": "tiles"}, ValueError),
        ({"softcap": 1.0}, {"softcap": True}, ValueError),
        ({"causal_alignment": "bottom_right", "causal": True}, {"causal_alignment": "bottom", "causal": True}, ValueError),
        ({"enable_gqa": True}, {"enable_gqa": False}, ValueError),  # GQA shapes
        ({}, {"k dtype": torch.float64}, TypeError),
        ({}, {"value length": 10}, ValueError),
        ({"attn_mask": "float"}, {"attn_mask": "int"}, TypeError),
    ],
)
def test_a_bad_call_raises_after_a_good_one(warm, bad, error, device):
    """A call that validation rejects raises its error also when a call equal to it in every value that
    compares equal (True == 1.0) has a plan."""
    q, k, v = _tensors(device, heads_kv=2 if "enable_gqa" in warm else 4)
    masks = {"float": _masks(device)["float"], "int": _masks(device)["float"].to(torch.int32)}

    def call(options):
        options = dict(options)
        if isinstance(options.get("attn_mask"), str):
            options["attn_mask"] = masks[options["attn_mask"]]
        k2 = k.double() if options.pop("k dtype", None) else k
        v2 = v[:, :, : options.pop("value length")] if "value length" in options else v
        return flashsdpa.attention(q, k2, v2, **options)

    call(warm)
    call(warm)
    with pytest.raises(error):
        call(bad)


def test_global_state_flipped_against_warm_plans(device, monkeypatch):
    """The `use_backend` pin, grad mode and the automatic order: each call takes the backend, records the
    stats and builds the graph it would without plans."""
    q, k, v = _tensors(device)
    flashsdpa.reset_stats()
    flashsdpa.attention(q, k, v)
    (automatic,) = flashsdpa.stats()["calls"]  # the dispatcher's choice (on a GPU not the first in the order)
    with flashsdpa.use_backend("reference"):
        _check(q, k, v, "pinned")
    flashsdpa.attention(q, k, v)
    assert flashsdpa.stats()["calls"] == {automatic: 2, "reference": 1}
    flashsdpa.reset_stats()
    monkeypatch.setitem(dispatch.AUTOMATIC_ORDER, device, ("tiled",))
    _check(q, k, v, "another automatic order")
    assert flashsdpa.stats()["calls"] == {"tiled": 1}
    monkeypatch.undo()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    assert flashsdpa.attention(*leaves).requires_grad
    with torch.no_grad():
        assert not flashsdpa.attention(*leaves).requires_grad
    out = flashsdpa.attention(*leaves)
    assert out.requires_grad
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = oracle(*ref_leaves)[0]
    for got, want in zip(grads, torch.autograd.grad(ref, ref_leaves, torch.ones_like(ref))):
        assert rel_err(got, want) <= 10 * BAR


def test_gradient_precision_flipped_against_warm_plans(device, monkeypatch):
    """The backward precision chosen at the forward (a pinned one, torch's flags) follows each call."""
    seen = []
    backend = dispatch.BACKENDS["aten" if device == "cpu" else "triton"]
    backward = type(backend).backward
    monkeypatch.setattr(type(backend), "backward", lambda self, desc, *rest: seen.append(desc.gradients) or
                        backward(self, desc, *rest))  # fmt: skip
    q, k, v = (t.to(torch.bfloat16).requires_grad_() for t in _tensors(device))
    expected = []
    for pinned in (None, GradientPrecision.ROUNDED, None, GradientPrecision.EXACT, GradientPrecision.ROUNDED):
        monkeypatch.setattr(gradient_precision, "pinned", pinned)
        out = flashsdpa.attention(q, k, v, backend=backend.name)
        out.sum().backward()
        expected.append(pinned or gradient_precision.at_forward(q, k, v, None, 0.0, False, False))
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        monkeypatch.setattr(gradient_precision, "pinned", None)
        out = flashsdpa.attention(q, k, v, backend=backend.name)
        out.sum().backward()
        expected.append(GradientPrecision.EXACT)  # torch's math path
    assert seen == expected


def test_drop_in_flipped_against_warm_plans(device):
    """The drop-in layer's own checks (a mask with is_causal, torch's math path asked for) hold with plans."""
    q, k, v = _tensors(device)
    mask = _masks(device)["bool"]
    torch_sdpa = F.scaled_dot_product_attention
    with flashsdpa.sdpa():
        for _ in range(2):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            assert rel_err(out, oracle(q, k, v, causal=True)[0]) <= BAR
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            assert rel_err(out, oracle(q, k, v, mask)[0]) <= BAR
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)  # torch's: it raises or runs
            with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            assert rel_err(out, oracle(q, k, v, causal=True)[0]) <= 1e-5
    calls = flashsdpa.stats()["calls"]
    assert calls["torch"] == 4 and sum(calls.values()) == 8, calls
    assert F.scaled_dot_product_attention is torch_sdpa


def test_stats_count_as_without_plans(device):
    """Fallbacks and calls are recorded on every run of a plan, as on every prepared call."""
    q, k, v = _tensors(device, torch.float64)
    calls = [dict(dropout_p=0.3), dict(), dict(softcap=2.0), dict(dropout_p=0.3), dict(softcap=2.0), dict()]
    counted = []
    for fresh in (False, True):
        flashsdpa.reset_stats()
        for options in calls:
            if fresh:
                call_plans.clear()
            flashsdpa.attention(q, k, v, **options)
        counted.append(flashsdpa.stats())
    assert counted[0] == counted[1] and sum(counted[0]["fallbacks"].values()) >= 4, counted


def test_a_warm_call_skips_validation(device, monkeypatch):
    """The second call of a signature runs from its plan (api.prepare is not called)."""
    q, k, v = _tensors(device)
    first = flashsdpa.attention(q, k, v, causal=True, scale=0.3)
    monkeypatch.setattr(api, "prepare", lambda *args, **kwargs: pytest.fail("validated again"))
    assert torch.equal(flashsdpa.attention(q, k, v, causal=True, scale=0.3), first)
    with pytest.raises(pytest.fail.Exception):
        flashsdpa.attention(q, k, v, causal=True, scale=0.4)


def test_no_plans_where_they_could_be_seen(device):
    """Forward-mode AD and functorch transforms get no signature (api.prepare decides there)."""
    q, k, v = _tensors(device)
    args = ("attention", q, k, v, None, 0.0, False, None, False)
    assert call_plans.signature(*args) is not None
    with torch.autograd.forward_ad.dual_level():
        assert call_plans.signature(*args) is None
    seen = []
    torch.func.vmap(lambda t: seen.append(call_plans.signature("attention", t, t, t, None, 0.0, False, None, False))
                    or t)(q)  # fmt: skip
    assert seen == [None]
    assert call_plans.signature("attention", q, k, v, None, 0.0, False, torch.tensor(0.5), False) is None
    assert call_plans.signature("attention", torch.nn.Parameter(q), k, v, None, 0.0, False, None, False) is None


def test_the_signature_holds_the_global_state(device):
    """Each piece of global state a choice reads changes the signature."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = _tensors(device)
    sign = lambda: call_plans.signature("attention", q, k, v, None, 0.0, False, None, False)  # noqa: E731
    base = sign()
    flips = []
    with torch.no_grad():
        flips.append(sign())
    with flashsdpa.use_backend("tiled"):
        flips.append(sign())
    for backends in ([SDPBackend.MATH], [SDPBackend.FLASH_ATTENTION], [SDPBackend.EFFICIENT_ATTENTION],
                     [SDPBackend.CUDNN_ATTENTION]):  # fmt: skip
        with sdpa_kernel(backends):
            flips.append(sign())
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        flips.append(sign())
    finally:
        torch.use_deterministic_algorithms(deterministic)
    original = gradient_precision.pinned
    gradient_precision.pinned = GradientPrecision.ROUNDED
    try:
        flips.append(sign())
    finally:
        gradient_precision.pinned = original
    assert sign() == base
    assert len({base, *flips}) == len(flips) + 1


def test_plans_are_bounded(device, monkeypatch):
    q, k, v = (t[:, :, :1] for t in _tensors(device))
    monkeypatch.setattr(call_plans._plans, "limit", 8)
    for scale in range(1, 30):
        flashsdpa.attention(q, k, v, scale=float(scale))
        assert 1 <= len(call_plans._plans) <= 8


# The plain CPU call: straight to the aten kernel, before any plan (call_plans.plain_cpu_call).
PLAIN_SHAPES = ((2, 3, 17, 29, 40), (1, 2, 33, 33, 64), (1, 1, 40, 7, 96), (1, 2, 5, 9, 7))  # (B, H, L, S, E); L > S causal too


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_plain_cpu_calls_go_to_the_kernel_with_the_general_paths_bits(monkeypatch, dtype, causal):
    gen = torch.Generator().manual_seed(3)
    for b, h, l, s, e in PLAIN_SHAPES:
        q = torch.randn(b, h, l, e, generator=gen).to(dtype)
        k, v = (torch.randn(b, h, s, e, generator=gen).to(dtype) for _ in range(2))
        # the general path: an explicit scale equal to the default is not plain
        general = flashsdpa.attention(q, k, v, causal=causal, scale=1.0 / math.sqrt(e))
        dispatch.reset_stats()
        with monkeypatch.context() as patch:
            patch.setattr(call_plans, "lookup", lambda *a, **kw: pytest.fail("a plain call built a signature"))
            with poisoned_outputs():
                out = flashsdpa.attention(q, k, v, causal=causal)
                dropin = flashsdpa.scaled_dot_product_attention(q, k, v, is_causal=causal)
        assert torch.equal(out, general) and torch.equal(dropin, general), (dtype, causal, (b, h, l, s, e))
        assert out.dtype == dtype and out.shape == (b, h, l, e)
        assert dispatch.stats() == {"calls": {"aten": 2}, "fallbacks": {}}


class _PassingFunctionMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_calls_that_are_not_plain_take_the_general_path(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 9, 8, generator=gen) for _ in range(3))
    plain = call_plans.plain_cpu_call
    assert plain(q, k, v, False) is not None
    not_plain = {
        "3-D": (q[0], k[0], v[0], False),
        "3-D keys and values": (q, k[:, :, 0], v[:, :, 0], False),  # (1, 2, 8): leading sizes as the query's
        "GQA head counts": (q, k[:, :1], v[:, :1], False),
        "value head dim": (q, k, torch.randn(1, 2, 9, 4), False),
        "strided last dim": (q.transpose(2, 3).contiguous().transpose(2, 3), k, v, False),
        "no keys": (q, k[:, :, :0], v[:, :, :0], False),
        "no queries": (q[:, :, :0], k, v, False),
        "mixed dtypes": (q, k.double(), v, False),
        "integer dtype": (q.long(), k.long(), v.long(), False),
        "causal given as an int": (q, k, v, 1),
        "a subclass": (torch.nn.Parameter(q, requires_grad=False), k, v, False),
    }
    for why, args in not_plain.items():
        assert plain(*args) is None, why
    # where something could see the op, it is called (ops._plain_eager's questions)
    observers = {
        "the profiler": torch.profiler.profile,
        "a dispatch mode": lambda: FlopCounterMode(display=False),
        "a function mode": _PassingFunctionMode,
        "forward-mode AD": forward_ad.dual_level,
    }
    for why, observer in observers.items():
        with observer():
            assert plain(q, k, v, False) is None, why
    under_vmap = []
    torch.vmap(lambda x: under_vmap.append(plain(x, x, x, False)) or x)(q.expand(3, -1, -1, -1, -1))
    assert under_vmap == [None], "a functorch transform"
    # (3-D keys broadcast against a 4-D query, as in torch: the general path computes it)
    torch.testing.assert_close(flashsdpa.attention(q, k[:, :, 0], v[:, :, 0]),
                               F.scaled_dot_product_attention(q, k[:, :, 0], v[:, :, 0]))
    # a graph to record: the kernel's autograd where its gradients are flashsdpa's (the test below), not where
    # 16-bit gradients are to be computed exactly
    assert plain(q.clone().requires_grad_(), k, v, False) is not None
    q16, k16, v16 = q.bfloat16().requires_grad_(), k.bfloat16(), v.bfloat16()
    assert plain(q16, k16, v16, False) is not None  # torch's flash kernel takes it: ROUNDED
    monkeypatch.setattr(gradient_precision, "pinned", GradientPrecision.EXACT)
    assert plain(q16, k16, v16, False) is None
    monkeypatch.setattr(gradient_precision, "pinned", None)
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        assert plain(q16, k16, v16, False) is None  # torch's math path: EXACT
        with torch.no_grad():
            assert plain(q16, k16, v16, False) is not None  # no graph to record
    with flashsdpa.use_backend("tiled"):
        assert plain(q, k, v, False) is None
    monkeypatch.setitem(dispatch.AUTOMATIC_ORDER, "cpu", ("tiled",))
    assert plain(q, k, v, False) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_plain_cpu_calls_that_record_a_graph_give_the_general_paths_gradients(dtype, causal):
    """The kernel's own autograd node, where the lane takes a graph-recording call: its output and gradients
    are the general path's bits, for a random, an expanded (from .sum()) and a transposed output gradient; a
    second derivative through it raises torch's error, as after torch's own CPU SDPA."""
    gen = torch.Generator().manual_seed(5)
    for (b, h, l, s, e), grad_kind in zip(PLAIN_SHAPES, ("random", "sum", "transposed")):
        q = torch.randn(b, h, l, e, generator=gen).to(dtype).requires_grad_()
        k, v = (torch.randn(b, h, s, e, generator=gen).to(dtype).requires_grad_() for _ in range(2))
        general = flashsdpa.attention(q, k, v, causal=causal, scale=1.0 / math.sqrt(e))
        dispatch.reset_stats()
        with poisoned_outputs():
            out = flashsdpa.attention(q, k, v, causal=causal)
        assert dispatch.stats() == {"calls": {"aten": 1}, "fallbacks": {}}
        assert type(out.grad_fn) is not type(general.grad_fn)  # the lane ran, not the general path
        if grad_kind == "random":
            grad = torch.randn(out.shape, generator=gen).to(dtype)
        elif grad_kind == "sum":
            grad = torch.ones((), dtype=dtype).expand(out.shape)
        else:
            grad = torch.randn(b, h, e, l, generator=gen).to(dtype).transpose(-1, -2)
        expected = torch.autograd.grad(general, (q, k, v), grad)
        with poisoned_outputs():
            got = torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)
        assert torch.equal(out, general), (dtype, causal, (b, h, l, s, e))
        for name, g, ref in zip("qkv", got, expected):
            assert torch.equal(g, ref), (name, dtype, causal, (b, h, l, s, e), grad_kind)
        first = torch.autograd.grad(out, (q, k, v), grad, create_graph=True)  # torch's nodes: no second derivative
        with pytest.raises(RuntimeError, match="not implemented"):
            torch.autograd.grad(first[0].sum(), (q, k, v), allow_unused=True)
