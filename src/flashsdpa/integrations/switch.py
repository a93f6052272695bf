"""The on/off switch of a patched torch function, shared by the drop-in layers.

A `Switch` holds one attribute of a torch module (`torch.nn.functional.scaled_dot_product_attention`
for integrations/sdpa.py, `torch.nn.attention.varlen.varlen_attn` for integrations/torch_varlen.py)
patched with flashsdpa's wrapper: while the process-wide default is on (`enable`) or any thread is
inside a block (`block`), and restored otherwise. The wrapper asks `current_mode()` on each call
whether to run on flashsdpa, and hands a call it cannot run to `fall_back` (raise in strict mode, else
count the reasons) before calling `torch_function()`, the function the patch replaced. The semantics
(threads, blocks, strict mode, FLASHSDPA_STRICT) are documented in integrations/sdpa.py.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from dataclasses import dataclass

import torch

from flashsdpa import dispatch
from flashsdpa.dispatch import UnsupportedError

STRICT_ENV = "FLASHSDPA_STRICT"
TORCH = "torch"  # the name fallbacks are counted under in stats()["calls"]
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def strict_from_env() -> bool:
    """True when FLASHSDPA_STRICT is set to anything but "" or "0"."""
    return os.environ.get(STRICT_ENV, "0") not in ("", "0")


@dataclass(frozen=True)
class Mode:
    """Whether calls go through flashsdpa, and whether an unsupported one raises instead of falling back."""

    enabled: bool
    strict: bool

    @staticmethod
    def of(enabled: bool, strict: bool | None) -> Mode:
        """strict None reads FLASHSDPA_STRICT now."""
        return Mode(enabled=bool(enabled), strict=strict_from_env() if strict is None else bool(strict))


OFF = Mode(enabled=False, strict=False)


def tensor_reasons(name: str, t) -> list[str]:
    """Why flashsdpa leaves a call with this tensor argument to torch; empty for a plain strided tensor."""
    if not isinstance(t, torch.Tensor):
        return [f"{name} is a {type(t).__name__}, not a tensor"]
    if type(t) not in _PLAIN_TENSOR_TYPES:
        return [f"{name} is a {type(t).__name__} (tensor subclasses are left to torch)"]
    if t.is_nested:
        return [f"{name} is a nested tensor"]
    if t.layout != torch.strided:
        return [f"{name} has layout {t.layout}"]
    if not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(t):
        return [f"{name} is under a torch.func transform (vmap, grad, jvp)"]
    return []


class Switch:
    """`owner.name` patched with `wrapper` while the default is on or any thread is in a block.

    backward_follows_blocks: a thread running a backward pass, with no block of its own, follows the
    most recently entered block still open in any thread (see integrations/sdpa.py: autograd's own
    threads recompute checkpointed forwards there, which must take the forward's path).
    """

    def __init__(self, owner, name: str, wrapper, *, backward_follows_blocks: bool) -> None:
        self.owner = owner
        self.name = name
        self.wrapper = wrapper
        self.backward_follows_blocks = backward_follows_blocks
        self.lock = threading.Lock()
        self.default = OFF  # set by enable()/disable(), replaced whole (never mutated)
        self.open_blocks: list[tuple[object, Mode]] = []  # (token, mode) of every thread's open blocks, by entry
        self.original = None  # what the patch replaced, while patched
        self.thread = threading.local()  # .mode: the innermost block's Mode in this thread

    def current_mode(self) -> Mode:
        """The Mode in force for a call made now from this thread."""
        mode = getattr(self.thread, "mode", None)
        if mode is not None:
            return mode
        if self.backward_follows_blocks:
            blocks = self.open_blocks  # one read: another thread's block may replace the list
            if not torch.compiler.is_compiling() and blocks and torch._C._current_graph_task_id() != -1:
                return blocks[-1][1]
        return self.default

    def torch_function(self):
        """The function calls fall back to: the one the patch replaced, else the current one."""
        return self.original if self.original is not None else getattr(self.owner, self.name)

    def is_patched(self) -> bool:
        return getattr(self.owner, self.name) is self.wrapper

    def fall_back(self, reasons: list[str], strict: bool) -> None:
        """Before a call goes to torch: raise in strict mode, else count it and its reasons in stats()."""
        if strict:
            raise UnsupportedError(
                f"flashsdpa cannot run this {self.name} call (strict mode, no fallback to torch): " + "; ".join(reasons),
                reasons,
            )
        if not torch.compiler.is_compiling():  # the stats lock cannot be traced
            dispatch.record_call(TORCH)
            for reason in reasons:
                dispatch.record_fallback(reason)

    def _update(self) -> None:
        """(Un)patch to match the default and the open blocks; call with the lock held."""
        wanted = self.default.enabled or bool(self.open_blocks)
        installed = self.is_patched()
        if wanted and not installed:
            self.original = getattr(self.owner, self.name)
            setattr(self.owner, self.name, self.wrapper)
        elif not wanted and self.original is not None:
            if installed:
                setattr(self.owner, self.name, self.original)
            else:
                warnings.warn(
                    f"{self.owner.__name__}.{self.name} was replaced after flashsdpa patched it; flashsdpa leaves "
                    "it as it is (its wrapper now passes every call to torch)",
                    RuntimeWarning,
                    stacklevel=4,  # the caller of flashsdpa.disable() (or of the wrapper module's disable)
                )
                return  # keep `original`: a later wrapper may still call ours
            self.original = None

    def enable(self, strict: bool | None = None) -> None:
        mode = Mode.of(True, strict)
        with self.lock:
            self.default = mode
            self._update()

    def disable(self) -> None:
        with self.lock:
            self.default = OFF
            self._update()

    @contextlib.contextmanager
    def block(self, enabled: bool = True, *, strict: bool | None = None):
        """This thread's calls follow `enabled` (and `strict`, None: FLASHSDPA_STRICT now) within the block."""
        mode = Mode.of(enabled, strict)
        entry = (object(), mode)
        with self.lock:
            self.open_blocks.append(entry)
            self._update()
        previous = getattr(self.thread, "mode", None)
        self.thread.mode = mode
        try:
            yield
        finally:
            self.thread.mode = previous
            with self.lock:
                self.open_blocks = [block for block in self.open_blocks if block is not entry]
                self._update()
