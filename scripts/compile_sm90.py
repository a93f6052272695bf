"""Compile flashsdpa's Triton kernels for an H100 (sm_90) on a machine without a GPU.

GPU time is scarce, and some errors only show when Triton compiles for a real
GPU: the CPU interpreter runs the kernels as Python (it accepted annotated
module-level constexprs that the GPU compiler rejects), and it says nothing of
register spills or shared memory. This script drives the real launchers
(`flashsdpa.attention` forward and backward) on small CPU tensors, with
`JITFunction.run` replaced by a compile-only stand-in: each kernel variant the
launchers would launch is compiled for sm_90 with Triton's bundled ptxas, and
nothing runs. It prints one row per variant (registers, spills from `ptxas -v`,
shared memory; status SERIAL where ptxas serialised the variant's wgmma
instructions, which compiles and runs, slowly; REPL where a wgmma product's
warps cover more than its tile, so two warp groups compute the same product
and its elementwise work: `replicated_products`) and exits 1 if any compile
failed or overflowed shared memory.

    python scripts/compile_sm90.py [--quick | --variants | --d512 | --packed | --paged | --masks | --no-masks |
                                    --hopper | --hopper-variants] [--match TEXT] [--dump DIR]
                                   [--softcap-forward precise|hardware|triton]

--masks compiles only the problems with an attention mask (--no-masks the
others); --dump writes each variant's TTGIR, PTX and SASS into DIR (files
named by kernel and a hash of its specialization), to find what spills or to
check that a change leaves a variant's code as it was. --hopper compiles the
hopper backend's Gluon kernels instead (forward and backward, every dtype,
head dim and causality they take, GQA and the variants; --hopper-variants:
the variants alone; --softcap-forward: how the hopper forward computes softcap,
`hopper.variants.SOFTCAP_FORWARD`, for this run).
--paged compiles the paged decode kernel's variants (`kvcache_attention`
on the triton backend).
--hopper-candidates compiles the hopper backward's candidate specs
(`backward_specs.CANDIDATES`) on its plain and causal problems, with and without GQA.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.compiler import ASTSource, make_backend
from triton.experimental.gluon._runtime import GluonASTSource
from triton.runtime.jit import JITFunction, compute_cache_key, create_function_from_signature

import flashsdpa
from flashsdpa import gradient_precision, kvcache, validation
from flashsdpa.backends import hopper
from flashsdpa.backends.hopper import HopperBackend
from flashsdpa.backends.hopper import backward_specs as hopper_backward_specs
from flashsdpa.backends.hopper import launch_backward as hopper_launch_backward
from flashsdpa.backends.hopper import launch_forward as hopper_launch
from flashsdpa.backends.hopper import variants as hopper_variants
from flashsdpa.backends.triton import TritonBackend, launch_backward, launch_forward, launch_paged
from flashsdpa.descriptor import GradientPrecision
from flashsdpa.dispatch import UnsupportedError

TARGET = GPUTarget("cuda", 90, 32)
TARGET_BACKEND = make_backend(TARGET)
SM90_SHARED_LIMIT = 227 * 1024  # opt-in dynamic shared memory per block
compiled: dict[tuple, dict] = {}  # (kernel, specialization key) -> row
dump_dir: Path | None = None  # --dump


def compile_only_run(self: JITFunction, *args, grid, warmup, **kwargs):
    """JITFunction.run (triton/runtime/jit.py) minus the launch: bind and specialize as it does, compile for sm_90."""
    kwargs["debug"] = kwargs.get("debug", self.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    if "_sm90_binder" not in self.__dict__:
        self._sm90_binder = create_function_from_signature(self.signature, self.params, TARGET_BACKEND)
    bound_args, specialization, options = self._sm90_binder(*args, **kwargs)
    key = (self.fn.__qualname__, compute_cache_key({}, specialization, options))
    if key not in compiled:
        options, signature, constexprs, attrs = self._pack_args(
            TARGET_BACKEND, kwargs, bound_args, specialization, options)
        names = {p.num: p.name for p in self.params if p.is_constexpr}
        types = " ".join(map(str, signature.values()))
        dtype = next((name for name in ("bf16", "fp16", "fp32") if name in types), "?")  # the inputs' dtype
        row = dict(kernel=self.fn.__name__, options=options, dtype=dtype,
                   constexprs={names[path[0]]: getattr(value, "value", value)  # unwrap tl.constexpr globals
                               for path, value in sorted(constexprs.items()) if path[0] in names})
        source = (GluonASTSource if self.is_gluon() else ASTSource)(self, signature, constexprs, attrs)
        try:  # (a ptxas failure also prints the whole PTX to stdout: keep that out of the table)
            with contextlib.redirect_stdout(io.StringIO()):
                kernel = triton.compile(source, target=TARGET, options=options.__dict__)
            row.update(ptxas_usage(kernel.asm["ptx"]), shared=kernel.metadata.shared, error=None,
                       replicated=replicated_products(kernel.asm["ttgir"]))
            if dump_dir is not None:
                row["dump"] = dump_kernel(kernel, row, key)
            if kernel.metadata.shared > SM90_SHARED_LIMIT:
                row["error"] = f"shared memory {kernel.metadata.shared} B > sm90's {SM90_SHARED_LIMIT} B"
        except Exception as error:  # noqa: BLE001 - every compile error is a finding to report
            row.update(error=f"{type(error).__name__}: {error}")
        compiled[key] = row
    return None


def dump_kernel(kernel, row: dict, key: tuple) -> str:
    """Writes the variant's TTGIR, PTX and SASS (nvdisasm of the cubin) into dump_dir; returns the file stem."""
    import hashlib

    flags = format_constexprs(row["constexprs"]) + f" {row['dtype']} {row['options']}"
    stem = f"{row['kernel']}-{hashlib.sha1(str(key).encode()).hexdigest()[:10]}"  # the key holds the specialization
    Path(dump_dir, f"{stem}.txt").write_text(flags + "\n")
    Path(dump_dir, f"{stem}.ttgir").write_text(kernel.asm["ttgir"])
    Path(dump_dir, f"{stem}.ptx").write_text(kernel.asm["ptx"])
    cubin = Path(dump_dir, f"{stem}.cubin")
    cubin.write_bytes(kernel.asm["cubin"])
    nvdisasm = Path(get_ptxas(TARGET.arch).path).with_name("nvdisasm")
    sass = subprocess.run([str(nvdisasm), "-c", str(cubin)], capture_output=True, text=True).stdout
    Path(dump_dir, f"{stem}.sass").write_text(sass)
    return stem


def ptxas_usage(ptx: str) -> dict:
    """Registers, spill bytes and whether wgmma was serialised, from the bundled ptxas -v (Triton deletes its
    own log)."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp, "kernel.ptx")
        source.write_text(ptx)
        command = [get_ptxas(TARGET.arch).path, "-v", f"--gpu-name={sm_arch_from_capability(TARGET.arch)}",
                   str(source), "-o", str(Path(tmp, "kernel.cubin"))]
        log = subprocess.run(command, check=True, capture_output=True, text=True).stderr

    number = lambda pattern: sum(int(found) for found in re.findall(pattern, log))  # noqa: E731
    return dict(registers=number(r"Used (\d+) registers"), spill_stores=number(r"(\d+) bytes spill stores"),
                spill_loads=number(r"(\d+) bytes spill loads"),
                wgmma_serialized="wgmma.mma_async instructions are serialized" in log)


def replicated_products(ttgir: str) -> list[str]:
    """The wgmma products whose warps cover more than the product's tile, as "MxN" (from the TTGIR): each
    warp group computes 64 rows, so 8 warps along the rows of a 64-row product compute it twice (Triton
    3.6 replicates rather than splitting the columns), and with it the elementwise work on its result."""
    layouts = {name: (int(rows), int(cols), int(width)) for name, rows, cols, width in re.findall(
        r"^#(\w+) = #ttg\.nvidia_mma<\{versionMajor = 3,[^}]*warpsPerCTA = \[(\d+), (\d+)\], "
        r"instrShape = \[\d+, (\d+), \d+\]", ttgir, flags=re.MULTILINE)}
    found = []
    for m, n, name in re.findall(r"ttng\.warp_group_dot .*?-> tensor<(\d+)x(\d+)xf32, #(\w+)>", ttgir):
        rows, cols, width = layouts.get(name, (0, 0, 0))
        if rows * 16 > int(m) or cols * width > int(n):
            found.append(f"{m}x{n}")
    return sorted(set(found))


def patch_for_sm90() -> None:
    """Make the CPU-tensor calls take the CUDA paths (sm90 configs, TMA descriptors, tf32x3) without launching."""
    descriptor = validation._descriptor  # every descriptor is built there (validation.describe)
    validation._descriptor = lambda *a, **kw: dataclasses.replace(descriptor(*a, **kw), device_type="cuda")
    accepts = TritonBackend.unsupported_reasons
    TritonBackend.unsupported_reasons = lambda self, desc, device: [
        reason for reason in accepts(self, desc, device) if "TRITON_INTERPRET" not in reason]
    launch_forward.device_capability = launch_backward.device_capability = lambda device: (9, 0)
    hopper.cuda_capability = lambda device: (9, 0)
    hopper_accepts = HopperBackend.unsupported_reasons
    HopperBackend.unsupported_reasons = lambda self, desc, device: hopper_accepts(self, desc, torch.device("cuda", 0))
    launch_forward.sm_count = hopper_launch.sm_count = hopper_launch_backward.sm_count = lambda device: 132
    launch_paged.device_capability = lambda device: (9, 0)
    launch_paged.sm_count = lambda device: 132
    cache_descriptor = kvcache.cache_descriptor
    kvcache.cache_descriptor = lambda *a, **kw: dataclasses.replace(cache_descriptor(*a, **kw), device_type="cuda")
    hopper_backward_specs.GLUON_BACKWARD_HEAD_DIMS = hopper_backward_specs.BACKWARD_HEAD_DIMS  # compile them all
    JITFunction.run = compile_only_run


@dataclasses.dataclass(frozen=True)
class Problem:
    dtype: torch.dtype
    head_dim: int
    head_dim_v: int | None = None
    causal: bool = False
    mask: str = ""  # "", "pad" (bool, B,1,1,S), "bool" (B,H,L,S), "float" (B,H,L,S, with its gradient),
    # "bias" (float, 1,H,L,S, no gradient: the bench's float-bias case)
    dropout: float = 0.0
    heads: tuple[int, int] = (2, 2)  # (Hq, Hkv)
    seq: tuple[int, int] = (300, 300)  # (L, S)
    precision: str = "ieee"
    backward: bool = True
    # The 16-bit backward's precision (gradient_precision.py). On the H100 torch's fused kernels take
    # all of these problems, so flashsdpa runs them "rounded" by default; "exact" is the other variant.
    gradients: str = "rounded"
    backend: str = "triton"
    # The variants (flashsdpa.attention's arguments): "window", "bottom_right", "softcap", "alibi", "sinks",
    # joined by "+".
    variant: str = ""
    # Sequence lengths of a packed batch (flashsdpa.varlen_attn, the same lengths for queries and keys)
    # instead of the dense (batch, L, S) problem.
    packed: tuple[int, ...] = ()
    # The hopper backward with a candidate's spec changes (backward_specs.CANDIDATES) instead of SPECS'.
    candidate: str | None = None

    def run(self) -> None:
        (hq, hkv), (seq_q, seq_kv), batch = self.heads, self.seq, 2
        if self.packed:
            return self.run_packed()
        new = lambda *shape: torch.randn(*shape, dtype=self.dtype, requires_grad=self.backward)  # noqa: E731
        q, k, v = new(batch, hq, seq_q, self.head_dim), new(batch, hkv, seq_kv, self.head_dim), new(
            batch, hkv, seq_kv, self.head_dim_v or self.head_dim)
        mask = {"": None, "pad": torch.rand(batch, 1, 1, seq_kv) > 0.2,
                "bool": torch.rand(batch, hq, seq_q, seq_kv) > 0.2, "float": new(batch, hq, seq_q, seq_kv),
                "bias": torch.randn(1, hq, seq_q, seq_kv, dtype=self.dtype)}[self.mask]
        gradient_precision.pinned = GradientPrecision(self.gradients)
        hopper_launch_backward.backward_spec = functools.partial(hopper_backward_specs.backward_spec,
                                                                 candidate=self.candidate)
        names = set(filter(None, self.variant.split("+")))
        variants = dict(
            window=(256, 0) if "window" in names else None,
            causal_alignment="bottom_right" if "bottom_right" in names else "top_left",
            softcap=30.0 if "softcap" in names else None,
            alibi_slopes=torch.rand(hq) if "alibi" in names else None,
            sinks=torch.randn(hq, requires_grad=self.backward) if "sinks" in names else None,
        )
        out = flashsdpa.attention(q, k, v, causal=self.causal, attn_mask=mask, dropout_p=self.dropout,
                                  enable_gqa=hq != hkv, backend=self.backend, fp32_precision=self.precision, **variants)
        if self.backward:
            out.backward(torch.ones_like(out))

    def run_packed(self) -> None:
        (hq, hkv), total = self.heads, sum(self.packed)
        new = lambda *shape: torch.randn(*shape, dtype=self.dtype, requires_grad=self.backward)  # noqa: E731
        q, k, v = new(total, hq, self.head_dim), new(total, hkv, self.head_dim), new(
            total, hkv, self.head_dim_v or self.head_dim)
        cu = torch.tensor([0, *torch.tensor(self.packed).cumsum(0).tolist()], dtype=torch.int32)
        gradient_precision.pinned = GradientPrecision(self.gradients)
        names = set(filter(None, self.variant.split("+")))
        out = flashsdpa.varlen_attn(
            q, k, v, cu, cu, max(self.packed), max(self.packed), enable_gqa=hq != hkv, causal=self.causal,
            window_size=(256, 0) if "window" in names else (-1, -1),
            causal_alignment="bottom_right" if "bottom_right" in names else "top_left",
            softcap=30.0 if "softcap" in names else None,
            alibi_slopes=torch.rand(hq) if "alibi" in names else None,
            sinks=torch.randn(hq, requires_grad=self.backward) if "sinks" in names else None,
            dropout_p=self.dropout, backend=self.backend, fp32_precision=self.precision, validate=False,
        )  # fmt: skip
        if self.backward:
            out.backward(torch.ones_like(out))


@dataclasses.dataclass(frozen=True)
class PagedProblem:
    """A `kvcache_attention` call on the triton backend (its paged decode kernel): a cache of 4 sequences."""

    dtype: torch.dtype
    head_dim: int
    page_size: int | None = 16  # None: a contiguous cache
    heads: tuple[int, int] = (8, 2)  # (Hq, Hkv)
    seq_q: int = 1
    # "causal" (the default), "plain" (not causal), "window", "softcap", "alibi", "sinks", joined by "+"
    variant: str = "causal"
    tma: bool = False  # launch_paged.PAGED_TMA_BLOCKS (K/V blocks as TMA boxes where the cache allows)
    layout: str = "rows"  # for every cache class (launch_paged.PAGED_DECODE_LAYOUTS; a PAGED_LAYOUTS name)

    def run(self) -> None:
        launch_paged.PAGED_TMA_BLOCKS = self.tma
        launch_paged.PAGED_DECODE_LAYOUTS = dict.fromkeys(launch_paged.PAGE_CLASSES, self.layout)
        (hq, hkv), batch, capacity = self.heads, 4, 4096
        names = set(self.variant.split("+"))
        pages = capacity if self.page_size is None else -(-capacity // self.page_size)
        shape = (batch, capacity, hkv, self.head_dim) if self.page_size is None else (
            batch * pages + 1, self.page_size, hkv, self.head_dim)
        cache = torch.randn(*shape, dtype=self.dtype)
        table = None if self.page_size is None else torch.arange(batch * pages, dtype=torch.int32).view(batch, pages)
        flashsdpa.kvcache_attention(
            torch.randn(batch, self.seq_q, hq, self.head_dim, dtype=self.dtype), cache, cache,
            cache_seqlens=torch.tensor([0, 1, 1000, capacity - self.seq_q]), block_table=table,
            causal="plain" not in names, window_size=(256, -1) if "window" in names else (-1, -1),
            softcap=30.0 if "softcap" in names else None, alibi_slopes=torch.rand(hq) if "alibi" in names else None,
            sinks=torch.randn(hq) if "sinks" in names else None, backend="triton",
        )  # fmt: skip


BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
QUICK = [
    Problem(BF16, 128), Problem(BF16, 128, causal=True), Problem(BF16, 64, mask="pad", dropout=0.1),
    Problem(FP32, 64), Problem(FP32, 128, precision="tf32"),
    Problem(BF16, 128, heads=(8, 2), seq=(1, 4099), backward=False), Problem(BF16, 128, gradients="exact"),
]
# The variants on the bf16 d=64/128 kernels (compare with the plain problems' rows: no new spills or SERIAL).
VARIANTS = [
    Problem(BF16, d, causal=c, variant=v)
    for d in (64, 128) for c, v in ((True, "window"), (True, "window+bottom_right"), (False, "softcap"),
                                    (False, "alibi"), (False, "sinks"), (True, "window+softcap+alibi+sinks"))
] + [Problem(BF16, 128, heads=(8, 2), seq=(1, 4099), backward=False, variant="window+softcap+alibi+sinks")]
# Head dims 257-512 (Gemma's global layers): padded to 512 tiles.
D512 = [
    *(Problem(BF16, 512, causal=c, gradients=g) for c in (False, True) for g in ("rounded", "exact")),
    Problem(FP16, 512, 512), Problem(BF16, 384, 320, causal=True), Problem(BF16, 512, mask="pad"),
    Problem(BF16, 512, causal=True, variant="window+softcap+alibi+sinks"),
    Problem(FP32, 512, precision="tf32"), Problem(BF16, 512, heads=(8, 2), seq=(1, 4099), backward=False),
]
# Packed batches (varlen_attn): the triton kernels' VARLEN load path, plain and with the variants.
PACKED_LENGTHS = (1, 37, 300, 5)
PACKED = [
    Problem(BF16, d, causal=c, heads=(4, 2), packed=PACKED_LENGTHS, variant=v)
    for d in (64, 128) for c, v in ((False, ""), (True, ""), (True, "window+bottom_right"), (False, "softcap"),
                                    (False, "alibi"), (False, "sinks"), (True, "window+softcap+alibi+sinks"))
] + [
    Problem(BF16, d, causal=c, packed=PACKED_LENGTHS) for d in (64, 128) for c in (False, True)  # the bench's: no GQA
] + [Problem(BF16, 128, causal=True, dropout=0.1, packed=PACKED_LENGTHS), Problem(FP32, 64, packed=PACKED_LENGTHS),
     Problem(FP32, 128, causal=True, precision="tf32", packed=PACKED_LENGTHS)]
# The paged decode kernel: what it compiles in (PAGED, the band's flags, the score variants) on bf16 d=64/128.
PAGED = [
    PagedProblem(BF16, d, page_size=p, variant=v)
    for d in (64, 128) for p in (16, None) for v in ("causal", "plain", "window", "softcap+alibi+sinks")
] + [PagedProblem(FP16, 128), PagedProblem(FP32, 128), PagedProblem(BF16, 256)] + [
    PagedProblem(BF16, d, page_size=256, seq_q=q) for d in (64, 128) for q in (1, 32)  # a key block in one page
] + [
    PagedProblem(BF16, d, page_size=p, tma=True, variant=v)  # TMA boxes
    for d in (64, 128) for p in (256, None) for v in ("plain", "softcap+alibi+sinks")
] + [
    PagedProblem(dtype, d, seq_q=32, variant=v)  # 64 packed rows a program (chunked prefill)
    for dtype, d, v in ((BF16, 64, "causal"), (BF16, 128, "causal"), (BF16, 128, "window+softcap+alibi+sinks"),
                        (BF16, 256, "causal"), (FP32, 128, "causal"))
] + [
    PagedProblem(BF16, 128, page_size=p, heads=(32, 8), variant="plain", layout=layout)  # warps on slices
    for layout in launch_paged.PAGED_LAYOUTS for p in (16, 256, None) if layout != "rows"
] + [
    PagedProblem(dtype, d, page_size=16, heads=(32, 8), variant=v, layout=layout)
    for layout in launch_paged.PAGED_LAYOUTS if layout != "rows" for dtype, d, v in (
        (BF16, 128, "causal"), (BF16, 128, "sinks"), (BF16, 64, "plain"), (FP16, 128, "plain"),
        (BF16, 128, "window"), (BF16, 128, "softcap+alibi+sinks"), (FP32, 128, "plain"))  # float32: rows
]

FULL = QUICK + VARIANTS + D512 + PACKED + PAGED + [
    *(Problem(BF16, d, causal=c, gradients="exact") for d in (64, 128, 256) for c in (False, True)),
    Problem(FP16, 64, mask="pad", gradients="exact"), Problem(BF16, 128, mask="float", gradients="exact"),
    *(Problem(dtype, d, causal=c, precision=p) for dtype, p in ((BF16, "ieee"), (FP32, "ieee"), (FP32, "tf32"))
      for d in (64, 128, 256) for c in (False, True)),
    Problem(FP16, 64), Problem(FP16, 128, causal=True), Problem(FP16, 256),
    Problem(BF16, 80), Problem(BF16, 40, 72, causal=True), Problem(FP32, 40, 72),
    *(Problem(BF16, d, mask=m, causal=c)
      for d in (64, 128, 256) for m in ("pad", "bool", "float") for c in (False, True)),
    Problem(FP32, 64, mask="float"), Problem(FP32, 128, mask="bool", causal=True),
    *(Problem(BF16, d, dropout=0.1, causal=c) for d in (64, 128, 256) for c in (False, True)),
    Problem(FP32, 64, dropout=0.1), Problem(BF16, 128, heads=(8, 2), causal=True), Problem(FP32, 64, heads=(4, 1)),
    Problem(BF16, 64, heads=(8, 2), seq=(1, 4099), backward=False),
    Problem(BF16, 256, heads=(8, 2), seq=(4, 4099), mask="pad", backward=False),
    Problem(FP32, 128, heads=(8, 2), seq=(1, 4099), backward=False),
    Problem(FP16, 128, mask="float", seq=(1, 4099), backward=False),
    # The bench's mask cases: lengths a multiple of 16 (mask rows 16-byte aligned, which sets the load layout).
    *(Problem(BF16, d, mask=m, causal=c, seq=(512, 512)) for d in (64, 128) for m in ("pad", "bool", "bias")
      for c in (False, True)),
]

HOPPER = [
    Problem(dtype, d, causal=c, heads=heads, seq=(300, 300), backward=d in hopper_backward_specs.BACKWARD_HEAD_DIMS,
            backend="hopper")
    for dtype in (BF16, FP16) for d in (64, 128, 256) for c in (False, True) for heads in ((2, 2), (4, 2))
]
# The variants on the hopper kernels (compare with the plain problems' rows: no new spills or SERIAL).
HOPPER_VARIANTS = [
    Problem(BF16, d, causal=c, heads=(4, 2), variant=v, backward=d in hopper_backward_specs.BACKWARD_HEAD_DIMS,
            backend="hopper")
    for d in (64, 128, 256) for c, v in ((True, "window"), (True, "window+bottom_right"),
                                         (False, "softcap"), (True, "softcap"), (False, "alibi"), (False, "sinks"),
                                         (True, "window+softcap+alibi+sinks"))
]
HOPPER += HOPPER_VARIANTS
# The hopper backward's candidate specs (backward_specs.CANDIDATES) on the problems the GPU script times and checks.
HOPPER_CANDIDATES = [
    Problem(BF16, d, causal=c, heads=heads, backend="hopper", candidate=candidate)
    for candidate in hopper_backward_specs.CANDIDATES for d in hopper_backward_specs.BACKWARD_HEAD_DIMS
    for c in (False, True) for heads in ((2, 2), (4, 2))
]


def describe_row(row: dict, fixed: dict) -> str:
    opts = row["options"]
    launch = f"w{opts.num_warps} s{opts.num_stages}" + (f" maxnreg {opts.maxnreg}" if opts.maxnreg else "")
    flags = format_constexprs({name: v for name, v in row["constexprs"].items() if name not in fixed})
    spills = f"{row['spill_stores']}/{row['spill_loads']}" if "spill_stores" in row else ""
    status = "FAIL" if row["error"] is not None else "SERIAL" if row.get("wgmma_serialized") else (
        "REPL" if row.get("replicated") else "OK")
    registers, shared = row.get("registers", ""), row.get("shared", "")
    dump = f"  [{row['dump']}]" if "dump" in row else ""
    return f"  {row['dtype']:<5} {launch:<17} {registers:>4} {spills:>11} {shared:>7}  {status:<4}  {flags}{dump}"


def format_constexprs(constexprs: dict) -> str:
    return " ".join(f"{name}={int(v) if isinstance(v, bool) else v}" for name, v in constexprs.items())


def report(rows: list[dict]) -> None:
    """One table per kernel; constexprs equal in all of a kernel's variants are printed once, above it."""
    for kernel in sorted({row["kernel"] for row in rows}):
        group = sorted((row for row in rows if row["kernel"] == kernel),
                       key=lambda row: (row["dtype"], [str(v) for v in row["constexprs"].values()]))
        first = group[0]["constexprs"]
        fixed = {name: v for name, v in first.items() if all(r["constexprs"][name] == v for r in group)}
        print(f"\n{kernel} ({len(group)} variants; in all: {format_constexprs(fixed) or '-'})")
        print(f"  {'dtype':<5} {'launch':<17} {'regs':>4} {'spill st/ld':>11} {'smem':>7}  status  constexprs")
        for row in group:
            print(describe_row(row, fixed))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a handful of problems instead of the full list")
    parser.add_argument("--d512", action="store_true", help="only the problems with head dims 257-512")
    parser.add_argument("--masks", action="store_true", help="only the problems with a mask")
    parser.add_argument("--variants", action="store_true", help="only the variants' problems (window, softcap, ...)")
    parser.add_argument("--packed", action="store_true", help="only the packed batches (varlen_attn)")
    parser.add_argument("--no-masks", action="store_true", help="only the problems without a mask")
    parser.add_argument("--hopper", action="store_true", help="the hopper backend's Gluon kernels instead")
    parser.add_argument("--hopper-variants", action="store_true", help="the hopper kernels' variants alone")
    parser.add_argument("--paged", action="store_true", help="only the paged decode kernel's problems (kvcache)")
    parser.add_argument("--softcap-forward", choices=hopper_variants.SOFTCAP_FORWARDS,
                        help="every head dim's entry of hopper.variants.SOFTCAP_FORWARD (how the forward computes "
                             "softcap) for this run")
    parser.add_argument("--match", help="only the problems whose repr contains this text, e.g. \"seq=(512, 512)\"")
    parser.add_argument("--dump", type=Path, help="write each variant's TTGIR, PTX and SASS into this folder")
    parser.add_argument("--hopper-candidates", action="store_true",
                        help="the hopper backward's candidate specs (backward_specs.CANDIDATES)")
    args = parser.parse_args()
    groups = {"hopper_variants": HOPPER_VARIANTS, "hopper_candidates": HOPPER_CANDIDATES, "hopper": HOPPER,
              "d512": D512, "quick": QUICK, "variants": VARIANTS, "packed": PACKED, "paged": PAGED}
    chosen = next((problems for name, problems in groups.items() if getattr(args, name)), FULL)
    problems = list(dict.fromkeys(chosen))
    if args.masks or args.no_masks:
        problems = [problem for problem in problems if bool(getattr(problem, "mask", "")) == args.masks]
    if args.match:
        problems = [problem for problem in problems if args.match in repr(problem)]
    if args.dump is not None:
        global dump_dir
        dump_dir = args.dump
        dump_dir.mkdir(parents=True, exist_ok=True)
    if args.softcap_forward:
        hopper_variants.SOFTCAP_FORWARD.update(dict.fromkeys(hopper_variants.SOFTCAP_FORWARD, args.softcap_forward))
    patch_for_sm90()
    start, launcher_errors, declined = time.time(), [], []
    for number, problem in enumerate(problems, 1):
        print(f"[{number}/{len(problems)}] {problem}", file=sys.stderr, flush=True)
        try:
            problem.run()
        except UnsupportedError as reason:  # the triton backend declines it (another backend serves it)
            declined.append(f"{problem}: {reason}")
        except Exception as error:  # noqa: BLE001 - a launcher that fails before compiling is a finding too
            launcher_errors.append(f"{problem}: {type(error).__name__}: {error}")
    rows = list(compiled.values())
    report(rows)
    failures = [row for row in rows if row["error"]]
    spilled = [row for row in rows if row.get("spill_stores")]
    serialized = [row for row in rows if row.get("wgmma_serialized")]
    replicated = [row for row in rows if row.get("replicated")]
    print(f"\n{len(rows)} variants from {len(problems)} problems in {time.time() - start:.0f}s: "
          f"{len(failures)} failed, {len(spilled)} spill registers, {len(serialized)} with serialised wgmma, "
          f"{len(replicated)} with replicated products (REPL), "
          f"{len(launcher_errors)} launcher errors, "
          f"{len(declined)} declined by triton")
    for row in failures:  # Triton's errors open with the location and end with the source line and message
        lines = row["error"].splitlines()
        shown = lines if len(lines) <= 10 else [*lines[:2], "...", *lines[-7:]]
        print(f"\nFAILED {row['kernel']} {row['dtype']} {format_constexprs(row['constexprs'])}:")
        print("  " + "\n  ".join(shown))
    for error in launcher_errors:
        print(f"\nLAUNCHER FAILED {error}")
    for reason in declined:
        print(f"\ndeclined {reason}")
    return 1 if failures or launcher_errors else 0


if __name__ == "__main__":
    sys.exit(main())
