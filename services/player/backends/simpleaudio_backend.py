"""simpleaudio: one play_buffer per frame, started the moment the previous one ends.

write() returns as soon as its frame starts playing, so the caller prepares the next frame while
this one sounds; the remaining gap is one poll interval plus the device open of play_buffer
(simpleaudio opens the ALSA device per buffer, and two buffers at once would mix or fail).
Waiting polls is_playing() on the stop event, because simpleaudio's wait_done() cannot be
interrupted and stop() must release a blocked write() even when the device itself hangs.
simpleaudio drains rather than drops on stop, so up to its ~100 ms device buffer still sounds.
"""

from __future__ import annotations

import threading
import time

import simpleaudio
from simpleaudio._simpleaudio import SimpleaudioError

from services.audio import AudioFormat, PcmFrame
from services.player.backends.base import ReplyState

_POLL_S = 0.002
_PROBE_TIMEOUT_S = 1.0


def plays_silence() -> bool:
    """Whether the default device really plays: importing simpleaudio succeeds without a device."""
    try:
        play = simpleaudio.play_buffer(bytes(882), 1, 2, 22050)  # 20 ms of silence
    except SimpleaudioError:
        return False
    deadline = time.monotonic() + _PROBE_TIMEOUT_S
    while play.is_playing():
        if time.monotonic() > deadline:
            play.stop()
            return False
        time.sleep(_POLL_S)
    return True


class SimpleaudioBackend:
    name = "simpleaudio"

    def __init__(self) -> None:
        self._reply = ReplyState()
        self._lock = threading.Lock()  # orders starting a buffer against stop() from another thread
        self._playing: simpleaudio.PlayObject | None = None

    def begin(self, session: str, reply_id: str, fmt: AudioFormat) -> None:
        self._reply.begin(fmt)

    def write(self, frame: PcmFrame) -> None:
        if not self._reply.wants(frame):
            return
        self._wait_played()
        fmt = frame.format
        with self._lock:
            if not self._reply.stopped.is_set():
                self._playing = simpleaudio.play_buffer(frame.pcm, fmt.channels, fmt.sample_width, fmt.rate)

    def stop(self) -> None:
        with self._lock:
            self._reply.stopped.set()
            if self._playing is not None:
                self._playing.stop()

    def end(self) -> str | None:
        self._wait_played()
        with self._lock:
            self._playing = None
        self._reply.end()
        return None

    def close(self) -> None:
        self.stop()

    def _wait_played(self) -> None:
        """Until the current buffer has played, or stop() is called."""
        playing = self._playing
        while playing is not None and playing.is_playing() and not self._reply.stopped.wait(_POLL_S):
            pass
