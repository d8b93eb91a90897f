"""espeak-ng through ctypes over the library and data that espeakng-loader ships: offline ru, en and
the other languages espeak-ng speaks.

libespeak-ng keeps global state and is not thread-safe, so a process has one `_Espeak` and runs one
synthesis at a time under its lock. Synthesis runs in SYNCHRONOUS mode on a worker thread whose
callback feeds a queue, so frames are yielded while espeak is still producing the rest.

A voice is one that espeak lists: a language (`en`, `en-us`, `ru`), optionally with a variant after
`+` (`en+f3`, `ru+Andy`). espeak itself accepts almost any name (an unknown variant is silently
dropped, a bare variant loads no language, a path is opened as a file), so names are checked
against its own list first.
"""

from __future__ import annotations

import ctypes
import queue
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import espeakng_loader

from ...audio import AudioFormat, PcmFrame
from . import engine_settings
from .base import VoiceError

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # without it, missing data makes espeak call exit()
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_ENDPAUSE = 0x1000  # a sentence pause after each chunk, so consecutive chunks do not run together
_RATE, _VOLUME, _PITCH = 1, 2, 3
_BUFFER_MS = 100  # espeak's callback buffer: bounds time to first audio and to abort
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
_CYRILLIC = re.compile("[\u0400-\u04ff]")
_END = object()


class _Voice(ctypes.Structure):
    """espeak_VOICE from speak_lib.h. `languages` is a priority byte, then a NUL-terminated language
    code (further pairs may follow; only the first is read)."""

    _fields_ = [("name", ctypes.c_char_p), ("languages", ctypes.c_void_p), ("identifier", ctypes.c_char_p),
                ("gender", ctypes.c_ubyte), ("age", ctypes.c_ubyte), ("variant", ctypes.c_ubyte),
                ("xx1", ctypes.c_ubyte), ("score", ctypes.c_int), ("spare", ctypes.c_void_p)]


def _listed(lib: ctypes.CDLL, kind: bytes | None) -> list[tuple[str, str, str]]:
    """(name, identifier, language) of every voice espeak lists: voices for None, variants for b"variant"."""
    spec = None
    if kind is not None:
        spec = _Voice()
        spec.languages = ctypes.cast(ctypes.c_char_p(kind), ctypes.c_void_p)
    entries = lib.espeak_ListVoices(ctypes.byref(spec) if spec is not None else None)
    voices, index = [], 0
    while entries[index]:  # the array ends with a NULL pointer
        voice = entries[index].contents
        language = ctypes.string_at(voice.languages + 1) if voice.languages else b""
        voices.append(((voice.name or b"").decode(errors="replace"),
                       (voice.identifier or b"").decode(errors="replace"), language.decode(errors="replace")))
        index += 1
    return voices


class _Espeak:
    """The process's one libespeak-ng instance; use only while holding `lock`."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_ListVoices.argtypes = [ctypes.POINTER(_Voice)]
        lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_Voice))
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
            ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]
        data_path = espeakng_loader.get_data_path().encode()
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, _BUFFER_MS, data_path, _INITIALIZE_DONT_EXIT)
        if rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed ({rate}) with data at {data_path.decode()}")
        self._lib = lib
        self.format = AudioFormat(rate=rate, channels=1, sample_width=2)
        self.lock = threading.Lock()
        self._voice: str | None = None
        self._sink: Callable[[bytes], None] | None = None
        self._abort = threading.Event()
        self._callback = _SYNTH_CALLBACK(self._on_audio)  # referenced here so it is never collected
        lib.espeak_SetSynthCallback(self._callback)
        self._voices: dict[str, str] = {}
        """Every accepted spelling of a voice, lower-cased: its language, identifier, file name and name,
        each mapped to its identifier (the file espeak loads)."""
        for name, identifier, language in _listed(lib, None):
            for key in (name, identifier, identifier.rsplit("/", 1)[-1], language):
                self._voices.setdefault(key.lower(), identifier)
        self._variants: dict[str, str] = {}
        """Variant file names and names, lower-cased, mapped to the file name (as `+variant` takes it)."""
        for name, identifier, _ in _listed(lib, b"variant"):
            file_name = identifier.rsplit("/", 1)[-1]
            for key in (file_name, name):
                self._variants.setdefault(key.lower(), file_name)

    def resolve(self, voice: str) -> str:
        """The name espeak loads for `voice` (a listed voice, optionally `+variant`, in any case)."""
        base, plus, variant = voice.partition("+")
        identifier = self._voices.get(base.lower())
        file_name = self._variants.get(variant.lower()) if plus else ""
        if identifier is None or file_name is None:
            raise VoiceError(self._unknown(voice))
        return f"{identifier}+{file_name}" if plus else identifier

    def _unknown(self, voice: str) -> str:
        """Names the voice and lists the choices (they fit in an error event's 2000 characters)."""
        languages = sorted({identifier.rsplit("/", 1)[-1].lower() for identifier in self._voices.values()})
        variants = sorted(set(self._variants.values()), key=str.lower)
        return (f"espeak has no voice {voice!r}. A voice is a language, optionally with a variant after '+' "
                f"(en, en-us, ru, en+f3). Languages: {', '.join(languages)}. Variants: {', '.join(variants)}.")

    def set_voice(self, voice: str) -> None:
        """Load `voice` (as resolve() names it) unless it is already loaded (loading costs 10–25 ms)."""
        if voice != self._voice:
            if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
                self._voice = None
                raise VoiceError(f"espeak cannot load voice {voice!r}")
            self._voice = voice

    def set_prosody(self, rate: int, pitch: int, volume: int) -> None:
        """Set every time: the values are process-wide and engines may differ."""
        for parameter, value in ((_RATE, rate), (_PITCH, pitch), (_VOLUME, volume)):
            self._lib.espeak_SetParameter(parameter, value, 0)

    def stream(self, text: str, should_stop: Callable[[], bool], max_bytes: int) -> Iterator[PcmFrame]:
        """Yield `text`'s audio in frames of at most `max_bytes` while a worker thread synthesises it."""
        chunks: queue.SimpleQueue = queue.SimpleQueue()
        self._sink = chunks.put
        self._abort.clear()
        worker = threading.Thread(target=self._synth, args=(text.encode(), chunks), name="espeak", daemon=True)
        worker.start()
        try:
            while (chunk := chunks.get()) is not _END:
                if isinstance(chunk, Exception):
                    raise chunk
                for start in range(0, len(chunk), max_bytes):
                    if should_stop():
                        return
                    yield PcmFrame(chunk[start:start + max_bytes], self.format)
        finally:
            self._abort.set()  # the callback then makes espeak_Synth return at its next buffer
            worker.join()
            self._sink = None

    def _synth(self, text: bytes, chunks: queue.SimpleQueue) -> None:
        """Runs on the worker; always ends the queue, so the consumer never waits forever."""
        try:
            code = self._lib.espeak_Synth(
                text, len(text) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8 | _ENDPAUSE, None, None)
            outcome = _END if code == 0 else RuntimeError(f"espeak_Synth failed with code {code}")
        except Exception as exc:
            outcome = exc
        chunks.put(outcome)

    def _on_audio(self, wav: Any, numsamples: int, _events: Any) -> int:
        """espeak's callback: hand PCM to the current stream; returning 1 aborts synthesis."""
        if wav and numsamples > 0 and self._sink is not None:
            self._sink(ctypes.string_at(wav, numsamples * 2))
        return 1 if self._abort.is_set() else 0


_instance: _Espeak | None = None
_instance_lock = threading.Lock()


def _espeak() -> _Espeak:
    """The process-wide library instance, initialised on first use."""
    global _instance
    with _instance_lock:
        if _instance is None:
            _instance = _Espeak()
        return _instance


class EspeakEngine:
    """espeak-ng voice; `voice="auto"` picks `ru` for text with Cyrillic letters, else `en`.

    A synthesis may name another voice (any listed voice, `+variant`, or "auto"); it is checked and
    loaded before the first frame, so an unknown one raises VoiceError and speaks nothing.
    """

    name = "espeak"

    def __init__(self, table: Mapping[str, Any] | None = None, /, **settings: Any) -> None:
        settings = engine_settings(self.name, table, settings)
        self._espeak = _espeak()
        self._max_bytes = self._espeak.format.longest_frame(settings["max_frame_ms"])
        self.voice, self.rate = settings["voice"], settings["rate"]
        self.pitch, self.volume = settings["pitch"], settings["volume"]
        if self.voice != "auto":
            with self._espeak.lock:  # fail at construction, not on the first chunk
                self._espeak.set_voice(self._espeak.resolve(self.voice))

    def synthesize(self, text: str, should_stop: Callable[[], bool], voice: str = "") -> Iterator[PcmFrame]:
        """Holds the process-wide lock until exhausted or closed, so other syntheses wait."""
        if not text.strip():
            return
        name = self._espeak.resolve(self.voice_for(text, voice))
        with self._espeak.lock:
            self._espeak.set_voice(name)
            self._espeak.set_prosody(self.rate, self.pitch, self.volume)
            yield from self._espeak.stream(text, should_stop, self._max_bytes)

    def close(self) -> None:
        """Nothing per engine: the library stays loaded for the process's other engines."""

    def voice_for(self, text: str, voice: str = "") -> str:
        """The espeak voice that speaks `text`: `voice`, else the configured one; "auto" picks by script."""
        chosen = voice or self.voice
        if chosen != "auto":
            return chosen
        return "ru" if _CYRILLIC.search(text) else "en"
