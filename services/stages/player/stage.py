"""The player stage shell: audio frames in, sound out, playback events back on the bus.

One reply plays at a time (there is one speaker); replies wait in the order
their first frame arrived.  A worker thread drives the backend so the main loop
can take a cancel at any moment and silence the backend at once.  Each reply is
converted to the format the backend plays its first audio in, so a backend that
cannot play the engine's rate, or an engine that changes format mid-reply (a
fallback), still plays.

A reply whose request said playback "client" is played by the front-end that asked (a browser):
the player takes requests only to know those, and skips their audio.

The order, the cancels, the stall deadline and where a cut falls (the heard fraction) are the
core's (core.py); this shell drives the backend and publishes.
"""

from __future__ import annotations

import threading
import time

from ...protocol import Audio, Cancel, ErrorCode, Message, Playback, Request
from ...runtime import Stage, handles
from ..audio import AudioFormat, PcmFrame
from .backends import create_backend
from .backends.base import PlayerBackend
from .convert import Converter
from .core import STALL_S, Playlist, ReplyAudio, Timeline, Wait, audio_format, playback


class ReplyFeed:
    """One reply on its way to the backend: converts its frames to the format the backend chose
    for the first audio, and keeps the timeline of what it wrote."""

    def __init__(self, backend: PlayerBackend, session: str, reply_id: str) -> None:
        self.backend, self.session, self.reply_id = backend, session, reply_id
        self.converter: Converter | None = None
        self.timeline = Timeline()

    @property
    def begun(self) -> bool:
        return self.converter is not None

    def begin(self, fmt: AudioFormat) -> None:
        output = self.backend.output_format(fmt)
        self.backend.begin(self.session, self.reply_id, output)
        self.converter = Converter(fmt, output)

    def write(self, fmt: AudioFormat, pcm: bytes) -> None:
        """After begin(); a frame in another format than the last one starts a new conversion."""
        converter = self.converter
        assert converter is not None, "begin() first"
        if fmt != converter.source:
            self._write(converter.flush(), converter.target)
            converter = self.converter = Converter(fmt, converter.target)
        self._write(converter.convert(pcm), converter.target)
        self.timeline.wrote(fmt.duration_ms(len(pcm)))

    def end(self) -> str | None:
        if self.converter is None:
            return None
        self._write(self.converter.flush(), self.converter.target)
        return self.backend.end()

    def played_ms(self) -> float:
        return self.backend.played_ms() if self.begun else 0.0

    def played_s(self) -> float:
        """Seconds of the reply that played, for the final event."""
        return self.played_ms() / 1000

    def _write(self, pcm: bytes, fmt: AudioFormat) -> None:
        if pcm:
            self.backend.write(PcmFrame(pcm, fmt))


class PlayerStage(Stage):
    name = "player"

    def prepare(self) -> None:
        player = self.config["player"]
        self.backend = create_backend(player["backend"], player)
        self.log.info("audio backend: %s", self.backend.name)
        self.playlist = Playlist()
        self.wake = threading.Condition()

    def started(self) -> None:
        self.worker = threading.Thread(target=self._work, name="player", daemon=True)
        self.worker.start()

    @handles(Request)
    def on_request(self, message: Message[Request]) -> None:
        with self.wake:
            self.playlist.request(message)

    @handles(Audio)
    def on_audio(self, message: Message[Audio]) -> None:
        with self.wake:
            if not self.playlist.audio(message):
                self.bus.counters["invalid"] += 1
                self.bus.report(ErrorCode.INVALID_MESSAGE, "audio pcm is not a whole number of samples",
                                message.session, message.id, "audio")
            self.wake.notify_all()

    @handles(Cancel)
    def on_cancel(self, message: Message[Cancel]) -> None:
        with self.wake:
            dropped, playing = self.playlist.cancel(message.session, message.id)
            for reply in dropped:
                self._publish(reply, playback("stopped", -1))
            if playing:
                self.backend.stop()
            self.wake.notify_all()

    def bus_lost(self) -> None:
        """Silence at once: whoever asked has been told the reply is lost."""
        with self.wake:
            keys = [*self.playlist.replies, *([self.playlist.playing] if self.playlist.playing else [])]
            silence = False
            for session in {key[0] for key in keys}:
                silence = self.playlist.cancel(session, "")[1] or silence
            if silence:
                self.backend.stop()
            self.wake.notify_all()

    def _work(self) -> None:
        while True:
            with self.wake:
                while not self.playlist.replies and not self.playlist.stopping:
                    self.wake.wait()
                if self.playlist.stopping:
                    return
                reply = self.playlist.take()
            feed = ReplyFeed(self.backend, reply.session, reply.id)
            try:
                self._play(reply, feed)
            except Exception as exc:  # a backend failure ends this reply, not the player
                self.log.exception("playback failed")
                self.bus.report(ErrorCode.PLAYBACK_FAILED, f"{type(exc).__name__}: {exc}", reply.session, reply.id)
                self._stopped(reply, feed, None)
            finally:
                with self.wake:
                    self.playlist.done(reply)

    def _next_frame(self, reply: ReplyAudio) -> Message[Audio] | None:
        """Wait for the reply's next frame; None when it was cancelled, stalled or we stop."""
        stall_at = time.monotonic() + STALL_S
        with self.wake:
            while isinstance(step := self.playlist.next_frame(reply, time.monotonic(), stall_at), Wait):
                self.wake.wait(min(0.5, max(0.0, step.until - time.monotonic())))
            return step

    def _play(self, reply: ReplyAudio, feed: ReplyFeed) -> None:
        while True:
            message = self._next_frame(reply)
            if message is None:
                self._stopped(reply, feed, feed.end())
                return
            audio = message.body
            if feed.timeline.frame(audio):
                self._publish(reply, playback("started", audio.chunk, audio_ts=message.ts))
            if audio.pcm:
                if not feed.begun:
                    feed.begin(audio_format(audio))
                    if self._cut(reply):  # cancelled before begin(), which clears a stop
                        self.backend.stop()
                feed.write(audio_format(audio), audio.pcm)
            if audio.last:
                feed.timeline.chunk_ended()
            final = audio.last and audio.final
            path = feed.end() if final else None
            if self._cut(reply):  # cancelled while this frame, or the reply's end, was playing
                self._stopped(reply, feed, path if final else feed.end())
                return
            if audio.last:
                self._publish(reply, playback("finished", audio.chunk, path, final=final, heard=1.0,
                                              chars=audio.chars, audio_s=feed.played_s() if final else 0.0))
            if final:
                return

    def _cut(self, reply: ReplyAudio) -> bool:
        with self.wake:
            return self.playlist.is_cut(reply)

    def _stopped(self, reply: ReplyAudio, feed: ReplyFeed, path: str | None) -> None:
        """The final event of a cut reply, sent after the backend's end(), which after a stall plays
        out what came, so that counts as heard."""
        with self.wake:
            waiting = [frame.body for frame in reply.frames]
        self._publish(reply, feed.timeline.stopped(feed.played_ms(), waiting, path, feed.played_s()))

    def _publish(self, reply: ReplyAudio, event: Playback) -> None:
        self.bus.publish(reply.session, reply.id, event)
        if event.final:
            self.log.info("%s/%s: playback %s at chunk %d, %.1f s of audio%s", reply.session, reply.id, event.event,
                          event.chunk, event.audio_s, f", {event.path}" if event.path else "")

    def shutdown(self) -> None:
        with self.wake:
            self.playlist.stopping = True
            self.wake.notify_all()
        self.backend.stop()
        self.worker.join(5)
        self.backend.close()
