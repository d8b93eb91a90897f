"""TTS engine registry: adding an engine is one module and one entry here, which declares the keys of
its [tts.<name>] table (config validation takes them from here)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ....config import Setting, choice, count, key_settings, languages, real, text
from ....plugins import Plugin, build

if TYPE_CHECKING:
    from .base import TtsEngine


def _numbers(default: list[str]) -> Setting:
    """Every engine declares this, with its own default: whether it reads digits well itself."""
    return Setting(default, languages(), "languages whose numbers the tts stage spells out (num2words) before "
                                         "the engine speaks them")


MAX_FRAME_MS = Setting(200, count(10, 1000), "the longest audio frame sent, in ms")

ENGINES = {
    "espeak": Plugin("voxpipe.stages.tts.engines.espeak:EspeakEngine", {
        "voice": Setting("auto", text(), "a voice espeak-ng lists, optionally with +variant (en, en-us, ru, en+f3); "
                                         "auto: ru for Cyrillic text, else en"),
        "rate": Setting(175, count(80, 500), "words per minute"),
        "pitch": Setting(50, count(0, 99), "the voice's pitch"),
        "volume": Setting(100, count(0, 200), "the volume, 100 being espeak's normal"),
        "max_frame_ms": MAX_FRAME_MS,
        "normalize_numbers": _numbers([]),
    }),
    "coqui": Plugin("voxpipe.stages.tts.engines.coqui:CoquiEngine", {
        "model_name": Setting("", text(), "a Coqui model name, downloaded on first start; this or model_path"),
        "model_path": Setting("", text(), "a local checkpoint (for XTTS, its directory); this or model_name"),
        "config_path": Setting("", text(), "the checkpoint's config.json; empty: the one beside it"),
        "device": Setting("cpu", choice("cpu", "cuda"), "where the model runs"),
        "speaker": Setting("", text(), "a built-in speaker of the model; empty: its first"),
        "language": Setting("", text(), "the language code passed to the model; empty: ru for Cyrillic text, "
                                        "else en, per chunk"),
        "speaker_wav": Setting("", text(), "XTTS: a recording of the voice to clone, instead of speaker"),
        "max_frame_ms": MAX_FRAME_MS,
        "normalize_numbers": _numbers(["ru", "en"]),
    }),
    "openai-speech": Plugin("voxpipe.stages.tts.engines.openai_speech:OpenAISpeechEngine", {
        "base_url": Setting("https://api.openai.com/v1", text(), "an OpenAI-compatible /v1/audio/speech server"),
        "model": Setting("tts-1", text(), "the speech model"),
        "voice": Setting("alloy", text(), "the server's voice"),
        **key_settings("OPENAI_API_KEY"),
        "response_format": Setting("pcm", choice("pcm", "wav"),
                                   "pcm: headerless 16-bit mono at sample_rate; wav: the format in its header"),
        "speed": Setting(1.0, real(0.25, 4.0), "the speaking speed, 1.0 being normal"),
        "sample_rate": Setting(24000, count(8000, 384000), "the rate of pcm responses"),
        "timeout_s": Setting(30.0, real(0.1, 600.0), "for connecting, and for each read"),
        "max_frame_ms": MAX_FRAME_MS,
        "normalize_numbers": _numbers([]),
    }),
    "null": Plugin("voxpipe.stages.tts.engines.null:NullEngine", {
        "frame_ms": Setting(10, count(1, 200), "the silence sent per chunk, in ms"),
        "normalize_numbers": _numbers([]),
    }),
}


def create_engine(name: str, options: Mapping[str, Any]) -> TtsEngine:
    """Build engine `name` from its table; a partial table gets the declared defaults."""
    return build(ENGINES, name, "tts engine", options)


def engine_settings(name: str, table: Mapping[str, Any] | None, given: Mapping[str, Any]) -> dict[str, Any]:
    """Engine `name`'s settings from its table and keys given one by one (see Plugin.resolve)."""
    return ENGINES[name].resolve(table, given, f"tts.{name}")
