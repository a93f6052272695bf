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
        for m0 in range(0, seq_q, block_m):
            m1 = min(m0 + block_m, seq_q)
            visited = {b.start: b for b in vis.key_blocks(m0, m1, block_n)}
            for n0 in range(0, seq_kv, block_n):
                n1 = min(n0 + block_n, seq_kv)
                tile = truth[m0:m1, n0:n1]
                assert (n0 in visited) == bool(tile.any()), (where, m0, n0)
                if n0 in visited:
                    assert visited[n0].stop == n1
                    assert visited[n0].needs_mask == (not bool(tile.all())), (where, m0, n0)
        for n0 in range(0, seq_kv, block_n):
            n1 = min(n0 + block_n, seq_kv)
            visited = {b.start: b for b in vis.query_blocks(n0, n1, block_m)}
            for m0 in range(0, seq_q, block_m):
                m1 = min(m0 + block_m, seq_q)
                tile = truth[m0:m1, n0:n1]
                assert (m0 in visited) == bool(tile.any()), (where, "transposed", m0, n0)
                if m0 in visited:
                    assert visited[m0].needs_mask == (not bool(tile.all())), (where, "transposed", m0, n0)


def test_causal_is_the_window_with_right_side_zero():
    for seq_q, seq_kv in ((5, 9), (9, 5)):
        for alignment in Alignment:
            a = Visibility.of(descriptor(seq_q, seq_kv, True, -1, -1, alignment))
            b = Visibility.of(descriptor(seq_q, seq_kv, False, -1, 0, alignment))
            assert a == b


def test_flops_count_visible_pairs():
    desc = descriptor(8, 8, False, 2, 0, Alignment.TOP_LEFT)
    assert desc.flops() == 2.0 * (1 + 2 + 3 * 6) * 16
