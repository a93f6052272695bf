"""Packed variable-length attention: `varlen_attn`, with torch's `torch.nn.attention.varlen.varlen_attn` signature.

A batch of N sequences is packed into query (T_q, Hq, E) and key/value
(T_k, Hkv, E); `cu_seq_q` / `cu_seq_k` (N+1 offsets from 0) say where each
sequence starts. Sequence i attends only to its own keys, with no work spent
on padding. Keys and values may instead be paged, (pages, page_size, Hkv, E),
with `block_table` (N, max_pages) naming each sequence's pages in order and
`seqused_k` (N,) its key count.

How it runs: two custom ops (`flashsdpa::varlen_forward` and a backward op).
On a backend that runs a packed batch whole (`Backend.runs_packed`: triton),
each kernel is one launch over (query or key blocks of the longest sequence,
heads, sequences) whose programs read their sequence's offsets from cu_seq_q /
cu_seq_k (and seqused_k) on the device and exit past its end: no host read of
the offsets (`validate` asks for one), no padded tensor, work sum_i L_i * S_i.
Otherwise (other backends, paged keys) the op reads the offsets on the host
and runs the chosen backend once per sequence on views of the packed tensors
(a paged sequence's keys are gathered from its pages, one sequence at a
time); the work is the same sum, and reading the offsets is a host
synchronisation on a GPU. Under `torch.compile(fullgraph=True)` either stays
inside the op and the graph does not break. Backends: reference and tiled on
any device; the automatic choice takes the packed triton kernels where they
take the problem, else runs each sequence on the first backend that takes it
(aten, then tiled, on a CPU; hopper, then triton, on CUDA).

Memory beyond the outputs: the packed triton backward's row statistics,
3 * N * Hq * max_q float32 (rows rounded up to 128), and zeroed dK/dV where
seqused_k leaves key rows outside every sequence; for paged keys, one
sequence's gathered keys at a time; and for a backend that declines windows
or the bottom-right alignment (aten), a bool (L_i, S_i) mask of the
sequence's visible keys.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from flashsdpa import dispatch
from flashsdpa.api import _pinned_backend_outside_compile
from flashsdpa.backends.base import AttentionInputs, Backend, GradientsNeeded, PackedSequences, new_output
from flashsdpa.descriptor import AttentionDescriptor, Fp32Precision, statistics_dtype
from flashsdpa.dropout import draw_seed, split_seed
from flashsdpa.ops import sink_gradient
from flashsdpa.validation import CallOptions, _check_small_tensor, describe
from flashsdpa.visibility import Visibility

Tensor = torch.Tensor

ALIGNMENTS = ("bottom_right", "top_left")
_INDEX_DTYPES = (torch.int32, torch.int64)


# ---- options and the packing ------------------------------------------------------------


@dataclass(frozen=True)
class VarlenOptions:
    """Everything about a varlen call that is not a tensor, as the ops carry it."""

    scale: float | None
    causal: bool
    window_left: int
    window_right: int
    bottom_right: bool
    softcap: float  # 0 = off
    dropout_p: float
    backend: str  # "" = automatic (or the `use_backend` pin)
    fp32_precision: str
    validate: bool  # read the offsets on the host to check them (see `varlen_attn`)

    def as_op_arguments(self) -> tuple:
        return (self.scale, self.causal, self.window_left, self.window_right, self.bottom_right, self.softcap,
                self.dropout_p, self.backend, self.fp32_precision, self.validate)  # fmt: skip

    def visibility(self, seq_q: int, seq_kv: int) -> Visibility:
        """A sequence's visible keys (per-sequence alignment: offset S_i - L_i bottom-right)."""
        right = (0 if self.window_right < 0 else min(self.window_right, 0)) if self.causal else self.window_right
        offset = seq_kv - seq_q if self.bottom_right else 0
        return Visibility(seq_q, seq_kv, offset, self.window_left, right)


@dataclass(frozen=True)
class Sequence:
    """One packed sequence: query rows [q_start, q_start + q_len), key rows [k_start, k_start + k_len)
    (for paged keys, k_start is 0 and the keys are positions of the sequence's pages)."""

    index: int
    q_start: int
    q_len: int
    k_start: int
    k_len: int


def _offsets(name: str, cu: Tensor, total: int | None) -> list[int]:
    values = cu.tolist()
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {values[0]} ({name} = {values})")
    if any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(f"{name} must be non-decreasing, got {values}")
    if total is not None and values[-1] != total:
        raise ValueError(f"{name}[-1] = {values[-1]} must equal the number of packed tokens {total}")
    return values


def sequences(
    query, key, cu_seq_q, cu_seq_k, max_q: int, max_k: int, seqused_k, block_table
) -> list[Sequence]:
    """The packed sequences, from the offsets read on the host; raises ValueError on any inconsistency."""
    q_offsets = _offsets("cu_seq_q", cu_seq_q, query.shape[0])
    count = len(q_offsets) - 1
    k_offsets = None
    if cu_seq_k is not None:
        k_offsets = _offsets("cu_seq_k", cu_seq_k, None if block_table is not None else key.shape[0])
    used = None if seqused_k is None else seqused_k.tolist()
    if used is not None and any(n < 0 for n in used):
        raise ValueError(f"seqused_k must be non-negative, got {used}")
    result = []
    for i in range(count):
        if block_table is not None:
            k_start, k_len = 0, used[i]
        else:
            k_start, k_len = k_offsets[i], k_offsets[i + 1] - k_offsets[i]
            if used is not None:
                if used[i] > k_len:
                    raise ValueError(
                        f"seqused_k[{i}] = {used[i]} exceeds sequence {i}'s key length {k_len} (from cu_seq_k)"
                    )
                k_len = used[i]
        result.append(Sequence(i, q_offsets[i], q_offsets[i + 1] - q_offsets[i], k_start, k_len))
    longest_q = max((s.q_len for s in result), default=0)
    longest_k = max((s.k_len for s in result), default=0)
    if longest_q > max_q:
        raise ValueError(f"max_q = {max_q} is smaller than the longest query sequence ({longest_q} tokens)")
    if longest_k > max_k:
        raise ValueError(f"max_k = {max_k} is smaller than the longest key sequence ({longest_k} tokens)")
    if block_table is not None:
        page_size, pages = key.shape[1], key.shape[0]
        needed = max((math.ceil(s.k_len / page_size) for s in result), default=0)
        if needed > block_table.shape[1]:
            raise ValueError(
                f"block_table has {block_table.shape[1]} pages per sequence but seqused_k needs {needed} "
                f"(page size {page_size}, seqused_k = {used})"
            )
        if block_table.numel():
            low, high = int(block_table.min()), int(block_table.max())
            if low < 0 or high >= pages:
                raise ValueError(f"block_table entries must be in [0, {pages}) (key has {pages} pages), "
                                 f"got values in [{low}, {high}]")  # fmt: skip
    return result


def check_arguments(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, enable_gqa, seqused_k, block_table) -> None:
    """Checks that read no tensor's values (shapes, dtypes, devices): safe under torch.compile, no host sync."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    paged = block_table is not None
    kv_dims = 4 if paged else 3
    if query.dim() != 3:
        raise ValueError(f"query must be (T_q, Hq, E), got shape {tuple(query.shape)}")
    for name, t in (("key", key), ("value", value)):
        if t.dim() != kv_dims:
            layout = "(pages, page_size, Hkv, E) with block_table" if paged else "(T_k, Hkv, E)"
            raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")
    if not query.dtype == key.dtype == value.dtype:
        raise TypeError(f"query, key and value must have one dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    if not query.device == key.device == value.device:
        raise ValueError(f"query, key and value must be on one device, got {query.device}, {key.device}, {value.device}")
    if key.shape[:-1] != value.shape[:-1]:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must agree in all but the last dim")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} must have the same head dim")
    heads_q, heads_kv = query.shape[1], key.shape[-2]
    if heads_kv == 0 or (heads_q != heads_kv and not enable_gqa) or heads_q % heads_kv:
        hint = "" if enable_gqa else "; pass enable_gqa=True for grouped-query attention"
        raise ValueError(f"query heads ({heads_q}) must equal key/value heads ({heads_kv}), or be a multiple of "
                         f"them with enable_gqa=True{hint}")  # fmt: skip
    count = None
    for name, t in (("cu_seq_q", cu_seq_q), ("cu_seq_k", cu_seq_k)):
        if t is None and (name == "cu_seq_q" or not paged):
            raise ValueError(f"{name} is required" + ("" if name == "cu_seq_q" else " (keys are not paged)"))
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dtype not in _INDEX_DTYPES:
            raise TypeError(f"{name} must be an int32 or int64 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.dim() != 1 or t.shape[0] < 1:
            raise ValueError(f"{name} must be 1-D of length N+1 (N sequences), got shape {tuple(t.shape)}")
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device} but query is on {query.device}")
        if count is not None and t.shape[0] - 1 != count:
            raise ValueError(f"cu_seq_q ({count + 1} entries) and cu_seq_k ({t.shape[0]}) must have the same length")
        count = t.shape[0] - 1
    for name, t, dims in (("seqused_k", seqused_k, 1), ("block_table", block_table, 2)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dtype not in _INDEX_DTYPES:
            raise TypeError(f"{name} must be an int32 or int64 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.dim() != dims or t.shape[0] != count:
            raise ValueError(f"{name} must have {dims} dims and {count} rows (one per sequence, from cu_seq_q), "
                             f"got shape {tuple(t.shape)}")  # fmt: skip
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device} but query is on {query.device}")
    if paged and seqused_k is None:
        raise ValueError("block_table needs seqused_k (each sequence's key count)")
    for name, m in (("max_q", max_q), ("max_k", max_k)):
        if isinstance(m, bool) or not isinstance(m, (int, torch.SymInt)) or m < 0:
            raise ValueError(f"{name} must be a non-negative int, got {m!r}")


# ---- running it, one sequence at a time --------------------------------------------------


def _head_major(t: Tensor) -> Tensor:
    """(n, H, E) -> the canonical (1, H, n, E) view."""
    return t.transpose(0, 1).unsqueeze(0)


def _packed_view(t: Tensor) -> Tensor:
    """(n, H, E) -> a (1, H, n, E) view with batch stride 0, as a packed batch's kernels read it (the
    sequence index takes the batch's place; (H, n) -> (1, H, n) likewise)."""
    t = t.transpose(0, 1) if t.dim() == 3 else t
    return t.as_strided((1, *t.shape), (0, *t.stride()), t.storage_offset())


def _key_tokens(key: Tensor, block_table: Tensor | None, seq: Sequence) -> tuple[Tensor, Tensor | None]:
    """Sequence `seq`'s keys (k_len, Hkv, E): a view of packed keys, or gathered from its pages; and for
    pages, the flat (pages * page_size) token index of each key (for scattering gradients back)."""
    if block_table is None:
        return key[seq.k_start : seq.k_start + seq.k_len], None
    page_size = key.shape[1]
    positions = torch.arange(seq.k_len, device=key.device)
    tokens = block_table[seq.index].long()[positions // page_size] * page_size + positions % page_size
    return key.flatten(0, 1).index_select(0, tokens), tokens


@dataclass(frozen=True)
class _Problem:
    """One sequence's canonical problem for a backend: its descriptor and inputs, and for paged keys the
    flat token index of each key (to scatter gradients back)."""

    desc: AttentionDescriptor
    inputs: AttentionInputs
    tokens: Tensor | None


class _Runner:
    """Builds each sequence's problem and picks its backend, recording each fallback reason once per call.

    A sequence's visible keys go to the backend as descriptor fields (causal, window, alignment), so that it
    skips the key blocks no query sees. A backend that declines those fields (aten: windows
    and the bottom-right alignment) gets them as a bool mask instead where the call has no score variant (softcap,
    ALiBi and sinks need the fields), rather than the problem going to a slower backend.
    """

    def __init__(self, query, key, value, block_table, alibi_slopes, sinks, options: VarlenOptions,
                 dropout_seed: Tensor, gradients: str):  # fmt: skip
        self.query, self.key, self.value, self.block_table = query, key, value, block_table
        stats = statistics_dtype(query.dtype)
        # (N or 1, Hq) and (Hq,) in the statistics dtype, as the backends read them.
        self.alibi_slopes = None if alibi_slopes is None else alibi_slopes.to(stats).view(-1, query.shape[1])
        self.sinks = None if sinks is None else sinks.to(stats)
        self.options = options
        self.seed = split_seed(dropout_seed) if dropout_seed.numel() else None
        self.gradients = gradients
        self.recorded: set[str] = set()

    def packed(self, cu_seq_q: Tensor, cu_seq_k: Tensor | None, seqused_k: Tensor | None, max_q: int,
               max_k: int) -> tuple[Backend, AttentionDescriptor, AttentionInputs, PackedSequences] | None:
        """The backend that runs the whole batch in one call (`Backend.runs_packed`) and its problem, or None
        (paged keys, a requested backend without it, or one that declines the problem): then each sequence
        runs on its own. Reads no tensor value on the host."""
        if self.block_table is None and self.query.shape[0] and self.key.shape[0]:
            o = self.options
            requested = o.backend or dispatch.pinned_backend()
            names = (requested,) if requested else dispatch.AUTOMATIC_ORDER.get(self.query.device.type, ())
            count, heads_q = cu_seq_q.shape[0] - 1, self.query.shape[1]
            q, k, v = _packed_view(self.query), _packed_view(self.key), _packed_view(self.value)
            # The whole batch as N sequences of the longest lengths (bounds the kernels' grids); each
            # sequence's alignment follows its own lengths in the kernels.
            # Causal (right = 0) stays causal with a window, as `flashsdpa.attention` gives it: the kernels'
            # tile tables key on it.
            visibility = o.visibility(max_q, max_k)
            causal = visibility.right == 0
            call = CallOptions(o.dropout_p, causal, o.scale, visibility.left, -1 if causal else visibility.right,
                               "bottom_right" if o.bottom_right else "top_left", o.softcap, o.fp32_precision,
                               self.gradients)  # fmt: skip
            desc = describe(q, k, v, None, call, self.alibi_slopes is not None, self.sinks is not None)
            desc = dataclasses.replace(desc, batch_shape=(count,), seq_q=max_q, seq_kv=max_k)
            for name in names:
                backend = dispatch.get_backend(name)
                if backend.runs_packed and not backend.packed_unsupported_reasons(desc, self.query.device):
                    slopes = self.alibi_slopes
                    if slopes is not None:  # one row per sequence (stride 0 for shared slopes)
                        slopes = slopes.expand(count, heads_q)
                    inputs = AttentionInputs(q, k, v, None, self.seed, slopes, self.sinks)
                    key_counts = seqused_k if seqused_k is not None else cu_seq_k[1:] - cu_seq_k[:-1]
                    return backend, desc, inputs, PackedSequences(cu_seq_q, cu_seq_k, key_counts, seqused_k is None)
        return None

    def plan(self, seq: Sequence) -> tuple[Backend, _Problem]:
        """The backend for sequence `seq` and the problem in the form it takes."""
        problem = self._problem(seq, as_mask=False)
        o = self.options
        score_variants = o.softcap > 0.0 or self.alibi_slopes is not None or self.sinks is not None
        can_mask = not score_variants and (problem.desc.windowed or problem.desc.key_offset != 0)
        masked = self._problem(seq, as_mask=True) if can_mask else None
        device = self.query.device
        requested = o.backend or dispatch.pinned_backend()
        if requested:  # it runs the problem, or its masked form, or raises
            backend = dispatch.get_backend(requested)
            reasons = dispatch.backend_reasons(backend, problem.desc, device)
            if not reasons:
                return backend, problem
            if masked is not None and not dispatch.backend_reasons(backend, masked.desc, device):
                return backend, masked
            raise dispatch.UnsupportedError(f"backend {requested!r} cannot run this varlen sequence: "
                                            + "; ".join(reasons), reasons)  # fmt: skip
        name, skipped = dispatch.automatic_choice(problem.desc, device)
        chosen = problem
        if masked is not None:
            # The masked form where an earlier backend takes it; the reasons recorded are the problem's own
            # for the backends before the chosen one.
            order = dispatch.AUTOMATIC_ORDER.get(device.type, dispatch.DEFAULT_ORDER)
            masked_name, _ = dispatch.automatic_choice(masked.desc, device)
            if masked_name is not None and (name is None or order.index(masked_name) < order.index(name)):
                name, chosen = masked_name, masked
                earlier = order[: order.index(masked_name)]
                skipped = [reason for reason in skipped if reason.split(": ", 1)[0] in earlier]
        if name is None:
            raise dispatch.UnsupportedError("no flashsdpa backend can run this varlen sequence: " + "; ".join(skipped),
                                            skipped)  # fmt: skip
        for reason in skipped:
            if reason not in self.recorded:
                self.recorded.add(reason)
                dispatch.record_fallback(reason)
        return dispatch.get_backend(name), chosen

    def _problem(self, seq: Sequence, as_mask: bool) -> _Problem:
        o = self.options
        q = _head_major(self.query[seq.q_start : seq.q_start + seq.q_len])
        k_rows, tokens = _key_tokens(self.key, self.block_table, seq)
        v_rows = _key_tokens(self.value, self.block_table, seq)[0]
        k, v = _head_major(k_rows), _head_major(v_rows)
        visibility = o.visibility(seq.q_len, seq.k_len)
        mask = None
        if as_mask:
            rows = torch.arange(seq.q_len, device=q.device)
            mask = visibility.mask(rows, torch.arange(seq.k_len, device=q.device))
            mask = mask.expand(1, q.shape[1], seq.q_len, seq.k_len)
            call = CallOptions(o.dropout_p, False, o.scale, -1, -1, "top_left", o.softcap, o.fp32_precision,
                               self.gradients)  # fmt: skip
        else:
            # Causal is the window's right side at 0 (Visibility); the alignment matters only where L != S.
            causal = visibility.right == 0 and visibility.left < 0
            left, right = (-1, -1) if causal else (visibility.left, visibility.right)
            # The alignment matters only to a positional rule (causal, a window, ALiBi): a plain call stays
            # torch's SDPA problem, which every backend takes.
            positional = not visibility.unrestricted or self.alibi_slopes is not None
            alignment = "bottom_right" if visibility.offset and positional else "top_left"
            call = CallOptions(o.dropout_p, causal, o.scale, left, right, alignment, o.softcap, o.fp32_precision,
                               self.gradients)  # fmt: skip
        desc = describe(q, k, v, mask, call, self.alibi_slopes is not None, self.sinks is not None)
        # Sequence i draws dropout as batch item i of a (N, Hq) batch would: its heads' streams follow on
        # (seeds stay below 2**31, as `draw_seed` gives them and the triton kernels take them).
        seed = None if self.seed is None else (self.seed[0], (self.seed[1] + seq.index * q.shape[1]) % 2**31)
        slopes = self.alibi_slopes
        if slopes is not None:
            slopes = slopes[seq.index if slopes.shape[0] > 1 else 0].view(1, -1)
        return _Problem(desc, AttentionInputs(q, k, v, mask, seed, slopes, self.sinks), tokens)


def _is_empty(seq: Sequence) -> bool:
    return seq.q_len == 0 or seq.k_len == 0


def _dropout_seed(opts: VarlenOptions, sequences_count: int, heads_q: int) -> Tensor:
    """A fresh seed, int64 (2,) (empty without dropout), whose second half plus sequence * Hq + head stays
    below 2**31: each sequence's heads draw the streams of batch items of a (N, Hq) batch, on the host
    (per sequence) or in a kernel (packed), without wrapping."""
    if opts.dropout_p == 0.0:
        return torch.empty(0, dtype=torch.int64)
    seed = draw_seed()
    seed[1] %= max(1, 2**31 - sequences_count * heads_q)
    return seed


def forward_impl(query, key, value, cu_seq_q, cu_seq_k, seqused_k, block_table, alibi_slopes, sinks, max_q, max_k,
                 *options):  # fmt: skip
    opts = VarlenOptions(*options)
    total_q, heads_q = query.shape[0], query.shape[1]
    dropout_seed = _dropout_seed(opts, cu_seq_q.shape[0] - 1, heads_q)
    runner = _Runner(query, key, value, block_table, alibi_slopes, sinks, opts, dropout_seed, "auto")
    packed_run = runner.packed(cu_seq_q, cu_seq_k, seqused_k, max_q, max_k)
    if packed_run is not None:
        if opts.validate:
            sequences(query, key, cu_seq_q, cu_seq_k, max_q, max_k, seqused_k, block_table)
        backend, desc, inputs, packing = packed_run
        out, lse = backend.packed_forward(desc, inputs, packing)
        dispatch.record_call(backend.name)
        return out[0].transpose(0, 1), lse[0], dropout_seed
    packed = sequences(query, key, cu_seq_q, cu_seq_k, max_q, max_k, seqused_k, block_table)
    out = new_output((total_q, heads_q, value.shape[-1]), query.dtype, query.device)
    lse = new_output((heads_q, total_q), statistics_dtype(query.dtype), query.device)
    backends_used = set()
    for seq in packed:
        rows = slice(seq.q_start, seq.q_start + seq.q_len)
        if _is_empty(seq):  # no (query, key) pair: zeros and lse -inf (the sink's logit), as for any empty row
            out[rows] = 0
            lse[:, rows] = float("-inf") if runner.sinks is None else runner.sinks.view(-1, 1)
            continue
        backend, problem = runner.plan(seq)
        backends_used.add(backend.name)
        out_seq, lse_seq = backend.forward(problem.desc, problem.inputs)
        out[rows] = out_seq[0].transpose(0, 1)
        lse[:, rows] = lse_seq[0]
    for name in sorted(backends_used):
        dispatch.record_call(name)
    return out, lse, dropout_seed


@torch.library.custom_op("flashsdpa::varlen_forward", mutates_args=())
def varlen_forward(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seq_q: Tensor,
    cu_seq_k: Tensor | None,
    seqused_k: Tensor | None,
    block_table: Tensor | None,
    alibi_slopes: Tensor | None,
    sinks: Tensor | None,
    max_q: int,
    max_k: int,
    scale: float | None,
    causal: bool,
    window_left: int,
    window_right: int,
    bottom_right: bool,
    softcap: float,
    dropout_p: float,
    backend: str,
    fp32_precision: str,
    validate: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns out (T_q, Hq, Ev), lse (Hq, T_q) and the dropout seed (int64 (2,), empty without dropout)."""
    return forward_impl(
        query, key, value, cu_seq_q, cu_seq_k, seqused_k, block_table, alibi_slopes, sinks, max_q, max_k,
        scale, causal, window_left, window_right, bottom_right, softcap, dropout_p, backend, fp32_precision, validate,
    )  # fmt: skip


@varlen_forward.register_fake
def _(query, key, value, cu_seq_q, cu_seq_k, seqused_k, block_table, alibi_slopes, sinks, max_q, max_k, scale,
      causal, window_left, window_right, bottom_right, softcap, dropout_p, backend, fp32_precision,
      validate):  # fmt: skip
    total_q, heads_q = query.shape[0], query.shape[1]
    out = query.new_empty(total_q, heads_q, value.shape[-1])
    lse = query.new_empty(heads_q, total_q, dtype=statistics_dtype(query.dtype))
    return out, lse, torch.empty(2 if dropout_p > 0.0 else 0, dtype=torch.int64)


def backward_impl(grad_out, query, key, value, out, lse, cu_seq_q, cu_seq_k, seqused_k, block_table, alibi_slopes,
                  sinks, dropout_seed, max_q, max_k, needed, *options):  # fmt: skip
    opts = VarlenOptions(*options)
    runner = _Runner(query, key, value, block_table, alibi_slopes, sinks, opts, dropout_seed, "auto")
    need = GradientsNeeded(*needed, mask=False)
    packed_run = runner.packed(cu_seq_q, cu_seq_k, seqused_k, max_q, max_k)
    if packed_run is not None:
        if opts.validate:
            sequences(query, key, cu_seq_q, cu_seq_k, max_q, max_k, seqused_k, block_table)
        backend, desc, inputs, packing = packed_run
        grads = backend.packed_backward(desc, inputs, _packed_view(out), _packed_view(lse), _packed_view(grad_out),
                                        need, packing)  # fmt: skip
        dispatch.record_call(backend.name)
        # (1, H, n, E) views of packed (n, H, E) gradients
        return tuple(query.new_empty(0) if g is None else g[0].transpose(0, 1) for g in grads[:3])
    packed = sequences(query, key, cu_seq_q, cu_seq_k, max_q, max_k, seqused_k, block_table)
    acc = statistics_dtype(query.dtype)
    dq = new_output(query.shape, query.dtype, query.device) if need.query else None
    # Keys outside every sequence (beyond seqused_k, or pages no sequence reads) get zero gradients;
    # pages shared by sequences sum theirs.
    dk = torch.zeros(key.shape, dtype=acc, device=key.device) if need.key else None
    dv = torch.zeros(value.shape, dtype=acc, device=value.device) if need.value else None
    for seq in packed:
        rows = slice(seq.q_start, seq.q_start + seq.q_len)
        if _is_empty(seq):
            if dq is not None:
                dq[rows] = 0
            continue
        backend, problem = runner.plan(seq)
        tokens = problem.tokens
        grads = backend.backward(
            problem.desc, problem.inputs, _head_major(out[rows]), lse[:, rows].unsqueeze(0),
            _head_major(grad_out[rows]), need,
        )  # fmt: skip
        dq_seq, dk_seq, dv_seq, _ = grads
        if dq is not None:
            dq[rows] = dq_seq[0].transpose(0, 1)
        for total, grad in ((dk, dk_seq), (dv, dv_seq)):
            if total is None:
                continue
            rows_k = grad[0].transpose(0, 1).to(acc)
            if tokens is None:
                total[seq.k_start : seq.k_start + seq.k_len] += rows_k
            else:
                total.view(-1, *total.shape[2:]).index_add_(0, tokens, rows_k)
    cast = lambda t: query.new_empty(0) if t is None else t.to(query.dtype)  # noqa: E731
    return cast(dq), cast(dk), cast(dv)


@torch.library.custom_op("flashsdpa::varlen_backward", mutates_args=())
def varlen_backward(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seq_q: Tensor,
    cu_seq_k: Tensor | None,
    seqused_k: Tensor | None,
    block_table: Tensor | None,
    alibi_slopes: Tensor | None,
    sinks: Tensor | None,
    dropout_seed: Tensor,
    max_q: int,
    max_k: int,
    needed: list[bool],
    scale: float | None,
    causal: bool,
    window_left: int,
    window_right: int,
    bottom_right: bool,
    softcap: float,
    dropout_p: float,
    backend: str,
    fp32_precision: str,
    validate: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv); a gradient not `needed` comes back empty (the sinks': `ops.sink_gradient`)."""
    return backward_impl(
        grad_out, query, key, value, out, lse, cu_seq_q, cu_seq_k, seqused_k, block_table, alibi_slopes, sinks,
        dropout_seed, max_q, max_k, needed, scale, causal, window_left, window_right, bottom_right, softcap,
        dropout_p, backend, fp32_precision, validate,
    )  # fmt: skip


@varlen_backward.register_fake
def _(grad_out, query, key, value, out, lse, cu_seq_q, cu_seq_k, seqused_k, block_table, alibi_slopes, sinks,
      dropout_seed, max_q, max_k, needed, *options):  # fmt: skip
    return tuple(t.new_empty(t.shape) if n else query.new_empty(0) for t, n in zip((query, key, value), needed))


def _setup_context(ctx, inputs, output):
    query, key, value, cu_seq_q, cu_seq_k, seqused_k, block_table, alibi_slopes, sinks, max_q, max_k, *options = inputs
    out, lse, dropout_seed = output
    ctx.save_for_backward(
        query, key, value, cu_seq_q, cu_seq_k, seqused_k, block_table, alibi_slopes, sinks, out, lse, dropout_seed
    )
    ctx.sizes = (max_q, max_k)
    ctx.options = tuple(options)
    ctx.mark_non_differentiable(lse, dropout_seed)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, _grad_lse, _grad_seed):
    if torch.is_grad_enabled():
        raise RuntimeError("flashsdpa.varlen_attn does not support double backward (create_graph=True)")
    (query, key, value, cu_seq_q, cu_seq_k, seqused_k, block_table, alibi_slopes, sinks, out, lse,
     dropout_seed) = ctx.saved_tensors  # fmt: skip
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    needed = [bool(n) for n in ctx.needs_input_grad[:3]]
    dq = dk = dv = None
    if any(needed):
        dq, dk, dv = varlen_backward(
            grad_out, query, key, value, out, lse, cu_seq_q, cu_seq_k, seqused_k, block_table, alibi_slopes, sinks,
            dropout_seed, *ctx.sizes, needed, *ctx.options,
        )  # fmt: skip
    grads = [g if n else None for g, n in zip((dq, dk, dv), needed)]
    dsinks = None
    if ctx.needs_input_grad[8]:  # (1, Hq, T_q, Ev) and (1, Hq, T_q): a batch of one for the shared formula
        dsinks = sink_gradient(sinks, out.transpose(0, 1).unsqueeze(0), lse.unsqueeze(0),
                               grad_out.transpose(0, 1).unsqueeze(0))  # fmt: skip
    return (*grads, None, None, None, None, None, dsinks, *(None,) * (2 + len(ctx.options)))


varlen_forward.register_autograd(_backward, setup_context=_setup_context)


# ---- the public function ------------------------------------------------------------------


def varlen_attn(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seq_q: Tensor,
    cu_seq_k: Tensor | None,
    max_q: int,
    max_k: int,
    *,
    return_aux=None,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    enable_gqa: bool = False,
    seqused_k: Tensor | None = None,
    block_table: Tensor | None = None,
    num_splits: int | None = None,
    causal: bool = False,
    causal_alignment: str = "bottom_right",
    softcap: float | None = None,
    alibi_slopes: Tensor | None = None,
    sinks: Tensor | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
    fp32_precision: str = "ieee",
    validate: bool | None = None,
):
    """Attention over packed variable-length sequences; torch 2.13's `varlen_attn` signature and semantics.

    query (T_q, Hq, E); key/value (T_k, Hkv, E), or paged (pages, page_size, Hkv, E) with
    `block_table` (N, max_pages) and `seqused_k` (N,). `cu_seq_q`/`cu_seq_k`: int32/int64 (N+1,)
    offsets from 0 to T_q/T_k; sequence i is query rows [cu_seq_q[i], cu_seq_q[i+1]) and key rows
    [cu_seq_k[i], cu_seq_k[i+1]) (the first seqused_k[i] of them when given). `max_q`/`max_k` bound
    the lengths (an error if a sequence is longer). Returns out (T_q, Hq, Ev), and with
    `return_aux=AuxRequest(lse=True)` also the natural-log lse, (Hq, T_q) float32 as torch's op
    returns it (float64 for float64 inputs; -inf for a row with no visible key, whose output is zeros).

    window_size=(left, right), -1 = unbounded: query i sees keys within [p - left, p + right], where
    p = i + S_i - L_i (bottom-right aligned, FlashAttention's and torch's convention); right = 0 is
    causal, so (-1, 0) is plain causal::

        L=2, S=4, window_size=(-1, 0)   keys 0 1 2 3
        query 0                              x x x .
        query 1                              x x x x

    flashsdpa's additions: `causal=True` (same as right = 0), `causal_alignment="top_left"`
    (p = i, torch SDPA's), `dropout_p`, `backend`, `fp32_precision`; float32 and float64 inputs at
    their own accuracy, CPU tensors, and gradients for paged keys and `seqused_k` too (keys no sequence
    reads get zero gradient). `num_splits` is accepted and ignored (these backends never split keys).
    The score variants of `flashsdpa.attention`, per sequence: `softcap`, `alibi_slopes` (Hq,) or
    (N, Hq) float32 (bias -slope * |p - j|), `sinks` (Hq,) (differentiable); they run on the backends
    that compute variants (reference, tiled and triton; the others decline them with a reason).

    `validate`: read the offsets (and seqused_k) on the host and check them (non-decreasing from 0,
    totals, `max_q`/`max_k` bounds) before any kernel runs; None (default) = only for CPU tensors,
    where reading them costs nothing. The triton backend's packed kernel reads them on the device
    (no host synchronisation, so a step can be graph-captured); unvalidated, a sequence longer than
    `max_q` gets only its first `max_q` rows (rounded up to a query block) written. The per-sequence
    path (other backends, paged keys, the backward) always reads them on the host.
    """
    check_arguments(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, enable_gqa, seqused_k, block_table)
    if len(window_size) != 2:
        raise ValueError(f"window_size must be (left, right), got {window_size!r}")
    left, right = (int(w) for w in window_size)
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1 = unbounded), got {window_size!r}")
    if causal_alignment not in ALIGNMENTS:
        raise ValueError(f"causal_alignment must be one of {ALIGNMENTS}, got {causal_alignment!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"scale must be None or a finite float, got {scale!r}")
    if backend is not None:
        dispatch.get_backend(backend)
    precision = Fp32Precision(fp32_precision).value
    if softcap is not None and (isinstance(softcap, bool) or not 0.0 < float(softcap) < math.inf):
        raise ValueError(f"softcap must be None (off) or a finite float > 0, got {softcap!r}")
    heads_q, sequences_count = query.shape[1], cu_seq_q.shape[0] - 1
    if alibi_slopes is not None:
        accepted = (torch.float32, torch.float64) if query.dtype == torch.float64 else (torch.float32,)
        _check_small_tensor("alibi_slopes", alibi_slopes, query, accepted)
        if alibi_slopes.requires_grad:
            raise ValueError("alibi_slopes receive no gradient: pass a tensor that does not require grad (detach it)")
        if tuple(alibi_slopes.shape) not in ((heads_q,), (1, heads_q), (sequences_count, heads_q)):
            raise ValueError(f"alibi_slopes must have shape (Hq,) or (N, Hq) = ({heads_q},) or ({sequences_count}, "
                             f"{heads_q}) (N sequences), got {tuple(alibi_slopes.shape)}")  # fmt: skip
    if sinks is not None:
        _check_small_tensor("sinks", sinks, query, (torch.float32, query.dtype))
        if tuple(sinks.shape) != (heads_q,):
            raise ValueError(f"sinks must have shape (Hq,) = ({heads_q},), got {tuple(sinks.shape)}")
    causal = bool(causal) or right == 0
    options = VarlenOptions(
        scale=None if scale is None else float(scale),
        causal=causal,
        # Causal already bounds the right side; an unbounded right stays -1 so no mask is needed.
        window_left=left,
        window_right=-1 if causal else right,
        bottom_right=causal_alignment == "bottom_right",
        softcap=0.0 if softcap is None else float(softcap),
        dropout_p=float(dropout_p),
        backend=backend or _pinned_backend_outside_compile(),
        fp32_precision=precision,
        validate=bool(validate) or (validate is None and query.device.type == "cpu"),
    )
    out, lse, _ = varlen_forward(
        query, key, value, cu_seq_q, cu_seq_k, seqused_k, block_table, alibi_slopes, sinks, int(max_q), int(max_k),
        *options.as_op_arguments(),
    )  # fmt: skip
    if return_aux is not None and getattr(return_aux, "lse", False):
        return out, lse
    return out
