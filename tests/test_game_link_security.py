"""`voxpipe game` as a real process on a real bus, for what needs no model: who may connect, what a
hostile or broken client costs, its files' privacy, and refusing a second listener.

Another local user is `nobody` through runuser with the system Python, as in test_security_runtime."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.mod_reply import read_reply
from tests.harness import PYTHON, ROOT, base_env, free_port, start_stage, stop_process, wait_ready
from tests.test_security_runtime import SYSTEM_PYTHON

pytestmark = pytest.mark.integration

POLL = {"id": 0, "type": "chat", "character": "Crazy", "input": "waiting", "dataToSentSystem": "-",
        "systemInfo": "-", "distance": "3,27", "roomPlayer": 1, "roomMita": 0, "hierarchy": "-", "currentInfo": "-",
        "dialog_active": False}


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    runtime = tmp_path_factory.mktemp("game-bus") / "run"
    broker = start_stage("bus", runtime)
    try:
        wait_ready(runtime, "bus")
        yield runtime
    finally:
        stop_process(broker)


def game_env(runtime: Path, voices: Path, **extra: str) -> dict[str, str]:
    return base_env({"VOXPIPE_BUS__RUNTIME_DIR": str(runtime), "VOXPIPE_GAME__VOICE_DIR": str(voices), **extra})


@contextlib.contextmanager
def game(runtime: Path, voices: Path, port: int, **extra: str) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen([PYTHON, "-m", "launcher", "game", "--port", str(port)], cwd=ROOT, text=True,
                               env=game_env(runtime, voices, **extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None
    line = process.stdout.readline()
    assert "listening on" in line, f"voxpipe game did not start: {process.wait()} {process.stderr.read()}"
    try:
        yield process
    finally:
        if process.poll() is None:
            stop_process(process)


def exchange(port: int, data: bytes) -> bytes:
    """As the mod: one send, no shutdown of our side, one read of at most 32,000 bytes; b"" when the link
    closed without an answer (a reset, when it closed with our request unread)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(data)
            return sock.recv(32000)
        except (ConnectionResetError, BrokenPipeError):
            return b""


def test_only_the_users_own_programs_are_served(bus: Path, tmp_path: Path) -> None:
    port = free_port()
    script = ("import socket, sys\n"
              "s = socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=10)\n"
              "s.sendall(sys.argv[2].encode())\n"
              "try:\n    print(repr(s.recv(32000)))\n"
              "except ConnectionResetError:\n    print(repr(b''))\n")
    with game(bus, tmp_path / "voices", port) as process:
        other = subprocess.run(["runuser", "-u", "nobody", "--", SYSTEM_PYTHON, "-c", script, str(port),
                                json.dumps(POLL)], capture_output=True, text=True, timeout=30, cwd="/")
        assert other.stdout.strip() == "b''", other  # closed without an answer
        assert read_reply(exchange(port, json.dumps(POLL).encode()))["id"] == 0  # the user's own: served
        _, err = stop_process(process)
    assert "another user's program" in err


def test_broken_and_hostile_clients_cost_a_bounded_time_and_the_link_keeps_serving(bus: Path, tmp_path: Path) -> None:
    port = free_port()
    with game(bus, tmp_path / "voices", port, VOXPIPE_GAME__READ_TIMEOUT_S="1.0",
              VOXPIPE_GAME__MAX_REQUEST_BYTES="65536") as process:
        assert exchange(port, b"GET / HTTP/1.0\r\n\r\n") == b""  # not JSON: closed, no answer
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(b'{"id": 1, "input": "wai')  # and then nothing (slow loris)
        started = time.monotonic()
        assert read_reply(exchange(port, json.dumps(POLL).encode()))["id"] == 0  # others are served meanwhile
        slow.settimeout(10)
        with contextlib.suppress(ConnectionResetError):
            assert slow.recv(100) == b""
        assert time.monotonic() - started < 5  # closed after read_timeout_s
        slow.close()
        assert exchange(port, b'{"input": "' + b"x" * 70000 + b'"}') == b""  # too big: refused mid-stream
        wrong = read_reply(exchange(port, json.dumps({**POLL, "id": "seven", "roomPlayer": "x"}).encode()))
        assert wrong["id"] == -1 and wrong["response"] == ""  # malformed but complete: a well-typed empty answer
        assert read_reply(exchange(port, json.dumps({**POLL, "id": 5}).encode()))["id"] == 5
        _, err = stop_process(process)
    assert "not valid JSON" in err or "not JSON" in err
    assert "game.read_timeout_s" in err and "too big" in err and "malformed" in err


def test_the_voice_directory_is_private_and_emptied_at_start_and_stop(bus: Path, tmp_path: Path) -> None:
    voices = tmp_path / "cache" / "voices"
    voices.mkdir(parents=True, mode=0o755)
    port = free_port()
    leftover = voices / f"voxpipe-game-{port}-{'0' * 32}.wav"  # an earlier run's, on this port
    leftover.write_bytes(b"RIFF")
    others = [voices / f"voxpipe-game-{port + 1}-{'0' * 32}.wav", voices / "song.wav"]  # another link's, the user's
    for path in others:
        path.write_bytes(b"RIFF")
    with game(bus, voices, port):
        assert stat.S_IMODE(voices.stat().st_mode) == 0o700
        assert sorted(voices.iterdir()) == sorted(others)
    assert sorted(voices.iterdir()) == sorted(others)


def test_a_voice_directory_of_another_user_or_a_symlink_is_refused(bus: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    os.chown(foreign, 65534, 65534)  # nobody's
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    for voices, said in ((foreign, "belongs to uid 65534"), (link, "symlink")):
        done = subprocess.run([PYTHON, "-m", "launcher", "game", "--port", str(free_port())], cwd=ROOT, text=True,
                              capture_output=True, timeout=60, env=game_env(bus, voices))
        assert done.returncode == 2 and said in done.stderr and "game.voice_dir" in done.stderr


def test_a_second_listener_is_refused_with_the_reason(bus: Path, tmp_path: Path) -> None:
    port = free_port()
    with game(bus, tmp_path / "voices", port):
        second = subprocess.run([PYTHON, "-m", "launcher", "game", "--port", str(port)], cwd=ROOT, text=True,
                                env=game_env(bus, tmp_path / "voices2"), capture_output=True, timeout=60)
        assert second.returncode == 2 and f"voxpipe game on port {port} is already running" in second.stderr
    with socket.socket() as holder:  # another program (the NeuroMita app) holds the port
        holder.bind(("127.0.0.1", port))
        holder.listen()
        held = subprocess.run([PYTHON, "-m", "launcher", "game", "--port", str(port)], cwd=ROOT, text=True,
                              env=game_env(bus, tmp_path / "voices"), capture_output=True, timeout=60)
    assert held.returncode == 2 and f"127.0.0.1:{port} is in use" in held.stderr and "NeuroMita" in held.stderr


def test_a_host_other_than_loopback_is_refused(bus: Path, tmp_path: Path) -> None:
    done = subprocess.run([PYTHON, "-m", "launcher", "game"], cwd=ROOT, text=True, capture_output=True, timeout=60,
                          env=game_env(bus, tmp_path / "voices", VOXPIPE_GAME__HOST="0.0.0.0"))
    assert done.returncode == 2 and "loopback" in done.stderr
    assert not os.path.exists(tmp_path / "voices")


def test_a_silent_connection_gets_the_settings_pushed_as_a_dialect_b_client_expects(bus: Path, tmp_path: Path) -> None:
    """Notes §1: the app pushes loaded_settings to a task-API client as it connects; such a client may
    then stay quiet past read_timeout_s without being dropped."""
    port = free_port()
    with game(bus, tmp_path / "voices", port, VOXPIPE_GAME__READ_TIMEOUT_S="1.0"), \
            socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        reader = client.makefile("rb")
        assert json.loads(reader.readline())["type"] == "loaded_settings"
        time.sleep(1.5)
        client.sendall(json.dumps({"action": "get_settings", "character": "Kind"}).encode())
        pushed = json.loads(reader.readline())
        assert pushed["type"] == "loaded_settings" and pushed["body"]["settings"]["CHARACTER"] == "Kind"
