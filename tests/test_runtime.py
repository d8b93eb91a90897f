"""The broker and the stage runtime in real processes: directory safety, sd_notify, gaps, tap, shards."""

from __future__ import annotations

import os
import selectors
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from tests.harness import (
    PYTHON,
    ROOT,
    Daemon,
    base_env,
    connect,
    fake_openai,
    openai_settings,
    start_stage,
    stop_process,
)
from voxpipe import protocol
from voxpipe.protocol import Error, ErrorCode, Heartbeat, Message, Request, Token
from voxpipe.runtime.shard import Shard, shard_of


@pytest.fixture()
def runtime_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="vp-rt-")) / "run"
    yield directory


def test_second_broker_is_refused_and_stale_sockets_are_cleared(runtime_dir: Path) -> None:
    runtime_dir.mkdir(mode=0o700)
    (runtime_dir / "in.sock").write_text("stale")
    first = start_stage("bus", runtime_dir)
    try:
        connect(runtime_dir, "probe").close()
        second = start_stage("bus", runtime_dir)
        _, err = second.communicate(timeout=20)
        assert second.returncode == 2  # refused before it starts anything, like any second copy of a stage
        assert f"pid {first.pid}" in err and "already running" in err
        connect(runtime_dir, "probe-after").close()  # the first broker still owns the path
        assert oct((runtime_dir / "out.sock").stat().st_mode & 0o777) == "0o600"
    finally:
        assert stop_process(first)[0] == 0


def test_runtime_dir_open_to_others_is_refused(runtime_dir: Path) -> None:
    runtime_dir.mkdir()
    os.chmod(runtime_dir, 0o755)
    process = start_stage("bus", runtime_dir)
    _, err = process.communicate(timeout=20)
    assert process.returncode == 2  # a config-time refusal: no restart can fix it
    assert "mode 755" in err and f"chmod 700 {runtime_dir}" in err


def test_sd_notify_ready_watchdog_stopping(runtime_dir: Path) -> None:
    bus = start_stage("bus", runtime_dir)
    notify_path = str(runtime_dir.parent / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(notify_path)
    listener.settimeout(20)
    try:
        connect(runtime_dir, "probe").close()
        chunker = start_stage("chunker", runtime_dir, NOTIFY_SOCKET=notify_path)
        states = [listener.recv(256).decode() for _ in range(2)]
        assert states == ["READY=1", "WATCHDOG=1"]
        code, _ = stop_process(chunker)
        assert code == 0
        while (state := listener.recv(256).decode()) == "WATCHDOG=1":
            pass
        assert state == "STOPPING=1"
    finally:
        listener.close()
        stop_process(bus)


def raw(kind: str, session: str, id: str, seq: int, src: str, **body: object) -> bytes:
    payload = {"v": 1, "kind": kind, "session": session, "id": id, "seq": seq, "ts": time.time(),
               "src": src, **body}
    return f"{kind}/{session} ".encode() + msgpack.packb(payload, use_bin_type=True)


def test_gaps_within_a_stream_and_at_its_tail_are_reported(runtime_dir: Path) -> None:
    bus = start_stage("bus", runtime_dir)
    try:
        connect(runtime_dir, "probe").close()
        chunker = start_stage("chunker", runtime_dir)
        watcher = connect(runtime_dir, "watcher", "error", "heartbeat")
        while (beat := watcher.receive(20)) is not None and beat.src != "chunker":
            pass
        sender = connect(runtime_dir, "gappy")
        for seq in (0, 1, 4):                       # 2..3 lost in the middle
            sender.send_raw(raw("token", "g", "r1", seq, "gappy", text="x"))
        sender.send_raw(raw("heartbeat", "", "", 0, "gappy", pid=1, uptime=1.0, state="ready",
                            streams={"token/g/r1": 6}))  # 5..6 lost at the tail
        sender.send_raw(raw("heartbeat", "", "", 3, "gappy", pid=1, uptime=4.0, state="ready"))  # beats 1..2 lost
        reports = []
        deadline = time.monotonic() + 10
        while len(reports) < 3 and time.monotonic() < deadline:
            message = watcher.receive(1)
            if message is not None and isinstance(message.body, Error) and message.body.code == ErrorCode.GAP \
                    and message.src == "chunker":  # the watcher reads the heartbeats too, and reports as well
                reports.append(message.body.message)
        assert reports == ["lost messages 2..3 of stream token/g/r1 from gappy",
                           "lost messages 5..6 of stream token/g/r1 from gappy",
                           "lost messages 1..2 of stream heartbeat// from gappy"]
        sender.close()
        watcher.close()
        stop_process(chunker)
    finally:
        stop_process(bus)


def test_a_heartbeat_keeps_the_newest_streams_that_fit_its_frame_whatever_ids_clients_chose(
        runtime_dir: Path) -> None:
    bus = start_stage("bus", runtime_dir)
    try:
        connect(runtime_dir, "probe").close()
        sender = connect(runtime_dir, "many")
        ids = [f"{n:05d}" + "\U0001F600" * 120 for n in range(4000)]  # 485 bytes each in UTF-8
        for id in ids:
            sender.publish("s", id, Token(text="x"))
        streams = sender.take_recent_streams()
        sender.close()
    finally:
        stop_process(bus)
    assert list(streams) == [f"token/s/{id}" for id in ids[-len(streams):]], "the newest, in order"
    assert 900 < len(streams) < 4000
    beat = Heartbeat(pid=1, uptime=1.0, state="ready", counters={f"counter{n}": 2**53 for n in range(50)},
                     streams=streams)
    assert len(protocol.encode(Message(beat, "", "", 0, 0.0, "many"))) <= Heartbeat.max_bytes


def test_tap_prints_one_line_per_message(runtime_dir: Path) -> None:
    bus = start_stage("bus", runtime_dir)
    try:
        connect(runtime_dir, "probe").close()
        tap = subprocess.Popen([PYTHON, "-m", "launcher", "tap", "request"], cwd=ROOT, text=True,
                               env=base_env({"VOXPIPE_BUS__RUNTIME_DIR": str(runtime_dir)}),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        sender = connect(runtime_dir, "tapper")
        line = ""
        deadline = time.monotonic() + 20
        while "request" not in line and time.monotonic() < deadline:
            sender.publish("t1", "r9", Request(text="visible in tap"))
            line = _read_line(tap, 0.5)
        tap.kill()
        sender.close()
        assert "request" in line and "t1 r9" in line and "text='visible in tap'" in line
    finally:
        stop_process(bus)


def _read_line(process: subprocess.Popen[str], timeout: float) -> str:
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    return process.stdout.readline() if selector.select(timeout) else ""


def test_shards_cover_every_session_exactly_once() -> None:
    sessions = [f"user-{n}" for n in range(2000)]
    for count in (1, 2, 3, 5):
        owners = [[index for index in range(count) if Shard(index, count).owns(s)] for s in sessions]
        assert all(len(owner) == 1 for owner in owners)
        if count > 1:
            loads = [sum(owner == [index] for owner in owners) for index in range(count)]
            assert min(loads) > len(sessions) / count * 0.8
    assert shard_of("alice", 4) == shard_of("alice", 4)  # stable: not Python's salted hash
    with pytest.raises(ValueError, match="expected I/N"):
        Shard.parse("1-2")
    with pytest.raises(ValueError, match="0 <= I < N"):
        Shard.parse("2/2")


def test_sharded_stages_under_run_serve_every_session() -> None:
    with fake_openai() as url, Daemon({**openai_settings(url), "run": {"instances": {"tts": 2, "chunker": 2}}},
                                      env={"FAKE_OPENAI_KEY": "test-key"}) as daemon:
        status = daemon.run_cli("status")
        assert all(name in status.stdout for name in ("tts@0", "tts@1", "chunker@0", "chunker@1"))
        for n in range(6):
            result = daemon.say(f"hello {n}", "--session", f"shard-{n}")
            assert result.returncode == 0, result.stderr
