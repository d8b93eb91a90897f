"""Automatic early stop: the reply guard decides, as text streams, where a reply has gone wrong.

Stopping early saves tokens and the listener's patience.  The guard holds back
the few characters that might be the start of a stop string or of a user-turn
prefix, so the text it releases is exactly the text before the point it fired.
Pure: no I/O, no clock.

One guard is always on: `size` stops a reply whose text, or whose reasoning, reaches SIZE_LIMIT.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ...protocol.kinds import REPLY
from ..tags import held_back

_SENTENCE_END = re.compile(r"[.!?…]+[\"»”')\]]*(?=\s)")
_WORD = re.compile(r"\w+", re.UNICODE)
SIZE_LIMIT = REPLY
"""UTF-8 bytes of reply text, and apart from it of reasoning, that one reply may have: llm.done carries
both whole, so each must fit its field (REPLY characters) and both together its frame limit (4 MiB,
which two REPLY-long texts of 4-byte characters would fill alone).  A reply that reaches it is cut there."""


@dataclass(frozen=True)
class GuardPolicy:
    """Which guards are on; 0 or empty turns one off."""

    stop_strings: tuple[str, ...] = ()
    max_chars: int = 0
    max_sentences: int = 0
    repeat_ngram: int = 0
    repeat_count: int = 3
    user_turn_prefixes: tuple[str, ...] = ()

    @classmethod
    def from_profile(cls, profile: Mapping[str, Any]) -> GuardPolicy:
        return cls(stop_strings=tuple(s for s in profile["stop_strings"] if s),
                   max_chars=profile["max_reply_chars"], max_sentences=profile["max_reply_sentences"],
                   repeat_ngram=profile["repeat_ngram"], repeat_count=profile["repeat_count"],
                   user_turn_prefixes=tuple(p for p in profile["user_turn_prefixes"] if p))


class ReplyGuard:
    """Feed reply text with push(); release what it returns; `fired` names the guard that stopped it."""

    def __init__(self, policy: GuardPolicy) -> None:
        self.policy = policy
        self.fired: str | None = None
        self.released = ""
        self._released_bytes = 0
        self._reasoning_bytes = 0
        self._pending = ""
        self._markers = [*policy.stop_strings, *("\n" + prefix for prefix in policy.user_turn_prefixes)]
        self._ngrams: dict[tuple[str, ...], int] = {}
        self._recent: collections.deque[str] = collections.deque(maxlen=max(policy.repeat_ngram, 1))
        self._partial_word = ""

    def push(self, text: str) -> str:
        """Take a delta; return the text that is now safe to pass on ("" once fired)."""
        if self.fired:
            return ""
        self._pending += text
        cut, name = self._first_marker()
        if name is not None:
            return self._stop(self._pending[:cut], name)
        keep = self._held_back()
        ready, self._pending = self._pending[:len(self._pending) - keep], self._pending[len(self._pending) - keep:]
        return self._release(ready)

    def finish(self) -> str:
        """The stream ended by itself: release what was held back (limits still apply)."""
        if self.fired:
            return ""
        ready, self._pending = self._pending, ""
        return self._release(ready)

    # --- markers: stop strings and user-turn prefixes -------------------------------------

    def _first_marker(self) -> tuple[int, str | None]:
        """Earliest stop string or user-turn prefix in the pending text (a reply opening with a
        user-turn prefix counts too)."""
        best, name = len(self._pending) + 1, None
        for stop in self.policy.stop_strings:
            index = self._pending.find(stop)
            if 0 <= index < best:
                best, name = index, "stop_string"
        context = ("\n" if not self.released else self.released[-1]) + self._pending
        for prefix in self.policy.user_turn_prefixes:
            index = context.find("\n" + prefix) - 1  # in pending's coordinates: the newline is not kept
            if -1 <= index < best:
                best, name = max(index, 0), "user_turn"
        return best, name

    def _held_back(self) -> int:
        """Length of the longest pending suffix that could still grow into a marker.

        The character before the pending text counts too (a line start, or the reply's start, which
        counts as one), so "U" opening the reply is held as the possible start of "\nUser:".
        """
        text = ("\n" if not self.released else self.released[-1]) + self._pending
        return min(held_back(text, self._markers), len(self._pending))

    def reasoning(self, text: str) -> str:
        """Take a piece of reasoning; return what fits SIZE_LIMIT.  The piece that passes it fires
        `size`, so the call is closed: a model that reasons without end is stopped like one that talks
        without end."""
        room = SIZE_LIMIT - self._reasoning_bytes
        data = text.encode()
        if len(data) <= room:
            self._reasoning_bytes += len(data)
            return text
        self._reasoning_bytes = SIZE_LIMIT
        if not self.fired:
            self._stop("", "size")
        return _fitting(data, room)

    # --- limits on released text ----------------------------------------------------------

    def _release(self, ready: str) -> str:
        for limit in (self._char_limit, self._sentence_limit, self._repetition_limit):
            cut = limit(ready)
            if cut is not None:
                return self._stop(ready[:cut[0]], cut[1])
        data = ready.encode()  # once per piece: it sizes both the size limit's check and its count
        room = SIZE_LIMIT - self._released_bytes
        if len(data) > room:  # last, so that a limit of the profile that cuts earlier names itself
            return self._stop(_fitting(data, room), "size")
        self.released += ready
        self._released_bytes += len(data)
        return ready

    def _char_limit(self, ready: str) -> tuple[int, str] | None:
        limit = self.policy.max_chars
        if not limit or len(self.released) + len(ready) <= limit:
            return None
        room = limit - len(self.released)
        space = ready.rfind(" ", 0, room + 1)
        return (space if space > 0 else max(room, 0)), "max_chars"

    def _sentence_limit(self, ready: str) -> tuple[int, str] | None:
        limit = self.policy.max_sentences
        if not limit:
            return None
        text = self.released + ready + " "
        ends = [match.end() for match in _SENTENCE_END.finditer(text)]
        if len(ends) < limit or ends[limit - 1] > len(self.released) + len(ready):
            return None
        return ends[limit - 1] - len(self.released), "max_sentences"

    def _repetition_limit(self, ready: str) -> tuple[int, str] | None:
        """An n-gram of words seen `repeat_count` times means the model loops: stop there.

        Words are counted once complete, so the scan is incremental and linear in the reply.
        """
        size = self.policy.repeat_ngram
        if not size:
            return None
        text = self._partial_word + ready
        words = list(_WORD.finditer(text))
        trailing = words.pop() if words and words[-1].end() == len(text) else None
        for word in words:
            self._recent.append(word.group().lower())
            if len(self._recent) < size:
                continue
            gram = tuple(self._recent)
            self._ngrams[gram] = self._ngrams.get(gram, 0) + 1
            if self._ngrams[gram] >= self.policy.repeat_count:
                # Cut after the word that completes the repeat: that point is known the moment the
                # word ends, however the reply was split into deltas, so both modes cut alike.
                return word.end() - len(self._partial_word), "repetition"
        self._partial_word = trailing.group() if trailing else ""
        return None

    def _stop(self, last: str, name: str) -> str:
        self.fired = name
        self.released += last
        self._released_bytes += len(last.encode())
        self._pending = ""
        return last


def _fitting(data: bytes, room: int) -> str:
    """The longest start of UTF-8 `data` that fits `room` bytes, as text (no character cut in two)."""
    return data[:room].decode("utf-8", "ignore")
