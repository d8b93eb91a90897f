"""Discards audio at once: for headless runs and tests that only need the events."""

from __future__ import annotations

from services.audio import AudioFormat, PcmFrame
from services.player.backends.base import ReplyState


class NullBackend:
    name = "null"

    def __init__(self) -> None:
        self._reply = ReplyState()

    def begin(self, session: str, reply_id: str, fmt: AudioFormat) -> None:
        self._reply.begin(fmt)

    def write(self, frame: PcmFrame) -> None:
        self._reply.wants(frame)  # still checked, so misuse fails here as on a real backend

    def stop(self) -> None:
        self._reply.stopped.set()

    def end(self) -> str | None:
        self._reply.end()
        return None

    def close(self) -> None:
        """Nothing to release."""
