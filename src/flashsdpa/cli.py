"""Command line: `flashsdpa check`, `flashsdpa info`, `flashsdpa bench`."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time


CHECK_DTYPES = ("float32", "float16", "bfloat16")


def _device(name: str | None):
    import torch

    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cmd_check(args) -> int:
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    from flashsdpa.check import HEADER, format_row, run_check

    names = [name.strip() for name in args.dtypes.split(",") if name.strip()]
    unknown = [name for name in names if name not in CHECK_DTYPES]
    if unknown or not names:
        print(f"flashsdpa check: --dtypes takes {', '.join(CHECK_DTYPES)}, got {args.dtypes!r}", file=sys.stderr)
        return 2
    device = _device(args.device)
    print(f"flashsdpa check on {device} ({_device_name(device)}), torch {torch.__version__}", flush=True)
    print(HEADER + "\n" + "-" * len(HEADER), flush=True)
    passed = failed = declined = 0
    calls_s, start = 0.0, time.perf_counter()
    for row in run_check(device, quick=args.quick, dtypes=[getattr(torch, name) for name in names]):
        print(format_row(row), flush=True)
        declined += bool(row.note) and row.ok
        passed += row.ok and not row.note
        failed += not row.ok
        calls_s += row.seconds if row.what == "out" else 0.0  # one "out" row per flashsdpa call
    print(f"\n{passed} passed, {failed} failed, {declined} declined (served by another backend) in "
          f"{time.perf_counter() - start:.0f} s, {calls_s:.0f} s of them in flashsdpa's calls (on a GPU mostly "
          "Triton compiling each kernel variant's first call; the rest: inputs, float64 and torch references)")
    return 1 if failed else 0


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def cmd_info(args) -> int:
    import torch

    import flashsdpa
    from flashsdpa import dispatch
    from flashsdpa.descriptor import AttentionDescriptor

    device = _device(args.device)
    print(f"flashsdpa {flashsdpa.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    print(f"device: {device} ({_device_name(device)})")
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        probe = AttentionDescriptor((1,), 1, 1, 128, 128, 64, 64, dtype, device.type)
        for name in dispatch.backend_names():
            reasons = dispatch.get_backend(name).unsupported_reasons(probe, device)
            status = "usable" if not reasons else "not usable: " + "; ".join(reasons)
            print(f"  {name:9} {str(dtype):15} {status}")
    return 0


def cmd_bench(argv: list[str]) -> int:
    from flashsdpa.bench import main as bench_main

    return bench_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        return cmd_bench(argv[1:])
    parser = argparse.ArgumentParser(prog="flashsdpa")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate every backend against float64 and torch's own error")
    check.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    check.add_argument("--quick", action="store_true", help="fewer sizes")
    check.add_argument("--interpret", action="store_true", help="also run the Triton kernels on CPU (interpreter)")
    check.add_argument("--dtypes", default=",".join(CHECK_DTYPES),
                       help="comma-separated, of %(default)s (one per process spreads a GPU's first-call "
                       "compiles over the host's cores)")  # fmt: skip
    check.set_defaults(func=cmd_check)
    info = sub.add_parser("info", help="versions, device and which backends are usable")
    info.add_argument("--device")
    info.set_defaults(func=cmd_info)
    sub.add_parser("bench", help="benchmark against torch's SDPA backends and FlexAttention (see bench --help)")
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
