"""OpenAI-compatible `/v1/audio/speech` through the `openai` library: OpenAI, Kokoro-FastAPI,
openedai-speech, AllTalk.

The response is streamed and cut into frames as its bytes arrive, so the first audio of a chunk
plays while the server is still synthesising the rest. `pcm` is headerless 16-bit mono at
`sample_rate` (24 kHz for OpenAI); `wav` carries its own format in a header, and a streamed WAV
leaves the data size at 0 or 0xFFFFFFFF because the length is not known yet. Stopping leaves the
response's context, which closes the connection, so the server sees the hang-up and stops.

A synthesis may name another `voice` (the API's parameter). Only the server knows its voices, so a
client error (400, 404, 422) to a request with a chosen voice is taken as the voice's refusal and
raised as VoiceError, which lets the caller retry with the configured voice: if that fails too, the
problem was not the voice.

Keys come from services/secrets.py, as a profile's do: `api_key_file` (mode 0600), then
`api_key_env` and `reserve_key_envs`. A key refused (401, 402, 403) or throttled (429) before any
audio gives way to the next, which then stays in use. A refusal's code comes from the table every
HTTP provider reads (services/stages/llm/providers/base.py).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import openai

from ....secrets import KeyRing, read_key, scrub
from ...audio import AudioFormat, PcmFrame
from ...llm.providers.base import ROTATING_CODES, status_code
from . import engine_settings
from .base import VoiceError

_STREAMED_SIZES = (0, 0xFFFFFFFF)
_MAX_HEADER = 64 * 1024
_PCM_TAGS = (1, 0xFFFE)  # WAVE_FORMAT_PCM, and WAVE_FORMAT_EXTENSIBLE whose subformat is checked too
_VOICE_REFUSALS = (400, 404, 422)  # how OpenAI, Kokoro-FastAPI and openedai-speech answer an unknown voice


class SpeechError(RuntimeError):
    """The server refused or broke off; the text says what happened and never holds the key."""


class _RawPcm:
    """`pcm` responses: the format is configured, every byte is audio."""

    def __init__(self, fmt: AudioFormat) -> None:
        self.format: AudioFormat | None = fmt

    def feed(self, data: bytes) -> bytes:
        return data


class _StreamedWav:
    """`wav` responses, read as they arrive: the header gives the format, then the data chunk is audio."""

    def __init__(self) -> None:
        self.format: AudioFormat | None = None
        self._header = bytearray()
        self._left: int | None = None
        """Data bytes still to come; None: until the stream ends."""

    def feed(self, data: bytes) -> bytes:
        """The audio in `data`; nothing until the header is complete."""
        if self.format is None:
            self._header += data
            data = self._parse_header()
        if self._left is None:
            return data
        data = data[:self._left]
        self._left -= len(data)
        return data

    def _parse_header(self) -> bytes:
        """Returns the audio after the header once it is complete; raises on anything but PCM WAV."""
        header = bytes(self._header)
        if len(header) >= 12 and (header[:4] != b"RIFF" or header[8:12] != b"WAVE"):
            raise SpeechError("the wav response does not start with a RIFF/WAVE header")
        offset, fmt = 12, None
        while offset + 8 <= len(header):
            chunk_id, size = header[offset:offset + 4], struct.unpack_from("<I", header, offset + 4)[0]
            body = offset + 8
            if chunk_id == b"data":
                if fmt is None:
                    raise SpeechError("the wav response has its data before its fmt chunk")
                self.format, self._left = fmt, None if size in _STREAMED_SIZES else size
                return header[body:]
            if body + size > len(header):
                break
            if chunk_id == b"fmt ":
                fmt = _wav_format(header[body:body + size])
            offset = body + size + size % 2  # chunks are padded to even sizes
        if len(header) > _MAX_HEADER:
            raise SpeechError(f"the wav response has no data chunk in its first {_MAX_HEADER} bytes")
        return b""


def _wav_format(fmt: bytes) -> AudioFormat:
    if len(fmt) < 16:
        raise SpeechError("the wav response's fmt chunk is too short")
    tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", fmt)
    if tag == 0xFFFE and len(fmt) >= 26:
        tag = struct.unpack_from("<H", fmt, 24)[0]  # the subformat GUID starts with the format tag
    if tag not in _PCM_TAGS or bits % 8 or not 8 <= bits <= 32:
        raise SpeechError(f"the wav response is not integer PCM (format tag {tag}, {bits} bits); "
                          f"use response_format = \"pcm\"")
    try:
        return AudioFormat(rate=rate, channels=channels, sample_width=bits // 8)
    except ValueError:
        raise SpeechError(f"the wav response has an impossible format: {rate} Hz, {channels} channels") from None


class OpenAISpeechEngine:
    name = "openai-speech"

    def __init__(self, table: Mapping[str, Any] | None = None, /, **settings: Any) -> None:
        """A key file looser than 0600 is refused here, before the first chunk."""
        settings = engine_settings(self.name, table, settings)
        self.base_url = settings["base_url"] or "https://api.openai.com/v1"
        self.model, self.voice, self.speed = settings["model"], settings["voice"], settings["speed"]
        self.keys = KeyRing(read_key(settings, table=f"tts.{self.name}"))
        places = [settings["api_key_file"]] if settings["api_key_file"] else []
        places += [f"${name}" for name in (settings["api_key_env"], *settings["reserve_key_envs"]) if name]
        self.key_places = ", ".join(places)
        """Where the keys come from, for the hint on a refusal."""
        self.response_format = settings["response_format"]
        self.pcm_format = AudioFormat(rate=settings["sample_rate"], channels=1, sample_width=2)
        self.timeout_s = settings["timeout_s"]
        self.max_frame_ms = settings["max_frame_ms"]
        self._clients: dict[str, openai.OpenAI] = {}

    def synthesize(self, text: str, should_stop: Callable[[], bool], voice: str = "") -> Iterator[PcmFrame]:
        if not text.strip() or should_stop():
            return
        for attempt in range(len(self.keys.keys)):
            key = self.keys.current
            try:
                yield from self._speak(key, text, voice, should_stop)
                return
            except openai.APIStatusError as exc:  # raised before the first frame: the body was not read yet
                if voice and exc.status_code in _VOICE_REFUSALS:
                    refusal = f"{self.base_url} refused voice {voice!r} ({exc.status_code}: {exc.message})"
                    raise VoiceError(scrub(f"{refusal}; the server's documentation lists its voices", key)) from None
                code = status_code(exc.status_code)
                if code in ROTATING_CODES and attempt + 1 < len(self.keys.keys):
                    self.keys.rotate()
                    continue
                raise SpeechError(scrub(f"{self.base_url} answered {exc.status_code}: {exc.message}"
                                        f"{self._hint(code)}", key)) from None

    def _speak(self, key: str, text: str, voice: str, should_stop: Callable[[], bool]) -> Iterator[PcmFrame]:
        """One request with `key`; every failure but a refusal (the caller's to judge) is a SpeechError."""
        try:
            with self._client(key).audio.speech.with_streaming_response.create(
                    model=self.model, voice=voice or self.voice, input=text, response_format=self.response_format,
                    speed=self.speed) as response:
                yield from self._frames(response, should_stop)
        except openai.APIStatusError:
            raise
        except openai.APITimeoutError:
            raise SpeechError(f"{self.base_url} did not answer within {self.timeout_s:g} s") from None
        except openai.APIConnectionError as exc:
            raise SpeechError(scrub(f"cannot reach {self.base_url}: {exc.__cause__ or exc}", key)) from None
        except SpeechError:
            raise
        except Exception as exc:  # the transport's own errors when the body breaks off
            raise SpeechError(scrub(f"the audio stream from {self.base_url} broke off: "
                                    f"{type(exc).__name__}: {exc}", key)) from None

    def _hint(self, code: str) -> str:
        if code == "auth":
            return f"; check the key in {self.key_places or 'api_key_env or api_key_file'}"
        if code == "billing":
            return "; the key's account needs credit or a payment method"
        return ""

    def _frames(self, response: Any, should_stop: Callable[[], bool]) -> Iterator[PcmFrame]:
        """Whole sample frames of at most max_frame_ms, from each read as it arrives."""
        content_type = response.headers.get("content-type", "")
        if content_type.startswith(("application/json", "text/")):
            raise SpeechError(f"{self.base_url} answered with {content_type}, not audio; "
                              f"is base_url an OpenAI-compatible speech API?")
        decoder = _RawPcm(self.pcm_format) if self.response_format == "pcm" else _StreamedWav()
        pending = b""
        for data in response.iter_bytes():
            if should_stop():
                return
            pcm = pending + decoder.feed(data)
            fmt = decoder.format
            if fmt is None:
                continue
            whole = len(pcm) - len(pcm) % fmt.block_align
            pending, step = pcm[whole:], fmt.longest_frame(self.max_frame_ms) or fmt.block_align
            for start in range(0, whole, step):
                yield PcmFrame(pcm[start:min(start + step, whole)], fmt)

    def _client(self, key: str) -> openai.OpenAI:
        """One client per key (a rotated key takes effect on the next chunk); connections are reused."""
        if key not in self._clients:
            self._clients[key] = openai.OpenAI(base_url=self.base_url, api_key=key or "unset", max_retries=0,
                                               timeout=openai.Timeout(self.timeout_s))
        return self._clients[key]

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()
