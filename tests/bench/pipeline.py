"""Whole-daemon timings seen by a front-end: time to first text, chunk and audio, and throughput.

A client on the bus publishes a `request` and notes, on its own monotonic clock, when the
first message of each kind arrives for it; the reply is over at its final `playback`.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

from tests.harness import Daemon
from voxpipe import protocol
from voxpipe.protocol import Error, LlmDone, Message, Playback, Request, Text
from voxpipe.runtime import Connection, endpoints_for

MILESTONES = ("text", "chunk", "audio", "playback.first", "llm.done", "playback")
"""What a reply passes; `playback.first` is its first playback event (`started`), `playback` its final one."""
KINDS = ("text", "chunk", "audio", "llm.done", "playback", "error")


class BenchError(RuntimeError):
    """A reply did not complete; the message says how far it got."""


@dataclass
class Sample:
    """One reply: ms from the request to each milestone, its final text and why it ended."""

    stream: bool
    ms: dict[str, float] = field(default_factory=dict)
    text: str = ""
    finish: str = ""
    session: str = ""
    ts: dict[str, float] = field(default_factory=dict)
    """Wall-clock `ts` of the request and of each milestone's first message, as its sender stamped it:
    where the time went between stages, not only when the client saw it."""


@dataclass
class Client:
    """A front-end on the daemon's bus that also keeps every error event it sees."""

    connection: Connection
    errors: Counter[str] = field(default_factory=Counter)

    @classmethod
    def attach(cls, daemon: Daemon) -> Client:
        connection = Connection(f"bench.{uuid.uuid4().hex[:6]}", endpoints_for(daemon.config()),
                                [protocol.subscription(kind) for kind in KINDS])
        connection.open()
        return cls(connection)

    def receive(self, deadline: float) -> Message:
        message = self.connection.receive(max(0.0, deadline - time.monotonic()))
        if message is None:
            raise BenchError("no message before the deadline")
        if isinstance(message.body, Error):
            self.errors[f"{message.src}: {message.body.code}: {message.body.message[:120]}"] += 1
        return message

    def ask(self, session: str, text: str, stream: bool | None = None, profile: str = "") -> str:
        request_id = uuid.uuid4().hex[:12]
        self.connection.publish(session, request_id, Request(text=text, stream=stream, profile=profile))
        return request_id

    def close(self) -> None:
        self.connection.close()


def time_reply(client: Client, text: str, stream: bool, timeout: float, profile: str = "") -> Sample:
    """Ask once in a fresh session (no history) and wait until the reply has played."""
    sample = Sample(stream, session=f"ttfa-{uuid.uuid4().hex[:8]}")
    start = time.monotonic()
    sample.ts["request"] = time.time()
    request_id = client.ask(sample.session, text, stream, profile)
    deadline = start + timeout
    while "playback" not in sample.ms:
        try:
            message = client.receive(deadline)
        except BenchError:
            raise BenchError(f"stream={stream}: no final playback within {timeout:g} s; "
                             f"reached {sample.ms}") from None
        elapsed = (time.monotonic() - start) * 1000
        body = message.body
        if message.id != request_id or isinstance(body, Error):
            continue
        if isinstance(body, LlmDone):
            if body.status != "ok":
                raise BenchError(f"stream={stream}: llm.done {body.status}: {body.error}")
            sample.text = body.text
            sample.finish = body.finish_reason + (f" ({body.guard})" if body.guard else "")
        if isinstance(body, Text) and not body.delta:
            continue
        if isinstance(body, Playback):
            if body.final and body.event != "finished":
                raise BenchError(f"stream={stream}: playback {body.event} after {sample.ms}")
            sample.ms.setdefault("playback.first", elapsed)
        if not isinstance(body, Playback) or body.final:
            sample.ms.setdefault(message.kind, elapsed)
            sample.ts.setdefault(message.kind, message.ts)
    return sample


def compare_modes(client: Client, text: str, count: int, timeout: float) -> tuple[list[Sample], list[Sample]]:
    """One untimed warm-up per mode, then `count` replies per mode interleaved on, off, on, ...

    Returns (warm-ups, timed samples).
    """
    warmups = [time_reply(client, text, stream, timeout) for stream in (True, False)]
    samples = [time_reply(client, text, stream, timeout) for _ in range(count) for stream in (True, False)]
    return warmups, samples


@dataclass
class Throughput:
    replies: int
    sessions: int
    seconds: float
    latencies_ms: list[float]
    stopped: int
    """Replies whose playback ended `stopped` instead of `finished`."""


def throughput(client: Client, sessions: int, total: int, timeout: float) -> Throughput:
    """Keep one reply in flight per session, asking again on each final playback, until `total`."""
    asked: dict[str, tuple[str, float]] = {}
    latencies: list[float] = []
    stopped = 0
    start = time.monotonic()
    deadline = start + timeout

    def ask(session: str) -> None:
        asked[client.ask(session, f"{session} question {len(asked)}")] = (session, time.monotonic())

    for index in range(sessions):
        ask(f"load{index}")
    while len(latencies) < total:
        try:
            message = client.receive(deadline)
        except BenchError:
            raise BenchError(f"only {len(latencies)} of {total} replies within {timeout:g} s") from None
        body = message.body
        if not isinstance(body, Playback) or not body.final or message.id not in asked:
            continue
        session, sent = asked[message.id]
        stopped += body.event != "finished"
        latencies.append((time.monotonic() - sent) * 1000)
        if len(asked) < total:
            ask(session)
    return Throughput(total, sessions, time.monotonic() - start, latencies, stopped)
