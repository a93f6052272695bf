"""How each implementation is run on a case: flashsdpa and its peers.

- flashsdpa: `flashsdpa.attention`, backend chosen automatically (Triton on
  CUDA; on a CPU torch's fused kernel where it computes flashsdpa's semantics,
  else tiled); which one ran is recorded from `flashsdpa.stats()`.
  flashsdpa-tf32 is the same with `fp32_precision="tf32"` (fp32 group only).
- torch: `torch.nn.functional.scaled_dot_product_attention` as torch chooses
  (on a CPU its fused flash kernel where it can, else math).
- cudnn, flash, efficient, math: the same with one backend pinned through
  `torch.nn.attention.sdpa_kernel`. A backend
  that refuses a case ("No available kernel") is recorded as n/a with torch's
  reason. math materialises the (B, H, L, S) scores, so it is skipped, with
  the reason, when they would take more than MATH_SCORE_LIMIT_BYTES.
  On a variant case (window, softcap, ALiBi, sinks) torch's SDPA has no
  argument for the variant: torch and the pinned fused backends are n/a with
  that reason, and math runs `variant_math` (the scores materialised with
  torch ops, the window and ALiBi as a materialised mask and bias).
- flex: FlexAttention through `torch.compile(flex_attention)` (inductor: Triton
  on CUDA, vectorised C++ on a CPU), causal and key padding through a block
  mask made once per shape outside the timed region (`flex_mask_mod`: a variant
  case adds its mask_mod or score_mod there). "static" compiles
  every shape (dynamic=False: the fastest kernels, a compile per shape);
  "dynamic" compiles once per dtype/head dim/causality with symbolic sizes.

Issue 12's groups (cases.py): on a varlen row flashsdpa runs `varlen_attn`,
torch-varlen torch's `torch.nn.attention.varlen.varlen_attn` (CUDA, 16-bit),
and the SDPA peers the batch padded to its longest sequence (pad, SDPA with a
causal + key-padding mask, unpad: what a caller with packed data does, all
timed); on a paged or prefill row flashsdpa runs `kvcache_attention` on the
paged cache and the SDPA peers read the same keys as one contiguous (B, Hkv,
S, E) tensor (prefill: bottom-right causal, `causal_lower_right`). Flex is not
set up for them (n/a with the reason).

Issue 14's decode-graph rows add flashsdpa-graph and flash-graph
(`CudaGraphPeer`): the same forward as flashsdpa's and flash's, captured in a
CUDA graph per input set and replayed.

Every peer's `prepare` does its per-shape set-up (outside the timed region) and
returns the forward to time; `context` is entered around every call of it.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import inspect
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from flashsdpa.bench.cases import CACHE_GROUPS, GRAPH_SUFFIX, Case, InputSet

MATH_SCORE_LIMIT_BYTES = 8 * 10**9  # ~8 GB of scores: past this, math is skipped
FLEX_MODES = ("static", "dynamic", "off")

Forward = Callable[[InputSet], torch.Tensor]


class Peer(abc.ABC):
    name: str

    def unavailable_reasons(self, case: Case, device: torch.device) -> list[str]:
        """Reasons to skip this peer on this case without trying it (empty: try it)."""
        return []

    def backward_unavailable(self, case: Case, device: torch.device) -> str | None:
        """Why this peer has no backward on this case (None: it has one); its forward is still timed."""
        return None

    @abc.abstractmethod
    def prepare(self, case: Case, device: torch.device) -> Forward:
        """Per-shape set-up (untimed); returns the forward to time."""

    def context(self):
        """Entered around every call of the forward and its backward."""
        return contextlib.nullcontext()

    def notes(self) -> dict:
        """Anything to record about the last case this peer ran."""
        return {}


class FlashSdpaPeer(Peer):
    def __init__(self, name: str = "flashsdpa", fp32_precision: str = "ieee"):
        self.name = name
        self.fp32_precision = fp32_precision

    def prepare(self, case: Case, device: torch.device) -> Forward:
        import flashsdpa

        flashsdpa.reset_stats()
        slopes = case.alibi_slopes(device) if case.alibi else None
        if case.group == "varlen":
            longest = case.seq_kv

            def forward_packed(inputs: InputSet) -> torch.Tensor:
                return flashsdpa.varlen_attn(
                    inputs.query, inputs.key, inputs.value, inputs.cu_seqlens, inputs.cu_seqlens, longest, longest,
                    window_size=(-1, 0) if case.causal else (-1, -1), enable_gqa=case.gqa,
                    fp32_precision=self.fp32_precision,
                )  # fmt: skip

            return forward_packed
        if case.group in CACHE_GROUPS:

            def forward_paged(inputs: InputSet) -> torch.Tensor:
                out = flashsdpa.kvcache_attention(
                    inputs.query.transpose(1, 2), inputs.k_pages, inputs.v_pages, cache_seqlens=inputs.cache_seqlens,
                    block_table=inputs.block_table, causal=case.causal, validate=False,
                    fp32_precision=self.fp32_precision,
                )  # fmt: skip
                return out.transpose(1, 2)

            return forward_paged

        def forward(inputs: InputSet) -> torch.Tensor:
            return flashsdpa.attention(
                inputs.query,
                inputs.key,
                inputs.value,
                causal=case.causal,
                attn_mask=inputs.mask,
                enable_gqa=case.gqa,
                fp32_precision=self.fp32_precision,
                window=None if case.window is None else (case.window, None),
                softcap=case.softcap,
                alibi_slopes=slopes,
                sinks=inputs.sinks,
            )

        return forward

    def notes(self) -> dict:
        import flashsdpa

        stats = flashsdpa.stats()
        calls = stats.get("calls", {})
        backend = max(calls, key=calls.get) if calls else None
        note = {"backend": backend, "backend_calls": calls}
        if stats.get("fallbacks"):
            note["fallbacks"] = stats["fallbacks"]
        return note


class TorchSdpaPeer(Peer):
    def __init__(self, name: str, backend_name: str | None):
        self.name = name
        self.backend_name = backend_name  # an attribute of torch.nn.attention.SDPBackend; None: torch chooses

    def unavailable_reasons(self, case: Case, device: torch.device) -> list[str]:
        if self.backend_name == "MATH" and case.score_bytes > MATH_SCORE_LIMIT_BYTES:
            return [
                f"math would materialise {case.score_bytes / 1e9:.1f} GB of (B, H, L, S) scores "
                f"(limit {MATH_SCORE_LIMIT_BYTES / 1e9:.0f} GB)"
            ]
        if case.variant and self.backend_name != "MATH":
            return [
                f"torch's SDPA has no argument for {'/'.join(case.variant_labels)}: its fused kernels cannot run "
                "it (math runs it on materialised scores)"
            ]
        return []

    def context(self):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        if self.backend_name is None:
            return contextlib.nullcontext()
        return sdpa_kernel(getattr(SDPBackend, self.backend_name))

    def prepare(self, case: Case, device: torch.device) -> Forward:
        if case.group == "varlen":
            return padded_sdpa(case, device)
        if case.group == "prefill":
            from torch.nn.attention.bias import causal_lower_right

            bias = causal_lower_right(case.seq_q, case.seq_kv)

            def forward_prefill(inputs: InputSet) -> torch.Tensor:
                return F.scaled_dot_product_attention(inputs.query, inputs.key, inputs.value, attn_mask=bias,
                                                      enable_gqa=case.gqa)  # fmt: skip

            return forward_prefill
        if case.variant:
            bias = variant_bias(case, device, case.dtype)

            def forward_variant(inputs: InputSet) -> torch.Tensor:
                return variant_math(case, inputs.query, inputs.key, inputs.value, bias, inputs.sinks)

            return forward_variant

        def forward(inputs: InputSet) -> torch.Tensor:
            return F.scaled_dot_product_attention(
                inputs.query,
                inputs.key,
                inputs.value,
                attn_mask=inputs.mask,
                is_causal=case.causal,
                enable_gqa=case.gqa,
            )

        return forward


def padded_sdpa(case: Case, device: torch.device) -> Forward:
    """SDPA on a varlen row's packed (tokens, H, E) inputs padded to (B, H, longest, E), with a causal and
    key-padding bool mask, its output unpadded to (tokens, H, E); the index tensors made here, untimed."""
    lengths = torch.tensor(case.lengths, device=device)
    batch_of = torch.repeat_interleave(torch.arange(case.batch, device=device), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    position = torch.arange(case.tokens_q, device=device) - starts[batch_of]
    cols = torch.arange(case.seq_kv, device=device)
    visible = (cols.view(1, 1, 1, -1) < lengths.view(-1, 1, 1, 1)).expand(-1, 1, case.seq_q, -1)
    if case.causal:
        visible = visible & (cols.view(1, -1) <= cols.view(-1, 1))
    # Padded queries (past their sequence) still see key 0, so no row is empty (torch would give NaN).

    def pad(packed: torch.Tensor) -> torch.Tensor:
        padded = packed.new_zeros(case.batch, case.seq_kv, *packed.shape[1:])
        return padded.index_put((batch_of, position), packed).transpose(1, 2)

    def forward(inputs: InputSet) -> torch.Tensor:
        out = F.scaled_dot_product_attention(pad(inputs.query), pad(inputs.key), pad(inputs.value),
                                             attn_mask=visible, enable_gqa=case.gqa)  # fmt: skip
        return out.transpose(1, 2)[batch_of, position]

    return forward


@functools.cache
def torch_varlen_parameters() -> frozenset[str]:
    """The parameter names of the installed torch's varlen_attn (torch 2.11's has no enable_gqa)."""
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def torch_varlen_keywords(case: Case) -> dict | None:
    """The keyword arguments that ask the installed torch's varlen_attn for the case's causality and GQA, only
    those its signature takes (enable_gqa only for unequal heads); None where it has no way to say causal."""
    parameters = torch_varlen_parameters()
    keywords = {}
    if "window_size" in parameters:
        keywords["window_size"] = (-1, 0) if case.causal else (-1, -1)
    elif "is_causal" in parameters:
        keywords["is_causal"] = case.causal
    elif case.causal:
        return None
    if case.gqa and "enable_gqa" in parameters:  # without the keyword, its flash kernel takes grouped heads
        keywords["enable_gqa"] = True
    return keywords


class TorchVarlenPeer(Peer):
    """torch.nn.attention.varlen.varlen_attn (torch 2.11-2.13: CUDA only, bf16/fp16, FlashAttention 2) on varlen
    rows."""

    name = "torch-varlen"

    def unavailable_reasons(self, case: Case, device: torch.device) -> list[str]:
        if case.group != "varlen":
            return ["torch's varlen_attn takes packed sequences: varlen rows only"]
        if device.type != "cuda" or case.dtype not in (torch.float16, torch.bfloat16):
            return ["torch's varlen_attn runs CUDA bf16/fp16 only (torch 2.13)"]
        if torch_varlen_keywords(case) is None:
            return [f"this torch's varlen_attn takes no causal argument ({torch.__version__})"]
        return []

    def prepare(self, case: Case, device: torch.device) -> Forward:
        from torch.nn.attention.varlen import varlen_attn

        longest = case.seq_kv
        keywords = torch_varlen_keywords(case)

        def forward(inputs: InputSet) -> torch.Tensor:
            return varlen_attn(inputs.query, inputs.key, inputs.value, inputs.cu_seqlens, inputs.cu_seqlens, longest,
                               longest, **keywords)  # fmt: skip

        return forward


def variant_bias(case: Case, device: torch.device, dtype: torch.dtype, heads: slice = slice(None)) -> torch.Tensor:
    """A variant case's causal/window visibility and ALiBi materialised: a (L, S) bool mask, or with ALiBi
    a (1, H, L, S) float bias in `dtype` (-slope * |i - j| where visible, -inf elsewhere; H: the query heads
    `heads` selects). Top-left aligned."""
    rows = torch.arange(case.seq_q, device=device).view(-1, 1)
    cols = torch.arange(case.seq_kv, device=device).view(1, -1)
    visible = torch.ones(case.seq_q, case.seq_kv, dtype=torch.bool, device=device)
    if case.causal:
        visible &= cols <= rows
    if case.window is not None:
        visible &= cols >= rows - case.window
    if not case.alibi:
        return visible
    slopes = case.alibi_slopes(device)[heads].to(dtype)
    bias = -slopes.view(-1, 1, 1) * (rows - cols).abs().to(dtype)
    return bias.masked_fill(~visible, float("-inf")).unsqueeze(0)


def variant_math(case: Case, q, k, v, bias: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """Attention with the case's variants on materialised (B, H, L, S) scores, in the inputs' dtype (float64
    inputs and a float64 bias: the exact reference): scale, softcap, the bias or mask of `variant_bias`,
    then a softmax whose denominator includes the sink's exp(sink_h)."""
    if case.gqa:
        group = case.heads_q // case.heads_kv
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if case.softcap is not None:
        scores = case.softcap * torch.tanh(scores / case.softcap)
    scores = scores.masked_fill(~bias, float("-inf")) if bias.dtype == torch.bool else scores + bias
    if sinks is not None:  # one more column: the sink's logit, with no value row
        column = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        return torch.softmax(torch.cat([scores, column], dim=-1), dim=-1)[..., :-1] @ v
    return torch.softmax(scores, dim=-1) @ v


def causal_mask_mod(batch, head, query_index, key_index):
    """Top-left aligned causal visibility, as FlexAttention mask_mod."""
    return query_index >= key_index


def flex_mask_mod(case: Case):
    """The case's visibility as a FlexAttention mask_mod (None: every key visible)."""
    mods = []
    if case.causal:
        mods.append(causal_mask_mod)
    if case.mask == "key_padding":
        visible_keys = case.seq_kv - case.padded_keys

        def key_padding(batch, head, query_index, key_index):
            return key_index < visible_keys

        mods.append(key_padding)
    if case.window is not None:
        window = case.window

        def sliding_window(batch, head, query_index, key_index):
            return query_index - key_index <= window

        mods.append(sliding_window)
    if not mods:
        return None
    if len(mods) == 1:
        return mods[0]
    from torch.nn.attention.flex_attention import and_masks

    return and_masks(*mods)


def flex_score_mod(case: Case, device: torch.device):
    """The case's softcap and ALiBi as a FlexAttention score_mod, in `flashsdpa.attention`'s order (None: neither).

    Every number the score_mod reads is a tensor on `device` that it captures (Flex passes captured tensors to
    its kernels as buffers). A captured Python float would not do: under `torch.compile(..., dynamic=True)`
    dynamo turns it into a 0-d tensor input and reads it back with `.item()` inside the score_mod, a
    data-dependent graph break in the middle of Flex's higher-order op (torch 2.11 on CUDA: "all unwrapped
    values must be FakeTensor, int, or SymInt"; torch 2.13 on a CPU: an inductor LoweringException)."""
    if case.softcap is None and not case.alibi:
        return None
    softcap = None if case.softcap is None else torch.tensor(case.softcap, dtype=torch.float32, device=device)
    slopes = case.alibi_slopes(device) if case.alibi else None

    def score_mod(score, batch, head, query_index, key_index):
        if softcap is not None:
            score = softcap * torch.tanh(score / softcap)
        if slopes is not None:
            score = score - slopes[head] * (query_index - key_index).abs()
        return score

    return score_mod


def with_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """Attention without sinks (out, natural-log lse (B, H, L)) turned into attention with one sink logit per
    head: the sink joins each row's denominator, so out scales by exp(lse) / (exp(lse) + exp(sink))."""
    share = torch.sigmoid(lse.float() - sinks.float().view(1, -1, 1))
    return (out.float() * share.unsqueeze(-1)).to(out.dtype)


def raise_recompile_limit(limit: int = 100_000) -> None:
    """Let every shape compile (dynamo falls back to eager past its limit)."""
    import torch._dynamo

    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), limit))


def flex_forward(case: Case, device: torch.device, flex: Callable, inference: bool = False) -> Forward:
    """The case as calls of `flex` (flex_attention, compiled or not): its block mask made here, once (untimed),
    its score_mod, GQA, and the sinks applied to Flex's output through its log-sum-exp (`with_sinks`).
    `inference`: q, k, v detached first."""
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask

    block_mask = None
    mask_mod = flex_mask_mod(case)
    if mask_mod is not None:
        block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=case.seq_q, KV_LEN=case.seq_kv, device=device)
    extra = {"enable_gqa": True} if case.gqa else {}
    score_mod = flex_score_mod(case, device)
    if score_mod is not None:
        extra["score_mod"] = score_mod

    def forward(inputs: InputSet) -> torch.Tensor:
        q, k, v = (t.detach() if inference else t for t in (inputs.query, inputs.key, inputs.value))
        if inputs.sinks is None:
            return flex(q, k, v, block_mask=block_mask, **extra)
        out, aux = flex(q, k, v, block_mask=block_mask, return_aux=AuxRequest(lse=True), **extra)
        return with_sinks(out, aux.lse, inputs.sinks)

    return forward


class FlexPeer(Peer):
    name = "flex"

    def __init__(self, mode: str = "static"):
        if mode not in FLEX_MODES:
            raise ValueError(f"flex mode must be one of {FLEX_MODES}, got {mode!r}")
        self.mode = mode
        self._compiled = None

    def unavailable_reasons(self, case: Case, device: torch.device) -> list[str]:
        reasons = []
        if self.mode == "off":
            reasons.append("FlexAttention turned off (--flex off)")
        if case.mask == "bias":
            reasons.append("a dense float bias is an attn_mask, not a FlexAttention score_mod: not benchmarked")
        if case.group in ("varlen", *CACHE_GROUPS):
            reasons.append("FlexAttention's packed and paged forms (document masks, paged block masks) are not "
                           "set up in this bench")  # fmt: skip
        if case.sinks and device.type == "cpu":
            reasons.append(
                "FlexAttention has no sink term; with_sinks needs its log-sum-exp, which compiled Flex does not "
                "return on CPU (torch 2.13: inference only, no return_lse)"
            )
        return reasons

    def backward_unavailable(self, case: Case, device: torch.device) -> str | None:
        if device.type == "cpu":
            return "FlexAttention has no backward on CPU (torch 2.13: NotImplementedError)"
        return None

    def compiled(self):
        if self._compiled is None:
            from torch.nn.attention.flex_attention import flex_attention

            raise_recompile_limit()
            if self.mode == "dynamic":
                # The backward is timed by repeated autograd.grad(..., retain_graph=True) over one graph;
                # with symbolic sizes torch 2.11 compiled Flex's backward with donated buffers, which
                # refuse that (on the H100 every Flex backward failed). Donation only saves memory.
                import torch._functorch.config as functorch_config

                functorch_config.donated_buffer = False
            self._compiled = torch.compile(flex_attention, dynamic=(self.mode == "dynamic"))
        return self._compiled

    def prepare(self, case: Case, device: torch.device) -> Forward:
        # Where Flex has no backward, its forward runs on inputs that do not require grad (else it raises).
        inference = self.backward_unavailable(case, device) is not None
        return flex_forward(case, device, self.compiled(), inference)

    def notes(self) -> dict:
        return {"compile": self.mode}


def captured(call: Callable[[], torch.Tensor], device: torch.device) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """(graph, its output): `call` once on a side stream (which compiles any kernel and warms torch's
    allocator, as CUDA graphs require), then captured; `graph.replay()` recomputes the output in place."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        call()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    return graph, out


class CudaGraphPeer(Peer):
    """Another peer's forward captured in a CUDA graph, one graph per input set (reading that set's tensors, its
    output in the graph's memory pool), each call a replay: a serving loop's decode step, whose launches then
    cost the host one replay. The first call of an input set captures its graph: set 0 in the runner's first
    call, the others in the timer's warm-up rounds, which reach every set first wherever a round of calls
    takes under warmup_ms / sets (decode-sized calls do). Forward only."""

    def __init__(self, inner: Peer):
        self.inner = inner
        self.name = inner.name + GRAPH_SUFFIX

    def unavailable_reasons(self, case: Case, device: torch.device) -> list[str]:
        if device.type != "cuda":
            return ["CUDA graphs need a CUDA device (torch.cuda.CUDAGraph)"]
        return self.inner.unavailable_reasons(case, device)

    def backward_unavailable(self, case: Case, device: torch.device) -> str | None:
        return "a replayed CUDA graph has no autograd graph: forward only"

    def context(self):
        return self.inner.context()

    def prepare(self, case: Case, device: torch.device) -> Forward:
        forward = self.inner.prepare(case, device)
        graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # id(InputSet) -> (graph, output)

        def replay(inputs: InputSet) -> torch.Tensor:
            if id(inputs) not in graphs:
                graphs[id(inputs)] = captured(lambda: forward(inputs), device)
            graph, out = graphs[id(inputs)]
            graph.replay()
            return out

        return replay

    def notes(self) -> dict:
        return self.inner.notes()


def make_peers(flex_mode: str = "static") -> dict[str, Peer]:
    peers: list[Peer] = [
        FlashSdpaPeer(),
        FlashSdpaPeer("flashsdpa-tf32", fp32_precision="tf32"),
        TorchSdpaPeer("torch", None),
        TorchSdpaPeer("cudnn", "CUDNN_ATTENTION"),
        TorchSdpaPeer("flash", "FLASH_ATTENTION"),
        TorchSdpaPeer("efficient", "EFFICIENT_ATTENTION"),
        TorchSdpaPeer("math", "MATH"),
        TorchVarlenPeer(),
        FlexPeer(flex_mode),
        CudaGraphPeer(FlashSdpaPeer()),
        CudaGraphPeer(TorchSdpaPeer("flash", "FLASH_ATTENTION")),
    ]
    return {peer.name: peer for peer in peers}


@contextlib.contextmanager
def recording_warnings():
    """Collects the warnings raised inside (torch explains a refused backend in them)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def failure_reason(error: BaseException, caught: list | None = None, limit: int = 400) -> str:
    """One readable line: the error's first line, then torch's warnings about it."""
    lines = str(error).strip().splitlines()
    reason = f"{type(error).__name__}: {lines[0] if lines else ''}".strip()
    seen = []
    for record in caught or []:
        if issubclass(record.category, (DeprecationWarning, FutureWarning)) or "deprecated" in str(record.message):
            continue  # unrelated noise, not why a kernel was refused
        text = " ".join(str(record.message).split())
        if text and text not in seen:
            seen.append(text)
    if seen:
        reason += " | " + " | ".join(seen)
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."
