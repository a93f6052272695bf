"""The Hopper backend: a warp-specialised Gluon forward for sm_90 (H100, H200).

It takes the forward of bf16/fp16 problems at head dims 64, 128 and 256
(the same for values), non-causal or causal, with GQA and the variants of
`variants.COMPUTED` (windows, either causal alignment, softcap, ALiBi,
sinks), no mask and no dropout, on a GPU of compute capability 9.0;
`unsupported_reasons` says why for anything else, which the automatic choice
sends to the triton backend. Softcap's forward may be the triton backend's
by choice (`variants.SOFTCAP_FORWARD`, recorded as a fallback), its backward
still this backend's. Its backward runs the Gluon kernels (`backward_kernels.py`) where
`gluon_backward_reasons` finds none against them, else the triton backend's
backward (which reads this forward's out and lse as its own), with the reason
recorded as a fallback. Gluon kernels do not run under Triton's interpreter,
so this backend never takes CPU tensors.
"""

from __future__ import annotations

import functools

import torch

from flashsdpa.backends.base import AttentionInputs, Backend, GradientsNeeded
from flashsdpa.backends.hopper import backward_specs, variants
from flashsdpa.backends.hopper.forward_specs import DTYPES, HEAD_DIMS
from flashsdpa.backends.triton import TritonBackend, cuda_capability
from flashsdpa import gradient_precision
from flashsdpa.descriptor import AttentionDescriptor, GradientPrecision, MaskKind

SM90 = (9, 0)


@functools.lru_cache(maxsize=None)
def _gluon_import_error() -> str | None:
    try:
        from triton.experimental.gluon.language.nvidia import hopper  # noqa: F401
    except ImportError as error:
        return str(error)
    return None


@functools.lru_cache(maxsize=None)
def _launcher():
    from flashsdpa.backends.hopper import launch_forward

    return launch_forward


@functools.lru_cache(maxsize=None)
def _backward_launcher():
    from flashsdpa.backends.hopper import launch_backward

    return launch_backward


def gluon_backward_reasons(desc: AttentionDescriptor, inputs: AttentionInputs, grad_out: torch.Tensor) -> list[str]:
    """Why the Gluon backward does not take a problem this backend's forward took (empty: it does)."""
    reasons = []
    if desc.head_dim not in backward_specs.BACKWARD_HEAD_DIMS:
        reasons.append(f"the Gluon backward takes head dims {backward_specs.BACKWARD_HEAD_DIMS}, not {desc.head_dim}")
    elif desc.head_dim not in backward_specs.GLUON_BACKWARD_HEAD_DIMS:
        reasons.append(f"triton's backward is the faster at head dim {desc.head_dim} (backward_specs)")
    if gradient_precision.at_backward(desc, inputs) is not GradientPrecision.ROUNDED:
        reasons.append("torch's backward here is its float32-internal one (EXACT): the Gluon kernels round P and dS "
                       "once, as torch's fused kernels do")
    if desc.scale == 0:
        reasons.append("the Gluon backward takes a nonzero scale")
    if desc.seq_kv == 1:
        reasons.append("one key: dq and dk are exactly 0, which triton's backward writes (the kernels: rounding noise)")
    taken = variants.BACKWARD_COMPUTED.get(desc.head_dim, ())
    if untaken := [name for name in desc.variants if name not in taken]:
        reasons.append(f"the Gluon backward does not compute {', '.join(untaken)} at head dim {desc.head_dim}")
    if desc.seq_q == 0 or desc.seq_kv == 0 or desc.batch * desc.heads_q == 0:
        reasons.append("the Gluon backward takes no empty problem")
    if not _launcher().tma_readable(inputs.query, inputs.key, inputs.value, grad_out):
        reasons.append("q, k, v or dO strides or alignment are not TMA-readable")
    return reasons


class HopperBackend(Backend):
    name = "hopper"
    checks_variants = True  # (variants.COMPUTED)

    def __init__(self):
        self._triton = TritonBackend()

    def unsupported_reasons(self, desc: AttentionDescriptor, device: torch.device) -> list[str]:
        if device.type != "cuda":
            return ["hopper runs CUDA tensors only (its Gluon kernels have no interpreter)"]
        reasons = []
        capability = cuda_capability(device)
        if capability != SM90:
            reasons.append(f"hopper kernels need compute capability 9.0, not {capability[0]}.{capability[1]}")
        error = _gluon_import_error()
        if error is not None:
            reasons.append(f"triton's Gluon for Hopper is not importable ({error})")
        if desc.dtype not in DTYPES:
            reasons.append(f"hopper kernels take float16 and bfloat16, not {desc.dtype}")
        if desc.head_dim != desc.head_dim_v or desc.head_dim not in HEAD_DIMS:
            reasons.append(f"hopper kernels take head dims {HEAD_DIMS} (equal for values), "
                           f"not {desc.head_dim}/{desc.head_dim_v}")
        if desc.mask is not MaskKind.NONE:
            reasons.append("hopper kernels take no attention mask")
        if desc.dropout_p > 0.0:
            reasons.append("hopper kernels have no dropout")
        if untaken := [name for name in desc.variants if name not in variants.COMPUTED]:
            reasons.append(f"hopper kernels do not compute {', '.join(untaken)}")
        return reasons

    def forward(self, desc: AttentionDescriptor, inputs: AttentionInputs):
        launcher = _launcher()
        reason = None
        if variants.softcap_forward(desc) == "triton":
            reason = (f"hopper: softcap's forward at head dim {desc.head_dim} is triton's "
                      "(hopper.variants.SOFTCAP_FORWARD); ran triton")
        elif not launcher.tma_readable(inputs.query, inputs.key, inputs.value):
            reason = "hopper: q, k or v strides or alignment are not TMA-readable; ran triton"
        if reason is not None:
            from flashsdpa import dispatch  # (dispatch imports the backends)

            dispatch.record_fallback(reason)
            return self._triton.forward(desc, inputs)
        return launcher.attention_forward(desc, inputs)

    def backward(self, desc, inputs, out, lse, grad_out, needed: GradientsNeeded):
        reasons = gluon_backward_reasons(desc, inputs, grad_out)
        if reasons:
            from flashsdpa import dispatch  # (dispatch imports the backends)

            dispatch.record_fallback(f"hopper backward: {'; '.join(reasons)}; ran triton's")
            return self._triton.backward(desc, inputs, out, lse, grad_out, needed)
        dq, dk, dv = _backward_launcher().attention_backward(desc, inputs, out, lse, grad_out)
        return (dq if needed.query else None, dk if needed.key else None, dv if needed.value else None, None)
