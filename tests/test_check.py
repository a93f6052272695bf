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


def test_variant_rows_pass_on_tiled_and_triton():
    """Every variant row (window, alignment, softcap, ALiBi, sinks and their gradients) against the formula."""
    from flashsdpa.check import gradient_cases, variant_cases

    cases = [c for c in variant_cases() if c.name == "every variant GQA"]
    cases += [c for c in gradient_cases() if c.has_variants]
    for case in cases:
        rows = run_case(case, "tiled", torch.float16, torch.device("cpu"), case.name.startswith("grad"), 2)
        assert all(r.ok for r in rows) and len(rows) >= 1, rows
        assert ("dsinks" in [r.what for r in rows]) == (case.sinks and case.name.startswith("grad"))
    (row,) = run_case(cases[0], "triton", torch.float16, torch.device("cpu"), False, 2)
    assert row.ok and not row.note.startswith("declined:"), row
