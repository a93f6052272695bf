"""Ring attention (flashsdpa.distributed) on 2 and 4 CPU processes over gloo.

Each world size is one spawn: every rank runs all of its cases (the same random
whole problems, from a seed), shards them, runs ring_attention forward and
backward, and gathers the outputs and gradients; every rank saves its results
(a failure on any rank fails the test) and the test process compares the
gathered tensors with the float64 oracle against torch's own error
(tests/helpers.py). The process group has a timeout and the test process
kills any rank still running past its own deadline, so a hung or failing rank
fails a test and never hangs the suite.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
import time
import traceback
from dataclasses import asdict, dataclass

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import flashsdpa
from flashsdpa.distributed import ring_attention, shard_sequence, unshard_sequence
from flashsdpa.distributed import layout as ring_layout
from helpers import assert_forward_close, assert_grad_close, assert_lse_close, generator, oracle, qkv, randn, torch_sdpa

GROUP_TIMEOUT_S = 60  # a rank waiting longer on another fails (gloo raises)
SPAWN_DEADLINE_S = 240  # the test kills whatever still runs after this
HUNG_GROUP_TIMEOUT_S = 3


@dataclass(frozen=True)
class RingCase:
    name: str
    dtype: str
    local_len: int  # per rank
    causal: bool
    layout: str
    heads_q: int = 2
    heads_kv: int = 2
    head_dim: int = 16
    head_dim_v: int = 16
    batch: int = 2
    scale: float | None = None
    key_lengths: tuple[int, ...] | None = None
    backend: str | None = None
    seed: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def whole(self, world: int):
        """The whole problem: q, k, v (B, H, L, E), grad_out, key_lengths (or None)."""
        gen = generator(1000 + self.seed)
        seq = self.local_len * world
        q, k, v = qkv((self.batch, self.heads_q), (self.batch, self.heads_kv), seq, seq, self.head_dim, gen,
                      self.torch_dtype, "cpu", head_dim_v=self.head_dim_v)
        grad_out = randn((self.batch, self.heads_q, seq, self.head_dim_v), gen, self.torch_dtype)
        lengths = None if self.key_lengths is None else torch.tensor(self.key_lengths)
        return q, k, v, grad_out, lengths

    def options(self) -> dict:
        return dict(causal=self.causal, scale=self.scale, enable_gqa=self.heads_q != self.heads_kv)


CASES = {
    2: [
        RingCase("fp32-causal-zigzag-gqa-oddchunk", "float32", 14, True, "zigzag", heads_q=4, heads_kv=2,
                 head_dim_v=8, scale=0.7, seed=1),
        RingCase("bf16-causal-zigzag", "bfloat16", 10, True, "zigzag", seed=2),
        RingCase("fp32-full-contiguous-odd-gqa-padded", "float32", 13, False, "contiguous", heads_q=6, heads_kv=2,
                 key_lengths=(26, 17), seed=3),
        RingCase("fp16-causal-contiguous-odd-padded", "float16", 9, True, "contiguous", key_lengths=(5, 0), seed=4),
        RingCase("bf16-causal-zigzag-triton", "bfloat16", 24, True, "zigzag", batch=1, backend="triton", seed=5),
    ],
    4: [
        RingCase("fp32-causal-zigzag-gqa", "float32", 6, True, "zigzag", heads_q=4, heads_kv=1, scale=2.0, seed=6),
        RingCase("bf16-causal-zigzag-oddchunk", "bfloat16", 10, True, "zigzag", seed=7),
        RingCase("fp32-causal-contiguous-odd-padded", "float32", 7, True, "contiguous", key_lengths=(19, 28), seed=8),
        RingCase("bf16-full-zigzag-gqa-padded", "bfloat16", 8, False, "zigzag", heads_q=4, heads_kv=2,
                 key_lengths=(21, 3), seed=9),
    ],
}


# --------------------------------------------------------------------------- the ranks


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world: int, port: int, timeout_s: float) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )  # fmt: skip


def _run_case(case: RingCase, world: int) -> dict:
    q, k, v, grad_out, lengths = case.whole(world)
    local = [shard_sequence(t, layout=case.layout).clone().requires_grad_() for t in (q, k, v)]
    out, lse = ring_attention(*local, layout=case.layout, key_lengths=lengths, backend=case.backend,
                              return_lse=True, **case.options())
    out.backward(shard_sequence(grad_out, layout=case.layout))
    gathered = [unshard_sequence(t, layout=case.layout) for t in (out, lse.unsqueeze(-1), *(t.grad for t in local))]
    return dict(zip(("out", "lse", "dq", "dk", "dv"), gathered))


def _ranks_disagree(world: int) -> str:
    """Rank 1 passes a longer slice: every rank must raise (validate), not hang."""
    rank = dist.get_rank()
    q = torch.randn(1, 1, 4 + 2 * (rank == 1), 8)
    try:
        ring_attention(q, q, q)
    except ValueError as error:
        return "ok" if "rank 1 of the group was called with" in str(error) or "this rank (1)" in str(error) else str(error)
    return "no error"


def _inside_torch_context_parallel(world: int) -> str:
    """torch's experimental context_parallel shards buffers head-tail, as layout="zigzag" does, and
    ring_attention on its shards gives the whole sequence's attention ("ok", or what differed)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel

    mesh = init_device_mesh("cpu", (world,))
    gen = generator(31)
    q, k, v = qkv((1, 4), (1, 2), 4 * world, 4 * world, 8, gen, torch.float32, "cpu")
    whole = flashsdpa.attention(q, k, v, causal=True, enable_gqa=True)
    buffers = [t.clone() for t in (q, k, v)]
    with context_parallel(mesh, buffers=buffers, buffer_seq_dims=[2, 2, 2]):
        if not torch.equal(buffers[0], shard_sequence(q, layout="zigzag")):
            return "torch's shard differs from shard_sequence(layout='zigzag')"
        out = ring_attention(*buffers, causal=True, enable_gqa=True, layout="zigzag")
    error = ((out - shard_sequence(whole, layout="zigzag")).norm() / whole.norm()).item()
    return "ok" if error < 1e-6 else f"relative error {error:.3g}"


def _unshard_round_trip(world: int) -> str:
    """unshard_sequence inverts shard_sequence; its gradient sums every rank's gradient of the whole tensor."""
    for layout in ("zigzag", "contiguous"):
        whole = torch.randn(2, 3, 4 * world, 5, generator=generator(41))
        local = shard_sequence(whole, layout=layout).clone().requires_grad_()
        gathered = unshard_sequence(local, layout=layout)
        if not torch.equal(gathered, whole):
            return f"{layout}: unshard(shard(x)) != x"
        weight = torch.randn(whole.shape, generator=generator(42 + dist.get_rank()))  # differs per rank
        (gathered * weight).sum().backward()
        total = weight.clone()
        dist.all_reduce(total)
        if not torch.allclose(local.grad, shard_sequence(total, layout=layout)):
            return f"{layout}: gradient is not this rank's slice of the ranks' summed gradients"
    return "ok"


def _two_rings(world: int) -> str:
    """Ranks split into two groups of world/2, each its own ring on its own problem (group=)."""
    if world < 4:
        return "ok"
    half = world // 2
    groups = [dist.new_group(list(range(half))), dist.new_group(list(range(half, world)))]
    mine = dist.get_rank() // half
    group = groups[mine]
    q, k, v = qkv((1, 4), (1, 2), 4 * half, 4 * half, 8, generator(50 + mine), torch.float32, "cpu")
    local = [shard_sequence(t, group=group).clone().requires_grad_() for t in (q, k, v)]
    out = ring_attention(*local, group=group, causal=True, enable_gqa=True)
    out.sum().backward()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    whole = flashsdpa.attention(*leaves, causal=True, enable_gqa=True)
    whole.sum().backward()
    for name, got, ref in zip(("out", "dq", "dk", "dv"), (out, *(t.grad for t in local)),
                              (whole, *(t.grad for t in leaves))):
        error = ((got - shard_sequence(ref, group=group)).norm() / ref.norm()).item()
        if error > 1e-5:
            return f"group {mine}: {name} relative error {error:.3g}"
    return "ok"


def _worker(rank: int, world: int, port: int, cases: list, result_dir: str) -> None:
    try:
        _init(rank, world, port, GROUP_TIMEOUT_S)
        results = {}
        for case in cases:
            started = time.monotonic()
            try:
                results[case.name] = _run_case(case, world)
            except Exception:
                results[case.name] = traceback.format_exc()
            results[f"{case.name} seconds"] = time.monotonic() - started
        results["ranks disagree"] = _ranks_disagree(world)
        for name, check in (("torch context_parallel", _inside_torch_context_parallel),
                            ("unshard round trip", _unshard_round_trip), ("two rings", _two_rings)):
            try:
                results[name] = check(world)
            except Exception:
                results[name] = traceback.format_exc()
        # Every rank's results: the gathered tensors are equal on all, a failure may be one rank's alone.
        torch.save(results, os.path.join(result_dir, f"results{rank}.pt"))
        dist.destroy_process_group()
    except Exception:
        with open(os.path.join(result_dir, f"rank{rank}.error"), "w") as f:
            f.write(traceback.format_exc())
        raise


def _hanging_worker(rank: int, world: int, port: int, result_dir: str) -> None:
    """Rank 1 stalls before the ring's first exchange: rank 0 must fail by the group timeout, not hang."""
    _init(rank, world, port, HUNG_GROUP_TIMEOUT_S)
    q = torch.randn(1, 1, 4, 8)
    if rank == 1:
        time.sleep(60)  # killed by the test's deadline
    started = time.monotonic()
    try:
        ring_attention(q, q, q, validate=False)
        outcome = "returned"
    except Exception as error:  # gloo: a timeout
        outcome = f"raised {type(error).__name__} after {time.monotonic() - started:.1f}s: {error}"
    with open(os.path.join(result_dir, "rank0.outcome"), "w") as f:
        f.write(outcome)
    os._exit(0)  # the group cannot be torn down cleanly with a peer stalled


def _spawn(target, world: int, *args, deadline_s: float = SPAWN_DEADLINE_S) -> list[int | None]:
    """Start `world` ranks, wait up to the deadline, kill any still running; returns their exit codes."""
    # forkserver: one server process imports torch and flashsdpa once (a spawned rank costs seconds of
    # imports each); it never computes, so its forks start clean (no OpenMP threads to inherit). Python
    # 3.11's server does not take the parent's sys.path, so it preloads only installed modules.
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["flashsdpa.distributed", "torch.distributed", "pytest"])
    port = _free_port()
    processes = [context.Process(target=target, args=(rank, world, port, *args), daemon=True) for rank in range(world)]
    for p in processes:
        p.start()
    end = time.monotonic() + deadline_s
    for p in processes:
        p.join(max(0.0, end - time.monotonic()))
    codes = []
    for p in processes:
        if p.is_alive():
            p.kill()
            p.join(5)
            codes.append(None)
        else:
            codes.append(p.exitcode)
    return codes


def _script_worker(rank: int, world: int, port: int, result_dir: str, script: str, argv: list) -> None:
    """A script's main(argv) as torchrun would start it; its printout goes to rank<r>.out."""
    import contextlib
    import importlib.util

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), script)
    spec = importlib.util.spec_from_file_location(os.path.basename(script)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with open(os.path.join(result_dir, f"rank{rank}.out"), "w") as out, contextlib.redirect_stdout(out):
        module.main(argv)


@pytest.fixture(scope="module")
def ring_results(tmp_path_factory):
    """{world: {case name: gathered tensors or a traceback}}, one spawn per world size."""
    results = {}
    for world, cases in CASES.items():
        directory = tmp_path_factory.mktemp(f"ring{world}")
        codes = _spawn(_worker, world, cases, str(directory))
        errors = "".join(p.read_text() for p in sorted(directory.glob("*.error")))
        assert codes == [0] * world, f"{world} ranks exited with {codes} (None: killed at the deadline)\n{errors}"
        per_rank = [torch.load(directory / f"results{rank}.pt") for rank in range(world)]
        merged = dict(per_rank[0])
        for name in merged:  # a rank's failure (a string other than "ok") is the result
            for rank, theirs in enumerate(per_rank):
                if isinstance(theirs[name], str) and theirs[name] != "ok" and not name.endswith("seconds"):
                    merged[name] = f"rank {rank}: {theirs[name]}"
                    break
        results[world] = merged
        print(world, {n: round(t, 2) for n, t in merged.items() if n.endswith("seconds")})
    return results


# --------------------------------------------------------------------------- the checks


def _expected(case: RingCase, world: int):
    """float64 oracle (out, lse, dq, dk, dv) and torch's own (out, dq, dk, dv) at the input dtype."""
    q, k, v, grad_out, lengths = case.whole(world)
    mask = None if lengths is None else (torch.arange(q.shape[-2])[None, :] < lengths[:, None])[:, None, None, :]
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    out64, lse64 = oracle(*leaves64, attn_mask=mask, **case.options())
    out64.backward(grad_out.double())
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch_out = torch_sdpa(*leaves, mask, case.causal, case.scale, case.heads_q != case.heads_kv)
    torch_out.backward(grad_out)
    return (out64, lse64, *(t.grad for t in leaves64)), (torch_out, *(t.grad for t in leaves))


@pytest.mark.parametrize(
    "world, case", [(w, c) for w, cases in CASES.items() for c in cases], ids=lambda x: str(x) if isinstance(x, int) else x.name
)
def test_ring_attention_equals_whole_sequence_attention(ring_results, world, case):
    got = ring_results[world][case.name]
    assert not isinstance(got, str), f"{case.name} failed on the ranks:\n{got}"
    (out64, lse64, *grads64), (torch_out, *torch_grads) = _expected(case, world)
    what = f"{world} ranks {case.name}"
    assert got["out"].dtype == case.torch_dtype
    assert_forward_close(f"{what} out", got["out"], out64, torch_out, case.torch_dtype)
    assert_lse_close(got["lse"].squeeze(-1), lse64, case.torch_dtype)
    for name, mine, ref, theirs in zip(("dq", "dk", "dv"), (got["dq"], got["dk"], got["dv"]), grads64, torch_grads):
        assert mine.dtype == case.torch_dtype
        assert_grad_close(f"{what} {name}", mine, ref, theirs, case.torch_dtype)


@pytest.mark.parametrize("world", sorted(CASES))
def test_ranks_called_with_different_shapes_raise(ring_results, world):
    assert ring_results[world]["ranks disagree"] == "ok", ring_results[world]["ranks disagree"]


@pytest.mark.parametrize("world", sorted(CASES))
def test_ring_attention_runs_on_torch_context_parallel_shards(ring_results, world):
    assert ring_results[world]["torch context_parallel"] == "ok", ring_results[world]["torch context_parallel"]


@pytest.mark.parametrize("world", sorted(CASES))
def test_unshard_inverts_shard_and_its_gradient_sums_the_ranks(ring_results, world):
    assert ring_results[world]["unshard round trip"] == "ok", ring_results[world]["unshard round trip"]


def test_two_groups_run_their_own_rings(ring_results):
    assert ring_results[4]["two rings"] == "ok", ring_results[4]["two rings"]


def test_a_hung_rank_fails_the_others_and_is_killed(tmp_path):
    started = time.monotonic()
    codes = _spawn(_hanging_worker, 2, str(tmp_path), deadline_s=HUNG_GROUP_TIMEOUT_S + 3)
    assert codes == [0, None], f"exit codes {codes}: rank 0 should fail and exit, rank 1 be killed (None)"
    outcome = (tmp_path / "rank0.outcome").read_text()
    assert outcome.startswith("raised"), outcome
    assert time.monotonic() - started < HUNG_GROUP_TIMEOUT_S + 10


# --------------------------------------------------------------------------- one process (a group of 1)


@pytest.fixture
def group_of_one():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_one_rank_is_flashsdpa_bit_for_bit(group_of_one, layout):
    gen = generator(21)
    q, k, v = qkv((2, 4), (2, 2), 10, 10, 8, gen, torch.float32, "cpu")
    grad_out = randn((2, 4, 10, 8), gen)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = ring_attention(*leaves, causal=True, enable_gqa=True, layout=layout, scale=0.6)
    out.backward(grad_out)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = flashsdpa.attention(*ref_leaves, causal=True, enable_gqa=True, scale=0.6)
    ref.backward(grad_out)
    assert torch.equal(out, ref)
    for mine, theirs in zip(leaves, ref_leaves):  # the backward's local-statistics path: equal to rounding
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=2e-6, atol=2e-6)
    assert torch.equal(shard_sequence(q, layout=layout), q) and torch.equal(unshard_sequence(q, layout=layout), q)


def test_under_torch_compile_it_runs_as_a_graph_break(group_of_one):
    gen = generator(22)
    q, k, v = qkv((1, 2), (1, 2), 6, 6, 8, gen, torch.float32, "cpu")

    @torch.compile(backend="eager")
    def layer(q, k, v):
        return ring_attention(q * 2, k, v, causal=True).sum()

    torch.testing.assert_close(layer(q, k, v), flashsdpa.attention(q * 2, k, v, causal=True).sum())


@pytest.mark.parametrize(
    "kwargs, shapes, match",
    [
        (dict(attn_mask=torch.ones(4, 4, dtype=torch.bool)), None, "masks of full"),
        (dict(layout="ring"), None, "layout must be one of"),
        ({}, ((1, 2, 5, 8), (1, 2, 5, 8), (1, 2, 5, 8)), "zigzag.*must be even, got 5"),
        ({}, ((1, 2, 4, 8), (1, 2, 6, 8), (1, 2, 6, 8)), "one length"),
        ({}, ((1, 4, 4, 8), (1, 2, 4, 8), (1, 2, 4, 8)), "enable_gqa=True"),
        ({}, ((2, 2, 4, 8), (1, 2, 4, 8), (1, 2, 4, 8)), "same leading"),
        (dict(key_lengths=torch.tensor([3, 4, 5])), None, r"key_lengths must be an integer tensor of shape \(2,\)"),
        (dict(key_lengths=torch.tensor([3.0, 4.0])), None, "key_lengths must be an integer"),
    ],
)
def test_bad_input_is_named_before_anything_runs(kwargs, shapes, match):
    shapes = shapes or ((2, 2, 4, 8),) * 3
    q, k, v = (torch.randn(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        ring_attention(q, k, v, **kwargs)


def test_without_a_process_group_the_error_says_so():
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ring_attention(q, q, q)


@pytest.mark.parametrize("layout, world", [("zigzag", 2), ("zigzag", 4), ("contiguous", 3)])
def test_layouts_cover_the_sequence_once_and_zigzag_balances_causal_work(layout, world):
    layout = ring_layout.as_layout(layout)
    seq_local = 6
    positions = torch.cat([ring_layout.local_positions(layout, r, world, seq_local) for r in range(world)])
    assert torch.equal(positions.sort().values, torch.arange(seq_local * world))
    whole = torch.arange(seq_local * world, dtype=torch.float32)[:, None]
    for r in range(world):
        assert torch.equal(ring_layout.local_positions(layout, r, world, seq_local).float()[:, None],
                           shard_sequence_as(whole, layout, r, world))
    # Pairs each rank attends (causal), from the blocks the ring visits, against the causal truth.
    work = []
    for r in range(world):
        mine = ring_layout.local_positions(layout, r, world, seq_local)
        pairs = 0
        for s in range(world):
            theirs = ring_layout.local_positions(layout, s, world, seq_local)
            truth = (mine[:, None] >= theirs[None, :])
            block = ring_layout.visible_block(layout, True, r, s, seq_local)
            seen = torch.zeros_like(truth)
            if block is not None:
                rect = torch.zeros_like(truth)
                rect[block.query_rows, block.key_rows] = True
                seen = rect & (torch.ones_like(truth).tril() if block.causal else rect)
            assert torch.equal(seen & truth, truth), f"rank {r} misses keys of rank {s}"
            assert torch.equal(seen, truth), f"rank {r} attends keys of rank {s} it cannot see"
            pairs += int(seen.sum())
        work.append(pairs)
    if layout is ring_layout.Layout.ZIGZAG:
        c = seq_local // 2
        assert work == [2 * world * c * c + c] * world
    else:
        assert work == [(r + 0.5) * seq_local**2 + seq_local / 2 for r in range(world)]


def shard_sequence_as(x, layout, rank, world):
    from flashsdpa.distributed.sharding import _slice_of

    return _slice_of(x, layout, rank, world)


def test_the_benchmark_script_runs_on_cpu(tmp_path):
    codes = _spawn(_script_worker, 2, str(tmp_path), "scripts/bench_context_parallel.py", ["--smoke", "--check"],
                   deadline_s=120)
    printed = (tmp_path / "rank0.out").read_text()
    assert codes == [0, 0], f"exit codes {codes}\n{printed}"
    rows = [line for line in printed.splitlines() if line.startswith("| 64 |")]
    assert len(rows) == 4, printed  # causal and not, forward and forward+backward
    checks = [line for line in printed.splitlines() if line.startswith("check")]
    assert len(checks) == 2, printed
    for line in checks:  # relative errors against one process, bf16: ~1e-3
        errors = [float(part.split()[-1]) for part in line.split(": ")[1].split(", ")]
        assert max(errors) < 2e-2, line


def test_the_example_trains_as_one_process_does_also_under_fsdp2(tmp_path):
    codes = _spawn(_script_worker, 2, str(tmp_path), "examples/context_parallel.py",
                   ["--seq", "64", "--steps", "2", "--fsdp2"], deadline_s=120)
    printed = (tmp_path / "rank0.out").read_text()
    assert codes == [0, 0], f"exit codes {codes}\n{printed}"
    steps = [line for line in printed.splitlines() if line.startswith("step")]
    assert len(steps) == 2 and all("equal to float32 rounding" in line for line in steps), printed


def test_the_benchmark_scripts_one_process_simulation_matches_one_device(capsys):
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                        "bench_context_parallel.py")
    spec = importlib.util.spec_from_file_location("bench_context_parallel", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--simulate", "2", "--smoke", "--causal", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("simulated")]
    assert len(rows) == 4, rows  # bf16 and float32, zigzag and contiguous
    for row in rows:
        for cell in row.split(": ", 1)[1].split(", "):
            mine, theirs = float(cell.split()[1]), float(cell.split()[-1].rstrip(")"))
            assert mine <= 1.5 * theirs + 1e-6, row
