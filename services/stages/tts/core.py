"""The tts stage's pure core: which chunk is spoken next, what a cancel drops, the voice of each
reply, and how a chunk's frames are numbered with exactly one marked `last`.

No engine, thread or socket: the shell synthesises, publishes the bodies built here, and asks
whether a chunk was cancelled between frames.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict, deque
from typing import Any

from ..audio import AudioFormat, PcmFrame
from ...protocol import Message

CANCELLED_MEMORY = 4096
"""Cancelled replies remembered, so that their late chunks are not spoken."""
VOICE_MEMORY = 4096
"""Voices remembered at most; the oldest go first."""
SILENT_FORMAT = AudioFormat(rate=22050, channels=1, sample_width=2)
"""The format of the empty `last` frame of a chunk that had no audio."""

Reply = tuple[str, str]


class SpeechQueue:
    """The chunks waiting for synthesis in the order they came (so each session's order is kept),
    the replies cancelled, the replies each session has in flight, and the voices requests chose."""

    def __init__(self) -> None:
        self.chunks: deque[Message] = deque()
        self.cancelled: OrderedDict[Reply, None] = OrderedDict()
        self.known: defaultdict[str, set[str]] = defaultdict(set)
        self.voices: OrderedDict[Reply, str] = OrderedDict()

    def request(self, request: Message) -> None:
        """Only requests that choose a voice take memory, and the oldest go first past VOICE_MEMORY."""
        if request["voice"]:
            self.voices[(request.session, request.id)] = request["voice"]
            while len(self.voices) > VOICE_MEMORY:
                self.voices.popitem(last=False)

    def chunk(self, chunk: Message) -> None:
        self.known[chunk.session].add(chunk.id)
        self.chunks.append(chunk)

    def cancel(self, session: str, id: str) -> None:
        """Drop the queued chunks of the session (or of one reply); the one being spoken stops at
        its next frame, since is_cancelled() now says so."""
        ids = {id} if id else self.known.pop(session, set())
        for reply in ids:
            self.cancelled[(session, reply)] = None
            self.voices.pop((session, reply), None)
        while len(self.cancelled) > CANCELLED_MEMORY:
            self.cancelled.popitem(last=False)
        self.chunks = deque(chunk for chunk in self.chunks if not self.is_cancelled(chunk))

    def is_cancelled(self, message: Message) -> bool:
        return (message.session, message.id) in self.cancelled

    def voice(self, chunk: Message) -> str:
        """The voice the chunk's request chose; "" for the configured one."""
        return self.voices.get((chunk.session, chunk.id), "")

    def refuse_voice(self, chunk: Message) -> None:
        """The engine refused the reply's voice: its later chunks go straight to the configured one."""
        self.voices.pop((chunk.session, chunk.id), None)

    def spoken(self, chunk: Message) -> None:
        """The chunk's last frame went out: after a reply's final chunk, forget the reply, and a session
        with none left, so memory stays flat."""
        if not chunk["final"]:
            return
        replies = self.known.get(chunk.session, set())
        replies.discard(chunk.id)
        if not replies:
            self.known.pop(chunk.session, None)
        self.voices.pop((chunk.session, chunk.id), None)


class FrameNumbers:
    """Numbers one chunk's frames and marks the last: each frame is held until the next one comes
    (or the engine ends), since only then is it known whether it is the last.  A chunk without audio
    still ends with one empty `last` frame, so the player never waits for a lost end."""

    def __init__(self, chunk: Message) -> None:
        self.chunk = chunk
        self.number = 0
        self.held: PcmFrame | None = None

    def push(self, frame: PcmFrame) -> dict[str, Any] | None:
        """Take the engine's next frame; returns the audio body of the frame it releases, if any."""
        held, self.held = self.held, frame
        if held is None:
            return None
        self.number += 1
        return self._body(self.number - 1, held, last=False)

    def finish(self) -> dict[str, Any]:
        """The engine ended: the audio body of the chunk's last frame."""
        return self._body(self.number, self.held or PcmFrame(b"", SILENT_FORMAT), last=True)

    def _body(self, number: int, frame: PcmFrame, last: bool) -> dict[str, Any]:
        return {"chunk": self.chunk["index"], "frame": number, "rate": frame.format.rate,
                "channels": frame.format.channels, "width": frame.format.sample_width, "pcm": frame.pcm,
                "last": last, "final": self.chunk["final"], "chars": len(self.chunk["text"])}
