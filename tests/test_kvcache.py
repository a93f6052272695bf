"""flashsdpa.kvcache_attention: contiguous and paged caches against per-sequence float64 attention,
in-place append, GQA, windows, no host reads on the path, bad input; the triton backend's paged decode
kernel (interpreted on CPU, bounds-checked loads): splits, variants, work proportional to the real lengths."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

import flashsdpa
from flashsdpa.backends.base import poisoned_outputs

from helpers import assert_forward_close, assert_lse_close, generator, oracle, randn, rel_err, variants_oracle

BACKENDS = ("tiled", "reference")


def expected(q, keys, values, lengths, causal=True, window=(-1, -1)):
    """float64 (out (B, Lq, Hq, Ev), lse (B, Hq, Lq)) per sequence over its first lengths[b] keys
    (keys (B, S, Hkv, E)), bottom-right aligned, from tril/triu diagonals."""
    outs, lses = [], []
    seq_q = q.shape[1]
    for b, n in enumerate(lengths):
        allowed = torch.ones(seq_q, n, dtype=torch.bool)
        left, right = window
        if causal:
            right = 0 if right < 0 else min(right, 0)
        if right >= 0:
            allowed &= torch.ones_like(allowed).tril(n - seq_q + right)
        if left >= 0:
            allowed &= torch.ones_like(allowed).triu(n - seq_q - left)
        out, lse = oracle(q[b].transpose(0, 1), keys[b, :n].transpose(0, 1), values[b, :n].transpose(0, 1),
                          attn_mask=allowed, enable_gqa=True)  # fmt: skip
        outs.append(out.transpose(0, 1))
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


def to_pages(cache, page_size, gen, spare=2):
    """A contiguous (B, S_max, H, E) cache copied into shuffled pages; returns (pages, block_table)."""
    batch, capacity = cache.shape[:2]
    per_seq = math.ceil(capacity / page_size)
    order = torch.randperm(batch * per_seq + spare, generator=gen)
    pages = randn((batch * per_seq + spare, page_size, *cache.shape[2:]), gen, cache.dtype)
    table = order[: batch * per_seq].view(batch, per_seq).to(torch.int32)
    for b in range(batch):
        for p in range(per_seq):
            rows = cache[b, p * page_size : (p + 1) * page_size]
            pages[table[b, p], : rows.shape[0]] = rows
    return pages, table


CASES = [  # (cache_seqlens, new tokens, query tokens)
    ([5, 0, 17, 1], 1, 1),  # decode: one token appended and attended per sequence, one sequence empty
    ([3, 9, 0], 4, 4),  # chunked prefill / speculative decoding: 4 tokens, bottom-right causal
    ([6, 2], 0, 3),  # no append: queries over what the cache holds
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("page_size", [None, 1, 5, 16])
def test_matches_per_sequence_attention_and_appends(backend, case, page_size):
    lengths, new, seq_q = case
    batch, capacity, heads_q, heads_kv, dim = len(lengths), 24, 4, 2, 8
    gen = generator(sum(lengths) + new + (page_size or 0))
    cache_k = randn((batch, capacity, heads_kv, dim), gen, torch.float64)
    cache_v = randn((batch, capacity, heads_kv, dim), gen, torch.float64)
    q = randn((batch, seq_q, heads_q, dim), gen, torch.float64)
    k_new = randn((batch, new, heads_kv, dim), gen, torch.float64) if new else None
    v_new = randn((batch, new, heads_kv, dim), gen, torch.float64) if new else None
    # What the cache must hold after the append.
    want_k, want_v = cache_k.clone(), cache_v.clone()
    for b, n in enumerate(lengths):
        if new:
            want_k[b, n : n + new], want_v[b, n : n + new] = k_new[b], v_new[b]
    if page_size is None:
        k_store, v_store, table = cache_k, cache_v, None
    else:
        k_store, table = to_pages(cache_k, page_size, generator(1))
        v_store, _ = to_pages(cache_v, page_size, generator(1))
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    with poisoned_outputs():
        out, lse = flashsdpa.kvcache_attention(
            q, k_store, v_store, cache_seqlens=seqlens, k_new=k_new, v_new=v_new, block_table=table,
            return_lse=True, backend=backend,
        )  # fmt: skip
    ref_out, ref_lse = expected(q, want_k, want_v, [n + new for n in lengths])
    assert out.shape == (batch, seq_q, heads_q, dim) and lse.shape == (batch, heads_q, seq_q)
    assert rel_err(out, ref_out) <= 1e-12
    assert_lse_close(lse, ref_lse, torch.float64)
    # The append wrote exactly the new tokens (pages read back in sequence order).
    if table is None:
        assert torch.equal(k_store, want_k) and torch.equal(v_store, want_v)
    else:
        for store, want in ((k_store, want_k), (v_store, want_v)):
            read_back = store[table.long()].flatten(1, 2)[:, :capacity]
            assert torch.equal(read_back, want)


def test_window_and_non_causal():
    lengths, batch, capacity = [10, 4], 2, 12
    gen = generator(3)
    cache_k, cache_v = (randn((batch, capacity, 1, 8), gen, torch.float64) for _ in range(2))
    q = randn((batch, 2, 2, 8), gen, torch.float64)
    seqlens = torch.tensor(lengths)
    for causal, window in ((True, (3, -1)), (False, (-1, -1)), (False, (2, 1))):
        out = flashsdpa.kvcache_attention(q, cache_k, cache_v, cache_seqlens=seqlens, causal=causal,
                                          window_size=window)  # fmt: skip
        ref, _ = expected(q, cache_k, cache_v, lengths, causal=causal, window=window)
        assert rel_err(out, ref) <= 1e-12, (causal, window)


def test_int_cache_seqlens_and_float32():
    gen = generator(4)
    cache_k, cache_v = (randn((3, 20, 2, 16), gen, torch.float32) for _ in range(2))
    q = randn((3, 1, 6, 16), gen, torch.float32)
    k_new, v_new = (randn((3, 1, 2, 16), gen, torch.float32) for _ in range(2))
    out = flashsdpa.kvcache_attention(q, cache_k, cache_v, cache_seqlens=7, k_new=k_new, v_new=v_new)
    ref, _ = expected(q, cache_k, cache_v, [8, 8, 8])
    assert rel_err(out, ref) <= 2e-6


@contextlib.contextmanager
def host_reads_forbidden():
    """Any read of a tensor's value into Python (.item(), .tolist(), bool(), int(), float(), ...) raises."""

    def forbidden(name):
        def method(self, *args, **kwargs):
            raise AssertionError(f"host read of a tensor value: Tensor.{name} on shape {tuple(self.shape)}")

        return method

    names = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")
    saved = {name: torch.Tensor.__dict__.get(name) for name in names}
    try:
        for name in names:
            setattr(torch.Tensor, name, forbidden(name))
        yield
    finally:
        for name, method in saved.items():
            if method is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, method)


@pytest.mark.parametrize("backend", ["tiled", "triton"])
@pytest.mark.parametrize("page_size", [None, 3])
def test_no_host_reads_on_the_path(page_size, backend, device):
    """The decode path (validate=False) never reads a tensor value on the host: it could be graph-captured."""
    if backend == "triton" and not triton_available(device):
        pytest.skip("the triton backend needs a GPU or TRITON_INTERPRET=1")
    gen = generator(5)
    cache_k, cache_v = (randn((2, 9, 1, 8), gen, torch.float32) for _ in range(2))
    table = None
    if page_size is not None:
        (cache_k, table), (cache_v, _) = to_pages(cache_k, page_size, generator(2)), to_pages(cache_v, page_size,
                                                                                              generator(2))
    q = randn((2, 2, 2, 8), gen, torch.float32)
    k_new, v_new = (randn((2, 2, 1, 8), gen, torch.float32) for _ in range(2))
    seqlens = torch.tensor([3, 6], dtype=torch.int32)
    q, cache_k, cache_v, k_new, v_new, seqlens = (t.to(device) for t in (q, cache_k, cache_v, k_new, v_new, seqlens))
    table = None if table is None else table.to(device)
    with host_reads_forbidden():
        out = flashsdpa.kvcache_attention(q, cache_k, cache_v, cache_seqlens=seqlens, k_new=k_new, v_new=v_new,
                                          block_table=table, validate=False, return_lse=True, backend=backend)  # fmt: skip
    assert torch.isfinite(out[0]).all()
    with host_reads_forbidden(), pytest.raises(AssertionError, match="host read"):  # the checker catches them
        flashsdpa.kvcache_attention(q, cache_k, cache_v, cache_seqlens=seqlens, block_table=table, validate=True)


@pytest.mark.parametrize("backend", [None, "triton"])
def test_compiles_without_graph_breaks(backend, device):
    if backend == "triton" and not triton_available(device):
        pytest.skip("the triton backend needs a GPU or TRITON_INTERPRET=1")
    gen = generator(6)
    cache_k, cache_v = (randn((2, 10, 2, 8), gen, torch.float32) for _ in range(2))
    q = randn((2, 1, 4, 8), gen, torch.float32)
    k_new, v_new = (randn((2, 1, 2, 8), gen, torch.float32) for _ in range(2))
    seqlens = torch.tensor([2, 7], dtype=torch.int32)
    q, cache_k, cache_v, k_new, v_new, seqlens = (t.to(device) for t in (q, cache_k, cache_v, k_new, v_new, seqlens))
    eager_k, eager_v = cache_k.clone(), cache_v.clone()
    eager = flashsdpa.kvcache_attention(q, eager_k, eager_v, cache_seqlens=seqlens, k_new=k_new, v_new=v_new,
                                        validate=False, backend=backend)  # fmt: skip

    def step(q, cache_k, cache_v, seqlens, k_new, v_new):
        return flashsdpa.kvcache_attention(q, cache_k, cache_v, cache_seqlens=seqlens, k_new=k_new, v_new=v_new,
                                           validate=False, backend=backend)  # fmt: skip

    out = torch.compile(step, backend="aot_eager", fullgraph=True)(q, cache_k, cache_v, seqlens, k_new, v_new)
    assert torch.equal(out, eager)
    assert torch.equal(cache_k, eager_k) and torch.equal(cache_v, eager_v)  # appended in place under compile too


def _bad_calls():
    q = torch.randn(2, 1, 4, 8)
    cache = torch.randn(2, 6, 2, 8)
    pages = torch.randn(5, 4, 2, 8)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    new = torch.randn(2, 2, 2, 8)
    lens = torch.tensor([3, 4], dtype=torch.int32)
    base = dict(q=q, k_cache=cache, v_cache=cache, cache_seqlens=lens)
    paged = dict(base, k_cache=pages, v_cache=pages, block_table=table)
    return [
        (r"cache_seqlens \+ new tokens must be in \[0, 6\]", dict(base, k_new=new, v_new=new, cache_seqlens=torch.tensor([3, 5]))),
        (r"cache_seqlens \+ new tokens must be in \[0, 8\]", dict(paged, k_new=new, v_new=new, cache_seqlens=torch.tensor([7, 1]))),
        (r"cache_seqlens \+ new tokens", dict(base, cache_seqlens=torch.tensor([-1, 2]))),
        ("block_table entries must be in", dict(paged, block_table=torch.tensor([[0, 5], [2, 3]]))),
        ("block_table must be .batch=2", dict(paged, block_table=table[:1])),
        ("block_table must be an int32 or int64", dict(paged, block_table=table.float())),
        ("cache_seqlens must be int32 or int64", dict(base, cache_seqlens=lens.float())),
        ("cache_seqlens must be .2,.", dict(base, cache_seqlens=lens[:1])),
        ("k_new and v_new must be given together", dict(base, k_new=new)),
        ("k_new .* must be .batch=2", dict(base, k_new=new[:, :, :1], v_new=new[:, :, :1])),
        ("q's heads .3. must be a multiple", dict(base, q=torch.randn(2, 1, 3, 8))),
        ("same head dim", dict(base, q=torch.randn(2, 1, 4, 5))),
        ("k_cache holds 2 sequences but q has a batch of 3", dict(base, q=torch.randn(3, 1, 4, 8))),
        ("softcap must be None", dict(base, k_new=new, v_new=new, softcap=0.0)),
        (r"sinks must have shape \(Hq,\)", dict(base, k_new=new, v_new=new, sinks=torch.zeros(2))),
        ("alibi_slopes must be a float32", dict(base, k_new=new, v_new=new, alibi_slopes=torch.zeros(4, dtype=torch.int32))),
        (r"alibi_slopes must be \(4,\) or \(2, 4\)", dict(base, k_new=new, v_new=new, alibi_slopes=torch.zeros(3))),
    ]  # fmt: skip


@pytest.mark.parametrize("message, call", _bad_calls(), ids=lambda x: x if isinstance(x, str) else "")
def test_bad_input_names_the_argument(message, call):
    caches = [t.clone() for t in (call["k_cache"], call["v_cache"])]
    with pytest.raises((ValueError, TypeError), match=message):
        flashsdpa.kvcache_attention(**call)
    # Nothing ran: the caches are untouched.
    assert torch.equal(call["k_cache"], caches[0]) and torch.equal(call["v_cache"], caches[1])


def test_score_variants_match_per_sequence_float64():
    """softcap, ALiBi (per sequence, bottom-right positions) and sinks, on the reference backend."""
    from helpers import variants_oracle

    lengths, new, batch, capacity, heads_q = [4, 9, 1], 2, 3, 16, 4
    gen = generator(12)
    cache_k, cache_v = (randn((batch, capacity, 2, 8), gen, torch.float64) for _ in range(2))
    q = randn((batch, 2, heads_q, 8), gen, torch.float64)
    k_new, v_new = (randn((batch, new, 2, 8), gen, torch.float64) for _ in range(2))
    slopes = torch.rand(batch, heads_q, generator=gen)
    sinks = randn((heads_q,), gen, torch.float32)
    out, lse = flashsdpa.kvcache_attention(
        q, cache_k, cache_v, cache_seqlens=torch.tensor(lengths), k_new=k_new, v_new=v_new, softcap=1.3,
        alibi_slopes=slopes, sinks=sinks, return_lse=True, backend="reference",
    )  # fmt: skip
    for b, n in enumerate(lengths):
        n += new
        ref, ref_lse = variants_oracle(
            q[b : b + 1].transpose(1, 2), cache_k[b : b + 1, :n].transpose(1, 2), cache_v[b : b + 1, :n].transpose(1, 2),
            causal=True, alignment="bottom_right", softcap=1.3, alibi_slopes=slopes[b], sinks=sinks,
        )  # fmt: skip
        assert rel_err(out[b], ref[0].transpose(0, 1)) <= 1e-12, b
        assert_lse_close(lse[b], ref_lse[0], torch.float64)


def test_triton_backend_paged_decode(device):
    """The paged decode path on triton (interpreted without a GPU; bounds-checked loads)."""
    if device == "cpu" and flashsdpa.dispatch.BACKENDS["triton"].unsupported_reasons(
        flashsdpa.AttentionDescriptor((1,), 1, 1, 1, 1, 16, 16, torch.float32, "cpu"), torch.device("cpu")
    ):
        pytest.skip("the triton backend needs a GPU or TRITON_INTERPRET=1")
    lengths, batch, capacity = [6, 0, 13], 3, 15
    gen = generator(13)
    cache_k, cache_v = (randn((batch, capacity, 2, 16), gen, torch.float32) for _ in range(2))
    q = randn((batch, 2, 4, 16), gen, torch.float32)
    k_new, v_new = (randn((batch, 2, 2, 16), gen, torch.float32) for _ in range(2))
    want_k, want_v = cache_k.clone(), cache_v.clone()
    for b, n in enumerate(lengths):
        want_k[b, n : n + 2], want_v[b, n : n + 2] = k_new[b], v_new[b]
    k_pages, table = to_pages(cache_k, 7, generator(3))
    v_pages, _ = to_pages(cache_v, 7, generator(3))
    to = lambda t: t.to(device)  # noqa: E731
    with poisoned_outputs():
        out = flashsdpa.kvcache_attention(to(q), to(k_pages), to(v_pages), cache_seqlens=to(torch.tensor(lengths)),
                                          k_new=to(k_new), v_new=to(v_new), block_table=to(table), backend="triton")  # fmt: skip
    ref, _ = expected(q, want_k, want_v, [n + 2 for n in lengths])
    assert rel_err(out, ref) <= 2e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", ["triton", "tiled"])
def test_decode_step_replays_from_a_cuda_graph(backend):
    """One captured decode step (append + attention, validate=False) serves later steps: new q, new
    tokens and grown cache_seqlens are written into the captured inputs, and a replay gives the eager answer."""
    batch, capacity, page_size = 3, 40, 8
    gen = generator(14)
    dtype, device = torch.float16, "cuda"
    k_pages, table = to_pages(randn((batch, capacity, 2, 64), gen, dtype), page_size, generator(4))
    v_pages, _ = to_pages(randn((batch, capacity, 2, 64), gen, dtype), page_size, generator(4))
    k_pages, v_pages, table = k_pages.to(device), v_pages.to(device), table.to(device)
    q, k_new, v_new = (randn((batch, 1, h, 64), gen, dtype, device) for h in (8, 2, 2))
    seqlens = torch.tensor([5, 0, 30], dtype=torch.int32, device=device)

    def step():
        return flashsdpa.kvcache_attention(q, k_pages, v_pages, cache_seqlens=seqlens, k_new=k_new, v_new=v_new,
                                           block_table=table, validate=False, backend=backend)  # fmt: skip

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for _ in range(3):
        seqlens += 1
        q.copy_(randn(q.shape, gen, dtype, device))
        k_new.copy_(randn(k_new.shape, gen, dtype, device))
        v_new.copy_(randn(v_new.shape, gen, dtype, device))
        pages_before = (k_pages.clone(), v_pages.clone())
        graph.replay()
        replayed = captured.clone()
        k_pages.copy_(pages_before[0]), v_pages.copy_(pages_before[1])
        eager = step()
        assert torch.equal(replayed, eager)


def triton_available(device) -> bool:
    return device != "cpu" or not flashsdpa.dispatch.BACKENDS["triton"].unsupported_reasons(
        flashsdpa.AttentionDescriptor((1,), 1, 1, 1, 1, 16, 16, torch.float32, "cpu"), torch.device("cpu")
    )


@pytest.fixture
def triton_device(device):
    if not triton_available(device):
        pytest.skip("the triton backend needs a GPU or TRITON_INTERPRET=1")
    return device


def force_splits(monkeypatch, count: int) -> None:
    """The paged decode launcher splits each sequence's keys `count` ways (rounded to whole key blocks),
    whatever its own choice (one split for these small problems)."""
    from flashsdpa.backends.triton import launch_paged

    monkeypatch.setattr(launch_paged, "decode_split_count", lambda programs, capacity, sms: count)


@pytest.fixture(params=[None, 3], ids=["own_splits", "3_splits"])
def splits(request, monkeypatch):
    """The launcher's own split count, or 3 splits merged by the merge kernel."""
    if request.param is not None:
        force_splits(monkeypatch, request.param)
    return request.param


def per_sequence(q, keys, values, lengths, dtype=torch.float64, **variants):
    """(out (B, Lq, Hq, Ev), lse (B, Hq, Lq)) per sequence over its first lengths[b] keys in `dtype`
    (float64: the truth; the inputs' dtype: the stand-in for torch's own error), bottom-right aligned;
    `variants` as helpers.variants_oracle takes them (alibi_slopes (B, Hq): one row per sequence)."""
    outs, lses = [], []
    slopes = variants.pop("alibi_slopes", None)
    for b, n in enumerate(lengths):
        if n == 0 and variants.get("sinks") is None:  # no key, no sink: zeros and lse -inf
            outs.append(torch.zeros((*q.shape[1:3], values.shape[3]), dtype=dtype))
            lses.append(torch.full(q.shape[2:0:-1], float("-inf"), dtype=dtype))
            continue
        view = lambda t: t[b : b + 1, :n].transpose(1, 2)  # noqa: E731
        out, lse = variants_oracle(
            q[b : b + 1].transpose(1, 2), view(keys), view(values),
            alignment="bottom_right", alibi_slopes=None if slopes is None else slopes[b], dtype=dtype, **variants,
        )  # fmt: skip
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.stack(outs), torch.stack(lses)


def cache_problem(lengths, new, seq_q, heads_q, heads_kv, dim, capacity, page_size, dtype, seed):
    """Inputs of one kvcache call (moved to the device by the caller) and the caches it must leave."""
    batch = len(lengths)
    gen = generator(seed)
    cache_k, cache_v = (randn((batch, capacity, heads_kv, dim), gen, dtype) for _ in range(2))
    q = randn((batch, seq_q, heads_q, dim), gen, dtype)
    k_new, v_new = (randn((batch, new, heads_kv, dim), gen, dtype) if new else None for _ in range(2))
    want_k, want_v = cache_k.clone(), cache_v.clone()
    for b, n in enumerate(lengths):
        if new:
            want_k[b, n : n + new], want_v[b, n : n + new] = k_new[b], v_new[b]
    table = None
    if page_size is not None:
        (cache_k, table), (cache_v, _) = to_pages(cache_k, page_size, generator(seed)), to_pages(
            cache_v, page_size, generator(seed))  # fmt: skip
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    return dict(q=q, k_cache=cache_k, v_cache=cache_v, cache_seqlens=seqlens, k_new=k_new, v_new=v_new,
                block_table=table), (want_k, want_v)  # fmt: skip


def recorded_paged_specs(monkeypatch) -> list:
    """The list that every paged decode launch's spec (launch_paged.paged_decode_spec) is appended to, while
    `monkeypatch` lasts."""
    from flashsdpa.backends.triton import launch_paged

    specs, spec_of = [], launch_paged.paged_decode_spec

    def recording(*args):
        specs.append(spec_of(*args))
        return specs[-1]

    monkeypatch.setattr(launch_paged, "paged_decode_spec", recording)
    return specs


def fill_past_lengths(call, totals, page_size, value) -> None:
    """Sets every cache slot past each sequence's `totals[b]` keys (paged or contiguous) to `value`."""
    table = call["block_table"]
    for cache in (call["k_cache"], call["v_cache"]):
        for b, n in enumerate(totals):
            if page_size is None:
                cache[b, n:] = value
            for j in range(n, table.shape[1] * page_size if page_size else 0):
                cache[table[b, j // page_size], j % page_size] = value


def on(device, call):
    return {name: t.to(device) if isinstance(t, torch.Tensor) else t for name, t in call.items()}


@pytest.mark.parametrize("case", CASES + [([0, 0], 1, 1), ([0, 44], 1, 1)], ids=str)
@pytest.mark.parametrize("page_size", [None, 1, 3, 8, 16, 32])
def test_triton_paged_decode_matches_per_sequence_float64(triton_device, splits, case, page_size):
    """float32, GQA (4 query heads on 2), empty and 1-key sequences, Lq > 1 bottom-right causal, append;
    a full last sequence whose capacity (45) is no multiple of the key block (loads past it are masked).
    Pages of 16 and 32 keys hold whole 16-key blocks (one table read per block), pages of 1 and 8 keys
    divide them (page sizes compiled in, see the next test), pages of 3 keys are divided per key."""
    lengths, new, seq_q = case
    call, (want_k, want_v) = cache_problem(lengths, new, seq_q, 4, 2, 16, 45, page_size, torch.float32,
                                           seed=len(lengths) + new + (page_size or 0))  # fmt: skip
    with poisoned_outputs():
        out, lse = flashsdpa.kvcache_attention(**on(triton_device, call), return_lse=True, backend="triton")
    totals = [n + new for n in lengths]
    ref, ref_lse = per_sequence(call["q"], want_k, want_v, totals, causal=True)
    stand_in, _ = per_sequence(call["q"], want_k, want_v, totals, torch.float32, causal=True)
    assert_forward_close("out", out, ref, stand_in, torch.float32)
    assert_lse_close(lse.cpu(), ref_lse, torch.float32)


def test_triton_paged_decode_compiles_in_power_of_two_page_sizes(triton_device, monkeypatch):
    """The kernel compiles in a power-of-two page size (FIXED_PAGE_SIZE; one table read per key block where
    the pages hold whole blocks); any other page size is divided per key (0): the float32 d=16 problems
    above, pages smaller and larger than the key block (16 keys interpreted, 64 on sm_90)."""
    specs = recorded_paged_specs(monkeypatch)
    for page_size, fixed in ((None, 0), (3, 0), (1, 1), (8, 8), (16, 16), (32, 32)):
        call, _ = cache_problem([5, 44], 1, 1, 4, 2, 16, 45, page_size, torch.float32, seed=61)
        flashsdpa.kvcache_attention(**on(triton_device, call), backend="triton")
        assert specs[-1].fixed_page_size == fixed, (page_size, specs[-1])


@pytest.mark.parametrize("blocks_a_page", [None, 1, 2])
def test_triton_paged_decode_tma_blocks(triton_device, monkeypatch, blocks_a_page):
    """K/V blocks as TMA boxes (launch_paged.PAGED_TMA_BLOCKS): a contiguous cache (None) and pages holding
    one or two whole key blocks (16 keys interpreted, 64 on sm_90), the last sequence's capacity (45) no
    multiple of the block, keys past each length in the cache set to inf (read by the box, never used)."""
    from flashsdpa.backends.triton import launch_paged

    monkeypatch.setattr(launch_paged, "PAGED_TMA_BLOCKS", True)
    specs = recorded_paged_specs(monkeypatch)
    lengths, new, seq_q = [5, 0, 17, 43], 1, 2
    page_size = None
    if blocks_a_page is not None:  # the key block the launcher picks for this problem, from a contiguous call
        call, _ = cache_problem(lengths, new, seq_q, 4, 2, 16, 45, None, torch.float32, seed=71)
        flashsdpa.kvcache_attention(**on(triton_device, call), backend="triton")
        page_size = blocks_a_page * specs[-1].block_n
    call, (want_k, want_v) = cache_problem(lengths, new, seq_q, 4, 2, 16, 45, page_size, torch.float32, seed=71)
    totals = [n + new for n in lengths]
    fill_past_lengths(call, totals, page_size, float("inf"))
    with poisoned_outputs():
        out, lse = flashsdpa.kvcache_attention(**on(triton_device, call), return_lse=True, backend="triton")
    assert specs[-1].tma_blocks, specs[-1]
    ref, ref_lse = per_sequence(call["q"], want_k, want_v, totals, causal=True)
    stand_in, _ = per_sequence(call["q"], want_k, want_v, totals, torch.float32, causal=True)
    assert_forward_close("out", out, ref, stand_in, torch.float32)
    assert_lse_close(lse.cpu(), ref_lse, torch.float32)


@pytest.mark.parametrize("dtype, seq_q", [(torch.bfloat16, 3), (torch.float16, 9)])
def test_triton_paged_decode_16_bit(triton_device, splits, dtype, seq_q):
    """3 GQA heads x 3 query rows fill one 16-row program; x 9 rows take the 64-row programs of chunked
    prefill (launch_paged.PAGED_MANY_ROWS_BLOCK_M)."""
    lengths, new = [9, 0, 40, 1], 2
    call, (want_k, want_v) = cache_problem(lengths, new, seq_q, 6, 2, 32, 48, 5, dtype, seed=21)
    with poisoned_outputs():
        out = flashsdpa.kvcache_attention(**on(triton_device, call), backend="triton")
    totals = [n + new for n in lengths]
    ref, _ = per_sequence(call["q"], want_k, want_v, totals, causal=True)
    stand_in, _ = per_sequence(call["q"], want_k, want_v, totals, dtype, causal=True)
    assert_forward_close("out", out, ref, stand_in, dtype)


VARIANTS = [  # (causal, window, softcap, ALiBi, sinks)
    (True, (3, -1), None, False, False),
    (False, (2, 1), None, False, False),
    (False, (-1, -1), None, False, False),
    (True, (-1, -1), 1.3, True, True),
    (True, (4, -1), None, False, True),
    (False, (-1, 2), 2.0, True, False),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_triton_paged_decode_variants(triton_device, splits, variant):
    causal, window, softcap, alibi, with_sinks = variant
    lengths, new, seq_q, heads_q = [4, 0, 21, 1], 2, 3, 4
    call, (want_k, want_v) = cache_problem(lengths, new, seq_q, heads_q, 2, 16, 24, 3, torch.float32, seed=31)
    gen = generator(32)
    slopes = torch.rand(len(lengths), heads_q, generator=gen) if alibi else None
    sinks = randn((heads_q,), gen, torch.float32) if with_sinks else None
    options = dict(causal=causal, window_size=window, softcap=softcap, alibi_slopes=slopes, sinks=sinks)
    with poisoned_outputs():
        out, lse = flashsdpa.kvcache_attention(**on(triton_device, call), **on(triton_device, options),
                                               return_lse=True, backend="triton")  # fmt: skip
    totals = [n + new for n in lengths]
    semantics = dict(causal=causal, window=window, softcap=softcap, alibi_slopes=slopes, sinks=sinks)
    ref, ref_lse = per_sequence(call["q"], want_k, want_v, totals, **semantics)
    stand_in, _ = per_sequence(call["q"], want_k, want_v, totals, torch.float32, **semantics)
    assert_forward_close("out", out, ref, stand_in, torch.float32)
    assert_lse_close(lse.cpu(), ref_lse, torch.float32)


def test_triton_paged_decode_is_deterministic(triton_device, monkeypatch):
    """Several splits merged in a fixed order: the same bits on every call."""
    force_splits(monkeypatch, 4)
    call, _ = cache_problem([50, 7, 33], 0, 1, 8, 2, 16, 64, 16, torch.bfloat16, seed=41)
    first, second = (flashsdpa.kvcache_attention(**on(triton_device, call), backend="triton") for _ in range(2))
    assert torch.equal(first, second)


def test_triton_paged_decode_visits_key_blocks_of_the_real_lengths(triton_device, monkeypatch):
    """Work follows each sequence's length, not the capacity: the kernel reads len/BLOCK_N key blocks of K
    and of V per (sequence, kv head) and no more (the kernel's row loader counted, interpreted)."""
    if triton_device != "cpu":
        pytest.skip("counts the interpreted kernel's loads")
    from flashsdpa.backends.triton import paged_kernels

    force_splits(monkeypatch, 8)  # most splits lie past the lengths
    loads, counted = [], paged_kernels.cache_rows
    specs = recorded_paged_specs(monkeypatch)

    def counting(*args):
        loads.append(1)
        return counted.fn(*args)

    monkeypatch.setattr(paged_kernels, "cache_rows", counting)
    lengths, capacity, heads_kv = [0, 1, 40, 130], 256, 2
    call, _ = cache_problem(lengths, 0, 1, 4, heads_kv, 16, capacity, 16, torch.float32, seed=51)
    for causal in (True, False):
        loads.clear()
        flashsdpa.kvcache_attention(**call, causal=causal, backend="triton")
        block_n = specs[-1].block_n
        real = 2 * heads_kv * sum(math.ceil(n / block_n) for n in lengths)  # K and V
        assert len(loads) == real < 2 * heads_kv * len(lengths) * capacity // block_n // 3, causal


# Interpreter-sized layouts of warps on key slices (launch_paged.PAGED_LAYOUTS): 2 and 4 warps of 16 keys each,
# page numbers read a block ahead or in the block's own iteration (page_lookahead 0).
SLICED_LAYOUTS = {
    "2 slices": dict(block_m=16, block_n=32, num_warps=2, num_stages=2, key_slices=2),
    "4 slices x2": dict(block_m=16, block_n=64, num_warps=4, num_stages=2, key_slices=4, programs_per_sm=2),
    "2 slices, pages read in their block's iteration": dict(block_m=16, block_n=32, num_warps=2, num_stages=4,
                                                             key_slices=2, page_lookahead=0),
    "2 heads": dict(block_m=16, block_n=16, num_warps=2, num_stages=2, head_slices=2),
}


@pytest.mark.parametrize("layout", SLICED_LAYOUTS)
@pytest.mark.parametrize("dtype, page_size, variant", [
    (torch.bfloat16, None, dict(causal=True)),
    (torch.float16, 3, dict(causal=False)),
    (torch.bfloat16, 8, dict(causal=True, with_sinks=True)),
    (torch.bfloat16, 16, dict(causal=True)),
    (torch.float16, 64, dict(causal=False, with_sinks=True)),
    (torch.bfloat16, 16, dict(causal=True, window_size=(40, -1))),
    (torch.float16, 8, dict(causal=False, window_size=(-1, 2), softcap=1.3, with_alibi=True, with_sinks=True)),
], ids=str)
def test_triton_paged_decode_key_slices(triton_device, splits, monkeypatch, layout, dtype, page_size, variant):
    """Warps on their own slices of every key block (launch_paged.PAGED_LAYOUTS, paged_kernels' doc), merged
    after the loop: empty and 1-key sequences, lengths past a slice, a block and a page, pages smaller and
    larger than a slice and the block, a sink joining one slice of one split, a window, softcap and ALiBi,
    inf in every slot past a length (16-bit: float32's split products keep the rows program)."""
    from flashsdpa.backends.triton import launch_paged

    monkeypatch.setitem(launch_paged.PAGED_LAYOUTS, "test", launch_paged.PagedTiles(**SLICED_LAYOUTS[layout]))
    monkeypatch.setattr(launch_paged, "PAGED_DECODE_LAYOUTS", dict.fromkeys(launch_paged.PAGE_CLASSES, "test"))
    specs = recorded_paged_specs(monkeypatch)
    lengths, new, capacity = [0, 1, 17, 70, 99], 1, 100
    call, (want_k, want_v) = cache_problem(lengths, new, 1, 8, 2, 16, capacity, page_size, dtype, seed=81)
    totals = [n + new for n in lengths]
    fill_past_lengths(call, totals, page_size, float("inf"))  # keys past a length are never read unmasked
    gen = generator(82)
    sinks = randn((8,), gen, torch.float32) if variant.get("with_sinks") else None
    slopes = torch.rand(len(lengths), 8, generator=gen) if variant.get("with_alibi") else None
    window, softcap = variant.get("window_size", (-1, -1)), variant.get("softcap")
    options = dict(causal=variant["causal"], window_size=window, softcap=softcap, alibi_slopes=slopes, sinks=sinks)
    with poisoned_outputs():
        out, lse = flashsdpa.kvcache_attention(**on(triton_device, call), **on(triton_device, options),
                                               return_lse=True, backend="triton")  # fmt: skip
    assert specs[-1].key_slices == SLICED_LAYOUTS[layout].get("key_slices", 1), specs[-1]
    assert specs[-1].head_slices == SLICED_LAYOUTS[layout].get("head_slices", 1), specs[-1]
    assert specs[-1].page_lookahead == (SLICED_LAYOUTS[layout].get("page_lookahead", 1) if page_size else 1)
    semantics = dict(causal=variant["causal"], window=window, softcap=softcap, alibi_slopes=slopes, sinks=sinks)
    ref, ref_lse = per_sequence(call["q"], want_k, want_v, totals, **semantics)
    stand_in, _ = per_sequence(call["q"], want_k, want_v, totals, dtype, **semantics)
    assert_forward_close("out", out, ref, stand_in, dtype)
    assert_lse_close(lse.cpu(), ref_lse, dtype)


def test_each_class_of_cache_takes_its_own_layout(triton_device, monkeypatch):
    """launch_paged.PAGED_DECODE_LAYOUTS by page_class: pages smaller than SMALL_PAGE_KEYS, larger ones and a
    contiguous cache each launch their class's layout (recorded specs), and give the float64 answer."""
    from flashsdpa.backends.triton import launch_paged

    layouts = {"small pages": "2 slices, pages read in their block's iteration", "large pages": "rows",
               "contiguous": "2 slices"}  # fmt: skip
    for name in set(layouts.values()) - {"rows"}:
        monkeypatch.setitem(launch_paged.PAGED_LAYOUTS, name, launch_paged.PagedTiles(**SLICED_LAYOUTS[name]))
    monkeypatch.setattr(launch_paged, "PAGED_DECODE_LAYOUTS", layouts)
    specs = recorded_paged_specs(monkeypatch)
    lengths, new = [3, 0, 60], 1
    totals = [n + new for n in lengths]
    for page_size, tiles in ((8, (2, 0)), (launch_paged.SMALL_PAGE_KEYS, (1, 1)), (None, (2, 1))):
        call, (want_k, want_v) = cache_problem(lengths, new, 1, 8, 2, 16, 64, page_size, torch.bfloat16, seed=91)
        with poisoned_outputs():
            out = flashsdpa.kvcache_attention(**on(triton_device, call), backend="triton")
        assert (specs[-1].key_slices, specs[-1].page_lookahead) == tiles, (page_size, specs[-1])
        ref, _ = per_sequence(call["q"], want_k, want_v, totals, causal=True)
        stand_in, _ = per_sequence(call["q"], want_k, want_v, totals, torch.bfloat16, causal=True)
        assert_forward_close("out", out, ref, stand_in, torch.bfloat16)


def test_sliced_layouts_serve_one_program_of_16_bit_rows_up_to_d128():
    """The sliced layout serves a GQA group in one program at d <= 128 with 16-bit inputs, every score
    variant; d=256, more rows than a program holds, or float32 (either precision) get the rows program; head
    slices serve kv heads they divide."""
    from flashsdpa import kvcache
    from flashsdpa.backends.triton import launch_paged

    layout = launch_paged.PagedTiles(**SLICED_LAYOUTS["2 slices"])

    def serves(seq_q=1, dim=128, dtype=torch.bfloat16, heads_kv=2, tiles=layout, **variants):
        q = torch.zeros(2, seq_q, 4 * heads_kv, dim, dtype=dtype)
        cache = torch.zeros(2, 64, heads_kv, dim, dtype=dtype)
        options = dict(scale=None, causal=True, window_size=(-1, -1), softcap=None, alibi=False, sinks=False,
                       fp32_precision="ieee")  # fmt: skip
        desc = kvcache.cache_descriptor(q, cache, cache, 64, **{**options, **variants})
        return launch_paged.sliced_layout_applies(desc, tiles)

    assert serves() and serves(causal=False) and serves(sinks=True) and serves(window_size=(8, -1))
    assert serves(softcap=30.0, alibi=True) and serves(seq_q=4)  # 16 rows a kv head
    assert serves(dtype=torch.float16)
    assert not serves(dim=256) and not serves(seq_q=5) and not serves(dtype=torch.float32)
    assert not serves(dtype=torch.float32, fp32_precision="tf32")
    heads = launch_paged.PagedTiles(**SLICED_LAYOUTS["2 heads"])  # 2 kv heads a program: the cache's 2, not 3
    assert serves(tiles=heads) and serves(heads_kv=4, tiles=heads) and not serves(heads_kv=3, tiles=heads)
