"""The compiled-kernel-variant cache: one entry per `KernelKey`, with hit/miss counts.

A backend asks `kernel_cache.get(key, build)` before it launches; `build(key)`
runs once per key (it chooses block shapes and, on the GPU, compiles the Triton
variant) and its result is reused for every later problem with the same key,
whatever its sequence lengths, batch, heads or softmax scale. Safe to use from
several threads: the first caller of a key builds it, others wait for it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Hashable


@dataclass(frozen=True)
class CacheInfo:
    variants: int
    hits: int
    misses: int
    keys: tuple[Hashable, ...]


class KernelCache:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[Hashable, Any] = {}
        self._building: dict[Hashable, threading.Event] = {}
        self._hits = 0
        self._misses = 0

    def get(self, key: Hashable, build: Callable[[Hashable], Any]) -> Any:
        while True:
            with self._lock:
                if key in self._entries:
                    self._hits += 1
                    return self._entries[key]
                pending = self._building.get(key)
                if pending is None:
                    self._misses += 1
                    pending = self._building[key] = threading.Event()
                    break
            pending.wait()  # another thread is building this key; then re-check
        try:
            value = build(key)
            with self._lock:
                self._entries[key] = value
            return value
        finally:
            with self._lock:
                del self._building[key]
            pending.set()

    def info(self) -> CacheInfo:
        with self._lock:
            return CacheInfo(len(self._entries), self._hits, self._misses, tuple(self._entries))

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._hits = self._misses = 0


kernel_cache = KernelCache()


class RecentValues(dict):
    """Values made from a key, kept for the next call with the same key (descriptors, launch plans,
    torch's answers): a repeated call shape is one dict lookup. Bounded: cleared when full, so a long
    run over ever new shapes does not grow it. Not locked: a race makes a value twice, both right."""

    def __init__(self, limit: int = 1024) -> None:
        super().__init__()
        self.limit = limit

    def keep(self, key: Hashable, value: Any) -> Any:
        if len(self) >= self.limit:
            self.clear()
        self[key] = value
        return value
