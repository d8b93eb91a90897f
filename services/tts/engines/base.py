"""The interface every TTS engine implements."""

from __future__ import annotations

from typing import Callable, Iterator, Protocol

from services.audio import PcmFrame


class TtsEngine(Protocol):
    """Synthesises one chunk of text at a time as a stream of PCM frames."""

    name: str

    def synthesize(self, text: str, should_stop: Callable[[], bool]) -> Iterator[PcmFrame]:
        """Yield the audio of `text` as it is produced, in frames of at most the engine's
        `max_frame_ms`; stop at the next frame once `should_stop()` is true.
        Blank text yields nothing."""
        ...

    def close(self) -> None:
        ...
