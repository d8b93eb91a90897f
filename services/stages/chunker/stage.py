"""The chunker stage shell: tokens in; display text deltas and speakable chunks out."""

from __future__ import annotations

import collections
import dataclasses
import time
from dataclasses import dataclass, field

from ...protocol import Message
from ...runtime import Stage
from .core import Chunker, ChunkerOutput, ChunkerPolicy

CANCELLED_MEMORY = 4096
"""Cancelled replies remembered, so their late tokens and llm.done are not spoken."""


@dataclass
class ReplyState:
    """One reply's splitter and the text it has been fed, to reconcile with llm.done."""

    chunker: Chunker
    fed: list[str] = field(default_factory=list)


class ChunkerStage(Stage):
    name = "chunker"
    kinds = ("token", "llm.done", "cancel")
    sharded = True

    def prepare(self) -> None:
        self.policy = ChunkerPolicy.from_mapping(self.config["chunker"])
        self.replies: dict[tuple[str, str], ReplyState] = {}
        self.cancelled: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()

    def _state(self, session: str, id: str) -> ReplyState:
        if (session, id) not in self.replies:
            self.replies[(session, id)] = ReplyState(Chunker(self.policy))
        return self.replies[(session, id)]

    def handle(self, message: Message) -> None:
        now = time.monotonic()
        if (message.session, message.id) in self.cancelled:
            return
        if message.kind == "token":
            state = self._state(message.session, message.id)
            state.fed.append(message["text"])
            self._emit(message.session, message.id, state.chunker.feed(message["text"], now))
        elif message.kind == "llm.done":
            self._finish(message, now)
        elif message.kind == "cancel":
            self._cancel(message.session, message.id)

    def _cancel(self, session: str, id: str) -> None:
        """Drop the reply (or every reply of the session), end its display text, ignore its rest."""
        keys = [key for key in self.replies if key[0] == session and (not id or key[1] == id)]
        if id and (session, id) not in keys:
            keys.append((session, id))
        for key in keys:
            if self.replies.pop(key, None) is not None:
                self.bus.publish("text", session, key[1], delta="", final=True)
            self.cancelled[key] = None
        while len(self.cancelled) > CANCELLED_MEMORY:
            self.cancelled.popitem(last=False)

    def _finish(self, done: Message, now: float) -> None:
        """Flush the reply; text llm.done has that the tokens lacked is fed first, so none is lost."""
        state = self._state(done.session, done.id)
        fed = "".join(state.fed)
        if len(done["text"]) > len(fed) and done["text"].startswith(fed):
            self.bus.counters["recovered"] += 1
            self._emit(done.session, done.id, state.chunker.feed(done["text"][len(fed):], now))
        elif done["text"] != fed:
            self.bus.report("text_mismatch", "tokens received differ from llm.done text; "
                            "speaking what arrived", done.session, done.id, "llm.done")
        self._emit(done.session, done.id, state.chunker.finish(now), final=True)
        del self.replies[(done.session, done.id)]

    def next_tick(self) -> float | None:
        due = [state.chunker.next_flush_at for state in self.replies.values()
               if state.chunker.next_flush_at is not None]
        return min(due) if due else None

    def tick(self, now: float) -> None:
        for (session, id), state in list(self.replies.items()):
            due = state.chunker.next_flush_at
            if due is not None and due <= now:
                self._emit(session, id, state.chunker.tick(now))

    def _emit(self, session: str, id: str, output: ChunkerOutput, final: bool = False) -> None:
        if output.display or output.display_marks or final:
            marks = [dataclasses.asdict(mark) for mark in output.display_marks]
            self.bus.publish("text", session, id, delta=output.display, final=final,
                             **({"marks": marks} if marks else {}))
        for chunk in output.chunks:
            self.bus.publish("chunk", session, id, text=chunk.text, index=chunk.index, final=chunk.final,
                             marks=[dataclasses.asdict(mark) for mark in chunk.marks])
