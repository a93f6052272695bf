"""Test-session setup: the Triton interpreter on machines without CUDA, and the `device` fixture.

TRITON_INTERPRET must be set before anything imports triton (flashsdpa does,
through its dispatcher), so it is set here, at the top of the first module
pytest imports. `import torch` alone does not import triton.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # No GPU: the triton backend's kernels run under Triton's interpreter (numpy).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import flashsdpa  # noqa: E402

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    from memory_bounds import install as check_interpreted_memory_accesses

    check_interpreted_memory_accesses()
    if os.environ.get("FLASHSDPA_TEST_SM90_SHAPES") == "1":
        # Interpret the H100's block shapes (and TMA paths) instead of the small
        # interpreter ones, to find out-of-bounds accesses that only those shapes
        # make. Accuracy assertions on bfloat16 do not hold in this mode (the
        # interpreter's bfloat16 dot is wrong; the H100 configs do not work around it).
        from flashsdpa.backends.triton import launch_backward, launch_forward, launch_paged

        launch_forward.device_capability = launch_backward.device_capability = lambda device: (9, 0)
        launch_paged.device_capability = lambda device: (9, 0)
        launch_forward.sm_count = launch_paged.sm_count = lambda device: 132


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda_only: needs a CUDA device (skipped without one)")


@pytest.fixture(scope="session")
def device() -> str:
    """Where every test's tensors live: the GPU when there is one, else the CPU (triton interpreted)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _cuda_faults_stay_in_their_test():
    """On CUDA, wait for each test's kernels; a fault ends this test process.

    A kernel fault (illegal address) is reported at the next synchronisation
    and leaves the CUDA context unusable, so every later test in the process
    would fail too. Synchronising here pins the fault on the test that caused
    it, and exiting lets pytest-xdist report that test as crashed and start a
    fresh worker for the rest.
    """
    yield
    if torch.cuda.is_available():
        try:
            torch.cuda.synchronize()
        except RuntimeError as fault:  # torch.AcceleratorError derives from RuntimeError
            if "PYTEST_XDIST_WORKER" not in os.environ:
                pytest.exit(f"CUDA fault in this test: {fault}", returncode=3)
            print(f"\nCUDA fault in this test; ending the process: {fault}", flush=True)
            os._exit(3)


@pytest.fixture(autouse=True)
def _clean_flashsdpa_state():
    """Each test starts with no pinned backend, zeroed stats and no call plans, and leaves none behind.
    (Plans take the backends' code as fixed for the process: a test that patches a backend must not meet
    another test's plans.)"""
    from flashsdpa import call_plans, dispatch

    assert dispatch.pinned_backend() is None, "a previous test leaked a use_backend pin"
    flashsdpa.reset_stats()
    call_plans.clear()
    yield
    flashsdpa.reset_stats()
