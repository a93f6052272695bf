"""Cutting a whole sequence into ranks' slices and putting it back together (layouts: see layout.py)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from flashsdpa.distributed.layout import Layout, as_layout, chunk_count, chunks_of


def _group_position(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("shard_sequence / unshard_sequence need torch.distributed initialised")
    return dist.get_rank(group), dist.get_world_size(group)


def shard_sequence(x: torch.Tensor, group: dist.ProcessGroup | None = None, layout: str = "zigzag") -> torch.Tensor:
    """This rank's slice of a whole (..., L, E) tensor (sequence in dim -2), as ring_attention expects it.

    L must be a multiple of 2W (zigzag) or W (contiguous) for W ranks in `group`. Differentiable; zigzag
    returns a new tensor, contiguous a view.
    """
    rank, world = _group_position(group)
    layout = as_layout(layout)
    return _slice_of(x, layout, rank, world)


def _slice_of(x: torch.Tensor, layout: Layout, rank: int, world: int) -> torch.Tensor:
    if x.dim() < 2:
        raise ValueError(f"shard_sequence needs a (..., L, E) tensor, got shape {tuple(x.shape)}")
    seq, count = x.shape[-2], chunk_count(layout, world)
    if seq % count:
        raise ValueError(
            f"layout={layout.value!r} cuts the sequence into {count} equal chunks for {world} ranks, but its "
            f"length (dim -2 of {tuple(x.shape)}) is {seq}; pad it to a multiple of {count}"
        )
    size = seq // count
    parts = [x[..., c * size:(c + 1) * size, :] for c in chunks_of(layout, rank, world)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_local, group, layout, rank, world):
        ctx.group, ctx.layout, ctx.rank, ctx.world = group, layout, rank, world
        x_local = x_local.contiguous()  # copy where strided: all_gather takes a dense input
        slices = [torch.empty_like(x_local) for _ in range(world)]
        dist.all_gather(slices, x_local, group=group)
        count = chunk_count(layout, world)
        chunks = [None] * count
        for r, piece in enumerate(slices):
            mine = chunks_of(layout, r, world)
            for c, part in zip(mine, piece.chunk(len(mine), dim=-2)):
                chunks[c] = part
        return torch.cat(chunks, dim=-2)

    @staticmethod
    def backward(ctx, grad_whole):
        # Every rank's copy of the whole tensor got its own gradient: this rank's slice of their sum.
        grad_whole = grad_whole.contiguous()  # copy where strided: all_reduce works in place on a dense buffer
        dist.all_reduce(grad_whole, group=ctx.group)
        return _slice_of(grad_whole, ctx.layout, ctx.rank, ctx.world), None, None, None, None


def unshard_sequence(
    x_local: torch.Tensor, group: dist.ProcessGroup | None = None, layout: str = "zigzag"
) -> torch.Tensor:
    """The whole (..., L, E) tensor on every rank, from each rank's slice (an all-gather); differentiable
    (the backward sums the ranks' gradients of the whole tensor and returns this rank's slice)."""
    rank, world = _group_position(group)
    if x_local.dim() < 2:
        raise ValueError(f"unshard_sequence needs a (..., L_local, E) tensor, got shape {tuple(x_local.shape)}")
    layout = as_layout(layout)
    if layout is Layout.ZIGZAG and x_local.shape[-2] % 2:
        raise ValueError(f"layout='zigzag' slices hold two equal chunks: dim -2 of {tuple(x_local.shape)} is odd")
    return _Gather.apply(x_local, group, layout, rank, world)
