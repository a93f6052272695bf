"""The benchmark matrix: which attention problems `flashsdpa bench` times, and their inputs.

Five groups, in the order they run (the most quoted first, so that a run cut
short by its time budget still has them):

- main: d in {64, 128, 256}, L = S from 512 to 16384 at 16384 tokens per
  batch (batch = 16384 // L) and a model width of 2048 (heads = 2048 // d),
  causal and not, bf16 then fp16; forward and backward.
- mask: d=128, B=4, H=16, L=S=4096, bf16, with a bool key-padding mask
  (B, 1, 1, S) whose last 512 keys are masked, or a float bias (1, H, L, S).
- fp32: the same shape with float32 inputs (flashsdpa precise and tf32), at d=128
  and d=64, causal and not.
- decode: one query row, q (16, 32, 1, 128) against K/V (16, 8, S, 128) with
  enable_gqa; forward only, reported as bytes of K+V read per second too.
- variant (`--cases variant` runs it alone): window 4096 in causal 32k,
  softcap, sinks and ALiBi at d=128, causal L=4096, bf16, and a causal d=512 row.
- varlen, paged, prefill (issue 12; last): a packed batch of mixed lengths,
  causal, forward and backward (`flashsdpa.varlen_attn` against torch's
  `varlen_attn` and padded SDPA; FLOPs and tokens on real tokens only); paged
  decode, one query row per sequence over 4k-128k cached keys in pages of 16
  and 256 (`flashsdpa.kvcache_attention` against torch's SDPA on the same keys
  unpaged; TB/s of K+V read); chunked prefill, 512 new queries bottom-right
  causal over a paged cache.
- decode-graph (issue 14; after paged): the paged decode step eager and
  captured in a CUDA graph and replayed (`-graph` peers), against torch flash's
  unpaged decode the same two ways: time per call or replay, and the host's
  time to enqueue one (`host_us`); at B=1 (where the host's time shows) and
  B=16. On a CPU the graph peers are n/a with the reason.

On a CPU (`--device cpu`), CPU-sized cases at B=1, H=8 against the peers a
CPU user has (torch's SDPA as it chooses, its math path, FlexAttention
compiled for the CPU):

- cpu: d in {64, 128}, L = S from 512 to 8192, float32 then bf16, causal
  and not; forward and backward (`--quick`: L = 1024 and 4096 only).
- cpu-mask: d=64, L = 1024 and 4096, float32 and bf16, the bool key-padding
  mask (B, 1, 1, S) and the float bias (1, H, L, S).
- cpu-variant: d=64, causal L = 2048, float32 and bf16: a window of 256 keys,
  softcap, sinks, ALiBi (`flashsdpa.attention`'s variants, which torch's SDPA
  has no argument for).

`--smoke` picks a tiny matrix with one case of each kind instead (seconds):
it exercises the same code paths, for tests.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, replace

import torch

from flashsdpa.descriptor import Alignment, AttentionDescriptor, MaskKind

TOKENS_PER_BATCH = 16384
MODEL_WIDTH = 2048  # heads * head_dim in the main group
MAIN_HEAD_DIMS = (64, 128, 256)
MAIN_SEQ_LENS = (512, 1024, 2048, 4096, 8192, 16384)
MAIN_DTYPES = (torch.bfloat16, torch.float16)
# The headline rows of `--quick`: (head_dim, seq_len, causal), bf16.
QUICK_ROWS = ((128, 4096, False), (128, 16384, True), (64, 4096, False), (128, 1024, False))
DECODE_SEQ_LENS = (4096, 8192, 16384, 32768)
FP32_HEAD_DIMS = (128, 64)  # d=128 first: the row earlier benchmarks quote
PADDED_KEYS = 512  # keys masked out at the end of each row in the key-padding case

# Peers per group, flashsdpa first (the one every ratio is taken against).
# flash refuses masks and fp32, cuDNN refuses fp32: they are kept in those
# groups so that the refusal and torch's reason are recorded.
MAIN_PEERS = ("flashsdpa", "cudnn", "flash", "efficient", "math", "flex")
MASK_PEERS = ("flashsdpa", "cudnn", "flash", "efficient", "math")
FP32_PEERS = ("flashsdpa", "flashsdpa-tf32", "cudnn", "flash", "efficient", "math")
DECODE_PEERS = ("flashsdpa", "cudnn", "flash", "efficient", "math")
# Issue 12. varlen: torch's packed `varlen_attn` (CUDA) and SDPA on the batch padded to its longest sequence
# ("torch" as it chooses, and math). paged/prefill: torch's SDPA on the same keys in a contiguous cache.
VARLEN_PEERS = ("flashsdpa", "torch-varlen", "torch", "math")
PAGED_PEERS = ("flashsdpa", "flash", "cudnn", "efficient", "math")
PREFILL_PEERS = ("flashsdpa", "flash", "efficient", "math")
# Issue 14: the paged decode step and torch flash's unpaged one, each called eagerly and replayed from a CUDA
# graph (the "-graph" peers, `peers.CudaGraphPeer`).
GRAPH_SUFFIX = "-graph"
DECODE_GRAPH_PEERS = ("flashsdpa", "flashsdpa" + GRAPH_SUFFIX, "flash", "flash" + GRAPH_SUFFIX)
# Groups whose forward is reported as bytes of K+V read per second, those that read a KV cache, and those whose
# forward also reports the host's time per call (`Timer.host_time`).
KV_BYTES_GROUPS = ("decode", "paged", "decode-graph")
CACHE_GROUPS = ("paged", "prefill", "decode-graph")
HOST_TIME_GROUPS = ("decode-graph",)
# A packed batch of mixed lengths (16,404 tokens), and the paged decode shapes.
VARLEN_LENGTHS = (1, 37, 1000, 5, 4096, 2048, 300, 8192, 512, 213)
PAGED_SEQ_LENS = (4096, 16384, 32768, 131072)
PAGE_SIZES = (16, 256)
PREFILL_CHUNK = 512
PREFILL_SEQ_LENS = (4096, 32768)
# decode-graph rows, (batch, cached keys, page size): one sequence (~17 MB of K+V, a few microseconds of GPU
# time: the host's time per call decides the step) and the paged group's B=16.
DECODE_GRAPH_ROWS = ((1, 4096, 16), (16, 4096, 16), (16, 32768, 256))

# The CPU matrix: B=1, H=8 as a CPU user would run one layer's attention.
CPU_BATCH = 1
CPU_HEADS = 8
CPU_HEAD_DIMS = (64, 128)
CPU_SEQ_LENS = (512, 1024, 2048, 4096, 8192)
CPU_QUICK_SEQ_LENS = (1024, 4096)
CPU_DTYPES = (torch.float32, torch.bfloat16)
CPU_MASK_SEQ_LENS = (1024, 4096)
# Peers that run on a CPU: torch's SDPA as it chooses ("torch"), its math path, FlexAttention compiled.
# (cuDNN, flash and mem-efficient are CUDA kernels; torch's CPU flash kernel is what "torch" runs.)
CPU_PEERS = ("flashsdpa", "torch", "math", "flex")
# The variants (`flashsdpa.attention`'s window, softcap, ALiBi, sinks): torch's SDPA has no argument for
# them, so "torch" (and a pinned fused backend) is n/a with that reason; math runs them on materialised scores.
VARIANT_PEERS = ("flashsdpa", "torch", "math", "flex")
VARIANTS = ("window", "softcap", "sinks", "alibi")
SOFTCAP = 30.0  # Gemma 2's attention softcap
CPU_VARIANT_SEQ_LEN = 2048
CPU_WINDOW = 256
GPU_VARIANT_SEQ_LEN = 4096
GPU_WINDOW_SEQ_LEN = 32768
GPU_WINDOW = 4096

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}


@dataclass(frozen=True)
class Case:
    """One attention problem: query (batch, heads_q, seq_q, head_dim), key/value
    (batch, heads_kv, seq_kv, head_dim), timed forward (and backward if asked)."""

    group: str
    batch: int
    heads_q: int
    heads_kv: int
    seq_q: int
    seq_kv: int
    head_dim: int
    dtype: torch.dtype
    peers: tuple[str, ...]
    causal: bool = False
    mask: str = "none"  # "none", "key_padding" (bool, (B, 1, 1, S)) or "bias" (float, (1, Hq, L, S))
    padded_keys: int = 0  # key_padding only: keys masked at the end of each row
    backward: bool = True
    # The variants, as `flashsdpa.attention` takes them: keys before each query's position (with causal),
    # the softcap, ALiBi slopes (`alibi_slopes`) and one sink logit per head (`InputSet.sinks`).
    window: int | None = None
    softcap: float | None = None
    alibi: bool = False
    sinks: bool = False
    # Issue 12's groups: each sequence's length (varlen: its queries and keys; paged/prefill: its cached keys,
    # every one seq_kv, as torch's unpaged peers attend to all of them) and flashsdpa's cache page size.
    lengths: tuple[int, ...] = ()
    page_size: int | None = None

    def __post_init__(self) -> None:
        if self.mask not in ("none", "key_padding", "bias"):
            raise ValueError(f"Case.mask must be 'none', 'key_padding' or 'bias', got {self.mask!r}")
        if self.window is not None and not (self.causal and self.window >= 0):
            raise ValueError(f"Case.window={self.window} needs causal=True and a window >= 0")
        if self.heads_q % self.heads_kv:
            raise ValueError(f"Case: heads_q={self.heads_q} is not a multiple of heads_kv={self.heads_kv}")
        if self.mask == "key_padding" and not 0 < self.padded_keys < self.seq_kv:
            raise ValueError(f"Case: padded_keys={self.padded_keys} must be in (0, seq_kv={self.seq_kv})")
        if self.lengths and (len(self.lengths) != self.batch or max(self.lengths) != self.seq_kv):
            raise ValueError(f"Case: lengths {self.lengths} must be batch={self.batch} lengths of at most "
                             f"seq_kv={self.seq_kv}, one of them seq_kv")  # fmt: skip
        if self.group in CACHE_GROUPS and (set(self.lengths) != {self.seq_kv} or not self.page_size):
            raise ValueError(f"Case: a {self.group} row needs every length = seq_kv and a page size")

    @property
    def name(self) -> str:
        """Unique, filterable: 'main/bf16-d128-L4096-causal', 'mask/bias-bf16-d128-L4096', ..."""
        dtype = DTYPE_NAMES.get(self.dtype, str(self.dtype))
        if self.group == "decode":
            return f"decode/{dtype}-d{self.head_dim}-S{self.seq_kv}"
        if self.group == "varlen":
            return f"varlen/{dtype}-d{self.head_dim}-B{self.batch}-T{sum(self.lengths)}" + (
                "-causal" if self.causal else "")
        if self.group == "paged":
            return f"paged/{dtype}-d{self.head_dim}-S{self.seq_kv}-page{self.page_size}"
        if self.group == "decode-graph":
            return f"decode-graph/{dtype}-d{self.head_dim}-B{self.batch}-S{self.seq_kv}-page{self.page_size}"
        if self.group == "prefill":
            return f"prefill/{dtype}-d{self.head_dim}-L{self.seq_q}-S{self.seq_kv}-page{self.page_size}"
        stem = f"{dtype}-d{self.head_dim}-L{self.seq_q}" + ("-causal" if self.causal else "")
        if self.mask != "none":
            stem = f"{self.mask.replace('_', '-')}-{stem}"
        return f"{self.group}/{stem}" + "".join(f"-{v}" for v in self.variant_labels)

    @property
    def variant_labels(self) -> tuple[str, ...]:
        """'window256', 'softcap30', 'alibi', 'sinks' for the variants this case has (empty: none)."""
        labels = []
        if self.window is not None:
            labels.append(f"window{self.window}")
        if self.softcap is not None:
            labels.append(f"softcap{self.softcap:g}")
        if self.alibi:
            labels.append("alibi")
        if self.sinks:
            labels.append("sinks")
        return tuple(labels)

    @property
    def variant(self) -> bool:
        return bool(self.variant_labels)

    def alibi_slopes(self, device) -> torch.Tensor:
        """ALiBi's geometric slopes 2^(-8 (h + 1) / H), (H,) float32."""
        heads = torch.arange(1, self.heads_q + 1, dtype=torch.float32, device=device)
        return torch.exp2(-8.0 * heads / self.heads_q)

    @property
    def gqa(self) -> bool:
        return self.heads_q != self.heads_kv

    @property
    def modes(self) -> tuple[str, ...]:
        return ("fwd", "bwd") if self.backward else ("fwd",)

    @property
    def tokens_q(self) -> int:
        """Query tokens of one call (varlen: the real ones, packed)."""
        return sum(self.lengths) if self.group == "varlen" else self.batch * self.seq_q

    @property
    def descriptor(self) -> AttentionDescriptor:
        """The problem as one SDPA call (issue 12's groups: padded to seq_kv; `flops` counts per sequence)."""
        mask_kind = {"none": MaskKind.NONE, "key_padding": MaskKind.BOOL, "bias": MaskKind.FLOAT}[self.mask]
        return AttentionDescriptor(
            batch_shape=(self.batch,),
            heads_q=self.heads_q,
            heads_kv=self.heads_kv,
            seq_q=self.seq_q,
            seq_kv=self.seq_kv,
            head_dim=self.head_dim,
            head_dim_v=self.head_dim,
            dtype=self.dtype,
            device_type="cuda",
            causal=self.causal,
            mask=mask_kind,
            mask_dtype={"none": None, "key_padding": torch.bool, "bias": self.dtype}[self.mask],
            window_left=-1 if self.window is None else self.window,
            softcap=self.softcap or 0.0,
            alibi=self.alibi,
            sinks=self.sinks,
            alignment=Alignment.BOTTOM_RIGHT if self.group in CACHE_GROUPS else Alignment.TOP_LEFT,
        )

    def flops(self, mode: str) -> float:
        """4*B*H*L*S*d for the forward (causal and window count only the visible
        pairs), 2.5x that for the backward: `AttentionDescriptor.flops`. With
        `lengths`, summed over the sequences at their real lengths (no padding)."""
        if not self.lengths:
            return self.descriptor.flops(backward=(mode == "bwd"))
        return sum(
            replace(self.descriptor, batch_shape=(1,), seq_q=n if self.group == "varlen" else self.seq_q,
                    seq_kv=n).flops(backward=(mode == "bwd"))
            for n in self.lengths
        )  # fmt: skip

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def kv_bytes(self) -> int:
        """Bytes of K and V, each read once by an ideal kernel (with `lengths`: the real keys)."""
        keys = sum(self.lengths) if self.lengths else self.batch * self.seq_kv
        return 2 * keys * self.heads_kv * self.head_dim * self.element_size

    @property
    def input_bytes(self) -> int:
        """Bytes of one input set: q, k, v, the mask and (for the backward) grad_out."""
        q = self.tokens_q * self.heads_q * self.head_dim * self.element_size
        mask = {
            "none": 0,
            "key_padding": self.batch * self.seq_kv,
            "bias": self.heads_q * self.seq_q * self.seq_kv * self.element_size,
        }[self.mask]
        return q * (2 if self.backward else 1) + self.kv_bytes + mask

    @property
    def score_bytes(self) -> int:
        """Bytes of one materialised (B, Hq, L, S) score matrix, as torch's math backend makes."""
        return self.batch * self.heads_q * self.seq_q * self.seq_kv * self.element_size

    def describe(self) -> dict:
        return {
            "name": self.name,
            "group": self.group,
            "batch": self.batch,
            "heads_q": self.heads_q,
            "heads_kv": self.heads_kv,
            "seq_q": self.seq_q,
            "seq_kv": self.seq_kv,
            "head_dim": self.head_dim,
            "dtype": DTYPE_NAMES.get(self.dtype, str(self.dtype)),
            "causal": self.causal,
            "mask": self.mask,
            "padded_keys": self.padded_keys,
            "variants": list(self.variant_labels),
            "enable_gqa": self.gqa,
            "modes": list(self.modes),
            "flops": {mode: self.flops(mode) for mode in self.modes},
            "kv_bytes": self.kv_bytes,
            **({"lengths": list(self.lengths), "tokens": self.tokens_q} if self.lengths else {}),
            **({"page_size": self.page_size} if self.page_size else {}),
        }


def main_case(dtype: torch.dtype, head_dim: int, seq_len: int, causal: bool) -> Case:
    return Case(
        group="main",
        batch=TOKENS_PER_BATCH // seq_len,
        heads_q=MODEL_WIDTH // head_dim,
        heads_kv=MODEL_WIDTH // head_dim,
        seq_q=seq_len,
        seq_kv=seq_len,
        head_dim=head_dim,
        dtype=dtype,
        causal=causal,
        peers=MAIN_PEERS,
    )


def quick_cases() -> list[Case]:
    return [main_case(torch.bfloat16, d, length, causal) for d, length, causal in QUICK_ROWS]


def full_cases() -> list[Case]:
    """Every case, in running order: bf16 main, the other groups, fp16 main, the variants.

    Within a dtype, cases of one head dim and causality are adjacent so that
    compiled kernels are reused while they are warm.
    """

    def main_group(dtype):
        return [
            main_case(dtype, d, length, causal)
            for d in MAIN_HEAD_DIMS
            for causal in (False, True)
            for length in MAIN_SEQ_LENS
        ]

    side = dict(batch=4, heads_q=16, heads_kv=16, seq_q=4096, seq_kv=4096, head_dim=128)
    mask = [
        Case(group="mask", dtype=torch.bfloat16, mask="key_padding", padded_keys=PADDED_KEYS, peers=MASK_PEERS, **side),
        Case(group="mask", dtype=torch.bfloat16, mask="bias", peers=MASK_PEERS, **side),
    ]
    # float32 forward and backward at d=64 and 128, causal and not (the halves backward's rows, issue 14).
    fp32 = [
        Case(group="fp32", dtype=torch.float32, peers=FP32_PEERS, causal=causal, **{**side, "head_dim": d})
        for d in FP32_HEAD_DIMS
        for causal in (False, True)
    ]
    decode = [
        Case(
            group="decode",
            batch=16,
            heads_q=32,
            heads_kv=8,
            seq_q=1,
            seq_kv=length,
            head_dim=128,
            dtype=torch.bfloat16,
            backward=False,
            peers=DECODE_PEERS,
        )
        for length in DECODE_SEQ_LENS
    ]
    # The variants last: the rest fills one lent-GPU call, so a budget-cut run loses them, not fp16's rows
    # (`--cases variant` runs them alone).
    return (main_group(torch.bfloat16) + mask + fp32 + decode + main_group(torch.float16) + gpu_variant_cases()
            + kv_layout_cases())


def kv_layout_cases(smoke: bool = False, device_type: str = "cuda") -> list[Case]:
    """Issue 12's rows (module docstring), bf16: varlen at d=64 and 128 (H=16), paged decode as the decode
    group's shape (B=16, H=32/8, d=128) per length and page size, chunked prefill (B=4, H=32/8, d=128, pages
    of 256); issue 14's decode-graph rows (H=32/8, d=128, DECODE_GRAPH_ROWS). `smoke`: one tiny row of each,
    odd page size included."""
    if smoke:
        varlen = [dict(lengths=(1, 37, 20, 5), head_dim=16, heads_q=2, heads_kv=2)]
        paged = [(128, 16), (100, 3)]
        prefill = [dict(seq_q=4, seq_kv=64, page_size=16)]
        graph_rows = [(2, 128, 16)]
        shape = dict(batch=2, heads_q=4, heads_kv=2, head_dim=16)
    else:
        varlen = [dict(lengths=VARLEN_LENGTHS, head_dim=d, heads_q=16, heads_kv=16) for d in (128, 64)]
        paged = [(length, page) for length in PAGED_SEQ_LENS for page in PAGE_SIZES]
        prefill = [dict(seq_q=PREFILL_CHUNK, seq_kv=length, page_size=256) for length in PREFILL_SEQ_LENS]
        graph_rows = DECODE_GRAPH_ROWS
        shape = dict(batch=16, heads_q=32, heads_kv=8, head_dim=128)
    peers = lambda names: on_device(names, device_type)  # noqa: E731
    rows = [
        Case(group="varlen", batch=len(v["lengths"]), seq_q=max(v["lengths"]), seq_kv=max(v["lengths"]),
             dtype=torch.bfloat16, causal=True, peers=peers(VARLEN_PEERS), **v)
        for v in varlen
    ]
    rows += [
        # One query row sees every key, causal or not: not causal, as torch's top-left is_causal would differ.
        Case(group="paged", seq_q=1, seq_kv=length, lengths=(length,) * shape["batch"], page_size=page,
             dtype=torch.bfloat16, backward=False, peers=peers(PAGED_PEERS), **shape)
        for length, page in paged
    ]
    prefill_shape = dict(shape, batch=2 if smoke else 4)
    rows += [
        Case(group="prefill", lengths=(p["seq_kv"],) * prefill_shape["batch"], dtype=torch.bfloat16, causal=True,
             backward=False, peers=peers(PREFILL_PEERS), **p, **prefill_shape)
        for p in prefill
    ]
    rows += [
        Case(group="decode-graph", seq_q=1, seq_kv=length, lengths=(length,) * batch, page_size=page,
             dtype=torch.bfloat16, backward=False, peers=peers(DECODE_GRAPH_PEERS), **dict(shape, batch=batch))
        for batch, length, page in graph_rows
    ]
    return rows


def variant_options(name: str, window: int) -> dict:
    """The Case fields of one variant row: 'window', 'softcap', 'sinks' or 'alibi'."""
    return {"window": {"window": window}, "softcap": {"softcap": SOFTCAP}, "sinks": {"sinks": True},
            "alibi": {"alibi": True}}[name]  # fmt: skip


def gpu_variant_cases() -> list[Case]:
    """bf16, causal: window 4096 in 32k (B=1, H=16, d=128); softcap, sinks, ALiBi at L=4096 (B=4, H=16,
    d=128); a d=512 row (B=4, H=4) with every peer, for the head dims past the fused kernels' limits."""
    shape = dict(heads_q=16, heads_kv=16, head_dim=128, dtype=torch.bfloat16, causal=True, peers=VARIANT_PEERS)
    window = Case(group="variant", batch=1, seq_q=GPU_WINDOW_SEQ_LEN, seq_kv=GPU_WINDOW_SEQ_LEN,
                  window=GPU_WINDOW, **shape)
    others = [
        Case(group="variant", batch=4, seq_q=GPU_VARIANT_SEQ_LEN, seq_kv=GPU_VARIANT_SEQ_LEN,
             **variant_options(name, GPU_WINDOW), **shape)
        for name in VARIANTS if name != "window"
    ]
    wide = Case(group="variant", batch=4, heads_q=4, heads_kv=4, seq_q=GPU_VARIANT_SEQ_LEN,
                seq_kv=GPU_VARIANT_SEQ_LEN, head_dim=512, dtype=torch.bfloat16, causal=True, peers=MAIN_PEERS)
    return [window, *others, wide]  # fmt: skip


def on_device(peers: tuple[str, ...], device_type: str) -> tuple[str, ...]:
    """The peers that can run on the device: on a CPU, flashsdpa, torch's own choice, math and Flex; a CUDA-graph
    peer stays, to say why it did not run."""
    if device_type == "cuda":
        return peers
    kept = tuple(p for p in peers if p in CPU_PEERS or p.endswith(GRAPH_SUFFIX))
    return kept + tuple(p for p in CPU_PEERS if p not in peers)


def cpu_cases(quick: bool) -> list[Case]:
    """The CPU matrix (module docstring), in running order: the dense rows, the masks, the variants."""
    lengths = CPU_QUICK_SEQ_LENS if quick else CPU_SEQ_LENS
    shape = dict(batch=CPU_BATCH, heads_q=CPU_HEADS, heads_kv=CPU_HEADS, peers=CPU_PEERS)
    dense = [
        Case(group="cpu", dtype=dtype, head_dim=d, seq_q=length, seq_kv=length, causal=causal, **shape)
        for dtype in CPU_DTYPES
        for d in CPU_HEAD_DIMS
        for causal in (False, True)
        for length in lengths
    ]
    if quick:
        return dense
    masks = [
        Case(group="cpu-mask", dtype=dtype, head_dim=64, seq_q=length, seq_kv=length, mask=mask,
             padded_keys=length // 8 if mask == "key_padding" else 0, **shape)
        for dtype in CPU_DTYPES
        for mask in ("key_padding", "bias")
        for length in CPU_MASK_SEQ_LENS
    ]  # fmt: skip
    variants = [
        Case(group="cpu-variant", dtype=dtype, head_dim=64, seq_q=CPU_VARIANT_SEQ_LEN, seq_kv=CPU_VARIANT_SEQ_LEN,
             causal=True, **variant_options(name, CPU_WINDOW), **dict(shape, peers=VARIANT_PEERS))
        for dtype in CPU_DTYPES
        for name in VARIANTS
    ]  # fmt: skip
    return dense + masks + variants


def smoke_cases(quick: bool, device_type: str = "cpu") -> list[Case]:
    """A tiny matrix with the structure of the real one, for smoke tests (seconds)."""
    small = dict(batch=1, heads_q=2, heads_kv=2, seq_q=64, seq_kv=64, head_dim=16)
    main = [
        Case(group="main", dtype=torch.bfloat16, causal=causal, peers=on_device(MAIN_PEERS, device_type), **small)
        for causal in (False, True)
    ]
    if quick:
        return main
    return main + [
        Case(group="mask", dtype=torch.bfloat16, mask="key_padding", padded_keys=8,
             peers=on_device(MASK_PEERS, device_type), **small),
        Case(group="mask", dtype=torch.bfloat16, mask="bias", peers=on_device(MASK_PEERS, device_type), **small),
        Case(group="fp32", dtype=torch.float32, peers=on_device(FP32_PEERS, device_type), **small),
        Case(
            group="decode",
            batch=2,
            heads_q=4,
            heads_kv=2,
            seq_q=1,
            seq_kv=128,
            head_dim=16,
            dtype=torch.bfloat16,
            backward=False,
            peers=on_device(DECODE_PEERS, device_type),
        ),
    ] + [
        Case(group="variant", dtype=torch.float32, causal=True, peers=on_device(VARIANT_PEERS, device_type),
             **variant_options(name, 16), **small)
        for name in VARIANTS
    ] + kv_layout_cases(smoke=True, device_type=device_type)  # fmt: skip


def matrix(device_type: str, quick: bool, smoke: bool = False) -> list[Case]:
    if smoke:
        return smoke_cases(quick, device_type)
    if device_type == "cuda":
        return quick_cases() if quick else full_cases()
    return cpu_cases(quick)


def select(cases: list[Case], patterns: str | None) -> list[Case]:
    """Keep the cases matching any comma-separated pattern: a glob over the case
    name ('main/bf16-d128-*'), else a substring ('decode', 'd64', '-causal').
    'none' selects nothing (e.g. `--model` alone); None or '' keeps all."""
    if not patterns:
        return list(cases)
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    if wanted == ["none"]:
        return []

    def matches(case: Case, pattern: str) -> bool:
        if any(ch in pattern for ch in "*?["):
            return fnmatch.fnmatchcase(case.name, pattern)
        return pattern in case.name

    return [case for case in cases if any(matches(case, p) for p in wanted)]


@dataclass
class InputSet:
    """Inputs for one timed call. grad_out is None for forward-only cases."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None
    grad_out: torch.Tensor | None
    sinks: torch.Tensor | None = None  # (H,) float32 sink logits of a sinks case
    # varlen: query/key/value packed (tokens, H, E), and their cumulative offsets (B + 1,) int32
    cu_seqlens: torch.Tensor | None = None
    # paged/prefill: key/value as torch's peers read them, (B, Hkv, S, E); flashsdpa reads the same keys
    # from shuffled pages (pages, page_size, Hkv, E) through block_table (B, pages per sequence)
    k_pages: torch.Tensor | None = None
    v_pages: torch.Tensor | None = None
    block_table: torch.Tensor | None = None
    cache_seqlens: torch.Tensor | None = None

    @property
    def differentiable(self) -> tuple[torch.Tensor, ...]:
        return (self.query, self.key, self.value)


def make_input_sets(case: Case, device: torch.device, count: int, seed: int) -> list[InputSet]:
    """`count` independent sets of standard-normal inputs (never zeros or constants)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)

    def randn(*shape, dtype=case.dtype, grad=False):
        tensor = torch.randn(*shape, generator=generator, device=device, dtype=dtype)
        return tensor.requires_grad_(grad)

    sets = []
    for _ in range(count):
        q_shape = (case.batch, case.heads_q, case.seq_q, case.head_dim)
        kv_shape = (case.batch, case.heads_kv, case.seq_kv, case.head_dim)
        if case.group == "varlen":
            q_shape, kv_shape = (case.tokens_q, case.heads_q, case.head_dim), (case.tokens_q, case.heads_kv,
                                                                                case.head_dim)  # fmt: skip
        if case.mask == "key_padding":
            mask = torch.ones(case.batch, 1, 1, case.seq_kv, dtype=torch.bool, device=device)
            mask[..., case.seq_kv - case.padded_keys :] = False
        elif case.mask == "bias":
            mask = randn(1, case.heads_q, case.seq_q, case.seq_kv)
        else:
            mask = None
        sets.append(
            InputSet(
                query=randn(*q_shape, grad=case.backward),
                key=randn(*kv_shape, grad=case.backward),
                value=randn(*kv_shape, grad=case.backward),
                mask=mask,
                grad_out=randn(*q_shape) if case.backward else None,
                sinks=randn(case.heads_q, dtype=torch.float32) if case.sinks else None,
            )
        )
        layout = sets[-1]
        if case.group == "varlen":
            offsets = torch.tensor((0, *case.lengths), device=device).cumsum(0)
            layout.cu_seqlens = offsets.to(torch.int32)
        elif case.group in CACHE_GROUPS:
            layout.k_pages, layout.block_table = paged_copy(layout.key, case.page_size, generator)
            layout.v_pages, _ = paged_copy(layout.value, case.page_size, generator, layout.block_table)
            layout.cache_seqlens = torch.tensor(case.lengths, dtype=torch.int32, device=device)
    return sets


def paged_copy(cache: torch.Tensor, page_size: int, generator: torch.Generator,
               block_table: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(pages (B * P, page_size, Hkv, E), block_table (B, P) int32): `cache` (B, Hkv, S, E) in pages of
    page_size, P = ceil(S / page_size), placed in a random order (as a serving allocator leaves them), or
    in `block_table`'s."""
    batch, heads, length, dim = cache.shape
    per_sequence = -(-length // page_size)
    padded = cache.new_zeros(batch, per_sequence * page_size, heads, dim)
    padded[:, :length] = cache.detach().transpose(1, 2)
    if block_table is None:
        order = torch.randperm(batch * per_sequence, generator=generator, device=cache.device)
        block_table = order.view(batch, per_sequence).to(torch.int32)
    pages = torch.empty_like(padded).view(batch * per_sequence, page_size, heads, dim)
    pages[block_table.flatten().long()] = padded.view(batch * per_sequence, page_size, heads, dim)
    return pages, block_table
