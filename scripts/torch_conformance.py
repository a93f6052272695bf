"""Run PyTorch's own SDPA tests with and without `flashsdpa.enable()`; print the tests that fail only with it.

    PYTHONPATH=src python scripts/torch_conformance.py /path/to/pytorch [--sample 64 | --whole] [-n 2] [--math]

The tests are the CPU classes (`...CPU`) of `test/test_transformers.py` in the
given PyTorch source tree, which should match the installed torch version (a
`git archive` of the tag is enough: `git archive v2.13.0 test | tar -x -C DIR`).
The file is PyTorch's: it is read from that tree, never copied here. PyTorch's
test utilities need `expecttest` (`pip install -e ".[conformance]"`).

Each run is one pytest process in the tree's `test/` directory, with this file
as a plugin (`-p torch_conformance`): it keeps the CPU classes, samples every
large parametrized grid (the `..._mask_vs_math_...` grid has thousands of
cases) deterministically — the same cases every run, on every machine: those
whose sha256 of the test id sorts first — and, in the second run, calls
`flashsdpa.enable()` before the first test. With `--math` both runs make every
call under `sdpa_kernel([SDPBackend.MATH])` (a test's own `sdpa_kernel` still
wins inside it): the calls flashsdpa hands to torch's math path, compared with
plain torch's. Outcomes come from pytest's JUnit XML (`--xml-dir` keeps them).
A test "fails only with flashsdpa" when it passes (or is skipped) without it
and fails or errors with it. Expected differences (EXPECTED below) are
listed apart, with their reason; the exit status is 1 when any other test
differs.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import inspect
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

ENABLE_ENV = "FLASHSDPA_CONFORMANCE_ENABLE"
MATH_ENV = "FLASHSDPA_CONFORMANCE_MATH"  # "1": every test runs under sdpa_kernel([SDPBackend.MATH])
SAMPLE_ENV = "FLASHSDPA_CONFORMANCE_SAMPLE"  # cases kept of each large grid; "0" keeps every case
DEFAULT_SAMPLE = 64
LARGE_GRID = 256  # a test function with more parametrized cases than this is sampled
TEST_FILE = "test_transformers.py"

# Tests that differ with flashsdpa by design, all for one reason: they replay torch's dropout RNG stream,
# and flashsdpa draws its own (equally distributed) pattern. (pattern on the test id, what the test does)
EXPECTED = [
    (re.compile(r"dropout", re.IGNORECASE), "compares dropout output with torch's own mask"),
    (
        re.compile(r"test_transformerencoderlayer_subclass(_model)?_"),
        "compares a train-mode layer (attention dropout 0.1) run eagerly, on flashsdpa, with its TorchScript "
        "copy, which calls torch's operator, after the same manual_seed",
    ),
]


# ---- the pytest plugin (imported by the pytest runs, in the tree's test/ directory) -----------------


def _function_of(item) -> str:
    """The test function an item instantiates. PyTorch's `parametrize` makes one unittest method per case
    (`test_x_a_0_b_1_cpu`), each wrapping the function it was written as (`functools.wraps`)."""
    function = inspect.unwrap(getattr(item, "function", None) or item.obj)
    return f"{item.cls.__name__ if item.cls else ''}::{getattr(function, '__qualname__', item.name)}"


def _rank(nodeid: str) -> str:
    return hashlib.sha256(nodeid.encode()).hexdigest()


def pytest_collection_modifyitems(session, config, items):
    sample = int(os.environ.get(SAMPLE_ENV, str(DEFAULT_SAMPLE)))
    cpu = [item for item in items if item.cls is not None and item.cls.__name__.endswith("CPU")]
    by_function = collections.defaultdict(list)
    for item in cpu:
        by_function[_function_of(item)].append(item)
    kept = set()
    for cases in by_function.values():
        if sample and len(cases) > LARGE_GRID:
            cases = sorted(cases, key=lambda item: _rank(item.nodeid))[:sample]
        kept.update(id(item) for item in cases)
    deselected = [item for item in items if id(item) not in kept]
    items[:] = [item for item in items if id(item) in kept]
    config.hook.pytest_deselected(items=deselected)


def pytest_sessionstart(session):
    if os.environ.get(ENABLE_ENV) == "1":
        import flashsdpa

        flashsdpa.enable()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    if os.environ.get(MATH_ENV) != "1":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


# ---- the driver -------------------------------------------------------------------------------------


def run_suite(test_dir: Path, enabled: bool, sample: int, workers: int, extra: list[str], xml: Path,
              math_only: bool = False) -> int:  # fmt: skip
    env = dict(os.environ)
    env[ENABLE_ENV] = "1" if enabled else "0"
    env[MATH_ENV] = "1" if math_only else "0"
    env[SAMPLE_ENV] = str(sample)
    # this file (the plugin) and flashsdpa importable from the tree's test/ directory
    scripts = Path(__file__).resolve().parent
    paths = [str(scripts), *(str(Path(p).resolve()) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)]
    if (scripts.parent / "src" / "flashsdpa").is_dir():  # after the caller's: a PYTHONPATH given wins
        paths.append(str(scripts.parent / "src"))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    command = [
        sys.executable, "-m", "pytest", TEST_FILE, "-p", "torch_conformance", "-p", "no:cacheprovider",
        "-q", "-rN", "--tb=line", f"--junitxml={xml}", *(["-n", str(workers)] if workers > 1 else []), *extra,
    ]  # fmt: skip
    label = ("with flashsdpa" if enabled else "plain torch") + (", under sdpa_kernel([MATH])" if math_only else "")
    print(f"[{label}] {' '.join(command)}", flush=True)
    return subprocess.call(command, cwd=test_dir, env=env)


def outcomes(xml: Path) -> dict[str, str]:
    """test id -> passed / failed / error / skipped, from pytest's JUnit XML."""
    result = {}
    for case in ElementTree.parse(xml).getroot().iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = {child.tag for child in case}
        result[test_id] = next((k for k in ("error", "failure", "skipped") if k in kinds), "passed")
        result[test_id] = {"failure": "failed"}.get(result[test_id], result[test_id])
    return result


def expected_reason(test_id: str) -> str | None:
    return next((reason for pattern, reason in EXPECTED if pattern.search(test_id)), None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pytorch", type=Path, help="a PyTorch source tree (its test/ directory is enough)")
    grid = parser.add_mutually_exclusive_group()
    grid.add_argument("--sample", type=int, default=DEFAULT_SAMPLE, help="cases kept of each large grid")
    grid.add_argument("--whole", action="store_true", help="run every case of every grid")
    parser.add_argument("-n", "--workers", type=int, default=1, help="pytest-xdist workers per run")
    parser.add_argument("--only", choices=["plain", "flashsdpa"], help="one run only (outcomes are printed)")
    parser.add_argument("--math", action="store_true", help="every test under sdpa_kernel([SDPBackend.MATH])")
    parser.add_argument(
        "--xml-dir", type=Path,
        help="keep each run's JUnit XML here (plain.xml, flashsdpa.xml; plain-math.xml, ... with --math); a run "
        "whose XML is already there is not run again, so the two runs can be made apart (e.g. --only plain first)",
    )  # fmt: skip
    parser.epilog = "Arguments after -- go to both pytest runs, e.g. -- -k mask_vs_math"
    argv = sys.argv[1:] if argv is None else list(argv)
    pytest_args = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)

    test_dir = args.pytorch / "test"
    if not (test_dir / TEST_FILE).is_file():
        parser.error(f"{test_dir / TEST_FILE} not found: give the root of a PyTorch source tree")
    sample = 0 if args.whole else args.sample
    runs = {"plain": False, "flashsdpa": True}
    if args.only:
        runs = {args.only: runs[args.only]}
    results = {}
    suffix = "-math" if args.math else ""
    with tempfile.TemporaryDirectory() as scratch:
        xml_dir = args.xml_dir or Path(scratch)
        xml_dir.mkdir(parents=True, exist_ok=True)
        for name, enabled in runs.items():
            xml = xml_dir / f"{name}{suffix}.xml"
            if args.xml_dir is not None and xml.is_file():
                print(f"[{name}] outcomes read from {xml} (not run again)", flush=True)
            else:
                run_suite(test_dir, enabled, sample, args.workers, pytest_args, xml, args.math)
            results[name] = outcomes(xml)
        for name in ("plain", "flashsdpa"):  # the other run's XML, when kept from before
            if name not in runs and args.xml_dir is not None and (args.xml_dir / f"{name}{suffix}.xml").is_file():
                results[name] = outcomes(args.xml_dir / f"{name}{suffix}.xml")

    for name, result in results.items():
        counts = collections.Counter(result.values())
        print(f"{name}: {len(result)} tests, " + ", ".join(f"{counts[k]} {k}" for k in sorted(counts)))
    if len(results) < 2:
        return 0
    plain, with_flashsdpa = results["plain"], results["flashsdpa"]
    broken = sorted(
        test for test, outcome in with_flashsdpa.items()
        if outcome in ("failed", "error") and plain.get(test) in ("passed", "skipped")
    )  # fmt: skip
    unexpected = [test for test in broken if expected_reason(test) is None]
    print(f"\n{len(broken)} tests fail only with flashsdpa ({len(broken) - len(unexpected)} expected):")
    for test in broken:
        reason = expected_reason(test)
        print(f"  {'expected' if reason else 'FAILS   '} {test}" + (f"  (dropout RNG: {reason})" if reason else ""))
    fixed = sorted(t for t, o in with_flashsdpa.items() if o == "passed" and plain.get(t) in ("failed", "error"))
    if fixed:
        print(f"\n{len(fixed)} tests fail on plain torch only:")
        for test in fixed:
            print(f"  {test}")
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
