"""The client library against a real daemon (real processes, real ZeroMQ, a real HTTP provider)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tests.fakes.openai_server import reply_for
from tests.harness import Daemon, fake_openai, openai_settings, start_stage, stop_process
from tests.harness import connect as bus_connect
from voxpipe.frontends.client import (
    Audio,
    Chunk,
    Error,
    ErrorCode,
    LlmDone,
    Mark,
    Message,
    Playback,
    Text,
    VoxpipeError,
    VoxpipeTimeout,
    connect,
)

KEY = {"FAKE_OPENAI_KEY": "test-key"}


def spoken(reply: str) -> str:
    return reply.replace("<e>smile</e>", "")


@pytest.fixture(scope="module")
def daemon():
    with fake_openai(delay=0.05) as url, Daemon(openai_settings(url), env=KEY) as running:
        yield running


def test_ask_yields_typed_events_until_the_reply_is_spoken(daemon: Daemon) -> None:
    with connect(daemon.config_path, session="lib1") as vp:
        reply = vp.ask("Hello library")
        events = list(reply)
    assert all(isinstance(event, Message) for event in events)
    assert {event.session for event in events} == {"lib1"} and {event.id for event in events} == {reply.id}
    texts = [event.body for event in events if isinstance(event.body, Text)]
    assert "".join(text.delta for text in texts) == reply.text == spoken(reply_for("Hello library"))
    assert texts[-1].final
    marks = [mark for event in events if isinstance(event.body, Chunk) for mark in event.body.marks]
    assert [(mark.tag, mark.body) for mark in marks] == [("e", "smile")] and isinstance(marks[0], Mark)
    audio = [event.body for event in events if isinstance(event.body, Audio)]
    assert audio and audio[0].rate > 0 and audio[0].width == 2 and any(frame.last for frame in audio)
    done = [event for event in events if isinstance(event.body, LlmDone)]
    assert len(done) == 1 and done[0].body.status == "ok" and done[0].body.text == reply_for("Hello library")
    assert "total_ms" in done[0].body.metrics and reply.done == done[0]
    last = events[-1].body
    assert isinstance(last, Playback) and last.final and last.event == "finished"
    assert reply.complete and events[0].kind and all(event.kind == event.body.kind for event in events)


def test_whole_reply_without_waiting_for_audio_and_a_second_session(daemon: Daemon) -> None:
    with connect(daemon.config_path, session="lib2", kinds=("text", "llm.done", "playback", "error")) as vp:
        first = vp.ask("Whole please", stream=False, wait_audio=False)
        kinds = [event.kind for event in first]
        assert first.complete and first.text == spoken(reply_for("Whole please"))
        assert "llm.done" in kinds and kinds.count("text") >= 1
        # a session this client has not subscribed to yet: it reconnects, confirmed, before asking
        second = vp.ask("Other session", session="lib2b", stream=None)
        assert [event.kind for event in second][-1] == "playback"
        assert second.session == "lib2b" and second.text == spoken(reply_for("Other session"))


def test_each_reply_can_choose_its_voice(daemon: Daemon) -> None:
    """The voice travels in the request to tts; one espeak does not know is reported and the
    reply is still spoken (in the configured voice)."""
    watcher = bus_connect(daemon.runtime_dir, "test-voices", "request")
    try:
        with connect(daemon.config_path, session="lib4") as vp:
            chosen = vp.ask("Hello library", voice="en+f3")
            chosen_events = list(chosen)
            unknown = vp.ask("Hello library", voice="xx-nope")
            unknown_events = list(unknown)
        sent = {}
        while len(sent) < 2 and (message := watcher.receive(5.0)) is not None:
            sent[message.id] = message.body.voice
    finally:
        watcher.close()
    assert sent == {chosen.id: "en+f3", unknown.id: "xx-nope"}
    assert chosen.complete and not [event for event in chosen_events if isinstance(event.body, Error)]
    errors = [event.body for event in unknown_events if isinstance(event.body, Error)]
    assert [error.code for error in errors] == [ErrorCode.UNKNOWN_VOICE] and "'xx-nope'" in errors[0].message
    assert unknown.complete and any(isinstance(event.body, Audio) and event.body.pcm for event in unknown_events)


def test_cancel_from_another_thread_stops_the_reply_everywhere(daemon: Daemon) -> None:
    watcher = bus_connect(daemon.runtime_dir, "test-watch", "llm.done")
    try:
        with connect(daemon.config_path, session="lib3") as vp:
            # about 7 s of streaming (3-character pieces 50 ms apart): the cancel lands mid-reply
            reply = vp.ask("a long story please " * 20)
            seen: list[str] = []
            finished = threading.Event()

            def follow() -> None:
                for event in reply:
                    seen.append(event.kind)
                finished.set()

            worker = threading.Thread(target=follow)
            worker.start()
            deadline = time.monotonic() + 60
            while "text" not in seen and time.monotonic() < deadline:
                time.sleep(0.02)
            vp.cancel()  # the session of the last ask, every reply of it
            assert finished.wait(10), "iteration did not end after cancel()"
            worker.join()
            # iteration stopped at the cancel, or at the llm.done (interrupted) that the cancel brought when that
            # came within the same poll: either way the reply did not run to its end
            assert reply.cancelled
            assert not reply.complete or (reply.done is not None and reply.done.body.status == "interrupted")
        done = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            message = watcher.receive(1.0)
            if message is not None and message.id == reply.id:
                done = message
                break
        assert done is not None, "no llm.done for the cancelled reply"
        assert done.body.status == "interrupted", (done.body, seen)
    finally:
        watcher.close()


def test_no_progress_raises_a_clear_timeout(tmp_path: Path) -> None:
    bus = start_stage("bus", tmp_path / "run")  # a bus with no stages: nobody answers
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "run" / "out.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        config = tmp_path / "voxpipe.toml"
        config.write_text(f'[bus]\nruntime_dir = "{tmp_path / "run"}"\n')
        with connect(config) as vp:
            reply = vp.ask("anyone?", timeout=1.0)
            with pytest.raises(VoxpipeTimeout, match=r"no progress on the reply for 1 s.*voxpipe status"):
                next(reply)
        assert issubclass(VoxpipeTimeout, VoxpipeError)
    finally:
        stop_process(bus)


def test_connect_without_a_bus_fails_at_once(tmp_path: Path) -> None:
    config = tmp_path / "voxpipe.toml"
    config.write_text(f'[bus]\nruntime_dir = "{tmp_path / "run"}"\n')
    started = time.monotonic()
    with pytest.raises(VoxpipeError, match=r"no voxpipe bus.*start it with `voxpipe run`"):
        connect(config)
    assert time.monotonic() - started < 5
