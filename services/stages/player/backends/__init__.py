"""Player backend registry: adding a backend is one module and one entry here, which declares the
[player] keys it reads (config validation takes them from here)."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ....config import Setting, text
from ....plugins import Plugin, build

if TYPE_CHECKING:
    from .base import PlayerBackend

BACKENDS = {
    "simpleaudio": Plugin("voxpipe.stages.player.backends.simpleaudio_backend:SimpleaudioBackend"),
    "sounddevice": Plugin("voxpipe.stages.player.backends.sounddevice_backend:SounddeviceBackend"),
    "wav": Plugin("voxpipe.stages.player.backends.wav:WavBackend", {
        "wav_dir": Setting("", text(), "where the wav backend writes a file per reply; empty: a new private "
                                       "temporary directory each time the player starts"),
    }),
    "null": Plugin("voxpipe.stages.player.backends.null:NullBackend"),
}


def create_backend(name: str, options: Mapping[str, Any]) -> PlayerBackend:
    """Build backend `name`, or for "auto" the best one that works here. `options` may be the whole
    [player] section: each backend takes the keys it declares (e.g. wav takes `wav_dir`)."""
    return build(BACKENDS, name, "player backend", options, auto=best_backend)


def backend_settings(name: str, table: Mapping[str, Any] | None, given: Mapping[str, Any]) -> dict[str, Any]:
    """Backend `name`'s settings from [player] and keys given one by one (see Plugin.resolve)."""
    return BACKENDS[name].resolve(table, given, "player")


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
