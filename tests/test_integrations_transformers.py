"""flashsdpa in transformers models (tiny configs, random weights): under enable() and as attn_implementation.

Logits and gradients must match the same model on transformers' "sdpa"
attention (torch's SDPA) within float32 rounding, with GQA and left padding,
and every attention call must have run on flashsdpa.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import flashsdpa

transformers = pytest.importorskip("transformers")

from flashsdpa.integrations import transformers as fs_transformers  # noqa: E402

TORCH_SDPA = F.scaled_dot_product_attention
FP32_TOL = 1e-5
LAYERS = 2
SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture(autouse=True)
def _clean():
    yield
    flashsdpa.disable()
    assert F.scaled_dot_product_attention is TORCH_SDPA
    assert fs_transformers.ATTN_IMPLEMENTATION not in transformers.AttentionInterface._global_mapping, (
        "a test left flashsdpa registered in transformers"
    )


@pytest.fixture
def registration():
    handle = fs_transformers.register()
    yield handle
    handle.remove()


def build(kind: str = "llama", **overrides):
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[kind]
    torch.manual_seed(0)
    return model_class(config_class(**(SMALL | overrides)))


def use_attention(model, name: str) -> None:
    """Switch a model's attention implementation (`set_attn_implementation` is transformers >= 4.54)."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name


def batch(seq: int = 19):
    """Two sequences, the second left-padded by 6 tokens."""
    input_ids = torch.randint(0, SMALL["vocab_size"], (2, seq), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :6] = 0
    return input_ids, attention_mask


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm())


def logits_and_grads(model, input_ids, attention_mask):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    # Loss over real tokens only: padded query rows see no key (outputs are defined but meaningless).
    logits[attention_mask.bool()].square().mean().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return logits.detach()[attention_mask.bool()], grads


def assert_matches_sdpa(model, run, **inputs):
    """`run()` (flashsdpa) against the same model on transformers' sdpa; returns flashsdpa's stats."""
    input_ids, attention_mask = inputs.get("input_ids"), inputs.get("attention_mask")
    use_attention(model, "sdpa")
    ref_logits, ref_grads = logits_and_grads(model, input_ids, attention_mask)
    flashsdpa.reset_stats()
    logits, grads = run(model, input_ids, attention_mask)
    assert rel_err(logits, ref_logits) <= FP32_TOL
    assert rel_err(grads, ref_grads) <= FP32_TOL
    return flashsdpa.stats()


def under_enable(model, input_ids, attention_mask):
    flashsdpa.enable()
    try:
        return logits_and_grads(model, input_ids, attention_mask)
    finally:
        flashsdpa.disable()


def as_attn_implementation(model, input_ids, attention_mask):
    use_attention(model, fs_transformers.ATTN_IMPLEMENTATION)
    return logits_and_grads(model, input_ids, attention_mask)


@pytest.mark.parametrize("padding", [True, False], ids=["left padding", "no padding"])
def test_llama_under_enable(padding):
    input_ids, attention_mask = batch()
    if not padding:
        attention_mask = torch.ones_like(input_ids)
    stats = assert_matches_sdpa(build(), under_enable, input_ids=input_ids, attention_mask=attention_mask)
    assert stats == {"calls": {"aten": LAYERS}, "fallbacks": {}}


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_attn_implementation(kind, registration):
    input_ids, attention_mask = batch()
    stats = assert_matches_sdpa(build(kind), as_attn_implementation, input_ids=input_ids, attention_mask=attention_mask)
    assert stats == {"calls": {"aten": LAYERS}, "fallbacks": {}}


def test_sliding_window_comes_in_the_mask(registration):
    """Mistral with a window shorter than the sequence: the window is in transformers' mask, as with sdpa."""
    model = build("mistral", sliding_window=5)
    input_ids, attention_mask = batch(seq=23)
    stats = assert_matches_sdpa(model, as_attn_implementation, input_ids=input_ids, attention_mask=attention_mask)
    assert stats == {"calls": {"aten": LAYERS}, "fallbacks": {}}
    no_window, _ = as_attn_implementation(build("mistral"), input_ids, attention_mask)
    assert rel_err(no_window, logits_and_grads(model, input_ids, attention_mask)[0]) > 1e-3  # the window mattered


def test_scaling_passes_through_unchanged(registration):
    model = build(head_dim=32)  # head_dim != hidden / heads: scaling = 32 ** -0.5 from the config
    model.model.layers[0].self_attn.scaling = 0.7
    input_ids, attention_mask = batch()
    assert_matches_sdpa(model, as_attn_implementation, input_ids=input_ids, attention_mask=attention_mask)


def test_greedy_generation_with_cache_matches_sdpa(registration):
    """Prefill then one-token decode steps (query length 1, GQA with a padding mask)."""
    model = build().eval()
    input_ids, attention_mask = batch(seq=9)
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    use_attention(model, "sdpa")
    ref = model.generate(input_ids, **kwargs)
    use_attention(model, registration.name)
    flashsdpa.reset_stats()
    out = model.generate(input_ids, **kwargs)
    assert torch.equal(out, ref)
    assert flashsdpa.stats() == {"calls": {"aten": LAYERS * 6}, "fallbacks": {}}


def test_compiled_model_fullgraph(registration):
    model = build()
    input_ids, attention_mask = batch()
    with torch.no_grad():
        ref = model(input_ids=input_ids, attention_mask=attention_mask).logits
    torch._dynamo.reset()
    flashsdpa.enable()
    try:
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        out = compiled(input_ids=input_ids, attention_mask=attention_mask).logits
    finally:
        flashsdpa.disable()
        torch._dynamo.reset()
    assert rel_err(out.detach(), ref) <= FP32_TOL
    assert flashsdpa.stats() == {"calls": {"aten": LAYERS}, "fallbacks": {}}


# ---- the registration ------------------------------------------------------------


def test_register_is_explicit_idempotent_and_removable():
    attention = transformers.AttentionInterface._global_mapping
    masks = transformers.masking_utils.AttentionMaskInterface._global_mapping
    name = fs_transformers.ATTN_IMPLEMENTATION
    assert name not in attention and name not in masks  # importing flashsdpa registered nothing
    first = fs_transformers.register()
    second = fs_transformers.register()
    assert first is second and name in attention and masks[name] is fs_transformers.causal_window_mask
    first.remove()
    assert name not in attention and name not in masks
    second.remove()  # a second remove is a no-op


def test_names_with_flash_are_refused():
    with pytest.raises(ValueError, match="flash-attn kernel"):
        fs_transformers.register("flashsdpa")


class _Module(torch.nn.Module):
    num_key_value_groups = 2
    is_causal = True


@pytest.mark.parametrize("strict", [False, True])
def test_unsupported_call_falls_back_or_raises_in_strict_mode(strict):
    query, key, value = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    mask = torch.ones(1, 1, 5, 5, dtype=torch.float16)  # neither bool, float32 nor the query's dtype
    call = lambda: fs_transformers.attention_forward(_Module(), query, key, value, mask, strict=strict)  # noqa: E731
    if strict:
        with pytest.raises(flashsdpa.UnsupportedError, match="attn_mask dtype float16"):
            call()
    else:
        with pytest.raises(RuntimeError) as error:  # torch's own error for this mask
            call()
        assert "attn_mask" in str(error.value)
        assert flashsdpa.stats()["fallbacks"] == {"attn_mask dtype float16 is not supported": 1}


def test_output_layout_and_gqa_without_copies():
    query, key, value = torch.randn(2, 4, 7, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 6)
    out, weights = fs_transformers.attention_forward(_Module(), query, key, value, None, scaling=0.4)
    ref = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=0.4, enable_gqa=True)
    assert weights is None and out.shape == (2, 7, 4, 6) and out.is_contiguous()
    assert rel_err(out, ref.transpose(1, 2)) <= FP32_TOL



def test_model_bench_runs_every_attention_call_on_flashsdpa():
    from flashsdpa.integrations.model_bench import run_model_bench

    result = run_model_bench("cpu", torch.float32, layers=1, width=128, seq=16, batch=1, warmup=0, steps=1, vocab_size=64)
    assert result["flashsdpa_stats"] == {"calls": {"aten": 2}, "fallbacks": {}}  # 1 layer x (first step + 1 timed)
    assert result["loss_rel_diff"] <= FP32_TOL and result["speedup"] > 0


# ---- windowed, softcapped and sink layers with their native arguments ---------------------------

VARIANT_NAME = "fs_attention"  # no "sdpa" in it: Gemma 2 and gpt-oss declare no SDPA support


@pytest.fixture
def variant_registration():
    handle = fs_transformers.register(VARIANT_NAME)
    yield handle
    handle.remove()


def build_variant(kind: str, float64: bool = False):
    """Tiny random Mistral (every layer windowed), Gemma 2 (softcap, alternating windows) and gpt-oss (sinks,
    alternating windows) with a window of 5, shorter than the sequences below."""
    common = SMALL | dict(sliding_window=5)
    config_class, model_class, extra = {
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {}),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
                   dict(head_dim=16, query_pre_attn_scalar=16, attn_logit_softcapping=2.0)),
        "gpt_oss": (transformers.GptOssConfig, transformers.GptOssForCausalLM,
                    dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                         layer_types=["sliding_attention", "full_attention"])),
    }[kind]  # fmt: skip
    torch.manual_seed(0)
    config = config_class(**(common | extra))
    if kind == "gpt_oss" and float64:
        config._experts_implementation = "eager"  # grouped_mm takes no float64 (slower)
    model = model_class(config)
    if kind == "gpt_oss":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(0.0, 2.0)  # initialised to zeros: make them matter
    return model


def attention_masks_seen(monkeypatch) -> list:
    """The attention_mask argument of every call of flashsdpa's transformers attention function."""
    seen = []
    original = fs_transformers.attention_forward

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append(attention_mask)
        return original(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(fs_transformers, "attention_forward", spy)
    return seen


@pytest.mark.parametrize("kind", ["mistral", "gemma2", "gpt_oss"])
def test_variant_models_within_eagers_own_error(kind, variant_registration, monkeypatch):
    """Logits against eager in float64, within 1.5x eager's own float32 error; the parameters' gradients
    (the sinks' included) as eager's; every layer on flashsdpa, and no mask built for an unpadded batch."""
    model = build_variant(kind, float64=True)
    input_ids = torch.randint(0, SMALL["vocab_size"], (2, 19), generator=torch.Generator().manual_seed(1))
    everything = torch.ones_like(input_ids)  # a padding mask that hides nothing
    use_attention(model, "eager")
    eager, eager_grads = logits_and_grads(model, input_ids, everything)
    truth = model.double()(input_ids).logits.detach().flatten(0, 1)
    model.float()
    use_attention(model, VARIANT_NAME)
    masks = attention_masks_seen(monkeypatch)
    flashsdpa.reset_stats()
    logits, grads = logits_and_grads(model, input_ids, everything)
    assert rel_err(logits, truth) <= max(1.5 * rel_err(eager, truth), 1e-6), (rel_err(logits, truth),
                                                                               rel_err(eager, truth))
    assert rel_err(grads, eager_grads) <= FP32_TOL
    stats = flashsdpa.stats()
    # On the CPU, torch's fused kernel (aten) computes the window and the sinks; it declines softcap (Gemma 2),
    # by name, to tiled.
    assert stats["calls"] == {"tiled" if kind == "gemma2" else "aten": LAYERS}
    assert all(reason.startswith("aten: softcap") for reason in stats["fallbacks"]), stats["fallbacks"]
    assert masks == [None] * LAYERS  # causal (+ window) only: no (B, 1, L, S) mask


@pytest.mark.parametrize("kind", ["mistral", "gemma2", "gpt_oss"])
def test_variant_models_generate_eagers_tokens(kind, variant_registration):
    """Greedy tokens as eager's, padded (transformers' masks) and not (causal + window, no mask)."""
    model = build_variant(kind).eval()
    input_ids, attention_mask = batch(seq=9)
    for mask in (attention_mask, torch.ones_like(attention_mask)):
        kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        use_attention(model, "eager")
        ref = model.generate(input_ids, **kwargs)
        use_attention(model, VARIANT_NAME)
        assert torch.equal(model.generate(input_ids, **kwargs), ref)


def test_chunked_prefill_is_bottom_right_without_a_mask(variant_registration, monkeypatch):
    """A second chunk of 6 queries on a cache of 13 keys: no mask, causal + window aligned bottom-right,
    the logits of the whole sequence's last 6 positions."""
    model = build_variant("mistral").eval()
    input_ids = torch.randint(0, SMALL["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(2))
    use_attention(model, "eager")
    with torch.no_grad():
        ref = model(input_ids).logits[:, 7:]
    use_attention(model, VARIANT_NAME)
    masks = attention_masks_seen(monkeypatch)
    with torch.no_grad():
        cache = model(input_ids[:, :7], use_cache=True).past_key_values
        masks.clear()
        out = model(input_ids[:, 7:], past_key_values=cache, use_cache=True).logits
    assert masks == [None] * LAYERS
    assert rel_err(out, ref) <= FP32_TOL


def test_padded_variant_batch_builds_the_mask(variant_registration, monkeypatch):
    """With padding the window comes in transformers' mask, as with "sdpa"; the logits stay eager's."""
    model = build_variant("gpt_oss")
    input_ids, attention_mask = batch(seq=13)
    use_attention(model, "eager")
    ref, ref_grads = logits_and_grads(model, input_ids, attention_mask)
    use_attention(model, VARIANT_NAME)
    masks = attention_masks_seen(monkeypatch)
    logits, grads = logits_and_grads(model, input_ids, attention_mask)
    assert all(m is not None and m.shape == (2, 1, 13, 13) for m in masks)
    assert rel_err(logits, ref) <= FP32_TOL and rel_err(grads, ref_grads) <= FP32_TOL


def test_softcap_and_sinks_do_not_fall_back_to_torch():
    """torch's SDPA has neither: a call flashsdpa cannot take raises with the reason instead."""
    query, key, value = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    mask = torch.ones(1, 1, 5, 5, dtype=torch.float16)
    with pytest.raises(flashsdpa.UnsupportedError, match="softcap or sinks.*attn_mask dtype float16"):
        fs_transformers.attention_forward(_Module(), query, key, value, mask, softcap=2.0)


def test_window_falls_back_to_torch_as_a_mask(monkeypatch):
    """A windowed call flashsdpa declines goes to torch's SDPA with the window (bottom-right) as a bool mask."""
    query, key, value = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    monkeypatch.setattr(fs_transformers.drop_in, "unsupported_reasons", lambda *args: ["declined for the test"])
    out, _ = fs_transformers.attention_forward(_Module(), query, key, value, None, sliding_window=3)
    i = torch.arange(5).view(-1, 1) + 4  # bottom-right: query i at key i + S - L
    j = torch.arange(9).view(1, -1)
    visible = (j <= i) & (j > i - 3)
    ref = F.scaled_dot_product_attention(query, key, value, attn_mask=visible, enable_gqa=True)
    assert rel_err(out, ref.transpose(1, 2)) <= FP32_TOL


def test_softcap_and_sinks_run_on_flashsdpa_inside_sdpa_kernel_math():
    """sdpa_kernel([MATH]) sends plain calls to torch's math path; torch has no softcap or sinks, so those
    layers still run on flashsdpa (and never raise outside strict mode)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator().manual_seed(5)
    query, key, value = (torch.randn(1, h, 6, 8, generator=gen) for h in (4, 2, 2))
    sinks = torch.randn(4, generator=gen)
    expected, _ = fs_transformers.attention_forward(_Module(), query, key, value, None, softcap=3.0, s_aux=sinks)
    flashsdpa.reset_stats()
    with sdpa_kernel([SDPBackend.MATH]):
        out, _ = fs_transformers.attention_forward(_Module(), query, key, value, None, softcap=3.0, s_aux=sinks)
    assert torch.equal(out, expected)
    assert "torch" not in flashsdpa.stats()["calls"]
