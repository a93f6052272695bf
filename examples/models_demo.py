"""flashsdpa inside real models: a small causal LM (transformers) and a diffusion transformer (diffusers).

Both models are built from configs with random weights (nothing is downloaded)
and run three ways on the same inputs:

* torch: transformers' / diffusers' default attention, i.e. torch's SDPA;
* flashsdpa: the same model inside `flashsdpa.sdpa()`, which routes every
  `F.scaled_dot_product_attention` call through flashsdpa;
* for the LM also `attn_implementation="fsdpa"` (flashsdpa registered in
  transformers' attention interface, GQA without repeating keys and values).

For each it prints the relative error ||out - ref|| / ||ref|| against a
float64 copy of the model (torch's SDPA in float64) and against torch at the
run's dtype, the median time of a forward (and, for the LM, forward + backward)
step, and flashsdpa's call counts (calls that fell back to torch, and why).

    python examples/models_demo.py                     # CPU, small, float32
    python examples/models_demo.py --device cuda       # larger, bfloat16
    python examples/models_demo.py --device cuda --dtype float16 --seq 4096
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch

import flashsdpa
from flashsdpa.integrations import transformers as fs_transformers
from flashsdpa.integrations.model_bench import stats_since, time_steps

SIZES = {
    # LM: layers, hidden, heads, kv heads, seq, batch; DiT: layers, single layers, heads, head dim, image side
    "cpu": dict(lm=(2, 128, 4, 2, 128, 2), dit=(1, 2, 4, 32, 16)),
    "cuda": dict(lm=(8, 2048, 16, 4, 2048, 2), dit=(2, 4, 16, 128, 64)),
}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


def time_ms(fn, device: torch.device, repeats: int = 5) -> float:
    """Median milliseconds of `repeats` calls after one warm-up (Triton compiles its variants on first use)."""
    return statistics.median(time_steps(fn, device, warmup=1, steps=repeats))


def report(title: str, rows: list[tuple]) -> None:
    print(f"\n{title}")
    print(f"  {'run':<26}{'err vs fp64':>12}{'err vs torch':>14}{'fwd ms':>10}{'fwd+bwd ms':>12}  stats")
    for name, err64, err_torch, fwd, step, stats in rows:
        step_text = f"{step:12.2f}" if step is not None else f"{'-':>12}"
        print(f"  {name:<26}{err64:12.2e}{err_torch:14.2e}{fwd:10.2f}{step_text}  {stats}")


def causal_lm(device: torch.device, dtype: torch.dtype, seq: int | None) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, hidden, heads, kv_heads, default_seq, batch = SIZES[device.type]["lm"]
    seq = seq or default_seq
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=seq,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    model64 = copy.deepcopy(model).double()
    input_ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, : seq // 4] = 0  # left padding in the last sequence
    valid = attention_mask.bool()  # compare logits at real tokens (padded rows differ between implementations)

    def forward(m):
        with torch.no_grad():
            return m(input_ids=input_ids, attention_mask=attention_mask).logits[valid]

    def step(m):
        m.zero_grad(set_to_none=True)
        m(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids).loss.backward()

    ref64 = forward(model64)
    del model64
    rows = []
    registration = fs_transformers.register()
    try:
        runs = (
            ("torch sdpa", "sdpa", False),
            ("flashsdpa.sdpa()", "sdpa", True),
            (f'attn="{registration.name}"', registration.name, False),
        )
        for name, implementation, drop_in in runs:
            model.set_attn_implementation(implementation)
            before = flashsdpa.stats()
            with flashsdpa.sdpa(enabled=drop_in):
                out = forward(model)
                fwd = time_ms(lambda: forward(model), device)
                train_step = time_ms(lambda: step(model), device)
            if name == "torch sdpa":
                torch_out = out
            errors = relative_error(out, ref64), relative_error(out, torch_out)
            rows.append((name, *errors, fwd, train_step, stats_since(before)))
    finally:
        registration.remove()
    report(
        f"causal LM (Llama: {layers} layers, hidden {hidden}, {heads} heads / {kv_heads} KV heads, "
        f"batch {batch} x {seq} tokens, left padding) on {device.type}, {str(dtype)[6:]}",
        rows,
    )


def image_positions(side: int) -> torch.Tensor:
    """Flux's (tokens, 3) position ids of a side x side latent: (0, row, column)."""
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()


def diffusion_transformer(device: torch.device, dtype: torch.dtype) -> None:
    from diffusers import FluxTransformer2DModel

    layers, single_layers, heads, head_dim, side = SIZES[device.type]["dit"]
    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=layers,
        num_single_layers=single_layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=256,
        pooled_projection_dim=128,
        axes_dims_rope=(head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8),
    ).to(device=device, dtype=dtype)
    model64 = copy.deepcopy(model).double()
    batch, text_tokens, image_tokens = 2, 32, side * side
    inputs = dict(
        hidden_states=torch.randn(batch, image_tokens, 16, device=device),
        encoder_hidden_states=torch.randn(batch, text_tokens, 256, device=device),
        pooled_projections=torch.randn(batch, 128, device=device),
        timestep=torch.tensor([0.3, 0.7], device=device),
        img_ids=image_positions(side).to(device),
        txt_ids=torch.zeros(text_tokens, 3, device=device),
    )

    def forward(m, m_dtype):
        # Position ids stay float32; activations take the model's dtype.
        cast = {k: v if k in ("img_ids", "txt_ids") else v.to(m_dtype) for k, v in inputs.items()}
        with torch.no_grad():
            return m(**cast).sample

    ref64 = forward(model64, torch.float64)
    del model64
    rows = []
    for name, drop_in in (("torch sdpa", False), ("flashsdpa.sdpa()", True)):
        before = flashsdpa.stats()
        with flashsdpa.sdpa(enabled=drop_in):
            out = forward(model, dtype)
            fwd = time_ms(lambda: forward(model, dtype), device)
        if not drop_in:
            torch_out = out
        rows.append((name, relative_error(out, ref64), relative_error(out, torch_out), fwd, None, stats_since(before)))
    report(
        f"diffusion transformer (Flux: {layers} double + {single_layers} single blocks, {heads} heads x {head_dim}, "
        f"{image_tokens} image + {text_tokens} text tokens, batch {batch}) on {device.type}, {str(dtype)[6:]}",
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--seq", type=int, default=None, help="LM sequence length (default: 128 CPU, 2048 CUDA)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    causal_lm(device, dtype, args.seq)
    diffusion_transformer(device, dtype)


if __name__ == "__main__":
    main()
