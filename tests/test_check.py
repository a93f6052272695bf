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


def test_cli_runs_the_dtypes_asked_and_reports_its_time(monkeypatch, capsys):
    """`--dtypes` passes on its dtypes (one per process splits a GPU's compiles); a name it does not take is an
    error before anything runs; the last line gives the seconds in flashsdpa's calls."""
    from flashsdpa import check, cli

    asked = []

    def run_check(device, quick=False, dtypes=None):
        asked.append(dtypes)
        yield check.Row("case", "tiled", "float16", "out", 0.0, 1e-4, 1e-4, 1e-3, True, seconds=2.6)
        yield check.Row("case", "tiled", "float16", "dq", 0.0, 1e-4, 1e-4, 1e-3, True, seconds=2.6)

    monkeypatch.setattr(check, "run_check", run_check)
    assert cli.main(["check", "--device", "cpu", "--dtypes", "float16,bfloat16"]) == 0
    assert asked == [[torch.float16, torch.bfloat16]]
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("2 passed, 0 failed, 0 declined (served by another backend) in ")
    assert ", 3 s of them in flashsdpa's calls" in last  # the one call's 2.6 s, counted once
    assert cli.main(["check", "--device", "cpu", "--dtypes", "float64"]) == 2 and len(asked) == 1


def test_the_main_job_passes_on_the_cpu():
    """`flashsdpa check` (README's main job) on this machine's CPU: every row within its bar, every decline
    expected (tiled and aten rows, the packed and paged rows, the variants and their gradients)."""
    from flashsdpa.check import run_check

    rows = list(run_check(torch.device("cpu")))
    failed = [r for r in rows if not r.ok]
    assert len(rows) > 400 and not failed, failed
