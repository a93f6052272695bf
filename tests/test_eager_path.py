"""The eager fast path (`ops.forward`) is indistinguishable from calling the custom ops.

Plain eager calls skip the custom ops' dispatcher layers; wherever something
could observe the op (a torch function or dispatch mode, fake tensors, the
profiler, functorch transforms, torch.compile) the call goes through the op.
Both must give bit-identical outputs and gradients and count the same stats.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.overrides import TorchFunctionMode

import flashsdpa
from helpers import BACKENDS, generator, randn


class _SeesOps(TorchFunctionMode):
    """A torch function mode (it forces the op path) that records what it sees."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def _problem(device, requires_grad, mask_grad=False):
    """requires_grad: a bool for q, k and v together, or a string of the ones that require it ("k", "qv")."""
    gen = generator(7)
    q, k, v = (randn((2, 4, 9, 16), gen, torch.float32, device) for _ in range(3))
    for name, t in zip("qkv", (q, k, v)):
        t.requires_grad_(requires_grad if isinstance(requires_grad, bool) else name in requires_grad)
    mask = randn((2, 1, 9, 9), gen, torch.float32, device).requires_grad_(mask_grad)
    return q, k, v, mask


def _run(q, k, v, mask, backend):
    out, lse = flashsdpa.attention(q, k, v, attn_mask=mask, causal=True, backend=backend, return_lse=True)
    if not out.requires_grad:
        return out, lse, None
    grads = torch.autograd.grad(out, [t for t in (q, k, v, mask) if t.requires_grad], torch.ones_like(out))
    return out, lse, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "requires_grad, mask_grad", [(False, False), (True, True), ("k", False), ("qv", False), (False, True)]
)
def test_fast_path_matches_the_op_path(backend, requires_grad, mask_grad, device):
    q, k, v, mask = _problem(device, requires_grad, mask_grad=mask_grad)
    fast = _run(q, k, v, mask, backend)
    fast_stats = flashsdpa.stats()
    flashsdpa.reset_stats()
    mode = _SeesOps()
    with mode:
        through_op = _run(q, k, v, mask, backend)
    assert any("attention_forward" in name for name in mode.seen), "the mode forces the op path"
    assert flashsdpa.stats() == fast_stats
    for a, b in zip(fast[:2], through_op[:2]):
        assert torch.equal(a, b)
    assert (fast[2] is None) == (through_op[2] is None) == (not (requires_grad or mask_grad))
    if fast[2] is not None:
        assert len(fast[2]) == len(through_op[2])
        for a, b in zip(fast[2], through_op[2]):
            assert torch.equal(a, b)


def test_fake_tensors_take_the_op_path(device):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 3, 5, 16, device=device)
        out = flashsdpa.attention(q, q, q)
    assert out.shape == (2, 3, 5, 16)
    assert flashsdpa.stats()["calls"] == {}, "nothing ran: the op's fake implementation answered"


def test_meta_tensors_take_the_op_path():
    q = torch.empty(1, 2, 5, 8, device="meta")
    assert flashsdpa.attention(q, q, q, backend="tiled").shape == (1, 2, 5, 8)
    assert flashsdpa.stats()["calls"] == {}, "the op's fake implementation answered"


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:DeprecationWarning")  # traced on purpose
def test_jit_trace_records_the_op(device):
    x = torch.randn(1, 2, 5, 8, device=device)
    f = lambda t: flashsdpa.attention(t, t, t, backend="tiled")  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shapes read as Python ints
        traced = torch.jit.trace(f, (x,))
    assert "flashsdpa::attention_forward" in str(traced.graph)
    assert torch.equal(traced(x * 2), f(x * 2))


def test_profiler_still_sees_the_op(device):
    q, k, v, _ = _problem(device, False)
    with torch.profiler.profile() as prof:
        flashsdpa.attention(q, k, v, backend="tiled")
    assert any(e.name == "flashsdpa::attention_forward" for e in prof.events())


def test_no_graph_below_autograd(device):
    """Inside another op's implementation (autograd excluded) the op records no graph; neither does the fast path."""
    q, k, v, _ = _problem(device, True)
    with torch._C._AutoDispatchBelowAutograd():
        out = flashsdpa.attention(q, k, v, backend="tiled")
    assert out.grad_fn is None and not out.requires_grad


def test_no_grad_mode_records_no_graph(device):
    q, k, v, _ = _problem(device, True)
    with torch.no_grad():
        assert not flashsdpa.attention(q, k, v).requires_grad
    assert flashsdpa.attention(q, k, v).requires_grad


def test_vmap_takes_the_op_path(device):
    """functorch transforms see the op (and its fallback rule): vmap works as it did through the op."""
    q = torch.randn(3, 2, 2, 5, 8, device=device)
    out = torch.vmap(lambda x: flashsdpa.attention(x, x, x, backend="tiled"))(q)
    for i in range(3):
        assert torch.equal(out[i], flashsdpa.attention(q[i], q[i], q[i], backend="tiled"))


def test_inference_mode_and_double_backward(device):
    """inference_mode records no graph on the fast path either; create_graph raises the op's clear error."""
    q, k, v, mask = _problem(device, True)
    with torch.inference_mode():
        out = flashsdpa.attention(q, k, v, attn_mask=mask)
    assert out.grad_fn is None and not out.requires_grad
    out = flashsdpa.attention(q, k, v, attn_mask=mask)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out), create_graph=True)
