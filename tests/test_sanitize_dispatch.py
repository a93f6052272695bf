"""scripts/sanitize_gpu.py's racecheck pass: Triton's warp-specialize dispatch counted apart from findings.

On this CPU: the reference kernel (scripts/warp_specialize_dispatch.py) compiled for sm_90 with Triton's
bundled ptxas, its SASS read with Triton's nvdisasm, and racecheck reports written as compute-sanitizer
prints them (hazard mode, as on the H100 for the hopper kernels; analysis mode).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import sanitize_gpu  # noqa: E402
import warp_specialize_dispatch as dispatch  # noqa: E402

KERNEL = "warp_specialize_reference_kernel"
WINDOW = 0x400  # where the kernel's shared memory starts in racecheck's addresses on sm_90 (1 KiB reserved)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """(Triton cache dir holding the reference's sm_90 cubin, its dispatch accesses).

    Compiled in a child process: Triton's interpreter, which other tests run in this one, patches
    `triton.language` for its device-function calls and does not undo it, and a Gluon compile after that fails."""
    cache = tmp_path_factory.mktemp("triton_cache")
    scripts = Path(__file__).resolve().parents[1] / "scripts"
    child = subprocess.run(
        [sys.executable, "-c", "import warp_specialize_dispatch as d; print(d.compile_reference_sm90().metadata.num_warps)"],
        cwd=scripts, env={**os.environ, "TRITON_CACHE_DIR": str(cache)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr[-3000:]
    found = dispatch.cached_dispatch(KERNEL, str(cache))
    assert len(found) == 1, f"{KERNEL}.cubin not in the cache: {list(cache.rglob('*'))}"
    assert child.stdout.split()[-1] == "12"  # num_warps: 4 default + 4 + 1 workers, rounded up to warp groups
    return cache, found[0]


def hazard(address, write_pc, read_pc, reader, writer=31, kind="RAW"):
    """One racecheck report in hazard mode (--racecheck-report hazard --show-backtrace no)."""
    return [f"========= Error: Potential {kind} hazard detected at __shared__ {address:#x} in block (3,0,0) :",
            f"=========     Write Thread ({writer},0,0) at {KERNEL}+{write_pc:#x} in reference.py:60",
            f"=========     Read Thread ({reader},0,0) at {KERNEL}+{read_pc:#x} in reference.py:60",
            "=========     Current Value : 0", "========= "]


def classify(report, accesses) -> bool:
    address, found = dispatch.parse_accesses(report)
    return dispatch.is_dispatch_hazard(address, found, accesses)


def test_the_reference_kernels_sass_has_the_switch_loops_state_load_and_the_default_groups_stores(compiled):
    _, accesses = compiled
    # Worker warps 4..11 read byte load_offset + warp; the default group writes all 8 at once, to start the
    # partitions and again to make them exit.
    assert [store.width for store in accesses.stores] == [8, 8]
    assert {store.offset for store in accesses.stores} == {accesses.load_offset + 4}
    assert all(store.pc > accesses.load_pc for store in accesses.stores)


def test_a_hazard_between_the_dispatchs_store_and_load_is_the_dispatchs_on_every_worker_warps_byte(compiled):
    _, accesses = compiled
    for store in accesses.stores:
        for warp in range(4, 12):
            address = WINDOW + accesses.load_offset + warp
            assert classify(hazard(address, store.pc, accesses.load_pc, reader=32 * warp), accesses)
            assert classify(hazard(address, store.pc, accesses.load_pc, reader=32 * warp + 5, kind="WAR"), accesses)


def test_anything_else_is_a_finding(compiled):
    _, accesses = compiled
    store, load = accesses.stores[0], accesses.load_pc
    warp = 6
    address = WINDOW + accesses.load_offset + warp
    assert not classify(hazard(address, store.pc + 0x10, load, reader=32 * warp), accesses)  # another store
    assert not classify(hazard(address, store.pc, load + 0x10, reader=32 * warp), accesses)  # another load
    assert not classify(hazard(address + 1, store.pc, load, reader=32 * warp), accesses)  # another warp's byte
    assert not classify(hazard(address + 0x80, store.pc, load, reader=32 * warp), accesses)  # past the state
    assert not classify(hazard(address + 0x200, store.pc, load, reader=32 * warp), accesses)  # no window
    assert not classify(["========= Error: Potential RAW hazard detected at __shared__ 0x410 in block (0,0,0) :"],
                        accesses)  # no access lines: nothing shows it is the dispatch's


def test_an_analysis_report_is_judged_by_its_instructions_alone(compiled):
    _, accesses = compiled
    store, load = accesses.stores[1], accesses.load_pc
    report = [f"========= Error: Race reported between Write access at {KERNEL}+{store.pc:#x} in reference.py:60",
              f"=========     and Read access at {KERNEL}+{load:#x} in reference.py:60 [24 hazards]"]
    assert classify(report, accesses)
    report[1] = report[1].replace(f"+{load:#x}", f"+{load + 0x20:#x}")
    assert not classify(report, accesses)


def test_the_script_counts_the_dispatchs_hazards_apart_and_fails_only_on_the_rest(compiled, monkeypatch):
    cache, accesses = compiled
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    store, load = accesses.stores[0], accesses.load_pc
    dispatch_hazards = [line for warp in (4, 9) for line in hazard(WINDOW + accesses.load_offset + warp, store.pc,
                                                                    load, reader=32 * warp)]
    real = hazard(WINDOW + 0x40, 0x1230, 0x1450, reader=140)  # two other instructions, another address
    log = "\n".join([
        "========= COMPUTE-SANITIZER",
        f"{sanitize_gpu.MARK} start reference", *dispatch_hazards,
        f"{sanitize_gpu.MARK} end reference | 0.1 s | ok",
        f"{sanitize_gpu.MARK} start racy", *dispatch_hazards, *real,
        f"{sanitize_gpu.MARK} end racy | 0.1 s | ok",
        "========= RACECHECK SUMMARY: 5 hazards displayed (5 errors, 0 warnings)",
    ])
    result = sanitize_gpu.PassResult()
    sanitize_gpu.parse(log, result)
    sanitize_gpu.classify_dispatch(result)
    problem = {name: sanitize_gpu.Problem(name) for name in ("reference", "racy")}
    assert sanitize_gpu.cell(result, problem["reference"]) == "0 +2 ws"
    assert sanitize_gpu.cell(result, problem["racy"]) == "1 +2 ws"
    assert (result.count(), result.count(dispatch=True), result.undisplayed) == (1, 4, 0)
    assert sanitize_gpu.describe_count(result) == "1 findings (+4 hazards of the warp-specialize dispatch)"

    # A hazard racecheck counted but did not print cannot be classified: a finding.
    result = sanitize_gpu.PassResult()
    sanitize_gpu.parse(log.replace("(5 errors", "(7 errors"), result)
    sanitize_gpu.classify_dispatch(result)
    assert result.undisplayed == 2
    assert sanitize_gpu.describe_count(result).startswith("3 findings (2 not printed)")
