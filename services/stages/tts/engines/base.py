"""The interface every TTS engine implements."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

from ...audio import PcmFrame


class VoiceError(ValueError):
    """The voice asked for cannot speak: the engine has no such voice, or no voices to choose from.

    Raised before the first frame, so the caller can speak the same text with the configured voice
    instead; the text names the voice and says which voices there are.
    """


class TtsEngine(Protocol):
    """Synthesises one chunk of text at a time as a stream of PCM frames."""

    name: str

    def __init__(self, table: Mapping[str, Any] | None = None, /, **settings: Any) -> None:
        """Takes the keys its registry entry declares from `table` ([tts.<name>]), with `settings` over
        them, checked and completed by `engine_settings` (services/plugins.py: every plugin is built so)."""

    def synthesize(self, text: str, should_stop: Callable[[], bool], voice: str = "") -> Iterator[PcmFrame]:
        """Yield the audio of `text` as it is produced, in frames of at most the engine's
        `max_frame_ms`; stop at the next frame once `should_stop()` is true.
        Blank text yields nothing. `voice` is the voice of this synthesis in the engine's own
        naming ("" = the configured voice); one the engine cannot use raises VoiceError."""
        ...

    def close(self) -> None:
        ...
