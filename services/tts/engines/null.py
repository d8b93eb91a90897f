"""The null engine: instant silence, for measuring what the pipeline itself costs."""

from __future__ import annotations

from typing import Callable, Iterator

from services.audio import AudioFormat, PcmFrame


class NullEngine:
    """One frame of `frame_ms` silence per chunk with text; no synthesis time at all."""

    name = "null"
    format = AudioFormat(rate=22050, channels=1, sample_width=2)

    def __init__(self, frame_ms: int = 10) -> None:
        if not 0 < frame_ms <= 200:
            raise ValueError(f"tts.null.frame_ms must be 1..200, got {frame_ms}")
        self._pcm = bytes(self.format.frame_bytes(frame_ms))

    def synthesize(self, text: str, should_stop: Callable[[], bool], voice: str = "") -> Iterator[PcmFrame]:
        """Any voice is accepted and ignored: silence sounds the same in every voice."""
        if text.strip() and not should_stop():
            yield PcmFrame(self._pcm, self.format)

    def close(self) -> None:
        """Nothing to release."""
