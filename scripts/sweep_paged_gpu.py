"""flashsdpa's paged decode layouts (launch_paged.PAGED_LAYOUTS) against torch flash on the same keys unpaged.

Run from the repo root on the GPU (under 2 minutes with compiles; a short table last):
    PYTHONPATH=src python scripts/sweep_paged_gpu.py [--jobs N] [--budget-s S] [--grid] [--smoke]

The shapes are the bench's paged rows (flashsdpa.bench.cases.kv_layout_cases): bf16, B=16, Hq=32, Hkv=8,
d=128, one query row, every sequence S keys long (S = 4k, 16k, 32k, 128k), pages of 16 or 256 keys placed in
a random order (bench.cases.paged_copy), and (page 0) the contiguous (B, S, Hkv, d) cache; not causal.
Page -16 (a diagnostic, in no layout score): pages of 16 keys in table order (page j of item b in slot
b * P + j), the same kernels and table reads as pages of 16 without the random placement.
Choices: "default" (the launcher's own: launch_paged.PAGED_DECODE_LAYOUTS), every named layout of
launch_paged.PAGED_LAYOUTS ("rows": flash decoding's program, 8 warps on every key block; "slices ...": warps
on their own key slices, "heads ...": warps on their own kv heads, paged_kernels' doc), and with --grid the older grid of (splits, warps, key block,
stages) of the rows program and TMA boxes (launch_paged.PAGED_TMA_BLOCKS) over pages of 256 keys.

Timing (interleaved_ms): CUDA events around one call (with the merge launch where there are splits), L2
flushed (256 MiB zeroed) before each, REPS rounds calling every choice of one (length, page size) and torch
flash once in a rotating order, medians. Bytes: K+V read once per kv head (2 * B * Hkv * S * d * 2 bytes; the
query, the output, the block table and the split partials add < 0.3% at S >= 4k); TB/s = bytes / time;
ratio = flashsdpa TB/s / torch flash TB/s of the same rounds (sdpa_kernel(FLASH_ATTENTION), enable_gqa);
share = TB/s / 3.0 (the H100's copy ceiling, BENCHMARKS.md). err: ||out - ref|| / ||ref|| against float64
attention on the same keys (torch flash's own err printed beside it is the bar). Every variant is compiled
first by --jobs worker processes (Triton's disk cache), so the timed process only loads them. Writes
$OUT/sweep_paged.json (every row) when OUT is set. The last lines name the best choice per (page, S), each
layout's geometric mean of the ratio over S >= 16k (both page sizes and the contiguous cache), and the layouts
to put in launch_paged.PAGED_DECODE_LAYOUTS: per class of cache (launch_paged.page_class: pages of 16 are
"small pages", of 256 "large pages"), the best geometric mean over S >= 16k.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
# This checkout's flashsdpa before any other on PYTHONPATH (a driver script may set it to another tree's src).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from flashsdpa import kvcache
from flashsdpa.backends.triton import launch_paged
from flashsdpa.backends.triton.launch_paged import PAGED_LAYOUTS, PagedTiles
from flashsdpa.bench.cases import paged_copy

parser = argparse.ArgumentParser()
parser.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1), help="compile worker processes")
parser.add_argument("--budget-s", type=float, default=100.0, help="stop timing after this many seconds")
parser.add_argument("--warm", default="", help=argparse.SUPPRESS)  # "i/n": worker i of n only compiles
parser.add_argument("--grid", action="store_true", help="also the older grid of rows-program tiles and TMA")
parser.add_argument("--smoke", action="store_true", help="check this script on the CPU (TRITON_INTERPRET=1)")
args = parser.parse_args()
SMOKE = args.smoke
if SMOKE:
    args.jobs = 0
DEVICE = torch.device("cpu" if SMOKE else "cuda")
START = time.perf_counter()

BATCH, HEADS_Q, HEADS_KV, HEAD_DIM = (2, 4, 2, 16) if SMOKE else (16, 32, 8, 128)
PAGE_SIZES = (16, 256) if not SMOKE else (16, 64)
IN_ORDER = -16  # pages of 16 keys in table order (paged())
BAR_LENGTHS = (256,) if SMOKE else (16384,)  # the shortest of the bar's lengths
ALL_LENGTHS = (128, 256) if SMOKE else (4096, 16384, 32768, 131072)
WARMUP, REPS = (1, 1) if SMOKE else (3, 15)


@dataclasses.dataclass(frozen=True)
class Choice:
    splits: int | None = None  # None: the launcher's own
    warps: int | None = None  # None (with block_n, stages): the launcher's own tiles
    block_n: int | None = None
    stages: int | None = None
    divide: bool = False  # the page size not compiled in (a division per key)
    tma: bool = False  # K/V blocks as TMA boxes (launch_paged.PAGED_TMA_BLOCKS; pages holding whole blocks)
    layout: str | None = None  # a name of launch_paged.PAGED_LAYOUTS, made the launcher's own for every cache

    @property
    def label(self) -> str:
        if self.layout is not None:
            return self.layout
        if self.warps is None:
            return "divide" if self.divide else ("default tma" if self.tma else "default")
        return f"s{self.splits} w{self.warps} n{self.block_n} st{self.stages}" + (" tma" if self.tma else "")

    @property
    def tiles(self) -> PagedTiles | None:
        if self.warps is None:
            return None
        return PagedTiles(block_m=16, block_n=self.block_n, num_warps=self.warps, num_stages=self.stages)


def grid() -> list[Choice]:
    """Splits x tiles: the choices within ~15% of the best in the first H100 run (NOTES, issue 14: one and
    two warps, 32-key blocks in 2 stages and 3 or 16 splits were all slower)."""
    if SMOKE:
        return [Choice(s, 4, 16, 2) for s in (1, 3)] + [Choice(2, 8, 32, 3)]
    tiles = [(2, 32, 3), (2, 64, 2), (4, 32, 3), (4, 32, 4), (8, 32, 4)]
    tiles += [(w, n, st) for w in (4, 8) for n, st in ((64, 2), (64, 3), (64, 4), (128, 2), (128, 3))]
    return [Choice(s, w, n, st) for s in (1, 2, 4) for w, n, st in tiles]


def tma_grid() -> list[Choice]:
    """TMA boxes (pages of 256 keys and the contiguous cache only)."""
    if SMOKE:
        return [Choice(2, 4, 16, 2, tma=True)]
    tiles = [(4, 64, 3), (4, 128, 3), (8, 64, 3), (8, 64, 4), (8, 128, 3)]
    return [Choice(s, w, n, st, tma=True) for s in (1, 2) for w, n, st in tiles]


BASELINES = [Choice(None), Choice(None, divide=True)]
TMA_BASELINE = Choice(None, tma=True)
LAYOUTS = [Choice(layout=name) for name in PAGED_LAYOUTS if not SMOKE or name == "rows"]
if SMOKE:  # an interpreter-sized layout of warps on key slices
    PAGED_LAYOUTS["slices 2x16"] = PagedTiles(block_m=16, block_n=32, num_warps=2, num_stages=2, key_slices=2)
    PAGED_LAYOUTS["slices 2x16 ahead0"] = PagedTiles(block_m=16, block_n=32, num_warps=2, num_stages=4, key_slices=2,
                                                     page_lookahead=0)
    PAGED_LAYOUTS["heads 2x16"] = PagedTiles(block_m=16, block_n=16, num_warps=2, num_stages=2, head_slices=2)
    LAYOUTS += [Choice(layout=name) for name in ("slices 2x16", "slices 2x16 ahead0", "heads 2x16")]
COPY_CEILING_TBPS = 3.0  # H100 80GB HBM3 (BENCHMARKS.md)


@contextmanager
def launch_switches(choice: Choice):
    """The launcher's spec with fixed_page_size 0 (the page size divided per key) for choice.divide,
    PAGED_TMA_BLOCKS as choice.tma, and choice.layout the layout of every cache class, while inside."""
    spec_of, tma = launch_paged.paged_decode_spec, launch_paged.PAGED_TMA_BLOCKS
    layouts = launch_paged.PAGED_DECODE_LAYOUTS
    if choice.divide:
        launch_paged.paged_decode_spec = lambda *a: dataclasses.replace(spec_of(*a), fixed_page_size=0)
    launch_paged.PAGED_TMA_BLOCKS = choice.tma
    if choice.layout is not None:
        launch_paged.PAGED_DECODE_LAYOUTS = dict.fromkeys(launch_paged.PAGE_CLASSES, choice.layout)
    try:
        yield
    finally:
        launch_paged.paged_decode_spec, launch_paged.PAGED_TMA_BLOCKS = spec_of, tma
        launch_paged.PAGED_DECODE_LAYOUTS = layouts


@dataclasses.dataclass
class Problem:
    """One length's keys: unpaged for torch, (B, 1, Hq, d) queries, and the paged copies by page size."""

    length: int
    q: torch.Tensor  # (B, 1, Hq, d), flashsdpa's layout
    k: torch.Tensor  # (B, Hkv, S, d)
    v: torch.Tensor
    q_bhsd: torch.Tensor  # (B, Hq, 1, d), torch's layout
    reference: torch.Tensor  # float64 attention (B, Hq, 1, d)
    torch_err: float  # torch flash's error against it

    @property
    def kv_bytes(self) -> int:
        return 2 * BATCH * HEADS_KV * self.length * HEAD_DIM * self.k.element_size()


def torch_flash(q_bhsd, k, v):
    if SMOKE:
        return F.scaled_dot_product_attention(q_bhsd, k, v, enable_gqa=True)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q_bhsd, k, v, enable_gqa=True)


FLUSH = None if SMOKE else torch.empty(256 << 20 >> 2, dtype=torch.int32, device=DEVICE)


def interleaved_ms(calls: dict) -> dict:
    """Median milliseconds of one call of each of `calls` (name -> function), timed in REPS rounds that call
    each once in a rotating order, so that a drift of the GPU's clocks reaches every choice alike (the first
    run timed the choices one after another: one variant read 0.382 ms early and 0.413 ms late). L2 is
    flushed before each call; nothing synchronises within a round (the flush keeps the GPU busy while the
    host enqueues the next call, as the bench's timer does)."""
    names = list(calls)
    for _ in range(WARMUP):
        for name in names:
            calls[name]()
    times = {name: [] for name in names}
    for round_index in range(REPS):
        shift = round_index % len(names)
        pending = []
        for name in names[shift:] + names[:shift]:
            if SMOKE:
                begin = time.perf_counter()
                calls[name]()
                times[name].append((time.perf_counter() - begin) * 1e3)
                continue
            FLUSH.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            calls[name]()
            end.record()
            pending.append((name, start, end))
        if not SMOKE:
            torch.cuda.synchronize()
        for name, start, end in pending:
            times[name].append(start.elapsed_time(end))
    return {name: statistics.median(values) for name, values in times.items()}


def make_problem(length: int, seed: int) -> Problem:
    gen = torch.Generator(device=DEVICE)
    gen.manual_seed(seed)
    new = lambda *shape: torch.randn(*shape, generator=gen, device=DEVICE, dtype=torch.bfloat16)  # noqa: E731
    q_bhsd = new(BATCH, HEADS_Q, 1, HEAD_DIM)
    k, v = new(BATCH, HEADS_KV, length, HEAD_DIM), new(BATCH, HEADS_KV, length, HEAD_DIM)
    reference = float64_attention(q_bhsd, k, v)
    return Problem(length, q_bhsd.transpose(1, 2).contiguous(), k, v, q_bhsd, reference,
                   relative_error(torch_flash(q_bhsd, k, v), reference))


def float64_attention(q_bhsd, k, v) -> torch.Tensor:
    """The truth (B, Hq, 1, d) in float64, one batch item at a time (a whole 128k-key cache would not fit)."""
    group = HEADS_Q // HEADS_KV
    outs = []
    for b in range(BATCH):
        keys, values = k[b].double().repeat_interleave(group, 0), v[b].double().repeat_interleave(group, 0)
        scores = q_bhsd[b].double() @ keys.transpose(-1, -2) / math.sqrt(HEAD_DIM)
        outs.append(torch.softmax(scores, -1) @ values)
        del keys, values, scores
    return torch.stack(outs)


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out.double() - reference).norm() / reference.norm())


def paged(problem: Problem, page_size: int, seed: int):
    """(K cache, V cache, block_table, cache_seqlens): pages of page_size keys in a random order, of -page_size
    keys in table order (a negative page_size), or (page_size 0) the contiguous (B, S, Hkv, d) cache
    kvcache_attention takes without a table."""
    seqlens = torch.full((BATCH,), problem.length, dtype=torch.int32, device=DEVICE)
    if page_size == 0:
        return problem.k.transpose(1, 2).contiguous(), problem.v.transpose(1, 2).contiguous(), None, seqlens
    gen = torch.Generator(device=DEVICE)
    gen.manual_seed(seed)
    table = None
    if page_size < 0:
        page_size = -page_size
        table = torch.arange(BATCH * -(-problem.length // page_size), dtype=torch.int32, device=DEVICE)
        table = table.view(BATCH, -1)
    k_pages, table = paged_copy(problem.k, page_size, gen, table)
    v_pages, _ = paged_copy(problem.v, page_size, gen, table)
    return k_pages, v_pages, table, seqlens


def flashsdpa_call(problem: Problem, cache, choice: Choice):
    k_pages, v_pages, table, seqlens = cache
    desc = kvcache.cache_descriptor(
        problem.q, k_pages, v_pages, problem.length, scale=None, causal=False,
        window_size=(-1, -1), softcap=None, alibi=False, sinks=False, fp32_precision="ieee",
    )  # fmt: skip

    def call():
        with launch_switches(choice):
            return launch_paged.paged_decode(desc, problem.q, k_pages, v_pages, seqlens, table, 0, None, None,
                                             num_splits=choice.splits, tiles=choice.tiles)[0]  # fmt: skip

    return call


def first_call(problem: Problem, page_size: int, cache, choice: Choice) -> tuple[dict, object]:
    """(row, call): the choice's first call (compiling or loading its kernel) checked against torch flash;
    call is None where it failed."""
    row = dict(length=problem.length, page=page_size, choice=choice.label)
    call = flashsdpa_call(problem, cache, choice)
    try:
        out = call()
        row["err"], row["torch_err"] = relative_error(out, problem.reference), problem.torch_err
    except Exception as error:  # noqa: BLE001 - a choice that does not compile or fit is a row of the table
        row["error"] = f"{type(error).__name__}: {str(error)[:120]}"
        call = None
    return row, call


def run_phase(lengths, choices_by_page, rows: list, seed: int, deadline_s: float = math.inf) -> None:
    """Times every choice at every length into `rows`, with torch flash in the same rounds (interleaved_ms);
    a choice reached after deadline_s (seconds since the start) is a row "over budget"."""
    for length in lengths:
        problem = make_problem(length, seed + length)
        for page_size, choices in choices_by_page.items():
            cache = paged(problem, page_size, seed + page_size)
            calls, timed = {}, []
            for choice in choices:
                if time.perf_counter() - START > deadline_s:
                    rows.append(dict(length=length, page=page_size, choice=choice.label, error="over budget"))
                    continue
                row, call = first_call(problem, page_size, cache, choice)
                rows.append(row)
                if call is not None:
                    calls[choice.label], timed = call, [*timed, row]
            if calls and not args.warm:
                calls["torch flash"] = lambda: torch_flash(problem.q_bhsd, problem.k, problem.v)
                ms = interleaved_ms(calls)
                for row in timed:
                    row.update(ms=ms[row["choice"]], torch_ms=ms["torch flash"])
                    row["tbps"] = problem.kv_bytes / row["ms"] / 1e9
                    row["torch_tbps"] = problem.kv_bytes / row["torch_ms"] / 1e9
                    row["ratio"] = row["torch_ms"] / row["ms"]
                    row["share"] = row["tbps"] / COPY_CEILING_TBPS
                print(f"S={length} page {page_size}: torch flash {problem.kv_bytes / ms['torch flash'] / 1e9:.2f} "
                      f"TB/s, {len(timed)} choices timed", flush=True)  # fmt: skip
            del cache
        del problem
        if not SMOKE:
            torch.cuda.empty_cache()


def warm_in_workers() -> None:
    """Compile every variant of choices_by_page() in --jobs processes (each its share, at the smallest length)."""
    if args.jobs <= 1:
        return
    grid_flag = ["--grid"] if args.grid else []
    workers = [subprocess.Popen([sys.executable, __file__, f"--warm={i}/{args.jobs}", *grid_flag])
               for i in range(args.jobs)]
    for worker in workers:
        worker.wait()
    print(f"compiled in {args.jobs} workers: {time.perf_counter() - START:.0f} s", flush=True)


def geomean(values) -> float:
    values = [v for v in values if v and not math.isnan(v)]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def choices_by_page() -> dict[int, list[Choice]]:
    """The choices timed over each page size (0: the contiguous cache): the launcher's default and every
    named layout, with --grid the rows program's tiles, the page size divided per key, and TMA boxes."""
    by_page = {page: [Choice(), *LAYOUTS] for page in (*PAGE_SIZES, 0, IN_ORDER)}
    if args.grid:
        for page in PAGE_SIZES:
            by_page[page] += grid() + BASELINES[1:]
        by_page[PAGE_SIZES[-1]] += tma_grid() + [TMA_BASELINE]  # pages holding whole blocks
        by_page[0].append(TMA_BASELINE)
    return by_page


def warm_share(by_page: dict[int, list[Choice]], index: int, count: int) -> dict[int, list[Choice]]:
    """Worker `index` of `count`'s share: one choice per compiled variant (Triton specialises a split count
    of 1), per page size."""
    share = {}
    for page, page_choices in by_page.items():
        variants = {(c.warps, c.block_n, c.stages, c.splits in (1, None), c.divide, c.tma, c.layout): c
                    for c in page_choices}  # fmt: skip
        share[page] = [c for i, c in enumerate(variants.values()) if i % count == index]
    return share


def cell(row: dict) -> str:
    if "tbps" not in row:
        return row.get("error", "-")[:26]
    return f"{row['tbps']:.2f} {row['share']:.0%} {row['ratio']:.2f}x {row['err']:.0e}"


def main() -> None:
    by_page = choices_by_page()
    if args.warm:
        index, count = map(int, args.warm.split("/"))
        run_phase(ALL_LENGTHS[:1], warm_share(by_page, index, count), [], seed=0)
        return
    warm_in_workers()
    rows: list[dict] = []
    run_phase(ALL_LENGTHS, by_page, rows, seed=2, deadline_s=args.budget_s)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "sweep_paged.json").write_text(json.dumps(rows, indent=1))
    failed = [r for r in rows if "error" in r and r["error"] != "over budget"]
    for r in failed[:10]:
        print(f"  failed: page {r['page']} {r['choice']} S={r['length']}: {r['error']}")
    skipped = sum(r.get("error") == "over budget" for r in rows)
    if skipped:
        print(f"  {skipped} of {len(rows)} rows not timed (over the budget of --budget-s)")
    card = "cpu" if SMOKE else torch.cuda.get_device_name()
    print(f"\npaged decode, bf16 B={BATCH} Hq={HEADS_Q}/{HEADS_KV} d={HEAD_DIM}, {card}, torch {torch.__version__}; "
          f"K+V TB/s, share of {COPY_CEILING_TBPS} TB/s, ratio to torch flash, err vs float64; "
          f"{time.perf_counter() - START:.0f} s")  # fmt: skip
    print("page choice               " + "".join(f"{'S=' + str(n):>28s}" for n in ALL_LENGTHS))
    for page, choices in by_page.items():
        torch_rows = {n: [r for r in rows if (r["length"], r["page"]) == (n, page) and "torch_tbps" in r]
                      for n in ALL_LENGTHS}  # fmt: skip
        print(f"{page:4d} torch flash          " + "".join(
            f"{'-':>28s}" if not torch_rows[n] else
            f"{statistics.median(r['torch_tbps'] for r in torch_rows[n]):>12.2f} "
            f"{statistics.median(r['torch_tbps'] for r in torch_rows[n]) / COPY_CEILING_TBPS:>4.0%}       "
            f"{torch_rows[n][0]['torch_err']:.0e}" for n in ALL_LENGTHS))  # fmt: skip
        for choice in choices:
            cells = [next((r for r in rows if (r["length"], r["page"], r["choice"]) == (n, page, choice.label)), {})
                     for n in ALL_LENGTHS]  # fmt: skip
            print(f"{page:4d} {choice.label:21s}" + "".join(f"{cell(c):>28s}" for c in cells))
    print("\nbest per (page, S):")
    for page in by_page:
        best = []
        for n in ALL_LENGTHS:
            timed = [r for r in rows if (r["length"], r["page"]) == (n, page) and "ratio" in r]
            top = max(timed, key=lambda r: r["ratio"], default=None)
            best.append(f"S={n}: {top['choice']} {top['ratio']:.2f}x" if top else f"S={n}: -")
        print(f"  page {page:4d}: " + "; ".join(best))
    long = [n for n in ALL_LENGTHS if n >= BAR_LENGTHS[0]]
    scored = []
    for choice in LAYOUTS:
        mine = [r.get("ratio") for r in rows
                if r["choice"] == choice.label and r["length"] in long and r["page"] != IN_ORDER]  # fmt: skip
        if mine and all(mine):
            scored.append((geomean(mine), min(mine), choice.label))
    for score, worst, label in sorted(scored, reverse=True):
        print(f"  layout {label!r:24s} geomean {score:.3f}x, worst {worst:.2f}x (S >= {long[0]}, every page size)")
    by_class = {}
    for page in (page for page in by_page if page != IN_ORDER):
        page_class = launch_paged.page_class(page or None)
        for choice in LAYOUTS:
            mine = [r.get("ratio") for r in rows
                    if (r["choice"], r["page"]) == (choice.label, page) and r["length"] in long]  # fmt: skip
            if mine and all(mine):
                by_class.setdefault(page_class, []).append((geomean(mine), min(mine), choice.label, page))
    for page_class, scores in by_class.items():
        score, worst, label, page = max(scores)
        print(f"  {page_class} (page {page}): {label!r} geomean {score:.3f}x, worst {worst:.2f}x (S >= {long[0]})")
    if by_class:
        best = {page_class: max(scores)[2] for page_class, scores in by_class.items()}
        print(f"PAGED_DECODE_LAYOUTS = {best!r}  # launch_paged: the best layout per class of cache above")


if __name__ == "__main__":
    main()
