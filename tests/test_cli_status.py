"""`voxpipe status` reads heartbeats the way the protocol defines them, and never raises on one.

docs/protocol.md §5.15: `shard`, `counters` and `streams` are optional, with defaults; a heartbeat
that omits them (or carries something odd) is still shown, one row per stage.
"""

from __future__ import annotations

import argparse
import itertools
from types import SimpleNamespace
from typing import ClassVar

import pytest

from voxpipe import cli, protocol
from voxpipe.protocol import Heartbeat, Message


def heartbeat(src: str, **fields: object) -> Message[Heartbeat]:
    """A heartbeat as a Message, with exactly the given fields: no defaults filled in, nothing checked
    (the body is filled in the way `wire.validate` fills in one it has checked)."""
    return Message(Heartbeat.from_checked(dict(fields)), "", "", 0, 1.0, src)


class FakeConnection:
    """Stands in for runtime.Connection: hands out the given heartbeats, then nothing."""

    beats: ClassVar[list[Message]] = []

    def __init__(self, src: str, endpoints: object, subscriptions: list[bytes]) -> None:
        assert subscriptions == [protocol.subscription("heartbeat")]
        self.pending = list(self.beats)

    def require_bus(self) -> None:
        pass

    def open(self, timeout: float) -> None:
        pass

    def receive(self, timeout: float) -> Message | None:
        return self.pending.pop(0) if self.pending else None

    def close(self) -> None:
        pass


def status(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *beats: Message) -> tuple[int, str]:
    clock = itertools.count(0.0, 0.1)
    monkeypatch.setattr(cli, "time", SimpleNamespace(monotonic=lambda: next(clock)))
    monkeypatch.setattr(cli, "Connection", FakeConnection)
    monkeypatch.setattr(cli, "endpoints_for", lambda config: None)
    monkeypatch.setattr(FakeConnection, "beats", list(beats))
    code = cli.cmd_status(argparse.Namespace(), None)  # type: ignore[arg-type]
    return code, capsys.readouterr().out


def test_status_shows_a_full_heartbeat(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    beat = Message(Heartbeat(pid=42, uptime=61.4, state="ready", shard="0/1", counters={"received": 5, "published": 7},
                             streams={}), "", "", 3, 1.0, "llm")
    protocol.encode(beat)  # a heartbeat as valid as a stage sends
    code, out = status(monkeypatch, capsys, beat)
    assert code == cli.EXIT_OK
    assert out.splitlines()[1].split() == ["llm", "42", "ready", "61s", "0/1", "published=7", "received=5"]


def test_status_fills_in_the_defaults_of_a_heartbeat_without_optional_fields(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = status(monkeypatch, capsys, heartbeat("tts", pid=7, uptime=3, state="ready"))
    assert code == cli.EXIT_OK
    assert out.splitlines()[1].split() == ["tts", "7", "ready", "3s", "-"]


def test_status_never_raises_on_odd_or_missing_fields(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    code, out = status(monkeypatch, capsys,
                       heartbeat("a", pid=None, uptime="soon", state=None, shard=None, counters=None, streams=None),
                       heartbeat("b"),
                       heartbeat("c", pid=1, uptime=1.0, state="ready", shard=3, counters=["odd"]),
                       heartbeat("d", pid=2, uptime=2.0, state="stopping", counters={1: 2, "x": None}))
    assert code == cli.EXIT_OK
    rows = [line.split() for line in out.splitlines()[1:]]
    assert rows == [["a", "?", "?", "soon", "-"], ["b", "?", "?", "?", "-"],
                    ["c", "1", "ready", "1s", "3", "['odd']"], ["d", "2", "stopping", "2s", "-", "1=2", "x=None"]]


def test_status_lists_a_stage_that_is_down_with_why(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A stage that is down sends no heartbeat; `voxpipe run`'s own says which, and why."""
    launcher = Message(Heartbeat(pid=9, uptime=30.0, state="ready", children={
        "llm": "ready", "tts": "down: was killed by SIGKILL; restarting in 0.25 s", "player": "starting"}),
        "", "", 0, 1.0, "launcher")
    protocol.encode(launcher)
    code, out = status(monkeypatch, capsys, launcher, heartbeat("llm", pid=7, uptime=3, state="ready"))
    assert code == cli.EXIT_OK
    rows = out.splitlines()[1:]
    assert [row.split()[:3] for row in rows] == [["launcher", "9", "ready"], ["llm", "7", "ready"],
                                                  ["player", "-", "starting"], ["tts", "-", "down"]]
    assert rows[-1].endswith("was killed by SIGKILL; restarting in 0.25 s")
