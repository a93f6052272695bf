"""Context parallelism: train a tiny causal LM on one long sequence split across ranks.

    torchrun --nproc-per-node 4 examples/context_parallel.py        # CPU, gloo (NCCL when CUDA is there)

Every rank builds the same model (same seed), embeds the whole token sequence,
keeps its zigzag slice (`shard_sequence`), and runs the blocks on that slice
only: attention is `flashsdpa.distributed.ring_attention`, everything else is
per token. The loss is summed over the ranks and the parameter gradients are
all-reduced, as data parallelism does. Rank 0 also trains a copy of the model
on the whole sequence in one process (flashsdpa.attention) and prints, at each
step, both losses and the largest relative gradient difference.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import flashsdpa
from flashsdpa.distributed import ring_attention, ring_traffic, shard_sequence


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, attend) -> torch.Tensor:
        batch, seq, dim = x.shape
        h = self.norm1(x)
        q = self.q(h).view(batch, seq, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(h).view(batch, seq, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = attend(q, k, v).transpose(1, 2).reshape(batch, seq, dim)
        x = x + self.proj(out)
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, dim: int, heads: int, kv_heads: int, layers: int, max_len: int):
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, kv_heads) for _ in range(layers))
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor, attend, keep=lambda x: x) -> torch.Tensor:
        """Logits (B, L_kept, vocab); `keep` picks the positions this rank computes (its slice)."""
        x = self.tokens(tokens) + self.positions(torch.arange(tokens.shape[-1], device=tokens.device))
        x = keep(x)
        for block in self.blocks:
            x = block(x, attend)
        return self.head(x)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=1024, help="tokens in the one long sequence")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous"])
    parser.add_argument("--fsdp2", action="store_true", help="also shard the parameters with FSDP2 (fully_shard)")
    args = parser.parse_args(argv)

    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else None
    dist.init_process_group("nccl" if device is not None else "gloo")
    device = device or torch.device("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    vocab, dim = 97, 64
    config = dict(vocab=vocab, dim=dim, heads=4, kv_heads=2, layers=2, max_len=args.seq)
    model = TinyLM(**config).to(device)
    tokens = torch.randint(0, vocab, (1, args.seq + 1), device=device)  # the same sequence on every rank
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    reference = TinyLM(**config).to(device) if rank == 0 else None
    if reference is not None:
        reference.load_state_dict(model.state_dict())
    if args.fsdp2:
        # FSDP2 over the same ranks: attention still sees plain tensors (the unsharded weights' products).
        import warnings

        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        warnings.filterwarnings("ignore", message="FSDP2-wrapped module")  # logits are a view; nothing edits them

        mesh = init_device_mesh(device.type, (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1) if reference is not None else None

    def ring(q, k, v):
        return ring_attention(q, k, v, causal=True, layout=args.layout, enable_gqa=True, validate=False)

    def whole(q, k, v):
        return flashsdpa.attention(q, k, v, causal=True, enable_gqa=True)

    local_targets = shard_sequence(targets.unsqueeze(-1), layout=args.layout).squeeze(-1)
    if rank == 0:
        print(f"{world} ranks, {args.seq} tokens ({args.seq // world} per rank, layout {args.layout}), on {device}"
              + (", parameters sharded by FSDP2" if args.fsdp2 else ""))
    for step in range(args.steps):
        ring_traffic.reset()
        logits = model(inputs, ring, keep=lambda x: shard_sequence(x, layout=args.layout))  # (1, L_local, vocab)
        loss_sum = F.cross_entropy(logits.flatten(0, 1), local_targets.flatten(), reduction="sum")
        optimizer.zero_grad()
        if args.fsdp2:  # FSDP2 averages the ranks' gradients as it reduce-scatters them: undo the mean
            (loss_sum * world / args.seq).backward()
        else:
            (loss_sum / args.seq).backward()
            for p in model.parameters():  # each rank holds its tokens' share of every gradient
                dist.all_reduce(p.grad)
        gradients = [p.grad.full_tensor() if args.fsdp2 else p.grad for p in model.parameters()]
        loss = loss_sum.detach().clone()
        dist.all_reduce(loss)
        loss = loss.item() / args.seq
        traffic = ring_traffic.snapshot()

        if reference is not None:
            reference_optimizer.zero_grad()
            ref_logits = reference(inputs, whole)
            ref_loss = F.cross_entropy(ref_logits.flatten(0, 1), targets.flatten())
            ref_loss.backward()
            worst = max(
                ((g - r.grad).norm() / r.grad.norm().clamp_min(1e-30)).item()
                for g, r in zip(gradients, reference.parameters())
            )
            print(f"step {step}: loss {loss:.6f} (ring, {world} ranks) vs {ref_loss.item():.6f} (one process); "
                  f"largest relative gradient difference {worst:.2e}: "
                  f"{'equal' if abs(loss - ref_loss.item()) < 1e-5 and worst < 1e-4 else 'DIFFERENT'} "
                  "to float32 rounding")
            if step == 0:
                head_dim, local = dim // config["heads"], args.seq // world
                kv_bytes = 2 * config["kv_heads"] * local * head_dim * 4  # K and V, float32
                print(f"  rank 0 sent {traffic['forward_bytes_per_step']:,} bytes per forward ring step "
                      f"(K/V slice: 2 x {config['kv_heads']} heads x {local} x {head_dim} x 4 B = {kv_bytes:,}) "
                      f"and {traffic['backward_bytes_per_step']:,} per backward step (K/V plus float32 dK/dV)")
            reference_optimizer.step()
        optimizer.step()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
