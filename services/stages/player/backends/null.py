"""Discards audio at once: for headless runs and tests that only need the events."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...audio import AudioFormat, PcmFrame
from .base import ReplyState


class NullBackend:
    name = "null"

    def __init__(self, table: Mapping[str, Any] | None = None, /) -> None:
        """`table`: [player], from which this backend takes nothing: it declares no keys."""
        self._reply = ReplyState()

    def output_format(self, fmt: AudioFormat) -> AudioFormat:
        return fmt

    def begin(self, session: str, reply_id: str, fmt: AudioFormat) -> None:
        self._reply.begin(fmt)

    def write(self, frame: PcmFrame) -> None:
        """Still checks the frame, so misuse fails here as on a real backend; "plays" it at once."""
        if self._reply.wants(frame):
            self._reply.played_ms += frame.duration_ms

    def stop(self) -> None:
        self._reply.stopped.set()

    def played_ms(self) -> float:
        return self._reply.played_ms

    def end(self) -> str | None:
        self._reply.end()
        return None

    def close(self) -> None:
        """Nothing to release."""
