"""The tts stage shell: speakable chunks in, PCM audio frames out.

Synthesis runs on one worker thread (engines such as espeak-ng allow one
instance per process), so the main loop keeps taking chunks and cancels while a
long chunk is being synthesised.  Every chunk ends with exactly one frame marked
`last`, even when synthesis fails, so the player never waits for a lost end.
"""

from __future__ import annotations

import collections
import threading
from typing import Iterator

from ..audio import AudioFormat, PcmFrame
from ..protocol import Message
from ..runtime import Stage
from .engines import create_engine
from .normalize import spell_numbers

_CANCELLED_MEMORY = 4096
SILENT_FORMAT = AudioFormat(rate=22050, channels=1, sample_width=2)


class TtsStage(Stage):
    name = "tts"
    kinds = ("chunk", "cancel")
    sharded = True

    def prepare(self) -> None:
        tts = self.config["tts"]
        self.engine = create_engine(tts["engine"], tts.get(tts["engine"], {}))
        self.normalize = tuple(tts.get(tts["engine"], {}).get("normalize_numbers", ()))
        self.queue: collections.deque[Message] = collections.deque()
        self.cancelled: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()
        self.known: dict[str, set[str]] = collections.defaultdict(set)
        self.wake = threading.Condition()
        self.stopping = False

    def started(self) -> None:
        self.worker = threading.Thread(target=self._work, name="tts-synth", daemon=True)
        self.worker.start()

    def handle(self, message: Message) -> None:
        with self.wake:
            if message.kind == "chunk":
                self.known[message.session].add(message.id)
                self.queue.append(message)
            else:
                self._cancel(message.session, message.id)
            self.wake.notify()

    def _cancel(self, session: str, id: str) -> None:
        """Drop queued chunks of the session (or one reply) and stop the current synthesis."""
        ids = {id} if id else self.known.pop(session, set())
        for reply in ids:
            self.cancelled[(session, reply)] = None
        while len(self.cancelled) > _CANCELLED_MEMORY:
            self.cancelled.popitem(last=False)
        self.queue = collections.deque(chunk for chunk in self.queue if not self._is_cancelled(chunk))

    def _is_cancelled(self, message: Message) -> bool:
        return (message.session, message.id) in self.cancelled

    def _work(self) -> None:
        while True:
            with self.wake:
                while not self.queue and not self.stopping:
                    self.wake.wait()
                if self.stopping:
                    return
                chunk = self.queue.popleft()
            if not self._is_cancelled(chunk):
                self._speak(chunk)

    def _speak(self, chunk: Message) -> None:
        frames = self._frames(chunk)
        previous: PcmFrame | None = None
        number = 0
        for frame in frames:
            if self._is_cancelled(chunk):
                return
            if previous is not None:
                self._publish(chunk, number, previous, last=False)
                number += 1
            previous = frame
        if self._is_cancelled(chunk):
            return
        self._publish(chunk, number, previous, last=True)
        if chunk["final"]:
            with self.wake:  # forget finished replies, and sessions with none left, so memory stays flat
                replies = self.known.get(chunk.session, set())
                replies.discard(chunk.id)
                if not replies:
                    self.known.pop(chunk.session, None)

    def _frames(self, chunk: Message) -> Iterator[PcmFrame]:
        """The engine's frames; a failure is reported and ends the chunk early."""
        try:
            text = spell_numbers(chunk["text"], self.normalize) if self.normalize else chunk["text"]
            yield from self.engine.synthesize(text, lambda: self._is_cancelled(chunk) or self.stopping)
        except Exception as exc:  # an engine failure must not stop the next chunk
            self.log.exception("synthesis failed")
            self.bus.report("tts_failed", f"chunk {chunk['index']}: {type(exc).__name__}: {exc}",
                            chunk.session, chunk.id, "chunk")

    def _publish(self, chunk: Message, number: int, frame: PcmFrame | None, last: bool) -> None:
        """Send one frame; a chunk with no audio still sends an empty `last` frame."""
        frame = frame or PcmFrame(b"", SILENT_FORMAT)
        self.bus.publish("audio", chunk.session, chunk.id, chunk=chunk["index"], frame=number,
                         rate=frame.format.rate, channels=frame.format.channels,
                         width=frame.format.sample_width, pcm=frame.pcm, last=last, final=chunk["final"],
                         chars=len(chunk["text"]))

    def shutdown(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify_all()
        self.worker.join(5)
        self.engine.close()
