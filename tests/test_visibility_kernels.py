"""The Triton kernels' visibility helper (visibility_kernels) against a direct per-pair check.

`blocks_seen` must cover every key some row sees, visit no block twice, and
call a block whole only where every row sees all of it; `visible` must be the
band's formula. Run under the Triton interpreter with a probe kernel.
"""

import random

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from flashsdpa.backends.triton.visibility_kernels import blocks_seen, visible  # noqa: E402


@triton.jit
def _blocks_probe(out, first_row, last_row, key_start, key_end, lowest, highest, BOUNDED_BELOW: tl.constexpr,
                  BOUNDED_ABOVE: tl.constexpr, BLOCK_N: tl.constexpr, PARTIAL_BLOCK_WHOLE: tl.constexpr):
    start, whole_start, whole_end, end = blocks_seen(first_row, last_row, key_start, key_end, lowest, highest,
                                                     BOUNDED_BELOW, BOUNDED_ABOVE, BLOCK_N, PARTIAL_BLOCK_WHOLE)
    tl.store(out + 0, start)
    tl.store(out + 1, whole_start)
    tl.store(out + 2, whole_end)
    tl.store(out + 3, end)


@triton.jit
def _visible_probe(out, first_row, key_start, key_end, lowest, highest, BOUNDED_BELOW: tl.constexpr,
                   BOUNDED_ABOVE: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    rows = first_row + tl.arange(0, ROWS)
    cols = key_start + tl.arange(0, COLS)
    seen = visible(rows[:, None], cols[None, :], key_end, lowest, highest, BOUNDED_BELOW, BOUNDED_ABOVE, True)
    tl.store(out + tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :], seen.to(tl.int32))


def sees(i, j, key_end, lowest, highest, below, above):
    return 0 <= j < key_end and (not below or j - i >= lowest) and (not above or j - i <= highest)


def probe_blocks(first, last, key_start, key_end, lowest, highest, below, above, block, partial):
    out = torch.full((4,), -12345, dtype=torch.int32)
    _blocks_probe[(1,)](out, first, last, key_start, key_end, lowest, highest, below, above, block, partial)
    return out.tolist()


def cases(count, seed):
    rng = random.Random(seed)
    for _ in range(count):
        seq_q, seq_kv = rng.randint(1, 70), rng.randint(1, 70)
        block_m, block_n = rng.choice([16, 32]), rng.choice([16, 32])
        below, above = rng.random() < 0.6, rng.random() < 0.6
        lowest = rng.randint(-80, 40)
        highest = rng.randint(lowest, 80) if below else rng.randint(-80, 80)
        yield seq_q, seq_kv, block_m, block_n, below, above, lowest, highest


@pytest.mark.parametrize("partial", [False, True])
def test_blocks_seen_covers_every_visible_key_once(partial):
    for seq_q, seq_kv, block_m, block_n, below, above, lowest, highest in cases(150, seed=int(partial)):
        for first in range(0, seq_q, block_m):
            last = min(first + block_m, seq_q) - 1
            # A decode split's keys start past 0 (and before key_end).
            split_start = 0 if partial or seq_kv <= block_n else block_n * random.Random(first).randint(0, 1)
            start, whole_start, whole_end, end = probe_blocks(
                first, last, split_start, seq_kv, lowest, highest, below, above, block_n, partial)
            case = ((start, whole_start, whole_end, end), seq_q, seq_kv, block_n, below, above, lowest, highest,
                    first, split_start)
            edge = list(range(start, whole_start, block_n)) + list(range(whole_end, end, block_n))
            whole = list(range(whole_start, whole_end, block_n))
            visited = edge + whole
            assert whole_start <= whole_end, case
            assert all(n % block_n == 0 for n in visited), case
            assert len(set(visited)) == len(visited), case
            for n in whole:
                keys = range(n, min(n + block_n, seq_kv) if partial else n + block_n)
                assert all(sees(i, j, seq_kv, lowest, highest, below, above)
                           for i in range(first, last + 1) for j in keys), (case, n)
            for i in range(first, last + 1):
                for j in range(split_start, seq_kv):
                    if sees(i, j, seq_kv, lowest, highest, below, above):
                        assert (j // block_n) * block_n in visited, (case, i, j)


def test_visible_is_the_band():
    for seq_q, seq_kv, block_m, block_n, below, above, lowest, highest in cases(12, seed=7):
        first, key_start = block_m * random.Random(seq_q).randint(0, 2), block_n * random.Random(seq_kv).randint(0, 2)
        out = torch.zeros((block_m, block_n), dtype=torch.int32)
        _visible_probe[(1,)](out, first, key_start, seq_kv, lowest, highest, below, above, block_m, block_n)
        expected = torch.tensor([[sees(first + r, key_start + c, seq_kv, lowest, highest, below, above)
                                  for c in range(block_n)] for r in range(block_m)], dtype=torch.int32)
        assert torch.equal(out, expected)
