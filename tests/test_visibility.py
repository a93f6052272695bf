"""flashsdpa/visibility.py against the pair-by-pair definition of visible keys.

For random lengths, windows, alignments and block sizes: the blocks a query block
visits are exactly those holding a visible pair, `needs_mask` is False only for
blocks whose every pair is visible, and the transposed question agrees.
"""

from __future__ import annotations

import random

import pytest
import torch

from flashsdpa.descriptor import Alignment, AttentionDescriptor
from flashsdpa.visibility import Visibility, visible_pairs


def descriptor(seq_q, seq_kv, causal, left, right, alignment) -> AttentionDescriptor:
    return AttentionDescriptor(
        batch_shape=(1,), heads_q=1, heads_kv=1, seq_q=seq_q, seq_kv=seq_kv, head_dim=8, head_dim_v=8,
        dtype=torch.float32, device_type="cpu", causal=causal, window_left=left, window_right=right,
        alignment=alignment,
    )  # fmt: skip


def pairwise(seq_q, seq_kv, causal, left, right, alignment) -> torch.Tensor:
    offset = seq_kv - seq_q if alignment is Alignment.BOTTOM_RIGHT else 0
    visible = torch.zeros(seq_q, seq_kv, dtype=torch.bool)
    for i in range(seq_q):
        for j in range(seq_kv):
            at = i + offset
            visible[i, j] = (not causal or j <= at) and (left < 0 or j >= at - left) and (right < 0 or j <= at + right)
    return visible


def random_problems(count, seed=0):
    rng = random.Random(seed)
    for _ in range(count):
        yield (
            rng.randint(1, 40), rng.randint(1, 40), rng.random() < 0.4,
            rng.choice([-1, 0, 1, 3, 7, 50]), rng.choice([-1, 0, 2, 5, 60]),
            rng.choice(list(Alignment)), rng.randint(1, 9), rng.randint(1, 9),
        )  # fmt: skip


@pytest.mark.parametrize("seed", range(4))
def test_blocks_match_pairwise_definition(seed):
    for seq_q, seq_kv, causal, left, right, alignment, block_m, block_n in random_problems(60, seed):
        desc = descriptor(seq_q, seq_kv, causal, left, right, alignment)
        vis = Visibility.of(desc)
        truth = pairwise(seq_q, seq_kv, causal, left, right, alignment)
        where = (seq_q, seq_kv, causal, left, right, alignment.value, block_m, block_n)
        rows, cols = torch.arange(seq_q), torch.arange(seq_kv)
        assert torch.equal(vis.mask(rows, cols), truth), where
        assert visible_pairs(desc) == int(truth.sum()), where
        check_blocks(truth, block_m, block_n, vis.key_blocks, where)
        check_blocks(truth.t(), block_n, block_m, vis.query_blocks, (*where, "transposed"))


def check_blocks(truth, block_outer, block_inner, blocks_of, where):
    """For each outer block, `blocks_of(start, stop, block_inner)` visits exactly the inner blocks holding a
    visible pair, with `needs_mask` unless every pair of the tile is visible."""
    outer, inner = truth.shape
    for start in range(0, outer, block_outer):
        stop = min(start + block_outer, outer)
        visited = {b.start: b for b in blocks_of(start, stop, block_inner)}
        for first in range(0, inner, block_inner):
            last = min(first + block_inner, inner)
            tile = truth[start:stop, first:last]
            assert (first in visited) == bool(tile.any()), (where, start, first)
            if first in visited:
                assert visited[first].stop == last, (where, start, first)
                assert visited[first].needs_mask == (not bool(tile.all())), (where, start, first)


def test_causal_is_the_window_with_right_side_zero():
    for seq_q, seq_kv in ((5, 9), (9, 5)):
        for alignment in Alignment:
            a = Visibility.of(descriptor(seq_q, seq_kv, True, -1, -1, alignment))
            b = Visibility.of(descriptor(seq_q, seq_kv, False, -1, 0, alignment))
            assert a == b


def test_flops_count_visible_pairs():
    desc = descriptor(8, 8, False, 2, 0, Alignment.TOP_LEFT)
    assert desc.flops() == 2.0 * (1 + 2 + 3 * 6) * 16
