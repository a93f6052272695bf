"""What one compiled variant of the Hopper forward kernel is: a frozen spec per kernel, and the table that picks it.

Shared memory per program: `q_buffers` Q tiles (2 * 64 rows) plus `stages`
K and V tiles of `block_n` rows, under the 227 KB sm_90 limit for every entry
below (d=256 has room for one Q tile only: the next tile's loads then wait
for the current tile's output store).
Registers: 12 warps a program (two consumer warp groups, one producer warp
rounded up to a warp group), so the kernel's cap is 65536 / 384 = 168 a
thread, which the producer drops to 24 so that each consumer runs with 240.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashsdpa.backends.hopper import variants as hopper_variants
from flashsdpa.backends.hopper.variants import HopperVariants

HEAD_DIMS = (64, 128, 256)
LOG2E = 1.4426950408889634
DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class HopperForwardSpec:
    """Everything the forward kernel is compiled with besides the dtype (which its descriptors carry)."""

    head_dim: int
    variants: HopperVariants  # compiled in as VARIANTS
    block_n: int  # key rows a stage holds
    stages: int  # K/V ring depth
    q_buffers: int  # Q slots: 2 lets the producer load the next tile's Q while this one finishes
    pingpong: bool = False  # consumer groups issue their products in strict alternation (FA3's ping-pong)
    persistent: bool = True  # one program per SM walking the tiles, else one program per tile
    block_m: int = 64  # query rows a consumer warp group owns (one wgmma row block)
    consumers: int = 2  # consumer warp groups (the kernel is written for two)
    consumer_registers: int = 240
    producer_registers: int = 24
    max_registers: int = 168  # the kernel's cap before the partitions re-balance it
    num_warps: int = 4  # the default partition: consumer group 0
    tanh: str = "precise"  # softcap's tanh, compiled in as TANH: "precise" or "hardware" (variants.SOFTCAP_FORWARD)
    # Consumer group 1's softmax exponentials by FMA arithmetic (score_kernels.exp2_by_fma), group 0's by MUFU.EX2:
    # compiled in as EXP2_BY_FMA (variants.SOFTCAP_FORWARD "hardware-fma").
    exp2_by_fma: bool = False

    def __post_init__(self):
        if self.tanh not in ("precise", "hardware"):
            raise ValueError(f"HopperForwardSpec.tanh must be 'precise' or 'hardware', got {self.tanh!r}")
        if self.tanh == "hardware" and not self.variants.softcap:
            raise ValueError("HopperForwardSpec.tanh is 'hardware' only for kernels with softcap")

    @property
    def rows_per_program(self) -> int:
        return self.block_m * self.consumers

    @property
    def tanh_units(self) -> bool:
        """The kernel's scores are softcap's tanh values (hardware tanh, no ALiBi after it): qk_scale takes softcap."""
        return self.tanh == "hardware" and not self.variants.alibi

    def qk_scale(self, scale: float, softcap: float) -> float:
        """The factor turning the kernel's scores into base-2 exponents: raw products q.k (scale * log2(e)),
        natural units (log2(e)), or tanh's values (softcap * log2(e))."""
        if self.tanh_units:
            return softcap * LOG2E
        return LOG2E if self.variants.natural_units else scale * LOG2E


# The Gluon kernel of each `variants.SOFTCAP_FORWARD` choice: (tanh, exp2_by_fma). "triton" runs the triton
# backend's forward, so its entry is the plain kernel's.
SOFTCAP_KERNELS = {"precise": ("precise", False), "hardware": ("hardware", False), "hardware-fma": ("hardware", True),
                   "triton": ("precise", False)}

# (block_n, stages, q_buffers) per head dim.
_TILES = {64: (128, 3, 2), 128: (128, 2, 2), 256: (64, 2, 1)}


def forward_spec(head_dim: int, variants: HopperVariants) -> HopperForwardSpec:
    """The table's tiles and softcap's tanh (`variants.SOFTCAP_FORWARD`); persistent programs for problems
    without a band only (a band's tiles see unequal key ranges, as causal ones do).

    H100, bf16 (BENCHMARKS.md, issue 14): persistent programs beat one program
    per tile non-causal (d=128 L=4096 603 vs 571 TFLOP/s, d=64 455 vs 432), but
    walk causal tiles of unequal lengths in a fixed order, which left SMs idle
    (d=128 L=16384 causal 441 vs 611); the hardware's own scheduling of one
    program per tile balances them. Ping-pong (`pingpong`) measured +3% at
    d=128 L=4096 non-causal and -1 to -3% elsewhere: off.
    """
    block_n, stages, q_buffers = _TILES[head_dim]
    tanh, exp2_by_fma = SOFTCAP_KERNELS[hopper_variants.SOFTCAP_FORWARD[head_dim] if variants.softcap else "precise"]
    return HopperForwardSpec(head_dim=head_dim, variants=variants, block_n=block_n, stages=stages,
                             q_buffers=q_buffers, persistent=not variants.banded, tanh=tanh, exp2_by_fma=exp2_by_fma)
