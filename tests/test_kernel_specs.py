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


def _descriptors():
    """Pairs of problems that differ only in run-time values (lengths, batch, heads, scale, the band's
    diagonals, softcap's value), with each variant flag on and off."""
    from flashsdpa.descriptor import Alignment, AttentionDescriptor

    base = dict(batch_shape=(2,), heads_q=4, heads_kv=2, seq_q=40, seq_kv=70, head_dim=40, head_dim_v=24,
                dtype=torch.float16, device_type="cpu")  # fmt: skip
    variants = [dict(), dict(causal=True), dict(window_left=3), dict(window_right=2), dict(softcap=2.0),
                dict(alibi=True), dict(sinks=True), dict(causal=True, window_left=5, softcap=1.0, alibi=True)]
    run_time = dict(batch_shape=(5,), heads_q=6, heads_kv=3, seq_q=33, seq_kv=91, scale=0.3,
                    alignment=Alignment.BOTTOM_RIGHT)
    for variant in variants:
        scaled = {name: value * 3 for name, value in variant.items() if name in ("window_left", "window_right",
                                                                                 "softcap")}
        yield AttentionDescriptor(**base, **variant), AttentionDescriptor(**{**base, **run_time, **variant, **scaled})


def test_specs_follow_from_the_kernel_key():
    """The specs (so the compiled kernels) are a function of the KernelKey, the head dims, the config the tables
    give for the key and the launch's layout flags: problems that differ in run-time values only get the same
    specs; and the key's band flags are the launch band's."""
    from flashsdpa.backends.triton import backward_configs, forward_configs
    from flashsdpa.backends.triton.launch_common import visible_band

    seen = set()
    for first, second in _descriptors():
        assert first.kernel_key == second.kernel_key
        for desc in (first, second):
            band = visible_band(desc)
            assert (band.bounded_below, band.bounded_above) == (desc.kernel_key.bounded_below,
                                                                desc.kernel_key.bounded_above)
        specs = []
        for desc in (first, second):
            forward = forward_configs.choose_forward_config(desc.kernel_key, (9, 0))
            backward = backward_configs.backward_config(desc.kernel_key, (9, 0))
            specs.append((
                kernel_specs.forward_spec(desc, forward, 2, False, False),
                kernel_specs.decode_split_spec(desc, forward),
                kernel_specs.BackwardDkdvKernelSpec(**kernel_specs.backward_common(
                    desc, backward, backward.dkdv, backward_configs.block_widths(desc.kernel_key), False)),
            ))  # fmt: skip
        assert specs[0] == specs[1], first
        seen.add(specs[0])
    assert len(seen) == len(list(_descriptors())), "each variant flag reaches the specs"
