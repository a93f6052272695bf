"""How precisely the triton backward computes 16-bit gradients: as precisely as torch would.

torch's own SDPA backward on a GPU has two precision classes. Its fused 16-bit
kernels (flash, mem-efficient) round P and dS to 16 bits once before the
tensor cores and take delta = rowsum(dO * O) from the rounded output. Its math
backend, which torch falls back to for problems the fused kernels refuse
(inputs that are not 4-D, batch or head dims that only broadcast, backends
disabled by `sdpa_kernel`, ...), works in float32 internally and is 1.6-2.6x
more accurate on float16 gradients (H100). On a CPU the same holds: its fused
flash kernel (run by flashsdpa's aten backend) gives 16-bit gradients at up to
1.4x the error of its math path, and 2x for 3-D inputs, where torch's math path
is what torch runs.

flashsdpa matches whichever torch would run for the same call
(`GradientPrecision`, in descriptor.py):

* ROUNDED: FA2's arithmetic, 5 matrix products per tile pair after the
  forward's 2 (FA2-style in BENCHMARKS.md).
* EXACT: P rescaled to sum to 1 and delta taken from the same P by an extra
  row pass, and P and dS fed to the tensor cores as hi + lo 16-bit halves;
  about 1.8x the time of ROUNDED, at torch's float32-internal error.

float32 is always EXACT (see BackwardConfig.renormalize_rows): a float32 lse
rounding would otherwise put the gradients at many times torch's error. A
mask gradient always takes the exact row pass (launch_backward).

The choice is made at the forward, as torch makes its own: `at_forward` reads
the caller's tensors (their rank and broadcast dims, which flashsdpa's
canonical 4-D views no longer show) and the backend flags in force around the
forward, and the call carries the answer to its backward
(`AttentionDescriptor.gradients`). torch is asked only where a backward can
follow (grad enabled, an input requiring grad) for 16-bit inputs. Under
torch.compile torch's flags are not read while tracing: the shape rule is
applied then (plain Python), and where the flags would decide the call carries
AUTO, which the backward resolves with the flags in force when it runs
(`at_backward`).
"""

from __future__ import annotations

import torch

from flashsdpa.backends.base import AttentionInputs
from flashsdpa.cache import RecentValues
from flashsdpa.descriptor import AttentionDescriptor, GradientPrecision, MaskKind

# Tests and benchmarks pin a precision here; None follows torch.
pinned: GradientPrecision | None = None

_SIXTEEN_BIT = (torch.float16, torch.bfloat16)


def at_forward(query, key, value, attn_mask, dropout_p: float, causal: bool, enable_gqa: bool) -> GradientPrecision:
    """The precision of the backward torch's own SDPA would run for this call (the caller's arguments, validated)."""
    if pinned is not None:
        return pinned
    if query.dtype not in _SIXTEEN_BIT:  # float32 is always EXACT (module docstring)
        return GradientPrecision.EXACT
    # Every 16-bit call reads this: spelled out, as any() over a generator costs ~0.5 us more.
    backward_can_follow = torch.is_grad_enabled() and (
        query.requires_grad or key.requires_grad or value.requires_grad
        or (attn_mask is not None and attn_mask.requires_grad)
    )  # fmt: skip
    if not backward_can_follow:
        return GradientPrecision.EXACT  # never read, so torch is not asked
    if not fused_kernels_take_shapes(query, key, value, enable_gqa):
        return GradientPrecision.EXACT
    if torch.compiler.is_compiling():
        # Flags read while tracing would be baked into the graph: the backward
        # reads them instead, on the canonical views, which for shapes that
        # pass the rule above are the caller's own tensors.
        return GradientPrecision.AUTO
    fused = torch_runs_fused_kernel(query, key, value, attn_mask is not None, dropout_p, causal, enable_gqa)
    return GradientPrecision.ROUNDED if fused else GradientPrecision.EXACT


def of_plain_cpu_call() -> GradientPrecision:
    """`at_forward` of a 16-bit CPU call that records a graph and that `call_plans.plain_cpu_call` takes: 4-D
    tensors of one batch size and head count, no mask, no dropout, unit last strides, every size > 0, no
    tracing. torch's CPU dispatch checks exactly those for its flash kernel (besides the dtype), so what is
    left to read is whether flash is enabled (`sdpa_kernel`); tests hold this to torch's own answer."""
    if pinned is not None:
        return pinned
    return GradientPrecision.ROUNDED if _flash_enabled() else GradientPrecision.EXACT


_flash_enabled = torch.backends.cuda.flash_sdp_enabled  # (torch's flag for its CPU flash kernel too)


def at_backward(desc: AttentionDescriptor, inputs: AttentionInputs) -> GradientPrecision:
    """`desc.gradients`, with AUTO resolved: what torch's flags in force now choose for `desc`'s shapes."""
    if desc.gradients is not GradientPrecision.AUTO:
        return desc.gradients
    if pinned is not None:
        return pinned
    if desc.dtype not in _SIXTEEN_BIT:
        return GradientPrecision.EXACT
    # The caller's enable_gqa is not carried: a GQA call is one whose canonical head counts differ.
    fused = torch_runs_fused_kernel(inputs.query, inputs.key, inputs.value, desc.mask is not MaskKind.NONE,
                                    desc.dropout_p, desc.causal, desc.heads_q != desc.heads_kv)  # fmt: skip
    return GradientPrecision.ROUNDED if fused else GradientPrecision.EXACT


def fused_kernels_take_shapes(query, key, value, enable_gqa: bool) -> bool:
    """torch's shape rule for its fused kernels, on the caller's tensors: 4-D, one batch size (no
    broadcasting), one key/value head count, and the query's too unless enable_gqa."""
    q, k, v = query.shape, key.shape, value.shape
    if not len(q) == len(k) == len(v) == 4:
        return False
    return q[0] == k[0] == v[0] and k[1] == v[1] and (enable_gqa or q[1] == k[1])


def torch_runs_fused_kernel(
    query, key, value, has_mask: bool, dropout_p: float, causal: bool, enable_gqa: bool
) -> bool:
    """Whether torch's flash or mem-efficient SDPA kernel would take this problem.

    Asks torch itself (torch.backends.cuda.can_use_*; on a CPU, which kernel
    torch's dispatch would choose), so the answer follows torch's version, the
    GPU, and the backends the caller enabled (inside
    `sdpa_kernel([SDPBackend.MATH])` it is False). cuDNN attention is left out:
    where only cuDNN would run, EXACT is the safe side. Other devices, and torch
    builds without this API, get False.
    """
    if query.device.type not in ("cuda", "cpu"):
        return False
    # The enable flags are what `sdpa_kernel(...)` sets; checked here explicitly, not left to can_use_*.
    flash_enabled = torch.backends.cuda.flash_sdp_enabled()
    mem_efficient_enabled = torch.backends.cuda.mem_efficient_sdp_enabled()
    # Everything torch's checks read; asking torch costs ~15 us on the H100's host, a lookup ~2.
    facts = (
        query.shape, key.shape, value.shape, query.stride(), key.stride(), value.stride(),
        query.dtype, key.dtype, value.dtype, query.device,
        query.requires_grad, key.requires_grad, value.requires_grad,
        has_mask, dropout_p, causal, enable_gqa, flash_enabled, mem_efficient_enabled,
        torch.are_deterministic_algorithms_enabled(),
    )  # fmt: skip
    answer = _torch_answers.get(facts)
    if answer is None:
        if query.device.type == "cpu":
            answer = _torch_answers.keep(facts, _torch_runs_cpu_flash(query, key, value, has_mask, dropout_p, causal,
                                                                      enable_gqa))  # fmt: skip
        else:
            answer = _torch_answers.keep(facts, _ask_torch(
                query, key, value, has_mask, dropout_p, causal, enable_gqa, flash_enabled, mem_efficient_enabled,
            ))  # fmt: skip
    return answer


def _torch_runs_cpu_flash(query, key, value, has_mask, dropout_p, causal, enable_gqa) -> bool:
    """Whether torch's SDPA dispatch picks its fused CPU flash kernel (it reads the same enable flags)."""
    try:
        from torch.nn.attention import SDPBackend

        mask = _mask_stand_in(query) if has_mask else None
        choice = torch._fused_sdp_choice(query, key, value, mask, dropout_p, causal, scale=None, enable_gqa=enable_gqa)
    except (AttributeError, ImportError, RuntimeError, TypeError):  # pragma: no cover - another torch
        return False
    return choice == int(SDPBackend.FLASH_ATTENTION)


# torch's answers by the facts its checks read.
_torch_answers = RecentValues()


def _ask_torch(query, key, value, has_mask, dropout_p, causal, enable_gqa, flash_enabled, mem_efficient_enabled):
    try:
        from torch.backends.cuda import SDPAParams, can_use_efficient_attention, can_use_flash_attention
    except ImportError:  # pragma: no cover - torch < 2.5
        return False
    # torch decides on the caller's mask after turning a bool mask into an
    # additive one of the query's dtype; only its presence and layout class
    # matter here, so a 1-element stand-in of that dtype takes its place.
    mask = _mask_stand_in(query) if has_mask else None
    try:
        params = SDPAParams(query, key, value, mask, dropout_p, causal, enable_gqa)
    except TypeError:  # pragma: no cover - a torch whose SDPAParams takes other arguments
        return False
    return bool(
        (flash_enabled and can_use_flash_attention(params))
        or (mem_efficient_enabled and can_use_efficient_attention(params))
    )


_mask_stand_ins: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _mask_stand_in(query: torch.Tensor) -> torch.Tensor:
    key = (query.dtype, query.device)
    if key not in _mask_stand_ins:
        _mask_stand_ins[key] = torch.zeros((1, 1, 1, 1), dtype=query.dtype, device=query.device)
    return _mask_stand_ins[key]
