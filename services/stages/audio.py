"""Audio types shared by the tts and player stages."""

from __future__ import annotations

from dataclasses import dataclass

from ..protocol.kinds import PCM_BYTES


@dataclass(frozen=True)
class AudioFormat:
    """Interleaved integer PCM: `sample_width` is the byte size of one sample of one channel."""

    rate: int
    channels: int
    sample_width: int

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.channels <= 0 or self.sample_width not in (1, 2, 3, 4):
            raise ValueError(f"invalid audio format {self}")

    @property
    def block_align(self) -> int:
        """Bytes per sample frame (one sample for every channel); PCM is cut only at these."""
        return self.channels * self.sample_width

    def frame_bytes(self, ms: float) -> int:
        """Byte count of `ms` milliseconds, rounded down to whole sample frames."""
        return int(self.rate * ms / 1000) * self.block_align

    def longest_frame(self, ms: float) -> int:
        """Bytes of the longest frame a tts engine sends: `ms` of audio, cut to the protocol's PCM limit
        for an `audio` message (whole sample frames), so no setting or format makes a frame the bus
        would refuse."""
        return min(self.frame_bytes(ms), PCM_BYTES // self.block_align * self.block_align)

    def duration_ms(self, nbytes: int) -> float:
        """Play time of `nbytes` of PCM in this format."""
        return nbytes / self.block_align * 1000 / self.rate


@dataclass(frozen=True)
class PcmFrame:
    """A piece of PCM with its format; never cuts a sample frame, so frames concatenate safely."""

    pcm: bytes
    format: AudioFormat

    def __post_init__(self) -> None:
        if len(self.pcm) % self.format.block_align:
            raise ValueError(
                f"{len(self.pcm)} bytes is not a whole number of {self.format.block_align}-byte sample frames"
            )

    @property
    def duration_ms(self) -> float:
        return self.format.duration_ms(len(self.pcm))
