"""The contract every backend implements.

Backends see problems in canonical form only (see `AttentionDescriptor`):
query (B, Hq, L, E), key (B, Hkv, S, E), value (B, Hkv, S, Ev), any strides;
the mask, if any, is a (B, Hq, L, S) view whose broadcast dims have stride 0
(never materialised). Degenerate problems (L, S or B*H equal to 0) are
handled before a backend is called, so backends may assume L, S >= 1.
"""

from __future__ import annotations

import abc
import contextlib
import threading
from dataclasses import dataclass
from typing import ClassVar

import torch

from flashsdpa.descriptor import AttentionDescriptor


# Process-wide, not per thread: autograd runs CUDA backward passes on its own
# threads, which must see the test's setting too.
_poison_depth = 0
_poison_lock = threading.Lock()


@contextlib.contextmanager
def poisoned_outputs():
    """Within the block, `new_output` fills with NaN (ints with -1) so that an
    element a kernel forgot to write fails the test that reads it."""
    global _poison_depth
    with _poison_lock:
        _poison_depth += 1
    try:
        yield
    finally:
        with _poison_lock:
            _poison_depth -= 1


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Every backend allocates its outputs (out, lse, gradients) through here."""
    if _poison_depth:
        fill = float("nan") if dtype.is_floating_point else -1
        return torch.full(shape, fill, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@dataclass(frozen=True)
class AttentionInputs:
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None = None
    dropout_seed: tuple[int, int] | None = None  # see flashsdpa.dropout
    # In statistics_dtype(query.dtype) (float32; float64 for float64 inputs); see validation.Variants.
    alibi_slopes: torch.Tensor | None = None  # (B, Hq), stride 0 over a broadcast batch; given iff desc.alibi
    sinks: torch.Tensor | None = None  # (Hq,); given iff desc.sinks. Backends' backward needs no sink code:
    # P = exp(s - lse) with the forward's lse (sink included) is already right, and ops.sink_gradient does the rest.


@dataclass(frozen=True)
class PackedSequences:
    """Where each of N packed sequences lies, as device tensors a backend's kernels read (no host copy).

    With a descriptor of batch N, seq_q = max_q and seq_kv = max_k (bounds on the lengths), and inputs
    whose query is the (1, Hq, total_q, E) view of the packed rows (keys likewise): sequence b is query
    rows [cu_seq_q[b], cu_seq_q[b + 1]) and key rows [cu_seq_k[b], cu_seq_k[b] + key_counts[b]).
    Causal alignment, windows and ALiBi's offset follow each sequence's own lengths.
    """

    cu_seq_q: torch.Tensor  # (N + 1,) int32 or int64
    cu_seq_k: torch.Tensor  # (N + 1,) or (N,): key start offsets
    key_counts: torch.Tensor  # (N,)
    covers_keys: bool = True  # every key row belongs to a sequence (False: zero gradients for the others)


@dataclass(frozen=True)
class GradientsNeeded:
    query: bool = True
    key: bool = True
    value: bool = True
    mask: bool = False


class Backend(abc.ABC):
    name: ClassVar[str]
    # Whether `unsupported_reasons` answers for the attention variants (window, alignment, softcap, ALiBi,
    # sinks: `AttentionDescriptor.variants`). A backend that does not declare it is never given a problem
    # with one: dispatch declines it there itself, so a new backend cannot ignore a variant silently.
    checks_variants: ClassVar[bool] = False
    # Whether the backend runs a whole packed batch in one call (`packed_unsupported_reasons`,
    # `packed_forward`, `packed_backward`); others get one call per sequence (flashsdpa.varlen).
    runs_packed: ClassVar[bool] = False

    @abc.abstractmethod
    def unsupported_reasons(self, desc: AttentionDescriptor, device: torch.device) -> list[str]:
        """Empty if this backend computes `desc` exactly; else one short sentence per reason."""

    @abc.abstractmethod
    def forward(self, desc: AttentionDescriptor, inputs: AttentionInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns out (B, Hq, L, Ev) in desc.dtype and lse (B, Hq, L) in statistics_dtype(desc.dtype).

        lse is the natural-log log-sum-exp of each row of the scaled, masked
        scores (before dropout), the row's sink logit included where desc.sinks;
        -inf for a row with no key it may attend to (the sink's logit with a
        sink), whose output row is zeros.
        """

    @abc.abstractmethod
    def backward(
        self,
        desc: AttentionDescriptor,
        inputs: AttentionInputs,
        out: torch.Tensor,
        lse: torch.Tensor,
        grad_out: torch.Tensor,
        needed: GradientsNeeded,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Returns (dq, dk, dv, dmask); None for a gradient not needed.

        dq/dk/dv have the shapes of query/key/value (GQA: dk, dv summed over
        each group's query heads) in desc.dtype. dmask is the full
        (B, Hq, L, S) gradient of the additive mask (the score gradient), in
        statistics_dtype(desc.dtype); the caller reduces it over broadcast dims.
        """
