"""What every stage keeps about replies: the one cancel rule, and a registry of the replies in flight
with a bounded memory of the ones that ended.

Pure: no sockets, threads or clock. Stage cores (tts, player, llm's jobs) and shells (chunker,
history) use it, so a cancel means the same everywhere and no stage's memory grows without bound.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

Key = tuple[str, str]
"""A reply: (session, id)."""
K = TypeVar("K")
V = TypeVar("V")
MEMORY = 4096
"""Replies remembered as ended, and at most kept in flight, per stage: enough for every session a
stage serves at once many times over, small enough to stay a few hundred KB."""


def cancels(reply: Key, session: str, id: str) -> bool:
    """The cancel rule: a `cancel` with an id ends that reply of the session; with an empty id it
    ends every reply of the session."""
    return reply[0] == session and (not id or reply[1] == id)


class Recent(Generic[K, V]):
    """A map that keeps at most `limit` entries: a new entry past the limit evicts the oldest."""

    def __init__(self, limit: int = MEMORY) -> None:
        self.limit = limit
        self._items: OrderedDict[K, V] = OrderedDict()

    def __setitem__(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.limit:
            self._items.popitem(last=False)

    def __getitem__(self, key: K) -> V:
        return self._items[key]

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[K]:
        return iter(self._items)

    def get(self, key: K, default: V | None = None) -> V | None:
        return self._items.get(key, default)

    def pop(self, key: K, default: V | None = None) -> V | None:
        return self._items.pop(key, default)

    def items(self) -> list[tuple[K, V]]:
        return list(self._items.items())

    def values(self) -> list[V]:
        return list(self._items.values())


class Replies(Generic[V]):
    """The state a stage holds per reply in flight, by (session, id), oldest first, and the replies
    that ended (finished or cancelled), so that their late messages are dropped.

    Both are bounded by `memory`: a reply in flight that is pushed out is forgotten (its stream was
    abandoned), an ended one is no longer recognised (its late messages are long past)."""

    def __init__(self, memory: int = MEMORY) -> None:
        self.live: Recent[Key, V] = Recent(memory)
        self.ended: Recent[Key, None] = Recent(memory)

    def __contains__(self, key: object) -> bool:
        return key in self.live

    def __len__(self) -> int:
        return len(self.live)

    def __iter__(self) -> Iterator[Key]:
        return iter(list(self.live))

    def get(self, key: Key) -> V | None:
        return self.live.get(key)

    def items(self) -> list[tuple[Key, V]]:
        return self.live.items()

    def values(self) -> list[V]:
        return self.live.values()

    def is_ended(self, key: Key) -> bool:
        return key in self.ended

    def open(self, key: Key, make: Callable[[], V]) -> V | None:
        """The reply's state, made on its first message; None once the reply has ended."""
        if key in self.ended:
            return None
        state = self.live.get(key)
        if state is None:
            state = self.live[key] = make()
        return state

    def end(self, key: Key) -> V | None:
        """The reply is over: forget its state (returned) and drop whatever of it still comes."""
        self.ended[key] = None
        return self.live.pop(key)

    def cancel(self, session: str, id: str) -> list[tuple[Key, V | None]]:
        """End what a `cancel` names (see `cancels`): each reply in flight it matches, and, for an
        id, that reply even if nothing of it came yet. Returns each ended reply with its state."""
        keys = [key for key in self.live if cancels(key, session, id)]
        if id and (session, id) not in keys:
            keys.append((session, id))
        return [(key, self.end(key)) for key in keys]
