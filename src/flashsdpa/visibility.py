"""Which keys a query sees: causal, sliding window and their alignment, in one place.

Query i sits at key position `i + offset` (offset = 0 top-left, S - L
bottom-right: `AttentionDescriptor.key_offset`). It sees key j in [0, S) where

    j <= i + offset + right     (right = 0 under causal, else the window's right side)
    j >= i + offset - left      (only with a window's left side)

a side of -1 being unbounded. A window (left=2, right=0) with L=3, S=6::

    top_left (offset 0)         bottom_right (offset 3)
             keys 0 1 2 3 4 5            keys 0 1 2 3 4 5
    query 0       x . . . . .    query 0      . x x x . .
    query 1       x x . . . .    query 1      . . x x x .
    query 2       x x x . . .    query 2      . . . x x x

The rows' visible ranges are bands, so a block of queries sees one contiguous
range of keys (`key_range`), and inside it a middle part that every row of
the block sees whole (`full_key_range`): blocks there need no element mask.
The same holds transposed, for loops over key blocks (`query_range`).
The triton kernels implement the same formulas in their own jit helper
(tests/test_visibility.py checks the two agree block for block).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, NamedTuple

import torch

from flashsdpa.descriptor import AttentionDescriptor, causal_pairs


class Block(NamedTuple):
    start: int
    stop: int
    needs_mask: bool  # some pair in the block is not visible: apply `Visibility.mask`


@dataclass(frozen=True)
class Visibility:
    seq_q: int
    seq_kv: int
    offset: int  # query i sits at key i + offset
    left: int  # -1: unbounded
    right: int  # -1: unbounded; causal makes it <= 0

    @staticmethod
    def of(desc: AttentionDescriptor) -> Visibility:
        right = desc.window_right
        if desc.causal:
            right = 0 if right < 0 else min(right, 0)
        return Visibility(desc.seq_q, desc.seq_kv, desc.key_offset, desc.window_left, right)

    @property
    def unrestricted(self) -> bool:
        """Every query sees every key."""
        return self.left < 0 and self.right < 0

    def key_range(self, row_start: int, row_stop: int) -> tuple[int, int]:
        """[lo, hi): the keys that some query in [row_start, row_stop) sees (lo >= hi: none)."""
        lo = 0 if self.left < 0 else max(0, row_start + self.offset - self.left)
        hi = self.seq_kv if self.right < 0 else min(self.seq_kv, row_stop - 1 + self.offset + self.right + 1)
        return lo, hi

    def full_key_range(self, row_start: int, row_stop: int) -> tuple[int, int]:
        """[lo, hi): the keys that every query in [row_start, row_stop) sees (lo >= hi: none)."""
        lo = 0 if self.left < 0 else max(0, row_stop - 1 + self.offset - self.left)
        hi = self.seq_kv if self.right < 0 else min(self.seq_kv, row_start + self.offset + self.right + 1)
        return lo, hi

    def query_range(self, col_start: int, col_stop: int) -> tuple[int, int]:
        """[lo, hi): the queries that see some key in [col_start, col_stop) (lo >= hi: none)."""
        lo = 0 if self.right < 0 else max(0, col_start - self.offset - self.right)
        hi = self.seq_q if self.left < 0 else min(self.seq_q, col_stop - 1 - self.offset + self.left + 1)
        return lo, hi

    def full_query_range(self, col_start: int, col_stop: int) -> tuple[int, int]:
        """[lo, hi): the queries that see every key in [col_start, col_stop)."""
        lo = 0 if self.right < 0 else max(0, col_stop - 1 - self.offset - self.right)
        hi = self.seq_q if self.left < 0 else min(self.seq_q, col_start - self.offset + self.left + 1)
        return lo, hi

    def key_blocks(self, row_start: int, row_stop: int, block: int) -> Iterator[Block]:
        """The key blocks (aligned to multiples of `block`) that rows [row_start, row_stop) see."""
        lo, hi = self.key_range(row_start, row_stop)
        full_lo, full_hi = self.full_key_range(row_start, row_stop)
        return _blocks(lo, hi, full_lo, full_hi, block, self.seq_kv)

    def query_blocks(self, col_start: int, col_stop: int, block: int) -> Iterator[Block]:
        """The query blocks (aligned to multiples of `block`) that see keys [col_start, col_stop)."""
        lo, hi = self.query_range(col_start, col_stop)
        full_lo, full_hi = self.full_query_range(col_start, col_stop)
        return _blocks(lo, hi, full_lo, full_hi, block, self.seq_q)

    def mask(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Bool (len(rows), len(cols)): True where query rows[a] sees key cols[b] (rows, cols: 1-D positions)."""
        position = rows.view(-1, 1) + self.offset
        cols = cols.view(1, -1)
        visible = sees(position, cols, self.seq_kv, self.left, self.right)
        return visible.expand(position.shape[0], cols.shape[1])

    def row_counts(self) -> list[int]:
        """How many keys each query sees."""
        return [max(0, hi - lo) for lo, hi in (self.key_range(i, i + 1) for i in range(self.seq_q))]


def sees(position: torch.Tensor, cols: torch.Tensor, seq_kv, left: int, right: int) -> torch.Tensor:
    """Bool, broadcast of the arguments' shapes: True where a query at key `position` sees key `cols`
    among seq_kv keys (an int, or a tensor: one count per sequence) under the window (left, right)."""
    visible = (cols >= 0) & (cols < seq_kv)
    if right >= 0:
        visible = visible & (cols <= position + right)
    if left >= 0:
        visible = visible & (cols >= position - left)
    return visible


def _blocks(lo, hi, full_lo, full_hi, block, length) -> Iterator[Block]:
    if lo >= hi:
        return
    for start in range(lo - lo % block, hi, block):
        stop = min(start + block, length)
        yield Block(start, stop, not (full_lo <= start and stop <= full_hi))


def visible_pairs(desc: AttentionDescriptor) -> int:
    """The (query, key) pairs one batch item and head computes."""
    vis = Visibility.of(desc)
    if vis.unrestricted:
        return desc.seq_q * desc.seq_kv
    if vis.left < 0 and vis.right == 0 and vis.offset == 0:
        return causal_pairs(desc.seq_q, desc.seq_kv)
    return sum(vis.row_counts())
