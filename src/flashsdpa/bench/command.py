"""`flashsdpa bench`: arguments, the run loop with its progress and time budget, the outputs."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import zlib
from pathlib import Path

import torch

from flashsdpa.bench import cases as case_matrix
from flashsdpa.bench import environment, memory, report
from flashsdpa.bench.estimate import Budget, Estimator
from flashsdpa.bench.peers import FLEX_MODES, failure_reason, make_peers
from flashsdpa.bench.plot import write_plot
from flashsdpa.bench.runner import run_case, skipped_case
from flashsdpa.bench.timing import CPU_SETTINGS, CUDA_SETTINGS, Timer

# One lent-GPU call is limited to 10 minutes: the cases must end by this many
# seconds, leaving room for start-up, one case far over its estimate, the plot.
DEFAULT_CUDA_BUDGET_S = 500.0
# A CPU run's default: the quick matrix on 2 cores (every peer, Flex compiles included) fits in it.
DEFAULT_CPU_BUDGET_S = 1200.0
MODEL_RESERVE_S = 90.0  # taken off the default budget by --model, which runs last
# `--flex auto` compiles every shape when at most this many are selected (--quick
# has 4), else compiles with dynamic shapes: a static compile per shape of the
# full matrix (72 shapes) would take longer than the rest of the run.
FLEX_STATIC_MAX_SHAPES = 8
CONVENTIONS = {
    "flops_forward": "4*B*H*L*S*d, counting only visible (i, j <= i) pairs when causal: AttentionDescriptor.flops",
    "flops_backward": "2.5x the forward",
    "forward_timing": "flashsdpa / peer forward; inputs require grad when the case has a backward (training forward)",
    "backward_timing": "backward alone: torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True)",
    "statistic": "median of the timed runs (CUDA events), after a warm-up; L2 flushed before each run",
    "ratio": "peer time / flashsdpa time (> 1: flashsdpa faster)",
    "decode_bytes": "K+V bytes / time (each read once)",
    "peak_mib": "MiB held above the level before the call, at the peak (bench/memory.py; CUDA: torch's "
    "allocator; CPU: the resident set, large allocations mapped alone): fwd: one forward, its output included; "
    "bwd: one forward and its backward",
    "rel_err": "||a - b||_F / ||b||_F between flashsdpa's and the peer's output / gradients",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashsdpa bench",
        description="Time flashsdpa against torch SDPA's backends and FlexAttention on the same inputs.",
    )
    parser.add_argument("--quick", action="store_true", help="headline rows only (bf16, 4 shapes, fwd and bwd)")
    parser.add_argument("--out", default="bench-results", help="folder for results.json/.md/.png (default %(default)s)")
    parser.add_argument(
        "--cases",
        default=None,
        help="comma-separated globs or substrings of case names, e.g. 'main/bf16-d128-*,decode' ('none': no case)",
    )
    parser.add_argument("--model", action="store_true", help="also time a model step (torch SDPA vs flashsdpa)")
    parser.add_argument("--model-dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (CPU-sized cases and peers)")
    parser.add_argument("--smoke", action="store_true", help="a tiny matrix of one case per kind (seconds; for tests)")
    parser.add_argument(
        "--flex",
        default="auto",
        choices=("auto",) + FLEX_MODES,
        help="FlexAttention: torch.compile per shape (static), once per dtype/head dim/causality with "
        f"symbolic sizes (dynamic), or off; auto (default): static for up to {FLEX_STATIC_MAX_SHAPES} shapes",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help=f"the whole run's seconds: cases that would end past it are skipped, --model (given the last "
        f"{MODEL_RESERVE_S:.0f} s) starts no step past it (default {DEFAULT_CUDA_BUDGET_S:.0f} on CUDA, "
        f"{DEFAULT_CPU_BUDGET_S:.0f} on a CPU, none with --smoke; 0: none)",
    )
    parser.add_argument("--warmup-ms", type=float, default=None, help="warm-up per measurement")
    parser.add_argument("--rep-ms", type=float, default=None, help="time of timed runs per measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plan", action="store_true", help="list the cases with estimated times and exit")
    parser.add_argument(
        "--from-json",
        nargs="+",
        metavar="FILE",
        help="run nothing: merge these results.json files (later wins) and write the table, markdown and plot",
    )
    return parser


class Progress:
    """A tqdm bar on a terminal; plain lines otherwise (logs stay readable)."""

    def __init__(self, total: int):
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="case", dynamic_ncols=True)
            except ImportError:
                pass

    def start(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text)
        else:
            print(text, end="", flush=True)

    def done(self, text: str, line: str) -> None:
        if self.bar is not None:
            self.bar.write(f"{line} {text}")
            self.bar.update()
        else:
            print(f" {text}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def timing_settings(device: torch.device, args):
    settings = CUDA_SETTINGS if device.type == "cuda" else CPU_SETTINGS
    changes = {}
    if args.warmup_ms is not None:
        changes["warmup_ms"] = args.warmup_ms
    if args.rep_ms is not None:
        changes["rep_ms"] = args.rep_ms
    return dataclasses.replace(settings, **changes)


def resolve_flex_mode(requested: str, cases: list) -> str:
    if requested != "auto":
        return requested
    shapes = {
        (c.dtype, c.batch, c.heads_q, c.heads_kv, c.seq_q, c.seq_kv, c.head_dim, c.causal, c.variant_labels)
        for c in cases
        if "flex" in c.peers and c.mask != "bias"
    }
    return "static" if len(shapes) <= FLEX_STATIC_MAX_SHAPES else "dynamic"


def case_seed(base: int, name: str) -> int:
    """The same inputs for a case whatever else is selected."""
    return (zlib.crc32(name.encode()) + base) % 2**31


def done_text(result: dict) -> str:
    if result["status"] != "ran":
        return f"skipped ({result['reason']})"
    parts = [f"{result['elapsed_s']:.1f} s"]
    primary = result["peers"].get("flashsdpa", {})
    speeds = []
    for mode in result["modes"]:
        entry = primary.get(mode, {})
        key = "kv_tbps" if "kv_tbps" in entry else "tflops"
        unit = "TB/s" if key == "kv_tbps" else "TFLOP/s"
        speeds.append(f"{mode} {entry[key]:.3g} {unit}" if entry.get("status") == "ok" else f"{mode} n/a")
    parts.append("flashsdpa " + ", ".join(speeds))
    verdict = result["check"].get("flashsdpa", {})
    if verdict.get("ok") is False:
        parts.append(f"MISMATCH vs {verdict['reference']}: {verdict['max_rel_err']}")
    return "; ".join(parts)


def run_model(device: torch.device, dtype_name: str, deadline: float | None = None) -> dict:
    """One model step's time with torch's SDPA and with flashsdpa: the GPU-sized model on CUDA, a
    CPU-sized one elsewhere (`model_bench.CPU_MODEL`); one line per step; no step starts past `deadline`."""
    dtype = case_matrix.DTYPES_BY_NAME[dtype_name]
    try:
        from flashsdpa.integrations.model_bench import CPU_MODEL, run_model_bench
    except ImportError as error:
        return {"status": "n/a", "reason": f"flashsdpa.integrations.model_bench is not importable ({error})"}

    def progress(text: str) -> None:
        print(f"  model: {text}", flush=True)

    size = {} if device.type == "cuda" else dict(CPU_MODEL)
    try:
        result = run_model_bench(device, dtype, progress=progress, deadline=deadline, **size)
    except Exception as error:
        return {"status": "n/a", "reason": failure_reason(error)}
    return {"status": "ok", "device": str(device), "dtype": dtype_name, **dict(result)}


def finish(document: dict, out: Path) -> int:
    """Writes results.json/.md/.png, prints the tables and, last, the summary."""
    report.write_json(out / "results.json", document)
    (out / "results.md").write_text(report.markdown(document))
    why_no_plot = write_plot(document, out / "results.png")
    report.print_tables(document)
    print()
    for line in report.summary_lines(document):
        print(line)
    written = ["results.json", "results.md"] + ([] if why_no_plot else ["results.png"])
    paths = ", ".join(str(out / name) for name in written)
    print(f"wrote {paths}" + (f"; no plot: {why_no_plot}" if why_no_plot else ""))
    failed = report.failures(document)
    if failed:
        print(f"FLASHSDPA FAILED (did not run, or disagreed with its reference) on: {', '.join(failed)}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    start = time.monotonic()
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if not args.plan:
        out.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        return finish(report.load_documents(args.from_json), out)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available() and not args.plan:
        print("flashsdpa bench: CUDA is not available here; use --device cpu for the smoke matrix", file=sys.stderr)
        return 2
    if device.type == "cuda" and device.index is not None and not args.plan:
        torch.cuda.set_device(device)  # CUDA events record on the current device
    settings = timing_settings(device, args)
    cases = case_matrix.select(case_matrix.matrix(device.type, args.quick, args.smoke), args.cases)
    flex_mode = resolve_flex_mode(args.flex, cases)
    estimator = Estimator(settings, device.type, flex_mode)
    estimates = [estimator.estimate(case) for case in cases]
    total_s = args.budget_s  # the whole run's, --model included
    if total_s is None:
        total_s = 0 if args.smoke else DEFAULT_CUDA_BUDGET_S if device.type == "cuda" else DEFAULT_CPU_BUDGET_S
    budget_s = max(1.0, total_s - MODEL_RESERVE_S) if args.model and total_s else total_s  # the cases'
    print(
        f"flashsdpa bench: {len(cases)} case(s) on {device}, flex {flex_mode}, estimated {sum(estimates):.0f} s"
        + (f" (budget {budget_s:.0f} s)" if budget_s else ""),
        flush=True,
    )
    if budget_s and sum(estimates) > budget_s:
        print("  more than the budget: cases that would end past it are skipped, and listed at the end with "
              "the --cases that runs them")
    if args.plan:
        for case, estimate in zip(cases, estimates):
            print(f"  {case.name:42} {estimate:7.1f} s  peers: {', '.join(case.peers)}")
        return 0

    meta = environment.collect(device)
    meta.update(
        timing=settings.describe(),
        conventions=CONVENTIONS,
        flex_compile=flex_mode,
        budget_s=budget_s or None,
        argv=list(argv) if argv is not None else sys.argv[1:],
    )
    document = {"schema": report.SCHEMA, "meta": meta, "cases": [], "model": None}
    print(environment.headline(meta), flush=True)
    budget = Budget(budget_s or None, start)
    run_matrix(cases, estimates, document, out, device, settings, flex_mode, budget, args.seed)
    if args.model:
        print("model benchmark ...", flush=True)
        document["model"] = run_model(device, args.model_dtype, start + total_s if total_s else None)
    meta["wall_s"] = round(time.monotonic() - start, 1)
    return finish(document, out)


def run_matrix(cases, estimates, document, out, device, settings, flex_mode, budget, seed) -> None:
    """Runs (or skips, past the budget) each case; results.json is rewritten after each."""
    timer = Timer(device, settings)
    if device.type == "cpu":
        memory.fix_allocation_threshold()  # before anything is timed: every peer runs under it
    peers = make_peers(flex_mode)
    progress = Progress(len(cases))
    try:
        for index, (case, estimate) in enumerate(zip(cases, estimates)):
            line = f"[{index + 1}/{len(cases)}] {case.name}"
            if budget.fits(time.monotonic(), estimate):
                progress.start(f"{line} (est {budget.scale * estimate:.1f} s) ...")
                result = run_case(case, peers, timer, device, seed=case_seed(seed, case.name))
                result["estimate_s"] = estimate
                budget.record(estimate, result["elapsed_s"])
            else:
                expected = budget.scale * estimate
                reason = f"time budget: {budget.seconds:.0f} s would be exceeded (estimate {expected:.0f} s)"
                result = skipped_case(case, reason)
                progress.start(line)
            progress.done(done_text(result), line)
            document["cases"].append(result)
            report.write_json(out / "results.json", document)
    finally:
        progress.close()
