"""simpleaudio: one play_buffer per frame, started the moment the previous one ends.

write() returns as soon as its frame starts playing, so the caller prepares the next frame while
this one sounds; the remaining gap is one poll interval plus the device open of play_buffer
(simpleaudio opens the ALSA device per buffer, and two buffers at once would mix or fail).
Waiting polls is_playing() on the stop event, because simpleaudio's wait_done() cannot be
interrupted and stop() must release a blocked write() even when the device itself hangs.
simpleaudio drains rather than drops on stop, so up to its ~100 ms device buffer still sounds.
played_ms() counts a buffer's wall time since it started, up to its length.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

import simpleaudio
from simpleaudio._simpleaudio import SimpleaudioError

from ...audio import AudioFormat, PcmFrame
from .base import ReplyState

_POLL_S = 0.002
_PROBE_TIMEOUT_S = 1.0
RATES = (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000, 88200, 96000, 192000)
"""The only rates play_buffer accepts."""


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

    def __init__(self, table: Mapping[str, Any] | None = None, /) -> None:
        """`table`: [player], from which this backend takes nothing: it declares no keys."""
        self._reply = ReplyState()
        self._lock = threading.Lock()  # orders starting a buffer against stop() from another thread
        self._playing: simpleaudio.PlayObject | None = None
        self._playing_since = 0.0
        self._playing_ms = 0.0

    def output_format(self, fmt: AudioFormat) -> AudioFormat:
        """The next supported rate up (upsampling loses nothing), at most 2 channels, and 24 bits for
        32-bit samples, because simpleaudio plays 4-byte samples as floats."""
        rate = min((rate for rate in RATES if rate >= fmt.rate), default=RATES[-1])
        return AudioFormat(rate, min(fmt.channels, 2), min(fmt.sample_width, 3))

    def begin(self, session: str, reply_id: str, fmt: AudioFormat) -> None:
        self._reply.begin(fmt)

    def write(self, frame: PcmFrame) -> None:
        if not self._reply.wants(frame):
            return
        self._wait_played()
        fmt = frame.format
        with self._lock:
            if not self._reply.stopped.is_set():
                self._settle()
                self._playing = simpleaudio.play_buffer(frame.pcm, fmt.channels, fmt.sample_width, fmt.rate)
                self._playing_since, self._playing_ms = time.monotonic(), frame.duration_ms

    def stop(self) -> None:
        with self._lock:
            self._reply.stopped.set()
            if self._playing is not None:
                self._playing.stop()
            self._settle()

    def played_ms(self) -> float:
        with self._lock:
            return self._reply.played_ms + self._current_ms()

    def end(self) -> str | None:
        self._wait_played()
        with self._lock:
            self._settle()
        self._reply.end()
        return None

    def close(self) -> None:
        self.stop()

    def _current_ms(self) -> float:
        """How much of the current buffer has played."""
        if self._playing is None:
            return 0.0
        return min(self._playing_ms, (time.monotonic() - self._playing_since) * 1000)

    def _settle(self) -> None:
        """Count the current buffer as played as far as it got, once (lock held). The buffer stays
        in `_playing`, so the next one still waits until a stopped buffer has wound down."""
        self._reply.played_ms += self._current_ms()
        self._playing_ms = 0.0

    def _wait_played(self) -> None:
        """Until the current buffer has played, or stop() is called."""
        playing = self._playing
        while playing is not None and playing.is_playing() and not self._reply.stopped.wait(_POLL_S):
            pass
