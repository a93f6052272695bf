"""Ring attention over torch.distributed: each rank holds a slice of the sequence.

Forward: rank r attends its queries to its own keys, then passes its K/V slice
on to rank r + 1 and receives rank r - 1's, W - 1 times; the next slice is in
flight (`batch_isend_irecv`) while the current one is attended. The partial
results are merged by their log-sum-exp (`merge_attention`) into a float32
(float64 for float64 inputs) accumulator.

Backward (FlashAttention's ring backward): the K/V slices travel the same ring
again, now with float32 dK/dV accumulators: at each step a rank adds its
queries' contribution to the gradients of the keys it holds, and passes the
accumulators on with the keys; after W steps they are home. dQ accumulates
locally.

Memory per rank beyond the inputs and outputs: two K/V slices (the one being
attended and the one arriving), the float32 out and lse it saves, and in the
backward two float32 dK/dV accumulators (the one arriving and the one sent),
one step's partial gradients and a float32 dQ: all O(L_local).
Traffic per ring step: forward B * Hkv * L_local * (E + Ev) elements of the
input dtype (GQA sends the Hkv key/value heads, never repeated); backward the
same plus the accumulators in float32, B * Hkv * L_local * (E + Ev) * 4 bytes.

Each step's gradients (`block_gradients`) come from flashsdpa's own backward
op. Its kernels take P = exp(s - lse) from the lse they are given, but how
they take delta = sum_j P_ij dP_ij differs: triton's 16-bit ROUNDED backward
reads it from the given out as rowsum(dO * out), which is right for a slice of
the keys when given the whole row's out and lse ("global statistics"); the
exact backward (float32, and every tiled backward) renormalizes each row of P
over the keys it is given, which is right only for the whole key set. There,
each step is the exact gradient of the slice's own attention (its own out_s
and lse_s, recomputed) plus the term the merge adds through lse_s:

    dS = w P_s (dP - rowsum(dO * out_s)) + w P_s (rowsum(dO * out_s) - rowsum(dO * out)),
    w = exp(lse_s - lse)   (P_s: the slice's own softmax)

whose second part gives dq += scale c P_s K and dk += scale P_s^T (c q) with
c = w (rowsum(dO * out_s) - rowsum(dO * out)); both products come out of the
same two op calls by widening V: the forward attends [V | K] (P_s K next to
out_s), the backward runs with V' = [V | 0] and dO' = [w dO | scale c q], so
dV' = [dv | the dk term]. This "local statistics" path costs about twice the
global one and runs in float32 for 16-bit inputs; so does the forward's
attention of each block where the backward takes this path
(`RingSpec.block_dtype`), so that rowsum(dO * out) carries no 16-bit rounding
of the slices' outputs.
"""

from __future__ import annotations

import collections
import math
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from flashsdpa import api, dispatch, ops
from flashsdpa.descriptor import GradientPrecision, statistics_dtype
from flashsdpa.distributed.layout import (
    Layout, VisibleBlock, as_layout, check_local_length, local_positions, visible_block,
)
from flashsdpa.merge import merge_attention
from flashsdpa.validation import canonicalize, check_options

_SIXTEEN_BIT = (torch.float16, torch.bfloat16)
_NO_DROPOUT_SEED = torch.empty(0, dtype=torch.int64)


# --------------------------------------------------------------------------- the ring


class RingTraffic:
    """What this process has sent around the ring since `reset()`: exchanges and bytes, by what was sent."""

    def __init__(self):
        self._lock = threading.Lock()
        self._exchanges = collections.Counter()
        self._bytes = collections.Counter()

    def record(self, what: str, tensors) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors)
        with self._lock:
            self._exchanges[what] += 1
            self._bytes[what] += size

    def reset(self) -> None:
        with self._lock:
            self._exchanges.clear()
            self._bytes.clear()

    def snapshot(self) -> dict:
        """{what: (exchanges, bytes)} plus the bytes one forward and one full backward step send."""
        with self._lock:
            counts = {what: (self._exchanges[what], self._bytes[what]) for what in self._exchanges}
        per = {what: b // n for what, (n, b) in counts.items()}
        return {
            **counts,
            "forward_bytes_per_step": per.get("forward K/V", 0),
            "backward_bytes_per_step": per.get("backward K/V", 0) + per.get("backward dK/dV", 0),
        }


ring_traffic = RingTraffic()


class _InFlight:
    """Slices on their way: `wait()` returns the received ones (the sent ones are kept alive until then)."""

    def __init__(self, works, sent, received):
        self._works, self._sent, self._received = works, sent, received

    def wait(self) -> list[torch.Tensor]:
        for work in self._works:
            work.wait()
        self._sent = None
        return self._received


@dataclass(frozen=True)
class Ring:
    """The ranks of a process group in a ring: each sends to rank + 1 and receives from rank - 1."""

    group: dist.ProcessGroup | None
    rank: int  # in the group
    world: int

    @classmethod
    def of(cls, group) -> Ring:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "ring_attention needs torch.distributed initialised (dist.init_process_group, or torchrun); "
                "for one process, use flashsdpa.attention"
            )
        rank = dist.get_rank(group)
        if rank < 0:
            raise ValueError(f"this process (global rank {dist.get_rank()}) is not in the group given to ring_attention")
        return cls(group, rank, dist.get_world_size(group))

    def global_rank(self, offset: int) -> int:
        peer = (self.rank + offset) % self.world
        return peer if self.group is None else dist.get_global_rank(self.group, peer)

    def pass_on(self, tensors, what: str) -> _InFlight:
        """Send `tensors` to the next rank and receive the previous rank's (same shapes and dtypes)."""
        sent = [t.contiguous() for t in tensors]  # copy where strided: P2P sends take dense buffers
        ring_traffic.record(what, sent)
        received = [torch.empty_like(t) for t in sent]
        to_next, from_previous = self.global_rank(1), self.global_rank(-1)
        operations = [dist.P2POp(dist.isend, t, to_next, self.group) for t in sent]
        operations += [dist.P2POp(dist.irecv, t, from_previous, self.group) for t in received]
        return _InFlight(dist.batch_isend_irecv(operations), sent, received)

    def source(self, step: int) -> int:
        """The rank whose K/V slice this rank holds at ring step `step`."""
        return (self.rank - step) % self.world


@dataclass(frozen=True)
class RingSpec:
    """Everything but the tensors that a ring attention call is given (frozen; the autograd Function's argument)."""

    ring: Ring
    layout: Layout
    causal: bool
    scale: float
    enable_gqa: bool
    backend: str | None
    fp32_precision: str
    # The dtype the forward's blocks are computed in: the input dtype where the backward takes global
    # statistics (triton, 16-bit), else float32 (float64 for float64), so that the merged out, whose
    # rowsum(dO * out) the local-statistics backward needs, carries no 16-bit rounding of each slice.
    block_dtype: torch.dtype


# --------------------------------------------------------------------------- one step


def _key_mask(key_lengths, spec: RingSpec, source: int, block: VisibleBlock, seq_local: int, device):
    """(B, 1, 1, S_block) bool: True where the key's global position is below its sequence's length."""
    if key_lengths is None:
        return None
    positions = local_positions(spec.layout, source, spec.ring.world, seq_local, device)[block.key_rows]
    return (positions[None, :] < key_lengths[:, None])[:, None, None, :]


def attend_block(q, k, v, mask, block: VisibleBlock, spec: RingSpec):
    """(out, lse) of the block's queries over its keys by flashsdpa's forward, out in spec.block_dtype."""
    q, k, v = (t.to(spec.block_dtype) for t in (q, k, v))  # no copy where the dtype is already that
    return api.attention(
        q[..., block.query_rows, :], k[..., block.key_rows, :], v[..., block.key_rows, :], causal=block.causal,
        scale=spec.scale, attn_mask=mask, enable_gqa=spec.enable_gqa, return_lse=True, backend=spec.backend,
        fp32_precision=spec.fp32_precision,
    )  # fmt: skip


def _backend_for(call: api.PreparedCall) -> str:
    desc = call.desc
    requested = call.backend or dispatch.pinned_backend()
    if requested is not None:
        return requested
    name, _ = dispatch.automatic_choice(desc, call.canon.query.device)
    return name or "tiled"  # none takes it: the op raises with every reason


def takes_global_statistics(backend: str, dtype: torch.dtype, seq_kv: int) -> bool:
    """Whether `backend`'s backward, given a slice of the keys with the whole rows' out and lse, returns
    that slice's share of the gradients: triton's 16-bit ROUNDED backward (delta = rowsum(dO * out), no
    row renormalization; see backward_configs.BackwardConfig.renormalize_rows), which the hopper backend's
    backward also is. With one key its launcher returns dq = dk = 0, right only for a whole key set."""
    return backend in ("triton", "hopper") and dtype in _SIXTEEN_BIT and seq_kv > 1


def block_gradients(q, k, v, mask, block: VisibleBlock, spec: RingSpec, grad_out, out, lse, out_dot_grad):
    """(dq, dk, dv) of one step in float32 (float64 for float64 inputs): the block's queries' contribution.

    q, grad_out, out (the merged output in the input dtype, as returned), lse and out_dot_grad
    (rowsum(dO * out) from the float32 out) cover all local rows; k, v the whole arriving slice; `block`
    selects the parts. dq has the block's query rows, dk and dv its key rows.
    """
    rows, keys = block.query_rows, block.key_rows
    q, k, v = q[..., rows, :], k[..., keys, :], v[..., keys, :]
    grad_out, out, lse, out_dot_grad = grad_out[..., rows, :], out[..., rows, :], lse[..., rows], out_dot_grad[..., rows]
    acc = statistics_dtype(q.dtype)
    call = api.prepare(q, k, v, block.causal, spec.scale, mask, 0.0, spec.enable_gqa, spec.backend,
                       spec.fp32_precision)
    backend = _backend_for(call)
    if takes_global_statistics(backend, q.dtype, k.shape[-2]):
        c = call.canon
        dq, dk, dv, _ = ops.attention_backward(
            grad_out, c.query, c.key, c.value, out, lse, c.mask, None, None,
            _NO_DROPOUT_SEED, *call.options._replace(gradients=GradientPrecision.ROUNDED.value), backend,
            [True, True, True, False],
        )  # fmt: skip
        return dq.to(acc), dk.to(acc), dv.to(acc)
    return _local_statistics_gradients(q.to(acc), k.to(acc), v.to(acc), mask, block, spec, grad_out.to(acc), lse,
                                       out_dot_grad)


def _local_statistics_gradients(q, k, v, mask, block, spec, grad_out, lse, out_dot_grad):
    """One step's gradients from a backward that renormalizes over the keys it is given (module docstring)."""
    value_dim = v.shape[-1]
    widened, lse_s = api.attention(
        q, k, torch.cat([v, k], dim=-1), causal=block.causal, scale=spec.scale, attn_mask=mask,
        enable_gqa=spec.enable_gqa, return_lse=True, backend=spec.backend, fp32_precision=spec.fp32_precision,
    )  # fmt: skip
    out_s, probs_k = widened[..., :value_dim], widened[..., value_dim:]
    lse_s = lse_s.to(q.dtype)
    share = torch.where(torch.isneginf(lse_s), 0.0, torch.exp(lse_s - lse.to(q.dtype)))  # w: the slice's mass
    c = (share * ((grad_out * out_s).sum(-1) - out_dot_grad)).unsqueeze(-1)
    wide_grad = torch.cat([share.unsqueeze(-1) * grad_out, (spec.scale * c) * q], dim=-1)
    call = api.prepare(q, k, torch.cat([v, torch.zeros_like(k)], dim=-1), block.causal, spec.scale, mask, 0.0,
                       spec.enable_gqa, spec.backend, spec.fp32_precision)
    cq = call.canon  # q, k, v are canonical already: these are the same views
    dq, dk, wide_dv, _ = ops.attention_backward(
        wide_grad, cq.query, cq.key, cq.value, torch.cat([out_s, torch.zeros_like(probs_k)], dim=-1), lse_s,
        cq.mask, None, None, _NO_DROPOUT_SEED, *call.options._replace(gradients=GradientPrecision.EXACT.value),
        _backend_for(call), [True, True, True, False],
    )  # fmt: skip
    return dq + spec.scale * c * probs_k, dk + wide_dv[..., value_dim:], wide_dv[..., :value_dim]


# --------------------------------------------------------------------------- forward and backward


class _RingAttention(torch.autograd.Function):
    """Canonical (B, Hq, L_local, E) q, (B, Hkv, L_local, E) k, (B, Hkv, L_local, Ev) v -> (out, lse)."""

    @staticmethod
    def forward(ctx, q, k, v, key_lengths, spec: RingSpec):
        ring, seq_local = spec.ring, q.shape[-2]
        acc = statistics_dtype(q.dtype)
        out = lse = None
        slices, q_block = (k, v), q.to(spec.block_dtype)
        for step in range(ring.world):
            source = ring.source(step)
            arriving = ring.pass_on(slices, "forward K/V") if step + 1 < ring.world else None
            block = visible_block(spec.layout, spec.causal, ring.rank, source, seq_local)
            if block is not None:
                mask = _key_mask(key_lengths, spec, source, block, seq_local, q.device)
                part_out, part_lse = attend_block(q_block, *slices, mask, block, spec)
                if out is None:  # step 0: the rank's own keys, seen by every query
                    out, lse = part_out.to(acc), part_lse
                else:
                    rows = block.query_rows
                    out[..., rows, :], lse[..., rows] = merge_attention(
                        [out[..., rows, :], part_out], [lse[..., rows], part_lse], out_dtype=acc
                    )
            if arriving is not None:
                slices = arriving.wait()
        ctx.save_for_backward(q, k, v, out, lse, key_lengths)
        ctx.spec = spec
        result = out.to(q.dtype)
        ctx.mark_non_differentiable(lse)
        return result, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse, key_lengths = ctx.saved_tensors
        spec, ring, seq_local = ctx.spec, ctx.spec.ring, q.shape[-2]
        acc = out.dtype
        out_dot_grad = (grad_out.to(acc) * out).sum(-1)  # rowsum(dO * out) = delta, from the unrounded out
        out_returned = out.to(q.dtype)  # what the global-statistics backward reads, as a one-device backward does
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        slices, travelling = (k, v), None
        for step in range(ring.world):
            source = ring.source(step)
            arriving = ring.pass_on(slices, "backward K/V") if step + 1 < ring.world else None
            block = visible_block(spec.layout, spec.causal, ring.rank, source, seq_local)
            parts = None
            if block is not None:
                mask = _key_mask(key_lengths, spec, source, block, seq_local, q.device)
                parts = block_gradients(q, *slices, mask, block, spec, grad_out, out_returned, lse, out_dot_grad)
                dq[..., block.query_rows, :] += parts[0]
            # The accumulators of the keys held now: fresh at step 0, else passed on with them (waited for
            # only now, so that their transfer overlaps this step's compute).
            dk, dv = (
                (torch.zeros(k.shape, dtype=acc, device=k.device), torch.zeros(v.shape, dtype=acc, device=v.device))
                if travelling is None
                else travelling.wait()
            )
            if parts is not None:
                dk[..., block.key_rows, :] += parts[1]
                dv[..., block.key_rows, :] += parts[2]
            if ring.world == 1:
                return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None
            travelling = ring.pass_on((dk, dv), "backward dK/dV")  # the last pass brings them home
            if arriving is not None:
                slices = arriving.wait()
        dk, dv = travelling.wait()
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


# --------------------------------------------------------------------------- the public function


def _check_arguments(q, k, v, canon, layout, key_lengths, attn_mask):
    if attn_mask is not None:
        raise ValueError(
            f"ring_attention takes no attn_mask (got shape {tuple(attn_mask.shape)}): masks of full (L, S) size "
            "are out of scope for context parallelism, each rank would need its rows of every slice's columns. "
            "Use causal=True and key_lengths= (per-sequence key padding)"
        )
    if q.dim() < 3:
        raise ValueError(f"ring_attention needs (..., H, L_local, E) tensors, got query {tuple(q.shape)}")
    if not q.shape[:-3] == k.shape[:-3] == v.shape[:-3]:
        raise ValueError(
            "ring_attention needs the same leading (batch) dims on query, key and value (no broadcasting: each "
            f"is a slice of a real sequence), got query {tuple(q.shape)}, key {tuple(k.shape)}, value "
            f"{tuple(v.shape)}"
        )
    seq_local = q.shape[-2]
    if k.shape[-2] != seq_local:
        raise ValueError(
            f"ring_attention needs query and key slices of one length (dim -2, each rank's share of one "
            f"sequence), got query {tuple(q.shape)}, key {tuple(k.shape)}"
        )
    check_local_length(layout, seq_local, f"the local sequence length (query {tuple(q.shape)})")
    if key_lengths is not None:
        batch = canon.query.shape[0]
        if q.dim() != 4:
            raise ValueError(f"key_lengths needs (B, H, L_local, E) tensors, got query {tuple(q.shape)}")
        if not isinstance(key_lengths, torch.Tensor) or key_lengths.shape != (batch,) or key_lengths.is_floating_point():
            what = tuple(key_lengths.shape) if isinstance(key_lengths, torch.Tensor) else type(key_lengths).__name__
            raise ValueError(f"key_lengths must be an integer tensor of shape ({batch},) (one per sequence), got {what}")
        if key_lengths.device != q.device:
            raise ValueError(f"key_lengths must be on {q.device} as the query is, got {key_lengths.device}")


def _check_ranks_agree(ring: Ring, facts: list[int], device) -> None:
    """Every rank of the ring was given the same shapes and options (else the exchange would hang or fail)."""
    mine = torch.tensor(facts, dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(ring.world)]
    dist.all_gather(everyone, mine, group=ring.group)
    for rank, theirs in enumerate(everyone):
        if not torch.equal(theirs, mine):
            raise ValueError(
                f"ring_attention: rank {rank} of the group was called with (batch, heads_q, heads_kv, L_local, "
                f"E, Ev, dtype, causal, layout) = {theirs.tolist()}, this rank ({ring.rank}) with {mine.tolist()}; "
                "every rank must pass its equal-length slice of the same problem"
            )


_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


@torch.compiler.disable  # point-to-point exchanges cannot be traced: a graph break, never a crash
def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    causal: bool = False,
    scale: float | None = None,
    layout: str = "zigzag",
    enable_gqa: bool = False,
    key_lengths: torch.Tensor | None = None,
    attn_mask: None = None,
    return_lse: bool = False,
    backend: str | None = None,
    fp32_precision: str = "ieee",
    validate: bool = True,
):
    """Attention over a sequence split across the ranks of `group` (context parallelism), with its backward.

    Each rank passes its local slice, q (..., Hq, L_local, E), k (..., Hkv, L_local, E), v (..., Hkv,
    L_local, Ev), laid out as `shard_sequence(x, group, layout)` lays out the whole (..., L, E) tensors;
    every rank gets its rows of softmax(q k^T * scale) v over the WHOLE sequence, (..., Hq, L_local, Ev),
    equal to `shard_sequence(flashsdpa.attention(whole q, k, v, ...))`.

    causal: top-left causal over global positions (query i sees keys j <= i).
    layout: "zigzag" (rank r holds chunks r and 2W-1-r of 2W; balances causal work exactly) or
        "contiguous" (rank r holds chunk r of W). The same layout the slices were made with.
    enable_gqa: Hq a multiple of Hkv; only the Hkv key/value heads travel.
    key_lengths: (B,) integer tensor, for 4-D inputs: keys at global positions >= key_lengths[b] are
        padding in sequence b (a row that sees no key gives zeros and lse -inf).
    attn_mask: not taken; masks of full (L, S) size are out of scope (an error says so).
    return_lse: also return the rows' natural-log log-sum-exp over the whole sequence, (..., Hq, L_local),
        float32 (not differentiable).
    backend, fp32_precision: as in `flashsdpa.attention`, for every slice.
    validate: check with one small all_gather that every rank passed the same shapes and options (a
        mismatch would otherwise hang the exchange); pass False in hot loops once a setup is known good.

    16-bit gradients are computed as torch's fused kernels compute them (GradientPrecision.ROUNDED) on the
    triton backend. Plain tensors in, plain tensors out (call it on a DTensor's `.to_local()`); under
    torch.compile it is a graph break.
    """
    layout = as_layout(layout)
    check_options(0.0, causal, scale)
    canon = canonicalize(q, k, v, None, enable_gqa)  # dtype, device, head-count and head-dim checks
    _check_arguments(q, k, v, canon, layout, key_lengths, attn_mask)
    ring = Ring.of(group)
    cq, ck, cv = canon.query, canon.key, canon.value
    head_dim = cq.shape[-1]
    resolved_scale = float(scale) if scale is not None else (1.0 / math.sqrt(head_dim) if head_dim else 1.0)
    if validate and ring.world > 1:
        facts = [*cq.shape[:2], ck.shape[1], cq.shape[2], head_dim, cv.shape[-1], _DTYPE_CODES.get(q.dtype, -1),
                 int(causal), list(Layout).index(layout)]
        _check_ranks_agree(ring, facts, q.device)
    whole_local = api.prepare(cq, ck, cv, causal, resolved_scale, None, 0.0, enable_gqa, backend, fp32_precision)
    global_statistics = takes_global_statistics(_backend_for(whole_local), q.dtype, ck.shape[-2])
    block_dtype = q.dtype if global_statistics else statistics_dtype(q.dtype)
    spec = RingSpec(ring, layout, bool(causal), resolved_scale, enable_gqa, backend, fp32_precision, block_dtype)
    out, lse = _RingAttention.apply(cq, ck, cv, key_lengths, spec)
    out = out.reshape(canon.output_shape)
    return (out, lse.reshape(canon.lse_shape)) if return_lse else out
