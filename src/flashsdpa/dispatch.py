"""Choosing a backend: each one is asked whether it can take a problem, and why not.

The automatic choice tries the backends in order of speed for the device and
records every fallback's reason in `stats()`. A backend pinned by the caller
(`backend=` or `use_backend(...)`) either takes the problem or raises with its
reasons: only the automatic choice falls back.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import itertools
import threading
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from flashsdpa.backends.aten import AtenBackend
from flashsdpa.backends.base import Backend
from flashsdpa.backends.hopper import HopperBackend
from flashsdpa.backends.reference import ReferenceBackend
from flashsdpa.backends.tiled import TiledBackend
from flashsdpa.backends.triton import TritonBackend
from flashsdpa.descriptor import AttentionDescriptor

BACKENDS: dict[str, Backend] = {
    b.name: b for b in (HopperBackend(), TritonBackend(), AtenBackend(), TiledBackend(), ReferenceBackend())
}
# On the GPU, the Hopper kernels where they apply (sm_90), else the portable Triton ones; on the CPU,
# torch's own fused kernel where it computes flashsdpa's semantics (backends/aten.py).
AUTOMATIC_ORDER = {"cuda": ("hopper", "triton", "tiled"), "cpu": ("aten", "tiled")}
DEFAULT_ORDER = ("tiled",)

_pinned_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("flashsdpa_backend", default=None)


class UnsupportedError(ValueError):
    """No backend (or not the requested one) can compute this problem; `.reasons` says why."""

    def __init__(self, message: str, reasons: list[str]):
        super().__init__(message)
        self.reasons = reasons


def backend_names() -> tuple[str, ...]:
    return tuple(BACKENDS)


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {name!r}") from None


@contextlib.contextmanager
def use_backend(name: str):
    """Pin every flashsdpa call inside the block (this thread / task) to backend `name`."""
    get_backend(name)
    token = _pinned_backend.set(name)
    try:
        yield
    finally:
        _pinned_backend.reset(token)


pinned_backend = _pinned_backend.get  # () -> the backend name `use_backend` pins here, or None


@dataclass
class _Stats:
    calls: collections.Counter = field(default_factory=collections.Counter)
    fallbacks: collections.Counter = field(default_factory=collections.Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)


_stats = _Stats()


def record_call(backend: str) -> None:
    with _stats.lock:
        _stats.calls[backend] += 1


# The calls of the plain CPU lane (`call_plans.plain_cpu_call`: the aten backend), counted apart and added to
# stats()'s "aten": `next` on an itertools.count is one C call, atomic, where `record_call`'s lock and Counter
# cost 3-6 us a call right after a kernel. `_plain_aten_reads`: the next() calls `stats` made on it.
plain_aten_calls = itertools.count()
_plain_aten_reads = 0


def record_fallback(reason: str) -> None:
    with _stats.lock:
        _stats.fallbacks[reason] += 1


def stats() -> dict:
    """{'calls': {backend: count}, 'fallbacks': {reason: count}} since the last reset."""
    global _plain_aten_reads
    with _stats.lock:
        calls = dict(_stats.calls)
        plain = next(plain_aten_calls) - _plain_aten_reads
        _plain_aten_reads += 1
        if plain:
            calls["aten"] = calls.get("aten", 0) + plain
        return {"calls": calls, "fallbacks": dict(_stats.fallbacks)}


def reset_stats() -> None:
    global plain_aten_calls, _plain_aten_reads
    with _stats.lock:
        _stats.calls.clear()
        _stats.fallbacks.clear()
        plain_aten_calls, _plain_aten_reads = itertools.count(), 0


class Choice(NamedTuple):  # a NamedTuple: made on every call that has no call plan, in a third of a dataclass's time
    """Which backend runs a problem, and the reasons of the backends the automatic choice skipped before it
    (recorded as fallbacks each time the choice is used)."""

    backend: str
    fallbacks: tuple[str, ...] = ()


def decide(desc: AttentionDescriptor, device: torch.device, requested: str | None = None) -> Choice:
    """The backend that will run `desc` (`requested`, else the pin, else the automatic choice); records
    nothing; raises UnsupportedError."""
    requested = requested or pinned_backend()
    if requested is not None:
        reasons = backend_reasons(get_backend(requested), desc, device)
        if reasons:
            raise UnsupportedError(f"backend {requested!r} cannot run this problem: " + "; ".join(reasons), reasons)
        return Choice(requested)
    name, skipped = automatic_choice(desc, device)
    if name is None:
        raise UnsupportedError("no flashsdpa backend can run this problem: " + "; ".join(skipped), skipped)
    return Choice(name, tuple(skipped))


def choose_backend(desc: AttentionDescriptor, device: torch.device, requested: str | None = None) -> str:
    """Name of the backend that will run `desc`; records fallbacks; raises UnsupportedError."""
    choice = decide(desc, device, requested)
    for reason in choice.fallbacks:
        record_fallback(reason)
    return choice.backend


def record_run(choice: Choice) -> None:
    """One run of `choice`: its fallbacks and the call, as `choose_backend` and `record_call` count them."""
    with _stats.lock:
        for reason in choice.fallbacks:
            _stats.fallbacks[reason] += 1
        _stats.calls[choice.backend] += 1


def backend_reasons(backend: Backend, desc: AttentionDescriptor, device: torch.device) -> list[str]:
    """Why `backend` cannot run `desc` (empty if it can): its own answer, and the variants of a backend
    that does not check them (`Backend.checks_variants`)."""
    reasons = backend.unsupported_reasons(desc, device)
    if not backend.checks_variants and (variants := desc.variants):
        reasons = [*reasons, f"the {backend.name} backend does not compute {', '.join(variants)}"]
    return reasons


def automatic_choice(desc: AttentionDescriptor, device: torch.device) -> tuple[str | None, list[str]]:
    """(the first backend in speed order that takes `desc` or None, the reasons of those skipped); records nothing."""
    skipped = []
    for name in AUTOMATIC_ORDER.get(device.type, DEFAULT_ORDER):
        reasons = backend_reasons(BACKENDS[name], desc, device)
        if not reasons:
            return name, skipped
        skipped.extend(f"{name}: {r}" for r in reasons)
    return None, skipped
