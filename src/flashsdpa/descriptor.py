"""What one attention problem is, and which part of it is compiled into a kernel.

`AttentionDescriptor` describes a whole call (shapes, dtypes, options and the
resolved softmax scale). `KernelKey` keeps only the problem's fields that shape
generated code, the variants' flags included: the block-shape tables key on it,
and every Triton kernel spec (backends/triton/kernel_specs.py) is built from it,
the tables' choice for it and the launch's layout flags. Run-time values (the
scale, sequence lengths, batch and head counts, strides, pointers, the dropout
probability and seed, a window's sizes, softcap's value) never enter it, so a
kernel compiled for one scale serves every scale and can never be reused for a
problem it was not built for.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import operator
from dataclasses import dataclass

import torch


class MaskKind(str, enum.Enum):
    NONE = "none"
    BOOL = "bool"  # True = may attend
    FLOAT = "float"  # added to the scaled scores


class Alignment(str, enum.Enum):
    """Where query i sits among the keys: at key i + `AttentionDescriptor.key_offset`."""

    TOP_LEFT = "top_left"  # offset 0: torch's convention
    BOTTOM_RIGHT = "bottom_right"  # offset seq_kv - seq_q: the last query sits at the last key (FlashAttention's)


class Fp32Precision(str, enum.Enum):
    """How float32 matrix products are computed on tensor-core backends."""

    IEEE = "ieee"  # full float32 accuracy (split-precision tf32 on tensor cores)
    TF32 = "tf32"  # one tf32 product: faster, ~1e-3 relative error; opt-in only


class GradientPrecision(str, enum.Enum):
    """How the triton backward computes 16-bit gradients (policy: flashsdpa/gradient_precision.py)."""

    EXACT = "exact"  # within 1.5x of torch's float32-internal math backend
    ROUNDED = "rounded"  # P and dS rounded once to 16 bits, as torch's flash and mem-efficient kernels do
    # Left to the backward (under torch.compile, whose trace asks torch nothing,
    # or a descriptor built by hand): it asks torch's enable flags when it runs.
    AUTO = "auto"


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the row log-sum-exp and the mask gradient: float32, or float64
    for float64 inputs (whose gradients would otherwise be float32-accurate)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def next_power_of_two(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@dataclass(frozen=True)
class KernelKey:
    """The problem-level fields generated code depends on (the kernel specs add the variants and tiles)."""

    device_type: str
    dtype: torch.dtype
    block_head_dim: int  # head_dim padded to a power of two (>= 16)
    block_head_dim_v: int
    causal: bool
    mask: MaskKind
    mask_rows_broadcast: bool  # mask rows identical for every query (key padding)
    dropout: bool
    gqa: bool
    fp32_precision: Fp32Precision
    # The variants compiled in: which sides of the visible band (flashsdpa/visibility.py) bound it, and the
    # terms of the score transform. The band's diagonals and softcap's value are run-time values.
    bounded_below: bool  # a window's left side
    bounded_above: bool  # causal, or a window's right side
    softcap: bool
    alibi: bool
    sinks: bool


@dataclass(frozen=True)
class AttentionDescriptor:
    """One attention problem in canonical form.

    Tensors are viewed as query (batch, heads_q, seq_q, head_dim), key
    (batch, heads_kv, seq_kv, head_dim), value (batch, heads_kv, seq_kv,
    head_dim_v); `batch` is the product of the caller's leading dims
    (`batch_shape`). The mask, if any, broadcasts to (batch, heads_q, seq_q,
    seq_kv); `mask_broadcast` says which of those four dims it repeats.
    """

    batch_shape: tuple[int, ...]
    heads_q: int
    heads_kv: int
    seq_q: int
    seq_kv: int
    head_dim: int
    head_dim_v: int
    dtype: torch.dtype
    device_type: str
    causal: bool = False
    mask: MaskKind = MaskKind.NONE
    mask_dtype: torch.dtype | None = None
    mask_broadcast: tuple[bool, bool, bool, bool] = (False, False, False, False)
    dropout_p: float = 0.0
    scale: float | None = None  # None: 1/sqrt(head_dim)
    fp32_precision: Fp32Precision = Fp32Precision.IEEE
    # Chosen at the forward; only the backward reads it, so it is not in the KernelKey.
    gradients: GradientPrecision = GradientPrecision.AUTO
    # The variants (semantics: flashsdpa/visibility.py and `flashsdpa.attention`).
    window_left: int = -1  # keys before the aligned position a query sees; -1 = unbounded
    window_right: int = -1  # keys after it; -1 = unbounded (causal clamps it to 0)
    alignment: Alignment = Alignment.TOP_LEFT
    softcap: float = 0.0  # > 0: scores become softcap * tanh(scores / softcap); 0 = off
    alibi: bool = False  # AttentionInputs.alibi_slopes holds the (B, Hq) slopes
    sinks: bool = False  # AttentionInputs.sinks holds the (Hq,) sink logits

    def __post_init__(self) -> None:
        for name in ("heads_q", "heads_kv", "seq_q", "seq_kv", "head_dim", "head_dim_v"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"AttentionDescriptor.{name} must be a non-negative int, got {value!r}")
        if (self.heads_q % self.heads_kv) if self.heads_kv else self.heads_q:  # zero heads: an empty problem
            raise ValueError(
                f"AttentionDescriptor: heads_q={self.heads_q} must be a multiple of heads_kv={self.heads_kv}"
            )
        if not 0.0 <= self.dropout_p < 1.0:
            raise ValueError(f"AttentionDescriptor.dropout_p must be in [0, 1), got {self.dropout_p}")
        if (self.mask is MaskKind.NONE) != (self.mask_dtype is None):
            raise ValueError("AttentionDescriptor: mask_dtype must be given exactly when a mask is")
        if self.scale is None:
            # The caller's head_dim, never a kernel's padded one.
            object.__setattr__(self, "scale", 1.0 / math.sqrt(self.head_dim) if self.head_dim else 1.0)
        if not math.isfinite(self.scale):
            raise ValueError(f"AttentionDescriptor.scale must be finite, got {self.scale}")
        for name in ("window_left", "window_right"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < -1:
                raise ValueError(f"AttentionDescriptor.{name} must be an int >= -1 (-1 = unbounded), got {value!r}")
        if not (self.softcap == 0.0 or 0.0 < self.softcap < math.inf):
            raise ValueError(f"AttentionDescriptor.softcap must be 0 (off) or a finite float > 0, got {self.softcap}")

    def __hash__(self) -> int:
        # Hashed on every call (backends' answers and plans are kept by descriptor): computed once.
        try:
            return self.__dict__["_hash"]
        except KeyError:
            value = hash(_field_values(self))
            object.__setattr__(self, "_hash", value)
            return value

    @property
    def key_offset(self) -> int:
        """The key position of query 0: query i is aligned with key i + key_offset."""
        return self.seq_kv - self.seq_q if self.alignment is Alignment.BOTTOM_RIGHT else 0

    @property
    def windowed(self) -> bool:
        return self.window_left >= 0 or self.window_right >= 0

    @property
    def variants(self) -> tuple[str, ...]:
        """The attention variants this problem uses, by name (empty for torch's SDPA problems)."""
        used = (
            ("window", self.windowed), ("bottom-right alignment", bool(self.key_offset)),
            ("softcap", self.softcap > 0.0), ("ALiBi", self.alibi), ("sinks", self.sinks),
        )  # fmt: skip
        return tuple(name for name, on in used if on)

    @property
    def batch(self) -> int:
        return math.prod(self.batch_shape)

    @property
    def gqa_group(self) -> int:
        """Query heads that share one key/value head."""
        return self.heads_q // self.heads_kv if self.heads_kv else 1

    @functools.cached_property  # read several times per call; computed once per descriptor
    def kernel_key(self) -> KernelKey:
        return KernelKey(
            device_type=self.device_type,
            dtype=self.dtype,
            block_head_dim=max(16, next_power_of_two(self.head_dim)),
            block_head_dim_v=max(16, next_power_of_two(self.head_dim_v)),
            causal=self.causal,
            mask=self.mask,
            mask_rows_broadcast=self.mask is not MaskKind.NONE and self.mask_broadcast[2],
            dropout=self.dropout_p > 0.0,
            gqa=self.heads_q != self.heads_kv,
            fp32_precision=self.fp32_precision,
            bounded_below=self.window_left >= 0,
            bounded_above=self.causal or self.window_right >= 0,
            softcap=self.softcap > 0.0,
            alibi=self.alibi,
            sinks=self.sinks,
        )

    def flops(self, backward: bool = False) -> float:
        """Matrix-product FLOPs of the forward (or backward, counted as 2.5x)."""
        from flashsdpa.visibility import visible_pairs  # visibility builds on this module

        pairs = self.batch * self.heads_q * visible_pairs(self)
        forward = 2.0 * pairs * (self.head_dim + self.head_dim_v)
        return 2.5 * forward if backward else forward


_field_values = operator.attrgetter(*(f.name for f in dataclasses.fields(AttentionDescriptor)))


def causal_pairs(seq_q: int, seq_kv: int) -> int:
    """(i, j) pairs with j <= i, i < seq_q, j < seq_kv (top-left aligned causal)."""
    full_rows = max(0, seq_q - seq_kv)  # rows i >= seq_kv see every key
    tri = min(seq_q, seq_kv)
    return tri * (tri + 1) // 2 + full_rows * seq_kv
