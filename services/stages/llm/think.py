"""Routes a reply's reasoning out of its text, even when a tag is split across deltas.

Models such as DeepSeek-R1 and Qwen3 write their reasoning inline; it must never be spoken or
shown as reply text.  The profile's `reasoning_start` says where it begins:

- "tag" (the default): at a `<think>` the model writes, up to its `</think>`.
- "open": at the very start. Some servers put the opening `<think>` of a reasoning model into the
  prompt template (DeepSeek-R1 distills, QwQ, Qwen3 thinking models), so the stream begins inside
  the reasoning and holds only a bare `</think>`. The start of the reply is held until it can be
  told which it is; nothing is lost either way:
  - a `</think>` that ends within OPEN_LIMIT characters: everything before it is reasoning;
  - a reply that begins with `<think>` (after blanks), or whose server sends its reasoning apart
    (`reasoning_content`, Ollama's `thinking`) before any text: it was not inside reasoning, and
    is split as with "tag", from its first character;
  - no `</think>` within OPEN_LIMIT characters, or a reply the model ended itself (finish reason
    "stop") without one: everything held is released as reply text, in order;
  - a reply cut off (max_tokens, a filter) before any `</think>`: what came is reasoning, cut off
    with it, so it is never spoken.

  The hold costs no latency on a model that reasons: its reply only starts after `</think>`. On
  a model that does not, nothing is spoken until the reply ends (or passes OPEN_LIMIT), so "open"
  is for profiles whose template is known to open `<think>`.

There is no automatic mode: no early sign tells a stream that began inside reasoning from a plain
reply, so one would have to hold every reply, as "open" does, until a `</think>` or a bound. A
bound short enough for speech (a few hundred characters) is shorter than the reasoning it must
catch, which would then be spoken; one long enough holds a whole spoken reply (they run to a few
hundred characters) until it ends.

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..tags import held_back
from .providers.base import Delta

OPEN, CLOSE = "<think>", "</think>"
REASONING_STARTS = ("tag", "open")
"""The values of a profile's `reasoning_start`."""
OPEN_LIMIT = 32_768
"""reasoning_start = "open": the `</think>` that ends the reasoning the stream began inside must end
within this many characters of the reply, or all of it is reply text after all. Reasoning longer
than that (about 8,000 tokens at four characters a token) is spoken, as under "tag". Half the
65,536 characters one `reasoning` message may hold, which is how the held reasoning goes out."""
STOPPED = frozenset({"stop", "end_turn", "eos", "stop_sequence"})
"""Finish reasons of a reply the model ended itself; any other ("length", "max_tokens", a filter's,
none) cut it off."""


class ThinkSplitter:
    """push() each text delta; get back a Delta with text and reasoning separated; finish() at the end."""

    def __init__(self, start: str = "tag", limit: int = OPEN_LIMIT) -> None:
        if start not in REASONING_STARTS:
            raise ValueError(f"reasoning_start must be one of {', '.join(REASONING_STARTS)}, not {start!r}")
        if limit < len(CLOSE):
            raise ValueError(f"the limit must leave room for {CLOSE}, not {limit}")
        self._inside = False
        self._pending = ""          # the end of the text that may still grow into a tag
        self._undecided = start == "open"
        self._held = ""             # "open": the reply so far, while it is not told whether it began inside reasoning
        self._limit = limit

    @classmethod
    def from_profile(cls, profile: Mapping[str, Any]) -> ThinkSplitter:
        return cls(profile["reasoning_start"])

    @property
    def holding(self) -> bool:
        """"open": the start of the reply is still held, for want of a `</think>` or the limit."""
        return self._undecided

    def push(self, text: str, provider_reasoning: str = "") -> Delta:
        """The next text delta; `provider_reasoning` is the reasoning the provider sent apart with it,
        which shows the server separates reasoning itself (the text is then never inside it)."""
        if not self._undecided:
            return self._split(text)
        if provider_reasoning and not self._held.strip():
            held = self._held
            return self._release(self._split(held + text))
        self._held += text
        return self._decide(at_end=False, stopped=False) or Delta()

    def finish(self, finish_reason: str = "stop") -> Delta:
        """End of stream: a held-back partial tag was just text after all, and a held start is reply
        text if the model ended the reply itself (`finish_reason` in STOPPED), else reasoning."""
        decided = (self._decide(at_end=True, stopped=finish_reason in STOPPED) if self._undecided else None) or Delta()
        rest, self._pending = self._pending, ""
        last = Delta(reasoning=rest) if self._inside else Delta(text=rest)
        return Delta(decided.text + last.text, decided.reasoning + last.reasoning)

    def _decide(self, at_end: bool, stopped: bool) -> Delta | None:
        """"open": whether the held start was reasoning, once that can be told (None: not yet; at the
        end it always can)."""
        held = self._held
        start = held.lstrip()
        if start.startswith(OPEN):
            return self._release(self._split(held))
        if not at_end and len(held) < self._limit and OPEN.startswith(start):
            return None   # blanks, or the start of a <think>
        close = held.find(CLOSE, 0, self._limit)
        if close >= 0:
            after = self._release(self._split(held[close + len(CLOSE):]))
            return Delta(after.text, held[:close] + after.reasoning)
        if len(held) >= self._limit or (at_end and stopped):
            return self._release(self._split(held))
        if at_end:
            return self._release(Delta(reasoning=held))
        return None

    def _release(self, delta: Delta) -> Delta:
        self._undecided, self._held = False, ""
        return delta

    def _split(self, text: str) -> Delta:
        """`<think>…</think>` spans to reasoning, the rest to text, a tag split across deltas held."""
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
