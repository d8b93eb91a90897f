"""Voice files for the mod: 44.1 kHz stereo s16le whatever the engine made, a canonical header, the pin.

The mod plays every byte of a file as interleaved int16 stereo at 44 100 Hz and peak-normalises over
all of them, header included (F1-F3, F5): these tests read the files that way too.
"""

from __future__ import annotations

import math
import struct
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voxpipe.frontends.game.wav import GAME_FORMAT, game_duration_s, silent_wav, to_game_wav
from voxpipe.stages.audio import AudioFormat
from voxpipe.stages.player.convert import Converter

RATES = [22050, 16000, 24000, 48000, 44100]


def header(data_bytes: int) -> bytes:
    """Written out field by field: RIFF size, fmt chunk of 16, PCM 1, 2 channels, 44100, 176400, 4, 16."""
    return (b"RIFF" + (36 + data_bytes).to_bytes(4, "little") + b"WAVE" + b"fmt " + bytes.fromhex("10000000")
            + bytes.fromhex("0100") + bytes.fromhex("0200") + bytes.fromhex("44ac0000") + bytes.fromhex("10b10200")
            + bytes.fromhex("0400") + bytes.fromhex("1000") + b"data" + data_bytes.to_bytes(4, "little"))


def samples(wav: bytes) -> array:
    """The data chunk as int16."""
    assert wav[:44] == header(len(wav) - 44)
    return array("h", wav[44:])


def as_the_mod_reads(wav: bytes) -> array:
    """Every byte pair of the file, header included (F2)."""
    return array("h", wav[:len(wav) // 2 * 2])


def test_the_header_is_canonical():
    assert header(0).hex() == ("524946462400000057415645666d7420" "100000000100020044ac000010b10200"
                               "040010006461746100000000")
    wav = to_game_wav([(bytes(8), GAME_FORMAT)], pin=False)
    assert wav == header(8) + bytes(8)
    assert struct.unpack("<4sI4s4sIHHIIHH4sI", wav[:44]) == (b"RIFF", 44, b"WAVE", b"fmt ", 16, 1, 2, 44100, 176400,
                                                             4, 16, b"data", 8)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(RATES), st.integers(1, 2), st.integers(1, 4), st.integers(0, 400), st.data())
def test_any_format_becomes_the_converter_output_at_44100_stereo(rate, channels, width, frames, data):
    fmt = AudioFormat(rate, channels, width)
    pcm = data.draw(st.binary(min_size=frames * fmt.block_align, max_size=frames * fmt.block_align))
    wav = to_game_wav([(pcm, fmt)], pin=False)
    out = samples(wav)
    assert len(out) * 2 == math.ceil(frames * 44100 / rate) * 4  # the Converter's contract, whole stereo frames
    converter = Converter(fmt, GAME_FORMAT)
    assert wav[44:] == converter.convert(pcm) + converter.flush()  # the player's converter, not another one
    if channels == 1:
        assert out[0::2] == out[1::2]  # mono is copied to both channels


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(RATES), st.integers(1, 2), st.integers(1, 300), st.data())
def test_the_pin_is_the_first_left_sample_and_nothing_else_changes(rate, channels, frames, data):
    fmt = AudioFormat(rate, channels, 2)
    pcm = data.draw(st.binary(min_size=frames * fmt.block_align, max_size=frames * fmt.block_align))
    plain, pinned = to_game_wav([(pcm, fmt)], pin=False), to_game_wav([(pcm, fmt)])
    assert samples(pinned)[0] == 32767
    assert pinned[:44] == plain[:44] and pinned[46:] == plain[46:]


def test_the_pin_makes_a_quiet_file_peak_at_full_scale_as_the_mod_measures_it():
    """F3: the mod divides by the peak of every word, header included; pinned, that is 32767."""
    quiet = array("h", [1000, -1000] * 2205).tobytes()
    wav = to_game_wav([(quiet, AudioFormat(22050, 1, 2))])
    words = as_the_mod_reads(wav)
    assert max(abs(word) for word in words) == 32767
    assert max(abs(word) for word in words[22 + 1:]) == 1000  # the rest is the audio, untouched


def test_a_mono_22050_reply_doubles_exactly_with_left_equal_right():
    """espeak-ng's format: an exact 2× upsample (design §6.1)."""
    pcm = array("h", [0, 100, -100]).tobytes()
    out = samples(to_game_wav([(pcm, AudioFormat(22050, 1, 2))], pin=False))
    assert out.tolist() == [0, 0, 50, 50, 100, 100, 0, 0, -100, -100, -100, -100]


def test_format_changes_flush_and_restart_and_one_format_in_pieces_has_no_seam():
    a, b = AudioFormat(22050, 1, 2), AudioFormat(16000, 2, 4)
    pa, pb = bytes(range(200)) * 3, bytes(range(240)) * 4  # 300 frames of a, 120 of b
    wav = to_game_wav([(pa, a), (pb, b)], pin=False)
    assert len(wav) - 44 == (math.ceil(300 * 44100 / 22050) + math.ceil(120 * 44100 / 16000)) * 4
    assert to_game_wav([(pa[:100], a), (pa[100:], a)], pin=False) == to_game_wav([(pa, a)], pin=False)


def test_empty_input_and_partial_frames():
    assert to_game_wav([], pin=False) == header(0)
    assert to_game_wav([]) == header(4) + bytes.fromhex("ff7f0000")  # a pinned file has its pinned frame
    with pytest.raises(ValueError, match="whole frames"):
        to_game_wav([(bytes(3), AudioFormat(16000, 1, 2))])


def test_silent_wav_is_the_pin_then_zeros():
    wav = silent_wav()
    data = samples(wav)
    assert len(data) == 2 * 2205  # 50 ms of 44.1 kHz stereo
    assert data[0] == 32767 and not any(data[1:])
    assert len(samples(silent_wav(200))) == 2 * 8820
    assert samples(silent_wav(0)).tolist() == [32767, 0]


def test_duration_is_what_the_mod_plays_header_included():
    assert game_duration_s(silent_wav()) == pytest.approx((8820 + 44) / 4 / 44100)
    assert game_duration_s(bytes(176400)) == 1.0
