"""Routes `<think>…</think>` spans to reasoning, even when a tag is split across deltas.

Models such as DeepSeek-R1 and Qwen3 write their reasoning inline; it must never
be spoken or shown as reply text.  Pure: no I/O.
"""

from __future__ import annotations

from ..tags import held_back
from .providers.base import Delta

OPEN, CLOSE = "<think>", "</think>"


class ThinkSplitter:
    """push() each text delta; get back a Delta with text and reasoning separated."""

    def __init__(self) -> None:
        self._inside = False
        self._pending = ""

    def push(self, text: str) -> Delta:
        self._pending += text
        reply: list[str] = []
        reasoning: list[str] = []
        while True:
            tag = CLOSE if self._inside else OPEN
            index = self._pending.find(tag)
            if index < 0:
                break
            (reasoning if self._inside else reply).append(self._pending[:index])
            self._pending = self._pending[index + len(tag):]
            self._inside = not self._inside
        keep = held_back(self._pending, (CLOSE if self._inside else OPEN,))
        ready = self._pending[:len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep:]
        (reasoning if self._inside else reply).append(ready)
        return Delta(text="".join(reply), reasoning="".join(reasoning))

    def finish(self) -> Delta:
        """End of stream: a held-back partial tag was just text after all."""
        rest, self._pending = self._pending, ""
        return Delta(reasoning=rest) if self._inside else Delta(text=rest)
