"""sounddevice: one PortAudio RawOutputStream per reply, fed by its callback from a byte queue.

Gapless by construction: the device pulls audio at its own pace, and as long as the queue holds
audio every sample follows the previous one; only an empty queue (synthesis behind real time)
inserts silence. write() blocks only while more than QUEUE_MS is queued, which bounds both memory
and how far `finished` events run ahead of the sound. stop() only empties the queue, so the next
callback (a few ms away) already plays silence, and it never blocks on a wedged device; end()
then aborts the stream, which drops what the device buffer still holds.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import sounddevice

from ...audio import AudioFormat, PcmFrame
from .base import ReplyState

QUEUE_MS = 300
_DTYPES = {1: "uint8", 2: "int16", 3: "int24", 4: "int32"}
_PROBE_TIMEOUT_S = 1.0


def plays_silence() -> bool:
    """Whether the default output device opens and asks for audio (PortAudio lists devices that
    cannot open, so importing sounddevice proves nothing)."""
    asked = threading.Event()

    def callback(outdata: Any, frames: int, time: Any, status: Any) -> None:
        outdata[:] = bytes(len(outdata))
        asked.set()

    try:
        stream = sounddevice.RawOutputStream(samplerate=22050, channels=1, dtype="int16", callback=callback)
    except sounddevice.PortAudioError:
        return False
    try:
        stream.start()
        return asked.wait(_PROBE_TIMEOUT_S)
    except sounddevice.PortAudioError:
        return False
    finally:
        stream.abort()
        stream.close()


class SounddeviceBackend:
    name = "sounddevice"

    def __init__(self, table: Mapping[str, Any] | None = None, /) -> None:
        """`table`: [player], from which this backend takes nothing: it declares no keys."""
        self._reply = ReplyState()
        self._queued = threading.Condition()  # guards _queue and played_ms; the callback notifies
        self._queue = bytearray()
        self._silence = b"\0"
        self._stream_lock = threading.Lock()  # the playing thread uses the stream, close() may come from another
        self._stream: sounddevice.RawOutputStream | None = None

    def output_format(self, fmt: AudioFormat) -> AudioFormat:
        """`fmt` if the default device takes it, else the device's own rate, else 16-bit at that rate."""
        rate = int(sounddevice.query_devices(kind="output")["default_samplerate"])
        for candidate in (fmt, AudioFormat(rate, fmt.channels, fmt.sample_width), AudioFormat(rate, fmt.channels, 2)):
            try:
                sounddevice.check_output_settings(samplerate=candidate.rate, channels=candidate.channels,
                                                  dtype=_DTYPES[candidate.sample_width])
                return candidate
            except (sounddevice.PortAudioError, ValueError):
                continue
        return fmt  # begin() then fails with PortAudio's own explanation

    def begin(self, session: str, reply_id: str, fmt: AudioFormat) -> None:
        """Opens the stream; it starts with the first write, so it never opens on silence."""
        self._close_stream()
        with self._queued:
            self._queue.clear()
            self._reply.begin(fmt)
        self._silence = b"\x80" if fmt.sample_width == 1 else b"\0"  # uint8 silence is mid-scale
        stream = sounddevice.RawOutputStream(samplerate=fmt.rate, channels=fmt.channels,
                                             dtype=_DTYPES[fmt.sample_width], callback=self._callback,
                                             latency="high")
        with self._stream_lock:
            self._stream = stream

    def write(self, frame: PcmFrame) -> None:
        if not self._reply.wants(frame):
            return
        limit = frame.format.frame_bytes(QUEUE_MS)
        with self._queued:
            self._queued.wait_for(lambda: len(self._queue) <= limit or self._reply.stopped.is_set())
            if self._reply.stopped.is_set():
                return
            self._queue += frame.pcm
        with self._stream_lock:
            if self._stream is not None and not self._stream.active and not self._reply.stopped.is_set():
                self._stream.start()

    def stop(self) -> None:
        with self._queued:
            self._reply.stopped.set()
            self._queue.clear()
            self._queued.notify_all()

    def played_ms(self) -> float:
        with self._queued:
            return self._reply.played_ms

    def end(self) -> str | None:
        """Waits until the queue has drained, then until the device has played it; after stop(),
        drops the device's buffer instead."""
        with self._queued:
            self._queued.wait_for(lambda: not self._queue or self._reply.stopped.is_set())
        self._close_stream()
        self._reply.end()
        return None

    def close(self) -> None:
        self.stop()
        self._close_stream()

    def _close_stream(self) -> None:
        with self._stream_lock:
            stream, self._stream = self._stream, None
            if stream is None:
                return
            if self._reply.stopped.is_set():
                stream.abort()
            else:
                stream.stop()
            stream.close()

    def _callback(self, outdata: Any, frames: int, time: Any, status: Any) -> None:
        """PortAudio's thread: hand over queued audio, fill the rest with silence."""
        with self._queued:
            count = min(len(self._queue), len(outdata))
            outdata[:count] = self._queue[:count]
            del self._queue[:count]
            if self._reply.format is not None:
                self._reply.played_ms += self._reply.format.duration_ms(count)
            self._queued.notify_all()
        if count < len(outdata):
            outdata[count:] = self._silence * (len(outdata) - count)
