"""The player stage shell: audio frames in, sound out, playback events back on the bus.

One reply plays at a time (there is one speaker); replies wait in the order
their first frame arrived.  A worker thread drives the backend so the main loop
can take a cancel at any moment and silence the backend at once.  Each reply is
converted to the format the backend plays its first audio in, so a backend that
cannot play the engine's rate, or an engine that changes format mid-reply (a
fallback), still plays.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field

from ..audio import AudioFormat, PcmFrame
from ..protocol import Message
from ..runtime import Stage
from .backends import PlayerBackend, create_backend
from .convert import Converter

STALL_S = 15.0
"""A reply whose next frame is this late is ended as stopped, so playback never wedges."""
SPEECH_MS_PER_CHAR = 60.0
"""Speech time per character of text (espeak-ng's default rate and most voices: 55-70 ms), to place
a cut in a chunk whose audio had not all come, until the reply's own whole chunks give its rate."""
_ENDED_MEMORY = 4096


@dataclass
class ReplyAudio:
    """The frames of one reply that are waiting to be played."""

    session: str
    id: str
    frames: collections.deque[Message] = field(default_factory=collections.deque)


def _format(message: Message) -> AudioFormat:
    return AudioFormat(message["rate"], message["channels"], message["width"])


@dataclass
class ChunkSpan:
    """Where a chunk's audio lies in the reply, in ms of audio written since begin(); `end_ms` is
    None until its last frame is written."""

    chunk: int
    chars: int
    start_ms: float
    end_ms: float | None = None


class ReplyFeed:
    """One reply on its way to the backend: converts its frames to the format the backend chose
    for the first audio, and remembers where each chunk lies in the written audio, so that the
    backend's played_ms() tells, at a cut, which chunk was sounding and how much of it was heard."""

    def __init__(self, backend: PlayerBackend, session: str, reply_id: str) -> None:
        self.backend, self.session, self.reply_id = backend, session, reply_id
        self.converter: Converter | None = None
        self.written_ms = 0.0
        self.spans: list[ChunkSpan] = []

    @property
    def begun(self) -> bool:
        return self.converter is not None

    def start_chunk(self, chunk: int, chars: int) -> None:
        self.spans.append(ChunkSpan(chunk, chars, self.written_ms))

    def end_chunk(self) -> None:
        """The current chunk's last frame is written."""
        self.spans[-1].end_ms = self.written_ms

    def begin(self, fmt: AudioFormat) -> None:
        output = self.backend.output_format(fmt)
        self.backend.begin(self.session, self.reply_id, output)
        self.converter = Converter(fmt, output)

    def write(self, fmt: AudioFormat, pcm: bytes) -> None:
        """After begin(); a frame in another format than the last one starts a new conversion."""
        if fmt != self.converter.source:
            self._write(self.converter.flush())
            self.converter = Converter(fmt, self.converter.target)
        self._write(self.converter.convert(pcm))
        self.written_ms += fmt.duration_ms(len(pcm))

    def cut(self, queued_ms: float, queued_last: bool) -> tuple[ChunkSpan | None, float]:
        """The chunk that was sounding when the reply stopped (the first one if none of the audio
        played; None if no chunk started) and the fraction of it heard. The current chunk's frames
        that came but were not written (`queued_ms`, `queued_last`: its last frame among them) count
        toward its length; if its last frame never came, the length is at least its text spoken at
        the reply's rate, so a chunk cut while it was still being synthesised is not taken as whole."""
        played = self.backend.played_ms() if self.begun else 0.0
        sounding = next((span for span in reversed(self.spans) if span.start_ms < played), None)
        if sounding is None:
            return (self.spans[0] if self.spans else None), 0.0
        end = sounding.end_ms
        if end is None:
            end = self.written_ms + queued_ms
            if not queued_last:
                end = max(end, sounding.start_ms + sounding.chars * self._ms_per_char())
        if end <= sounding.start_ms:  # a chunk without audio, played past
            return sounding, 1.0
        return sounding, min(1.0, (played - sounding.start_ms) / (end - sounding.start_ms))

    def _ms_per_char(self) -> float:
        """The reply's speech rate over its whole chunks, else SPEECH_MS_PER_CHAR."""
        whole = [span for span in self.spans if span.end_ms is not None]
        chars = sum(span.chars for span in whole)
        audio_ms = sum(span.end_ms - span.start_ms for span in whole)
        return audio_ms / chars if chars and audio_ms else SPEECH_MS_PER_CHAR

    def end(self) -> str | None:
        if not self.begun:
            return None
        self._write(self.converter.flush())
        return self.backend.end()

    def played_s(self) -> float:
        """Seconds of the reply that played, for the final event."""
        return self.backend.played_ms() / 1000 if self.begun else 0.0

    def _write(self, pcm: bytes) -> None:
        if pcm:
            self.backend.write(PcmFrame(pcm, self.converter.target))


class PlayerStage(Stage):
    name = "player"
    kinds = ("audio", "cancel")

    def prepare(self) -> None:
        player = self.config["player"]
        self.backend = create_backend(player["backend"], player)
        self.log.info("audio backend: %s", self.backend.name)
        self.replies: collections.OrderedDict[tuple[str, str], ReplyAudio] = collections.OrderedDict()
        self.ended: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()
        """Replies that were cancelled or have finished: their late frames are dropped."""
        self.wake = threading.Condition()
        self.playing: tuple[str, str] | None = None
        self.stopping = False

    def started(self) -> None:
        self.worker = threading.Thread(target=self._work, name="player", daemon=True)
        self.worker.start()

    def handle(self, message: Message) -> None:
        with self.wake:
            if message.kind == "audio":
                key = (message.session, message.id)
                if len(message["pcm"]) % (message["channels"] * message["width"]):
                    self.bus.counters["invalid"] += 1
                    self.bus.report("invalid_message", "audio pcm is not a whole number of samples",
                                    message.session, message.id, "audio")
                elif key not in self.ended:
                    self.replies.setdefault(key, ReplyAudio(*key)).frames.append(message)
            else:
                self._cancel(message.session, message.id)
            self.wake.notify_all()

    def _cancel(self, session: str, id: str) -> None:
        """Silence the playing reply, drop queued ones (each still gets its final event)."""
        keys = [key for key in [*self.replies, self.playing] if key and key[0] == session
                and (not id or key[1] == id)]
        if id and (session, id) not in keys:
            keys.append((session, id))
        for key in keys:
            self._remember_ended(key)
            queued = self.replies.pop(key, None)
            if queued is not None and key != self.playing:
                self._event(queued, "stopped", -1)
        if self.playing in keys:
            self.backend.stop()

    def _remember_ended(self, key: tuple[str, str]) -> None:
        self.ended[key] = None
        while len(self.ended) > _ENDED_MEMORY:
            self.ended.popitem(last=False)

    def _work(self) -> None:
        while True:
            with self.wake:
                while not self.replies and not self.stopping:
                    self.wake.wait()
                if self.stopping:
                    return
                key, reply = next(iter(self.replies.items()))
                self.playing = key
            feed = ReplyFeed(self.backend, *key)
            try:
                self._play(reply, feed)
            except Exception as exc:  # a backend failure ends this reply, not the player
                self.log.exception("playback failed")
                self.bus.report("playback_failed", f"{type(exc).__name__}: {exc}", reply.session, reply.id)
                self._stopped(reply, feed, None)
            finally:
                with self.wake:
                    self.replies.pop(key, None)
                    self._remember_ended(key)
                    self.playing = None

    def _next_frame(self, reply: ReplyAudio) -> Message | None:
        """Wait for the reply's next frame; None when it was cancelled, stalled or we stop."""
        key = (reply.session, reply.id)
        deadline = time.monotonic() + STALL_S
        with self.wake:
            while not reply.frames:
                if key in self.ended or self.stopping or time.monotonic() >= deadline:
                    return None
                self.wake.wait(min(0.5, max(0.0, deadline - time.monotonic())))
            if key in self.ended:
                return None
            return reply.frames.popleft()

    def _play(self, reply: ReplyAudio, feed: ReplyFeed) -> None:
        key = (reply.session, reply.id)
        while True:
            message = self._next_frame(reply)
            if message is None:
                self._stopped(reply, feed, feed.end())
                return
            if not feed.spans or feed.spans[-1].chunk != message["chunk"]:  # its frame 0, unless that was lost
                feed.start_chunk(message["chunk"], message["chars"])
                self._event(reply, "started", message["chunk"], audio_ts=message.ts)
            if message["pcm"]:
                if not feed.begun:
                    feed.begin(_format(message))
                    if self._cut(key):  # cancelled before begin(), which clears a stop
                        self.backend.stop()
                feed.write(_format(message), message["pcm"])
            if message["last"]:
                feed.end_chunk()
            final = message["last"] and message["final"]
            path = feed.end() if final else None
            if self._cut(key):  # cancelled while this frame, or the reply's end, was playing
                self._stopped(reply, feed, path if final else feed.end())
                return
            if message["last"]:
                self._event(reply, "finished", message["chunk"], path, final=final, heard=1.0, chars=message["chars"],
                            audio_s=feed.played_s() if final else 0.0)
            if final:
                return

    def _cut(self, key: tuple[str, str]) -> bool:
        """Whether the reply being played was cancelled (it is marked ended only then), or the
        player is stopping."""
        with self.wake:
            return key in self.ended or self.stopping

    def _stopped(self, reply: ReplyAudio, feed: ReplyFeed, path: str | None) -> None:
        """The final event of a cut reply, about the chunk that was sounding: `finished` events run
        ahead of the sound by what the backend holds, so the cut may lie in an earlier chunk than
        the last one started. After the backend's end(), which after a stall plays out what came,
        so that counts as heard."""
        span, heard = feed.cut(*self._queued(reply, feed))
        self._event(reply, "stopped", span.chunk if span else -1, path, heard=heard, chars=span.chars if span else 0,
                    audio_s=feed.played_s())

    def _queued(self, reply: ReplyAudio, feed: ReplyFeed) -> tuple[float, bool]:
        """Play time of the current chunk's frames that came but were not written, and whether its
        last frame is among them."""
        chunk = feed.spans[-1].chunk if feed.spans else -1
        with self.wake:
            frames = [frame for frame in reply.frames if frame["chunk"] == chunk]
        return sum(_format(frame).duration_ms(len(frame["pcm"])) for frame in frames), any(f["last"] for f in frames)

    def _event(self, reply: ReplyAudio, event: str, chunk: int, path: str | None = None, final: bool = False,
               heard: float = 0.0, chars: int = 0, audio_ts: float = 0.0, audio_s: float = 0.0) -> None:
        self.bus.publish("playback", reply.session, reply.id, event=event, chunk=chunk, path=path or "",
                         final=final or event == "stopped", heard=heard, heard_chars=round(heard * chars),
                         audio_ts=audio_ts, audio_s=audio_s)
        if final or event == "stopped":
            self.log.info("%s/%s: playback %s at chunk %d, %.1f s of audio%s", reply.session, reply.id, event,
                          chunk, audio_s, f", {path}" if path else "")

    def shutdown(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify_all()
        self.backend.stop()
        self.worker.join(5)
        self.backend.close()
