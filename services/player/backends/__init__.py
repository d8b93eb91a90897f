"""Player backend registry: adding a backend is one module and one line here."""

from __future__ import annotations

import importlib
from typing import Any, Mapping

from services.plugins import load_plugin
from services.player.backends.base import PlayerBackend

BACKENDS = {
    "simpleaudio": "services.player.backends.simpleaudio_backend:SimpleaudioBackend",
    "sounddevice": "services.player.backends.sounddevice_backend:SounddeviceBackend",
    "wav": "services.player.backends.wav:WavBackend",
    "null": "services.player.backends.null:NullBackend",
}


def create_backend(name: str, options: Mapping[str, Any]) -> PlayerBackend:
    """Build backend `name`, or for "auto" the best one that works here. `options` may be the whole
    [player] section: each backend takes the keys it knows (e.g. wav takes `wav_dir`)."""
    return load_plugin(BACKENDS, name, "player backend", options, auto=best_backend)


def best_backend() -> str:
    """The first of sounddevice (gapless, stops at once) and simpleaudio that is installed and whose
    device really plays, else wav files."""
    for name in ("sounddevice", "simpleaudio"):
        module_name = BACKENDS[name].partition(":")[0]
        try:
            plays_silence = importlib.import_module(module_name).plays_silence
        except (ImportError, OSError):  # sounddevice raises OSError when PortAudio is missing
            continue
        if plays_silence():
            return name
    return "wav"
