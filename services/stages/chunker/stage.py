"""The chunker stage shell: tokens in; display text deltas and speakable chunks out."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ...protocol import Cancel, Chunk, ErrorCode, LlmDone, Message, Text, TextMark, Token
from ...runtime import Stage, handles
from ...runtime.deadlines import Deadlines
from ...runtime.replies import Key, Replies
from .core import Chunker, ChunkerOutput, ChunkerPolicy


@dataclass
class ReplyState:
    """One reply's splitter and the text it has been fed, to reconcile with llm.done."""

    chunker: Chunker
    fed: list[str] = field(default_factory=list)


HELD_TEXT = 4096
"""The most display text held for one `text` message: well under the kind's limit, whatever the deltas."""
HELD_MARKS = 64


@dataclass
class Held:
    """What one reply has to publish at the next catch-up: its display text and marks since the last
    `text`, then its chunks, in the order they were decided."""

    display: list[str] = field(default_factory=list)
    marks: list[TextMark] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)
    length: int = 0
    final: bool = False


class ChunkerStage(Stage):
    name = "chunker"
    sharded = True

    def prepare(self) -> None:
        self.policy = ChunkerPolicy.from_mapping(self.config["chunker"])
        self.replies: Replies[ReplyState] = Replies()
        """Replies being split; the ended ones (finished or cancelled) are remembered, so their late
        tokens and llm.done are not spoken."""
        self.held: dict[Key, Held] = {}
        """Output decided but not yet published, by reply, in the order replies first had some: sent
        at the next catch-up (Stage.caught_up), so a chunker that fell behind sends one `text` for the
        tokens of a reply that were queued together, not one per token."""
        self.flushes: Deadlines[Key] = Deadlines()
        """When each reply could next be flushed for a stall: the loop asks for the earliest after
        every message, which a scan of every reply in flight made cost 134 µs with 200 of them."""

    def _open(self, key: Key) -> ReplyState | None:
        return self.replies.open(key, lambda: ReplyState(Chunker(self.policy)))

    @handles(Token)
    def on_token(self, message: Message[Token]) -> None:
        state = self._open((message.session, message.id))
        if state is None:
            return
        state.fed.append(message.body.text)
        self._emit(message.session, message.id, state.chunker.feed(message.body.text, time.monotonic()))
        self._schedule((message.session, message.id), state)

    @handles(Cancel)
    def on_cancel(self, message: Message[Cancel]) -> None:
        """Drop the reply (or every reply of the session), end its display text, ignore its rest."""
        for (session, id), state in self.replies.cancel(message.session, message.id):
            self.flushes.clear((session, id))
            self.held.pop((session, id), None)
            if state is not None:
                self.bus.publish(session, id, Text(delta="", final=True))

    def bus_lost(self) -> None:
        for key in list(self.replies):
            self.replies.end(key)
            self.flushes.clear(key)
        self.held.clear()

    @handles(LlmDone)
    def on_llm_done(self, done: Message[LlmDone]) -> None:
        """Flush the reply; text llm.done has that the tokens lacked is fed first, so none is lost."""
        key = (done.session, done.id)
        state = self._open(key)
        if state is None:
            return
        now = time.monotonic()
        fed, text = "".join(state.fed), done.body.text
        if len(text) > len(fed) and text.startswith(fed):
            self.bus.counters["recovered"] += 1
            self._emit(done.session, done.id, state.chunker.feed(text[len(fed):], now))
        elif text != fed:
            self.bus.report(ErrorCode.TEXT_MISMATCH, "tokens received differ from llm.done text; "
                            "speaking what arrived", done.session, done.id, LlmDone.kind)
        self._emit(done.session, done.id, state.chunker.finish(now), final=True)
        self.replies.end(key)
        self.flushes.clear(key)

    def next_tick(self) -> float | None:
        return self.flushes.next()

    def tick(self, now: float) -> None:
        for key in self.flushes.due(now):
            state = self.replies.get(key)
            if state is not None:  # None: pushed out of the replies remembered, its stream abandoned
                self._emit(*key, state.chunker.tick(now))
                self._schedule(key, state)

    def _schedule(self, key: Key, state: ReplyState) -> None:
        at = state.chunker.next_flush_at
        if at is None:
            self.flushes.clear(key)
        else:
            self.flushes.set(key, at)

    def _emit(self, session: str, id: str, output: ChunkerOutput, final: bool = False) -> None:
        """Hold a step's output for the next catch-up. Text held before a new chunk goes out first,
        so a front-end never gets a chunk ahead of the text it speaks."""
        if not (output.display or output.display_marks or output.chunks or final):
            return
        key = (session, id)
        held = self.held.setdefault(key, Held())
        if (held.length + len(output.display) > HELD_TEXT or len(held.marks) + len(output.display_marks) > HELD_MARKS
                or (output.chunks and held.chunks and (held.length or held.marks))):
            self._publish(key, self.held.pop(key))
            held = self.held[key] = Held()
        held.marks += [TextMark(tag=mark.tag, body=mark.body, offset=mark.offset + held.length)
                       for mark in output.display_marks]
        held.display.append(output.display)
        held.length += len(output.display)
        held.chunks += output.chunks
        held.final = final

    def caught_up(self) -> None:
        held, self.held = self.held, {}
        for key, output in held.items():
            self._publish(key, output)

    def _publish(self, key: Key, held: Held) -> None:
        if held.length or held.marks or held.final:
            self.bus.publish(*key, Text(delta="".join(held.display), final=held.final, marks=tuple(held.marks)))
        for chunk in held.chunks:
            self.bus.publish(*key, chunk)
