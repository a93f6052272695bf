"""flashsdpa in diffusers models (tiny configs, random weights).

Both ways diffusers reaches SDPA: `AttnProcessor2_0` (BasicTransformerBlock)
and `dispatch_attention_fn`'s "native" backend (Flux); outputs and gradients
must match torch's SDPA within float32 rounding, every call on flashsdpa.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import flashsdpa

diffusers = pytest.importorskip("diffusers")

from diffusers.models.attention import BasicTransformerBlock  # noqa: E402

try:  # diffusers >= 0.35: a registry of attention backends behind dispatch_attention_fn
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry
except ImportError:
    _AttentionBackendRegistry = None

from flashsdpa.integrations import diffusers as fs_diffusers  # noqa: E402

TORCH_SDPA = F.scaled_dot_product_attention
FP32_TOL = 1e-5
FLUX_LAYERS, FLUX_SINGLE_LAYERS = 1, 2


def active_backend():
    return None if _AttentionBackendRegistry is None else _AttentionBackendRegistry._active_backend


@pytest.fixture(autouse=True)
def _clean():
    active = active_backend()
    yield
    flashsdpa.disable()
    assert F.scaled_dot_product_attention is TORCH_SDPA
    assert active_backend() == active


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm())


def compare(model, run, make_inputs):
    """Output and parameter gradients of `run(model, inputs)` against the same on torch's SDPA."""
    def output_and_grads(block):
        model.zero_grad(set_to_none=True)
        with block:
            out = run(model, make_inputs())
        out.square().mean().backward()
        return out.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    ref, ref_grads = output_and_grads(flashsdpa.sdpa(enabled=False))
    flashsdpa.reset_stats()
    out, grads = output_and_grads(flashsdpa.sdpa())
    assert rel_err(out, ref) <= FP32_TOL
    assert rel_err(grads, ref_grads) <= FP32_TOL
    return flashsdpa.stats()


@pytest.mark.parametrize("text_mask", [False, True], ids=["no mask", "text padding mask"])
def test_basic_transformer_block(text_mask):
    """Self-attention and cross-attention through AttnProcessor2_0."""
    torch.manual_seed(0)
    block = BasicTransformerBlock(dim=64, num_attention_heads=4, attention_head_dim=16, cross_attention_dim=32)
    assert type(block.attn1.processor).__name__ == "AttnProcessor2_0"
    text_padding = torch.ones(2, 7, dtype=torch.bool)
    text_padding[1, 5:] = False

    def inputs():
        g = torch.Generator().manual_seed(1)
        x, text = torch.randn(2, 20, 64, generator=g), torch.randn(2, 7, 32, generator=g)
        return x, text, text_padding if text_mask else None

    def run(model, args):
        x, text, mask = args
        return model(x, encoder_hidden_states=text, encoder_attention_mask=mask)

    stats = compare(block, run, inputs)
    assert stats == {"calls": {"aten": 2}, "fallbacks": {}}


def tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=8,
        num_layers=FLUX_LAYERS,
        num_single_layers=FLUX_SINGLE_LAYERS,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        axes_dims_rope=(4, 6, 6),
    )


def flux_inputs(side: int = 5, text: int = 6):
    g = torch.Generator().manual_seed(1)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return dict(
        hidden_states=torch.randn(2, side * side, 8, generator=g),
        encoder_hidden_states=torch.randn(2, text, 32, generator=g),
        pooled_projections=torch.randn(2, 16, generator=g),
        timestep=torch.tensor([0.25, 0.75]),
        img_ids=torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float(),
        txt_ids=torch.zeros(text, 3),
    )


def run_flux(model, inputs):
    return model(**inputs).sample


def test_flux_through_the_dispatcher_native_backend():
    """diffusers >= 0.35: FluxAttnProcessor -> dispatch_attention_fn -> "native"; before: FluxAttnProcessor2_0."""
    model = tiny_flux()
    stats = compare(model, run_flux, flux_inputs)
    assert stats == {"calls": {"aten": FLUX_LAYERS + FLUX_SINGLE_LAYERS}, "fallbacks": {}}


@pytest.mark.skipif(_AttentionBackendRegistry is None, reason="diffusers < 0.35 has no attention backends")
def test_attention_backend_helper_overrides_a_model_backend_and_restores_it():
    model, inputs = tiny_flux(), flux_inputs()
    with torch.no_grad():
        ref = run_flux(model, inputs)  # diffusers' default "native" backend: torch's SDPA
    default = _AttentionBackendRegistry._active_backend
    model.set_attention_backend("flex")  # processors and diffusers' active backend: not F.scaled_dot_product_attention
    processor = model.transformer_blocks[0].attn.processor
    try:
        flashsdpa.reset_stats()
        with torch.no_grad(), fs_diffusers.attention_backend(model):
            assert processor._attention_backend is None
            assert _AttentionBackendRegistry._active_backend == "native"
            out = run_flux(model, inputs)
        assert processor._attention_backend == "flex" and _AttentionBackendRegistry._active_backend == "flex"
    finally:
        model.reset_attention_backend()
        _AttentionBackendRegistry.set_active_backend(default)
    assert rel_err(out, ref) <= FP32_TOL
    assert flashsdpa.stats() == {"calls": {"aten": FLUX_LAYERS + FLUX_SINGLE_LAYERS}, "fallbacks": {}}
