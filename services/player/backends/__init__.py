"""Player backend registry: adding a backend is one module and one line here."""

from __future__ import annotations

from typing import Any, Mapping

from services.plugins import load_plugin
from services.player.backends.base import PlayerBackend

BACKENDS = {
    "simpleaudio": "services.player.backends.simpleaudio_backend:SimpleaudioBackend",
    "wav": "services.player.backends.wav:WavBackend",
    "null": "services.player.backends.null:NullBackend",
}


def create_backend(name: str, options: Mapping[str, Any]) -> PlayerBackend:
    """Build backend `name`, or for "auto" the best one that works here. `options` may be the whole
    [player] section: each backend takes the keys it knows (e.g. wav takes `wav_dir`)."""
    return load_plugin(BACKENDS, name, "player backend", options, auto=_best_backend)


def _best_backend() -> str:
    """simpleaudio if it is installed and a device really plays, else wav files."""
    try:
        from services.player.backends.simpleaudio_backend import plays_silence
    except ImportError:
        return "wav"
    return "simpleaudio" if plays_silence() else "wav"
