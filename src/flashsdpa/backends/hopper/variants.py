"""Which attention variants the Hopper kernels compute, as data: the names they take and the flags compiled in.

`COMPUTED` lists the `AttentionDescriptor.variants` the forward kernel
takes; `BACKWARD_COMPUTED` those its backward kernels take, by head dim (a
variant the forward takes and the backward does not runs triton's backward,
with the reason recorded). `HopperVariants` is the part of a problem's variants that
shapes generated code (a frozen spec, a constexpr of every kernel); the
band's diagonals, the key offset, softcap's value, the ALiBi slopes and the
sink logits are run-time arguments (`band_arguments`, `score_arguments`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashsdpa.backends.base import AttentionInputs
from flashsdpa.backends.triton.launch_common import visible_band
from flashsdpa.descriptor import AttentionDescriptor

COMPUTED = ("window", "bottom-right alignment", "softcap", "ALiBi", "sinks")
# Per head dim (a variant left out runs triton's backward). At 128 the dK/dV kernel spills with ALiBi
# (compile_sm90, bf16: 44 B of spill stores non-causal, 192 causal, against 20 and 72 without it): its
# row of scripts/bench_hopper_variants_gpu.py says whether it still beats triton's backward there.
BACKWARD_COMPUTED = {64: COMPUTED, 128: COMPUTED}
# How the forward computes softcap, per head dim (the backward is the Gluon one in every case, where
# `BACKWARD_COMPUTED` has softcap):
#   "precise"  - the Gluon kernel, softcap's tanh to ~1e-7 relative (`score_kernels.tanh`: a polynomial below
#                0.625, else an exp and a division): 3 MUFU operations a score with the softmax's exp;
#   "hardware" - the Gluon kernel, tanh by the hardware's tanh.approx.f32 (MUFU.TANH, at most 1.1e-5 relative:
#                a score of softcap 30 moves by at most 3.3e-4, under a bf16 probability's rounding of 2^-9):
#                2 MUFU operations a score;
#   "hardware-fma" - as "hardware", and consumer group 1 takes its softmax's exponentials by FMA arithmetic
#                (`score_kernels.exp2_by_fma`, 2.3e-7 relative): the groups share each SM sub-partition's MUFU
#                unit, so 1.5 MUFU operations a score, and more FMA-pipe work in group 1;
#   "triton"   - the triton backend's forward (its out and lse are the layouts and units the Gluon backward
#                reads: both come from `triton.launch_forward.allocate_outputs`, lse in natural log).
# H100, bf16 L=4096 B=4 H=16 softcap 30, forward TFLOP/s (scripts/bench_softcap_gpu.py; BENCHMARKS.md, issue 14,
# the softcap forward's choices): d=128 causal precise 127, hardware 467, hardware-fma 383, triton 205, compiled
# Flex 175; d=128 non-causal 174 / 525 / 428 / 231; d=64 causal 62 / 290 / 229 / 126. Out and gradient errors
# against float64 are the same for all four (bf16); lse moves by up to 2.2e-4 with "hardware" at scale 1 (6.4e-6
# precise).
# d=256 is not measured: it keeps "precise".
SOFTCAP_FORWARD = {64: "hardware", 128: "hardware", 256: "precise"}
SOFTCAP_FORWARDS = ("precise", "hardware", "hardware-fma", "triton")


@dataclass(frozen=True)
class HopperVariants:
    """The variant flags a Hopper kernel is compiled with (visibility_kernels and score_kernels' meanings)."""

    bounded_below: bool = False  # a window's left side
    bounded_above: bool = False  # causal, or a window's right side
    softcap: bool = False
    alibi: bool = False
    sinks: bool = False

    @staticmethod
    def of(desc: AttentionDescriptor) -> HopperVariants:
        key = desc.kernel_key
        return HopperVariants(key.bounded_below, key.bounded_above, key.softcap, key.alibi, key.sinks)

    @property
    def banded(self) -> bool:
        """Some query may not see some key before seq_kv: edge blocks take an element mask."""
        return self.bounded_below or self.bounded_above

    @property
    def natural_units(self) -> bool:
        """Scores are transformed (scale applied first): the kernels' `qk_scale` is then log2(e) alone."""
        return self.softcap or self.alibi

    @property
    def longest_rows_last(self) -> bool:
        """Later query rows see more keys (causal without a left side): their tiles go first."""
        return self.bounded_above and not self.bounded_below

    def __repr__(self) -> str:  # (the compile table prints it; every field is in it, so the cache key is whole)
        on = [name for name, value in vars(self).items() if value]
        return f"HopperVariants({', '.join(on)})"


def softcap_forward(desc: AttentionDescriptor) -> str | None:
    """`SOFTCAP_FORWARD`'s entry for a problem with softcap (None without softcap)."""
    if desc.softcap == 0.0:
        return None
    return SOFTCAP_FORWARD[desc.head_dim]


def band_arguments(desc: AttentionDescriptor) -> tuple[int, int]:
    """(lowest_diagonal, highest_diagonal) of `launch_common.visible_band` (0 for a side not bounded)."""
    band = visible_band(desc)
    return band.lowest_diagonal, band.highest_diagonal


def score_arguments(desc: AttentionDescriptor, inputs: AttentionInputs, scale: float,
                    stand_in: torch.Tensor) -> tuple:
    """(scale, softcap, key_offset, slope stride of batch, of head) and (slopes, sinks) as the kernels take them.

    `scale` is the one the kernel's scores get (the forward's `kernel_scale`, or the backward's signed scale);
    `stand_in` takes the place of a tensor the problem lacks (never read: ALiBi or sinks are off)."""
    slopes = inputs.alibi_slopes if desc.alibi else stand_in
    sinks = inputs.sinks if desc.sinks else stand_in
    stride_b, stride_h = slopes.stride() if desc.alibi else (0, 0)
    return (scale, float(desc.softcap), desc.key_offset, stride_b, stride_h), (slopes, sinks)
