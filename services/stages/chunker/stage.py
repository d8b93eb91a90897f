"""The chunker stage shell: tokens in; display text deltas and speakable chunks out."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ...protocol import Cancel, ErrorCode, LlmDone, Message, Text, Token
from ...runtime import Stage, handles
from ...runtime.replies import Key, Replies
from .core import Chunker, ChunkerOutput, ChunkerPolicy


@dataclass
class ReplyState:
    """One reply's splitter and the text it has been fed, to reconcile with llm.done."""

    chunker: Chunker
    fed: list[str] = field(default_factory=list)


class ChunkerStage(Stage):
    name = "chunker"
    sharded = True

    def prepare(self) -> None:
        self.policy = ChunkerPolicy.from_mapping(self.config["chunker"])
        self.replies: Replies[ReplyState] = Replies()
        """Replies being split; the ended ones (finished or cancelled) are remembered, so their late
        tokens and llm.done are not spoken."""

    def _open(self, key: Key) -> ReplyState | None:
        return self.replies.open(key, lambda: ReplyState(Chunker(self.policy)))

    @handles(Token)
    def on_token(self, message: Message[Token]) -> None:
        state = self._open((message.session, message.id))
        if state is None:
            return
        state.fed.append(message.body.text)
        self._emit(message.session, message.id, state.chunker.feed(message.body.text, time.monotonic()))

    @handles(Cancel)
    def on_cancel(self, message: Message[Cancel]) -> None:
        """Drop the reply (or every reply of the session), end its display text, ignore its rest."""
        for (session, id), state in self.replies.cancel(message.session, message.id):
            if state is not None:
                self.bus.publish(session, id, Text(delta="", final=True))

    def bus_lost(self) -> None:
        for key in list(self.replies):
            self.replies.end(key)

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

    def next_tick(self) -> float | None:
        due = [state.chunker.next_flush_at for state in self.replies.values()
               if state.chunker.next_flush_at is not None]
        return min(due) if due else None

    def tick(self, now: float) -> None:
        for (session, id), state in self.replies.items():
            due = state.chunker.next_flush_at
            if due is not None and due <= now:
                self._emit(session, id, state.chunker.tick(now))

    def _emit(self, session: str, id: str, output: ChunkerOutput, final: bool = False) -> None:
        if output.display or output.display_marks or final:
            self.bus.publish(session, id, Text(delta=output.display, final=final, marks=output.display_marks))
        for chunk in output.chunks:
            self.bus.publish(session, id, chunk)
