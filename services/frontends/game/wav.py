"""The voice files the mod can play: PCM of any format → 44.1 kHz stereo s16le WAV bytes, level-pinned.

The mod reads a voice file's bytes without looking at the header: every byte pair is an int16 of
interleaved stereo at 44 100 Hz, the 44 header bytes included (F1, F2, F5). So a file must be exactly
that format, whatever the tts engine made (mono plays at double speed, other rates at the wrong
pitch: F8). The header is still a canonical one, so the file is a valid WAV for anything else.

The mod also peak-normalises each file over all its int16 words, the header's included (F3, F9), so
phrase files of one reply would come out at different loudness. The level pin (design §2.8) puts one
sample of +32767 in the first frame's left channel: the peak is then always full scale, the mod
divides by about 1, and each file plays at the engine's own level. That sample sits inside the
mod's 50 ms fade-in (F4, factor 22/4410 at float index 22), so it is a −46 dBFS click no one hears.
A header word can read as −32768, one step above the pin: a gain change of 0.003 %, nothing.

Pure: bytes in, bytes out. The conversion is the player's `Converter` (linear resampling, mono copied
to both channels), so the game hears what the player would have played.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from ...stages.audio import AudioFormat
from ...stages.player.convert import Converter

GAME_FORMAT = AudioFormat(44100, 2, 2)
"""What the mod plays every file as: AudioClip.Create(…, 2, 44100) of int16 words (F2, F5)."""
HEADER_BYTES = 44
PIN = struct.pack("<h", 32767)
"""The first frame's left sample (design §2.8)."""


def _header(data_bytes: int) -> bytes:
    """The canonical 44-byte header: RIFF/WAVE, a 16-byte PCM fmt chunk, then the data chunk."""
    rate, channels, width = GAME_FORMAT.rate, GAME_FORMAT.channels, GAME_FORMAT.sample_width
    return struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", HEADER_BYTES - 8 + data_bytes, b"WAVE", b"fmt ", 16, 1,
                       channels, rate, rate * GAME_FORMAT.block_align, GAME_FORMAT.block_align, width * 8,
                       b"data", data_bytes)


def _wav(data: bytearray, pin: bool) -> bytes:
    """`data` (whole GAME_FORMAT frames) as a WAV file; pinned files hold at least the pinned frame."""
    if pin:
        if not data:
            data = bytearray(GAME_FORMAT.block_align)
        data[:2] = PIN
    return _header(len(data)) + bytes(data)


def to_game_wav(pieces: Iterable[tuple[bytes, AudioFormat]], pin: bool = True) -> bytes:
    """One WAV file of `pieces` (PCM of whole sample frames, each with its format), in order.

    Each run of one format goes through one Converter, flushed when the format changes and at the
    end, so a run of n frames at rate r becomes exactly ceil(n·44100/r) frames (the Converter's
    contract) and a format change costs nothing but its own rounding. Raises ValueError for a piece
    that is not whole frames of its format (the caller's bug: the bus carries whole frames).
    """
    data = bytearray()
    converter: Converter | None = None
    for pcm, fmt in pieces:
        if len(pcm) % fmt.block_align:
            raise ValueError(f"{len(pcm)} bytes are not whole frames of {fmt}")
        if converter is None or converter.source != fmt:
            if converter is not None:
                data += converter.flush()
            converter = Converter(fmt, GAME_FORMAT)
        data += converter.convert(pcm)
    if converter is not None:
        data += converter.flush()
    return _wav(data, pin)


def silent_wav(ms: int = 50) -> bytes:
    """`ms` of silence with the pin: the voice of a phrase that has none (tags only, or tts failed).

    The link still sends a file so the mod's voice wait ends at once (design §2.1, §6.2); pinned, the
    mod's normalisation divides by 1 and the zeros stay zeros.
    """
    return _wav(bytearray(GAME_FORMAT.frame_bytes(ms)), pin=True)


def game_duration_s(data: bytes) -> float:
    """How long the mod plays `data`, a whole file: every byte as 44.1 kHz stereo int16 (F1, F2)."""
    return len(data) / GAME_FORMAT.block_align / GAME_FORMAT.rate
