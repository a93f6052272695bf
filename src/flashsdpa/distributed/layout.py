"""How a sequence is laid out over the ranks of a group, and what each ring step can see.

The whole sequence (length L) is cut into equal chunks:

* "contiguous": W chunks; rank r holds chunk r.
* "zigzag" (head-tail): 2W chunks; rank r holds chunks r and 2W-1-r, in that
  order, so that under a causal mask every rank does the same work:

      W = 2, L = 8      positions   0 1 | 2 3 | 4 5 | 6 7
                        chunk        0     1     2     3
                        rank 0 holds chunks 0, 3 -> positions 0 1 6 7
                        rank 1 holds chunks 1, 2 -> positions 2 3 4 5

A rank's local tensors are its chunks concatenated along the sequence dim (-2).

At ring step i, rank r attends its queries to the keys of rank s = (r - i) mod W.
`visible_block` says which rectangle of that (queries x keys) block any query
can see, and whether the rectangle needs a causal mask inside it; with causal
attention on these layouts it is always one rectangle:

    contiguous   s == r: all x all, causal      s < r: all x all      s > r: nothing
    zigzag       s == r: all x all, causal      s < r: all x keys[:c] s > r: queries[c:] x all

(c = L_local / 2). Under zigzag every rank attends 2Wc^2 + c (query, key)
pairs in all (the diagonal step 2c^2 + c, each of the W - 1 others 2c^2): the
work is balanced exactly; contiguous gives rank r (r + 1/2) n^2 + n/2 pairs
(n = L_local), so the last rank does 2W - 1 times the first rank's work.

Sliding windows (once flashsdpa.attention takes a window): a window bounds the
keys each query sees by position, so `visible_block` would narrow the
rectangle from `local_positions` of both sides and skip a step whose block is
out of every query's window; nothing else in the ring changes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class Layout(str, enum.Enum):
    ZIGZAG = "zigzag"
    CONTIGUOUS = "contiguous"


def as_layout(layout) -> Layout:
    try:
        return Layout(layout)
    except ValueError:
        raise ValueError(f"layout must be one of {[m.value for m in Layout]}, got {layout!r}") from None


def chunk_count(layout: Layout, world: int) -> int:
    """How many equal chunks the whole sequence is cut into."""
    return 2 * world if layout is Layout.ZIGZAG else world


def chunks_of(layout: Layout, rank: int, world: int) -> tuple[int, ...]:
    """The chunk indices rank `rank` holds, in local order."""
    return (rank, 2 * world - 1 - rank) if layout is Layout.ZIGZAG else (rank,)


def local_positions(layout: Layout, rank: int, world: int, seq_local: int, device=None) -> torch.Tensor:
    """The global positions (int64, (seq_local,)) of a rank's local rows."""
    chunks = chunks_of(layout, rank, world)
    size = seq_local // len(chunks)
    return torch.cat([torch.arange(c * size, (c + 1) * size, device=device) for c in chunks])


def check_local_length(layout: Layout, seq_local: int, what: str) -> None:
    if layout is Layout.ZIGZAG and seq_local % 2:
        raise ValueError(
            f"layout='zigzag' holds two equal chunks per rank, so {what} must be even, got {seq_local} "
            "(pad the sequence to a multiple of 2 * world size, or use layout='contiguous')"
        )


@dataclass(frozen=True)
class VisibleBlock:
    """The part of one ring step's (local queries x arriving keys) block that any query can see."""

    query_rows: slice  # of the local queries
    key_rows: slice  # of the arriving keys
    causal: bool  # top-left causal inside the rectangle (only on the rank's own keys)

    def covers_all_queries(self, seq_local: int) -> bool:
        return self.query_rows == slice(0, seq_local)


def visible_block(layout: Layout, causal: bool, rank: int, source: int, seq_local: int) -> VisibleBlock | None:
    """What rank `rank`'s queries see of the keys of rank `source` (None: nothing, the step is skipped)."""
    everything = slice(0, seq_local)
    if not causal:
        return VisibleBlock(everything, everything, causal=False)
    if source == rank:
        # Both hold the same chunks in the same order, so local top-left causal is global causal.
        return VisibleBlock(everything, everything, causal=True)
    if layout is Layout.CONTIGUOUS:
        return VisibleBlock(everything, everything, causal=False) if source < rank else None
    half = seq_local // 2
    if source < rank:
        # Keys: chunk s (before both query chunks) and chunk 2W-1-s (after both): only the first.
        return VisibleBlock(everything, slice(0, half), causal=False)
    # source > rank: the first query chunk r precedes both key chunks; the second, 2W-1-r, follows both.
    return VisibleBlock(slice(half, seq_local), everything, causal=False)
