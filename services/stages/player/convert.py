"""PCM format conversion for the player: sample width, channel count and rate, frame by frame.

Pure Python (audioop is gone in Python 3.13): widths are converted by moving bytes, which runs in
C, and only mixing and resampling touch samples one by one. Samples are little-endian and signed,
except width 1, which is unsigned as in WAV and ALSA's U8. The resampler interpolates linearly and
carries its position and the last sample across frames, so a reply converted frame by frame equals
the reply converted in one piece: frame boundaries add no clicks.
"""

from __future__ import annotations

from array import array
from math import gcd

from ..audio import AudioFormat

_FLIP_SIGN = bytes(value ^ 0x80 for value in range(256))
"""Maps unsigned 8-bit samples to signed ones and back."""


def _to_int32(pcm: bytes, width: int) -> array:
    """Samples scaled to 32 bits: each sample's bytes become the top bytes of an int32."""
    if width == 1:
        pcm = pcm.translate(_FLIP_SIGN)
    wide = bytearray(len(pcm) // width * 4)
    for byte in range(width):
        wide[4 - width + byte::4] = pcm[byte::width]
    return array("i", wide)


def _from_int32(samples: array, width: int) -> bytes:
    """Keeps the top `width` bytes of each sample: the inverse of _to_int32, rounding down."""
    wide = samples.tobytes()
    pcm = bytearray(len(samples) * width)
    for byte in range(width):
        pcm[byte::width] = wide[4 - width + byte::4]
    return bytes(pcm.translate(_FLIP_SIGN)) if width == 1 else bytes(pcm)


def _remix(samples: array, source: int, target: int) -> array:
    """To one channel: the average of all; otherwise target channel c plays source channel c mod source."""
    if source == target:
        return samples
    channels = [samples[c::source] for c in range(source)]
    if target == 1:
        return array("i", [sum(frame) // source for frame in zip(*channels, strict=True)])
    mixed = array("i", bytes(len(channels[0]) * target * 4))
    for c in range(target):
        mixed[c::target] = channels[c % source]
    return mixed


class _Resampler:
    """Linear interpolation between rates, continuous across calls.

    Output sample k sits at input time k·source/target. Positions are kept as integers in units of
    1/target input samples, so no rounding drifts over a long reply; flush() holds the last sample
    to the end, so n input samples become exactly ceil(n·target/source) output samples.
    """

    def __init__(self, source: int, target: int, channels: int) -> None:
        common = gcd(source, target)
        self._step, self._unit = source // common, target // common
        self._channels = channels
        self._position = 0
        """The next output sample's position, relative to the first sample of `_tail`."""
        self._tail: list[array] = [array("i") for _ in range(channels)]
        """The last input sample of each channel: the left end of the next interpolation."""

    def run(self, samples: array) -> array:
        signals = [self._tail[c] + samples[c::self._channels] for c in range(self._channels)]
        if not signals[0]:
            return array("i")
        end = (len(signals[0]) - 1) * self._unit
        positions = range(self._position, end, self._step)
        self._position += len(positions) * self._step - end
        self._tail = [signal[-1:] for signal in signals]
        return self._interleave([self._interpolate(signal, positions) for signal in signals])

    def flush(self) -> array:
        """The samples between the last input sample and the end of the input, holding its value."""
        if not self._tail[0]:
            return array("i")
        count = len(range(self._position, self._unit, self._step))
        self._position, tails, self._tail = 0, self._tail, [array("i") for _ in range(self._channels)]
        return self._interleave([tail * count for tail in tails])

    def _interpolate(self, signal: array, positions: range) -> array:
        unit = self._unit
        return array("i", [signal[p // unit] + (signal[p // unit + 1] - signal[p // unit]) * (p % unit) // unit
                           for p in positions])

    def _interleave(self, channels: list[array]) -> array:
        if self._channels == 1:
            return channels[0]
        frames = array("i", bytes(len(channels[0]) * self._channels * 4))
        for c, signal in enumerate(channels):
            frames[c::self._channels] = signal
        return frames


class Converter:
    """Converts one stream of PCM from `source` to `target`; feed it a reply's frames in order."""

    def __init__(self, source: AudioFormat, target: AudioFormat) -> None:
        self.source, self.target = source, target
        resample = source.rate != target.rate
        self._channels = min(source.channels, target.channels) if resample else target.channels
        """The channel count in the middle: the resampler works on the fewest channels."""
        self._resampler = _Resampler(source.rate, target.rate, self._channels) if resample else None

    def convert(self, pcm: bytes) -> bytes:
        """`pcm` (whole sample frames of `source`) as `target`."""
        if self.source == self.target:
            return pcm
        samples = _remix(_to_int32(pcm, self.source.sample_width), self.source.channels, self._channels)
        return self._finish(self._resampler.run(samples) if self._resampler else samples)

    def flush(self) -> bytes:
        """The end of the stream: what the resampler still holds. Call once, after the last frame."""
        return self._finish(self._resampler.flush()) if self._resampler else b""

    def _finish(self, samples: array) -> bytes:
        return _from_int32(_remix(samples, self._channels, self.target.channels), self.target.sample_width)
