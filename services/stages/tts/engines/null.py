"""The null engine: instant silence, for measuring what the pipeline itself costs."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from ...audio import AudioFormat, PcmFrame
from . import engine_settings


class NullEngine:
    """One frame of `frame_ms` silence per chunk with text; no synthesis time at all."""

    name = "null"
    format = AudioFormat(rate=22050, channels=1, sample_width=2)

    def __init__(self, table: Mapping[str, Any] | None = None, /, **settings: Any) -> None:
        self._pcm = bytes(self.format.frame_bytes(engine_settings(self.name, table, settings)["frame_ms"]))

    def synthesize(self, text: str, should_stop: Callable[[], bool], voice: str = "") -> Iterator[PcmFrame]:
        """Any voice is accepted and ignored: silence sounds the same in every voice."""
        if text.strip() and not should_stop():
            yield PcmFrame(self._pcm, self.format)

    def close(self) -> None:
        """Nothing to release."""
