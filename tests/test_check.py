"""`flashsdpa check` rows: a backend's expected decline passes, any other refusal fails."""

from __future__ import annotations

import torch

from flashsdpa.backends.triton import TritonBackend
from flashsdpa.check import Case, run_case


def test_expected_decline_is_not_a_failure(device):
    (row,) = run_case(Case("d=256", (1, 1, 1, 4, 5, 256)), "triton", torch.float32, torch.device(device), False, 1)
    assert row.ok and row.note.startswith("declined:")


def test_unexpected_decline_is_a_failure(device, monkeypatch):
    monkeypatch.setattr(TritonBackend, "unsupported_reasons", lambda self, desc, dev: ["a regression refuses all"])
    (row,) = run_case(Case("small", (1, 1, 1, 4, 5, 8)), "triton", torch.float16, torch.device(device), False, 1)
    assert not row.ok and "unexpectedly" in row.note
