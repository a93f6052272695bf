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
with "flash" in it. Keep "sdpa" in it: transformers then runs its SDPA support
checks, so a model that cannot take "sdpa" refuses flashsdpa too. Needs
transformers >= 4.53 (`masking_utils`); tested with 4.53.0, 5.17.0 and 5.24.0.

The attention function follows transformers' own `sdpa_attention_forward`
(transformers/integrations/sdpa_attention.py) and takes the same masks, which
it registers next to it (`AttentionMaskInterface`, the "sdpa" mask function):
query (B, Hq, L, E), key/value (B, Hkv, S, E) in, (B, L, Hq, Ev) contiguous
out, plus None for the attention weights. How it treats transformers' arguments:

* GQA (`module.num_key_value_groups > 1`) always runs as `enable_gqa=True`, with
  or without a mask: flashsdpa reads each key/value head for its query-head
  group, so keys and values are never repeated (copied) per query head.
* `is_causal` is decided as in transformers 5: causal only for L > 1 with no
  mask (a padding or sliding-window mask already carries the causal pattern).
* `scaling` and `dropout` pass through unchanged (scaling None: 1/sqrt(E)).
* A sliding-window layer gets its window in the mask, as with "sdpa" (the
  `sliding_window` argument is not used, by transformers' SDPA path either).
* A packed batch (`DataCollatorWithFlattening(return_flash_attn_kwargs=True)`:
  one row of concatenated sequences with `cu_seq_lens_q/k`) runs as
  `flashsdpa.varlen_attn` (`packed_sequences_forward`): each sequence attends
  within itself, at sum(L_i^2) work, and the (T, T) mask is not read.
* A call flashsdpa cannot run goes to torch's SDPA with the reason counted in
  `flashsdpa.stats()`, or raises `flashsdpa.UnsupportedError` in strict mode.
  `softcap` raises, as it does with "sdpa".
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from flashsdpa.integrations import sdpa as drop_in

ATTN_IMPLEMENTATION = "fsdpa"
_MASK_IMPLEMENTATION = "sdpa"  # the boolean (B, 1, L, S) masks transformers builds for its SDPA path


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
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; returns (output (B, L, Hq, Ev), None)."""
    if kwargs.get("softcap") is not None:
        raise ValueError(
            f"`{ATTN_IMPLEMENTATION}` (flashsdpa) attention does not support `softcap`, like `sdpa`; "
            "use `eager` or `flex_attention`"
        )
    packed = None if position_bias is not None else packed_sequences_forward(
        module, query, key, value, dropout, scaling, is_causal, kwargs
    )
    if packed is not None:
        return packed, None
    enable_gqa = getattr(module, "num_key_value_groups", 1) > 1
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    # bool(): under torch.compile with dynamic shapes `L > 1` is a SymBool.
    is_causal = bool(is_causal) and attention_mask is None and bool(query.shape[2] > 1)
    if attention_mask is not None and attention_mask.dim() == 4:
        # Masks built for a longer (static) cache than the keys passed in.
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    if position_bias is not None:
        attention_mask = _position_bias_mask(position_bias, attention_mask, is_causal, query, key)
        is_causal = False
    strict = strict or drop_in.current_mode().strict
    out = drop_in.route(query, key, value, attention_mask, dropout, is_causal, scaling, enable_gqa, strict=strict)
    # (B, L, H, Ev), as transformers' own "sdpa" returns it:
    return out.transpose(1, 2).contiguous(), None  # copy needed because the models' o_proj reshapes it with .view


_PACKED_KEYWORDS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def packed_sequences_forward(module, query, key, value, dropout, scaling, is_causal, kwargs) -> torch.Tensor | None:
    """A packed batch (`DataCollatorWithFlattening(return_flash_attn_kwargs=True)`: one row of
    concatenated sequences, with `cu_seq_lens_q/k` and `max_length_q/k`) as `flashsdpa.varlen_attn`:
    each sequence attends only within itself, with no (T, T) mask read and work sum(L_i^2).
    Returns (1, T, Hq, Ev), or None for any other call (which takes the mask path).

    Causal as the module says (`module.is_causal`, default True), bottom-right aligned as
    transformers' flash path does; `sliding_window` W keeps keys j > i - W, as transformers' masks do.
    """
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None or cu_k is None or query.shape[0] != 1:
        return None
    from flashsdpa.varlen import varlen_attn

    causal = bool(getattr(module, "is_causal", True)) if is_causal is None else bool(is_causal)
    window = kwargs.get("sliding_window")
    # A bound, not a value: the real maxima may be tensors (a host read); the row lengths bound them.
    max_q, max_k = query.shape[2], key.shape[2]
    out = varlen_attn(
        query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), cu_q, cu_k, max_q, max_k,
        scale=scaling, causal=causal, window_size=(-1 if window is None else window - 1, -1),
        enable_gqa=query.shape[1] != key.shape[1], dropout_p=float(dropout),
    )  # fmt: skip
    return out.unsqueeze(0)  # (1, T, Hq, Ev), contiguous as varlen_attn returns it


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
        mask_interface.register(name, mask_interface._global_mapping[_MASK_IMPLEMENTATION])
    return registration
