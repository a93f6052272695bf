"""Each Triton kernel's spec (kernel_specs) names exactly the kernel's constexpr parameters, and the launchers
build their launches from it."""

from __future__ import annotations

import inspect

import pytest
import torch

pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import flashsdpa  # noqa: E402
from flashsdpa.backends.triton import backward_kernels, decode_kernels, direct_launch, forward_kernels  # noqa: E402
from flashsdpa.backends.triton import paged_kernels  # noqa: E402
from flashsdpa.backends.triton import kernel_specs  # noqa: E402

KERNELS = [
    (forward_kernels.attention_forward_kernel, kernel_specs.ForwardKernelSpec),
    (decode_kernels.attention_decode_split_kernel, kernel_specs.DecodeSplitKernelSpec),
    (paged_kernels.attention_paged_decode_kernel, kernel_specs.PagedDecodeKernelSpec),
    (backward_kernels.attention_backward_dq_kernel, kernel_specs.BackwardDqKernelSpec),
    (backward_kernels.attention_backward_dkdv_kernel, kernel_specs.BackwardDkdvKernelSpec),
]


def constexpr_names(kernel) -> set[str]:
    parameters = inspect.signature(kernel.fn).parameters.values()
    return {p.name for p in parameters if p.annotation is tl.constexpr or p.annotation == "tl.constexpr"}


@pytest.mark.parametrize("kernel,spec", KERNELS, ids=lambda x: getattr(x, "__name__", ""))
def test_spec_fields_are_the_kernels_constexprs(kernel, spec):
    assert spec.constexpr_names() == constexpr_names(kernel)


def test_launches_take_their_constexprs_from_the_specs(monkeypatch):
    """Every launcher the forward, backward and paged decode make gets a spec's launch arguments, whole."""
    made = []
    original = direct_launch.launcher

    def recording(kernel, **constexprs):
        made.append((kernel, constexprs))
        return original(kernel, **constexprs)

    from flashsdpa.backends.triton import launch_backward, launch_forward, launch_paged

    monkeypatch.setattr(launch_forward, "launcher", recording)
    monkeypatch.setattr(launch_backward, "launcher", recording)
    monkeypatch.setattr(launch_paged, "launcher", recording)
    cache = torch.randn(2, 9, 1, 16)  # paged decode: a kvcache call
    flashsdpa.kvcache_attention(torch.randn(1, 1, 2, 16), cache, cache, cache_seqlens=5, window_size=(1, 2), softcap=3.0,
                                block_table=torch.tensor([[1, 0]]), backend="triton")  # fmt: skip
    for seq_q in (3, 37):  # flash decoding and the main kernel
        q = torch.randn(1, 2, seq_q, 16, requires_grad=True)
        k = torch.randn(1, 2, 21, 16, requires_grad=True)
        out = flashsdpa.attention(q, k, k, window=(1, 2), softcap=3.0, sinks=torch.zeros(2), backend="triton")
        out.sum().backward()
    specs = dict((kernel, spec) for kernel, spec in KERNELS)
    checked = set()
    for kernel, constexprs in made:
        if kernel in specs:
            names = {name for name in constexprs if name not in ("num_warps", "num_stages", "maxnreg")}
            assert names == specs[kernel].constexpr_names(), kernel
            assert constexprs["BOUNDED_BELOW"] and constexprs["SOFTCAP"]
            checked.add(kernel)
    assert checked == set(specs)
