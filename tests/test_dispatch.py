"""Backend choice, pins, fallbacks with reasons, stats, the descriptor/kernel key, and the thread-safe cache."""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import flashsdpa
from flashsdpa import dispatch
from flashsdpa.cache import KernelCache
from flashsdpa.descriptor import Alignment, AttentionDescriptor, GradientPrecision, MaskKind
from helpers import Case, assert_forward_close, check_forward, generator, oracle, qkv, run, seq


def small_problem(device, dtype=torch.float16, head_dim=16, seq_q=None):
    gen = generator(80)
    return qkv((1, 2), (1, 2), seq_q or seq(5), seq(9), head_dim, gen, dtype, device)


# --------------------------------------------------------------------------- pinned backends fail loudly


@pytest.mark.parametrize(
    "dtype, head_dim, reason",
    [(torch.float64, 16, "float64"), (torch.float16, 520, "head dim"), (torch.float16, 0, "head dim 0")],
    ids=["float64", "head_dim_520", "head_dim_0"],
)
def test_pinned_triton_raises_unsupported(dtype, head_dim, reason, device):
    q, k, v = small_problem(device, dtype, head_dim)
    for pin in ("argument", "use_backend"):
        with pytest.raises(flashsdpa.UnsupportedError) as info:
            if pin == "argument":
                flashsdpa.attention(q, k, v, backend="triton")
            else:
                with flashsdpa.use_backend("triton"):
                    flashsdpa.scaled_dot_product_attention(q, k, v)
        assert "triton" in str(info.value) and reason in str(info.value)
        assert any(reason in r for r in info.value.reasons)
        assert isinstance(info.value, ValueError)  # catchable as a bad-argument error
    assert flashsdpa.stats()["calls"] == {}, "nothing may run for an unsupported pinned problem"


def test_reasons_list_every_problem(device):
    """float64 and head dim 520 at once: both reasons are given."""
    q, k, v = small_problem(device, torch.float64, 520)
    with pytest.raises(flashsdpa.UnsupportedError) as info:
        flashsdpa.attention(q, k, v, backend="triton")
    assert len(info.value.reasons) == 2


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    desc = AttentionDescriptor((1,), 2, 2, 8, 8, 16, 16, torch.float16, "cpu")
    backend = dispatch.BACKENDS["triton"]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert any("TRITON_INTERPRET" in r for r in backend.unsupported_reasons(desc, torch.device("cpu")))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.unsupported_reasons(desc, torch.device("cpu")) == []


# --------------------------------------------------------------------------- automatic choice and fallbacks


def test_automatic_choice(device, monkeypatch):
    # (On an sm_90 GPU "hopper" comes first and declines this head dim with a reason: tests/test_hopper.py.)
    monkeypatch.setitem(dispatch.AUTOMATIC_ORDER, "cuda", ("triton", "tiled"))
    q, k, v = small_problem(device)
    flashsdpa.attention(q, k, v)
    expected = "triton" if device == "cuda" else "aten"
    assert flashsdpa.stats() == {"calls": {expected: 1}, "fallbacks": {}}
    flashsdpa.scaled_dot_product_attention(q, k, v)
    assert flashsdpa.stats()["calls"] == {expected: 2}


def test_automatic_fallback_records_reason(device, monkeypatch):
    """Where triton comes first (CUDA; forced on CPU here), a problem it cannot take falls back to tiled with a reason."""
    monkeypatch.setitem(dispatch.AUTOMATIC_ORDER, device, ("triton", "tiled"))
    q, k, v = small_problem(device, torch.float64)
    out = flashsdpa.attention(q, k, v)
    ref, _ = oracle(q, k, v)
    assert_forward_close("fallback", out, ref, None, torch.float64)
    stats = flashsdpa.stats()
    assert stats["calls"] == {"tiled": 1}
    ((reason, count),) = stats["fallbacks"].items()
    assert reason.startswith("triton:") and "float64" in reason and count == 1
    q, k, v = small_problem(device, torch.float16, 520)
    flashsdpa.attention(q, k, v)
    flashsdpa.attention(q, k, v)
    stats = flashsdpa.stats()
    assert stats["calls"] == {"tiled": 3}
    head_dim_reasons = [r for r in stats["fallbacks"] if "head dim" in r]
    assert len(head_dim_reasons) == 1 and stats["fallbacks"][head_dim_reasons[0]] == 2
    # a problem triton can take goes to triton, with no fallback recorded
    flashsdpa.reset_stats()
    flashsdpa.attention(*small_problem(device))
    assert flashsdpa.stats() == {"calls": {"triton": 1}, "fallbacks": {}}


def test_no_backend_can_run(device, monkeypatch):
    monkeypatch.setitem(dispatch.AUTOMATIC_ORDER, device, ("triton",))
    if device == "cpu":
        monkeypatch.setattr(dispatch, "DEFAULT_ORDER", ("triton",))
    q, k, v = small_problem(device, torch.float64)
    with pytest.raises(flashsdpa.UnsupportedError, match="no flashsdpa backend.*triton.*float64"):
        flashsdpa.attention(q, k, v)


def test_stats_reset(device):
    q, k, v = small_problem(device)
    flashsdpa.attention(q, k, v, backend="reference")
    assert flashsdpa.stats()["calls"] == {"reference": 1}
    flashsdpa.reset_stats()
    assert flashsdpa.stats() == {"calls": {}, "fallbacks": {}}
    snapshot = flashsdpa.stats()
    flashsdpa.attention(q, k, v, backend="reference")
    assert snapshot == {"calls": {}, "fallbacks": {}}, "stats() returns a copy, not a live view"


# --------------------------------------------------------------------------- use_backend


def test_use_backend_nesting_restores(device):
    q, k, v = small_problem(device)
    with flashsdpa.use_backend("tiled"):
        assert dispatch.pinned_backend() == "tiled"
        with flashsdpa.use_backend("reference"):
            flashsdpa.attention(q, k, v)
            assert flashsdpa.stats()["calls"] == {"reference": 1}
        assert dispatch.pinned_backend() == "tiled"
        flashsdpa.attention(q, k, v)
        assert flashsdpa.stats()["calls"] == {"reference": 1, "tiled": 1}
        with pytest.raises(RuntimeError, match="boom"):
            with flashsdpa.use_backend("triton"):
                raise RuntimeError("boom")
        assert dispatch.pinned_backend() == "tiled", "an exception inside must not leak the inner pin"
    assert dispatch.pinned_backend() is None


def test_backend_argument_overrides_pin(device):
    q, k, v = small_problem(device)
    with flashsdpa.use_backend("reference"):
        flashsdpa.attention(q, k, v, backend="tiled")
    assert flashsdpa.stats()["calls"] == {"tiled": 1}


def test_use_backend_is_per_thread(device):
    """A pin in one thread does not leak into other threads."""
    q, k, v = small_problem(device)
    with flashsdpa.use_backend("reference"):
        with ThreadPoolExecutor(2) as pool:
            pinned = pool.submit(dispatch.pinned_backend).result()
    assert pinned is None


def test_pinned_backend_reaches_the_backward(device):
    """The backward runs on the backend that ran the forward, even when the pin has ended."""
    q, k, v = (t.requires_grad_() for t in small_problem(device, torch.float32))
    with flashsdpa.use_backend("reference"):
        out = flashsdpa.attention(q, k, v)
    calls = []
    original = dispatch.choose_backend

    def spy(desc, dev, requested=None):
        name = original(desc, dev, requested)
        calls.append(name)
        return name

    dispatch.choose_backend = spy
    try:
        out.sum().backward()
    finally:
        dispatch.choose_backend = original
    assert calls == ["reference"]


# --------------------------------------------------------------------------- descriptor and kernel key


def test_descriptor_validates_at_construction():
    base = dict(batch_shape=(2,), heads_q=4, heads_kv=2, seq_q=8, seq_kv=9, head_dim=40, head_dim_v=40,
                dtype=torch.float16, device_type="cuda")  # fmt: skip
    desc = AttentionDescriptor(**base)
    assert desc.scale == pytest.approx(1 / math.sqrt(40)), "default scale uses the caller's head dim"
    assert desc.gqa_group == 2 and desc.batch == 2
    for bad, fragment in [
        (dict(seq_q=-1), "seq_q"),
        (dict(heads_kv=3), "multiple"),
        (dict(heads_kv=0), "heads_kv"),
        (dict(dropout_p=1.0), "dropout_p"),
        (dict(scale=float("nan")), "scale"),
        (dict(mask=MaskKind.FLOAT), "mask_dtype"),
        (dict(mask_dtype=torch.float32), "mask_dtype"),
        (dict(head_dim=2.0), "head_dim"),
    ]:
        with pytest.raises(ValueError, match=fragment):
            AttentionDescriptor(**{**base, **bad})


def test_kernel_key_holds_only_compiled_fields():
    base = dict(batch_shape=(2,), heads_q=4, heads_kv=2, seq_q=8, seq_kv=9, head_dim=40, head_dim_v=40,
                dtype=torch.float16, device_type="cuda")  # fmt: skip
    key = AttentionDescriptor(**base).kernel_key
    for same in [dict(scale=0.1), dict(scale=10.0), dict(seq_q=1000, seq_kv=3), dict(batch_shape=(7,)),
                 dict(heads_q=8, heads_kv=4), dict(dropout_p=0.1, scale=2.0), dict(head_dim=33, head_dim_v=64),
                 dict(gradients=GradientPrecision.ROUNDED),  # the backward's precision keys its own config
                 dict(alignment=Alignment.BOTTOM_RIGHT)]:  # the band's diagonals are run-time values
        other = AttentionDescriptor(**{**base, **same}).kernel_key
        if "dropout_p" in same:
            assert other != key and other.dropout and not key.dropout
            assert other == AttentionDescriptor(**{**base, "dropout_p": 0.7}).kernel_key, "p is a run-time value"
        else:
            assert other == key and hash(other) == hash(key), f"{same} changed the kernel key"
    for different in [dict(dtype=torch.bfloat16), dict(causal=True), dict(head_dim=65, head_dim_v=65),
                      dict(head_dim_v=128), dict(heads_kv=4), dict(device_type="cpu"),
                      dict(mask=MaskKind.BOOL, mask_dtype=torch.bool), dict(window_left=3), dict(window_right=0),
                      dict(softcap=5.0), dict(alibi=True), dict(sinks=True)]:
        assert AttentionDescriptor(**{**base, **different}).kernel_key != key, f"{different} kept the kernel key"
    # the variants' sizes and values are run-time values: only their flags are compiled in
    for flagged, other in [(dict(window_left=3), dict(window_left=300)), (dict(softcap=5.0), dict(softcap=0.5)),
                           (dict(causal=True, window_left=2), dict(causal=True, window_left=9))]:
        assert AttentionDescriptor(**{**base, **flagged}).kernel_key == AttentionDescriptor(**{**base, **other}).kernel_key
    assert "scale" not in {f for f in type(key).__dataclass_fields__}


# --------------------------------------------------------------------------- the kernel cache under threads


def test_kernel_cache_builds_each_key_once_under_threads():
    cache = KernelCache()
    builds = []
    lock = threading.Lock()

    def build(key):
        with lock:
            builds.append(key)
        time.sleep(0.01)  # keep builds in flight while other threads ask for the same key
        return ("built", key)

    keys = [i % 4 for i in range(64)]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda key: cache.get(key, build), keys))
    assert results == [("built", key) for key in keys]
    assert sorted(builds) == [0, 1, 2, 3], "a key was built more than once"
    info = cache.info()
    assert info.variants == 4 and info.misses == 4 and info.hits == 60 and set(info.keys) == {0, 1, 2, 3}


def test_kernel_cache_failed_build_is_retried():
    cache = KernelCache()
    attempts = []

    def build(key):
        attempts.append(key)
        if len(attempts) == 1:
            raise RuntimeError("compile failed")
        return key

    with pytest.raises(RuntimeError):
        cache.get("k", build)
    assert cache.get("k", build) == "k" and cache.info().variants == 1


class _SerializedLaunch:
    """Wraps a @triton.jit kernel so launches take a lock: Triton's CPU interpreter is not thread-safe
    (it swaps triton.language builtins globally while a kernel runs). Only the launch is serialized; the
    kernel-cache lookups under test still race freely."""

    def __init__(self, kernel, lock):
        self.kernel, self.lock = kernel, lock

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def locked(*args, **kwargs):
            with self.lock:
                return launch(*args, **kwargs)

        return locked


def test_cache_info_consistent_across_threads(device, monkeypatch):
    """Triton calls from several threads: each result right, and cache_info counts every lookup exactly once."""
    from flashsdpa.backends.triton import decode_kernels, forward_kernels

    if device == "cpu":
        lock = threading.Lock()
        for module, name in [(forward_kernels, "attention_forward_kernel"),
                             (decode_kernels, "attention_decode_split_kernel"),
                             (decode_kernels, "merge_decode_splits_kernel")]:  # fmt: skip
            monkeypatch.setattr(module, name, _SerializedLaunch(getattr(module, name), lock))
    gen = generator(81)
    problems = []
    for i in range(8):
        causal = i % 2 == 1  # two kernel keys
        q, k, v = qkv((1, 2), (1, 2), seq(18) if i < 6 else seq(4), seq(20), 16, gen, torch.float16, device)
        problems.append(Case(q, k, v, causal=causal))
    flashsdpa.kernel_cache.clear()  # so that the threads race to build both variants

    def work(case):
        return run("triton", case.q, case.k, case.v, causal=case.causal)

    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(work, problems))
    for case, out in zip(problems, outs):
        assert_forward_close("threaded triton", out, case.oracle()[0], None, torch.float16)
    info = flashsdpa.cache_info()
    assert info.misses == info.variants == len(info.keys) == 2, info
    assert info.hits == len(problems) - 2, info
    assert flashsdpa.stats()["calls"] == {"triton": len(problems)}


def test_cache_reused_across_lengths_and_scales(device):
    """Triton compiles per kernel variant, not per sequence length, batch or scale: the kernels Triton itself
    compiles (under the interpreter, the cache keys it would compile for sm_90) for new lengths, batches and
    scales are the ones the first call compiled."""
    if device != "cpu":
        pytest.skip("counts the interpreter's launches (test_scale counts the GPU's own caches)")
    from triton_compiles import triton_compiles

    gen = generator(82)
    q, k, v = qkv((1, 2), (1, 2), seq(18), seq(20), 16, gen, torch.float32, device)
    with triton_compiles() as first:
        check_forward("triton", Case(q, k, v, causal=True))
    assert len(first) > 0
    # Lengths of other specialisation classes (multiples of 16, which Triton specialises on unless told not to)
    for seq_q, seq_kv, scale in ((17, 32, 0.2), (32, 7, 3.0), (48, 64, 1.0)):
        q, k, v = qkv((2, 1), (2, 1), seq_q, seq_kv, 16, gen, torch.float32, device)
        with triton_compiles() as later:
            check_forward("triton", Case(q, k, v, causal=True, scale=scale))
        assert later.keys <= first.keys, f"new variants for L={seq_q} S={seq_kv} scale={scale}"