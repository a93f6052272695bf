"""Every ```python block of README.md runs, in order, in one namespace, as a new user would paste them.

The blocks after the first are snippets about a user's own model: the namespace
holds small stand-ins for the names they take as given (`model`, `x`, `config`,
`AutoModelForCausalLM`), and nothing else. A block that needs another name fails
here with a NameError: give it the import, or add the stand-in below.
"""

from __future__ import annotations

import pathlib
import re

import pytest
import torch
import torch.nn.functional as F

import flashsdpa

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks() -> list[str]:
    return PYTHON_BLOCK.findall(README.read_text())


class TinyAttention(torch.nn.Module):
    """A user's model: one self-attention layer that calls torch's SDPA."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)


def stand_ins() -> dict:
    names = {"model": TinyAttention(), "x": torch.randn(2, 9, 32)}
    transformers = pytest.importorskip("transformers")
    names["AutoModelForCausalLM"] = transformers.AutoModelForCausalLM
    names["config"] = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    return names


def test_readme_has_python_blocks():
    assert len(python_blocks()) >= 3


def test_every_python_block_runs():
    namespace = {"__name__": "readme", **stand_ins()}
    # The context-parallel block runs as one rank of a one-process gloo group (torchrun gives it more).
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        for number, block in enumerate(python_blocks(), 1):
            try:
                exec(compile(block, f"README.md python block {number}", "exec"), namespace)
            except Exception as error:
                raise AssertionError(f"README.md python block {number} fails: {error!r}\n{block}") from error
    finally:
        flashsdpa.disable()  # a block may enable flashsdpa process-wide
        torch.distributed.destroy_process_group()
