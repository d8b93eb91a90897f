"""The tts stage shell: speakable chunks in, PCM audio frames out.

Synthesis runs on one worker thread (engines such as espeak-ng allow one
instance per process), so the main loop keeps taking chunks and cancels while a
long chunk is being synthesised.  Every chunk ends with exactly one frame marked
`last`, even when synthesis fails, so the player never waits for a lost end.

A request may choose the voice of its reply. Chunks do not carry it, so the stage also takes
`request`s and remembers the non-empty voices by (session, id) until the reply's final chunk is
spoken or the reply is cancelled, and at most the 4096 newest. Like chunks, requests of sessions
another shard owns never reach `handle`, so each shard keeps only its own sessions' voices. A
reply with no remembered voice speaks in the configured one; so does a reply whose voice the
engine refuses, after one `unknown_voice` error.
"""

from __future__ import annotations

import collections
import threading
from typing import Iterator

from ..audio import AudioFormat, PcmFrame
from ..protocol import Message
from ..runtime import Stage
from .engines import create_engine
from .engines.base import VoiceError
from .normalize import spell_numbers

_CANCELLED_MEMORY = 4096
_VOICE_MEMORY = 4096
SILENT_FORMAT = AudioFormat(rate=22050, channels=1, sample_width=2)


class TtsStage(Stage):
    name = "tts"
    kinds = ("request", "chunk", "cancel")
    sharded = True

    def prepare(self) -> None:
        tts = self.config["tts"]
        self.engine = create_engine(tts["engine"], tts.get(tts["engine"], {}))
        self.normalize = tuple(tts.get(tts["engine"], {}).get("normalize_numbers", ()))
        self.queue: collections.deque[Message] = collections.deque()
        self.cancelled: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()
        self.known: dict[str, set[str]] = collections.defaultdict(set)
        self.voices: collections.OrderedDict[tuple[str, str], str] = collections.OrderedDict()
        self.wake = threading.Condition()
        self.stopping = False

    def started(self) -> None:
        self.worker = threading.Thread(target=self._work, name="tts-synth", daemon=True)
        self.worker.start()

    def handle(self, message: Message) -> None:
        with self.wake:
            if message.kind == "request":
                self._remember_voice(message)
                return
            if message.kind == "chunk":
                self.known[message.session].add(message.id)
                self.queue.append(message)
            else:
                self._cancel(message.session, message.id)
            self.wake.notify()

    def _remember_voice(self, request: Message) -> None:
        """Only requests that choose a voice take memory, and the oldest go first past _VOICE_MEMORY."""
        if request["voice"]:
            self.voices[(request.session, request.id)] = request["voice"]
            while len(self.voices) > _VOICE_MEMORY:
                self.voices.popitem(last=False)

    def _cancel(self, session: str, id: str) -> None:
        """Drop queued chunks of the session (or one reply) and stop the current synthesis."""
        ids = {id} if id else self.known.pop(session, set())
        for reply in ids:
            self.cancelled[(session, reply)] = None
            self.voices.pop((session, reply), None)
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
                self.voices.pop((chunk.session, chunk.id), None)

    def _frames(self, chunk: Message) -> Iterator[PcmFrame]:
        """The engine's frames, in the reply's voice; a failure is reported and ends the chunk early."""
        with self.wake:
            voice = self.voices.get((chunk.session, chunk.id), "")
        try:
            text = spell_numbers(chunk["text"], self.normalize) if self.normalize else chunk["text"]

            def should_stop() -> bool:
                return self._is_cancelled(chunk) or self.stopping

            try:
                yield from self.engine.synthesize(text, should_stop, voice)
            except VoiceError as exc:  # raised before any frame, so the configured voice can say it all
                if not voice:
                    raise
                self._refuse_voice(chunk, voice, exc)
                yield from self.engine.synthesize(text, should_stop)
        except Exception as exc:  # an engine failure must not stop the next chunk
            self.log.exception("synthesis failed")
            self.bus.report("tts_failed", f"chunk {chunk['index']}: {type(exc).__name__}: {exc}",
                            chunk.session, chunk.id, "chunk")

    def _refuse_voice(self, chunk: Message, voice: str, exc: VoiceError) -> None:
        """Report the refused voice once per reply: its later chunks go straight to the configured voice."""
        with self.wake:
            self.voices.pop((chunk.session, chunk.id), None)
        self.bus.report("unknown_voice", f"voice {voice!r} cannot be used, so the configured voice speaks: {exc}",
                        chunk.session, chunk.id, "request")

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
