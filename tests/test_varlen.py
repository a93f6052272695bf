"""flashsdpa.varlen_attn: packed sequences against per-sequence float64 attention, gradients, paging,
work done, torch.compile, bad input, and torch's own `varlen_attn` through the switch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.attention.varlen as torch_varlen

import flashsdpa
from flashsdpa.backends import tiled
from flashsdpa.backends.base import poisoned_outputs
from flashsdpa.integrations import torch_varlen as switch

from helpers import assert_forward_close, assert_lse_close, generator, oracle, randn, rel_err, variants_oracle

BACKENDS = ("tiled", "reference")


def offsets(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32)


def visible(seq_q, seq_kv, causal, window, bottom_right=True) -> torch.Tensor:
    """The test's own (L, S) visibility, from tril/triu diagonals: query i sits at p = i + shift."""
    shift = seq_kv - seq_q if bottom_right else 0
    ones = torch.ones(seq_q, seq_kv, dtype=torch.bool)
    allowed = ones
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    if right >= 0:
        allowed = allowed & ones.tril(shift + right)
    if left >= 0:
        allowed = allowed & ones.triu(shift - left)
    return allowed


def per_sequence(q, k, v, lens_q, lens_k, *, causal=False, window=(-1, -1), bottom_right=True, scale=None):
    """float64 (out (T_q, Hq, Ev), lse (Hq, T_q)): each sequence by explicit softmax math (helpers.oracle)."""
    outs, lses = [], []
    q0 = k0 = 0
    for lq, lk in zip(lens_q, lens_k):
        qs, ks, vs = (t.transpose(0, 1) for t in (q[q0 : q0 + lq], k[k0 : k0 + lk], v[k0 : k0 + lk]))
        mask = visible(lq, lk, causal, window, bottom_right)
        out, lse = oracle(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True)
        outs.append(out.transpose(0, 1))
        lses.append(lse)
        q0, k0 = q0 + lq, k0 + lk
    return torch.cat(outs), torch.cat(lses, dim=-1)


def packed(lens_q, lens_k, heads_q, heads_kv, head_dim, gen, dtype=torch.float64, head_dim_v=None):
    q = randn((sum(lens_q), heads_q, head_dim), gen, dtype)
    k = randn((sum(lens_k), heads_kv, head_dim), gen, dtype)
    v = randn((sum(lens_k), heads_kv, head_dim_v or head_dim), gen, dtype)
    return q, k, v


class Lse:  # torch's AuxRequest(lse=True), without importing it
    lse = True


# Ragged batches with empty and 1-token sequences; (lens_q, lens_k) per sequence.
RAGGED = [
    ([5, 0, 1, 17, 9], [5, 3, 1, 17, 0]),  # self-attention lengths, an empty query and an empty key sequence
    ([1, 1, 4, 2], [9, 1, 13, 30]),  # decode-like: fewer queries than keys (bottom-right alignment matters)
    ([7, 11, 1], [3, 11, 2]),  # more queries than keys: the first rows see nothing under causal
]
VARIANTS = [
    dict(causal=False, window=(-1, -1)),
    dict(causal=True, window=(-1, -1)),
    dict(causal=True, window=(3, -1)),
    dict(causal=False, window=(2, 1)),
    dict(causal=True, window=(-1, -1), bottom_right=False),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths", RAGGED)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
def test_matches_per_sequence_attention_float64(backend, lengths, variant):
    lens_q, lens_k = lengths
    gen = generator(len(lens_q) * 7 + sum(lens_k))
    q, k, v = packed(lens_q, lens_k, 4, 2, 8, gen, head_dim_v=5)
    bottom_right = variant.get("bottom_right", True)
    with poisoned_outputs():
        out, lse = flashsdpa.varlen_attn(
            q, k, v, offsets(lens_q), offsets(lens_k), max(lens_q), max(lens_k), return_aux=Lse(), enable_gqa=True,
            causal=variant["causal"], window_size=variant["window"], backend=backend,
            causal_alignment="bottom_right" if bottom_right else "top_left",
        )  # fmt: skip
    ref_out, ref_lse = per_sequence(q, k, v, lens_q, lens_k, causal=variant["causal"], window=variant["window"],
                                    bottom_right=bottom_right)  # fmt: skip
    assert out.shape == (sum(lens_q), 4, 5) and lse.shape == (4, sum(lens_q))
    assert rel_err(out, ref_out) <= 1e-12
    assert_lse_close(lse, ref_lse, torch.float64)


SCORE_VARIANTS = [
    dict(softcap=0.7),
    dict(alibi_slopes="per sequence"),
    dict(sinks=True),
    dict(softcap=2.0, alibi_slopes="per head", sinks=True),
]


def _score_variant_arguments(variant, sequences, heads, gen):
    """The variant's tensors: ALiBi slopes (N, Hq) or (Hq,), sinks (Hq,) in float64."""
    arguments = dict(variant)
    if variant.get("alibi_slopes") == "per sequence":
        arguments["alibi_slopes"] = torch.rand(sequences, heads, generator=gen, dtype=torch.float64)
    elif variant.get("alibi_slopes") == "per head":
        arguments["alibi_slopes"] = torch.rand(heads, generator=gen, dtype=torch.float64)
    if variant.get("sinks"):
        arguments["sinks"] = randn((heads,), gen, torch.float64)
    return arguments


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", SCORE_VARIANTS, ids=lambda v: "+".join(v))
@pytest.mark.parametrize("visibility", [dict(causal=True, window=(-1, -1)), dict(causal=False, window=(3, 1))],
                         ids=["causal", "window"])  # fmt: skip
def test_score_variants_match_per_sequence_float64(backend, variant, visibility):
    """softcap, ALiBi (per head or per sequence) and sinks, bottom-right aligned per sequence."""
    lens_q, lens_k = [3, 0, 1, 6, 2], [5, 2, 0, 6, 9]
    gen = generator(21)
    q, k, v = packed(lens_q, lens_k, 4, 2, 8, gen)
    arguments = _score_variant_arguments(variant, len(lens_q), 4, gen)
    with poisoned_outputs():
        out, lse = flashsdpa.varlen_attn(
            q, k, v, offsets(lens_q), offsets(lens_k), 6, 9, return_aux=Lse(), enable_gqa=True, backend=backend,
            causal=visibility["causal"], window_size=visibility["window"], **arguments,
        )  # fmt: skip
    outs, lses = [], []
    q0 = k0 = 0
    for i, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        slopes = arguments.get("alibi_slopes")
        if slopes is not None and slopes.dim() == 2:
            slopes = slopes[i]
        per_seq = [t.transpose(0, 1).unsqueeze(0) for t in (q[q0 : q0 + lq], k[k0 : k0 + lk], v[k0 : k0 + lk])]
        if lk == 0:  # the oracle needs a key: no key gives zeros, and lse = the sink's logit or -inf
            sinks = arguments.get("sinks")
            outs.append(torch.zeros(lq, 4, 8, dtype=torch.float64))
            lses.append((sinks.view(-1, 1) if sinks is not None else torch.tensor(float("-inf"))).expand(4, lq))
            q0, k0 = q0 + lq, k0 + lk
            continue
        o, l = variants_oracle(*per_seq, causal=visibility["causal"], window=visibility["window"],
                               alignment="bottom_right", softcap=arguments.get("softcap"), alibi_slopes=slopes,
                               sinks=arguments.get("sinks"))  # fmt: skip
        outs.append(o[0].transpose(0, 1))
        lses.append(l[0])
        q0, k0 = q0 + lq, k0 + lk
    assert rel_err(out, torch.cat(outs)) <= 1e-12
    assert_lse_close(lse, torch.cat(lses, dim=-1), torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_variants_gradcheck_with_sinks(backend):
    lens_q, lens_k = [2, 0, 3], [3, 1, 2]
    gen = generator(22)
    q, k, v = (t.requires_grad_() for t in packed(lens_q, lens_k, 2, 1, 3, gen))
    sinks = randn((2,), gen, torch.float64).requires_grad_()
    slopes = torch.rand(2, generator=gen, dtype=torch.float64)
    cu_q, cu_k = offsets(lens_q), offsets(lens_k)

    def f(q, k, v, sinks):
        return flashsdpa.varlen_attn(q, k, v, cu_q, cu_k, 3, 3, enable_gqa=True, backend=backend, softcap=1.5,
                                     alibi_slopes=slopes, sinks=sinks, window_size=(-1, 0))  # fmt: skip

    assert torch.autograd.gradcheck(f, (q, k, v, sinks))


def test_score_variants_on_a_backend_without_them_name_the_reason():
    q = k = v = torch.randn(4, 2, 8)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(flashsdpa.UnsupportedError, match="backend 'aten' cannot run .*softcap"):
        flashsdpa.varlen_attn(q, k, v, cu, cu, 4, 4, softcap=1.0, backend="aten")


def test_torch_window_size_conventions():
    """(-1, 0) is causal and (W, 0) a causal window of W keys to the left, bottom-right aligned (torch's doc)."""
    lens = [6, 2, 9]
    gen = generator(3)
    q, k, v = packed(lens, [8, 5, 9], 2, 2, 8, gen)
    cu_q, cu_k = offsets(lens), offsets([8, 5, 9])
    for window, causal, ref_window in (((-1, 0), True, (-1, -1)), ((2, 0), True, (2, -1))):
        out = flashsdpa.varlen_attn(q, k, v, cu_q, cu_k, 9, 9, window_size=window)
        ref, _ = per_sequence(q, k, v, lens, [8, 5, 9], causal=causal, window=ref_window)
        assert rel_err(out, ref) <= 1e-12, window


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_within_torchs_own_error(dtype):
    lens = [33, 1, 70, 0, 12]
    gen = generator(11)
    q, k, v = packed(lens, lens, 4, 1, 16, gen, dtype)
    cu = offsets(lens)
    out, lse = flashsdpa.varlen_attn(q, k, v, cu, cu, 70, 70, window_size=(-1, 0), enable_gqa=True, return_aux=Lse())
    ref, ref_lse = per_sequence(q, k, v, lens, lens, causal=True)
    # torch's own error: its SDPA per sequence at the input dtype.
    torch_out = torch.cat([
        torch.nn.functional.scaled_dot_product_attention(
            *(t.transpose(0, 1) for t in (q[a:b], k[a:b], v[a:b])), is_causal=True, enable_gqa=True
        ).transpose(0, 1) if b > a else q[a:b]
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())
    ])  # fmt: skip
    assert out.dtype == dtype
    assert_forward_close(f"varlen {dtype}", out, ref, torch_out, dtype)
    # 16-bit sequences run on torch's fused CPU kernel (the aten backend), whose lse is within 1e-4.
    assert_lse_close(lse, ref_lse, dtype, atol=1e-4 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", [dict(window_size=(-1, 0)), dict(window_size=(2, 1), causal_alignment="top_left")])
def test_gradcheck(backend, variant):
    lens_q, lens_k = [3, 0, 1, 4], [2, 2, 1, 5]
    gen = generator(5)
    q, k, v = (t.requires_grad_() for t in packed(lens_q, lens_k, 4, 2, 3, gen))
    cu_q, cu_k = offsets(lens_q), offsets(lens_k)

    def f(q, k, v):
        return flashsdpa.varlen_attn(q, k, v, cu_q, cu_k, 4, 5, enable_gqa=True, backend=backend, **variant)

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_gradients_match_per_sequence_float32():
    lens = [20, 1, 0, 45]
    gen = generator(8)
    q, k, v = (t.requires_grad_() for t in packed(lens, lens, 2, 2, 16, gen, torch.float32))
    cu = offsets(lens)
    grad = randn((sum(lens), 2, 16), gen, torch.float32)
    out = flashsdpa.varlen_attn(q, k, v, cu, cu, 45, 45, window_size=(-1, 0))
    got = torch.autograd.grad(out, (q, k, v), grad)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = per_sequence(q64, k64, v64, lens, lens, causal=True)
    want = torch.autograd.grad(ref, (q64, k64, v64), grad.double())
    for name, g, w in zip("qkv", got, want):
        assert rel_err(g, w) <= 1e-5, name


def paged_copy(k, v, lens, page_size, gen, spare_pages=3):
    """The packed keys/values laid out in shuffled pages of `page_size` (a partial last page per sequence)."""
    pages_per_seq = [math.ceil(n / page_size) for n in lens]
    total = sum(pages_per_seq) + spare_pages
    order = torch.randperm(total, generator=gen)
    kp = randn((total, page_size, *k.shape[1:]), gen, k.dtype)  # garbage where no sequence's key lives
    vp = randn((total, page_size, *v.shape[1:]), gen, v.dtype)
    table = torch.zeros(len(lens), max(pages_per_seq) + 1, dtype=torch.int32)
    start = used = 0
    for i, n in enumerate(lens):
        for p in range(pages_per_seq[i]):
            page = int(order[used])
            used += 1
            table[i, p] = page
            rows = slice(start + p * page_size, start + min(n, (p + 1) * page_size))
            kp[page, : rows.stop - rows.start] = k[rows]
            vp[page, : rows.stop - rows.start] = v[rows]
        table[i, pages_per_seq[i] :] = int(order[-1])  # unused slots still name a real page
        start += n
    return kp, vp, table


@pytest.mark.parametrize("page_size", [1, 3, 16])
def test_paged_keys_equal_packed_keys(page_size):
    lens_q, lens_k = [2, 1, 5, 0], [7, 1, 12, 4]
    gen = generator(page_size)
    q, k, v = packed(lens_q, lens_k, 4, 2, 8, gen)
    kp, vp, table = paged_copy(k, v, lens_k, page_size, gen)
    used = torch.tensor(lens_k, dtype=torch.int32)
    kp.requires_grad_(), vp.requires_grad_()
    with poisoned_outputs():
        out = flashsdpa.varlen_attn(q, kp, vp, offsets(lens_q), None, 5, 12, window_size=(-1, 0), enable_gqa=True,
                                    seqused_k=used, block_table=table)  # fmt: skip
    ref, _ = per_sequence(q, k, v, lens_q, lens_k, causal=True)
    assert rel_err(out, ref) <= 1e-12
    # Gradients reach the pages a sequence reads, and nothing else.
    (dk,) = torch.autograd.grad(out.sum(), (kp,))
    read = torch.zeros(kp.shape[:2], dtype=torch.bool)
    for i, n in enumerate(lens_k):
        for pos in range(n):
            read[table[i, pos // page_size], pos % page_size] = True
    assert dk[~read].abs().max() == 0 if (~read).any() else True
    assert dk[read].abs().sum() > 0


def test_seqused_k_limits_the_keys():
    lens_q, lens_k, used = [3, 2], [6, 5], [4, 0]
    gen = generator(9)
    q, k, v = packed(lens_q, lens_k, 2, 2, 8, gen)
    out = flashsdpa.varlen_attn(q, k, v, offsets(lens_q), offsets(lens_k), 3, 6,
                                seqused_k=torch.tensor(used, dtype=torch.int32))  # fmt: skip
    keep = torch.cat([torch.arange(4), torch.arange(6, 6)])
    ref, _ = per_sequence(q, k[keep], v[keep], lens_q, used)
    assert rel_err(out, ref) <= 1e-12


def test_work_is_the_sum_of_squares(monkeypatch):
    """Lengths (1, 37, 1000, 5): the tiled backend scores sum(L_i^2) pairs, not 4 * 1000^2."""
    lens = [1, 37, 1000, 5]
    visited = {"scores": 0, "key_blocks": 0}
    scores = tiled._Tiles.scores

    def counting(self, *args):
        result = scores(self, *args)
        tile = result[0] if isinstance(result, tuple) else result  # (..., query rows, keys) of one tile
        visited["scores"] += tile.shape[-2] * tile.shape[-1]
        visited["key_blocks"] += 1
        return result

    monkeypatch.setattr(tiled._Tiles, "scores", counting)
    gen = generator(1)
    q, k, v = packed(lens, lens, 1, 1, 8, gen, torch.float32)
    cu = offsets(lens)
    flashsdpa.varlen_attn(q, k, v, cu, cu, 1000, 1000, backend="tiled")
    assert visited["scores"] == sum(n * n for n in lens)  # 1_001_395, against 4_000_000 padded
    bm, bn = tiled.BLOCK_M, tiled.BLOCK_N
    assert visited["key_blocks"] == sum(math.ceil(n / bm) * math.ceil(n / bn) for n in lens)


def test_dropout_reproduces_and_sequences_draw_their_own_pattern():
    lens = [9, 9]
    gen = generator(2)
    q, k, v = packed(lens, lens, 2, 2, 8, gen)
    # Two identical sequences: dropout must not drop the same weights in both.
    q[9:], k[9:], v[9:] = q[:9], k[:9], v[:9]
    cu = offsets(lens)
    results = {}
    for backend in BACKENDS:
        torch.manual_seed(0)
        results[backend] = flashsdpa.varlen_attn(q, k, v, cu, cu, 9, 9, dropout_p=0.3, backend=backend)
    torch.manual_seed(0)
    again = flashsdpa.varlen_attn(q, k, v, cu, cu, 9, 9, dropout_p=0.3, backend="tiled")
    assert torch.equal(again, results["tiled"])
    assert rel_err(results["tiled"], results["reference"]) <= 1e-12
    assert not torch.allclose(results["tiled"][:9], results["tiled"][9:])


def test_compiles_without_graph_breaks():
    lens = [4, 0, 7]
    gen = generator(4)
    q, k, v = (t.requires_grad_() for t in packed(lens, lens, 2, 1, 8, gen, torch.float32))
    cu = offsets(lens)

    def step(q, k, v, cu):
        return flashsdpa.varlen_attn(q, k, v, cu, cu, 7, 7, window_size=(-1, 0), enable_gqa=True).sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss = compiled(q, k, v, cu)
    grads = torch.autograd.grad(loss, (q, k, v))
    eager_grads = torch.autograd.grad(step(q, k, v, cu), (q, k, v))
    for g, e in zip(grads, eager_grads):
        assert torch.equal(g, e)


# ---- bad input: an error naming the argument, before anything runs ---------------------------------

def _bad_calls():
    q, k, v = torch.randn(6, 2, 4), torch.randn(7, 2, 4), torch.randn(7, 2, 4)
    cu_q, cu_k = torch.tensor([0, 2, 6], dtype=torch.int32), torch.tensor([0, 3, 7], dtype=torch.int32)
    pages = torch.randn(5, 3, 2, 4)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    used = torch.tensor([3, 4], dtype=torch.int32)
    base = dict(query=q, key=k, value=v, cu_seq_q=cu_q, cu_seq_k=cu_k, max_q=4, max_k=4)
    paged = dict(base, key=pages, value=pages, cu_seq_k=None, seqused_k=used, block_table=table)
    return [
        ("cu_seq_q must be an int32 or int64", dict(base, cu_seq_q=cu_q.float())),
        ("cu_seq_k must be an int32 or int64", dict(base, cu_seq_k=cu_k.to(torch.int16))),
        ("cu_seq_q must start at 0", dict(base, cu_seq_q=torch.tensor([1, 2, 6]))),
        ("cu_seq_k must be non-decreasing", dict(base, cu_seq_k=torch.tensor([0, 5, 3, 7]),
                                                 cu_seq_q=torch.tensor([0, 2, 2, 6]))),  # fmt: skip
        ("cu_seq_q .* and cu_seq_k .* same length", dict(base, cu_seq_k=torch.tensor([0, 7]))),
        (r"cu_seq_q\[-1\] = 5 must equal the number of packed tokens 6", dict(base, cu_seq_q=torch.tensor([0, 2, 5]))),
        (r"cu_seq_k\[-1\] = 8", dict(base, cu_seq_k=torch.tensor([0, 3, 8]))),
        ("max_q = 3 is smaller than the longest query sequence", dict(base, max_q=3)),
        ("max_k = 2 is smaller than the longest key sequence", dict(base, max_k=2)),
        ("block_table entries must be in", dict(paged, block_table=torch.tensor([[0, 5], [2, 3]]))),
        ("block_table entries must be in", dict(paged, block_table=torch.tensor([[0, -1], [2, 3]]))),
        ("block_table has 1 pages per sequence but seqused_k needs 2", dict(paged, block_table=table[:, :1])),
        ("block_table needs seqused_k", dict(paged, seqused_k=None)),
        ("seqused_k must have 1 dims and 2 rows", dict(paged, seqused_k=used[:1])),
        (r"seqused_k\[1\] = 5 exceeds", dict(base, seqused_k=torch.tensor([3, 5]))),
        ("key must be .pages, page_size", dict(paged, key=k)),
        ("query heads .4. must equal", dict(base, query=torch.randn(6, 4, 4))),
        ("cu_seq_k is required", dict(base, cu_seq_k=None)),
        ("window_size must be", dict(base, window_size=(-1,))),
        ("causal_alignment must be one of", dict(base, causal_alignment="bottom")),
        ("softcap must be None", dict(base, softcap=-1.0)),
        (r"alibi_slopes must have shape \(Hq,\) or \(N, Hq\)", dict(base, alibi_slopes=torch.rand(3, 2))),
        ("alibi_slopes must be float32", dict(base, alibi_slopes=torch.rand(2, dtype=torch.float64))),
        (r"sinks must have shape \(Hq,\)", dict(base, sinks=torch.zeros(3))),
    ]


@pytest.mark.parametrize("message, call", _bad_calls(), ids=lambda x: x if isinstance(x, str) else "")
def test_bad_input_names_the_argument(message, call, monkeypatch):
    ran = []
    for backend in ("tiled", "reference"):
        backend_object = flashsdpa.dispatch.BACKENDS[backend]
        monkeypatch.setattr(backend_object, "forward", lambda *a, **kw: ran.append(1))
    with pytest.raises((ValueError, TypeError), match=message):
        flashsdpa.varlen_attn(**call)
    assert not ran, "a backend ran before the error"


# ---- torch's own varlen_attn through the switch ------------------------------------------------------

def test_torch_varlen_attn_runs_unchanged_through_the_switch():
    """A call site written for torch's function (torch's signature, AuxRequest) runs on CPU in float32."""
    lens = [5, 1, 12]
    gen = generator(6)
    q, k, v = packed(lens, lens, 4, 2, 8, gen, torch.float32)
    cu = offsets(lens)

    def call_site():  # looks the function up when it runs, as code written against torch does
        return torch_varlen.varlen_attn(q, k, v, cu, cu, 12, 12, return_aux=torch_varlen.AuxRequest(lse=True),
                                        window_size=(-1, 0), enable_gqa=True)  # fmt: skip

    original = torch_varlen.varlen_attn
    flashsdpa.reset_stats()
    with switch.varlen(strict=True):
        out, lse = call_site()
    assert torch_varlen.varlen_attn is original  # restored
    ref, ref_lse = per_sequence(q, k, v, lens, lens, causal=True)
    assert rel_err(out, ref) <= 2e-6
    assert_lse_close(lse, ref_lse)
    assert sum(flashsdpa.stats()["calls"].values()) == 1, "one op call ran on flashsdpa"


def test_torch_varlen_attn_through_the_switch_compiles_fullgraph():
    q = torch.randn(10, 2, 8, requires_grad=True)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)

    def loss(q):
        return torch_varlen.varlen_attn(q, q, q, cu, cu, 6, 6, window_size=(-1, 0)).sum()

    switch.enable(strict=True)
    try:
        compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)(q)
        assert torch.equal(compiled, loss(q))
    finally:
        switch.disable()


def test_switch_falls_back_with_a_reason_or_raises_when_strict():
    """A call flashsdpa rejects goes to torch's own function: torch's error, whatever it is (torch 2.13 CPU
    checks the heads first, a ValueError; torch 2.11 reaches its flash kernel, which has no CPU
    implementation, a NotImplementedError), with the reason counted; strict mode raises instead."""
    q, k, v = torch.randn(4, 2, 8), torch.randn(4, 3, 8), torch.randn(4, 3, 8)  # 2 query heads, 3 kv heads
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(Exception) as torch_error:  # noqa: PT011 - the test takes whichever error torch raises
        torch_varlen.varlen_attn(q, k, v, cu, cu, 4, 4)
    flashsdpa.reset_stats()
    switch.enable(strict=False)
    try:
        with pytest.raises(torch_error.type) as error:  # torch's own error, as without flashsdpa
            torch_varlen.varlen_attn(q, k, v, cu, cu, 4, 4)
        assert str(error.value) == str(torch_error.value)
        assert flashsdpa.stats()["calls"].get("torch") == 1
        assert any("invalid arguments" in r for r in flashsdpa.stats()["fallbacks"])
        with switch.varlen(strict=True), pytest.raises(flashsdpa.UnsupportedError, match="strict mode"):
            torch_varlen.varlen_attn(q, k, v, cu, cu, 4, 4)
    finally:
        switch.disable()
    assert torch_varlen.varlen_attn.__module__ == "torch.nn.attention.varlen"


# ---- transformers: packed-sequence training through the registered implementation -------------------

def test_transformers_packed_batch_runs_as_varlen(monkeypatch):
    """DataCollatorWithFlattening's packed batch (cu_seq_lens_q/k) trains through `varlen_attn`: logits and
    gradients equal the "sdpa" model's run on each sequence alone. (transformers 5.25's own "sdpa" and
    "eager" find the packing from position_ids only without a cache: with the default use_cache=True, as
    here, their sequences see each other, 0.2 off; the varlen path reads cu_seq_lens and is right either way.)"""
    transformers = pytest.importorskip("transformers")
    from flashsdpa import varlen
    from flashsdpa.integrations import transformers as fs_transformers

    sizes = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    gen = torch.Generator().manual_seed(3)
    features = [{"input_ids": torch.randint(0, 64, (n,), generator=gen).tolist()} for n in (5, 1, 9)]
    packed_batch = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)(features)
    runs = []
    forward = varlen.forward_impl
    monkeypatch.setattr(varlen, "forward_impl", lambda *a: runs.append(1) or forward(*a))

    def logits_and_grads(attn_implementation, batches):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**sizes))
        model.set_attn_implementation(attn_implementation)
        logits = torch.cat([model(**batch).logits for batch in batches], dim=1)
        logits.square().mean().backward()
        return logits, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    registration = fs_transformers.register()
    try:
        logits, grads = logits_and_grads(registration.name, [packed_batch])
    finally:
        registration.remove()
    assert len(runs) == sizes["num_hidden_layers"]
    alone = [{"input_ids": torch.tensor([f["input_ids"]])} for f in features]
    ref_logits, ref_grads = logits_and_grads("sdpa", alone)
    assert rel_err(logits, ref_logits) <= 1e-5
    assert rel_err(grads, ref_grads) <= 1e-5


# ---- the triton backend, one sequence at a time (interpreted on the CPU) ------------------------------

def test_triton_backend_per_sequence_against_float64(device):
    """Forward and gradients on triton (interpreted without a GPU; bounds-checked loads) within torch's own error."""
    if device == "cpu" and flashsdpa.dispatch.BACKENDS["triton"].unsupported_reasons(
        flashsdpa.AttentionDescriptor((1,), 1, 1, 1, 1, 16, 16, torch.float32, "cpu"), torch.device("cpu")
    ):
        pytest.skip("the triton backend needs a GPU or TRITON_INTERPRET=1")
    lens_q, lens_k = [1, 0, 9, 3], [4, 2, 9, 11]
    gen = generator(31)
    q, k, v = (t.to(device).requires_grad_() for t in packed(lens_q, lens_k, 4, 2, 16, gen, torch.float32))
    grad = randn((sum(lens_q), 4, 16), gen, torch.float32, device)
    cu_q, cu_k = offsets(lens_q).to(device), offsets(lens_k).to(device)
    with poisoned_outputs():
        out = flashsdpa.varlen_attn(q, k, v, cu_q, cu_k, 9, 11, window_size=(-1, 0), enable_gqa=True,
                                    backend="triton")  # fmt: skip
        got = torch.autograd.grad(out, (q, k, v), grad)
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref, _ = per_sequence(q64, k64, v64, lens_q, lens_k, causal=True)
    want = torch.autograd.grad(ref, (q64, k64, v64), grad.cpu().double())
    assert rel_err(out, ref) <= 2e-6
    for name, g, w in zip("qkv", got, want):
        assert rel_err(g, w) <= 1e-5, name


def test_triton_dropout_pattern_equals_tiled(device):
    """Per-sequence dropout streams are the same on triton and tiled (one hash, the same per-sequence seeds)."""
    if device == "cpu" and flashsdpa.dispatch.BACKENDS["triton"].unsupported_reasons(
        flashsdpa.AttentionDescriptor((1,), 1, 1, 1, 1, 16, 16, torch.float32, "cpu"), torch.device("cpu")
    ):
        pytest.skip("the triton backend needs a GPU or TRITON_INTERPRET=1")
    lens = [7, 12]
    gen = generator(32)
    q, k, v = (t.to(device) for t in packed(lens, lens, 2, 2, 16, gen, torch.float32))
    cu = offsets(lens).to(device)
    results = []
    for backend in ("triton", "tiled"):
        torch.manual_seed(5)
        results.append(flashsdpa.varlen_attn(q, k, v, cu, cu, 12, 12, dropout_p=0.4, backend=backend))
    assert rel_err(results[0], results[1]) <= 2e-6


def test_transformers_packed_batch_compiles_fullgraph():
    transformers = pytest.importorskip("transformers")
    from flashsdpa.integrations import transformers as fs_transformers

    sizes = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    gen = torch.Generator().manual_seed(4)
    features = [{"input_ids": torch.randint(0, 64, (n,), generator=gen).tolist()} for n in (3, 8)]
    packed_batch = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)(features)
    registration = fs_transformers.register()
    try:
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**sizes))
        model.set_attn_implementation(registration.name)
        eager = model(**packed_batch).logits
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(**packed_batch).logits
    finally:
        registration.remove()
    assert torch.equal(compiled, eager)


def test_plain_calls_with_l_not_s_stay_torchs_problem(monkeypatch):
    """Without causal, a window or ALiBi the alignment changes nothing: no variant is described, so the
    fastest backend takes each sequence whole (no visibility mask is built for it)."""
    lens_q, lens_k = [2, 5], [7, 3]
    q, k, v = packed(lens_q, lens_k, 2, 1, 8, generator(41), torch.float32)
    aten = flashsdpa.dispatch.BACKENDS["aten"]
    seen = []
    monkeypatch.setattr(aten, "forward", lambda desc, inputs: seen.append((desc.variants, inputs.mask)) or
                        type(aten).forward(aten, desc, inputs))  # fmt: skip
    flashsdpa.reset_stats()
    out = flashsdpa.varlen_attn(q, k, v, offsets(lens_q), offsets(lens_k), 5, 7, enable_gqa=True)
    ref, _ = per_sequence(q, k, v, lens_q, lens_k)
    assert rel_err(out, ref) <= 2e-6
    assert seen == [((), None), ((), None)], "each sequence: no variant, no mask"
    assert flashsdpa.stats() == {"calls": {"aten": 1}, "fallbacks": {}}
