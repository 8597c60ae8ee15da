"""A value read again once it is older than a few seconds, shared by every browser session.

Streamlit reruns a page on every refresh and every widget interaction; reading the rules topic
or the verdict database each time would cost a consumer or a query per rerun and per session.
``Expiring`` keeps the last read for ``max_age`` seconds. The loader gets the previous value, so
a failed read can keep showing the last good one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Expiring"]

T = TypeVar("T")


class Expiring(Generic[T]):
    """``load(previous)`` at most once per ``max_age`` seconds; thread-safe.

    ``lock`` lets the owner share its own lock with the loader (held while ``load`` runs), so
    state the loader touches needs no second lock.
    """

    def __init__(self, load: Callable[[T], T], initial: T, max_age: float,
                 lock: threading.Lock | None = None) -> None:
        self._load = load
        self._value = initial
        self.max_age = max_age
        self._lock = lock or threading.Lock()
        self._read_at: float | None = None

    def get(self, refresh: bool = False) -> T:
        """The value, read again when ``refresh`` or older than ``max_age``."""
        with self._lock:
            stale = self._read_at is None or time.monotonic() - self._read_at >= self.max_age
            if refresh or stale:
                self._value = self._load(self._value)
                self._read_at = time.monotonic()
            return self._value

    def expire(self) -> None:
        """Make the next ``get`` read again (the caller holds the shared lock, if any)."""
        self._read_at = None
