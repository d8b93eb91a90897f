"""`voxpipe game` as a real process over a real daemon (fake OpenAI server, espeak-ng, player null),
played by the MiSide mod test double (tests/fakes/miside_mod.py) on the mod's own timing.

What the design (docs/design/game-link.md §10 "Real daemon") asks of the link as the game sees it:
polls answered at once and never sent to the model, a player's line delivered phrase by phrase with a
voice file per phrase that the mod can play, barge-in, malformed input refused without harm, one link
per port, the whole-reply mode, dialect B, and `voxpipe run` supervising it.  A bus tap beside the link
shows what it published and what espeak-ng produced, so the files can be checked against the PCM.
"""

from __future__ import annotations

import contextlib
import json
import math
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.miside_mod import ModDouble, ShownLine
from tests.fakes.mod_reply import read_reply
from tests.harness import ROOT, Daemon, fake_openai, free_port, heartbeat_pids, openai_settings, stop_process
from tests.harness import connect as bus_connect
from voxpipe.frontends.game.modmodel import clean_from_tags
from voxpipe.protocol import Audio, Cancel, Chunk, Message, Playback, Request

KEY = {"FAKE_OPENAI_KEY": "test-key"}
SESSION = "game.Crazy"


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    with fake_openai(delay=0.05) as url, Daemon(openai_settings(url), env=KEY) as running:
        yield running


@dataclass
class Link:
    process: subprocess.Popen[str]
    port: int
    voices: Path


@contextlib.contextmanager
def game_link(daemon: Daemon, **settings: str) -> Iterator[Link]:
    """`voxpipe game` on a free port with its own voice dir; `settings` are [game] keys (as env overrides)."""
    port = free_port()
    voices = daemon.dir / f"voices-{port}"
    env = {**daemon.env, "VOXPIPE_GAME__VOICE_DIR": str(voices),
           **{f"VOXPIPE_GAME__{key.upper()}": value for key, value in settings.items()}}
    process = subprocess.Popen(daemon.cli("game", "--port", str(port)), cwd=ROOT, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None
    try:
        line = process.stdout.readline()
        assert "listening on" in line, f"exited: {process.wait()} {process.stderr.read() if process.stderr else ''}"
        yield Link(process, port, voices)
    finally:
        code, err = stop_process(process)
        assert code == 0, err


class Tap:
    """A bus subscriber beside the link: every message of the game sessions, as it comes."""

    def __init__(self, daemon: Daemon, *kinds: str) -> None:
        self.client = bus_connect(daemon.runtime_dir, f"test-game-tap-{time.monotonic_ns()}", *kinds)
        self.seen: list[Message[Any]] = []

    def read(self, seconds: float = 0.3) -> list[Message[Any]]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            message = self.client.receive(0.05)
            if message is not None and message.session.startswith("game."):
                self.seen.append(message)
        return self.seen

    def bodies(self, kind: type) -> list[tuple[str, Any]]:
        return [(message.id, message.body) for message in self.seen if isinstance(message.body, kind)]

    def close(self) -> None:
        self.client.close()


@contextlib.contextmanager
def tap(daemon: Daemon, *kinds: str) -> Iterator[Tap]:
    watcher = Tap(daemon, *kinds)
    try:
        yield watcher
    finally:
        watcher.close()


def plain(text: str) -> str:
    """What the player reads of a line: tags out, spaces as one."""
    return " ".join(clean_from_tags(text).split())


def played_out(mod: ModDouble, count: int) -> list[ShownLine]:
    """The first `count` voiced lines, once the last of them has finished sounding and no line shows."""
    lines = mod.voiced_lines()
    done = len(lines) >= count and not mod.dialog_active and all(
        line.audio_end is not None and line.audio_end < time.monotonic() for line in lines[:count])
    return lines[:count] if done else []


def test_polls_are_answered_at_once_well_typed_and_never_reach_the_model(daemon: Daemon) -> None:
    """A28: a poll answered in over 0.5 s shows "..."; R3/R4: every reply well-typed; V6: silero constant;
    A25: a poll with nothing new publishes no request."""
    with tap(daemon, "request") as watcher, game_link(daemon) as link, ModDouble(link.port) as mod:
        mod.wait_for(lambda: len(mod.replies()) >= 20, timeout=30)
        watcher.read(0.3)
    replies = mod.replies()
    assert mod.log.failures() == [] and mod.log.dots == 0
    assert max(reply.latency or math.inf for reply in replies) < 0.5
    assert all(reply.fields and reply.fields["silero"] is True and reply.fields["response"] == "" for reply in replies)
    assert watcher.bodies(Request) == []


def test_a_player_line_comes_phrase_by_phrase_each_with_its_own_voice(daemon: Daemon) -> None:
    """Design §2.2/§5: phrase 1 on the held request with its WAV under the same id, the next in a poll;
    F1-F5: each file is 44.1 kHz stereo, as long as espeak-ng's PCM of that chunk, deleted by the mod;
    §2.4: the next phrase's voice starts after the previous one's ends; §4.1: the game state and the
    character reach the request."""
    with tap(daemon, "request", "audio", "chunk") as watcher, game_link(daemon) as link, \
            ModDouble(link.port) as mod:
        mod.set_state(distance=3.27, room_player=1, room_mita=0)
        mod.wait_for(lambda: mod.replies(), timeout=10)
        assert mod.say("Привет")
        lines = mod.wait_for(lambda: played_out(mod, 2), timeout=30)
        watcher.read(0.5)
    spoken = next(request for request in mod.requests() if request.kind == "player")
    assert [plain(line.text) for line in lines] == ["Echo: Привет.", "Done here."]
    assert "<e>smile</e>" in lines[1].text  # the tag rides inline in the phrase that carries it
    assert lines[0].id == spoken.id and lines[1].id > spoken.id  # the held request, then a poll
    assert len({line.wav_path for line in lines}) == 2 and all(line.wav_path.startswith("Z:\\") for line in lines)
    assert all(line.header_problem == "" and line.gain == pytest.approx(32768 / 32767) for line in lines)
    assert all(line.wav_file is not None and not line.wav_file.exists() for line in lines)
    assert lines[1].audio_start is not None and lines[0].audio_end is not None
    assert lines[1].audio_start >= lines[0].audio_end - 0.05
    ((reply_id, request),) = watcher.bodies(Request)
    assert request.persona == "Crazy" and "3.27" in request.system and request.text == "Привет"
    pcm: dict[int, int] = {}
    for id, audio in watcher.bodies(Audio):
        if id == reply_id:
            pcm[audio.chunk] = pcm.get(audio.chunk, 0) + len(audio.pcm) // (audio.width * audio.channels)
            rate = audio.rate
    assert sorted(pcm) == [0, 1]
    for line, chunk in zip(lines, sorted(pcm), strict=True):
        assert abs((line.wav_bytes - 44) // 4 - math.ceil(pcm[chunk] * 44100 / rate)) <= 2
    assert mod.log.failures() == [] and mod.log.dots <= 4  # "..." only while the first phrase was made
    assert all(reply.fields and reply.fields["silero"] for reply in mod.replies())
    assert mod.wait_for(lambda: not any(link.voices.iterdir()), timeout=5)


def test_the_player_speaking_again_stops_the_old_reply(daemon: Daemon) -> None:
    """Design §2.7 barge-in: once the player speaks (after the mod's 2 s cooldown, A18), no phrase of the
    old reply is handed to the mod after the new request; the old reply is cancelled and its playback
    reported stopped."""
    long_text = "Раз два три. Четыре пять шесть. Семь восемь девять. Десять одиннадцать. Двенадцать тринадцать."
    with tap(daemon, "chunk", "cancel", "playback", "request") as watcher, game_link(daemon) as link, \
            ModDouble(link.port) as mod:
        mod.wait_for(lambda: mod.replies(), timeout=10)
        mod.say(long_text)
        first = mod.wait_for(lambda: mod.voiced_lines(), timeout=20)[0]
        sent = next(request for request in mod.requests() if request.kind == "player")
        mod.wait_for(lambda: time.monotonic() - sent.sent_at > 2.2 and mod.can_type(), timeout=20)
        assert mod.say("Стоп")
        again = mod.wait_for(lambda: [r for r in mod.requests() if r.kind == "player" and r.id > sent.id], timeout=5)[0]
        mod.wait_for(lambda: len([line for line in mod.voiced_lines() if line.id >= again.id]) >= 2, timeout=20)
        watcher.read(2.0)  # time for a stray phrase of the old reply to come, were it still paced out
    old_id, new_id = (id for id, _ in watcher.bodies(Request))
    chunks = {id: [plain(chunk.text) for chunk_id, chunk in watcher.bodies(Chunk) if chunk_id == id]
              for id in (old_id, new_id)}
    old = [line for line in mod.lines() if line.id < again.id]
    assert first in old and len(old) < len(chunks[old_id]), f"nothing left to stop: {len(old)} of {chunks[old_id]}"
    assert [plain(line.text) for line in mod.lines() if line.id >= again.id] == chunks[new_id]
    assert old_id in [id for id, _ in watcher.bodies(Cancel)]  # the model stops, if it is still writing
    stopped = [body for id, body in watcher.bodies(Playback) if id == old_id and body.event == "stopped"]
    assert stopped and stopped[-1].final  # history learns the old reply was cut off
    assert mod.log.failures() == []


def test_malformed_input_is_refused_while_the_game_is_served(daemon: Daemon) -> None:
    """Design §7.1: garbage closed without a reply, a stalled request closed after read_timeout_s, an
    oversize one refused, a wrongly typed one answered empty with id -1; the mod's polls go on meanwhile."""
    with game_link(daemon, read_timeout_s="1") as link, ModDouble(link.port) as mod:
        mod.wait_for(lambda: mod.replies(), timeout=10)

        def exchange(data: bytes, wait: float = 5.0) -> tuple[bytes, float]:
            with socket.create_connection(("127.0.0.1", link.port)) as sock:
                sock.settimeout(wait)
                started = time.monotonic()
                with contextlib.suppress(OSError):
                    sock.sendall(data)
                got = b""
                with contextlib.suppress(OSError):
                    while chunk := sock.recv(65536):
                        got += chunk
                return got, time.monotonic() - started

        assert exchange(b"GET / HTTP/1.1\r\n\r\n")[0] == b""
        stalled, took = exchange(b'{"id": 1, "input": "wai')
        assert stalled == b"" and 0.8 < took < 3
        assert exchange(b'{"id": 1, "input": "' + b"x" * (5 << 20) + b'"}', wait=10)[0] == b""
        typed, _ = exchange(json.dumps({"id": "7", "input": "waiting", "character": "Crazy"}).encode())
        reply = read_reply(typed)
        assert reply["id"] == -1 and reply["response"] == "" and reply["silero"] is True
        count = len(mod.replies())
        mod.wait_for(lambda: len(mod.replies()) > count + 2, timeout=5)
    assert mod.log.failures() == [] and mod.log.dots == 0


def test_one_link_per_port(daemon: Daemon) -> None:
    """Design §7.1: a second link on the same port exits 2 naming the one running; a port held by another
    program (the NeuroMita app) exits 2 naming the port and the app."""
    with game_link(daemon) as link:
        second = subprocess.run(daemon.cli("game", "--port", str(link.port)), cwd=ROOT, env=daemon.env, text=True,
                                capture_output=True, timeout=30)
    assert second.returncode == 2 and "already running" in second.stderr, second.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        held = subprocess.run(daemon.cli("game", "--port", str(port)), cwd=ROOT, env=daemon.env, text=True,
                              capture_output=True, timeout=30)
    assert held.returncode == 2 and f"{port} is in use" in held.stderr and "NeuroMita" in held.stderr, held.stderr


def test_whole_mode_sends_the_text_first_and_one_voice_later(daemon: Daemon) -> None:
    """Design §3.4 whole mode (the app's way): the full text on the held request with no path, then one WAV
    in a later poll under the text request's id, which the mod's voice wait picks up (V5)."""
    with game_link(daemon, delivery="whole") as link, ModDouble(link.port) as mod:
        mod.wait_for(lambda: mod.replies(), timeout=10)
        mod.say("Привет")
        (line,) = mod.wait_for(lambda: played_out(mod, 1), timeout=30)
    spoken = next(request for request in mod.requests() if request.kind == "player")
    replies = {reply.request_id: reply.fields for reply in mod.replies()}
    text_reply = replies[spoken.id]
    assert text_reply is not None and plain(text_reply["response"]) == "Echo: Привет. Done here."
    assert text_reply["patch_to_sound_file"] == ""
    (voiced,) = [id for id, fields in replies.items() if fields and fields["patch_to_sound_file"]]
    assert voiced > spoken.id and replies[voiced]["id_sound"] == spoken.id  # type: ignore[index]
    assert line.id == spoken.id and line.header_problem == "" and len(mod.voiced_lines()) == 1
    assert mod.log.failures() == []


def test_dialect_b_over_one_connection(daemon: Daemon) -> None:
    """Design §8: loaded_settings on connect, a task PENDING → VOICING → SUCCESS with a 44.1 kHz stereo WAV,
    react ABORTED, an unknown action an error; all on one connection, "\\n"-terminated."""
    with game_link(daemon) as link, socket.create_connection(("127.0.0.1", link.port)) as sock:
        sock.settimeout(30)
        stream = sock.makefile("rb")

        def send(**message: Any) -> None:
            sock.sendall(json.dumps(message).encode() + b"\n")

        def until(predicate: Any) -> list[dict[str, Any]]:
            seen: list[dict[str, Any]] = []
            while not seen or not predicate(seen[-1]):
                seen.append(json.loads(stream.readline()))
            return seen

        send(action="create_task", type="answer", character="Crazy", data={"message": "Привет"}, req_id=1)
        updates = until(lambda message: message.get("status") in ("SUCCESS", "FAILED_ON_GENERATION",
                                                                  "FAILED_ON_VOICEOVER"))
        assert updates[0]["type"] == "loaded_settings"
        statuses = [message["status"] for message in updates if message["type"] == "task_update"]
        assert statuses[0] == "PENDING" and "VOICING" in statuses and statuses[-1] == "SUCCESS"
        path = Path(updates[-1]["body"]["result"]["voiceover_path"].replace("\\", "/").removeprefix("Z:"))
        data = path.read_bytes()
        assert data[22:24] == b"\x02\x00" and int.from_bytes(data[24:28], "little") == 44100
        send(action="create_task", type="react", character="Crazy", data={"message": "x"})
        assert until(lambda message: message.get("status") == "ABORTED")[-1]["status"] == "ABORTED"
        send(action="dance")
        assert until(lambda message: message.get("type") == "error")[-1]["error"] == "Unknown action: dance"


def test_run_supervises_the_link_when_game_is_enabled(tmp_path: Path) -> None:
    """Design §7.4: `voxpipe run` with game.enabled starts it (its heartbeat), and the stop empties the
    voice dir."""
    port, voices = free_port(), tmp_path / "voices"
    with Daemon({"run": {"stages": ["history"]},
                 "game": {"enabled": True, "port": port, "voice_dir": str(voices)}}) as daemon:
        assert "game" in heartbeat_pids(daemon.runtime_dir, "game")
        with ModDouble(port) as mod:
            mod.wait_for(lambda: len(mod.replies()) >= 2, timeout=10)
        (voices / f"voxpipe-game-{port}-{'0' * 32}.wav").write_bytes(b"RIFF")  # a voice file it would not deliver
        assert daemon.stop() == 0
    assert not any(voices.iterdir())
