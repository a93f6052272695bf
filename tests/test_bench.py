"""`flashsdpa bench` on CPU: the tiny smoke matrix (`--smoke`) runs every code path in seconds; the CPU-sized
matrix, its peers and the model's size are checked without running them."""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
import types
import warnings

import pytest
import torch

from flashsdpa.bench import cases as case_matrix
from flashsdpa.bench import main, report
from flashsdpa.bench.estimate import Estimator
from flashsdpa.bench.peers import Peer
from flashsdpa.bench.runner import run_peer
from flashsdpa.bench.timing import CPU_SETTINGS, CUDA_SETTINGS, SLOW_PEER_MIN_REPS, Timer, TimingSettings, quantile

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def one_thread():
    # Tiny problems on a shared 2-core machine: several threads per op only contend.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def has_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def load(out) -> dict:
    return json.loads((out / "results.json").read_text())


def check_outputs(out, document):
    assert (out / "results.md").read_text().startswith("# flashsdpa bench")
    if has_matplotlib():
        assert (out / "results.png").read_bytes()[:8] == PNG_MAGIC
    meta = document["meta"]
    for key in ("date", "torch", "device", "device_name", "timing", "conventions"):
        assert meta.get(key) is not None, key


def test_quick_cpu_run_writes_rows_for_flashsdpa_and_math(tmp_path, one_thread):
    assert main(["--device", "cpu", "--smoke", "--quick", "--flex", "off", "--out", str(tmp_path)]) == 0
    document = load(tmp_path)
    check_outputs(tmp_path, document)
    cases = document["cases"]
    assert [c["group"] for c in cases] == ["main", "main"]
    assert {c["causal"] for c in cases} == {False, True}
    for case in cases:
        assert case["status"] == "ran"
        for mode in ("fwd", "bwd"):
            for peer in ("flashsdpa", "torch", "math"):
                entry = case["peers"][peer][mode]
                assert entry["status"] == "ok", (peer, mode, entry)
                assert entry["ms"] > 0 and entry["tflops"] > 0
                assert entry["peak_mib"] > 0
            assert case["ratios"]["math"][mode] > 0
            spread = case["peers"]["torch"][mode]["vs_primary"]  # timed interleaved with flashsdpa
            assert spread["p25"] <= case["ratios"]["torch"][mode] == spread["median"] <= spread["p75"]
            # Memory is a measurement (BENCHMARKS.md compares it with torch's); here only that math, which
            # materialises the scores, shows more of it than the fused kernel.
            peaks = {peer: case["peers"][peer][mode]["peak_mib"] for peer in ("flashsdpa", "math")}
            assert peaks["math"] > peaks["flashsdpa"], peaks
        assert case["peers"]["flashsdpa"]["notes"]["backend"] == "aten"
        assert case["peers"]["flashsdpa"]["first_call_s"]["fwd"] > 0
        verdict = case["check"]["flashsdpa"]
        assert verdict["ok"] and verdict["reference"] in ("flash", "math")
        assert set(verdict["rel_err_vs"]["math"]) == {"out", "dq", "dk", "dv"}
        # CUDA-only peers are left out on a CPU; one turned off is n/a with the reason.
        assert set(case["peers"]) == {"flashsdpa", "torch", "math", "flex"}
        assert case["peers"]["flex"]["fwd"] == {"status": "n/a", "reason": "FlexAttention turned off (--flex off)"}


def test_cpu_smoke_matrix_covers_every_group(tmp_path, one_thread):
    assert main(["--device", "cpu", "--smoke", "--flex", "off", "--out", str(tmp_path)]) == 0
    document = load(tmp_path)
    check_outputs(tmp_path, document)
    by_group = {}
    for case in document["cases"]:
        by_group.setdefault(case["group"], []).append(case)
    assert set(by_group) == {"main", "mask", "fp32", "decode", "variant", "varlen", "paged", "prefill", "decode-graph"}
    assert {c["mask"] for c in by_group["mask"]} == {"key_padding", "bias"}
    fp32 = by_group["fp32"][0]
    assert "flashsdpa-tf32" not in fp32["peers"]  # no tf32 on a CPU
    assert fp32["check"]["flashsdpa"]["max_rel_err"] < 1e-4
    decode = by_group["decode"][0]
    assert decode["modes"] == ["fwd"] and decode["enable_gqa"]
    assert decode["peers"]["flashsdpa"]["fwd"]["kv_tbps"] > 0
    assert decode["ratios"]["math"]["fwd"] > 0
    varlen = by_group["varlen"][0]  # issue 12: packed (real tokens), paged (shuffled pages, odd page sizes)
    assert varlen["modes"] == ["fwd", "bwd"] and varlen["peers"]["flashsdpa"]["fwd"]["tokens_per_s"] > 0
    assert "torch-varlen" not in varlen["peers"] and "math" in varlen["peers"]  # CUDA only; padded SDPA here
    assert {c["page_size"] for c in by_group["paged"]} == {16, 3}
    assert all(c["peers"]["flashsdpa"]["fwd"]["kv_tbps"] > 0 for c in by_group["paged"])
    graph = by_group["decode-graph"][0]  # issue 14: host time per call; the CUDA-graph peers need a GPU
    assert graph["peers"]["flashsdpa"]["fwd"]["kv_tbps"] > 0
    host = {key: graph["peers"]["flashsdpa"]["fwd"][key] for key in ("host_p20_us", "host_us", "host_p80_us")}
    assert 0 < host["host_p20_us"] <= host["host_us"] <= host["host_p80_us"], host
    assert "host_us" not in by_group["paged"][0]["peers"]["flashsdpa"]["fwd"]
    for peer in ("flashsdpa-graph", "flash-graph"):
        assert graph["peers"][peer]["fwd"] == {"status": "n/a",
                                               "reason": "CUDA graphs need a CUDA device (torch.cuda.CUDAGraph)"}
    for case in document["cases"]:
        assert case["check"]["flashsdpa"]["ok"], case["name"]
    markdown = (tmp_path / "results.md").read_text()
    for group in ("## main", "## mask", "## fp32", "## decode", "## decode-graph", "n/a:", "geometric mean"):
        assert group in markdown
    assert f" host {host['host_us']:.3g} us" in markdown


def test_time_budget_skips_cases_with_a_reason(tmp_path, one_thread, capsys):
    assert main(["--device", "cpu", "--smoke", "--quick", "--budget-s", "1e-6", "--out", str(tmp_path)]) == 0
    document = load(tmp_path)
    assert [c["status"] for c in document["cases"]] == ["skipped", "skipped"]
    assert "time budget" in document["cases"][0]["reason"]
    assert "--cases main/bf16-" in capsys.readouterr().out


def test_from_json_merges_runs(tmp_path, one_thread):
    first, second, merged = tmp_path / "a", tmp_path / "b", tmp_path / "merged"
    smoke = ["--device", "cpu", "--smoke", "--flex", "off"]
    assert main([*smoke, "--quick", "--cases", "causal", "--out", str(first)]) == 0
    assert main([*smoke, "--cases", "decode/", "--out", str(second)]) == 0
    arguments = ["--from-json", str(first / "results.json"), str(second / "results.json"), "--out", str(merged)]
    assert main(arguments) == 0
    document = load(merged)
    assert [c["group"] for c in document["cases"]] == ["main", "decode"]
    assert len(document["meta"]["merged_from"]) == 2
    check_outputs(merged, document)


def test_model_benchmark_is_reported(tmp_path, monkeypatch):
    calls = []

    def run_model_bench(device, dtype, progress=None, deadline=None, **size):
        calls.append((device, dtype, size))
        progress("step 1/1: 0.00 s")
        assert deadline is not None  # the CPU default budget holds for the model too
        return {"torch_sdpa_step_ms": 2.0, "flashsdpa_step_ms": 1.0, "ratio": 2.0}

    try:
        importlib.import_module("flashsdpa.integrations")
    except ImportError:
        monkeypatch.setitem(sys.modules, "flashsdpa.integrations", types.ModuleType("flashsdpa.integrations"))
    fake = types.ModuleType("flashsdpa.integrations.model_bench")
    fake.run_model_bench = run_model_bench
    fake.CPU_MODEL = {"layers": 1, "width": 128}  # what a CPU run passes on
    monkeypatch.setitem(sys.modules, "flashsdpa.integrations.model_bench", fake)
    assert main(["--device", "cpu", "--cases", "none", "--model", "--out", str(tmp_path)]) == 0
    document = load(tmp_path)
    assert calls == [(torch.device("cpu"), torch.bfloat16, fake.CPU_MODEL)]
    assert document["model"]["status"] == "ok" and document["model"]["ratio"] == 2.0
    assert document["cases"] == []


def test_plan_needs_no_gpu(capsys):
    assert main(["--plan", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "4 case(s) on cuda, flex static" in out
    assert "main/bf16-d128-L16384-causal" in out


def test_matrix_shapes_and_selection():
    full = case_matrix.full_cases()
    names = [c.name for c in full]
    assert len(names) == len(set(names)) == 72 + 2 + 4 + 4 + 5 + 2 + 8 + 2 + 3
    assert [c.name for c in case_matrix.select(full, "fp32")] == [
        "fp32/fp32-d128-L4096", "fp32/fp32-d128-L4096-causal", "fp32/fp32-d64-L4096", "fp32/fp32-d64-L4096-causal"]
    assert [c.name for c in case_matrix.quick_cases()] == [
        "main/bf16-d128-L4096",
        "main/bf16-d128-L16384-causal",
        "main/bf16-d64-L4096",
        "main/bf16-d128-L1024",
    ]
    for case in full:
        if case.group == "main":
            assert case.batch * case.seq_q == 16384 and case.heads_q * case.head_dim == 2048
    causal = next(c for c in full if c.name == "main/bf16-d128-L4096-causal")
    dense = next(c for c in full if c.name == "main/bf16-d128-L4096")
    assert dense.flops("fwd") == 4 * 4 * 16 * 4096 * 4096 * 128
    assert dense.flops("bwd") == 2.5 * dense.flops("fwd")
    assert causal.flops("fwd") == pytest.approx(dense.flops("fwd") / 2, rel=1e-3)
    decode = [c for c in full if c.group == "decode"]
    assert decode[0].kv_bytes == 2 * 16 * 8 * 4096 * 128 * 2
    varlen = next(c for c in full if c.name == "varlen/bf16-d128-B10-T16404-causal")  # FLOPs on real tokens
    per_sequence = sum(4 * 16 * 128 * n * (n + 1) / 2 for n in case_matrix.VARLEN_LENGTHS)
    assert varlen.flops("fwd") == per_sequence < varlen.batch * 4 * 16 * 128 * 8192 * 8193 / 2 / 5
    paged = [c for c in full if c.group == "paged"]
    assert {(c.seq_kv, c.page_size) for c in paged} == {(n, p) for n in (4096, 16384, 32768, 131072) for p in (16, 256)}
    assert paged[0].kv_bytes == decode[0].kv_bytes and paged[0].seq_q == 1
    graph = case_matrix.select(full, "decode-graph")
    assert [c.name for c in graph] == [
        "decode-graph/bf16-d128-B1-S4096-page16", "decode-graph/bf16-d128-B16-S4096-page16",
        "decode-graph/bf16-d128-B16-S32768-page256"]  # fmt: skip
    for case in graph:
        assert case.peers == ("flashsdpa", "flashsdpa-graph", "flash", "flash-graph") and case.modes == ("fwd",)
    assert [c.name for c in case_matrix.select(full, "main/fp16-d256-*-causal")] == [
        f"main/fp16-d256-L{n}-causal" for n in case_matrix.MAIN_SEQ_LENS
    ]
    assert len(case_matrix.select(full, "decode/,mask")) == 6 and len(case_matrix.select(full, "decode")) == 7
    assert case_matrix.select(full, "none") == []


def test_cpu_matrix():
    """CPU-sized cases with the peers a CPU has; --quick is the dense headline rows of issue 16."""
    quick = case_matrix.matrix("cpu", quick=True)
    assert len(quick) == 2 * 2 * 2 * 2  # dtype x head dim x causal x L
    assert {(c.dtype, c.head_dim, c.seq_q, c.causal) for c in quick} == {
        (dtype, d, length, causal) for dtype in (torch.float32, torch.bfloat16) for d in (64, 128)
        for length in (1024, 4096) for causal in (False, True)
    }  # fmt: skip
    full = case_matrix.matrix("cpu", quick=False)
    assert {c.group for c in full} == {"cpu", "cpu-mask", "cpu-variant"}
    assert {c.mask for c in full if c.group == "cpu-mask"} == {"key_padding", "bias"}
    assert {c.seq_q for c in full} == set(case_matrix.CPU_SEQ_LENS)
    variants = [c for c in full if c.group == "cpu-variant"]
    assert [c.name for c in variants if c.dtype == torch.float32] == [
        "cpu-variant/fp32-d64-L2048-causal-window256",
        "cpu-variant/fp32-d64-L2048-causal-softcap30",
        "cpu-variant/fp32-d64-L2048-causal-sinks",
        "cpu-variant/fp32-d64-L2048-causal-alibi",
    ]
    for case in full:
        assert case.peers == ("flashsdpa", "torch", "math", "flex") and case.backward
    for case in case_matrix.smoke_cases(quick=False):  # a CUDA-graph peer stays, to say why it did not run
        assert {p for p in case.peers if not p.endswith("-graph")} <= set(case_matrix.CPU_PEERS), case.name


def test_estimates_fit_the_lent_gpu_call():
    quick = Estimator(CUDA_SETTINGS, "cuda", "static")
    assert sum(quick.estimate(c) for c in case_matrix.quick_cases()) < 180
    full = Estimator(CUDA_SETTINGS, "cuda", "dynamic")
    cases = case_matrix.full_cases()
    assert sum(full.estimate(c) for c in cases if c.group != "variant") < 660
    variants = Estimator(CUDA_SETTINGS, "cuda", "static")  # `--cases variant` alone: 5 shapes, static Flex
    assert sum(variants.estimate(c) for c in case_matrix.select(cases, "variant")) < 300


def test_timer_interleaves_peers_round_by_round(monkeypatch):
    """Each round runs every peer once, in a rotating order, on the round's input set; the ratio is per round;
    a slow peer runs fewer rounds; a peer that raises drops out with its exception. (On a clock the calls
    advance themselves: a shared machine's noise has no say.)"""
    from flashsdpa.bench import timing

    clock = [0.0]
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    settings = TimingSettings(warmup_ms=0.0, rep_ms=40.0, min_reps=5, max_reps=9, flush_bytes=0)
    timer = Timer(torch.device("cpu"), settings)
    log = []

    def sleeper(name, seconds, index):
        def call():
            log.append((name, index))
            clock[0] += seconds

        return call

    def failing():
        log.append(("broken", 0))
        if len([entry for entry in log if entry[0] == "broken"]) > 2:
            raise RuntimeError("gave up")

    calls = {
        "primary": [sleeper("primary", 0.004, i) for i in range(2)],
        "close": [sleeper("close", 0.006, i) for i in range(2)],  # 1.5x: within SLOW_PEER_FACTOR (4)
        "slow": [sleeper("slow", 0.08, i) for i in range(2)],
        "broken": [failing, failing],
    }
    result = timer.interleaved(calls, "primary")
    assert set(result.measurements) == {"primary", "close", "slow"}
    assert str(result.failures["broken"]) == "gave up"
    rounds = result.measurements["primary"].reps
    assert 5 <= rounds <= 9 and result.measurements["close"].reps == rounds
    assert result.measurements["slow"].reps == SLOW_PEER_MIN_REPS  # 3 runs of 80 ms exceed the 40 ms of rounds
    assert result.ratios["close"].median == result.ratios["close"].p25 == result.ratios["close"].p75 == pytest.approx(1.5)
    assert result.measurements["slow"].median_ms == pytest.approx(80.0)
    assert result.ratios["close"].rounds == rounds
    # Both input sets were used, and the order rotates: without rotation the two would strictly alternate
    # (primary, close, primary, close, ...); rotated, each follows itself across a round's boundary.
    assert {i for name, i in log if name == "primary"} == {0, 1}
    pair = [name for name, _ in log if name in ("primary", "close")]
    neighbours = set(zip(pair, pair[1:]))
    assert ("primary", "primary") in neighbours and ("close", "close") in neighbours
    assert quantile([1.0, 2.0, 3.0], 0.5) == 2.0


def test_report_of_a_full_matrix_document():
    """The tables and summary over every case name of the real matrix (synthetic numbers)."""
    cases = []
    for index, case in enumerate(case_matrix.full_cases()):
        entry = case.describe()
        if index % 10 == 9:
            entry.update(status="skipped", reason="time budget", peers={}, ratios={}, check={})
        else:
            peers = {
                name: {mode: {"status": "ok", "ms": 1.0 + i, "tflops": 100.0 / (1 + i), "kv_tbps": 1.0}
                       for mode in case.modes}
                for i, name in enumerate(case.peers)
            }
            peers["flash"] = {mode: {"status": "n/a", "reason": "No available kernel"} for mode in case.modes}
            ratios = {name: {mode: 1.0 + i for mode in case.modes} for i, name in enumerate(case.peers) if i}
            check = {"flashsdpa": {"reference": "cudnn", "tolerance": 2e-2, "max_rel_err": 3e-3, "ok": True,
                                   "rel_err_vs": {"cudnn": {"out": 3e-3}}}}
            entry.update(status="ran", peers=peers, ratios=ratios, check=check)
        cases.append(entry)
    document = {"schema": 1, "meta": {"date": "2026-11-25T00:00:00+00:00", "device": "cuda", "device_name": "H100",
                                      "torch": "2.11", "flashsdpa": "0.1.0"}, "cases": cases, "model": None}
    markdown = report.markdown(document)
    assert markdown.count("| bf16 d=128 L=4096 |") == 2  # fwd and bwd rows
    assert "flash: No available kernel" in markdown
    assert "skipped: time budget" in markdown
    assert report.failures(document) == []
    assert any("cudnn 2.00x" in line for line in report.summary_lines(document))


class _NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query):
        return query.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("No available kernel. Aborting execution.")


class _ForwardOnlyPeer(Peer):
    name = "forward-only"

    def prepare(self, case, device):
        return lambda inputs: _NoBackward.apply(inputs.query)


class _RefusingPeer(Peer):
    name = "refusing"

    def prepare(self, case, device):
        def forward(inputs):
            warnings.warn("Flash attention does not support this input")
            raise RuntimeError("No available kernel. Aborting execution.")

        return forward


def test_a_refusing_peer_is_recorded_with_its_reason():
    case = case_matrix.smoke_cases(quick=True)[0]
    sets = case_matrix.make_input_sets(case, torch.device("cpu"), 1, seed=0)
    timer = Timer(torch.device("cpu"), CPU_SETTINGS)
    half = run_peer(_ForwardOnlyPeer(), case, sets, timer, torch.device("cpu"))
    assert half.modes["fwd"]["status"] == "ok" and half.modes["fwd"]["tflops"] > 0
    assert half.modes["bwd"] == {"status": "n/a", "reason": "RuntimeError: No available kernel. Aborting execution."}
    refused = run_peer(_RefusingPeer(), case, sets, timer, torch.device("cpu"))
    for mode in ("fwd", "bwd"):
        assert refused.modes[mode]["status"] == "n/a"
        assert "does not support this input" in refused.modes[mode]["reason"]


def test_variant_rows_run_and_report(tmp_path, one_thread):
    """Window, softcap, sinks and ALiBi rows: flashsdpa and math run them, checked against float64; torch's SDPA
    is n/a with its reason; FLOPs count the visible pairs only."""
    assert main(["--device", "cpu", "--smoke", "--cases", "variant", "--flex", "off", "--out", str(tmp_path)]) == 0
    document = load(tmp_path)
    cases = {tuple(c["variants"])[0]: c for c in document["cases"]}
    assert set(cases) == {"window16", "softcap30", "sinks", "alibi"}
    for case in cases.values():
        assert case["status"] == "ran" and case["causal"]
        for mode in ("fwd", "bwd"):
            assert case["peers"]["flashsdpa"][mode]["status"] == "ok", case["name"]
            assert case["peers"]["math"][mode]["status"] == "ok", case["name"]
            assert "no argument for" in case["peers"]["torch"][mode]["reason"]
        verdict = case["check"]["flashsdpa"]
        assert verdict["reference"] == "float64" and verdict["ok"], case["name"]
        assert set(verdict["rel_err_vs"]["float64"]) == {"out", "dq", "dk", "dv"}
        assert verdict["rel_err_vs"]["math"]["out"] < 1e-5
    causal_pairs = 64 * 65 // 2
    window_pairs = causal_pairs - (64 - 17) * (64 - 16) // 2  # keys more than 16 before the query are hidden
    assert cases["window16"]["flops"]["fwd"] == 2 * 2 * 16 * 2 * window_pairs
    assert cases["alibi"]["flops"]["fwd"] == 2 * 2 * 16 * 2 * causal_pairs
    markdown = (tmp_path / "results.md").read_text()
    assert "## variant" in markdown and "causal window16" in markdown


def test_flex_peer_compiles_each_variant_with_symbolic_sizes(monkeypatch):
    """The Flex peer's calls (mask_mod, score_mod, sinks through the log-sum-exp) under the bench's dynamic compile
    give the variant's float64 formula, output and gradients. Compiled with fullgraph=True, so a graph break
    inside Flex's op fails here: a float captured by the score_mod (softcap) did, where CUDA's compile of the
    training path failed ("all unwrapped values must be FakeTensor"). The CPU refuses Flex's backward before
    tracing it; with that check lifted, it traces the training path a GPU compiles (aot_eager: no inductor)."""
    import torch.nn.attention.flex_attention as flex_module

    from flashsdpa.bench.peers import flex_forward, raise_recompile_limit, variant_bias, variant_math

    monkeypatch.setattr(flex_module, "_validate_device", lambda *tensors: None)
    raise_recompile_limit()
    flex = torch.compile(flex_module.flex_attention, dynamic=True, fullgraph=True, backend="aot_eager")
    device = torch.device("cpu")
    for case in case_matrix.select(case_matrix.smoke_cases(quick=False), "variant"):
        inputs = case_matrix.make_input_sets(case, device, 1, seed=3)[0]
        out = flex_forward(case, device, flex)(inputs)
        grads = torch.autograd.grad(out, inputs.differentiable, inputs.grad_out)
        q, k, v = (t.detach().double().requires_grad_() for t in inputs.differentiable)
        sinks = None if inputs.sinks is None else inputs.sinks.double()
        exact = variant_math(case, q, k, v, variant_bias(case, device, torch.float64), sinks)
        exact_grads = torch.autograd.grad(exact, (q, k, v), inputs.grad_out.double())
        for name, mine, theirs in zip(("out", "dq", "dk", "dv"), (out, *grads), (exact, *exact_grads)):
            assert (mine.double() - theirs).norm() / theirs.norm() < 1e-5, (case.name, name)


def test_cuda_graph_peer_captures_each_input_set_once_and_replays_it(monkeypatch):
    """The graph peer captures one graph per input set (its first call) and answers every later call of that set
    with a replay into the captured output (the capture itself needs a GPU: faked here by an eager call)."""
    from flashsdpa.bench import peers

    graphs = []

    class Graph:
        def __init__(self):
            self.replays = 0

        def replay(self):
            self.replays += 1

    def capture(call, device):
        graphs.append(Graph())
        return graphs[-1], call()

    monkeypatch.setattr(peers, "captured", capture)
    device = torch.device("cpu")
    case = case_matrix.select(case_matrix.smoke_cases(quick=False), "decode-graph")[0]
    sets = case_matrix.make_input_sets(case, device, 2, seed=1)
    peer = peers.CudaGraphPeer(peers.FlashSdpaPeer())
    assert peer.name == "flashsdpa-graph" and peer.backward_unavailable(case, device)
    assert peer.unavailable_reasons(case, device) == ["CUDA graphs need a CUDA device (torch.cuda.CUDAGraph)"]
    forward = peer.prepare(case, device)
    first, second, again = forward(sets[0]), forward(sets[1]), forward(sets[0])
    assert len(graphs) == 2 and [g.replays for g in graphs] == [2, 1] and again is first
    torch.testing.assert_close(second, peers.FlashSdpaPeer().prepare(case, device)(sets[1]), rtol=0, atol=0)


def test_float64_reference_of_a_variant_slices_batch_and_heads():
    """exact_run computes one batch item and key/value head group at a time: the same as the whole problem."""
    from flashsdpa.bench.peers import variant_bias, variant_math
    from flashsdpa.bench.runner import exact_run

    case = case_matrix.Case(group="variant", batch=2, heads_q=4, heads_kv=2, seq_q=19, seq_kv=19, head_dim=8,
                            dtype=torch.float32, peers=("flashsdpa",), causal=True, window=5, softcap=3.0,
                            alibi=True, sinks=True)  # fmt: skip
    device = torch.device("cpu")
    inputs = case_matrix.make_input_sets(case, device, 1, seed=5)[0]
    q, k, v = (t.detach().double().requires_grad_() for t in inputs.differentiable)
    whole = variant_math(case, q, k, v, variant_bias(case, device, torch.float64), inputs.sinks.double())
    grads = torch.autograd.grad(whole, (q, k, v), inputs.grad_out.double())
    sliced = exact_run(case, inputs, device)
    torch.testing.assert_close(sliced.out, whole, rtol=1e-12, atol=1e-12)
    for mine, theirs in zip(sliced.grads, grads):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)
