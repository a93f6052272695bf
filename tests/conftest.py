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


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda_only: needs a CUDA device (skipped without one)")


@pytest.fixture(scope="session")
def device() -> str:
    """Where every test's tensors live: the GPU when there is one, else the CPU (triton interpreted)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _clean_flashsdpa_state():
    """Each test starts with no pinned backend and zeroed stats, and leaves none behind."""
    from flashsdpa import dispatch

    assert dispatch.pinned_backend() is None, "a previous test leaked a use_backend pin"
    flashsdpa.reset_stats()
    yield
    flashsdpa.reset_stats()
