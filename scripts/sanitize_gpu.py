"""compute-sanitizer on one small problem of every kernel variant flashsdpa's launchers pick (issue 14).

Each problem is one call of flashsdpa on CUDA tensors with its backend pinned,
and its backward where it has one: the triton backend's forward and backward
(dense, causal, key-padding and float masks, dropout, GQA, each variant and
all of them at once, float32 halves and tf32, head dim 512, the exact 16-bit
gradients), its flash decoding, paged decode (pages, contiguous cache, 32
query rows), packed varlen; the hopper backend's Gluon forward and backward
at head dims 64 and 128, causal and not, GQA, and the variants (a problem the
pinned backend refuses is "declined": shown, not a finding); and first, a
reference: a Gluon kernel that only calls gl.warp_specialize with the hopper
kernels' partitions (default group, workers of 4 and 1 warps, their registers)
and bodies that touch no shared memory (scripts/warp_specialize_dispatch.py).

Three passes, each in child processes of this script:

1. plain, PLAIN_PROCESSES processes side by side: every problem once without a
   sanitizer, which compiles each kernel into Triton's cache (the sanitized
   passes then load them) and shows a problem that fails outright;
2. `compute-sanitizer --tool memcheck` over every problem, with torch's
   caching allocator off (PYTORCH_NO_CUDA_MEMORY_CACHING=1: each tensor its
   own allocation, so a read past a tensor's end is outside any allocation);
3. `compute-sanitizer --tool racecheck --racecheck-report hazard` (shared-
   memory hazards, each with its address and threads; slower) over the
   problems marked `race`: the reference, then one of each kernel family
   (which also run first under memcheck, so that a pass stopped at its time
   limit has them).

racecheck reports Triton's own warp-specialize dispatch in every Gluon kernel:
each worker warp's load of its state byte against the default group's store
of it, which a CTA-wide barrier orders (warp_specialize_dispatch's docstring
gives the SASS). A hazard whose accesses are all that dispatch's (found in
the kernel's SASS, from its cubin in Triton's cache) is counted apart ("+N
ws"), not as a finding; the reference shows the pattern on its own.

The child prints a marker line before and after each problem (synchronised
before the second); a sanitizer report between the two is that problem's
finding. A report is a line of the sanitizer's own output ("========= "
followed by text, not by the indented detail lines) other than its banners and
summaries; each finding is shown with the kernel it names. The total per pass
is the sanitizer's own summary line (a hazard it counted but did not print is
a finding: it cannot be classified). The table comes last: one row per
problem, its memcheck and racecheck findings, then the totals; exit 1 on any
finding (the dispatch's hazards are none), failed problem, or problem a
sanitizer pass did not reach (not checked).

Usage (GPU machine, repo root; logs under $OUT, default /tmp/out):
    python scripts/sanitize_gpu.py [--tools memcheck,racecheck] [--match TEXT] [--list] [--budget-s 130]
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

MARK = "@@sanitize"
PLAIN_PROCESSES = 8  # compiles side by side (the H100 host has 16 cores)
DEVICE = "cuda"
BANNERS = ("COMPUTE-SANITIZER", "ERROR SUMMARY", "RACECHECK SUMMARY", "LEAK SUMMARY", "Target application returned")
SUMMARY = re.compile(r"========= (ERROR SUMMARY: (\d+) errors?|RACECHECK SUMMARY: (\d+) hazards? displayed"
                     r"(?: \((\d+) errors?, (\d+) warnings?\))?)")
REPORT = re.compile(r"^========= (?! )(.+)$")
KERNEL = re.compile(r"^=========\s+at (?:0x[0-9a-f]+ in )?([A-Za-z_][\w:<>]*)")
# The passes' shares of --budget-s.
SHARES = {"plain": 0.35, "memcheck": 0.4, "racecheck": 0.25}
# Each tool's own options: racecheck prints every hazard with its address and threads (what tells the
# warp-specialize dispatch's apart), without host backtraces.
TOOL_OPTIONS = {"memcheck": ["--print-limit", "20"],
                "racecheck": ["--racecheck-report", "hazard", "--show-backtrace", "no", "--print-limit", "10000"]}


@dataclasses.dataclass(frozen=True)
class Problem:
    """One call: `op` "attention" (flashsdpa.attention, q (1, Hq, L, E)), "varlen" (flashsdpa.varlen_attn over
    `packed` sequences), "kvcache" (flashsdpa.kvcache_attention, L queries over 3 cached sequences of up to
    S keys, in pages of `page_size`, or a contiguous cache where None) or "dispatch" (the warp-specialize
    reference kernel, warp_specialize_dispatch)."""

    name: str
    op: str = "attention"
    dtype: str = "bfloat16"
    head_dim: int = 64
    causal: bool = False
    heads: tuple[int, int] = (2, 2)  # (Hq, Hkv)
    seq: tuple[int, int] = (131, 147)  # (L, S): neither a multiple of a block
    mask: str = ""  # "pad": bool (B, 1, 1, S); "float": float (B, Hq, L, S) with its gradient
    dropout: float = 0.0
    precision: str = "ieee"
    gradients: str = ""  # "exact": the 16-bit backward's exact variant (gradient_precision.pinned)
    variant: str = ""  # "window", "bottom_right", "softcap", "alibi", "sinks", joined by "+"
    backward: bool = True
    backend: str = "triton"
    packed: tuple[int, ...] = (1, 37, 130, 5)
    page_size: int | None = 16
    race: bool = False  # also under racecheck

    def run(self) -> str:
        """Runs the problem (forward, backward), synchronised; "ok", or "declined: ..." where the pinned backend
        refuses it."""
        import torch

        import flashsdpa
        from flashsdpa import gradient_precision
        from flashsdpa.descriptor import GradientPrecision

        device, dtype = torch.device(DEVICE), getattr(torch, self.dtype)
        if self.op == "dispatch":
            if torch.cuda.get_device_capability(device) < (9, 0):
                return "declined: gl.warp_specialize's register re-balancing (setmaxnreg) needs sm_90"
            from warp_specialize_dispatch import run_reference

            run_reference(device)
            torch.cuda.synchronize()
            return "ok"
        generator = torch.Generator(device=device).manual_seed(0)
        grad = self.backward and self.op != "kvcache"

        def new(*shape, dtype=dtype, requires_grad=grad):
            return torch.randn(*shape, generator=generator, device=device, dtype=dtype).requires_grad_(requires_grad)

        names = set(filter(None, self.variant.split("+")))
        (hq, hkv), (seq_q, seq_kv), dim = self.heads, self.seq, self.head_dim
        variants = dict(
            softcap=30.0 if "softcap" in names else None,
            alibi_slopes=torch.rand(hq, generator=generator, device=device) if "alibi" in names else None,
            sinks=new(hq, dtype=torch.float32) if "sinks" in names else None,
        )
        alignment = "bottom_right" if "bottom_right" in names else "top_left"
        previous = gradient_precision.pinned
        gradient_precision.pinned = GradientPrecision(self.gradients) if self.gradients else None
        try:
            if self.op == "attention":
                q, k, v = new(1, hq, seq_q, dim), new(1, hkv, seq_kv, dim), new(1, hkv, seq_kv, dim)
                mask = {"": None, "pad": torch.arange(seq_kv, device=device).view(1, 1, 1, -1) < seq_kv - 20,
                        "float": new(1, hq, seq_q, seq_kv)}[self.mask]  # fmt: skip
                out = flashsdpa.attention(q, k, v, causal=self.causal, attn_mask=mask, dropout_p=self.dropout,
                                          enable_gqa=hq != hkv, backend=self.backend, fp32_precision=self.precision,
                                          window=(40, None) if "window" in names else None,
                                          causal_alignment=alignment, **variants)  # fmt: skip
            elif self.op == "varlen":
                total = sum(self.packed)
                q, k, v = new(total, hq, dim), new(total, hkv, dim), new(total, hkv, dim)
                cu = torch.tensor([0, *self.packed], device=device).cumsum(0).to(torch.int32)
                out = flashsdpa.varlen_attn(q, k, v, cu, cu, max(self.packed), max(self.packed), causal=self.causal,
                                            window_size=(40, 0) if "window" in names else (-1, -1),
                                            causal_alignment=alignment, enable_gqa=hq != hkv, dropout_p=self.dropout,
                                            backend=self.backend, fp32_precision=self.precision, validate=False,
                                            **variants)  # fmt: skip
            else:
                out = self.run_kvcache(new, generator, device, variants, names)
            if grad:
                out.backward(torch.randn(out.shape, generator=generator, device=device, dtype=out.dtype))
            torch.cuda.synchronize()
        except flashsdpa.UnsupportedError as refusal:
            torch.cuda.synchronize()
            return f"declined: {refusal}"
        finally:
            gradient_precision.pinned = previous
        return "ok"

    def run_kvcache(self, new, generator, device, variants: dict, names: set):
        import torch

        import flashsdpa

        (hq, hkv), (seq_q, capacity), batch = self.heads, self.seq, 3
        lengths = torch.tensor([0, capacity // 3, capacity - seq_q], device=device)  # an empty sequence, a full one
        if self.page_size is None:
            k_cache, v_cache, table = new(batch, capacity, hkv, self.head_dim), new(batch, capacity, hkv,
                                                                                    self.head_dim), None  # fmt: skip
        else:
            per_sequence = -(-capacity // self.page_size)
            pages = batch * per_sequence + 1  # one page no sequence uses
            k_cache = new(pages, self.page_size, hkv, self.head_dim)
            v_cache = new(pages, self.page_size, hkv, self.head_dim)
            order = torch.randperm(pages, generator=generator, device=device)[: batch * per_sequence]
            table = order.view(batch, per_sequence).to(torch.int32)
        return flashsdpa.kvcache_attention(
            new(batch, seq_q, hq, self.head_dim), k_cache, v_cache, cache_seqlens=lengths, block_table=table,
            causal=self.causal, window_size=(40, -1) if "window" in names else (-1, -1), backend=self.backend,
            fp32_precision=self.precision, validate=False, **variants,
        )  # fmt: skip


ALL_VARIANTS = "window+softcap+alibi+sinks"
PROBLEMS = [
    # Triton's warp-specialize dispatch alone: the baseline of the hopper kernels' racecheck reports
    Problem("hopper reference: warp-specialize dispatch", op="dispatch", backward=False, backend="hopper",
            race=True),
    # triton: forward and backward
    Problem("triton dense bf16 d64", race=True),
    Problem("triton causal bf16 d128", head_dim=128, causal=True, race=True),
    Problem("triton dense fp16 d128", dtype="float16", head_dim=128),
    Problem("triton key-padding mask", mask="pad"),
    Problem("triton float mask + grad", mask="float", causal=True),
    Problem("triton dropout", dropout=0.1, causal=True),
    Problem("triton GQA 8/2", heads=(8, 2), causal=True),
    Problem("triton window", causal=True, variant="window"),
    Problem("triton window bottom-right", causal=True, variant="window+bottom_right"),
    Problem("triton softcap", variant="softcap"),
    Problem("triton ALiBi", variant="alibi"),
    Problem("triton sinks", variant="sinks"),
    Problem("triton every variant GQA", heads=(8, 2), causal=True, variant=ALL_VARIANTS, race=True),
    Problem("triton exact 16-bit gradients", head_dim=128, causal=True, gradients="exact"),
    Problem("triton fp32 halves d64", dtype="float32", race=True),
    Problem("triton fp32 halves d128 causal", dtype="float32", head_dim=128, causal=True),
    Problem("triton fp32 tf32 d128", dtype="float32", head_dim=128, precision="tf32"),
    Problem("triton d512 causal", head_dim=512, causal=True, heads=(2, 1)),
    # triton: flash decoding (one query row), paged decode, packed varlen
    Problem("triton decode L=1 S=4099", heads=(8, 2), seq=(1, 4099), backward=False, race=True),
    Problem("triton decode every variant", heads=(8, 2), seq=(1, 4099), backward=False, variant=ALL_VARIANTS),
    Problem("paged decode pages of 16", op="kvcache", heads=(8, 2), seq=(1, 1000), head_dim=128, race=True),
    Problem("paged decode contiguous cache", op="kvcache", heads=(8, 2), seq=(1, 1000), head_dim=128,
            page_size=None),
    Problem("paged decode every variant", op="kvcache", heads=(8, 2), seq=(1, 1000), head_dim=128,
            variant=ALL_VARIANTS),
    Problem("paged prefill 32 rows causal", op="kvcache", heads=(8, 2), seq=(32, 1000), head_dim=128, causal=True,
            page_size=256),
    Problem("paged decode fp32", op="kvcache", dtype="float32", heads=(8, 2), seq=(1, 1000), head_dim=128),
    Problem("varlen causal", op="varlen", heads=(4, 2), causal=True, race=True),
    Problem("varlen every variant", op="varlen", heads=(4, 2), head_dim=128, causal=True, variant=ALL_VARIANTS),
    Problem("varlen dropout", op="varlen", causal=True, dropout=0.1),
    # hopper: the Gluon forward and backward
    *(Problem(f"hopper bf16 d{d}" + (" causal" if causal else ""), head_dim=d, causal=causal, seq=(300, 300),
              backend="hopper", race=causal)
      for d in (64, 128) for causal in (False, True)),
    Problem("hopper fp16 d128 GQA 4/2 causal", dtype="float16", head_dim=128, heads=(4, 2), causal=True,
            seq=(300, 300), backend="hopper"),
    Problem("hopper bf16 d256 forward", head_dim=256, seq=(300, 300), backward=False, backend="hopper"),
    # the Gluon kernels' variants (where the hopper backend takes them; else "declined", not a finding)
    Problem("hopper every variant d128 GQA", head_dim=128, heads=(4, 2), causal=True, seq=(300, 300),
            variant=ALL_VARIANTS + "+bottom_right", backend="hopper", race=True),
    Problem("hopper window d64", head_dim=64, causal=True, seq=(300, 300), variant="window", backend="hopper"),
]


# ---------------------------------------------------------------- the child: runs problems between markers


def child(names: list[str]) -> int:
    by_name = {problem.name: problem for problem in PROBLEMS}
    failed = 0
    for name in names:
        print(f"{MARK} start {name}", flush=True)
        start = time.perf_counter()
        try:
            outcome = by_name[name].run()
        except Exception as error:  # noqa: BLE001 - a failing problem is a finding, and the rest still run
            outcome, failed = f"error: {type(error).__name__}: {str(error).strip().splitlines()[0][:300]}", 1
        print(f"{MARK} end {name} | {time.perf_counter() - start:.1f} s | {outcome}", flush=True)
    return failed


# ---------------------------------------------------------------- the parent: passes and the table


def find_sanitizer() -> str | None:
    """compute-sanitizer on PATH, under $CUDA_HOME/bin, under /usr/local/cuda*/bin (newest first), or in a pip
    wheel of NVIDIA's (site-packages/nvidia/.../compute-sanitizer)."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    places = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "compute-sanitizer")]
    places += sorted(glob.glob("/usr/local/cuda*/bin/compute-sanitizer"), reverse=True)
    for folder in filter(os.path.isdir, sys.path):
        places += sorted(glob.glob(os.path.join(folder, "nvidia", "**", "compute-sanitizer"), recursive=True))
    return next((place for place in places if os.path.isfile(place) and os.access(place, os.X_OK)), None)


@dataclasses.dataclass
class Finding:
    """One report of the sanitizer: its first line, the kernel it names, its detail lines, and whether it lies
    between the warp-specialize dispatch's own accesses (racecheck; then it is not counted as a finding)."""

    text: str
    kernel: str | None = None
    lines: list[str] = dataclasses.field(default_factory=list)
    dispatch: bool = False


@dataclasses.dataclass
class PassResult:
    outcomes: dict = dataclasses.field(default_factory=dict)  # problem -> (seconds, outcome)
    findings: dict = dataclasses.field(default_factory=dict)  # problem (or "(outside a problem)") -> [Finding]
    summary_count: int | None = None
    undisplayed: int = 0  # hazards racecheck counted but did not print
    note: str = ""

    def count(self, name: str | None = None, dispatch: bool = False) -> int:
        """Findings (dispatch=True: the dispatch's hazards instead) of one problem, or of all."""
        found = self.findings.get(name, []) if name is not None else sum(self.findings.values(), [])
        return sum(1 for finding in found if finding.dispatch == dispatch)


def parse(log: str, result: PassResult) -> None:
    """Markers, the sanitizer's reports between them (each with the kernel it names and its detail lines), its
    summary count."""
    current, last_report = "(outside a problem)", None
    for line in log.splitlines():
        if line.startswith(MARK):
            _, which, rest = line.split(" ", 2)
            if which == "start":
                current = rest
            else:
                name, seconds, outcome = (part.strip() for part in rest.split("|", 2))
                result.outcomes[name] = (seconds, outcome)
                current = "(outside a problem)"
            continue
        summary = SUMMARY.match(line)
        if summary:
            result.summary_count = int(summary.group(2) or summary.group(3))
            if summary.group(4) is not None:
                result.undisplayed = int(summary.group(4)) + int(summary.group(5)) - result.summary_count
            last_report = None
            continue
        report = REPORT.match(line)
        if report and not report.group(1).startswith(BANNERS):
            last_report = Finding(report.group(1).strip(), lines=[line])
            result.findings.setdefault(current, []).append(last_report)
            continue
        if last_report is None:
            continue
        last_report.lines.append(line)
        kernel = KERNEL.match(line)
        if kernel and last_report.kernel is None:
            last_report.kernel = kernel.group(1)


def classify_dispatch(result: PassResult) -> None:
    """Marks the racecheck reports between the warp-specialize dispatch's own accesses, as found in the SASS of
    the kernel's compiled variants in Triton's cache (warp_specialize_dispatch)."""
    from warp_specialize_dispatch import cached_dispatch, is_dispatch_hazard, parse_accesses

    dispatch_of: dict[str, list] = {}
    for finding in sum(result.findings.values(), []):
        address, accesses = parse_accesses(finding.lines)
        kernels = {access.kernel for access in accesses}
        if len(kernels) != 1:
            continue
        kernel = kernels.pop()
        finding.kernel = finding.kernel or kernel
        if kernel not in dispatch_of:
            try:
                dispatch_of[kernel] = cached_dispatch(kernel)
            except (OSError, subprocess.CalledProcessError) as error:  # no cubin read: its reports stay findings
                dispatch_of[kernel] = []
                result.note += f"{'; ' if result.note else ''}SASS of {kernel} not read ({error})"
        finding.dispatch = any(is_dispatch_hazard(address, accesses, found) for found in dispatch_of[kernel])


def run_pass(tool: str, problems: list[Problem], sanitizer: str | None, out: Path, seconds: float) -> PassResult:
    """Runs the problems in child processes (plain: PLAIN_PROCESSES side by side), each log into `out`."""
    result = PassResult()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1] / "src"),
                                                      env.get("PYTHONPATH")]))  # fmt: skip
    base = [sys.executable, str(Path(__file__).resolve()), "--child"]
    if tool == "plain":
        chunks = [problems[i::PLAIN_PROCESSES] for i in range(PLAIN_PROCESSES)]
        commands = [base + [p.name for p in chunk] for chunk in chunks if chunk]
    else:
        env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"
        ordered = sorted(problems, key=lambda p: not p.race)  # one of each kernel family first
        commands = [[sanitizer, "--tool", tool, *TOOL_OPTIONS.get(tool, []), *base, *(p.name for p in ordered)]]
    logs = [out / f"sanitize-{tool}-{index}.log" for index in range(len(commands))]
    processes = []
    for command, log in zip(commands, logs):
        with open(log, "w") as handle:
            processes.append(subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                              start_new_session=True))  # fmt: skip
    deadline = time.monotonic() + seconds
    for process in processes:
        try:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
            result.note = f"stopped at its time limit ({seconds:.0f} s)"
    for log in logs:
        parse(log.read_text(errors="replace"), result)
    if tool == "racecheck":
        classify_dispatch(result)
    return result


def cell(result: PassResult | None, problem: Problem) -> str:
    if result is None:
        return "-"
    findings, dispatch = result.count(problem.name), result.count(problem.name, dispatch=True)
    if problem.name not in result.outcomes:
        return "not reached" + (f" ({findings} findings)" if findings else "")
    outcome = result.outcomes[problem.name][1]
    if outcome.startswith("declined"):
        return "declined"
    if outcome.startswith("error"):
        return f"FAILED, {findings} findings"
    return f"{findings}" + (f" +{dispatch} ws" if dispatch else "")


def describe_count(result: PassResult) -> str:
    """"N findings", with the warp-specialize dispatch's hazards and the unprinted ones where there are any."""
    dispatch = result.count(dispatch=True)
    return (f"{result.count() + result.undisplayed} findings"
            + (f" ({result.undisplayed} not printed)" if result.undisplayed else "")
            + (f" (+{dispatch} hazards of the warp-specialize dispatch)" if dispatch else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs="+", metavar="PROBLEM", help=argparse.SUPPRESS)
    parser.add_argument("--tools", default="memcheck,racecheck", help="sanitizer tools, in order (default %(default)s)")
    parser.add_argument("--match", help="only the problems whose name contains this text")
    parser.add_argument("--list", action="store_true", help="list the problems and exit")
    parser.add_argument("--budget-s", type=float, default=130.0, help="the whole run's seconds (default %(default)s)")
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    problems = [p for p in PROBLEMS if not args.match or args.match in p.name]
    if args.list:
        for problem in problems:
            print(f"{problem.name:44} {'racecheck' if problem.race else ''}")
        return 0
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    tools = [tool for tool in args.tools.split(",") if tool]
    sanitizer = find_sanitizer()
    where = "on PATH, $CUDA_HOME/bin, /usr/local/cuda*/bin, site-packages/nvidia"
    print(f"compute-sanitizer: {sanitizer or f'NOT FOUND (looked {where}): memcheck and racecheck cannot run'}",
          flush=True)
    results: dict[str, PassResult | None] = {"plain": None, **dict.fromkeys(tools)}  # None: not run
    start = time.monotonic()
    passes = ["plain", *tools] if sanitizer else ["plain"]
    for index, tool in enumerate(passes):
        chosen = [p for p in problems if tool != "racecheck" or p.race]
        # This pass's share of the time left (a pass that ends early leaves its time to the next).
        share = SHARES.get(tool, 0.3) / sum(SHARES.get(t, 0.3) for t in passes[index:])
        results[tool] = run_pass(tool, chosen, sanitizer, out, (args.budget_s - (time.monotonic() - start)) * share)
        result = results[tool]
        print(f"{tool}: {len(result.outcomes)}/{len(chosen)} problems ran in {time.monotonic() - start:.0f} s, "
              f"{describe_count(result)}" + (f" (sanitizer summary: {result.summary_count})"
                                             if result.summary_count is not None else "")
              + (f"; {result.note}" if result.note else ""), flush=True)  # fmt: skip
    failed = False
    for tool, result in results.items():
        if result is None:
            continue
        for name, found in result.findings.items():
            shown = [finding for finding in found if not finding.dispatch]
            for finding in shown[:5]:
                print(f"  {tool} | {name} | {finding.text}" + (f" | {finding.kernel}" if finding.kernel else ""))
            if len(shown) > 5:
                print(f"  {tool} | {name} | ... {len(shown) - 5} more (log: {out}/sanitize-{tool}-*.log)")
            dispatch = sorted({finding.kernel for finding in found if finding.dispatch})
            if dispatch:
                print(f"  {tool} | {name} | {len(found) - len(shown)} hazards between Triton's warp-specialize "
                      f"state load and stores (not findings): {', '.join(dispatch)}")
            failed = failed or bool(shown)
        if result.undisplayed > 0:
            print(f"  {tool} | {result.undisplayed} hazards counted but not printed (not classified: findings)")
            failed = True
        unreached = [p.name for p in problems if (tool != "racecheck" or p.race) and p.name not in result.outcomes]
        if unreached and tool != "plain":
            print(f"  {tool} | {len(unreached)} problems not reached (not checked): {', '.join(unreached[:4])}"
                  + (", ..." if len(unreached) > 4 else ""))
            failed = True
        for name, (_, outcome) in result.outcomes.items():
            if outcome.startswith("error"):
                print(f"  {tool} | {name} | {outcome}")
                failed = True
            elif outcome.startswith("declined") and tool == "plain":
                print(f"  declined | {name} | {outcome[:200]}")
    print()
    if "racecheck" in tools:
        print("racecheck: findings, then \"+N ws\": hazards between Triton's warp-specialize state load and stores "
              "(scripts/warp_specialize_dispatch.py)")
    header = f"{'problem':44} {'plain':>8} " + " ".join(f"{tool:>12}" for tool in tools)
    print(header)
    for problem in problems:
        plain = results["plain"].outcomes.get(problem.name, ("", "not reached"))[1].split(":")[0]
        row = " ".join(f"{cell(results[tool], problem) if tool != 'racecheck' or problem.race else '':>12}"
                       for tool in tools)  # fmt: skip
        print(f"{problem.name:44} {plain:>8} {row}")
    totals = []
    for tool in tools:
        result = results[tool]
        if result is None:
            totals.append(f"{tool}: not run (no compute-sanitizer)")
            failed = True
            continue
        summary = "" if result.summary_count is None else f", sanitizer's summary {result.summary_count}"
        totals.append(f"{tool}: {describe_count(result)} in {len(result.outcomes)} problems{summary}")
    print("total: " + "; ".join(totals) + f"; {time.monotonic() - start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
