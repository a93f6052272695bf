"""torch.compile(fullgraph=True) traces flashsdpa without graph breaks and matches eager, forward and backward.

The transformer-block test uses the "inductor" backend (it compiles C++ on the
CPU: 12-21 s measured on the 2-core machine, the largest single test);
the per-feature tests use "aot_eager", which traces the same graphs (custom-op
fake kernels, autograd) without generating code.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import flashsdpa
from helpers import generator, rel_err, seq


class Block(nn.Module):
    """Pre-norm transformer block: qkv projection, causal flashsdpa attention, output projection, MLP."""

    def __init__(self, dim=32, heads=4, backend="tiled"):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        batch, length, dim = x.shape
        qkv = self.qkv(self.norm1(x)).view(batch, length, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, L, E) views of the projection
        attended = flashsdpa.attention(q, k, v, causal=True, backend=self.backend)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, dim))
        return x + self.mlp(self.norm2(x))


def eager_and_compiled(model, x, compile_backend):
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
    results = []
    for fn in (model, compiled):
        model.zero_grad(set_to_none=True)
        inp = x.detach().clone().requires_grad_()
        out = fn(inp)
        out.square().mean().backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        results.append((out.detach(), inp.grad.clone(), grads))
    return results


def assert_same(eager, compiled, bar):
    (out_e, dx_e, grads_e), (out_c, dx_c, grads_c) = eager, compiled
    assert rel_err(out_c, out_e) <= bar
    assert rel_err(dx_c, dx_e) <= bar
    for name in grads_e:
        assert rel_err(grads_c[name], grads_e[name]) <= bar, name


def test_transformer_block_inductor(device):
    """fullgraph inductor compile of a block on the tiled backend matches eager (float32, to 1e-5)."""
    torch.manual_seed(0)
    model = Block(backend="tiled").to(device)
    x = torch.randn(2, 40, 32, generator=generator(90)).to(device)
    eager, compiled = eager_and_compiled(model, x, "inductor")
    assert_same(eager, compiled, 1e-5)
    assert flashsdpa.stats()["calls"]["tiled"] == 2, "the custom op ran (and was counted) in both runs"


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_transformer_block_aot_eager(backend, device):
    torch.manual_seed(0)
    model = Block(backend=backend).to(device)
    x = torch.randn(1, seq(19), 32, generator=generator(91)).to(device)
    eager, compiled = eager_and_compiled(model, x, "aot_eager")
    assert_same(eager, compiled, 1e-6)


def test_compile_masks_gqa_lse(device):
    """A float mask that requires grad, GQA and return_lse, all traced in one graph."""
    gen = generator(92)
    q = torch.randn(2, 4, 12, 16, generator=gen).to(device).requires_grad_()
    k = torch.randn(2, 2, 20, 16, generator=gen).to(device).requires_grad_()
    v = torch.randn(2, 2, 20, 16, generator=gen).to(device).requires_grad_()
    mask = torch.randn(2, 1, 12, 20, generator=gen).to(device).requires_grad_()

    def fn(q, k, v, mask):
        out, lse = flashsdpa.attention(q, k, v, attn_mask=mask, enable_gqa=True, scale=0.3, return_lse=True,
                                       backend="tiled")  # fmt: skip
        return out.sum() + lse.sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    eager_loss = fn(q, k, v, mask)
    eager_grads = torch.autograd.grad(eager_loss, (q, k, v, mask))
    compiled_loss = compiled(q, k, v, mask)
    compiled_grads = torch.autograd.grad(compiled_loss, (q, k, v, mask))
    assert rel_err(compiled_loss, eager_loss) < 1e-6
    for a, b in zip(compiled_grads, eager_grads):
        assert a.shape == b.shape and rel_err(a, b) < 1e-6


def test_compile_sdpa_dropin_with_dropout(device):
    """The drop-in function with dropout traces without graph breaks and stays reproducible under manual_seed."""

    def fn(q, k, v):
        return flashsdpa.scaled_dot_product_attention(q, k, v, dropout_p=0.3, is_causal=True)

    gen = generator(93)
    q, k, v = (torch.randn(1, 2, 16, 16, generator=gen).to(device) for _ in range(3))
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.manual_seed(4)
    first = compiled(q, k, v)
    torch.manual_seed(4)
    second = compiled(q, k, v)
    torch.manual_seed(4)
    eager = fn(q, k, v)
    assert torch.equal(first, second)
    assert torch.equal(first, eager), "aot_eager draws the dropout seed from torch's generator as eager does"
