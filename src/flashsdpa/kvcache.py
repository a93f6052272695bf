"""Attention over a KV cache for decoding and chunked prefill: `kvcache_attention`, in FlashAttention's
`flash_attn_with_kvcache` conventions.

The path reads no tensor value on the host and makes no output shape depend on
data: new keys are written with index ops at positions computed on the device,
and each batch item's key count (`cache_seqlens + new tokens`) is read on the
device. So a decode step can be captured in a CUDA graph, and one compiled
graph serves every step.

Two ways to attend:

- the triton backend (chosen on a GPU, or pinned): its paged decode kernel
  (backends/triton/paged_kernels.py) reads K/V in place, through `block_table`
  for a paged cache, and only each sequence's own keys: work and bytes follow
  the real lengths, split over the key axis (the split count from the
  capacity and the GPU's SM count), merged in a fixed order;
- every other backend: the cache's (B, Hkv, capacity, E) view (a contiguous
  cache in place; a paged one gathered through `block_table` into that shape,
  B * capacity * Hkv * E elements for each of K and V) and a (B, 1, Lq,
  capacity) bool mask of the visible keys, through `flashsdpa.attention`
  (work B * Lq * capacity).
"""

from __future__ import annotations

import math

import torch

from flashsdpa import api, dispatch
from flashsdpa.descriptor import Alignment, AttentionDescriptor, Fp32Precision, statistics_dtype
from flashsdpa.validation import _check_small_tensor
from flashsdpa.visibility import Visibility, sees

Tensor = torch.Tensor


def _check(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, softcap, alibi_slopes, sinks) -> None:
    """Shapes, dtypes and devices: nothing here reads a tensor's values."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims, got shape {tuple(t.shape)}")
    if not q.dtype == k_cache.dtype == v_cache.dtype:
        raise TypeError(f"q, k_cache and v_cache must have one dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if not q.device == k_cache.device == v_cache.device:
        raise ValueError(f"q, k_cache and v_cache must be on one device, got {q.device}, {k_cache.device}, "
                         f"{v_cache.device}")  # fmt: skip
    batch, _, heads_q, head_dim = q.shape
    if k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must agree in all but "
                         "the last dim")  # fmt: skip
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"q {tuple(q.shape)} and k_cache {tuple(k_cache.shape)} must have the same head dim")
    heads_kv = k_cache.shape[2]
    if heads_kv == 0 or heads_q % heads_kv:
        raise ValueError(f"q's heads ({heads_q}) must be a multiple of the cache's ({heads_kv}); q {tuple(q.shape)}, "
                         f"k_cache {tuple(k_cache.shape)}")  # fmt: skip
    if block_table is None and k_cache.shape[0] < batch:
        raise ValueError(f"k_cache holds {k_cache.shape[0]} sequences but q has a batch of {batch}")
    if block_table is not None:
        if not isinstance(block_table, torch.Tensor) or block_table.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"block_table must be an int32 or int64 tensor, got "
                            f"{getattr(block_table, 'dtype', type(block_table).__name__)}")  # fmt: skip
        if block_table.dim() != 2 or block_table.shape[0] != batch:
            raise ValueError(f"block_table must be (batch={batch}, pages per sequence), got {tuple(block_table.shape)}")
        if block_table.device != q.device:
            raise ValueError(f"block_table is on {block_table.device} but q is on {q.device}")
    if isinstance(cache_seqlens, torch.Tensor):
        if cache_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"cache_seqlens must be int32 or int64, got {cache_seqlens.dtype}")
        if cache_seqlens.shape != (batch,):
            raise ValueError(f"cache_seqlens must be ({batch},), one length per sequence, got "
                             f"{tuple(cache_seqlens.shape)}")  # fmt: skip
        if cache_seqlens.device != q.device:
            raise ValueError(f"cache_seqlens is on {cache_seqlens.device} but q is on {q.device}")
    elif isinstance(cache_seqlens, bool) or not isinstance(cache_seqlens, int) or cache_seqlens < 0:
        raise TypeError(f"cache_seqlens must be a non-negative int or an int tensor, got {cache_seqlens!r}")
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new must be given together")
    if k_new is not None:
        for name, t, cache in (("k_new", k_new, k_cache), ("v_new", v_new, v_cache)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"{name} must be (batch, new tokens, Hkv, E), got {getattr(t, 'shape', t)}")
            if t.shape[0] != batch or t.shape[2:] != cache.shape[2:] or t.dtype != cache.dtype:
                raise ValueError(f"{name} {tuple(t.shape)} {t.dtype} must be (batch={batch}, new tokens, "
                                 f"{cache.shape[2]}, {cache.shape[3]}) in {cache.dtype}")  # fmt: skip
        if k_new.shape[1] != v_new.shape[1]:
            raise ValueError(f"k_new {tuple(k_new.shape)} and v_new {tuple(v_new.shape)} differ in new tokens")
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor) or alibi_slopes.dtype != torch.float32:
            raise TypeError(f"alibi_slopes must be a float32 tensor, got "
                            f"{getattr(alibi_slopes, 'dtype', type(alibi_slopes).__name__)}")  # fmt: skip
        if tuple(alibi_slopes.shape) not in ((heads_q,), (batch, heads_q)) or alibi_slopes.device != q.device:
            raise ValueError(f"alibi_slopes must be ({heads_q},) or ({batch}, {heads_q}) on {q.device}, got "
                             f"{tuple(alibi_slopes.shape)} on {alibi_slopes.device}")  # fmt: skip
    # Checked here too (flashsdpa.attention checks them again), so that bad ones fail before the append.
    if softcap is not None and (isinstance(softcap, bool) or not 0.0 < float(softcap) < math.inf):
        raise ValueError(f"softcap must be None (off) or a finite float > 0, got {softcap!r}")
    if sinks is not None:
        _check_small_tensor("sinks", sinks, q, (torch.float32, q.dtype))
        if tuple(sinks.shape) != (heads_q,):
            raise ValueError(f"sinks must have shape (Hq,) = ({heads_q},), got {tuple(sinks.shape)}")


def _capacity(k_cache: Tensor, block_table: Tensor | None) -> int:
    """Key positions a sequence can hold."""
    return k_cache.shape[1] if block_table is None else block_table.shape[1] * k_cache.shape[1]


def _validate_values(k_cache, cache_seqlens: Tensor, new_tokens: int, block_table) -> None:
    """Checks that read tensor values (a host synchronisation on a GPU)."""
    capacity = _capacity(k_cache, block_table)
    lengths = cache_seqlens.tolist()
    if min(lengths, default=0) < 0 or max(lengths, default=0) + new_tokens > capacity:
        raise ValueError(f"cache_seqlens + new tokens must be in [0, {capacity}] (the cache's capacity per "
                         f"sequence), got cache_seqlens = {lengths} with {new_tokens} new tokens")  # fmt: skip
    if block_table is not None and block_table.numel():
        pages = k_cache.shape[0]
        low, high = int(block_table.min()), int(block_table.max())
        if low < 0 or high >= pages:
            raise ValueError(f"block_table entries must be in [0, {pages}) (the cache has {pages} pages), got "
                             f"values in [{low}, {high}]")  # fmt: skip


def _slots(cache: Tensor, block_table: Tensor | None, positions: Tensor) -> tuple[Tensor, Tensor]:
    """Index pair addressing key `positions` (B, n) of each sequence in `cache`."""
    if block_table is None:
        return torch.arange(positions.shape[0], device=positions.device).view(-1, 1).expand_as(positions), positions
    page_size = cache.shape[1]
    return block_table.long().gather(1, positions // page_size), positions % page_size


def append(k_cache, v_cache, k_new, v_new, cache_seqlens: Tensor, block_table: Tensor | None = None) -> None:
    """Write k_new/v_new (B, n, Hkv, E) into the caches in place at positions cache_seqlens[b] + [0, n)."""
    new_tokens = k_new.shape[1]
    positions = cache_seqlens.long().view(-1, 1) + torch.arange(new_tokens, device=k_new.device)
    index = _slots(k_cache, block_table, positions)
    k_cache.index_put_(index, k_new)
    v_cache.index_put_(index, v_new)


def _keys(cache: Tensor, block_table: Tensor | None, batch: int) -> Tensor:
    """(B, Hkv, capacity, E): the contiguous cache's view, or the pages gathered in sequence order."""
    if block_table is None:
        return cache[:batch].transpose(1, 2)
    return cache[block_table.long()].flatten(1, 2).transpose(1, 2)


def _alibi_mask(slopes: Tensor, visible: Tensor, positions: Tensor, cols: Tensor, batch: int, heads: int,
                dtype: torch.dtype) -> Tensor:  # fmt: skip
    """The float mask -slope * |p - j| where visible, -inf elsewhere: (B, Hq, Lq, capacity), in `dtype`."""
    bias = -slopes.to(dtype).expand(batch, heads).view(batch, heads, 1, 1) * (positions - cols).abs()
    return bias.masked_fill(~visible, float("-inf"))


def kvcache_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    *,
    cache_seqlens,
    k_new: Tensor | None = None,
    v_new: Tensor | None = None,
    block_table: Tensor | None = None,
    scale: float | None = None,
    causal: bool = True,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float | None = None,
    alibi_slopes: Tensor | None = None,
    sinks: Tensor | None = None,
    return_lse: bool = False,
    validate: bool | None = None,
    backend: str | None = None,
    fp32_precision: str = "ieee",
):
    """Attention of new queries over a KV cache, appending new keys/values in place first.

    q (B, Lq, Hq, E). k_cache/v_cache (B_cache >= B, S_max, Hkv, E), or paged (pages, page_size, Hkv, E)
    with `block_table` (B, pages per sequence), int32/int64, any page size. `cache_seqlens`: int or
    (B,) int tensor, the keys already in each sequence's cache. `k_new`/`v_new` (B, n, Hkv, E), if
    given, are written into the caches at positions [cache_seqlens[b], cache_seqlens[b] + n) before
    attending; sequence b then attends to its first K_b = cache_seqlens[b] + n keys. Hq a multiple
    of Hkv (GQA: keys are never repeated). Returns out (B, Lq, Hq, Ev), and with `return_lse` the
    natural-log lse (B, Hq, Lq), float32 (float64 for float64 inputs). Forward only.

    `causal` (default True, unlike flash_attn_with_kvcache) is bottom-right aligned: query i sits at
    position p = K_b - Lq + i and sees keys j <= p; `window_size=(left, right)` limits keys to
    [p - left, p + right] (-1 = unbounded). A row with no visible key gives zeros (lse -inf)::

        cache_seqlens=3, n=2 new tokens, Lq=2, causal   keys 0 1 2 3 4
        query 0 (position 3)                                 x x x x .
        query 1 (position 4)                                 x x x x x

    `softcap` and `sinks` (Hq,) as in `flashsdpa.attention`. `alibi_slopes` (Hq,) or (B, Hq) float32
    add -slope * |p - j|; the paged decode kernel computes them, the other backends get them as a float
    (B, Hq, Lq, capacity) mask (each sequence's p differs), at that much memory.

    Backends: the triton backend, automatic on a GPU (or pinned), runs its paged decode kernel (module
    doc); the others attend over the gathered cache with a mask. `stats()` counts the call either way.

    Checks: shapes, dtypes and devices always. Value checks (cache_seqlens + n within the capacity,
    block_table entries within the pages) read tensors on the host: `validate=None` (default) runs
    them for CPU tensors only, True always, False never. Without them an out-of-range value is an
    index error of the device (or a wrong answer): keep them on until the caller's bookkeeping is
    trusted, and off on a path to be captured in a CUDA graph.
    Differences from flash_attn_with_kvcache: `k_new`/`v_new` for its `k`/`v`, `scale` for
    `softmax_scale`, `return_lse` for `return_softmax_lse`; no rotary embedding, `cache_batch_idx`,
    `cache_leftpad` or `num_splits`.
    """
    _check(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, softcap, alibi_slopes, sinks)
    if len(window_size) != 2 or min(window_size) < -1:
        raise ValueError(f"window_size must be (left, right) with entries >= -1, got {window_size!r}")
    batch, seq_q, heads_q, _ = q.shape
    if not isinstance(cache_seqlens, torch.Tensor):
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int64, device=q.device)
    new_tokens = 0 if k_new is None else k_new.shape[1]
    desc = cache_descriptor(q, k_cache, v_cache, _capacity(k_cache, block_table), scale=scale, causal=causal,
                            window_size=window_size, softcap=softcap, alibi=alibi_slopes is not None,
                            sinks=sinks is not None, fp32_precision=fp32_precision)  # fmt: skip
    paged_kernel = _uses_paged_kernel(desc, q.device, backend)
    if validate or (validate is None and q.device.type == "cpu"):
        _validate_values(k_cache, cache_seqlens, new_tokens, block_table)
    if k_new is not None:
        append(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table)
    if paged_kernel:
        slopes = None if alibi_slopes is None else alibi_slopes.to(torch.float32).expand(batch, heads_q)
        out, lse = _paged_decode(q, k_cache, v_cache, cache_seqlens, block_table, slopes, sinks, new_tokens,
                                 desc.scale, causal, desc.window_left, desc.window_right, desc.softcap,
                                 fp32_precision)  # fmt: skip
        return (out.transpose(1, 2), lse) if return_lse else out.transpose(1, 2)
    keys, values = _keys(k_cache, block_table, batch), _keys(v_cache, block_table, batch)
    seq_kv = (cache_seqlens.long() + new_tokens).view(batch, 1, 1, 1)
    band = Visibility.of(desc)
    rows = torch.arange(seq_q, device=q.device).view(-1, 1)
    cols = torch.arange(keys.shape[2], device=q.device).view(1, -1)
    positions = rows + (seq_kv - seq_q)  # (B, 1, Lq, 1): each sequence's bottom-right aligned positions
    mask = sees(positions, cols, seq_kv, band.left, band.right)  # (B, 1, Lq, capacity)
    if alibi_slopes is not None:
        mask = _alibi_mask(alibi_slopes, mask, positions, cols, batch, heads_q, statistics_dtype(q.dtype))
    result = api.attention(
        q.transpose(1, 2), keys, values, attn_mask=mask, scale=scale, enable_gqa=True, return_lse=return_lse,
        backend=backend, fp32_precision=fp32_precision, softcap=softcap, sinks=sinks,
    )  # fmt: skip
    if return_lse:
        out, lse = result
        return out.transpose(1, 2), lse
    return result.transpose(1, 2)


def cache_descriptor(q: Tensor, k_cache: Tensor, v_cache: Tensor, capacity: int, *, scale, causal: bool,
                     window_size: tuple[int, int], softcap, alibi: bool, sinks: bool,
                     fp32_precision: str) -> AttentionDescriptor:  # fmt: skip
    """The problem of q (B, Lq, Hq, E) over `capacity` keys per sequence, bottom-right aligned: what the
    triton backend is asked about and what picks its kernel variant (each sequence's own key count is
    read on the device). A window side past every key is clamped (it changes nothing and stays an int32)."""
    batch, seq_q, heads_q, head_dim = q.shape
    left, right = (min(int(side), capacity + seq_q) for side in window_size)
    return AttentionDescriptor(
        (batch,), heads_q, k_cache.shape[2], seq_q, capacity, head_dim, v_cache.shape[3], q.dtype, q.device.type,
        causal=causal, scale=scale, fp32_precision=Fp32Precision(fp32_precision), window_left=left,
        window_right=right, alignment=Alignment.BOTTOM_RIGHT, softcap=float(softcap or 0.0), alibi=alibi,
        sinks=sinks,
    )  # fmt: skip


def _uses_paged_kernel(desc: AttentionDescriptor, device: torch.device, backend: str | None) -> bool:
    """Whether the triton backend's paged decode kernel runs this call: where triton is pinned (raising with
    its reasons if it cannot), or chosen automatically on a GPU it can serve (else its reasons are recorded
    as fallbacks). Other backends attend over the cache gathered into (B, Hkv, capacity, E) with a mask.
    Under torch.compile a `use_backend` pin is not read here (see api._pinned_backend_outside_compile)."""
    requested = backend or api._pinned_backend_outside_compile() or None
    if requested not in ("triton", None) or (requested is None and device.type != "cuda"):
        return False
    reasons = dispatch.backend_reasons(dispatch.get_backend("triton"), desc, device)
    if reasons and requested == "triton":
        raise dispatch.UnsupportedError("backend 'triton' cannot run this problem: " + "; ".join(reasons), reasons)
    for reason in reasons:
        dispatch.record_fallback(f"triton paged decode: {reason}")
    return not reasons


def _paged_decode(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, sinks, new_tokens, scale, causal,
                  window_left, window_right, softcap, fp32_precision) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(out (B, Hq, Lq, Ev), lse (B, Hq, Lq)) from the triton backend's paged decode kernel; through the
    custom op when traced (torch.compile), straight to its body otherwise (the op's dispatch costs host time)."""
    arguments = (q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, sinks, new_tokens, scale, causal,
                 window_left, window_right, softcap, fp32_precision)  # fmt: skip
    if torch.compiler.is_compiling():
        return paged_decode_op(*arguments)
    return _paged_decode_impl(*arguments)


def _paged_decode_impl(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, sinks, new_tokens, scale,
                       causal, window_left, window_right, softcap, fp32_precision):  # fmt: skip
    from flashsdpa.backends.triton.launch_paged import paged_decode  # imported on the first triton call

    desc = cache_descriptor(q, k_cache, v_cache, _capacity(k_cache, block_table), scale=scale, causal=causal,
                            window_size=(window_left, window_right), softcap=softcap,
                            alibi=alibi_slopes is not None, sinks=sinks is not None,
                            fp32_precision=fp32_precision)  # fmt: skip
    dispatch.record_call("triton")
    return paged_decode(desc, q, k_cache, v_cache, cache_seqlens, block_table, new_tokens, alibi_slopes, sinks)


@torch.library.custom_op("flashsdpa::kvcache_paged_decode", mutates_args=())
def paged_decode_op(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    block_table: Tensor | None,
    alibi_slopes: Tensor | None,
    sinks: Tensor | None,
    new_tokens: int,
    scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    fp32_precision: str,
) -> tuple[Tensor, Tensor]:
    """`_paged_decode_impl` as a custom op (its fake below), so torch.compile traces the call whole."""
    return _paged_decode_impl(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, sinks, new_tokens,
                              scale, causal, window_left, window_right, softcap, fp32_precision)  # fmt: skip


@paged_decode_op.register_fake
def _(q, k_cache, v_cache, *_rest):
    batch, seq_q, heads_q, _ = q.shape
    out = q.new_empty((batch, heads_q, seq_q, v_cache.shape[3]))
    return out, q.new_empty((batch, heads_q, seq_q), dtype=torch.float32)
