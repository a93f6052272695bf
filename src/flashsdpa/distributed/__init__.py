"""Context parallelism: attention over a sequence split across the ranks of a torch.distributed group.

    from flashsdpa.distributed import ring_attention, shard_sequence, unshard_sequence

    q_local = shard_sequence(q, layout="zigzag")      # this rank's slice of the whole (..., L, E) tensor
    out_local = ring_attention(q_local, k_local, v_local, causal=True, layout="zigzag")
    out = unshard_sequence(out_local, layout="zigzag")  # the whole sequence on every rank

NCCL on GPUs, gloo on CPUs; ring.py says how the forward and backward pass K/V around the ring, layout.py
how the sequence is laid out and which steps each rank can skip.
"""

from flashsdpa.distributed.ring import ring_attention, ring_traffic
from flashsdpa.distributed.sharding import shard_sequence, unshard_sequence

__all__ = ["ring_attention", "ring_traffic", "shard_sequence", "unshard_sequence"]
