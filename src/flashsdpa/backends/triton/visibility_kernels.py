"""Which keys a query sees: the one place the Triton kernels learn causal masking (and windows, alignment).

Every visibility rule the kernels know is a band around a diagonal of the
(query i, key j) score matrix:

    query i sees key j  <=>  0 <= j < key_end
                             and lowest_diagonal <= j - i    (if BOUNDED_BELOW)
                             and j - i <= highest_diagonal   (if BOUNDED_ABOVE)

Causal with torch's top-left alignment is BOUNDED_ABOVE with highest_diagonal
= 0; the launcher (`launch_common.visible_band`) derives the two diagonals of
any problem. The diagonals are run-time values (they follow the sequence
lengths), the two flags are compiled in.

Loops ask `blocks_seen` which blocks to visit, in three ranges:

    [start, whole_start)      edge blocks on the lower side: element mask
    [whole_start, whole_end)  blocks every row sees whole: no element mask
    [whole_end, end)          edge blocks on the upper side (and a partial
                              block at key_end): element mask

and `visible` for the element mask of an edge block. The dK/dV loop, which
walks queries for a block of keys, asks the same questions of the mirrored
band (`mirrored`: j - i in [lo, hi] <=> i - j in [-hi, -lo]).
"""

import triton
import triton.language as tl


@triton.jit
def blocks_seen(
    first_row,
    last_row,
    key_start,
    key_end,
    lowest_diagonal,
    highest_diagonal,
    BOUNDED_BELOW: tl.constexpr,
    BOUNDED_ABOVE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PARTIAL_BLOCK_WHOLE: tl.constexpr = False,
):
    """(start, whole_start, whole_end, end): the key blocks rows [first_row, last_row] see within
    [key_start, key_end) (key_start a multiple of BLOCK_N), split as in the module doc.

    whole_start <= whole_end, and start <= whole_start where any row sees a
    key (else every range is empty); a range may be empty (end may lie below
    whole_end). Blocks in [whole_start, whole_end) are seen whole by every
    row; every key some row sees lies in [start, end), and each block is in
    one range. start and whole_start are multiples of BLOCK_N where a range
    starting there is not empty. PARTIAL_BLOCK_WHOLE: keys past key_end need
    no mask (the caller discards them), so a partial last block counts as
    whole; otherwise whole_end is a multiple of BLOCK_N within key_end.
    """
    start = key_start
    whole_start = key_start
    end = key_end
    if PARTIAL_BLOCK_WHOLE:
        whole_end = key_end
    else:
        whole_end = (key_end // BLOCK_N) * BLOCK_N
    if BOUNDED_BELOW:
        start = tl.maximum(start, (tl.maximum(first_row + lowest_diagonal, 0) // BLOCK_N) * BLOCK_N)
        whole_start = tl.maximum(whole_start, tl.cdiv(tl.maximum(last_row + lowest_diagonal, 0), BLOCK_N) * BLOCK_N)
        if PARTIAL_BLOCK_WHOLE:
            whole_start = tl.minimum(whole_start, key_end)
        else:
            whole_start = tl.minimum(whole_start, tl.cdiv(key_end, BLOCK_N) * BLOCK_N)
    if BOUNDED_ABOVE:
        end = tl.minimum(end, tl.maximum(last_row + highest_diagonal + 1, 0))
        whole_end = tl.minimum(whole_end, (tl.maximum(first_row + highest_diagonal + 1, 0) // BLOCK_N) * BLOCK_N)
    if BOUNDED_BELOW and BOUNDED_ABOVE:
        # Rows may see no key at all: keep the ranges ordered (and empty).
        start = tl.minimum(start, whole_start)
        end = tl.maximum(end, start)
        whole_start = tl.minimum(whole_start, tl.cdiv(end, BLOCK_N) * BLOCK_N)
    if BOUNDED_ABOVE or (BOUNDED_BELOW and not PARTIAL_BLOCK_WHOLE):
        whole_end = tl.maximum(whole_end, whole_start)
    return start, whole_start, whole_end, end


@triton.jit
def visible(
    rows,
    cols,
    key_end,
    lowest_diagonal,
    highest_diagonal,
    BOUNDED_BELOW: tl.constexpr,
    BOUNDED_ABOVE: tl.constexpr,
    CHECK_KEY_END: tl.constexpr,
):
    """Whether query `rows` see keys `cols` (both already shaped to broadcast into the tile, either way
    round): the element mask of an edge block. CHECK_KEY_END: keys past key_end are hidden too."""
    # Each bound is compared as cols against rows + diagonal (a row or column
    # vector), never as a [rows, cols] tile of differences: the causal dK/dV
    # kernel spilled 108 bytes on sm_90 with the tile, 60 without.
    # The upper side and key_end in one comparison (cols < key_end <=> cols <= key_end - 1) only where
    # nothing bounds below: on sm_90 (Triton 3.6) the causal bf16 dQ d=128 with a bool mask spills 0 bytes
    # with it (12 with two comparisons), the windowed dQ d=128 24 (0 without).
    if BOUNDED_ABOVE and CHECK_KEY_END and not BOUNDED_BELOW:
        seen = cols <= tl.minimum(rows + highest_diagonal, key_end - 1)
    elif BOUNDED_ABOVE:
        seen = cols <= rows + highest_diagonal
        if BOUNDED_BELOW:
            seen = seen & (cols >= rows + lowest_diagonal)
        if CHECK_KEY_END:
            seen = seen & (cols < key_end)
    elif BOUNDED_BELOW:
        seen = cols >= rows + lowest_diagonal
        if CHECK_KEY_END:
            seen = seen & (cols < key_end)
    else:
        seen = cols < key_end  # shaped like cols: it broadcasts over the rows
    return seen
