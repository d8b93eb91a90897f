"""The player stage's pure core: the order replies and frames play in, what a cancel ends, and
where a cut falls: which chunk was sounding and how much of it was heard.

No backend, thread or clock: the shell passes in the time and what the backend reports
(played_ms), drives the backend, and publishes the playback events whose bodies are built here.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from ...protocol import Audio, Message, Playback, Request
from ...runtime.replies import Key, Recent, Replies, cancels
from ..audio import AudioFormat

STALL_S = 15.0
"""A reply whose next frame is this late is ended as stopped, so playback never wedges."""
SPEECH_MS_PER_CHAR = 60.0
"""Speech time per character of text (espeak-ng's default rate and most voices: 55-70 ms), to place
a cut in a chunk whose audio had not all come, until the reply's own whole chunks give its rate."""


def audio_format(audio: Audio) -> AudioFormat:
    return AudioFormat(audio.rate, audio.channels, audio.width)


def playback(event: str, chunk: int, path: str | None = None, final: bool = False, heard: float = 0.0,
             chars: int = 0, audio_ts: float = 0.0, audio_s: float = 0.0) -> Playback:
    """The body of a playback event; `stopped` always ends the reply, so it is always final."""
    return Playback(event=event, chunk=chunk, path=path or "", final=final or event == "stopped", heard=heard,
                    heard_chars=round(heard * chars), audio_ts=audio_ts, audio_s=audio_s)


@dataclass
class ReplyAudio:
    """The frames of one reply that are waiting to be played."""

    session: str
    id: str
    frames: deque[Message[Audio]] = field(default_factory=deque)

    @property
    def key(self) -> Key:
        return (self.session, self.id)


@dataclass(frozen=True)
class Wait:
    """No frame yet: wait for one until `until`, when the reply counts as stalled."""

    until: float


class Playlist:
    """The replies waiting, in the order their first frame came (one plays at a time: there is one
    speaker), the one playing, and the ones ended, whose late frames are dropped (`replies`, which
    bounds both), and the replies a front-end plays itself, whose frames are never played here."""

    def __init__(self) -> None:
        self.replies: Replies[ReplyAudio] = Replies()
        self.playing: Key | None = None
        self.stopping = False
        """The player is stopping: whatever plays is cut."""
        self.elsewhere: Recent[Key, None] = Recent()
        """Replies whose request said playback "client", the newest ones only: their audio comes long
        after the request, so the oldest are long past."""

    def request(self, message: Message[Request]) -> None:
        """Note where the reply plays: a reply the client plays gets no sound and no playback events
        here (its front-end reports them). A reply whose request the player never saw plays here."""
        if message.body.playback == "client":
            self.elsewhere[(message.session, message.id)] = None

    def audio(self, message: Message[Audio]) -> bool:
        """Queue a frame (unless its reply ended, or plays on the client); False when its pcm is not
        whole samples."""
        audio = message.body
        key = (message.session, message.id)
        if key in self.elsewhere:
            return True
        if len(audio.pcm) % (audio.channels * audio.width):
            return False
        reply = self.replies.open(key, lambda: ReplyAudio(*key))
        if reply is not None:
            reply.frames.append(message)
        return True

    def cancel(self, session: str, id: str) -> tuple[list[ReplyAudio], bool]:
        """End the session's replies (`id` empty) or one reply, even one whose frames are yet to come.
        Returns the queued replies dropped, each of which gets its final `stopped` event now, and
        whether the playing one is among the ended, so the backend must be silenced."""
        ended = self.replies.cancel(session, id)
        playing = self.playing if self.playing is not None and cancels(self.playing, session, id) else None
        if playing is not None:
            self.replies.end(playing)  # even if it was pushed out of the replies in flight
        dropped = [reply for key, reply in ended if reply is not None and key != self.playing]
        return dropped, playing is not None

    def take(self) -> ReplyAudio:
        """The reply to play next (there must be one); it stays listed until done()."""
        key, reply = self.replies.items()[0]
        self.playing = key
        return reply

    def next_frame(self, reply: ReplyAudio, now: float, stall_at: float) -> Message[Audio] | Wait | None:
        """The playing reply's next frame; None once it is cut, or stalled (no frame by `stall_at`)."""
        if not reply.frames:
            if self.replies.is_ended(reply.key) or self.stopping or now >= stall_at:
                return None
            return Wait(stall_at)
        if self.replies.is_ended(reply.key):
            return None
        return reply.frames.popleft()

    def is_cut(self, reply: ReplyAudio) -> bool:
        """Whether the reply was cancelled (a playing reply is marked ended only then), or the player
        is stopping."""
        return self.replies.is_ended(reply.key) or self.stopping

    def done(self, reply: ReplyAudio) -> None:
        """The reply played out or was cut: nothing of it plays any more."""
        self.replies.end(reply.key)
        self.playing = None


@dataclass
class ChunkSpan:
    """Where a chunk's audio lies in the reply, in ms of audio written since the reply began;
    `end_ms` is None until its last frame is written."""

    chunk: int
    chars: int
    start_ms: float
    end_ms: float | None = None


class Timeline:
    """Where each chunk of one reply lies in the audio written to the backend, so that what the
    backend reports as played tells, at a cut, which chunk was sounding and how much of it was heard."""

    def __init__(self) -> None:
        self.written_ms = 0.0
        self.spans: list[ChunkSpan] = []

    def frame(self, audio: Audio) -> bool:
        """Take the next frame before it is written; True when it starts a chunk (its frame 0,
        unless that was lost)."""
        if self.spans and self.spans[-1].chunk == audio.chunk:
            return False
        self.spans.append(ChunkSpan(audio.chunk, audio.chars, self.written_ms))
        return True

    def wrote(self, ms: float) -> None:
        self.written_ms += ms

    def chunk_ended(self) -> None:
        """The current chunk's last frame is written."""
        self.spans[-1].end_ms = self.written_ms

    def cut(self, played_ms: float, waiting: Iterable[Audio]) -> tuple[ChunkSpan | None, float]:
        """The chunk that was sounding when the reply stopped (the first one if none of the audio
        played; None if no chunk started) and the fraction of it heard. The current chunk's frames
        that came but were not written (among `waiting`) count toward its length; if its last frame
        never came, the length is at least its text spoken at the reply's rate, so a chunk cut while
        it was still being synthesised is not taken as whole."""
        current = self.spans[-1].chunk if self.spans else -1
        queued = [frame for frame in waiting if frame.chunk == current]
        queued_ms = sum(audio_format(frame).duration_ms(len(frame.pcm)) for frame in queued)
        sounding = next((span for span in reversed(self.spans) if span.start_ms < played_ms), None)
        if sounding is None:
            return (self.spans[0] if self.spans else None), 0.0
        end = sounding.end_ms
        if end is None:
            end = self.written_ms + queued_ms
            if not any(frame.last for frame in queued):
                end = max(end, sounding.start_ms + sounding.chars * self._ms_per_char())
        if end <= sounding.start_ms:  # a chunk without audio, played past
            return sounding, 1.0
        return sounding, min(1.0, (played_ms - sounding.start_ms) / (end - sounding.start_ms))

    def stopped(self, played_ms: float, waiting: Iterable[Audio], path: str | None,
                audio_s: float) -> Playback:
        """The final event of a cut reply, about the chunk that was sounding: `finished` events run
        ahead of the sound by what the backend holds, so the cut may lie in an earlier chunk than the
        last one started."""
        span, heard = self.cut(played_ms, waiting)
        return playback("stopped", span.chunk if span else -1, path, heard=heard, chars=span.chars if span else 0,
                        audio_s=audio_s)

    def _ms_per_char(self) -> float:
        """The reply's speech rate over its whole chunks, else SPEECH_MS_PER_CHAR."""
        whole = [(span.chars, span.end_ms - span.start_ms) for span in self.spans if span.end_ms is not None]
        chars = sum(chars for chars, _ in whole)
        audio_ms = sum(ms for _, ms in whole)
        return audio_ms / chars if chars and audio_ms else SPEECH_MS_PER_CHAR
