"""What an interrupted reply is stored as having said, through the whole daemon, for every player
backend and every point a cancel can come: before the first frame, between chunks, mid-chunk.

A cancel usually comes while the model is still writing, so the player's final `playback` reaches
history before the reply's `llm.done` does; the stored `spoken` must survive that order. The
sounddevice and simpleaudio players play espeak-ng speech on a device that takes audio in real
time; the wav and null players write audio as fast as it comes, so they get it from a speech server
that streams in real time, the only way a cancel can land inside one of their chunks.

The reply's `metrics` end its timeline at the later of its `llm.done` and its final `playback`, and
go out as soon as both have come (or, for a reply cancelled before any of it played, as soon as no
final playback can come), in either order.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from tests.fakes.alsa_fifo import PacedFifo
from tests.fakes.openai_server import pieces, reply_for
from tests.harness import Daemon, fake_openai, openai_settings
from voxpipe import protocol
from voxpipe.protocol import Cancel, LlmDone, Message, Metrics, Request, Token
from voxpipe.runtime import Connection, endpoints_for
from voxpipe.stages.chunker.core import Chunker, ChunkerPolicy
from voxpipe.stages.history.stage import UNPLAYED_WAIT_S, ReplyTrack, _heard_text

KEY = {"FAKE_OPENAI_KEY": "test-key"}
TOKEN_DELAY_S = 0.12
"""Per 3-character token: chunk 0 is written in under 1 s, chunk 1 some 3 s later, well after
chunk 0 has played, and the model is still writing the third sentence when chunk 1 is cut."""
QUESTION = ("Good morning. The second sentence is long enough to take a few seconds to read aloud. The third "
            "sentence keeps the model busy writing while the second one is spoken")
REPLY = reply_for(QUESTION)
SPEECH_SERVER_MS_PER_CHAR = 40
"""Not the player's default rate, so a cut inside chunk 1 must be placed by chunk 0's measured rate."""
METRICS_LAG_S = 1.0
"""How soon after the later of llm.done and the final playback the metrics must come (history waits 30 s
only for a final playback that fails to come)."""
INTO_CHUNK_S = 1.2
"""How long after chunk 1 starts the mid-chunk cancel comes."""


def chunk_texts() -> list[str]:
    """What the chunker makes of the reply as the fake server streams it."""
    chunker = Chunker(ChunkerPolicy())
    return [chunk.text for piece in pieces(REPLY) for chunk in chunker.feed(piece, 0.0).chunks]


FIRST, SECOND = chunk_texts()[:2]


@pytest.fixture(scope="module")
def llm() -> Iterator[str]:
    with fake_openai(delay=TOKEN_DELAY_S) as url:
        yield url


@pytest.fixture(scope="module", params=["sounddevice", "simpleaudio", "wav", "null"])
def daemon(request, llm: str, tmp_path_factory) -> Iterator[Daemon]:
    backend = request.param
    settings = {**openai_settings(llm), "player": {"backend": backend}}
    if backend in ("sounddevice", "simpleaudio"):
        with PacedFifo(tmp_path_factory.mktemp(backend), 22050 * 2) as device, \
                Daemon({**settings, "tts": {"engine": "espeak"}},  # espeak-ng: 22.05 kHz, 16-bit mono
                       env={**KEY, "ALSA_CONFIG_PATH": str(device.conf)}) as running:
                yield running
    else:
        with speech_server() as tts, Daemon({**settings, "tts": tts}, env=KEY) as running:
            yield running


@contextlib.contextmanager
def speech_server() -> Iterator[dict]:
    """The tts settings of a speech server that streams in real time."""
    # fake_openai starts any fake server module; the speech server takes its pace where the chat one takes a delay
    with fake_openai(SPEECH_SERVER_MS_PER_CHAR, module="tests.fakes.speech_server") as speech:
        yield {"engine": "openai-speech", "openai-speech": {"base_url": speech, "api_key_env": "", "max_frame_ms": 100}}


class Watch:
    """The test's view of one session on the bus: every message, with when it came."""

    def __init__(self, daemon: Daemon, session: str) -> None:
        self.client = Connection("heard-test", endpoints_for(daemon.config()),
                                 [protocol.subscription(kind, session) for kind in
                                  ("text", "chunk", "audio", "playback", "llm.done", "metrics")])
        self.client.open(timeout=30)
        self.seen: list[tuple[float, Message]] = []

    def until(self, what: str, test: Callable[[Message], bool], timeout: float = 30.0) -> float:
        """Read messages until one passes `test`; returns when it came."""
        if any(test(message) for _, message in self.seen):
            return next(at for at, message in self.seen if test(message))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.client.receive(0.1)
            if message is not None:
                self.seen.append((time.monotonic(), message))
                if test(message):
                    return self.seen[-1][0]
        raise AssertionError(f"no {what} within {timeout} s; seen: {[m.kind for _, m in self.seen]}")

    def audio_ms(self, chunk: int) -> float:
        return sum(len(m.body.pcm) / (m.body.channels * m.body.width) * 1000 / m.body.rate for _, m in self.seen
                   if m.kind == "audio" and m.body.chunk == chunk)

    def started_before(self, moment: float) -> list[int]:
        return [m.body.chunk for at, m in self.seen
                if at < moment and m.kind == "playback" and m.body.event == "started"]

    def first(self, kind: str, test: Callable[[Message], bool] = lambda m: True) -> tuple[float, Message] | None:
        """(when it came, the message) of the first `kind` message that passes `test`, if any came."""
        return next(((at, m) for at, m in self.seen if m.kind == kind and test(m)), None)

    def metrics(self, request: Message, due: Callable[[], float], status: str) -> Metrics:
        """The reply's metrics, checked against what the watch saw: they came within METRICS_LAG_S of
        `due()` (asked once they came), once, and their timeline ends at the later of llm.done and the
        final playback (llm.done alone when no final playback came)."""
        arrived = self.until("metrics", lambda m: m.kind == "metrics", timeout=UNPLAYED_WAIT_S + 10)
        lag = arrived - due()
        assert -0.2 < lag < METRICS_LAG_S, f"metrics came {lag:+.2f} s from when they were due"
        body = next(m.body for _, m in self.seen if isinstance(m.body, Metrics))
        final = self.first("playback", lambda m: m.body.final)
        done = self.first("llm.done")
        assert done is not None and (final is None or final[0] <= arrived), "metrics before the final playback"
        end = max(done[1].ts, final[1].ts) if final else done[1].ts

        def ms(message: tuple[float, Message] | None) -> float:
            return pytest.approx((message[1].ts - request.ts) * 1000, abs=0.01) if message else -1.0

        assert (body.request_ts, body.status) == (pytest.approx(request.ts), status)
        assert body.end_ms == pytest.approx((end - request.ts) * 1000, abs=0.01)
        assert body.audio_s == (final[1].body.audio_s if final else 0.0)
        started = self.first("playback", lambda m: m.body.event == "started")
        assert body.first_chunk_ms == ms(self.first("chunk"))
        assert body.first_playback_ms == ms(started)
        assert body.first_audio_ms == (pytest.approx((started[1].body.audio_ts - request.ts) * 1000, abs=0.01)
                                       if started else -1.0)
        assert body.chars == len(done[1].body.text) and body.tokens == done[1].body.tokens
        time.sleep(0.3)
        while (message := self.client.receive(0.1)) is not None:
            self.seen.append((time.monotonic(), message))
        assert sum(m.kind == "metrics" for _, m in self.seen) == 1, "metrics are published once per reply"
        return body


def playback(event: str, chunk: int) -> Callable[[Message], bool]:
    return lambda m: m.kind == "playback" and m.body.event == event and m.body.chunk == chunk


def stored(db: Path, session: str, settled: Callable[[str], bool], timeout: float = 10.0) -> tuple[str, int, str]:
    """(spoken, interrupted, status) of the session's reply once `settled(spoken)`, else as it is at
    the timeout. history stores what was heard so far at llm.done and the rest when the final
    playback comes, and either may come first."""
    deadline = time.monotonic() + timeout
    while True:
        with sqlite3.connect(db) as database:
            row = database.execute("SELECT spoken, interrupted, status FROM messages WHERE session=?"
                                   " AND role='assistant'", (session,)).fetchone()
        if (row is not None and row[0] is not None and settled(row[0])) or time.monotonic() > deadline:
            assert row is not None and row[0] is not None, f"no spoken text stored for {session}: {row}"
            return row
        time.sleep(0.1)


@pytest.mark.parametrize("point", ["before", "between", "mid"])
def test_an_interrupted_reply_is_stored_with_what_was_heard(daemon: Daemon, point: str) -> None:
    session = f"{point}-{daemon.config()['player']['backend']}"
    watch = Watch(daemon, session)
    request = watch.client.publish(session, "r1", Request(text=QUESTION))
    if point == "before":  # the reply is being written and shown; none of it is synthesised yet
        watch.until("text", lambda m: m.kind == "text")
    elif point == "between":  # chunk 0 has played out; chunk 1 is still being written
        watch.until("chunk 0 finished", playback("finished", 0))
        time.sleep(0.8)  # > what a backend holds (sounddevice: 300 ms queued, plus the device's buffer)
    else:
        started = watch.until("chunk 1 started", playback("started", 1))
        time.sleep(max(0.0, started + INTO_CHUNK_S - time.monotonic()))
    cancelled = time.monotonic()
    watch.client.publish(session, "", Cancel(reason="test"))
    watch.until("llm.done", lambda m: m.kind == "llm.done", timeout=15)
    if point != "before":
        watch.until("final playback", lambda m: m.kind == "playback" and m.body.final, timeout=5)  # bounds a hang

    def due() -> float:
        """The later of llm.done and the final playback; with none of the reply played, no final playback
        may come, and then history knows it UNPLAYED_WAIT_S after the cancel."""
        final = watch.first("playback", lambda m: m.body.final)
        done = watch.first("llm.done")
        assert done is not None
        if final is None and watch.first("playback") is None:
            return max(done[0], cancelled + UNPLAYED_WAIT_S)
        assert final is not None, "the reply played, so its final playback must come"
        return max(done[0], final[0])

    watch.metrics(request, due, "interrupted")
    watch.client.close()
    settled = {"before": lambda text: text == "", "between": lambda text: text == FIRST,
               "mid": lambda text: text.startswith(FIRST + " ")}[point]
    spoken, interrupted, status = stored(daemon.db_path, session, settled)

    assert (interrupted, status) == (1, "interrupted")  # the model was still writing when the cancel came
    assert " ".join(REPLY.replace("<e>smile</e>", "").split()).startswith(spoken), spoken
    if point == "before":
        assert (watch.started_before(cancelled), spoken) == ([], "")
    elif point == "between":
        assert (watch.started_before(cancelled), spoken) == ([0], FIRST)
    else:
        assert spoken.startswith(FIRST + " "), spoken
        part = spoken.removeprefix(FIRST + " ")
        assert 0 < len(part) < len(SECOND) and SECOND[len(part)] == " ", f"{part!r}: not {SECOND!r} cut at a word"
        expected = INTO_CHUNK_S * 1000 / (watch.audio_ms(0) / len(FIRST))  # characters at chunk 0's speech rate
        assert 0.5 * expected <= len(part) <= 1.6 * expected, (part, expected)


def test_the_metrics_of_a_reply_played_to_its_end_come_with_its_final_playback(daemon: Daemon) -> None:
    """The ordinary order: llm.done, then the final `finished` once the speech has played out."""
    session = f"whole-{daemon.config()['player']['backend']}"
    watch = Watch(daemon, session)
    request = watch.client.publish(session, "r1", Request(text="Hello there."))
    final = watch.until("final playback", lambda m: m.kind == "playback" and m.body.final, timeout=60)
    done = watch.first("llm.done")
    assert done is not None and done[0] < final, "llm.done comes first when nothing is cancelled"
    metrics = watch.metrics(request, lambda: final, "ok")
    watch.client.close()
    assert metrics.audio_s > 0 and 0 < metrics.first_token_ms < metrics.first_playback_ms < metrics.end_ms


@pytest.fixture(scope="module")
def without_llm() -> Iterator[Daemon]:
    """chunker, tts, player and history, with the test in llm's place, so it says when llm.done comes."""
    with speech_server() as tts, Daemon({"run": {"stages": ["chunker", "tts", "player", "history"]}, "tts": tts,
                                         "player": {"backend": "null"}}) as running:
        yield running


@pytest.mark.parametrize("order", ["final playback, then llm.done", "llm.done, then final playback"])
def test_metrics_come_as_soon_as_the_later_of_llm_done_and_the_final_playback_does(
        without_llm: Daemon, order: str) -> None:
    """A session-wide cancel while the model writes cuts the sound at once, while the model's call may
    take a while to end: the final `stopped` reaches history well before the interrupted llm.done, and
    the metrics must come with the llm.done, not from history's 30 s fallback."""
    session = "stopped-first" if order.startswith("final") else "done-first"
    watch = Watch(without_llm, session)
    request = watch.client.publish(session, "r1", Request(text=QUESTION))
    tokens = pieces(REPLY)
    if order.startswith("final"):
        tokens = tokens[:len(FIRST + " " + SECOND) // 3 + 3]  # the model is still writing the third sentence
    for token in tokens:
        watch.client.publish(session, "r1", Token(text=token))
    done_body = LlmDone(status="ok", text="".join(tokens), tokens=len(tokens), provider="openai", model="fake-model",
                        profile="fake", metrics={"ttft_ms": 5.0})
    if order.startswith("final"):
        watch.until("chunk 1 started", playback("started", 1), timeout=20)
        time.sleep(0.5)
        watch.client.publish(session, "", Cancel(reason="test"))
        final = watch.until("final playback", lambda m: m.kind == "playback" and m.body.final, timeout=5)
        time.sleep(UNPLAYED_WAIT_S + 0.5)  # no metrics yet: history waits for llm.done
        assert watch.first("metrics") is None, "metrics before llm.done"
        watch.client.publish(session, "r1", replace(done_body, status="interrupted"))
        done = watch.until("llm.done", lambda m: m.kind == "llm.done", timeout=5)
        assert final < done
        metrics = watch.metrics(request, lambda: done, "interrupted")
    else:
        watch.client.publish(session, "r1", done_body)
        final = watch.until("final playback", lambda m: m.kind == "playback" and m.body.final, timeout=30)
        metrics = watch.metrics(request, lambda: final, "ok")
    watch.client.close()
    event = watch.first("playback", lambda m: m.body.final)
    assert event is not None and event[1].body.event == ("stopped" if order.startswith("final") else "finished")
    assert metrics.audio_s > 0.5 and metrics.first_token_ms == 5.0
    assert (metrics.profile, metrics.provider, metrics.model, metrics.engine) == (
        "fake", "openai", "fake-model", "openai-speech")


@pytest.mark.parametrize(("heard_chars", "spoken"), [
    (0, "One two."), (1, "One two."), (2, "One two. Six"), (3, "One two. Six"), (6, "One two. Six"),
    (7, "One two. Six seven"), (30, "One two. Six seven eight.")])
def test_the_heard_part_of_a_chunk_is_rounded_to_the_nearest_word(heard_chars: int, spoken: str) -> None:
    """heard_chars follows audio time, so it can fall inside a word: a word cut past its middle was
    heard. Chunk 0 was heard whole, chunk 1 in part, chunk 2 not at all."""
    track = ReplyTrack(chunks={0: "One two.", 1: "Six seven eight.", 2: "Nine."}, heard={0: 8, 1: heard_chars})
    assert _heard_text(track) == spoken


def test_a_reply_cancelled_while_its_first_audio_is_still_being_synthesised_is_stored_as_unheard(
        llm: str, tmp_path) -> None:
    """The model has finished, but the voice has not sent a byte (a slow Coqui, a hosted voice): no
    audio reaches the player, so only history's cancel handling can record that nothing was heard."""
    import socket
    import threading
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    held: list[socket.socket] = []

    def hold() -> None:
        """Accept and never answer, until the test closes the listening socket."""
        with contextlib.suppress(OSError):
            while True:
                held.append(silent.accept()[0])

    threading.Thread(target=hold, daemon=True).start()
    tts = {"engine": "openai-speech", "openai-speech": {
        "base_url": f"http://127.0.0.1:{silent.getsockname()[1]}/v1", "api_key_env": "", "timeout_s": 60.0}}
    with fake_openai() as fast, Daemon({**openai_settings(fast), "tts": tts, "player": {"backend": "null"}},
                                       env=KEY) as running:
        watch = Watch(running, "synth")
        request = watch.client.publish("synth", "r1", Request(text="Say something."))
        watch.until("llm.done", lambda m: m.kind == "llm.done" and m.body.status == "ok")
        time.sleep(0.5)  # history has stored the reply; tts is still waiting on the voice
        watch.client.publish("synth", "", Cancel(reason="test"))
        cancelled = time.monotonic()
        spoken, interrupted, status = stored(running.db_path, "synth", lambda text: text == "")
        # no final playback can come: the metrics go out once that is known, not 30 s after llm.done
        metrics = watch.metrics(request, lambda: cancelled + UNPLAYED_WAIT_S, "ok")
        watch.client.close()
    silent.close()
    assert (spoken, interrupted, status) == ("", 1, "ok")
    assert (metrics.first_audio_ms, metrics.first_playback_ms, metrics.audio_s) == (-1.0, -1.0, 0.0)
