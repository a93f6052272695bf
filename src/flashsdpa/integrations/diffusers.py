"""flashsdpa for diffusers models.

diffusers reaches torch's SDPA two ways, both through the attribute
`torch.nn.functional.scaled_dot_product_attention` that `flashsdpa.enable()`
and `flashsdpa.sdpa()` patch:

* processors of `diffusers.models.attention_processor.Attention` such as
  `AttnProcessor2_0` and `JointAttnProcessor2_0` (UNets, `BasicTransformerBlock`,
  PixArt, DiT, SD3) call `F.scaled_dot_product_attention` themselves;
* newer models (Flux, Wan, HunyuanVideo, LTX, QwenImage, ...) call
  `diffusers.models.attention_dispatch.dispatch_attention_fn` (diffusers >= 0.35),
  whose backend registry picks a function: "native" (the default) and the
  "_native_{math,flash,efficient,cudnn}" variants call
  `F.scaled_dot_product_attention` (under torch's `sdpa_kernel`); the others
  (flash-attn, sage, xformers, flex, ..., also when chosen through
  `DIFFUSERS_ATTN_BACKEND` in the environment) do not.

So `flashsdpa.enable()` covers a model on diffusers' defaults. `attention_backend`
below also covers one whose backend was set to something else: within the block
diffusers' active backend is "native" and the processors' own backend choices
(`model.set_attention_backend(...)`) are set aside, then restored. diffusers
before 0.35 has no backend registry (every processor calls F's SDPA): there
the block is just `flashsdpa.sdpa()`.
"""

from __future__ import annotations

import contextlib

import torch

from flashsdpa.integrations import sdpa as drop_in

NATIVE_BACKEND = "native"


def _attention_processors(model: torch.nn.Module):
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_attention_backend"):
            yield processor


@contextlib.contextmanager
def attention_backend(model: torch.nn.Module | None = None, *, strict: bool | None = None):
    """Within the block, diffusers attention runs on flashsdpa.

    Sets diffusers' active attention backend to "native" (its SDPA path; a
    process-wide setting in diffusers, like its own `attention_backend` context
    manager), and opens a `flashsdpa.sdpa(strict=strict)` block for this thread.
    model: also set aside, for the block, the backend that
        `model.set_attention_backend(...)` gave its attention processors.
    """
    try:
        from diffusers.models.attention_dispatch import attention_backend as diffusers_attention_backend
    except ImportError:  # diffusers < 0.35: no registry
        diffusers_native_backend = contextlib.nullcontext()
    else:
        diffusers_native_backend = diffusers_attention_backend(NATIVE_BACKEND)
    processors = list(_attention_processors(model)) if model is not None else []
    saved = [processor._attention_backend for processor in processors]
    try:
        for processor in processors:
            processor._attention_backend = None  # follow the active backend
        with diffusers_native_backend, drop_in.sdpa(strict=strict):
            yield
    finally:
        for processor, backend in zip(processors, saved):
            processor._attention_backend = backend
