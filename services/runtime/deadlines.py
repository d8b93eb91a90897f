"""When each of many keys next has timed work, kept in a heap, so a stage's `next_tick` costs the same
with 4,096 replies remembered as with one.

A stage's loop asks `next_tick` twice per message. A scan of every reply it holds there made a stage
that remembers thousands of replies spend most of its CPU looking for the one due next (issue 15:
history, 17 % of its CPU after 200 replies). Pure: no clock, no threads.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class Deadlines(Generic[K]):
    """At most one deadline per key: `set` moves it, `clear` drops it, `due` takes the ones reached.

    A moved or cleared deadline stays in the heap until it comes up and is skipped, so each change
    costs O(log n); the heap is rebuilt when those stale entries outnumber the live ones."""

    def __init__(self) -> None:
        self._at: dict[K, float] = {}
        self._heap: list[tuple[float, int, K]] = []
        self._order = itertools.count()
        """Breaks ties between equal times, so keys are never compared."""

    def __len__(self) -> int:
        return len(self._at)

    def set(self, key: K, at: float) -> None:
        if self._at.get(key) == at:
            return
        self._at[key] = at
        heapq.heappush(self._heap, (at, next(self._order), key))
        if len(self._heap) > 2 * len(self._at) + 64:
            self._heap = [(at, next(self._order), key) for key, at in self._at.items()]
            heapq.heapify(self._heap)

    def clear(self, key: K) -> None:
        self._at.pop(key, None)

    def next(self) -> float | None:
        """The earliest deadline, or None."""
        heap = self._heap
        while heap and self._at.get(heap[0][2]) != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def due(self, now: float) -> list[K]:
        """The keys whose deadline is `now` or earlier, earliest first; their deadlines are dropped."""
        keys = []
        while (at := self.next()) is not None and at <= now:
            key = heapq.heappop(self._heap)[2]
            del self._at[key]
            keys.append(key)
        return keys
