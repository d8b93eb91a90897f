"""TTS engine registry: adding an engine is one module and one line here."""

from __future__ import annotations

from typing import Any, Mapping

from services.plugins import load_plugin
from services.tts.engines.base import TtsEngine

ENGINES = {
    "null": "services.tts.engines.null:NullEngine",
    "espeak": "services.tts.engines.espeak:EspeakEngine",
    "coqui": "services.tts.engines.coqui:CoquiEngine",
    "openai-speech": "services.tts.engines.openai_speech:OpenAISpeechEngine",
}


def create_engine(name: str, options: Mapping[str, Any]) -> TtsEngine:
    """Build engine `name`; `options` are its constructor keywords (other keys are ignored)."""
    return load_plugin(ENGINES, name, "tts engine", options)
