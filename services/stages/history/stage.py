"""The history stage shell: the conversation's memory, what the character does, what was heard.

It stores each request and reply, parses the reply's command tags at llm.done
(the authoritative parse) and publishes `command` events placed with the
chunker's marks, applies memory and attitude commands, records what the user
actually heard from playback events, and answers the llm stage's context
queries.  On start it asks llm to replay the replies it missed while down.

It takes nothing per token: the text shown is the reply's display text, which the same tag
grammar as the chunker's gives from llm.done's text (so `text`, one message per token, never
wakes it), and its timers wait in a heap (runtime.deadlines), so a loop costs the same with
thousands of replies remembered as with one (issue 15).
"""

from __future__ import annotations

import collections
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ...protocol import (
    Cancel,
    Chunk,
    Context,
    ContextQuery,
    ErrorCode,
    HistorySaved,
    LlmDone,
    Mark,
    Message,
    Metrics,
    Playback,
    Replay,
    ReplayDone,
    ReplayQuery,
    Request,
)
from ...protocol import Command as CommandEvent  # the `command` kind; `Command` is a parsed tag (.commands)
from ...runtime import Stage, handles
from ...runtime.deadlines import Deadlines
from ...runtime.replies import Key, Recent, cancels
from ..chunker.core import ChunkerPolicy
from .commands import Allowlist, Command, load_allowlist, memory_ids, read_reply, refused
from .store import ATTITUDE_VARIABLES, CONTEXT_BYTES, HistoryStore, MemoryRefused

METRICS_WAIT_S = 30.0
"""A reply with no final playback event this long after its llm.done, or after its last playback
event, gets its metrics anyway, ended at llm.done: the final event should have come (tts or the
player may have died)."""
UNPLAYED_WAIT_S = 1.0
"""How long after a cancel a reply none of which has started playing waits for its final playback
event. The player answers a cancel at once: with a final `stopped` for a cancelled reply whose audio
it holds (queued, or just started: its `started` may still be on its way), with nothing for one whose
audio never reached it. Past this, none will come."""


def default_db_path(configured: str = "") -> Path:
    """history.db_path, else $XDG_DATA_HOME/voxpipe/history.db."""
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "voxpipe" / "history.db"


@dataclass
class ReplyTrack:
    """What history learns about one reply from the chunker and the player, as it happens."""

    chunks: dict[int, str] = field(default_factory=dict)
    marks: list[Mark] = field(default_factory=list)
    heard: dict[int, int] = field(default_factory=dict)
    spoken: str | None = None
    """What was heard, once the final playback event came; kept for a reply stored after it."""
    cut: bool = False
    final_chunk: bool = False
    commands: list[Command] | None = None
    message_id: int = 0
    commands_due: float = 0.0
    request_ts: float = 0.0
    first_chunk_ts: float = 0.0
    first_audio_ts: float = 0.0
    first_playback_ts: float = 0.0
    done: Message[LlmDone] | None = None
    final_ts: float = 0.0
    """The ts of the final playback event, once it came."""
    audio_s: float = 0.0
    metrics_due: float = 0.0
    """When the metrics go out if the final playback event has not come (0: not yet known)."""
    metrics_sent: bool = False
    persona: str = ""
    """The request's persona, whose memories and variables the reply's commands change ("" for
    history.persona); kept with the reply's other state, so it is bounded the same way."""


class HistoryStage(Stage):
    name = "history"

    def prepare(self) -> None:
        history = self.config["history"]
        self.store = HistoryStore(default_db_path(history["db_path"]))
        self.persona = history["persona"]
        """The persona of a request that names none ("" is `history.persona`)."""
        chunker = ChunkerPolicy.from_mapping(self.config["chunker"])  # history's tags are the chunker's
        self.allowlist: Allowlist = load_allowlist(history["commands_file"], history["max_commands_per_reply"],
                                                   chunker.tags, chunker.tag_lookahead)
        # every reply seen lately, in flight or finished (a final playback can come long after its
        # llm.done); the oldest are forgotten past the runtime's bound
        self.tracks: Recent[Key, ReplyTrack] = Recent()
        self.commands_due: Deadlines[Key] = Deadlines()
        """Each track's commands_due while it has commands waiting for their marks."""
        self.metrics_due: Deadlines[Key] = Deadlines()
        """Each track's metrics_due while it is set."""

    def started(self) -> None:
        """Ask llm for every reply finished after the newest one stored (a restart's gap)."""
        self.replay_since = self.store.last_ts()
        self.bus.publish("", f"history-{os.getpid()}", ReplayQuery(since=self.replay_since))

    def bus_back(self) -> None:
        """Replies that ended while the bus was down (llm ends its jobs when it loses the bus) never
        reached us: ask llm's journal for them, as after our own restart."""
        self.started()

    def _track(self, session: str, id: str) -> ReplyTrack:
        key = (session, id)
        track = self.tracks.get(key)
        if track is None:
            track = self.tracks[key] = ReplyTrack()
        return track

    # --- turns ----------------------------------------------------------------------------

    @handles(Request)
    def on_request(self, message: Message[Request]) -> None:
        track = self._track(message.session, message.id)
        track.request_ts, track.persona = message.ts, message.body.persona
        row = self.store.add_message(message.session, message.id, "user", message.body.text, message.ts)
        self.bus.publish(message.session, message.id, HistorySaved(role="user", message_id=row))

    @handles(LlmDone)
    def on_llm_done(self, message: Message[LlmDone]) -> None:
        track = self._track(message.session, message.id)
        track.done = message
        self._store_reply(message, message.ts, track.persona)
        if message.body.status == "interrupted" and track.spoken is None:
            # if the player had none of it, no final playback will come: store what was heard so far (mostly
            # nothing); a final playback that comes later replaces it
            self.store.set_spoken(message.session, message.id, _heard_text(track), True)
        # a reply that failed is still spoken (what was written of it, or an empty final chunk), so every
        # llm.done waits for its final playback, unless a cancel has said none will come (on_cancel)
        self._wait_for_playback((message.session, message.id), track, METRICS_WAIT_S)
        self._finish(message.session, message.id, track)

    def _store_reply(self, message: Message[LlmDone], ts: float, persona: str) -> None:
        """Store a finished reply (an llm.done, or a replay of one), apply its commands to its request's
        `persona`, announce it."""
        done = message.body
        track = self._track(message.session, message.id)
        shown, commands = read_reply(done.text, self.allowlist)
        track.message_id = self.store.add_message(
            message.session, message.id, "assistant", done.text, ts, status=done.status, error=done.error,
            provider=done.provider, model=done.model, metrics=done.metrics, reasoning=done.reasoning,
            interrupted=done.status == "interrupted", shown=shown)
        if track.spoken is not None:  # playback ended first, as it does when a cancel cuts the reply short
            self.store.set_spoken(message.session, message.id, track.spoken, track.cut)
        track.commands = parse = self._apply_effects(commands, ts, persona or self.persona)
        self.bus.publish(message.session, message.id, HistorySaved(role="assistant", message_id=track.message_id))
        track.commands_due = time.monotonic() + self.config["history"]["marks_wait_ms"] / 1000
        self.commands_due.set((message.session, message.id), track.commands_due)
        if track.final_chunk or not parse:
            self._publish_commands(message.session, message.id, track)

    # --- what the chunker and player report -----------------------------------------------

    @handles(Chunk)
    def on_chunk(self, message: Message[Chunk]) -> None:
        chunk = message.body
        track = self._track(message.session, message.id)
        track.first_chunk_ts = track.first_chunk_ts or message.ts
        track.chunks[chunk.index] = chunk.text
        track.marks.extend(chunk.marks)
        if chunk.final:
            track.final_chunk = True
            if track.commands is not None:
                self._publish_commands(message.session, message.id, track)

    @handles(Playback)
    def on_playback(self, message: Message[Playback]) -> None:
        playback = message.body
        track = self._track(message.session, message.id)
        if playback.event == "started":
            track.first_playback_ts = track.first_playback_ts or message.ts
            track.first_audio_ts = track.first_audio_ts or playback.audio_ts
        if playback.chunk >= 0 and playback.event in ("finished", "stopped"):
            track.heard[playback.chunk] = playback.heard_chars
        if playback.event == "stopped":  # the sound stopped in this chunk: later `finished` ran ahead of it
            track.heard = {index: chars for index, chars in track.heard.items() if index <= playback.chunk}
        if playback.final:
            track.spoken, track.cut = _heard_text(track), playback.event == "stopped"
            self.store.set_spoken(message.session, message.id, track.spoken, track.cut)
            track.final_ts, track.audio_s = message.ts, playback.audio_s
            self._finish(message.session, message.id, track)
        elif track.metrics_due:  # it is playing, so its final event will come: the fallback starts again
            track.metrics_due = time.monotonic() + METRICS_WAIT_S
            self.metrics_due.set((message.session, message.id), track.metrics_due)

    @handles(Cancel)
    def on_cancel(self, message: Message[Cancel]) -> None:
        """A cancel of a finished reply whose final playback has not come (its audio was still being
        synthesised, so the player may never see it): store what was heard so far, mostly nothing.
        A final playback that comes later replaces it; a reply still being written waits for its
        interrupted llm.done instead.

        A cancelled reply none of which started playing gets no final playback unless the player held
        its audio, and then the player's `stopped` comes at once: its metrics wait UNPLAYED_WAIT_S for
        it, then go out (at its llm.done, if that is later)."""
        for (session, id), track in self.tracks.items():
            if not cancels((session, id), message.session, message.id):
                continue
            if track.done is not None and track.spoken is None and any(track.chunks.values()):
                self.store.set_spoken(session, id, _heard_text(track), True)
            if not track.first_playback_ts:
                self._wait_for_playback((session, id), track, UNPLAYED_WAIT_S)

    # --- commands and metrics ---------------------------------------------------------------

    def next_tick(self) -> float | None:
        due = [at for at in (self.commands_due.next(), self.metrics_due.next()) if at is not None]
        return min(due) if due else None

    def tick(self, now: float) -> None:
        for session, id in self.commands_due.due(now):
            track = self.tracks.get((session, id))
            if track is not None and track.commands:
                self._publish_commands(session, id, track)
        for session, id in self.metrics_due.due(now):
            track = self.tracks.get((session, id))
            if track is not None:
                self._finish(session, id, track, now)

    def _publish_commands(self, session: str, id: str, track: ReplyTrack) -> None:
        """Publish the reply's commands in order, placed where the chunker met each tag."""
        commands, track.commands, track.commands_due = track.commands or [], [], 0.0
        self.commands_due.clear((session, id))
        places = _places(commands, track.marks)
        events = []
        for command, (chunk, offset) in zip(commands, places, strict=True):
            event = CommandEvent(name=command.name, args=command.args, accepted=command.accepted,
                                 reason=command.reason, chunk=chunk, offset=offset)
            events.append(event)
            self.bus.publish(session, id, event)
            if not command.accepted:
                self.bus.counters["refused_commands"] += 1
                self.log.warning("%s/%s: refused <%s>: %s", session, id, command.name, command.reason)
        if events and track.message_id:
            self.store.add_commands(track.message_id, events)

    def _wait_for_playback(self, key: Key, track: ReplyTrack, wait_s: float) -> None:
        """Take the final playback event as never coming `wait_s` from now, unless an earlier
        deadline is set or the reply's timeline is settled already."""
        if track.final_ts or track.metrics_sent:
            return
        due = time.monotonic() + wait_s
        track.metrics_due = min(track.metrics_due, due) if track.metrics_due else due
        self.metrics_due.set(key, track.metrics_due)

    def _finish(self, session: str, id: str, track: ReplyTrack, now: float | None = None) -> None:
        """Publish the reply's metrics once its timeline is complete: at the later of its llm.done and
        its final playback event, whichever order they come in, or, when no final playback will come,
        at its llm.done or when that is known. Once per reply."""
        done = track.done
        if done is None or track.metrics_sent:
            return
        if track.final_ts:
            self._publish_metrics(session, id, track, max(track.final_ts, done.ts))
        elif track.metrics_due and track.metrics_due <= (time.monotonic() if now is None else now):
            self._publish_metrics(session, id, track, done.ts)

    def _publish_metrics(self, session: str, id: str, track: ReplyTrack, end_ts: float) -> None:
        """One reply's timeline, from the request to the end of playback, published and stored."""
        done, track.metrics_due, track.metrics_sent = track.done, 0.0, True
        self.metrics_due.clear((session, id))
        if done is None or not track.request_ts:
            return

        def since(ts: float) -> float:
            return (ts - track.request_ts) * 1000 if ts else -1.0

        reply = done.body
        metrics = Metrics(request_ts=track.request_ts, profile=reply.profile, provider=reply.provider,
                          model=reply.model, engine=self.config["tts"]["engine"], status=reply.status,
                          first_token_ms=reply.metrics.get("ttft_ms", -1.0),
                          first_chunk_ms=since(track.first_chunk_ts), first_audio_ms=since(track.first_audio_ts),
                          first_playback_ms=since(track.first_playback_ts), end_ms=since(end_ts),
                          tokens=reply.tokens, chars=len(reply.text), audio_s=track.audio_s)
        self.bus.publish(session, id, metrics)
        self.store.add_metrics(session, id, metrics.to_wire())

    def _apply_effects(self, commands: list[Command], ts: float, persona: str) -> list[Command]:
        """Memory and attitude commands change `persona`'s state (accepted ones only), all of a reply in
        one transaction. Each was checked whole when it was judged, so none fails halfway; one the store
        cannot take (a memory that would be evicted at once, an edit of no memory) changes nothing and
        comes back refused with the reason, and the others still apply."""
        deltas: dict[str, float] = collections.defaultdict(float)
        judged = []
        with self.store.transaction():
            for command in commands:
                try:
                    if command.accepted:
                        self._apply(command, ts, deltas, persona)
                except MemoryRefused as exc:
                    command = refused(command, f"<{command.name}> {exc}")
                judged.append(command)
            if deltas:
                self.store.add_variable_deltas(persona, deltas)
        return judged

    def _apply(self, command: Command, ts: float, deltas: dict[str, float], persona: str) -> None:
        if command.name == "+memory":
            self.store.add_memory(persona, command.args[0], command.args[1], ts)
        elif command.name == "#memory":
            self.store.edit_memory(persona, int(command.args[0]), command.args[1], command.args[2], ts)
        elif command.name == "-memory":
            self.store.delete_memories(persona, memory_ids(command.args[0]))
        elif command.name == "p":
            for name, delta in zip(ATTITUDE_VARIABLES, command.args, strict=True):
                deltas[name] += int(delta)

    # --- context and catch-up ----------------------------------------------------------------

    @handles(ContextQuery)
    def on_context_query(self, message: Message[ContextQuery]) -> None:
        """The context fits the protocol by construction (store.CONTEXT_BYTES): the memories of the query's
        persona first, up to their share, then as many recent turns as the rest holds."""
        persona = message.body.persona or self.persona
        memory = self.store.memory_block(persona)
        turns = self.store.context(message.session, message.body.limit, exclude_request=message.id,
                                   budget=CONTEXT_BYTES - len(memory.encode()))
        self.bus.publish(message.session, message.id, Context(messages=tuple(turns), memory=memory,
                                                              variables=self.store.variables(persona)))

    @handles(Replay)
    def on_replay(self, message: Message[Replay]) -> None:
        """A reply llm finished while we were down: store both turns (idempotent) and its commands."""
        if self.store.has_reply(message.session, message.id):
            return
        replay = message.body
        self.store.add_message(message.session, message.id, "user", replay.request_text, replay.request_ts)
        self._store_reply(message, replay.done_ts, replay.request_persona)
        self.bus.counters["replayed"] += 1

    @handles(ReplayDone)
    def on_replay_done(self, message: Message[ReplayDone]) -> None:
        if not message.id.startswith(f"history-{os.getpid()}"):
            return
        done = message.body
        if not done.complete:
            self.bus.report(ErrorCode.HISTORY_GAP, f"replies finished before {done.oldest:.3f} and after "
                            f"{done.since:.3f} may be missing: llm's journal no longer holds them")
        self.log.info("caught up: %d replies replayed since %.3f", done.count, done.since)

    def shutdown(self) -> None:
        self.store.close()


def _heard_text(track: ReplyTrack) -> str:
    """The text of the chunks heard, in order, each cut to its heard characters rounded to the
    nearest word: heard_chars follows audio time, so a word cut past its middle was heard."""
    parts = []
    for index, text in sorted(track.chunks.items()):
        chars = track.heard.get(index, 0)
        word = next((word for word in re.finditer(r"\S+", text) if word.start() < chars < word.end()), None)
        if word is not None:
            chars = word.end() if 2 * (chars - word.start()) >= word.end() - word.start() else word.start()
        parts.append(text[:chars].strip())
    return " ".join(part for part in parts if part)


def _places(commands: list[Command], marks: list[Mark]) -> list[tuple[int, int]]:
    """(chunk, offset) of each command: the first unused chunker mark with the same tag and body."""
    unused = list(marks)
    places = []
    for command in commands:
        match = next((mark for mark in unused if mark.tag.lower() == command.name
                      and mark.body.strip() == command.body.strip()), None)
        if match is None:
            places.append((-1, -1))
        else:
            unused.remove(match)
            places.append((match.chunk, match.offset))
    return places
