"""Coqui TTS (`coqui-tts`, the maintained fork; the `coqui` extra) through its `TTS.api.TTS` API.

The model comes from `model_name` (a Coqui model name such as
`tts_models/multilingual/multi-dataset/xtts_v2`, downloaded on first use to Coqui's usual place,
`$TTS_HOME/tts` or `$XDG_DATA_HOME/tts`, else `~/.local/share/tts`) or from a local `model_path`
(a checkpoint file, or for XTTS the directory holding model.pth, vocab.json and speakers_xtts.pth)
with its `config_path` (default: config.json beside the checkpoint).

XTTS models are under the Coqui Public Model License: their download asks to accept it on stdin,
which a daemon does not have, so set `COQUI_TOS_AGREED=1` in the stage's environment (for example
in a systemd drop-in) to accept it; without it the engine refuses to start and says so.

XTTS streams inside a chunk: `Xtts.inference_stream` yields audio every few GPT tokens, so the first
frame of a chunk goes out long before the chunk is synthesised, and a stop request ends generation
at the next piece. Every other model synthesises the whole chunk with `TTS.tts()`, which is then
cut into frames. The model loads and runs a warm-up synthesis in the constructor, so a stage that
reports READY can speak at once.

A synthesis may choose a voice: one of the model's built-in speakers (`voices`: XTTS's
speakers_xtts.pth, or a multi-speaker model's speaker names). A model with one voice (or a cloned
voice and no built-in speakers) has nothing to choose, and says so with VoiceError.
"""

from __future__ import annotations

import logging
import re
import textwrap
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ...audio import AudioFormat, PcmFrame
from . import engine_settings
from .base import VoiceError

_INSTALL_HINT = "pip install 'voxpipe[coqui]' — see README for the torch recipe"
_CYRILLIC = re.compile("[\u0400-\u04ff]")
_SENTENCE_END = re.compile(r"(?<=[.!?…])\s+")
_XTTS_REF_RATE = 22050  # the rate XTTS computes its conditioning latents at
_WARM_UP = {"ru": "Привет.", "en": "Hello."}


def _key(name: str) -> str:
    return f"tts.coqui.{name}"


class CoquiEngine:
    """A Coqui TTS model; XTTS streams within a chunk, other models synthesise it whole."""

    name = "coqui"
    stream_chunk_size = 20  # XTTS: GPT tokens per streamed piece (~0.9 s of XTTS v2 audio); fewer: sooner first audio

    def __init__(self, table: Mapping[str, Any] | None = None, /, **settings: Any) -> None:
        settings = engine_settings(self.name, table, settings)
        model_name, model_path, config_path = settings["model_name"], settings["model_path"], settings["config_path"]
        device, speaker, speaker_wav = settings["device"], settings["speaker"], settings["speaker_wav"]
        language, max_frame_ms = settings["language"], settings["max_frame_ms"]
        if bool(model_name) == bool(model_path):
            given = "both are set" if model_name else "neither is set"
            raise ValueError(f"{_key('model_name')} and {_key('model_path')}: set exactly one ({given}): "
                             f"a Coqui model name such as tts_models/multilingual/multi-dataset/xtts_v2, "
                             f"or the path of a local checkpoint (with {_key('config_path')})")
        checkpoint, config_file = _local_files(model_path, config_path) if model_path else (None, None)
        if speaker and speaker_wav:
            raise ValueError(f"{_key('speaker')} and {_key('speaker_wav')}: set one, not both (a built-in "
                             f"speaker, or a reference recording of the voice to clone)")
        if speaker_wav and not Path(speaker_wav).is_file():
            raise ValueError(f"{_key('speaker_wav')} = {speaker_wav!r}: no such file; expected a reference "
                             f"recording (wav, flac or ogg) of the voice to clone")
        try:
            import torch
            from TTS.api import TTS
        except ImportError as exc:
            raise ValueError(f"tts.engine = 'coqui' needs Coqui TTS, which cannot be imported ({exc}): "
                             f"{_INSTALL_HINT}") from exc
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"{_key('device')} = 'cuda' but torch sees no CUDA device "
                             f"(torch {torch.__version__}); use device = 'cpu'")
        tts_logger = logging.getLogger("TTS")
        if tts_logger.level == logging.NOTSET:  # Coqui logs every sentence at INFO
            tts_logger.setLevel(logging.WARNING)

        if model_name:
            _check_model_name(model_name)
            self._tts = TTS(model_name, progress_bar=False)
        else:
            self._tts = TTS(model_path=str(checkpoint), config_path=str(config_file), progress_bar=False)
        self._tts.to(device)
        synthesizer = self._tts.synthesizer
        if synthesizer is None:
            raise ValueError(f"Coqui model {model_name or model_path!r} is not a text-to-speech model")
        self.model = synthesizer.tts_model
        self.format = AudioFormat(rate=int(synthesizer.output_sample_rate), channels=1, sample_width=2)
        self._max_bytes = self.format.longest_frame(max_frame_ms)
        self.streaming = hasattr(self.model, "inference_stream")  # XTTS
        self.device, self.max_frame_ms = device, max_frame_ms
        self.languages = self._languages()
        if language and self.languages and language not in self.languages:
            raise ValueError(f"{_key('language')} = {language!r} is not one of this model's languages: "
                             f"{', '.join(self.languages)} (empty: ru for Cyrillic text, else en)")
        if language and not self.languages:
            raise ValueError(f"{_key('language')} = {language!r}: this model speaks one language; "
                             f"leave {_key('language')} empty")
        self.language = language
        self._lock = threading.Lock()
        self._voice: tuple[Any, Any] | None = None
        self.speaker = ""
        self.voices = self._speakers()
        """The speakers a synthesis can choose by name; empty when the model has one voice."""
        if self.streaming:
            self._voice = self._xtts_voice(speaker, speaker_wav)
        else:
            self.speaker = self._pick_speaker(speaker)
        self.speaker_wav = speaker_wav
        for _ in self.synthesize(_WARM_UP["ru" if self.language == "ru" else "en"], lambda: False):
            pass

    # --- the interface --------------------------------------------------------------------------

    def synthesize(self, text: str, should_stop: Callable[[], bool], voice: str = "") -> Iterator[PcmFrame]:
        """One synthesis at a time per engine (XTTS keeps per-generation state in the model).
        `voice` is one of `voices`; "" is the configured speaker or cloned voice."""
        if not text.strip():
            return
        if voice and voice not in self.voices:
            raise VoiceError(self._no_voice(voice))
        with self._lock:
            if should_stop():
                return
            language = self.language_for(text)
            if self.streaming:
                conditioning = self._xtts_speaker(voice) if voice else self._voice
                assert language is not None and conditioning is not None, "XTTS has a language and a voice"
                yield from self._stream(text, language, conditioning, should_stop)
            else:
                yield from self._whole(text, language, voice, should_stop)

    def close(self) -> None:
        """Drop the model (and free GPU memory); the engine is unusable afterwards."""
        tts = getattr(self, "_tts", None)
        self._tts = self.model = self._voice = None
        if tts is not None and self.device == "cuda":
            import torch
            del tts
            torch.cuda.empty_cache()

    def language_for(self, text: str) -> str | None:
        """The language passed to the model for `text` (None for a one-language model)."""
        if not self.languages:
            return None
        if self.language:
            return self.language
        preferred = "ru" if _CYRILLIC.search(text) else "en"
        return preferred if preferred in self.languages else self.languages[0]

    # --- synthesis ------------------------------------------------------------------------------

    def _whole(self, text: str, language: str | None, voice: str,
               should_stop: Callable[[], bool]) -> Iterator[PcmFrame]:
        speaker, speaker_wav = (voice, None) if voice else (self.speaker or None, self.speaker_wav or None)
        samples = self._tts.tts(text, speaker=speaker, language=language, speaker_wav=speaker_wav)
        yield from self._frames(_pcm16(samples), should_stop)

    def _stream(self, text: str, language: str, conditioning: tuple[Any, Any],
                should_stop: Callable[[], bool]) -> Iterator[PcmFrame]:
        """XTTS: audio every `stream_chunk_size` GPT tokens. Text over XTTS's per-language length limit
        is split here at sentence ends (XTTS's own splitting needs spaCy, which Coqui does not install)."""
        config = self.model.config
        latents, embedding = conditioning
        limit = self.model.tokenizer.char_limits.get(language.split("-")[0], 250)
        for part in _split(text, limit):
            pieces = self.model.inference_stream(
                part, language, latents, embedding, stream_chunk_size=self.stream_chunk_size,
                enable_text_splitting=False,
                temperature=config.temperature, length_penalty=config.length_penalty,
                repetition_penalty=config.repetition_penalty, top_k=config.top_k, top_p=config.top_p)
            try:
                for piece in pieces:
                    if should_stop():
                        return
                    yield from self._frames(_pcm16(piece), should_stop)
                    if should_stop():
                        return
            finally:
                pieces.close()  # ends the GPT generation at once

    def _frames(self, pcm: bytes, should_stop: Callable[[], bool]) -> Iterator[PcmFrame]:
        for start in range(0, len(pcm), self._max_bytes):
            if should_stop():
                return
            yield PcmFrame(pcm[start:start + self._max_bytes], self.format)

    # --- voices and languages -------------------------------------------------------------------

    def _languages(self) -> list[str]:
        if self.streaming:
            return list(self.model.config.languages or [])
        if self._tts.is_multi_lingual:
            return list(self._tts.languages or [])
        return []

    def _speakers(self) -> list[str]:
        """The built-in speakers: XTTS's speakers_xtts.pth, or a multi-speaker model's names."""
        if self.streaming:
            manager = getattr(self.model, "speaker_manager", None)
            return list(manager.speakers) if manager is not None else []
        return list(self._tts.speakers or []) if self._tts.is_multi_speaker else []

    def _no_voice(self, voice: str) -> str:
        if not self.voices:
            return f"this Coqui model speaks in one voice, so voice {voice!r} cannot be chosen"
        return f"this Coqui model has no speaker {voice!r}; its speakers: {_listing(self.voices, 60)}"

    def _pick_speaker(self, speaker: str) -> str:
        if not self.voices:
            if speaker:
                raise ValueError(f"{_key('speaker')} = {speaker!r}: this model has one voice; "
                                 f"leave {_key('speaker')} empty")
            return ""
        if speaker and speaker not in self.voices:
            raise ValueError(f"{_key('speaker')} = {speaker!r} is not one of this model's speakers: "
                             f"{_listing(self.voices)}")
        return speaker or self.voices[0]

    def _xtts_voice(self, speaker: str, speaker_wav: str) -> tuple[Any, Any]:
        """XTTS conditioning (GPT latents, speaker embedding): a built-in speaker or a cloned voice."""
        if speaker_wav:
            return self._clone(speaker_wav)
        if not self.voices:
            raise ValueError(f"this XTTS model has no built-in speakers (no speakers_xtts.pth): set "
                             f"{_key('speaker_wav')} to a reference recording of the voice to clone")
        if speaker and speaker not in self.voices:
            raise ValueError(f"{_key('speaker')} = {speaker!r} is not one of this model's speakers: "
                             f"{_listing(self.voices)}")
        self.speaker = speaker or self.voices[0]
        return self._xtts_speaker(self.speaker)

    def _xtts_speaker(self, name: str) -> tuple[Any, Any]:
        """The conditioning of one of XTTS's built-in speakers (held in memory by its speaker manager)."""
        voice = self.model.speaker_manager.speakers[name]
        return voice["gpt_cond_latent"], voice["speaker_embedding"]

    def _clone(self, speaker_wav: str) -> tuple[Any, Any]:
        """The XTTS voice of a reference recording. Read with soundfile (a Coqui dependency) rather
        than Coqui's own loader, whose torchaudio.load needs FFmpeg's shared libraries."""
        import soundfile
        import torch
        import torchaudio

        try:
            samples, rate = soundfile.read(speaker_wav, dtype="float32", always_2d=True)
        except Exception as exc:
            raise ValueError(f"{_key('speaker_wav')} = {speaker_wav!r} cannot be read as audio: {exc}") from None
        config = self.model.config
        audio = torch.from_numpy(samples.mean(axis=1)).unsqueeze(0)
        if rate != _XTTS_REF_RATE:
            audio = torchaudio.functional.resample(audio, rate, _XTTS_REF_RATE)
        audio = audio[:, : _XTTS_REF_RATE * config.max_ref_len].to(self.model.device)
        if config.sound_norm_refs:
            audio = audio / audio.abs().max() * 0.75
        embedding = self.model.get_speaker_embedding(audio, _XTTS_REF_RATE)
        latents = self.model.get_gpt_cond_latents(audio, _XTTS_REF_RATE, length=config.gpt_cond_len,
                                                  chunk_length=config.gpt_cond_chunk_len)
        return latents, embedding


def _local_files(model_path: str, config_path: str) -> tuple[Path, Path]:
    checkpoint = Path(model_path).expanduser()
    if not checkpoint.exists():
        raise ValueError(f"{_key('model_path')} = {model_path!r}: no such file or directory; expected a "
                         f"Coqui checkpoint (.pth), or for XTTS the directory holding model.pth and vocab.json")
    if config_path:
        config = Path(config_path).expanduser()
        if not config.is_file():
            raise ValueError(f"{_key('config_path')} = {config_path!r}: no such file; expected the "
                             f"model's config.json")
    else:
        config = (checkpoint if checkpoint.is_dir() else checkpoint.parent) / "config.json"
        if not config.is_file():
            raise ValueError(f"{_key('config_path')} is empty and {config} does not exist; set "
                             f"{_key('config_path')} to the model's config.json")
    return checkpoint, config


def _check_model_name(model_name: str) -> None:
    """Refuse unknown names, and licence-bound models whose licence is not accepted, before any
    download starts (Coqui would otherwise prompt on stdin, which a daemon does not have)."""
    from TTS.utils.manage import ModelManager

    manager = ModelManager(progress_bar=False)
    try:
        item, full_name, _ = manager._set_model_item(model_name)
    except (KeyError, ValueError):
        raise ValueError(f"{_key('model_name')} = {model_name!r} is not a Coqui model name; names look like "
                         f"tts_models/<language>/<dataset>/<model> (`tts --list_models` lists them)") from None
    except Exception:  # a Coqui release with another catalogue API: let TTS() judge the name
        return
    if not ModelManager.tos_agreed(item, Path(manager.output_prefix) / full_name):
        raise ValueError(f"{_key('model_name')} = {model_name!r} is under the {item.get('license', 'Coqui')} "
                         f"licence, which must be accepted before download: set COQUI_TOS_AGREED=1 in the "
                         f"environment of the tts stage to accept it")


def _split(text: str, limit: int) -> list[str]:
    """`text` in parts of at most `limit` characters, cut at sentence ends where possible."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return [text]
    parts: list[str] = []
    for sentence in _SENTENCE_END.split(text):
        for line in textwrap.wrap(sentence, width=limit, break_on_hyphens=False) or [""]:
            if parts and len(parts[-1]) + 1 + len(line) <= limit:
                parts[-1] += " " + line
            elif line:
                parts.append(line)
    return parts


def _pcm16(samples: Any) -> bytes:
    """Float samples in [-1, 1] (list, numpy array or torch tensor) as little-endian int16 PCM."""
    import numpy as np

    if hasattr(samples, "detach"):
        samples = samples.detach().cpu().numpy()
    array = np.asarray(samples, dtype=np.float32).reshape(-1)
    return (np.clip(array, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def _listing(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names)} in all)" if len(names) > limit else "")
