"""One participant's connection to the bus, shared by stages, the client library and the CLI.

`Connection` confirms its subscriptions before the first publish (the slow-joiner trap), numbers
and validates what it sends, and validates and gap-checks what it receives. A bad frame becomes an
`error` event, a log line and a counter, never an exception in the caller.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterable

import zmq

from .. import protocol
from ..config import Config
from ..protocol import Body, Error, ErrorCode, Heartbeat, Hello, Message, ProtocolError
from .broker import Endpoints, participant_endpoints
from .replies import Recent

PUB_LINGER_MS = 1000
"""Long enough for the last queued messages (say, llm.done) to leave on close."""
HELLO_INTERVAL_S = 0.02
_MAX_TRACKED = 20_000
_MAX_HEARTBEAT_STREAMS = 4000


class VoxpipeError(RuntimeError):
    """Anything that stops a participant from talking to voxpipe; the message says what to do."""


class BusUnavailable(VoxpipeError):
    """The bus did not answer; the message tells the user how to start it."""


def _stream_key(kind: str, session: str, id: str) -> str:
    return f"{kind}/{session}/{id}"


class Connection:
    """A participant's PUB (to the broker's input) and SUB (from its output).

    `publish` may be called from any thread; `receive` only from the owner's thread.
    """

    def __init__(self, src: str, endpoints: Endpoints, subscriptions: Iterable[bytes],
                 context: zmq.Context | None = None) -> None:
        self.src = src
        self.endpoints = endpoints
        self.counters: Counter[str] = Counter()
        self._subscriptions = list(subscriptions)
        self._context = context or zmq.Context.instance()
        self._pub: zmq.Socket | None = None
        self._sub: zmq.Socket | None = None
        self._send_lock = threading.Lock()
        self._next_seq: Recent[str, int] = Recent(_MAX_TRACKED)
        self._recent: dict[str, int] = {}
        self._seen: Recent[tuple[str, str], int] = Recent(_MAX_TRACKED)
        self._pending: bytes | None = None
        self._hello = protocol.topic("hello", f"{src}.{os.getpid()}.{secrets.token_hex(4)}")
        self._log = logging.getLogger(f"voxpipe.{src}")

    # --- lifecycle ----------------------------------------------------------

    def require_bus(self) -> None:
        """Fail at once, not after a timeout, when no broker has ever made its socket file."""
        if self.endpoints.outbound.startswith("ipc://"):
            path = self.endpoints.outbound.removeprefix("ipc://")
            if not os.path.exists(path):
                raise BusUnavailable(f"no voxpipe bus is running ({path} does not exist); "
                                     f"start it with `voxpipe run` (or `voxpipe stage bus`)")

    def open(self, timeout: float = 10.0) -> None:
        """Connect and wait until our own hello comes back through the broker.

        Subscriptions are sent before the hello subscription on the same pipe, so
        once the hello returns, every earlier subscription is live at the broker
        and our publishes reach it: nothing we send or expect is lost.
        """
        self._pub = self.endpoints.prepare(self._context.socket(zmq.PUB))
        self._pub.linger = PUB_LINGER_MS
        self._pub.sndhwm = protocol.HIGH_WATER_MARK
        self._pub.setsockopt(zmq.MAXMSGSIZE, protocol.BROKER_MAX_BYTES)
        self._pub.connect(self.endpoints.inbound)
        self._sub = self.endpoints.prepare(self._context.socket(zmq.SUB))
        self._sub.linger = 0
        self._sub.rcvhwm = protocol.HIGH_WATER_MARK
        self._sub.setsockopt(zmq.MAXMSGSIZE, protocol.BROKER_MAX_BYTES)
        for prefix in self._subscriptions:
            self._sub.setsockopt(zmq.SUBSCRIBE, prefix)
        hello_session = self._hello.split("/", 1)[1]
        self._sub.setsockopt(zmq.SUBSCRIBE, protocol.subscription("hello", hello_session))
        self._sub.connect(self.endpoints.outbound)
        deadline = time.monotonic() + timeout
        probe = protocol.encode(Message(Hello(), hello_session, "", 0, time.time(), self.src))
        while time.monotonic() < deadline:
            self._pub.send(probe)
            if self._sub.poll(int(HELLO_INTERVAL_S * 1000)) and self._sub.recv().startswith(self._hello.encode()):
                self._drain_hellos()
                return
        self.close()
        hint = ("; with bus.curve on, also check that this machine's client.key is in the bus host's "
                "authorized dir and that server.key here is the bus's") if self.endpoints.curve else ""
        raise BusUnavailable(f"no voxpipe bus answered at {self.endpoints.outbound} within {timeout:g} s; "
                             f"start it with `voxpipe run` (or `voxpipe stage bus`){hint}")

    def _drain_hellos(self) -> None:
        """Drop extra copies of our hello that are still in flight."""
        while self._sub is not None and self._sub.poll(int(HELLO_INTERVAL_S * 1000 * 2)):
            frame = self._sub.recv()
            if not frame.startswith(self._hello.encode()):
                self._pending = frame
                return

    def close(self) -> None:
        for sock in (self._sub, self._pub):
            if sock is not None:
                sock.close()
        self._pub = self._sub = None

    # --- sending ------------------------------------------------------------

    def publish(self, session: str, id: str, body: Body) -> Message[Body]:
        """Number, validate and send one message of the reply (session, id); returns what was sent."""
        kind = body.kind
        key = _stream_key(kind, session, id)
        with self._send_lock:
            seq = self._next_seq.get(key) or 0
            self._next_seq[key] = seq + 1
            message = Message(body, session, id, seq, time.time(), self.src)
            frame = protocol.encode(message)
            if self._pub is None:
                raise BusUnavailable("connection is closed")
            self._pub.send(frame)
            if kind != "heartbeat":
                self._recent.pop(key, None)
                self._recent[key] = seq
            self.counters["published"] += 1
        return message

    def take_recent_streams(self) -> dict[str, int]:
        """Last seq of each stream published since the previous call (for heartbeats)."""
        with self._send_lock:
            recent, self._recent = self._recent, {}
        return dict(list(recent.items())[-_MAX_HEARTBEAT_STREAMS:])

    def send_raw(self, frame: bytes) -> None:
        """Send a frame as is: for tests of how stages treat bad input."""
        with self._send_lock:
            assert self._pub is not None
            self._pub.send(frame)

    # --- receiving ----------------------------------------------------------

    def receive(self, timeout: float) -> Message[Body] | None:
        """The next valid message within `timeout` seconds, or None.

        Invalid frames are counted, logged and reported as error events, then skipped.
        """
        assert self._sub is not None, "open() first"
        deadline = time.monotonic() + timeout
        while True:
            if self._pending is not None:
                frame, self._pending = self._pending, None
            else:
                remaining = max(0.0, deadline - time.monotonic())
                if not self._sub.poll(int(remaining * 1000)):
                    return None
                frame = self._sub.recv()
            try:
                message = protocol.decode(frame)
            except ProtocolError as exc:
                self.reject(frame, str(exc))
                if time.monotonic() >= deadline:
                    return None
                continue
            self.counters["received"] += 1
            self._check_sequence(message)
            return message

    def reject(self, frame: bytes, reason: str) -> None:
        self.counters["invalid"] += 1
        head = bytes(frame[:48]).split(protocol.TOPIC_SEPARATOR, 1)[0].decode("ascii", "replace")
        self.report(ErrorCode.INVALID_MESSAGE, f"rejected message on topic {head!r}: {reason}")

    def report(self, code: ErrorCode, text: str, session: str = "", id: str = "", ref_kind: str = "",
               stage: str = "") -> None:
        """Log a problem, count it, and publish it as an error event."""
        self.counters["errors"] += 1
        self._log.warning("%s: %s", code, text)
        try:
            self.publish(session, id, Error(code=code, message=text[:2000], ref_kind=ref_kind, stage=stage))
        except (ProtocolError, BusUnavailable, zmq.ZMQError) as exc:
            self._log.error("cannot publish error event: %s", exc)

    def _check_sequence(self, message: Message[Body]) -> None:
        """Report seq gaps within a stream and tail losses that a heartbeat reveals."""
        if isinstance(message.body, Heartbeat):
            for key, last in message.body.streams.items():
                seen = self._seen.get((message.src, key))
                if seen is not None and seen < last:
                    self._gap(message.src, key, seen + 1, last)
                    self._seen[(message.src, key)] = last
            return
        track = (message.src, _stream_key(message.kind, message.session, message.id))
        seen = self._seen.get(track)
        if seen is not None and message.seq > seen + 1:
            self._gap(message.src, track[1], seen + 1, message.seq - 1, message.session, message.id)
        self._seen[track] = max(message.seq, seen if seen is not None else -1)

    def _gap(self, src: str, key: str, first: int, last: int, session: str = "", id: str = "") -> None:
        self.counters["gaps"] += 1
        self.report(ErrorCode.GAP, f"lost messages {first}..{last} of stream {key} from {src}", session, id)


def endpoints_for(config: Config) -> Endpoints:
    """Where participants connect ([bus] transport, host, port) and with which CURVE keys."""
    return participant_endpoints(config)
