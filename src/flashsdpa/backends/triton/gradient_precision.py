"""How precisely the Triton backward computes 16-bit gradients: as precisely as torch would.

torch's own SDPA backward on a GPU has two precision classes. Its fused 16-bit
kernels (flash, mem-efficient) round P and dS to 16 bits once before the
tensor cores and take delta = rowsum(dO * O) from the rounded output. Its math
backend, which torch falls back to for problems the fused kernels refuse
(inputs that are not 4-D, batch or head dims that only broadcast, backends
disabled by `sdpa_kernel`, ...), works in float32 internally and is 1.6-2.6x
more accurate on float16 gradients (H100).

flashsdpa matches whichever torch would run for the same call:

* ROUNDED: FA2's arithmetic, 5 matrix products per tile pair after the
  forward's 2 (FA2-style in BENCHMARKS.md).
* EXACT: P rescaled to sum to 1 and delta taken from the same P by an extra
  row pass, and P and dS fed to the tensor cores as hi + lo 16-bit halves;
  about 1.8x the time of ROUNDED, at torch's float32-internal error.

float32 is always EXACT (see BackwardConfig.renormalize_rows): a float32 lse
rounding would otherwise put the gradients at many times torch's error. A
mask gradient always takes the exact row pass (launch_backward).

The choice is made when the backward runs, with the backend flags in force
then; torch makes it at the forward. Code that wraps only the forward in
`sdpa_kernel(...)` gets the precision of the flags around its backward.
"""

from __future__ import annotations

import enum

import torch

from flashsdpa.backends.base import AttentionInputs
from flashsdpa.descriptor import AttentionDescriptor, MaskKind


class GradientPrecision(str, enum.Enum):
    EXACT = "exact"  # within 1.5x of torch's float32-internal math backend
    ROUNDED = "rounded"  # P and dS rounded once to 16 bits, as torch's flash and mem-efficient kernels do


# Tests and benchmarks pin a precision here; None follows torch.
pinned: GradientPrecision | None = None


def matching_torch(desc: AttentionDescriptor, inputs: AttentionInputs) -> GradientPrecision:
    """The precision of the backward torch's own SDPA would run on this problem, on this device."""
    if pinned is not None:
        return pinned
    if desc.dtype == torch.float32:
        return GradientPrecision.EXACT
    return GradientPrecision.ROUNDED if torch_runs_fused_kernel(desc, inputs) else GradientPrecision.EXACT


def torch_runs_fused_kernel(desc: AttentionDescriptor, inputs: AttentionInputs) -> bool:
    """Whether torch's flash or mem-efficient SDPA kernel would take this problem.

    Asks torch itself (torch.backends.cuda.can_use_*), so the answer follows
    torch's version, the GPU, and the backends the caller enabled (inside
    `sdpa_kernel([SDPBackend.MATH])` it is False). cuDNN attention is left out:
    where only cuDNN would run, EXACT is the safe side. CPU tensors, and torch
    builds without this API, get False.
    """
    query = inputs.query
    # torch's fused kernels take 4-D inputs with equal batch and (without GQA)
    # head counts only. flashsdpa's canonical views hide a caller's other rank
    # (desc.batch_shape keeps it) and broadcast dims (stride 0 here); torch
    # would have run math on those. (An input that was itself an expanded view
    # lands here too: EXACT, the safe side.)
    if len(desc.batch_shape) != 1:
        return False
    for tensor in (query, inputs.key, inputs.value):
        if any(tensor.shape[d] > 1 and tensor.stride(d) == 0 for d in (0, 1)):
            return False
    if query.device.type != "cuda":
        return False
    try:
        from torch.backends.cuda import SDPAParams, can_use_efficient_attention, can_use_flash_attention
    except ImportError:  # pragma: no cover - torch < 2.5
        return False
    # torch decides on the caller's mask after turning a bool mask into an
    # additive one of the query's dtype; only its presence and layout class
    # matter here, so a 1-element stand-in of that dtype takes its place.
    mask = _mask_stand_in(query) if desc.mask is not MaskKind.NONE else None
    try:
        params = SDPAParams(query, inputs.key, inputs.value, mask, desc.dropout_p, desc.causal,
                            desc.heads_q != desc.heads_kv)  # fmt: skip
    except TypeError:  # pragma: no cover - a torch whose SDPAParams takes other arguments
        return False
    # The enable flags are what `sdpa_kernel(...)` sets; checked here explicitly, not left to can_use_*.
    backends = torch.backends.cuda
    return bool(
        (backends.flash_sdp_enabled() and can_use_flash_attention(params))
        or (backends.mem_efficient_sdp_enabled() and can_use_efficient_attention(params))
    )


_mask_stand_ins: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _mask_stand_in(query: torch.Tensor) -> torch.Tensor:
    key = (query.dtype, query.device)
    if key not in _mask_stand_ins:
        _mask_stand_ins[key] = torch.zeros((1, 1, 1, 1), dtype=query.dtype, device=query.device)
    return _mask_stand_ins[key]
