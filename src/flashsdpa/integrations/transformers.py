"""flashsdpa as a transformers attention implementation.

    from flashsdpa.integrations import transformers as fs_transformers

    registration = fs_transformers.register()          # explicit; nothing registers at import
    model = AutoModelForCausalLM.from_config(config, attn_implementation=registration.name)
    ...
    registration.remove()                              # undoes it

The name is "fsdpa", not "flashsdpa": transformers (5.x) treats every
implementation whose name contains "flash" as a flash-attn kernel (it tries to
load it from the Hub and switches models to flash-attn code paths), so such a
name cannot be used. `register(name=...)` takes another name, rejecting one
with "flash" in it. With "sdpa" in the name transformers runs its SDPA support
checks, so a model that cannot take "sdpa" refuses it too: that is right for
most models, but Gemma 2 (softcapping) and gpt-oss (sinks) declare no SDPA
support for lack of those variants, which flashsdpa has. For them register a
name without "sdpa" (`register("fs_attention")`). Needs transformers >= 4.53
(`masking_utils`); tested with 4.53.0, 5.17.0, 5.24.0 and 5.25.0.

The attention function follows transformers' own `sdpa_attention_forward`
(transformers/integrations/sdpa_attention.py) and takes the same masks:
query (B, Hq, L, E), key/value (B, Hkv, S, E) in, (B, L, Hq, Ev) contiguous
out, plus None for the attention weights. How it treats transformers' arguments:

* GQA (`module.num_key_value_groups > 1`) always runs as `enable_gqa=True`, with
  or without a mask: flashsdpa reads each key/value head for its query-head
  group, so keys and values are never repeated (copied) per query head.
* `is_causal` is decided as in transformers 5: causal only with no mask (a
  padding or sliding-window mask already carries the causal pattern), and for
  L > 1; bottom-right aligned (the queries are the keys' last positions, see
  the mask below).
* `scaling` and `dropout` pass through unchanged (scaling None: 1/sqrt(E)).
* `softcap` (Gemma 2) and `s_aux` (gpt-oss's sinks) become flashsdpa's
  `softcap` and `sinks`; `sliding_window` W becomes `window=(W - 1, None)`
  (transformers' window: key j visible to query i when i - W < j <= i) where
  no mask came with the call.
* The mask function registered next to it (`AttentionMaskInterface`) is
  transformers' "sdpa" one, except that it builds no (B, 1, L, S) mask for a
  layer whose mask is only causal, or causal + sliding window, when nothing
  is padded and the queries are the keys' last positions (a dynamic cache, or
  none): the attention function applies causal + window itself, and the flash
  backends skip the key blocks outside the window. With padding or a static
  cache the mask is built as with "sdpa" (and under torch.compile, which
  cannot read the padding mask's values without a graph break).
  Like transformers' flash-attn path, this relies on models passing
  `sliding_window` to the attention function of their windowed layers (all of
  transformers' do).
* A packed batch (`DataCollatorWithFlattening(return_flash_attn_kwargs=True)`:
  one row of concatenated sequences with `cu_seq_lens_q/k`) runs as
  `flashsdpa.varlen_attn` (`packed_sequences_forward`): each sequence attends
  within itself, at sum(L_i^2) work, and the (T, T) mask is not read.
* A call flashsdpa cannot run goes to torch's SDPA with the reason counted in
  `flashsdpa.stats()` (its window or causal alignment turned into a mask), or
  raises `flashsdpa.UnsupportedError` in strict mode, and with `softcap` or
  sinks, which torch's SDPA does not have.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from flashsdpa import api
from flashsdpa.dispatch import UnsupportedError
from flashsdpa.integrations import sdpa as drop_in
from flashsdpa.visibility import Visibility

ATTN_IMPLEMENTATION = "fsdpa"


def _interfaces():
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as error:
        raise ImportError(
            "flashsdpa.integrations.transformers needs transformers with AttentionInterface and "
            f"masking_utils.AttentionMaskInterface (transformers >= 4.53): {error}"
        ) from None
    return AttentionInterface, AttentionMaskInterface


def _position_bias_mask(position_bias, attention_mask, is_causal, query, key):
    """Fold an additive position bias (T5-style models) into a float mask, as transformers' SDPA path does."""
    from transformers.integrations.sdpa_attention import create_position_bias_mask

    return create_position_bias_mask(position_bias, attention_mask, is_causal, query, key)


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,
    *,
    strict: bool = False,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; returns (output (B, L, Hq, Ev), None)."""
    packed = None if position_bias is not None else packed_sequences_forward(
        module, query, key, value, dropout, scaling, is_causal, sliding_window, softcap, s_aux, kwargs
    )
    if packed is not None:
        return packed, None
    enable_gqa = getattr(module, "num_key_value_groups", 1) > 1
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    window = None
    if attention_mask is None and is_causal and sliding_window is not None:
        window = (int(sliding_window) - 1, None)
    # bool(): under torch.compile with dynamic shapes `L > 1` is a SymBool.
    is_causal = bool(is_causal) and attention_mask is None and bool(query.shape[2] > 1)
    if attention_mask is not None and attention_mask.dim() == 4:
        # Masks built for a longer (static) cache than the keys passed in.
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    if position_bias is not None:
        attention_mask = _position_bias_mask(position_bias, attention_mask, is_causal, query, key)
        is_causal = False
    strict = strict or drop_in.current_mode().strict
    arguments = (query, key, value, attention_mask, dropout, is_causal, scaling, enable_gqa)
    if window is None and softcap is None and s_aux is None and not (is_causal and query.shape[2] != key.shape[2]):
        out = drop_in.route(*arguments, strict=strict)
    else:
        out = _with_variants(arguments, strict, window, softcap, s_aux)
    # (B, L, H, Ev), as transformers' own "sdpa" returns it:
    return out.transpose(1, 2).contiguous(), None  # copy needed because the models' o_proj reshapes it with .view


def packed_sequences_forward(
    module, query, key, value, dropout, scaling, is_causal, sliding_window, softcap, sinks, kwargs
) -> torch.Tensor | None:
    """A packed batch (`DataCollatorWithFlattening(return_flash_attn_kwargs=True)`: one row of
    concatenated sequences, with `cu_seq_lens_q/k` and `max_length_q/k`) as `flashsdpa.varlen_attn`:
    each sequence attends only within itself, with no (T, T) mask read and work sum(L_i^2).
    Returns (1, T, Hq, Ev), or None for any other call (which takes the mask path).

    Causal as the module says (`module.is_causal`, default True), bottom-right aligned as
    transformers' flash path does; `sliding_window` W keeps keys j > i - W, as transformers' masks do;
    `softcap` and `s_aux` (sinks) as in `attention_forward`.
    """
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None or cu_k is None or query.shape[0] != 1:
        return None
    from flashsdpa.varlen import varlen_attn

    causal = bool(getattr(module, "is_causal", True)) if is_causal is None else bool(is_causal)
    # A bound, not a value: the real maxima may be tensors (a host read); the row lengths bound them.
    max_q, max_k = query.shape[2], key.shape[2]
    out = varlen_attn(
        query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), cu_q, cu_k, max_q, max_k,
        scale=scaling, causal=causal, window_size=(-1 if sliding_window is None else int(sliding_window) - 1, -1),
        enable_gqa=query.shape[1] != key.shape[1], dropout_p=float(dropout), softcap=softcap, sinks=sinks,
    )  # fmt: skip
    return out.unsqueeze(0)  # (1, T, Hq, Ev), contiguous as varlen_attn returns it


def _with_variants(arguments, strict, window, softcap, sinks):
    """`flashsdpa.attention` with the variants (causal bottom-right aligned), or torch's SDPA where the call has
    nothing torch lacks (a window and the alignment become a mask)."""
    query, key, value, attention_mask, dropout, is_causal, scaling, enable_gqa = arguments
    reasons = drop_in.unsupported_reasons(*arguments)
    if softcap is not None or sinks is not None:
        # sdpa_kernel([MATH]) asks for torch's math path, which has no softcap or sinks: flashsdpa computes them.
        reasons = [reason for reason in reasons if reason != drop_in.MATH_ONLY_REASON]
    if not reasons:
        return api.attention(
            query, key, value, causal=is_causal, scale=scaling, attn_mask=attention_mask, dropout_p=dropout,
            enable_gqa=enable_gqa, window=window, causal_alignment="bottom_right", softcap=softcap, sinks=sinks,
        )  # fmt: skip
    if softcap is not None or sinks is not None:
        raise UnsupportedError(
            "flashsdpa cannot run this attention call, and torch's SDPA has no softcap or sinks: " + "; ".join(reasons),
            reasons,
        )
    visibility = Visibility(query.shape[2], key.shape[2], key.shape[2] - query.shape[2],
                            -1 if window is None else window[0], 0 if is_causal or window is not None else -1)
    positions = lambda n: torch.arange(n, device=query.device)  # noqa: E731
    mask = visibility.mask(positions(query.shape[2]), positions(key.shape[2]))
    return drop_in.route(query, key, value, mask, dropout, False, scaling, enable_gqa, strict=strict)


def _mask_builders():
    from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask

    return causal_mask_function, prepare_padding_mask, sdpa_mask


def causal_window_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    allow_is_causal_skip: bool = True,
    **kwargs,
):
    """transformers' "sdpa" mask function, building no mask where `attention_forward` needs none (module docstring)."""
    causal_mask_function, prepare_padding_mask, sdpa_mask = _mask_builders()
    mask_function = causal_mask_function if mask_function is None else mask_function
    if allow_is_causal_skip and _only_causal_window(
        q_length, kv_length, q_offset, kv_offset, mask_function, prepare_padding_mask(attention_mask, kv_length, kv_offset),
        local_size, kwargs.get("config"), causal_mask_function,
    ):  # fmt: skip
        return None
    return sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
        mask_function=mask_function, attention_mask=attention_mask, local_size=local_size,
        allow_is_causal_skip=allow_is_causal_skip, **kwargs,
    )  # fmt: skip


def _only_causal_window(
    q_length, kv_length, q_offset, kv_offset, mask_function, padding_mask, local_size, config, causal_mask_function
) -> bool:
    """Whether the layer's mask is causal (+ its config's sliding window) alone, on unpadded keys that end at the
    last query: then causal + window, bottom-right aligned, is the whole mask."""
    if torch.compiler.is_compiling():  # reading values below would break the graph: the mask is built instead
        return False
    if padding_mask is not None:
        padding_mask = padding_mask[:, kv_offset : kv_offset + kv_length]
        if not bool(padding_mask.all()):
            return False
    if int(q_offset) + q_length != kv_offset + kv_length:  # a static cache, or queries not at the end
        return False
    if local_size is None:
        return mask_function is causal_mask_function
    if getattr(config, "sliding_window", None) != local_size:  # chunked attention also passes a local_size
        return False
    return _is_causal_window(mask_function, local_size)


def _is_causal_window(mask_function, window: int) -> bool:
    """`mask_function` agrees with "i - window < j <= i" on rows around the window's edges (transformers' mask
    functions are pure index rules; a padding rule is never in it here)."""
    rows = torch.tensor([0, 1, window - 1, window, window + 1, 2 * window + 1]).view(-1, 1)
    cols = torch.arange(2 * window + 3).view(1, -1)
    zero = torch.zeros((), dtype=torch.long)
    try:
        got = mask_function(zero, zero, rows, cols)
    except Exception:  # noqa: BLE001 - a rule that cannot take these indices is not the one recognised here
        return False
    return isinstance(got, torch.Tensor) and torch.equal(got.expand(rows.shape[0], cols.shape[1]),
                                                         (cols <= rows) & (cols > rows - window))  # fmt: skip


@dataclass
class Registration:
    """A registration of flashsdpa in transformers' interfaces; `remove()` restores what was there."""

    name: str
    function: object
    _previous: dict = field(default_factory=dict)  # interface class -> entry replaced (None: absent)
    _removed: bool = False

    def remove(self) -> None:
        with _lock:
            if self._removed:
                return
            for interface, previous in self._previous.items():
                mapping = interface._global_mapping
                if previous is None:
                    mapping.pop(self.name, None)
                else:
                    mapping[self.name] = previous
            self._removed = True
            if _registrations.get(self.name) is self:
                del _registrations[self.name]


_lock = threading.Lock()
_registrations: dict[str, Registration] = {}


def register(name: str = ATTN_IMPLEMENTATION, *, strict: bool | None = None) -> Registration:
    """Make `attn_implementation=name` run attention on flashsdpa; returns a handle to undo it.

    Registers transformers-wide (class-level `AttentionInterface` and
    `AttentionMaskInterface`), for models created or switched
    (`model.set_attn_implementation(name)`) afterwards. Idempotent: while a
    registration under `name` is in place, it is returned again (strict updated).

    strict: raise `flashsdpa.UnsupportedError` for a call flashsdpa cannot run
        instead of falling back to torch; None reads FLASHSDPA_STRICT now. A
        `flashsdpa.sdpa(strict=True)` block or `flashsdpa.enable(strict=True)`
        makes calls strict as well.
    """
    if "flash" in name:
        raise ValueError(
            f"attention implementation name {name!r} contains 'flash': transformers would treat it as a "
            f"flash-attn kernel; use another name (default {ATTN_IMPLEMENTATION!r})"
        )
    attention_interface, mask_interface = _interfaces()
    strict = drop_in.strict_from_env() if strict is None else bool(strict)

    def flashsdpa_attention_forward(module, query, key, value, attention_mask, **kwargs):
        return attention_forward(module, query, key, value, attention_mask, strict=strict, **kwargs)

    with _lock:
        registration = _registrations.get(name)
        if registration is None:
            registration = Registration(name=name, function=flashsdpa_attention_forward)
            for interface in (attention_interface, mask_interface):
                registration._previous[interface] = interface._global_mapping.get(name)
            _registrations[name] = registration
        registration.function = flashsdpa_attention_forward
        attention_interface.register(name, flashsdpa_attention_forward)
        mask_interface.register(name, causal_window_mask)
    return registration
