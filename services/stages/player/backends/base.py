"""The interface every player backend implements, and the reply bookkeeping they share."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, Protocol

from ...audio import AudioFormat, PcmFrame


class PlayerBackend(Protocol):
    """Plays one reply at a time: begin(), write() per frame, end(); stop() interrupts from any thread."""

    name: str

    def __init__(self, table: Mapping[str, Any] | None = None, /, **settings: Any) -> None:
        """Takes the keys its registry entry declares from `table` ([player]), with `settings` over
        them, checked and completed by `backend_settings` (services/plugins.py: every plugin is built so)."""

    def output_format(self, fmt: AudioFormat) -> AudioFormat:
        """The format to play audio of format `fmt` in: `fmt` itself when the backend can, else the
        closest it can (the player converts)."""
        ...

    def begin(self, session: str, reply_id: str, fmt: AudioFormat) -> None:
        """Start a reply's audio; every frame of the reply has format `fmt`."""
        ...

    def write(self, frame: PcmFrame) -> None:
        """Play `frame`; returns once it is played or queued for gapless output."""
        ...

    def stop(self) -> None:
        """Silence the reply at once; may be called from another thread and makes a blocked
        write() return promptly. Later frames of the reply are dropped until the next begin()."""
        ...

    def played_ms(self) -> float:
        """How much of the reply since begin() has really gone out (not just queued), in ms of
        audio; it stops growing at stop() and holds after end(), until the next begin(). The
        player turns it into the `heard` fraction."""
        ...

    def end(self) -> str | None:
        """Finish the reply once its audio is out; returns the written file's path, if any."""
        ...

    def close(self) -> None:
        ...


class ReplyState:
    """Shared by backends: the open reply's format, stop flag and played time, and the check of each frame."""

    def __init__(self) -> None:
        self.format: AudioFormat | None = None
        self.stopped = threading.Event()
        self.played_ms = 0.0

    def begin(self, fmt: AudioFormat) -> None:
        self.format = fmt
        self.stopped.clear()
        self.played_ms = 0.0

    def end(self) -> None:
        self.format = None

    def wants(self, frame: PcmFrame) -> bool:
        """Whether `frame` should be output: it must match the reply's format, and empty frames
        (which crash simpleaudio) and frames after stop() are skipped."""
        if self.format is None:
            raise RuntimeError("write() outside a reply: call begin() first")
        if frame.format != self.format:
            raise ValueError(f"frame format {frame.format} differs from the reply's {self.format}")
        return bool(frame.pcm) and not self.stopped.is_set()
