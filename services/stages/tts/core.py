"""The tts stage's pure core: which chunk is spoken next, what a cancel drops, the voice of each
reply, and how a chunk's frames are numbered with exactly one marked `last`.

No engine, thread or socket: the shell synthesises, publishes the bodies built here, and asks
whether a chunk was cancelled between frames.
"""

from __future__ import annotations

from collections import deque

from ...protocol import Audio, Chunk, Message, Request
from ...runtime.replies import Key, Replies, cancels
from ..audio import AudioFormat, PcmFrame

SILENT_FORMAT = AudioFormat(rate=22050, channels=1, sample_width=2)
"""The format of the empty `last` frame of a chunk that had no audio."""


def reply_of(message: Message[Chunk] | Message[Request]) -> Key:
    return (message.session, message.id)


class SpeechQueue:
    """The chunks waiting for synthesis in the order they came (so each session's order is kept),
    and the replies: those in flight, each holding the voice its request chose ("" for the
    configured one), and those ended (cancelled, or their final chunk spoken), whose late chunks
    are not spoken. Both are bounded (`Replies`): at most the newest 4096 of each."""

    def __init__(self) -> None:
        self.chunks: deque[Message[Chunk]] = deque()
        self.replies: Replies[str] = Replies()

    def request(self, request: Message[Request]) -> None:
        """Only requests that choose a voice take memory, and the oldest go first past the limit."""
        key = reply_of(request)
        if request.body.voice and not self.replies.is_ended(key):
            self.replies.live[key] = request.body.voice

    def chunk(self, chunk: Message[Chunk]) -> None:
        """Queue a chunk, unless its reply ended: a late chunk of a cancelled reply is never spoken."""
        if self.replies.open(reply_of(chunk), str) is not None:
            self.chunks.append(chunk)

    def cancel(self, session: str, id: str) -> None:
        """Drop the queued chunks of the session (or of one reply); the one being spoken stops at
        its next frame, since is_cancelled() now says so."""
        self.replies.cancel(session, id)
        self.chunks = deque(chunk for chunk in self.chunks if not cancels(reply_of(chunk), session, id))

    def is_cancelled(self, chunk: Message[Chunk]) -> bool:
        return self.replies.is_ended(reply_of(chunk))

    def voice(self, chunk: Message[Chunk]) -> str:
        """The voice the chunk's request chose; "" for the configured one."""
        return self.replies.get(reply_of(chunk)) or ""

    def refuse_voice(self, chunk: Message[Chunk]) -> None:
        """The engine refused the reply's voice: its later chunks go straight to the configured one."""
        if reply_of(chunk) in self.replies:
            self.replies.live[reply_of(chunk)] = ""

    def spoken(self, chunk: Message[Chunk]) -> None:
        """The chunk's last frame went out: after a reply's final chunk the reply is over, so it
        leaves the replies in flight and memory stays flat."""
        if chunk.body.final:
            self.replies.end(reply_of(chunk))


class FrameNumbers:
    """Numbers one chunk's frames and marks the last: each frame is held until the next one comes
    (or the engine ends), since only then is it known whether it is the last.  A chunk without audio
    still ends with one empty `last` frame, so the player never waits for a lost end."""

    def __init__(self, chunk: Chunk) -> None:
        self.chunk = chunk
        self.number = 0
        self.held: PcmFrame | None = None

    def push(self, frame: PcmFrame) -> Audio | None:
        """Take the engine's next frame; returns the audio body of the frame it releases, if any."""
        held, self.held = self.held, frame
        if held is None:
            return None
        self.number += 1
        return self._body(self.number - 1, held, last=False)

    def finish(self) -> Audio:
        """The engine ended: the audio body of the chunk's last frame."""
        return self._body(self.number, self.held or PcmFrame(b"", SILENT_FORMAT), last=True)

    def _body(self, number: int, frame: PcmFrame, last: bool) -> Audio:
        return Audio(chunk=self.chunk.index, frame=number, rate=frame.format.rate, channels=frame.format.channels,
                     width=frame.format.sample_width, pcm=frame.pcm, last=last, final=self.chunk.final,
                     chars=len(self.chunk.text))
