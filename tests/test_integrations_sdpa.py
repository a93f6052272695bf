"""flashsdpa.enable()/disable()/sdpa(): routing F.scaled_dot_product_attention through flashsdpa.

Every check compares with torch's own SDPA on the same inputs: a routed call
agrees within float32 rounding, a fallback gives torch's exact result or
torch's own error, and stats() says which happened and why.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import flashsdpa
from flashsdpa.integrations import sdpa as drop_in

TORCH_SDPA = F.scaled_dot_product_attention  # captured at import, before any test patches it
FP32_TOL = 1e-5


@pytest.fixture(autouse=True)
def _nothing_left_patched():
    assert F.scaled_dot_product_attention is TORCH_SDPA, "a previous test left the patch installed"
    yield
    leaked = F.scaled_dot_product_attention is not TORCH_SDPA or drop_in.current_mode().enabled
    flashsdpa.disable()
    assert not leaked, "the test left flashsdpa enabled"
    assert F.scaled_dot_product_attention is TORCH_SDPA


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm())


def qkv(*, heads=4, kv_heads=4, seq_q=37, seq_kv=45, dim=16, batch=2, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    make = lambda h, s: torch.randn(batch, h, s, dim, generator=g).requires_grad_(requires_grad)  # noqa: E731
    return make(heads, seq_q), make(kv_heads, seq_kv), make(kv_heads, seq_kv)


# ---- routing and agreement ------------------------------------------------------


CASES = {
    "plain": dict(),
    "causal": dict(is_causal=True),
    "gqa": dict(enable_gqa=True, _kv_heads=2),
    "gqa causal": dict(enable_gqa=True, is_causal=True, _kv_heads=1),
    "bool key padding": dict(_mask="bool"),
    "float mask": dict(_mask="float"),
    "scale": dict(scale=0.3),
}


def _case(name):
    options = dict(CASES[name])
    q, k, v = qkv(kv_heads=options.pop("_kv_heads", 4), requires_grad=True)
    mask = options.pop("_mask", None)
    if mask == "bool":
        keep = torch.ones(2, 1, 1, k.shape[2], dtype=torch.bool)
        keep[1, ..., 30:] = False
        options["attn_mask"] = keep
    elif mask == "float":
        options["attn_mask"] = torch.randn(q.shape[2], k.shape[2])
    return (q, k, v), options


@pytest.mark.parametrize("name", list(CASES))
def test_routed_call_matches_torch_forward_and_backward(name):
    (q, k, v), options = _case(name)
    ref = F.scaled_dot_product_attention(q, k, v, **options)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    with flashsdpa.sdpa():
        out = F.scaled_dot_product_attention(q, k, v, **options)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert rel_err(out, ref) <= FP32_TOL
    for grad, ref_grad in zip(grads, ref_grads):
        assert rel_err(grad, ref_grad) <= FP32_TOL
    assert flashsdpa.stats() == {"calls": {"aten": 1}, "fallbacks": {}}


def test_positional_and_keyword_arguments_are_torch_s():
    q, k, v = qkv()
    mask = torch.randn(37, 45)
    with flashsdpa.sdpa():
        positional = F.scaled_dot_product_attention(q, k, v, mask, 0.0, False, scale=0.5)
        keywords = F.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=mask, scale=0.5)
        with pytest.raises(TypeError) as ours:
            F.scaled_dot_product_attention(q, k, v, mask, 0.0, False, 0.5)  # scale is keyword-only in torch
    with pytest.raises(TypeError) as torchs:
        F.scaled_dot_product_attention(q, k, v, mask, 0.0, False, 0.5)
    assert str(ours.value) == str(torchs.value)
    ref = F.scaled_dot_product_attention(q, k, v, mask, scale=0.5)
    assert rel_err(positional, ref) <= FP32_TOL and rel_err(keywords, ref) <= FP32_TOL
    assert flashsdpa.stats()["calls"] == {"aten": 2}


# ---- fallbacks ------------------------------------------------------------------


def test_unsupported_but_valid_call_falls_back_with_torch_s_exact_result():
    q, k, v = qkv()
    mask = torch.rand(37, 45) > 0.3
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=1.0)
    with flashsdpa.sdpa():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=1.0)
    assert torch.equal(out, ref)
    assert flashsdpa.stats() == {
        "calls": {"torch": 1},
        "fallbacks": {"dropout_p 1.0 is not supported (must be below 1)": 1},
    }


def test_mask_with_is_causal_keeps_torch_s_behaviour():
    """torch raises or (CPU flash kernel) applies both; the drop-in leaves it to torch either way."""
    q, k, v = qkv()
    mask = torch.randn(37, 45)
    try:
        ref, ref_error = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True), None
    except RuntimeError as error:
        ref, ref_error = None, error
    with flashsdpa.sdpa():
        if ref_error is not None:
            with pytest.raises(type(ref_error), match=str(ref_error)[:40]):
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)
        else:
            assert torch.equal(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True), ref)
    assert flashsdpa.stats()["fallbacks"] == {"attn_mask together with is_causal=True is left to torch": 1}


INVALID_FOR_TORCH = {
    "int64 mask": (lambda q, k, v: dict(attn_mask=torch.ones(37, 45, dtype=torch.int64)), "attn_mask dtype int64"),
    "float64 mask": (
        lambda q, k, v: dict(attn_mask=torch.ones(37, 45, dtype=torch.float64)),
        "attn_mask dtype float64",
    ),
    "1-d mask": (lambda q, k, v: dict(attn_mask=torch.ones(45)), "attn_mask with 1 dims"),
    "list mask": (lambda q, k, v: dict(attn_mask=[[0.0] * 45] * 37), "attn_mask is a list, not a tensor"),
    "heads without gqa": (lambda q, k, v: dict(key=k[:, :2], value=v[:, :2]), "invalid arguments"),
    "negative dropout": (lambda q, k, v: dict(dropout_p=-0.5), "invalid arguments"),
    "mixed dtypes": (lambda q, k, v: dict(key=k.double()), "invalid arguments"),
}


@pytest.mark.parametrize("name", list(INVALID_FOR_TORCH))
def test_call_invalid_for_torch_raises_torch_s_own_error(name):
    q, k, v = qkv()
    make, reason = INVALID_FOR_TORCH[name]
    kwargs = dict(query=q, key=k, value=v) | make(q, k, v)
    with pytest.raises(Exception) as torchs:
        F.scaled_dot_product_attention(**kwargs)
    with flashsdpa.sdpa():
        with pytest.raises(Exception) as ours:
            F.scaled_dot_product_attention(**kwargs)
    assert type(ours.value) is type(torchs.value) and str(ours.value) == str(torchs.value)
    (recorded,) = flashsdpa.stats()["fallbacks"]
    assert recorded.startswith(reason)


def test_vmap_falls_back_to_torch():
    q, k, v = qkv()
    ref = torch.vmap(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True))(q, k, v)
    with flashsdpa.sdpa():
        out = torch.vmap(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True))(q, k, v)
    assert torch.equal(out, ref)
    assert flashsdpa.stats()["calls"] == {"torch": 1}


# ---- strict mode ----------------------------------------------------------------


def _unsupported_call():
    q, k, v = qkv()
    return F.scaled_dot_product_attention(q, k, v, dropout_p=1.0)


@pytest.mark.parametrize("how", ["enable", "block", "environment"])
def test_strict_mode_raises_with_the_reason(how, monkeypatch):
    if how == "environment":
        monkeypatch.setenv("FLASHSDPA_STRICT", "1")
    with pytest.raises(flashsdpa.UnsupportedError, match="dropout_p 1.0 is not supported") as error:
        if how == "enable":
            flashsdpa.enable(strict=True)
            try:
                _unsupported_call()
            finally:
                flashsdpa.disable()
        else:
            with flashsdpa.sdpa(strict=True if how == "block" else None):
                _unsupported_call()
    assert error.value.reasons == ["dropout_p 1.0 is not supported (must be below 1)"]
    assert flashsdpa.stats() == {"calls": {}, "fallbacks": {}}


def test_strict_mode_still_runs_supported_calls():
    q, k, v = qkv()
    with flashsdpa.sdpa(strict=True):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert rel_err(out, F.scaled_dot_product_attention(q, k, v, is_causal=True)) <= FP32_TOL


# ---- switching on and off -------------------------------------------------------


def _routed() -> bool:
    """Whether an SDPA call made now from this thread runs on flashsdpa (by the stats)."""
    before = flashsdpa.stats()["calls"].get("aten", 0)
    q, k, v = qkv(seq_q=3, seq_kv=3, batch=1, heads=1, kv_heads=1)
    F.scaled_dot_product_attention(q, k, v)
    return flashsdpa.stats()["calls"].get("aten", 0) > before


def test_enable_is_idempotent_and_disable_restores_torch_s_function():
    assert not _routed()
    flashsdpa.enable()
    flashsdpa.enable()
    assert F.scaled_dot_product_attention is drop_in.scaled_dot_product_attention
    assert _routed()
    flashsdpa.disable()
    assert F.scaled_dot_product_attention is TORCH_SDPA
    assert not _routed()
    flashsdpa.disable()  # disabling when off is a no-op


def test_blocks_nest_and_restore_on_exit_and_on_error():
    with flashsdpa.sdpa():
        assert _routed()
        with flashsdpa.sdpa(enabled=False):
            assert not _routed()
            with pytest.raises(KeyError):
                with flashsdpa.sdpa():
                    assert _routed()
                    raise KeyError("inside")
            assert not _routed()
        assert _routed()
    assert not _routed()
    assert F.scaled_dot_product_attention is TORCH_SDPA


def test_disable_inside_a_block_takes_effect_when_the_block_exits():
    flashsdpa.enable()
    with flashsdpa.sdpa():
        flashsdpa.disable()
        assert _routed()  # the block wins in its thread
    assert not _routed()
    assert F.scaled_dot_product_attention is TORCH_SDPA


def test_enable_and_block_combine():
    with flashsdpa.sdpa(enabled=False):
        flashsdpa.enable()
        assert not _routed()  # the block opted this thread out
    assert _routed()
    flashsdpa.disable()


def test_a_block_affects_only_its_own_thread():
    inside, outside_done = threading.Event(), threading.Event()
    seen = {}

    def in_block():
        with flashsdpa.sdpa():
            inside.set()
            outside_done.wait(timeout=30)
            seen["block thread"] = drop_in.is_enabled()

    thread = threading.Thread(target=in_block)
    thread.start()
    inside.wait(timeout=30)
    seen["other thread"] = drop_in.is_enabled()
    seen["patched"] = F.scaled_dot_product_attention is drop_in.scaled_dot_product_attention
    outside_done.set()
    thread.join()
    assert seen == {"block thread": True, "other thread": False, "patched": True}
    assert F.scaled_dot_product_attention is TORCH_SDPA


def test_backward_in_another_thread_follows_the_open_block():
    """Checkpoint recomputation in a backward run by a thread without a block (as autograd's CUDA
    threads are) takes the forward's path: otherwise torch.utils.checkpoint raises a CheckpointError."""
    q, k, v = qkv(requires_grad=True)
    attention = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True)  # noqa: E731
    ref = torch.autograd.grad(attention(q, k, v).square().sum(), (q, k, v))
    errors, grads = [], []

    def backward(out):
        try:
            grads.extend(torch.autograd.grad(out.square().sum(), (q, k, v)))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    with flashsdpa.sdpa():
        out = torch.utils.checkpoint.checkpoint(attention, q, k, v, use_reentrant=False)
        thread = threading.Thread(target=backward, args=(out,))
        thread.start()
        thread.join()
    assert errors == []
    assert all(rel_err(g, r) <= FP32_TOL for g, r in zip(grads, ref))
    assert flashsdpa.stats()["calls"] == {"aten": 2}  # the forward and its recomputation


def test_enable_reaches_every_thread():
    results = []
    flashsdpa.enable()
    try:
        thread = threading.Thread(target=lambda: results.append(drop_in.is_enabled()))
        thread.start()
        thread.join()
    finally:
        flashsdpa.disable()
    assert results == [True]


def test_many_threads_entering_and_leaving_blocks():
    q, k, v = qkv(seq_q=20, seq_kv=20)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    errors, barrier = [], threading.Barrier(8)

    def worker(index):
        try:
            barrier.wait(timeout=30)
            for i in range(10):
                with flashsdpa.sdpa(enabled=(index + i) % 2 == 0):
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                    assert rel_err(out, ref) <= FP32_TOL
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert flashsdpa.stats()["calls"] == {"aten": 40}  # calls in enabled=False blocks go straight to torch
    assert F.scaled_dot_product_attention is TORCH_SDPA


# ---- torch's own modules ----------------------------------------------------------


def _compare_module(module, *args, **kwargs):
    torch.manual_seed(0)
    ref = module(*args, **kwargs)
    ref = ref[0] if isinstance(ref, tuple) else ref
    ref_grads = torch.autograd.grad(ref.square().sum(), list(module.parameters()))
    flashsdpa.reset_stats()
    with flashsdpa.sdpa():
        out = module(*args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
    grads = torch.autograd.grad(out.square().sum(), list(module.parameters()))
    assert rel_err(out, ref) <= FP32_TOL
    assert rel_err(torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in ref_grads])) <= FP32_TOL
    return flashsdpa.stats()


def _padding_and_causal(batch=3, seq=19):
    key_padding = torch.zeros(batch, seq, dtype=torch.bool)
    key_padding[1, 13:] = True  # nn.MultiheadAttention's bool masks: True = may NOT attend
    return key_padding, torch.ones(seq, seq, dtype=torch.bool).triu(1)


@pytest.mark.parametrize("masks", ["none", "key padding", "causal", "causal + key padding"])
def test_multihead_attention(masks):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    x = torch.randn(3, 19, 32)
    key_padding, causal = _padding_and_causal()
    kwargs = {
        "none": {},
        "key padding": dict(key_padding_mask=key_padding),
        "causal": dict(attn_mask=causal, is_causal=True),
        "causal + key padding": dict(attn_mask=causal, key_padding_mask=key_padding),
    }[masks]
    stats = _compare_module(mha, x, x, x, need_weights=False, **kwargs)
    assert stats == {"calls": {"aten": 1}, "fallbacks": {}}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_transformer_encoder_layer(training):
    """Runs with grad, so eval mode also takes the SDPA path (its fused fast path needs no-grad)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True).train(training)
    x = torch.randn(3, 19, 32)
    key_padding, causal = _padding_and_causal()
    stats = _compare_module(layer, x, src_mask=causal, is_causal=True, src_key_padding_mask=key_padding)
    assert stats == {"calls": {"aten": 1}, "fallbacks": {}}


# ---- torch.compile ------------------------------------------------------------------


class TinyAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(32, 3 * 32)

    def forward(self, x, mask=None):
        q, k, v = self.qkv(x).unflatten(-1, (3, 4, 8)).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None).sum(1)


def _graph_ops(gm: torch.fx.GraphModule) -> set[str]:
    return {str(node.target) for node in gm.graph.nodes if node.op == "call_function"}


def test_compiled_model_under_enable_traces_flashsdpa_ops_fullgraph():
    torch.manual_seed(0)
    model, x = TinyAttention(), torch.randn(2, 24, 32)
    ref = model(x)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(_graph_ops(gm))
        return gm

    torch._dynamo.reset()
    flashsdpa.enable()
    try:
        compiled = torch.compile(model, fullgraph=True, backend=capture)
        out = compiled(x)
        out_aot = torch.compile(model, fullgraph=True, backend="aot_eager")(x)  # traces the backward too
        out_aot.sum().backward()
    finally:
        flashsdpa.disable()
    assert any("flashsdpa.attention_forward" in op for op in graphs[0])
    assert not any("scaled_dot_product" in op for op in graphs[0])
    assert rel_err(out, ref) <= FP32_TOL and rel_err(out_aot, ref) <= FP32_TOL
    assert flashsdpa.stats()["calls"] == {"aten": 2}

    # Disabled, the same compiled function recompiles (dynamo guards on the patch) and runs torch's SDPA.
    compiled(x)
    assert flashsdpa.stats()["calls"] == {"aten": 2}
    torch._dynamo.reset()
