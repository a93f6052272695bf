"""Where a model step's time goes, torch SDPA against flashsdpa (`flashsdpa bench --model`'s model, on a GPU).

For each of the two, one training step of the Llama-like model of
`flashsdpa.integrations.model_bench` runs under torch.profiler after warm-up,
and the script prints the step's wall time (CUDA events), the GPU's busy time
(the sum of kernel times), the attention kernels' share, and the top kernels.
A step whose wall time is well above its kernel time waits on the host.
flashsdpa's backward precisions per call (gradient_precision.at_forward) are
printed too.

    PYTHONPATH=src python scripts/profile_model_step.py [--layers 8] [--seq 4096]
"""

from __future__ import annotations

import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

import flashsdpa
from flashsdpa import gradient_precision
from flashsdpa.integrations.model_bench import llama_config

ATTENTION_WORDS = ("attention", "flash", "fmha", "cudnn", "sdpa", "attn")


def profiled_step(step) -> tuple[float, dict[str, float]]:
    """(wall ms of one step, GPU ms per kernel name) after two warm-up steps."""
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
    kernels: dict[str, float] = collections.defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name] += event.device_time / 1e3
    return start.elapsed_time(end), kernels


def report(name: str, wall_ms: float, kernels: dict[str, float]) -> None:
    busy = sum(kernels.values())
    attention = sum(ms for kernel, ms in kernels.items() if any(w in kernel.lower() for w in ATTENTION_WORDS))
    print(f"{name}: step {wall_ms:.2f} ms, kernels {busy:.2f} ms (GPU idle {wall_ms - busy:.2f} ms), "
          f"attention kernels {attention:.2f} ms")
    for kernel, ms in sorted(kernels.items(), key=lambda item: -item[1])[:8]:
        print(f"    {ms:7.2f} ms  {kernel[:110]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--seq", type=int, default=4096)
    args = parser.parse_args()
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = llama_config(args.layers, args.width, args.seq)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.train()
    input_ids = torch.randint(0, config.vocab_size, (1, args.seq), device="cuda")

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(input_ids=input_ids, labels=input_ids).loss.backward()

    report("torch SDPA", *profiled_step(step))
    chosen = collections.Counter()
    decide = gradient_precision.at_forward

    def counted(*args, **kwargs):
        precision = decide(*args, **kwargs)
        chosen[precision.value] += 1
        return precision

    gradient_precision.at_forward = counted
    with flashsdpa.sdpa():
        report("flashsdpa", *profiled_step(step))
    print(f"flashsdpa backward precisions chosen: {dict(chosen)}; calls: {flashsdpa.stats()}")


if __name__ == "__main__":
    main()
