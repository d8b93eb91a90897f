"""The tts stage shell: speakable chunks in, PCM audio frames out.

Synthesis runs on one worker thread (engines such as espeak-ng allow one
instance per process), so the main loop keeps taking chunks and cancels while a
long chunk is being synthesised.  Every chunk ends with exactly one frame marked
`last`, even when synthesis fails, so the player never waits for a lost end.

A request may choose the voice of its reply. Chunks do not carry it, so the stage also takes
`request`s and remembers the non-empty voices by (session, id) until the reply's final chunk is
spoken or the reply is cancelled, and at most the 4096 newest. Like chunks, requests of sessions
another shard owns never reach a handler, so each shard keeps only its own sessions' voices. A
reply with no remembered voice speaks in the configured one; so does a reply whose voice the
engine refuses, after one `unknown_voice` error.

The queue, the cancels, the voices and the frame numbering are the core's (core.py); this shell
runs the engine and publishes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from ...protocol import Cancel, Chunk, ErrorCode, Message, Request
from ...runtime import Stage, handles
from ..audio import PcmFrame
from .core import FrameNumbers, SpeechQueue
from .engines import create_engine
from .engines.base import VoiceError
from .normalize import spell_numbers


class TtsStage(Stage):
    name = "tts"
    sharded = True

    def prepare(self) -> None:
        tts = self.config["tts"]
        self.engine = create_engine(tts["engine"], tts.get(tts["engine"], {}))
        self.normalize = tuple(tts.get(tts["engine"], {}).get("normalize_numbers", ()))
        self.queue = SpeechQueue()
        self.wake = threading.Condition()
        self.stopping = False

    def started(self) -> None:
        self.worker = threading.Thread(target=self._work, name="tts-synth", daemon=True)
        self.worker.start()

    @handles(Request)
    def on_request(self, message: Message[Request]) -> None:
        with self.wake:
            self.queue.request(message)

    @handles(Chunk)
    def on_chunk(self, message: Message[Chunk]) -> None:
        with self.wake:
            self.queue.chunk(message)
            self.wake.notify()

    @handles(Cancel)
    def on_cancel(self, message: Message[Cancel]) -> None:
        with self.wake:
            self.queue.cancel(message.session, message.id)
            self.wake.notify()

    def bus_lost(self) -> None:
        with self.wake:
            for session in {key[0] for key in self.queue.replies} | {chunk.session for chunk in self.queue.chunks}:
                self.queue.cancel(session, "")
            self.wake.notify()

    def _is_cancelled(self, chunk: Message[Chunk]) -> bool:
        with self.wake:
            return self.queue.is_cancelled(chunk)

    def _work(self) -> None:
        while True:
            with self.wake:
                while not self.queue.chunks and not self.stopping:
                    self.wake.wait()
                if self.stopping:
                    return
                chunk = self.queue.chunks.popleft()
            if not self._is_cancelled(chunk):
                self._speak(chunk)

    def _speak(self, chunk: Message[Chunk]) -> None:
        """Publish the chunk's frames as the engine makes them, stopping at once on a cancel."""
        numbers = FrameNumbers(chunk.body)
        for frame in self._frames(chunk):
            if self._is_cancelled(chunk):
                return
            if (audio := numbers.push(frame)) is not None:
                self.bus.publish(chunk.session, chunk.id, audio)
        if self._is_cancelled(chunk):
            return
        self.bus.publish(chunk.session, chunk.id, numbers.finish())
        with self.wake:
            self.queue.spoken(chunk)

    def _frames(self, chunk: Message[Chunk]) -> Iterator[PcmFrame]:
        """The engine's frames, in the reply's voice; a failure is reported and ends the chunk early."""
        with self.wake:
            voice = self.queue.voice(chunk)
        try:
            text = chunk.body.text
            if self.normalize:
                text = spell_numbers(text, self.normalize)

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
            self.bus.report(ErrorCode.TTS_FAILED, f"chunk {chunk.body.index}: {type(exc).__name__}: {exc}",
                            chunk.session, chunk.id, "chunk")

    def _refuse_voice(self, chunk: Message[Chunk], voice: str, exc: VoiceError) -> None:
        """Report the refused voice once per reply: its later chunks go straight to the configured voice."""
        with self.wake:
            self.queue.refuse_voice(chunk)
        self.bus.report(ErrorCode.UNKNOWN_VOICE,
                        f"voice {voice!r} cannot be used, so the configured voice speaks: {exc}",
                        chunk.session, chunk.id, "request")

    def shutdown(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify_all()
        self.worker.join(5)
        self.engine.close()
