"""The history stage shell: the conversation's memory, what the character does, what was heard.

It stores each request and reply, parses the reply's command tags at llm.done
(the authoritative parse) and publishes `command` events placed with the
chunker's marks, applies memory and attitude commands, records what the user
actually heard from playback events, and answers the llm stage's context
queries.  On start it asks llm to replay the replies it missed while down.
"""

from __future__ import annotations

import collections
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..chunker.core import ChunkerPolicy
from ...protocol import Message
from ...runtime import Stage
from .commands import Allowlist, Command, load_allowlist, memory_ids, parse_reply
from .store import ATTITUDE_VARIABLES, HistoryStore

_FINISHED_MEMORY = 4096
METRICS_WAIT_S = 30.0
"""A reply with no final playback event this long after llm.done gets its metrics anyway."""


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
    marks: list[dict[str, Any]] = field(default_factory=list)
    shown: list[str] = field(default_factory=list)
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
    done: Message | None = None
    metrics_due: float = 0.0


class HistoryStage(Stage):
    name = "history"
    kinds = ("request", "llm.done", "context.query", "chunk", "text", "playback", "cancel", "replay", "replay.done")

    def prepare(self) -> None:
        history = self.config["history"]
        self.store = HistoryStore(default_db_path(history["db_path"]))
        self.persona = history["persona"]
        chunker = ChunkerPolicy.from_mapping(self.config["chunker"])  # history's tags are the chunker's
        self.allowlist: Allowlist = load_allowlist(history["commands_file"], history["max_commands_per_reply"],
                                                   chunker.tags, chunker.tag_lookahead)
        self.tracks: collections.OrderedDict[tuple[str, str], ReplyTrack] = collections.OrderedDict()

    def started(self) -> None:
        """Ask llm for every reply finished after the newest one stored (a restart's gap)."""
        self.replay_since = self.store.last_ts()
        self.bus.publish("replay.query", "", f"history-{os.getpid()}", since=self.replay_since)

    def _track(self, session: str, id: str) -> ReplyTrack:
        key = (session, id)
        if key not in self.tracks:
            self.tracks[key] = ReplyTrack()
            while len(self.tracks) > _FINISHED_MEMORY:
                self.tracks.popitem(last=False)
        return self.tracks[key]

    def handle(self, message: Message) -> None:
        handler = getattr(self, "_on_" + message.kind.replace(".", "_"))
        handler(message)

    # --- turns ----------------------------------------------------------------------------

    def _on_request(self, message: Message) -> None:
        self._track(message.session, message.id).request_ts = message.ts
        row = self.store.add_message(message.session, message.id, "user", message["text"], message.ts)
        self.bus.publish("history.saved", message.session, message.id, role="user", message_id=row)

    def _on_llm_done(self, message: Message) -> None:
        track = self._track(message.session, message.id)
        track.done = message
        track.metrics_due = time.monotonic() + METRICS_WAIT_S
        self._store_reply(message, message.ts)
        if message["status"] == "interrupted" and track.spoken is None:
            # if the player had none of it, no final playback will come: store what was heard so far (mostly
            # nothing); a final playback that comes later replaces it
            self.store.set_spoken(message.session, message.id, _heard_text(track), True)

    def _store_reply(self, done: Message, ts: float) -> None:
        track = self._track(done.session, done.id)
        track.message_id = self.store.add_message(
            done.session, done.id, "assistant", done["text"], ts, status=done["status"], error=done["error"],
            provider=done["provider"], model=done["model"], metrics=done["metrics"], reasoning=done["reasoning"],
            interrupted=done["status"] == "interrupted")
        if track.spoken is not None:  # playback ended first, as it does when a cancel cuts the reply short
            self.store.set_spoken(done.session, done.id, track.spoken, track.cut)
        track.commands = parse = self._parse(done["text"])
        self._apply_effects(parse, ts)
        self.bus.publish("history.saved", done.session, done.id, role="assistant", message_id=track.message_id)
        track.commands_due = time.monotonic() + self.config["history"]["marks_wait_ms"] / 1000
        if track.final_chunk or not parse:
            self._publish_commands(done.session, done.id, track)

    def _parse(self, text: str) -> list[Command]:
        return parse_reply(text, self.allowlist)

    # --- what the chunker and player report -----------------------------------------------

    def _on_chunk(self, message: Message) -> None:
        track = self._track(message.session, message.id)
        track.first_chunk_ts = track.first_chunk_ts or message.ts
        track.chunks[message["index"]] = message["text"]
        track.marks.extend(message["marks"])
        if message["final"]:
            track.final_chunk = True
            if track.commands is not None:
                self._publish_commands(message.session, message.id, track)

    def _on_text(self, message: Message) -> None:
        track = self._track(message.session, message.id)
        track.shown.append(message["delta"])
        if message["final"]:
            self.store.set_shown(message.session, message.id, "".join(track.shown))

    def _on_playback(self, message: Message) -> None:
        track = self._track(message.session, message.id)
        if message["event"] == "started":
            track.first_playback_ts = track.first_playback_ts or message.ts
            track.first_audio_ts = track.first_audio_ts or message["audio_ts"]
        if message["chunk"] >= 0 and message["event"] in ("finished", "stopped"):
            track.heard[message["chunk"]] = message["heard_chars"]
        if message["event"] == "stopped":  # the sound stopped in this chunk: later `finished` ran ahead of it
            track.heard = {index: chars for index, chars in track.heard.items() if index <= message["chunk"]}
        if message["final"]:
            track.spoken, track.cut = _heard_text(track), message["event"] == "stopped"
            self.store.set_spoken(message.session, message.id, track.spoken, track.cut)
            self._publish_metrics(message.session, message.id, track, message.ts, message["audio_s"])

    def _on_cancel(self, message: Message) -> None:
        """A cancel of a finished reply whose final playback has not come (its audio was still being
        synthesised, so the player may never see it): store what was heard so far, mostly nothing.
        A final playback that comes later replaces it; a reply still being written waits for its
        interrupted llm.done instead."""
        for (session, id), track in list(self.tracks.items()):
            if session == message.session and (not message.id or id == message.id) \
                    and track.done is not None and track.spoken is None and any(track.chunks.values()):
                self.store.set_spoken(session, id, _heard_text(track), True)

    # --- commands ---------------------------------------------------------------------------

    def next_tick(self) -> float | None:
        due = [track.commands_due for track in self.tracks.values() if track.commands and track.commands_due]
        due += [track.metrics_due for track in self.tracks.values() if track.metrics_due]
        return min(due) if due else None

    def tick(self, now: float) -> None:
        for (session, id), track in list(self.tracks.items()):
            if track.commands and track.commands_due and track.commands_due <= now:
                self._publish_commands(session, id, track)
            if track.metrics_due and track.metrics_due <= now and track.done is not None:
                self._publish_metrics(session, id, track, track.done.ts, 0.0)

    def _publish_commands(self, session: str, id: str, track: ReplyTrack) -> None:
        """Publish the reply's commands in order, placed where the chunker met each tag."""
        commands, track.commands, track.commands_due = track.commands or [], [], 0.0
        places = _places(commands, track.marks)
        rows = []
        for command, (chunk, offset) in zip(commands, places, strict=True):
            row = {"name": command.name, "args": list(command.args), "accepted": command.accepted,
                   "reason": command.reason, "chunk": chunk, "offset": offset}
            rows.append(row)
            self.bus.publish("command", session, id, **row)
            if not command.accepted:
                self.bus.counters["refused_commands"] += 1
                self.log.warning("%s/%s: refused <%s>: %s", session, id, command.name, command.reason)
        if rows and track.message_id:
            self.store.add_commands(track.message_id, rows)

    def _publish_metrics(self, session: str, id: str, track: ReplyTrack, end_ts: float, audio_s: float) -> None:
        """One reply's timeline, from the request to the end of playback, published and stored."""
        done, track.metrics_due = track.done, 0.0
        if done is None or not track.request_ts:
            return

        def since(ts: float) -> float:
            return (ts - track.request_ts) * 1000 if ts else -1.0

        metrics = {"request_ts": track.request_ts, "profile": done["profile"], "provider": done["provider"],
                   "model": done["model"],
                   "engine": self.config["tts"]["engine"], "status": done["status"],
                   "first_token_ms": done["metrics"].get("ttft_ms", -1.0),
                   "first_chunk_ms": since(track.first_chunk_ts), "first_audio_ms": since(track.first_audio_ts),
                   "first_playback_ms": since(track.first_playback_ts), "end_ms": since(end_ts),
                   "tokens": done["tokens"], "chars": len(done["text"]), "audio_s": audio_s}
        self.bus.publish("metrics", session, id, **metrics)
        self.store.add_metrics(session, id, metrics)

    def _apply_effects(self, commands: list[Command], ts: float) -> None:
        """Memory and attitude commands change the persona's state (accepted ones only)."""
        deltas: dict[str, float] = collections.defaultdict(float)
        for command in (c for c in commands if c.accepted):
            if command.name == "+memory":
                self.store.add_memory(self.persona, command.args[0].lower(), command.args[1], ts)
            elif command.name == "#memory":
                self.store.edit_memory(self.persona, int(command.args[0]), command.args[1].lower(),
                                       command.args[2], ts)
            elif command.name == "-memory":
                self.store.delete_memories(self.persona, memory_ids(command.args[0]))
            elif command.name == "p":
                for name, delta in zip(ATTITUDE_VARIABLES, command.args, strict=True):
                    deltas[name] += int(delta)
        if deltas:
            self.store.add_variable_deltas(self.persona, deltas)

    # --- context and catch-up ----------------------------------------------------------------

    def _on_context_query(self, message: Message) -> None:
        turns = self.store.context(message.session, message["limit"], exclude_request=message.id)
        self.bus.publish("context", message.session, message.id, messages=turns,
                         memory=self.store.memory_block(self.persona), variables=self.store.variables(self.persona))

    def _on_replay(self, message: Message) -> None:
        """A reply llm finished while we were down: store both turns (idempotent) and its commands."""
        if self.store.has_reply(message.session, message.id):
            return
        self.store.add_message(message.session, message.id, "user", message["request_text"], message["request_ts"])
        self._store_reply(message, message["done_ts"])
        self.bus.counters["replayed"] += 1

    def _on_replay_done(self, message: Message) -> None:
        if not message.id.startswith(f"history-{os.getpid()}"):
            return
        if not message["complete"]:
            self.bus.report("history_gap", f"replies finished before {message['oldest']:.3f} and after "
                            f"{message['since']:.3f} may be missing: llm's journal no longer holds them")
        self.log.info("caught up: %d replies replayed since %.3f", message["count"], message["since"])

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


def _places(commands: list[Command], marks: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """(chunk, offset) of each command: the first unused chunker mark with the same tag and body."""
    unused = list(marks)
    places = []
    for command in commands:
        match = next((mark for mark in unused if mark["tag"].lower() == command.name
                      and mark["body"].strip() == command.body.strip()), None)
        if match is None:
            places.append((-1, -1))
        else:
            unused.remove(match)
            places.append((match["chunk"], match["offset"]))
    return places
