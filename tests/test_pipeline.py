"""The whole daemon in real processes: bus, five stages, the CLI, a real HTTP provider server."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
import uuid
import wave
from collections import defaultdict
from pathlib import Path

import msgpack
import pytest

from tests.fakes.openai_server import reply_for
from tests.harness import ROOT, Daemon, fake_openai, openai_settings
from voxpipe import protocol
from voxpipe.protocol import Request
from voxpipe.runtime import Connection, endpoints_for

KEY = {"FAKE_OPENAI_KEY": "test-key"}


def spoken(reply: str) -> str:
    """What the display shows of a fake reply: the tag removed."""
    return reply.replace("<e>smile</e>", "")


@pytest.fixture(scope="module")
def server() -> str:
    with fake_openai() as url:
        yield url


@pytest.fixture()
def daemon(server: str):
    with Daemon({**openai_settings(server), "player": {"backend": "wav"}}, env=KEY) as running:
        yield running


def history_rows(path: Path) -> list[tuple]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT session, request_id, role, content, status FROM messages ORDER BY id").fetchall()


def test_say_streams_text_and_writes_audio_in_both_modes(daemon: Daemon) -> None:
    for session, flags in (("streamed", []), ("whole", ["--no-stream"])):
        result = daemon.say("Hello there", "--session", session, *flags)
        assert result.returncode == 0, result.stderr
        assert result.stdout == spoken(reply_for("Hello there")) + "\n"
        path = result.stderr.strip().splitlines()[-1].removeprefix("audio written to ")
        with wave.open(path) as wav:
            assert wav.getframerate() == 22050 and wav.getnframes() > 22050 // 2
    rows = history_rows(daemon.db_path)
    replies = {session: content for session, _, role, content, _ in rows if role == "assistant"}
    assert replies == {"streamed": reply_for("Hello there"), "whole": reply_for("Hello there")}


def test_provider_error_exits_1_with_the_reason(server: str) -> None:
    with Daemon(openai_settings(server), env={"FAKE_OPENAI_KEY": "wrong-key"}) as daemon:
        result = daemon.say("Hi")
    assert result.returncode == 1
    assert "401" in result.stderr and "FAKE_OPENAI_KEY" in result.stderr
    assert "wrong-key" not in result.stderr + "".join(daemon.log)


def test_say_without_a_bus_fails_fast(tmp_path: Path) -> None:
    daemon = Daemon({})
    try:
        result = daemon.say("Hi")
    finally:
        daemon.close()
    assert result.returncode == 1
    assert "voxpipe run" in result.stderr


def test_thousand_replies_over_twenty_sessions_lose_nothing(server: str) -> None:
    with Daemon({**openai_settings(server), "player": {"backend": "null"}}, env=KEY) as daemon:
        client = Connection("loadtest", endpoints_for(daemon.config()),
                            [protocol.subscription(kind) for kind in ("token", "text", "chunk", "llm.done",
                                                                      "playback", "error", "history.saved")])
        client.open()
        sessions = [f"load{n}" for n in range(20)]
        per_session, total = 50, 1000
        asked: dict[str, str] = {}
        pending: dict[str, str] = {}
        sent = defaultdict(int)
        display: dict[str, list[str]] = defaultdict(list)
        seqs: dict[tuple, list[int]] = defaultdict(list)
        finished: set[str] = set()
        saved: set[str] = set()
        errors = []

        def ask(session: str) -> None:
            request_id = uuid.uuid4().hex[:12]
            text = f"{session} question {sent[session]}"
            asked[request_id] = text
            pending[session] = request_id
            sent[session] += 1
            client.publish(session, request_id, Request(text=text))

        for session in sessions:
            ask(session)
        deadline = time.monotonic() + 240
        while (len(finished) < total or len(saved) < total) and time.monotonic() < deadline:
            message = client.receive(1.0)
            if message is None:
                continue
            seqs[(message.src, message.kind, message.session, message.id)].append(message.seq)
            if message.kind == "error":
                errors.append(message)
            elif message.kind == "text":
                assert asked[message.id].startswith(message.session)
                display[message.id].append(message.body.delta)
            elif message.kind == "llm.done" and sent[message.session] < per_session:
                ask(message.session)
            elif message.kind == "playback" and message.body.final:
                assert message.body.event == "finished"
                finished.add(message.id)
            elif message.kind == "history.saved" and message.body.role == "assistant":
                saved.add(message.id)
        client.close()
        assert len(finished) == total, f"only {len(finished)} of {total} replies finished playing"
        assert len(saved) == total, f"only {len(saved)} of {total} replies saved"
        assert not errors, [error.body for error in errors[:5]]
        for key, numbers in seqs.items():
            assert numbers == list(range(len(numbers))), f"seq not contiguous in {key}"
        for request_id, text in asked.items():
            assert "".join(display[request_id]) == spoken(reply_for(text))
        stored = {(row[1], row[2]): row for row in history_rows(daemon.db_path)}
        for request_id, text in asked.items():
            assert stored[(request_id, "assistant")][3] == reply_for(text)
            assert stored[(request_id, "assistant")][4] == "ok"
            assert stored[(request_id, "user")][3] == text


def test_a_client_that_publishes_right_after_connecting_loses_nothing(daemon: Daemon) -> None:
    for attempt in range(10):
        session = f"joiner{attempt}"
        client = Connection(f"joiner{attempt}", endpoints_for(daemon.config()),
                            [protocol.subscription("llm.done", session)])
        client.open()
        client.publish(session, "r1", Request(text="quick"))
        done = client.receive(20.0)
        client.close()
        assert done is not None and done.kind == "llm.done" and done.body.text == reply_for("quick")


def heartbeats(daemon: Daemon, seconds: float = 1.6) -> dict[str, protocol.Message]:
    client = Connection("probe", endpoints_for(daemon.config()), [protocol.subscription("heartbeat")])
    client.open()
    beats: dict[str, protocol.Message] = {}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        message = client.receive(0.2)
        if message is not None:
            beats[message.src] = message
    client.close()
    return beats


def test_bad_input_is_counted_by_every_stage_which_keeps_running(daemon: Daemon) -> None:
    sender = Connection("vandal", endpoints_for(daemon.config()), [])
    sender.open()
    good = {"v": 1, "session": "bad", "id": "x", "seq": 0, "ts": 1.0, "src": "vandal"}
    bad_frames = [
        b"heartbeat/ \xc1\xc1",                                                    # not msgpack
        b"cancel/bad " + msgpack.packb([1, 2]),                                     # not a map
        b"request/bad " + msgpack.packb({**good, "kind": "request", "text": 7}),    # wrong type
        b"llm.done/bad " + msgpack.packb({**good, "kind": "llm.done", "status": "ok"}),  # missing fields
        b"chunk/bad " + msgpack.packb({**good, "kind": "chunk", "text": "x", "index": "0", "final": True}),
        b"audio/bad " + msgpack.packb({**good, "kind": "audio"}),
        b"context.query/bad " + msgpack.packb({**good, "kind": "context.query", "v": 99}),
        b"context/bad " + msgpack.packb({**good, "kind": "context", "messages": "no"}),
        b"token/bad " + msgpack.packb({**good, "kind": "token", "text": "x" * 1_000_000}),  # oversize
    ]
    for frame in bad_frames:
        sender.send_raw(frame)
    sender.close()
    time.sleep(0.5)
    beats = heartbeats(daemon)
    expected = {"llm": 4, "chunker": 4, "tts": 3, "player": 3, "history": 4}
    for stage, count in expected.items():
        assert beats[stage].body.counters.get("invalid", 0) >= count, (stage, beats[stage].body.counters)
        assert beats[stage].body.state == "ready"
    result = daemon.say("still alive?")
    assert result.returncode == 0, result.stderr


def stage_pid(daemon: Daemon, stage: str) -> int:
    return heartbeats(daemon)[stage].body.pid


@pytest.mark.parametrize("victim", ["llm", "history", "bus"])
def test_killed_stage_is_restarted_and_nothing_hangs(victim: str) -> None:
    with fake_openai(delay=0.05) as slow, Daemon(openai_settings(slow), env=KEY) as daemon:
        old_pid = stage_pid(daemon, victim)
        say = daemon.cli("say", "a long answer please", "--timeout", "20")
        process = subprocess.Popen(say, cwd=ROOT, env=daemon.env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(1.0)
        os.kill(old_pid, signal.SIGKILL)
        _, err = process.communicate(timeout=40)
        assert process.returncode in (0, 1), err
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            beats = heartbeats(daemon, 1.2)
            if victim in beats and beats[victim].body.pid != old_pid and beats[victim].body.state == "ready":
                break
        else:
            pytest.fail(f"{victim} was not restarted:\n{''.join(daemon.log)}")
        after = daemon.say("and now?")
        assert after.returncode == 0, after.stderr
        with sqlite3.connect(daemon.db_path) as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_sigterm_stops_everything_and_exits_0(daemon: Daemon) -> None:
    beats = heartbeats(daemon)
    pids = [beat.body.pid for beat in beats.values()]
    assert len(pids) == 7 and "launcher" in beats  # the bus, five stages and `voxpipe run` itself
    started = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - started < 10
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
