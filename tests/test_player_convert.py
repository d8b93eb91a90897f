"""The player's PCM converter: exact lengths, lossless round trips, and no seams between frames."""

from __future__ import annotations

import itertools
import math
from array import array

from hypothesis import given, settings
from hypothesis import strategies as st

from voxpipe.stages.audio import AudioFormat
from voxpipe.stages.player.convert import Converter

RATES = st.sampled_from([8000, 11025, 16000, 22050, 24000, 44100, 48000]) | st.integers(1000, 96000)
WIDTHS = st.integers(1, 4)
CHANNELS = st.integers(1, 3)


def formats(rate=RATES, channels=CHANNELS, width=WIDTHS) -> st.SearchStrategy[AudioFormat]:
    return st.builds(AudioFormat, rate=rate, channels=channels, sample_width=width)


@st.composite
def pcm_of(draw, fmt: AudioFormat, max_frames: int = 300) -> bytes:
    return draw(st.binary(max_size=max_frames * fmt.block_align).map(
        lambda data: data[:len(data) - len(data) % fmt.block_align]))


@st.composite
def splits(draw, data: bytes, block: int) -> list[bytes]:
    """`data` cut at random sample-frame boundaries."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data) // block), max_size=6)))
    edges = [0, *(cut * block for cut in cuts), len(data)]
    return [data[start:end] for start, end in itertools.pairwise(edges)]


def run(converter: Converter, pieces: list[bytes]) -> bytes:
    return b"".join(converter.convert(piece) for piece in pieces) + converter.flush()


def s16(values: list[int]) -> bytes:
    return array("h", values).tobytes()


@settings(max_examples=150, deadline=None)
@given(st.data(), formats(), formats())
def test_length_is_exact_and_frame_cuts_change_nothing(data, source, target):
    pcm = data.draw(pcm_of(source))
    whole = run(Converter(source, target), [pcm])
    frames = len(pcm) // source.block_align
    assert len(whole) == math.ceil(frames * target.rate / source.rate) * target.block_align
    assert run(Converter(source, target), data.draw(splits(pcm, source.block_align))) == whole


@settings(max_examples=100, deadline=None)
@given(st.data(), RATES, WIDTHS, WIDTHS, CHANNELS)
def test_wider_samples_and_more_channels_round_trip_losslessly(data, rate, width, extra, channels):
    """Widening keeps every bit and copying a mono channel keeps every sample."""
    mono = AudioFormat(rate, 1, width)
    wide = AudioFormat(rate, channels, max(width, extra))
    pcm = data.draw(pcm_of(mono))
    assert Converter(wide, mono).convert(Converter(mono, wide).convert(pcm)) == pcm


@settings(max_examples=100, deadline=None)
@given(st.data(), RATES, st.integers(1, 4))
def test_upsampling_by_an_integer_factor_keeps_the_original_samples(data, rate, factor):
    source, target = AudioFormat(rate, 1, 2), AudioFormat(rate * factor, 1, 2)
    pcm = data.draw(pcm_of(source))
    up = run(Converter(source, target), [pcm])
    assert array("h", up)[::factor] == array("h", pcm)
    assert run(Converter(target, source), [up]) == pcm


def test_linear_interpolation_between_samples():
    up = Converter(AudioFormat(24000, 1, 2), AudioFormat(48000, 1, 2))
    assert array("h", up.convert(s16([0, 100, -100])) + up.flush()).tolist() == [0, 50, 100, 0, -100, -100]


def test_a_ramp_stays_on_the_ramp_across_frames():
    """No click at frame boundaries: a straight line resampled in pieces is still a straight line."""
    converter = Converter(AudioFormat(22050, 1, 2), AudioFormat(44100, 1, 2))
    ramp = [10 * i for i in range(200)]
    out = array("h", b"".join(converter.convert(s16(ramp[i:i + 7])) for i in range(0, 200, 7)))
    assert out.tolist() == [5 * i for i in range(len(out))]


def test_width_and_sign_conventions():
    """Width 1 is unsigned (as in WAV), the others signed little-endian; narrowing rounds down."""
    to_u8 = Converter(AudioFormat(8000, 1, 2), AudioFormat(8000, 1, 1))
    assert list(to_u8.convert(s16([0, 32767, -32768, 255, -1]))) == [128, 255, 0, 128, 127]
    to_s24 = Converter(AudioFormat(8000, 1, 1), AudioFormat(8000, 1, 3))
    assert to_s24.convert(bytes([128, 255, 0])) == bytes.fromhex("000000 00007f 000080")


def test_channels_downmix_to_the_average_and_upmix_by_copying():
    to_mono = Converter(AudioFormat(8000, 2, 2), AudioFormat(8000, 1, 2))
    assert array("h", to_mono.convert(s16([100, 300, -100, -300]))).tolist() == [200, -200]
    to_stereo = Converter(AudioFormat(8000, 1, 2), AudioFormat(16000, 2, 2))
    assert array("h", to_stereo.convert(s16([0, 100])) + to_stereo.flush()).tolist() == [0, 0, 50, 50, 100, 100,
                                                                                         100, 100]
