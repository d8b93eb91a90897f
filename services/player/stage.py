"""The player stage shell: audio frames in, sound out, playback events back on the bus.

One reply plays at a time (there is one speaker); replies wait in the order
their first frame arrived.  A worker thread drives the backend so the main loop
can take a cancel at any moment and silence the backend at once.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field

from ..audio import AudioFormat, PcmFrame
from ..protocol import Message
from ..runtime import Stage
from .backends import create_backend

STALL_S = 15.0
"""A reply whose next frame is this late is ended as stopped, so playback never wedges."""
_ENDED_MEMORY = 4096


@dataclass
class ReplyAudio:
    """The frames of one reply that are waiting to be played."""

    session: str
    id: str
    frames: collections.deque[Message] = field(default_factory=collections.deque)


class PlayerStage(Stage):
    name = "player"
    kinds = ("audio", "cancel")

    def prepare(self) -> None:
        player = self.config["player"]
        self.backend = create_backend(player["backend"], {"wav_dir": player["wav_dir"]})
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
            try:
                self._play(reply)
            except Exception as exc:  # a backend failure ends this reply, not the player
                self.log.exception("playback failed")
                self.bus.report("playback_failed", f"{type(exc).__name__}: {exc}", reply.session, reply.id)
                self._event(reply, "stopped", -1)
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

    def _play(self, reply: ReplyAudio) -> None:
        begun = False
        chunk = -1
        while True:
            message = self._next_frame(reply)
            if message is None:
                path = self.backend.end() if begun else None
                self._event(reply, "stopped", chunk, path)
                return
            if message["frame"] == 0:
                chunk = message["chunk"]
                self._event(reply, "started", chunk)
            if message["pcm"]:
                fmt = AudioFormat(message["rate"], message["channels"], message["width"])
                if not begun:
                    self.backend.begin(reply.session, reply.id, fmt)
                    begun = True
                self.backend.write(PcmFrame(message["pcm"], fmt))
            if message["last"] and message["final"]:
                path = self.backend.end() if begun else None
                self._event(reply, "finished", chunk, path, final=True)
                return
            if message["last"]:
                self._event(reply, "finished", chunk)

    def _event(self, reply: ReplyAudio, event: str, chunk: int, path: str | None = None,
               final: bool = False) -> None:
        self.bus.publish("playback", reply.session, reply.id, event=event, chunk=chunk,
                         path=path or "", final=final or event == "stopped")

    def shutdown(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify_all()
        self.backend.stop()
        self.worker.join(5)
        self.backend.close()
