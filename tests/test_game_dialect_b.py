"""Dialect B of the game link (design §1.8, §8) as a real `voxpipe game` process over a real daemon
(the fake OpenAI server, espeak-ng), driven by a plain socket as the newer NeuroMita client would
drive it: one connection, JSON objects both ways, each answer a line. The B client is not public, so
what is checked is the app's server side: the shapes, the statuses' order, and the voice file."""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.openai_server import reply_for
from tests.harness import ROOT, Daemon, fake_openai, free_port, openai_settings, stop_process
from tests.harness import connect as bus_connect
from voxpipe.frontends.game.dialect_b import reply_text
from voxpipe.protocol import Audio, LlmDone

pytestmark = pytest.mark.integration

KEY = {"FAKE_OPENAI_KEY": "test-key"}
WAV_HEADER = 44


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    with fake_openai(delay=0.05) as url, Daemon(openai_settings(url), env=KEY) as running:
        yield running


@dataclass
class Game:
    port: int
    voices: Path


@pytest.fixture(scope="module")
def game(daemon: Daemon) -> Iterator[Game]:
    port, voices = free_port(), daemon.dir / "voices"
    env = {**daemon.env, "VOXPIPE_GAME__VOICE_DIR": str(voices), "VOXPIPE_GAME__PATH_STYLE": "posix",
           "VOXPIPE_GAME__CHARACTERS__NOBODY__PERSONA": "Nobody"}  # a persona the llm stage does not have
    process = subprocess.Popen(daemon.cli("game", "--port", str(port)), cwd=ROOT, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None
    line = process.stdout.readline()
    assert "listening on" in line, f"voxpipe game did not start: {process.wait()} {process.stderr.read()}"
    try:
        yield Game(port, voices)
    finally:
        code, err = stop_process(process)
    assert code == 0, err
    assert list(voices.iterdir()) == []  # the files it handed out, and any still being written, go at the stop


@dataclass
class Client:
    """The game's end of one B connection: what it sent is raw bytes, what it got is parsed lines."""

    sock: socket.socket
    got: list[dict[str, Any]] = field(default_factory=list)
    buffer: bytes = b""

    def send(self, *objects: dict[str, Any]) -> None:
        """Every object in one send, back to back, as a stream may carry them."""
        self.sock.sendall(b"".join(json.dumps(obj).encode() for obj in objects))

    def until(self, done: Callable[[list[dict[str, Any]]], bool], timeout: float = 30.0) -> list[dict[str, Any]]:
        """Read lines until done(all lines so far) holds."""
        deadline = time.monotonic() + timeout
        while not done(self.got):
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(65536)
            assert data, f"the link closed the connection; got {self.got}"
            self.buffer += data
            *lines, self.buffer = self.buffer.split(b"\n")
            for line in lines:
                line.decode("ascii")  # ASCII-escaped, as the app's json.dumps (§1.8)
                self.got.append(json.loads(line))
        return self.got

    def next(self, timeout: float = 30.0) -> dict[str, Any]:
        count = len(self.got)
        return self.until(lambda got: len(got) > count, timeout)[count]

    def updates(self, uid: str) -> list[dict[str, Any]]:
        return [line for line in self.got if line.get("type") == "task_update" and line["uid"] == uid]


@contextlib.contextmanager
def connected(game: Game) -> Iterator[Client]:
    with socket.create_connection(("127.0.0.1", game.port), timeout=10) as sock:
        yield Client(sock)


def create(type: str = "answer", message: str = "", character: str = "Crazy", **extra: Any) -> dict[str, Any]:
    return {"action": "create_task", "type": type, "character": character, "data": {"message": message},
            "context": {"distance": "3,27", "roomPlayer": 1, "roomMita": 0}, **extra}


def ended(uid: str) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda got: any(line.get("type") == "task_update" and line["uid"] == uid
                           and line["status"] not in ("PENDING", "VOICING") for line in got)


def wav_problem(data: bytes) -> str:
    """What is wrong with a voice file for the mod (F1-F5), or "" for a canonical 44.1 kHz stereo one."""
    if len(data) < WAV_HEADER or data[:4] != b"RIFF" or data[8:16] != b"WAVEfmt ":
        return "not a RIFF WAVE"
    form, channels, rate, _, align, bits = struct.unpack("<HHIIHH", data[20:36])
    if (form, channels, rate, align, bits) != (1, 2, 44100, 4, 16):
        return f"format {form}, {channels} ch, {rate} Hz, {bits} bit"
    if data[36:40] != b"data" or struct.unpack("<I", data[40:44])[0] != len(data) - WAV_HEADER:
        return "not a 44-byte header with the data's length"
    return ""


def greet(client: Client) -> None:
    """Open the dialect: the link knows a connection speaks B from its first object (design §8), and
    pushes its settings then, before that object's answer."""
    client.send({"action": "get_settings", "character": "Crazy"})
    pushed, answered = client.until(lambda got: len(got) == 2)
    assert pushed["type"] == answered["type"] == "loaded_settings"


def start(client: Client, **task: Any) -> str:
    """Create a task; its PENDING update comes at once (after those of the tasks it cancels). Returns its uid."""
    seen = len(client.got)
    client.send(create(**task))
    got = client.until(lambda got: any(line.get("status") == "PENDING" for line in got[seen:]))
    (pending,) = [line for line in got[seen:] if line.get("status") == "PENDING"]
    assert pending["type"] == "task_update", pending
    return str(pending["uid"])


def test_an_answer_task_goes_pending_voicing_success_with_the_reply_and_a_playable_wav(daemon: Daemon,
                                                                                     game: Game) -> None:
    tap = bus_connect(daemon.runtime_dir, "test-b", "llm.done", "audio")
    try:
        with connected(game) as client:
            client.send(create(message="Hello Mita", req_id="r-1"))
            hello = client.next()
            assert hello["type"] == "loaded_settings"
            assert set(hello["body"]["settings"]) == {"ACTION_MENU", "MITAS_MENU", "IGNORE_GAME_REQUESTS",
                                                      "GAME_BLOCK_LEVEL", "CHARACTER"}
            pending = client.next()
            uid = pending["uid"]
            body = pending["body"]
            assert pending["status"] == body["status"] == "PENDING" and body["uid"] == uid
            assert body["type"] == "chat" and body["data"]["req_id"] == "r-1" and body["data"]["character"] == "Crazy"
            client.until(ended(uid))
            client.send({"action": "get_task_status", "task_uid": uid})
            status = client.next()
        done, pcm_s, audio_over = None, 0.0, False
        while done is None or not audio_over:
            message = tap.receive(10.0)
            assert message is not None, "the bus carried no llm.done or final audio for the task"
            if message.id == uid and isinstance(message.body, LlmDone):
                done = message.body
            elif message.id == uid and isinstance(message.body, Audio):
                frame = message.body
                pcm_s += len(frame.pcm) / (frame.width * frame.channels) / frame.rate
                audio_over = frame.final and frame.last
    finally:
        tap.close()
    updates = client.updates(uid)
    assert [update["status"] for update in updates] == ["PENDING", "VOICING", "SUCCESS"]
    voicing, success = updates[1]["body"], updates[2]["body"]
    assert done.status == "ok" and done.text == reply_for("Hello Mita")
    assert voicing["result"]["response"] == done.text  # the whole text, the tag inline (V3, §8)
    assert success["result"]["response"] == done.text and success["error"] is None
    path = Path(success["result"]["voiceover_path"])
    assert path.parent == game.voices  # path_style posix: as is
    data = path.read_bytes()
    assert wav_problem(data) == ""
    assert (len(data) - WAV_HEADER) / 4 / 44100 == pytest.approx(pcm_s, rel=0.03)
    assert success["created_at"] == pending["body"]["created_at"] <= success["updated_at"]
    assert status["uid"] == uid and status["status"] == "SUCCESS"
    assert status["result"]["audio_path"] == str(path) and status["silero_connected"] is True
    assert (status["GM_ON"], status["GM_READ"], status["GM_VOICE"]) == (False, False, False)


def test_the_requests_that_make_no_reply_get_the_apps_answers(game: Game) -> None:
    with connected(game) as client:
        greet(client)
        client.send({"action": "get_task_status", "task_uid": "nope"})
        assert client.next() == {"type": "error", "error": "Task nope not found"}
        client.send({"action": "get_task_status"})
        assert client.next() == {"type": "error", "error": "Missing task_uid"}
        client.send({"action": "fly"})
        assert client.next() == {"type": "error", "error": "Unknown action: fly"}
        client.send(create("system_info_flush", character="Kind"))
        flush = client.next()
        assert (flush["status"], flush["body"]["error"]) == ("ABORTED", "No pending system_info to flush")
        client.send(create("system_info", "The player picked up a key", character="Kind"))
        assert client.next() == {"type": "info", "stored": 1}
        client.send(create("react", req_id=7))
        react = client.next()
        assert react["status"] == "ABORTED" and react["uid"].startswith("abrt_")
        assert react["body"]["error"] == "React disabled by settings" and react["body"]["data"]["req_id"] == 7
        client.send(create("dance"))
        dance = client.next()
        assert dance["status"] == "ABORTED" and dance["body"]["error"] == "Unknown event type: dance"
        client.send({"action": "get_settings", "character": "Kind"})
        settings = client.next()
        assert settings["type"] == "loaded_settings" and settings["body"]["settings"]["CHARACTER"] == "Kind"


def test_objects_may_come_several_in_one_send_or_one_in_several(game: Game) -> None:
    with connected(game) as client:
        client.send({"action": "get_task_status"}, {"action": "fly"})  # the first send of the connection
        assert [line["type"] for line in client.until(lambda got: len(got) == 3)] == ["loaded_settings", "error",
                                                                                      "error"]
        client.send({"action": "get_task_status", "task_uid": "a"}, {"action": "get_task_status", "task_uid": "b"})
        assert [line["error"] for line in client.until(lambda got: len(got) == 5)[3:]] == ["Task a not found",
                                                                                         "Task b not found"]
        raw = json.dumps({"action": "get_task_status", "task_uid": "split"}).encode()
        client.sock.sendall(raw[:10])
        time.sleep(0.2)
        client.sock.sendall(raw[10:] + b"\n  ")
        assert client.next()["error"] == "Task split not found"


def test_a_new_answer_cancels_the_running_one(daemon: Daemon, game: Game) -> None:
    tap = bus_connect(daemon.runtime_dir, "test-b-cancel", "llm.done")
    with connected(game) as client:
        greet(client)
        old = start(client, message="Tell me a story")
        new = start(client, message="Never mind")
        client.until(ended(new))
        statuses = {}
        while set(statuses) != {old, new}:
            message = tap.receive(10.0)
            assert message is not None, "the bus carried no llm.done for both tasks"
            if isinstance(message.body, LlmDone) and message.id in (old, new):
                statuses[message.id] = message.body.status
        tap.close()
        assert statuses == {old: "interrupted", new: "ok"}  # the daemon stopped the old reply too
        assert [update["status"] for update in client.updates(old)] == ["PENDING", "CANCELLED"]
        assert [update["status"] for update in client.updates(new)] == ["PENDING", "VOICING", "SUCCESS"]
        cancelled = client.updates(old)[-1]["body"]
        assert cancelled["error"] and "barge-in" in cancelled["error"]
        assert client.updates(new)[-1]["body"]["result"]["response"] == reply_for("Never mind")
        client.send({"action": "get_task_status", "task_uid": old})
        assert client.next()["status"] == "CANCELLED"


def test_system_info_goes_with_the_flush_task(game: Game) -> None:
    with connected(game) as client:
        greet(client)
        client.send(create("system_info", "The lights went out", character="Cappy"))
        assert client.next() == {"type": "info", "stored": 1}
        uid = start(client, type="system_info_flush", character="Cappy")
        client.until(ended(uid))
        assert client.updates(uid)[-1]["status"] == "SUCCESS"
        client.send(create("system_info_flush", character="Cappy"))
        assert client.next()["body"]["error"] == "No pending system_info to flush"  # the flush took them


def test_garbage_closes_the_connection_and_the_link_keeps_serving(game: Game) -> None:
    with connected(game) as client:
        greet(client)
        client.sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        client.sock.settimeout(10)
        with contextlib.suppress(ConnectionResetError):
            assert client.sock.recv(100) == b""
    with connected(game) as client:
        client.send({"action": "get_task_status", "task_uid": "x"})
        assert [line.get("error") for line in client.until(lambda got: len(got) == 2)] == [None, "Task x not found"]


def test_a_repeated_idle_timeout_gets_the_pending_idle_task_again(game: Game) -> None:
    with connected(game) as client:
        greet(client)
        uid = start(client, type="idle_timeout", character="Kind")
        again = start(client, type="idle_timeout", character="Kind")
        assert again == uid  # the app's re-send of a still PENDING idle task (create_task.py:148-155)
        client.until(ended(uid))
        final = client.updates(uid)[-1]
        assert final["status"] == "SUCCESS" and final["body"]["type"] == "idle"
        assert abs(final["body"]["created_at"] - time.time()) < 60  # unix times, as the app's tasks
        assert start(client, type="idle_timeout", character="Kind") != uid  # once it moved on: a new one


def test_a_failed_reply_is_failed_on_generation(game: Game) -> None:
    with connected(game) as client:
        greet(client)
        uid = start(client, message="Hi", character="Nobody")  # its persona does not exist: llm refuses it
        client.until(ended(uid))
        final = client.updates(uid)[-1]
        assert final["status"] == "FAILED_ON_GENERATION" and "Nobody" in final["body"]["error"]


def test_the_reply_text_keeps_the_models_spacing_and_only_the_games_tags() -> None:
    tags = frozenset({"e", "a"})
    assert reply_text("Done <e>smile</e> here.\nNext <a>wave</a>line.", tags) == \
        "Done <e>smile</e> here.\nNext <a>wave</a>line."
    assert reply_text("Hi <+memory>high|likes tea</memory>there <c>x</c>.", tags) == "Hi there ."
    assert reply_text("<b>Bold</b> and <e>a<b</e>", tags) == "Bold and "  # formatting kept as text; an unsafe body out
