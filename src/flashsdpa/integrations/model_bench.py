"""A whole-model benchmark: one training step of a Llama-like model, torch SDPA vs flashsdpa.

The model is built from a `LlamaConfig` with random weights (nothing is
downloaded): `layers` decoder layers of width `width`, head dim 128, grouped-
query attention with 4 query heads per key/value head, SwiGLU MLP of width
8/3 x `width` rounded up to a multiple of 256, a 32000-token vocabulary. One
step is forward + causal-LM loss + backward on `batch` sequences of `seq`
tokens. Both runs use the same model and inputs and transformers' "sdpa"
attention; only the `F.scaled_dot_product_attention` call differs (torch's,
or flashsdpa's through `flashsdpa.sdpa()`).

Timing: on CUDA, CUDA events around each step, the median of `steps` steps
after `warmup` steps; elsewhere, wall-clock time of the same steps. A
`progress` callback hears of every step; past a `deadline` (time.monotonic())
no further step starts, and the medians are of the steps taken.

On a CPU the default model (8 layers of width 2048, 4096 tokens) takes minutes
per step: `CPU_MODEL` is the size `flashsdpa bench --device cpu --model` runs.
"""

from __future__ import annotations

import statistics
import time

import torch

import flashsdpa

HEAD_DIM = 128
QUERY_HEADS_PER_KV_HEAD = 4
VOCAB_SIZE = 32000
# About a second per step on 2 cores: 2 layers of width 512 (4 heads of 128, 1 kv head), 1024 tokens.
CPU_MODEL = {"layers": 2, "width": 512, "seq": 1024, "warmup": 1, "steps": 3, "vocab_size": 8192}


def llama_config(layers: int, width: int, seq: int, vocab_size: int = VOCAB_SIZE):
    """A Llama-like config of the given depth and width (width a multiple of 128)."""
    from transformers import LlamaConfig

    if width % HEAD_DIM:
        raise ValueError(f"width must be a multiple of the head dim {HEAD_DIM}, got {width}")
    heads = width // HEAD_DIM
    kv_heads = max(1, heads // QUERY_HEADS_PER_KV_HEAD)
    while heads % kv_heads:
        kv_heads -= 1
    intermediate = -(-(width * 8 // 3) // 256) * 256
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=HEAD_DIM,
        max_position_embeddings=max(seq, 128),
    )


def time_steps(step, device: torch.device, warmup: int, steps: int, progress=None, deadline=None,
               label: str = "") -> list[float]:
    """Milliseconds of each of `steps` calls of `step()` after `warmup` untimed ones.

    progress(text) hears of each step; no step starts after `deadline` (time.monotonic()), but one
    timed step always runs."""
    def past_deadline() -> bool:
        return deadline is not None and time.monotonic() > deadline

    for index in range(warmup):
        if past_deadline():
            break
        seconds = _timed_call(step, device) / 1e3
        if progress is not None:
            progress(f"{label} warm-up step {index + 1}/{warmup}: {seconds:.2f} s")
    times = []
    for index in range(steps):
        if times and past_deadline():
            if progress is not None:
                progress(f"{label}: time budget reached after {len(times)} of {steps} timed steps")
            break
        times.append(_timed_call(step, device))
        if progress is not None:
            progress(f"{label} step {index + 1}/{steps}: {times[-1] / 1e3:.2f} s")
    return times


def _timed_call(step, device: torch.device) -> float:
    """Milliseconds of one step (CUDA events on CUDA, the host clock elsewhere)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    start = time.perf_counter()
    step()
    return (time.perf_counter() - start) * 1e3


def run_model_bench(
    device,
    dtype,
    layers: int = 8,
    width: int = 2048,
    seq: int = 4096,
    batch: int = 1,
    *,
    warmup: int = 3,
    steps: int = 10,
    vocab_size: int = VOCAB_SIZE,
    seed: int = 0,
    progress=None,
    deadline: float | None = None,
) -> dict:
    """Time one forward+backward step with torch's SDPA and with flashsdpa.

    Returns a dict: the problem (device, gpu name, dtype, layers, width, heads,
    kv_heads, seq, batch), `torch_ms` and `flashsdpa_ms` (median step times),
    their spreads (`*_min_ms`, `*_max_ms`), `speedup` = torch_ms / flashsdpa_ms,
    `loss_rel_diff` (the two first-step losses' relative difference, a sanity
    check), and `flashsdpa_stats` (flashsdpa's call and fallback counts over
    its steps; every attention call should have run on a flashsdpa backend).
    """
    from transformers import LlamaForCausalLM

    device = torch.device(device)
    torch.manual_seed(seed)
    config = llama_config(layers, width, seq, vocab_size)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    if model.config._attn_implementation != "sdpa":
        raise RuntimeError(f"expected transformers' sdpa attention, got {model.config._attn_implementation!r}")
    model.train()  # attention dropout is 0 in LlamaConfig: the step is deterministic
    input_ids = torch.randint(0, vocab_size, (batch, seq), device=device)

    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        return loss.detach()

    # Each side gets half of the time left.
    halfway = None if deadline is None else time.monotonic() + (deadline - time.monotonic()) / 2
    torch_loss = step()
    torch_times = time_steps(step, device, warmup, steps, progress, halfway, "torch SDPA")

    stats_before = flashsdpa.stats()
    with flashsdpa.sdpa():
        flashsdpa_loss = step()
        flashsdpa_times = time_steps(step, device, warmup, steps, progress, deadline, "flashsdpa")
    flashsdpa_stats = stats_since(stats_before)

    torch_ms = statistics.median(torch_times)
    flashsdpa_ms = statistics.median(flashsdpa_times)
    return {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "dtype": str(dtype).removeprefix("torch."),
        "layers": layers,
        "width": width,
        "heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "seq": seq,
        "batch": batch,
        "steps": steps,
        "steps_timed": {"torch": len(torch_times), "flashsdpa": len(flashsdpa_times)},
        "torch_ms": torch_ms,
        "torch_min_ms": min(torch_times),
        "torch_max_ms": max(torch_times),
        "flashsdpa_ms": flashsdpa_ms,
        "flashsdpa_min_ms": min(flashsdpa_times),
        "flashsdpa_max_ms": max(flashsdpa_times),
        "speedup": torch_ms / flashsdpa_ms,
        "loss_rel_diff": abs(float(flashsdpa_loss) - float(torch_loss)) / abs(float(torch_loss)),
        "flashsdpa_stats": flashsdpa_stats,
    }


def stats_since(before: dict) -> dict:
    """flashsdpa.stats() counts added since `before` (the caller's counts are left as they are)."""
    after = flashsdpa.stats()
    return {
        kind: {key: n - before[kind].get(key, 0) for key, n in counts.items() if n != before[kind].get(key, 0)}
        for kind, counts in after.items()
    }
