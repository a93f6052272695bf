"""Bad input: a clear exception that names the offending argument, raised before any backend runs."""

from __future__ import annotations

import pytest
import torch

import flashsdpa
from flashsdpa import dispatch

L, S, E = 6, 7, 16


def tensors(device, dtype=torch.float32, heads_q=2, heads_kv=2):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads_q, L, E, generator=g, dtype=dtype).to(device)
    k = torch.randn(1, heads_kv, S, E, generator=g, dtype=dtype).to(device)
    v = torch.randn(1, heads_kv, S, E, generator=g, dtype=dtype).to(device)
    return q, k, v


def other_device(device):
    return "cpu" if device == "cuda" else "meta"


# (id, builder(device) -> (args, kwargs for flashsdpa.attention), exception type, message fragments)
BAD_INPUTS = [
    ("devices", lambda d: ((tensors(d)[0], *(t.to(other_device(d)) for t in tensors(d)[1:])), {}),
     ValueError, ["one device"]),
    ("dtypes", lambda d: ((tensors(d)[0], *(t.half() for t in tensors(d)[1:])), {}), TypeError, ["one dtype"]),
    ("rank_1d", lambda d: ((torch.randn(E, device=d), *tensors(d)[1:]), {}), ValueError, ["query", "2 dims"]),
    ("key_rank_1d", lambda d: ((tensors(d)[0], torch.randn(E, device=d), tensors(d)[2]), {}), ValueError, ["key"]),
    ("head_dims", lambda d: ((tensors(d)[0], tensors(d)[1][..., :8], tensors(d)[2]), {}), ValueError,
     ["head dim"]),
    ("kv_lengths", lambda d: ((*tensors(d)[:2], tensors(d)[2][..., :-1, :]), {}), ValueError,
     ["sequence length", "key", "value"]),
    ("gqa_not_divisible", lambda d: (tensors(d, heads_q=3, heads_kv=2), {"enable_gqa": True}), ValueError,
     ["multiple", "enable_gqa"]),
    ("heads_differ", lambda d: (tensors(d, heads_q=4, heads_kv=2), {}), ValueError, ["heads", "enable_gqa=True"]),
    ("kv_heads_differ", lambda d: ((tensors(d, heads_q=6)[0], tensors(d, heads_kv=2)[1], tensors(d, heads_kv=3)[2]),
                                   {}), ValueError, ["key and value", "heads"]),
    ("batch_not_broadcast", lambda d: ((tensors(d)[0].expand(2, -1, -1, -1), *(t.expand(3, -1, -1, -1) for t in
                                       tensors(d)[1:])), {}), ValueError, ["batch"]),
    ("mask_shape", lambda d: (tensors(d), {"attn_mask": torch.ones(L + 1, S, dtype=torch.bool, device=d)}),
     ValueError, ["attn_mask", "broadcast"]),
    ("mask_5d", lambda d: (tensors(d), {"attn_mask": torch.ones(2, 1, 2, L, S, dtype=torch.bool, device=d)}),
     ValueError, ["attn_mask"]),
    ("mask_int64", lambda d: (tensors(d), {"attn_mask": torch.ones(L, S, dtype=torch.int64, device=d)}), TypeError,
     ["attn_mask", "int64"]),
    ("mask_float64", lambda d: (tensors(d), {"attn_mask": torch.zeros(L, S, dtype=torch.float64, device=d)}),
     TypeError, ["attn_mask", "float64"]),
    ("mask_device", lambda d: (tensors(d), {"attn_mask": torch.ones(L, S, dtype=torch.bool, device=other_device(d))}),
     ValueError, ["attn_mask"]),
    ("mask_not_tensor", lambda d: (tensors(d), {"attn_mask": [[True] * S] * L}), TypeError, ["attn_mask"]),
    ("dropout_negative", lambda d: (tensors(d), {"dropout_p": -0.1}), ValueError, ["dropout_p", "-0.1"]),
    ("dropout_bool", lambda d: (tensors(d), {"dropout_p": True}), ValueError, ["dropout_p"]),
    ("int_inputs", lambda d: (tuple(t.to(torch.int64) for t in tensors(d)), {}), TypeError,
     ["query", "floating"]),
    ("not_a_tensor", lambda d: ((tensors(d)[0].tolist(), *tensors(d)[1:]), {}), TypeError, ["query", "Tensor"]),
    ("dropout_above_one", lambda d: (tensors(d), {"dropout_p": 1.5}), ValueError, ["dropout_p", "1.5"]),
    ("scale_string", lambda d: (tensors(d), {"scale": "0.5"}), TypeError, ["scale"]),
    ("scale_1d_tensor", lambda d: (tensors(d), {"scale": torch.tensor([0.5])}), TypeError, ["scale"]),
    ("mask_1d", lambda d: (tensors(d), {"attn_mask": torch.ones(S, dtype=torch.bool, device=d)}), ValueError,
     ["attn_mask", "2 dims", f"({S},)"]),
    ("causal_not_bool", lambda d: (tensors(d), {"causal": 1}), TypeError, ["is_causal"]),
    ("unknown_backend", lambda d: (tensors(d), {"backend": "cudnn"}), ValueError, ["backend", "cudnn"]),
    ("fp32_precision", lambda d: (tensors(d), {"fp32_precision": "fast"}), ValueError, ["fp32_precision", "fast"]),
]  # fmt: skip


@pytest.fixture
def no_backend_may_run(monkeypatch):
    """Any backend forward/backward call fails the test: errors must come before any kernel."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a backend ran before the bad input was rejected")

    for backend in dispatch.BACKENDS.values():
        monkeypatch.setattr(type(backend), "forward", forbidden)
        monkeypatch.setattr(type(backend), "backward", forbidden)


@pytest.mark.parametrize("name, build, error, fragments", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_clearly(name, build, error, fragments, device, no_backend_may_run):
    args, kwargs = build(device)
    with pytest.raises(error) as info:
        flashsdpa.attention(*args, **kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{name}: {fragment!r} not in {message!r}"
    assert flashsdpa.stats()["calls"] == {}


SDPA_NAMES = {"causal": "is_causal"}


@pytest.mark.parametrize(
    "name, build, error, fragments",
    [b for b in BAD_INPUTS if "backend" not in b[0] and b[0] != "fp32_precision"],
    ids=[b[0] for b in BAD_INPUTS if "backend" not in b[0] and b[0] != "fp32_precision"],
)
def test_bad_input_through_sdpa(name, build, error, fragments, device, no_backend_may_run):
    """The drop-in function rejects the same inputs with the same messages."""
    args, kwargs = build(device)
    kwargs = {SDPA_NAMES.get(key, key): value for key, value in kwargs.items()}
    with pytest.raises(error) as info:
        flashsdpa.scaled_dot_product_attention(*args, **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_unknown_backend_in_use_backend():
    with pytest.raises(ValueError, match="backend.*'cudnn'"):
        with flashsdpa.use_backend("cudnn"):
            pass  # pragma: no cover
    assert dispatch.pinned_backend() is None


def test_error_message_shows_shapes(device):
    """Shape errors print the shapes involved, so the caller can see what went wrong."""
    q, k, v = tensors(device)
    with pytest.raises(ValueError) as info:
        flashsdpa.attention(q, k, v[..., :-1, :])
    assert str(tuple(v[..., :-1, :].shape)) in str(info.value) and str(tuple(k.shape)) in str(info.value)


def test_torch_accepts_what_we_accept(device):
    """Inputs near the edge that torch accepts are accepted too (validation is not stricter than torch)."""
    q, k, v = tensors(device, dtype=torch.float16)
    # (a 1-D (S,) mask is rejected, as torch's default dispatch rejects it: see BAD_INPUTS)
    flashsdpa.attention(q, k, v, attn_mask=torch.zeros(L, S, dtype=torch.float32, device=device), backend="tiled")
    flashsdpa.attention(q, k, v, scale=0.0, backend="tiled")  # a zero scale is finite: uniform weights
    flashsdpa.attention(q, k, v, dropout_p=0.0, causal=False, backend="tiled")
    flashsdpa.attention(q[0, 0], k[0, 0], v[0, 0], backend="tiled")  # 2D
