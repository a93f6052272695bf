"""`flashsdpa bench`: flashsdpa against torch SDPA's backends and FlexAttention, in one process.

Modules: `cases` (the matrix and its inputs), `peers` (how each implementation
is run), `timing` (CUDA-event medians with an L2 flush), `runner` (one case:
every peer, timed and checked), `estimate` (time estimates and the budget),
`environment` (device and versions), `report` (tables, markdown, JSON) and
`plot` (the PNG); `command` holds the command line.

    flashsdpa bench --quick --out DIR     # headline rows, ~3 minutes on an H100
    python -m flashsdpa.bench --help
"""

from flashsdpa.bench.command import main

__all__ = ["main"]
