"""The server's memory budget: what every visitor's objects keep, within one limit.

Anything that keeps droppable memory for a visitor (their sessions) or for everyone (the API's
cache of conversation states) is an `Accounted` object; it need not be a session. Past the limit
the budget drops the largest objects of idle owners first and tells each owner what went.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Protocol


class Accounted(Protocol):
    """What the budget needs of an object it accounts."""

    busy: bool  # generating now: nothing of it is dropped
    last_active: float  # time.monotonic() of its last request
    budget: weakref.ref | None  # set by MemoryBudget.add

    def memory_items(self) -> list[tuple[str, int]]:
        """(key, bytes) of every droppable object it keeps."""

    def drop(self, key: str) -> str:
        """Free one object; returns what was dropped, as a phrase for its owner."""

    def tell(self, sentence: str) -> None:
        """A sentence for its owner (or nobody)."""


class MemoryBudget:
    """Accounts the objects every `Accounted` keeps; past `limit_bytes`, drops the largest objects of
    idle ones first (then of others that are not generating), and tells each owner what went."""

    def __init__(self, limit_bytes: int, idle_after_s: float = 60.0):
        self.limit_bytes = int(limit_bytes)
        self.idle_after_s = idle_after_s
        self._sessions: weakref.WeakSet[Accounted] = weakref.WeakSet()
        self._lock = threading.Lock()
        self.dropped = 0  # objects dropped so far (tests, the status line)

    def add(self, session: Accounted) -> Accounted:
        with self._lock:
            self._sessions.add(session)
        session.budget = weakref.ref(self)
        return session

    def remove(self, session: Accounted) -> None:
        with self._lock:
            self._sessions.discard(session)

    def sessions(self) -> list[Accounted]:
        with self._lock:
            return list(self._sessions)

    def used_bytes(self) -> int:
        return sum(n for s in self.sessions() for _, n in s.memory_items())

    def enforce(self, keep: Accounted | None = None) -> int:
        """Drop objects until the total is within the limit; returns the bytes in use after."""
        with self._lock:
            sessions = list(self._sessions)
            items = [(n, s, key) for s in sessions for key, n in s.memory_items()]
            total = sum(n for n, _, _ in items)
            if total <= self.limit_bytes:
                return total
            now = time.monotonic()

            def order(item):
                n, s, _ = item
                idle = not s.busy and now - s.last_active >= self.idle_after_s
                return (0 if idle else 1, -n)

            for n, s, key in sorted(items, key=order):
                if total <= self.limit_bytes:
                    break
                if s is keep or s.busy:
                    continue
                what = s.drop(key)
                s.tell(f"To free memory for other visitors, the server dropped {what}.")
                total -= n
                self.dropped += 1
            return total
