"""One participant's connection to the bus, shared by stages, the client library and the CLI.

`Connection` confirms its subscriptions before the first publish (the slow-joiner trap), numbers
and validates what it sends, and validates and gap-checks what it receives. A bad frame becomes an
`error` event, a log line and a counter, never an exception in the caller.

The broker is the one process every message passes through, so its death must never leave anyone
waiting: a socket monitor reports the moment the connection to it drops (the kernel closes the
socket of a process that dies, however it dies; ZMTP heartbeats catch a broker that hangs or a
network that drops), and `receive` raises `BusLost` at once. The connection stays usable: libzmq
reconnects when a broker is back, and the next `receive` (or `ensure_live`, before publishing)
repeats the hello handshake first, so subscriptions are confirmed again before anything is sent.
"""

from __future__ import annotations

import collections
import logging
import os
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

BUS_HEARTBEAT_MS = 250
"""ZMTP heartbeat interval to the broker; a broker silent for BUS_HEARTBEAT_TIMEOUT_MS counts as lost."""
BUS_HEARTBEAT_TIMEOUT_MS = 750
REHANDSHAKE_S = 1.0
"""How long one attempt at a new handshake waits after the bus was lost; receive() keeps trying."""
PUB_LINGER_MS = 1000
"""Long enough for the last queued messages (say, llm.done) to leave on close."""
HELLO_INTERVAL_S = 0.02
_MAX_TRACKED = 20_000
_MAX_HEARTBEAT_STREAMS = 4000
_HEARTBEAT_STREAM_BYTES = Heartbeat.max_bytes // 2
"""What a heartbeat's stream map may take in its frame (keys in UTF-8, and room for each seq): half the
heartbeat's limit, leaving the rest for the counters, whatever ids clients chose for their requests."""
_STREAM_ENTRY_OVERHEAD = 16
"""Bytes a stream entry takes beside its key: msgpack's headers and a seq (up to 9 bytes)."""


class VoxpipeError(RuntimeError):
    """Anything that stops a participant from talking to voxpipe; the message says what to do."""


class BusUnavailable(VoxpipeError):
    """The bus did not answer; the message tells the user how to start it."""


class BusLost(BusUnavailable):
    """The connection to the broker dropped (it exited or hung): whatever was in flight is lost."""


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
        self._beats: Recent[str, int] = Recent(_MAX_TRACKED)
        """The seq of each publisher's last heartbeat: a jump means we lost messages (§4.2)."""
        self._pending: collections.deque[bytes] = collections.deque()
        self._monitor: zmq.Socket | None = None
        self._poller = zmq.Poller()
        self.lost = False
        """The connection to the broker dropped and no new handshake has succeeded since."""
        self._hello = protocol.topic("hello", f"{src}.{os.getpid()}.{os.urandom(4).hex()}")
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
        self._heartbeat(self._pub)
        self._pub.sndhwm = protocol.HIGH_WATER_MARK
        self._pub.setsockopt(zmq.MAXMSGSIZE, protocol.BROKER_MAX_BYTES)
        self._pub.connect(self.endpoints.inbound)
        self._sub = self.endpoints.prepare(self._context.socket(zmq.SUB))
        self._sub.linger = 0
        self._sub.rcvhwm = protocol.HIGH_WATER_MARK
        self._sub.setsockopt(zmq.MAXMSGSIZE, protocol.BROKER_MAX_BYTES)
        self._heartbeat(self._sub)
        for prefix in self._subscriptions:
            self._sub.setsockopt(zmq.SUBSCRIBE, prefix)
        hello_session = self._hello.split("/", 1)[1]
        self._sub.setsockopt(zmq.SUBSCRIBE, protocol.subscription("hello", hello_session))
        self._sub.connect(self.endpoints.outbound)
        if self._handshake(timeout):
            self._monitor = self._sub.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            self._poller.register(self._sub, zmq.POLLIN)
            self._poller.register(self._monitor, zmq.POLLIN)
            return
        self.close()
        hint = ("; with bus.curve on, also check that this machine's client.key is in the bus host's "
                "authorized dir and that server.key here is the bus's") if self.endpoints.curve else ""
        raise BusUnavailable(f"no voxpipe bus answered at {self.endpoints.outbound} within {timeout:g} s; "
                             f"start it with `voxpipe run` (or `voxpipe stage bus`){hint}")

    @staticmethod
    def _heartbeat(sock: zmq.Socket) -> None:
        sock.setsockopt(zmq.HEARTBEAT_IVL, BUS_HEARTBEAT_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, BUS_HEARTBEAT_TIMEOUT_MS)

    def _handshake(self, timeout: float) -> bool:
        """Send our hello until it comes back through the broker; True once it has. Other frames that
        come meanwhile (after a reconnection, other participants already talk) are kept, not lost."""
        assert self._pub is not None and self._sub is not None
        hello = self._hello.encode()
        probe = protocol.encode(Message(Hello(), self._hello.split("/", 1)[1], "", 0, time.time(), self.src))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._pub.send(probe)
            if not self._sub.poll(int(HELLO_INTERVAL_S * 1000)):
                continue
            frame = self._sub.recv()
            if frame.startswith(hello):
                self._drain_hellos()
                return True
            self._pending.append(frame)
        return False

    def _drain_hellos(self) -> None:
        """Drop extra copies of our hello that are still in flight."""
        while self._sub is not None and self._sub.poll(int(HELLO_INTERVAL_S * 1000 * 2)):
            frame = self._sub.recv()
            if not frame.startswith(self._hello.encode()):
                self._pending.append(frame)
                return

    def ensure_live(self, timeout: float = REHANDSHAKE_S) -> None:
        """After a lost bus, handshake again before publishing; BusUnavailable if no broker answers."""
        if self.lost:
            if not self._handshake(timeout):
                raise BusUnavailable(f"the voxpipe bus at {self.endpoints.outbound} is gone and no new one "
                                     f"answered within {timeout:g} s; `voxpipe status` shows what runs "
                                     f"(`voxpipe run` restarts it)")
            self.lost = False
            self._log.info("bus is back: subscriptions confirmed again")

    def close(self) -> None:
        if self._sub is not None and self._monitor is not None:
            self._sub.disable_monitor()
            self._monitor.close()
        self._monitor = None
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
            message = Message(body, session, id, seq, time.time(), self.src)
            frame = protocol.encode(message)
            if self._pub is None:
                raise BusUnavailable("connection is closed")
            self._next_seq[key] = seq + 1  # only once it goes out: a refused message leaves no false gap
            self._pub.send(frame)
            if kind != "heartbeat":
                self._recent.pop(key, None)
                self._recent[key] = seq
            self.counters["published"] += 1
        return message

    def take_recent_streams(self) -> dict[str, int]:
        """Last seq of each stream published since the previous call (for heartbeats): the newest ones,
        as many as fit _MAX_HEARTBEAT_STREAMS and _HEARTBEAT_STREAM_BYTES, so the heartbeat always fits
        its frame limit."""
        with self._send_lock:
            recent, self._recent = self._recent, {}
        newest: list[tuple[str, int]] = []
        room = _HEARTBEAT_STREAM_BYTES
        for key, seq in reversed(list(recent.items())[-_MAX_HEARTBEAT_STREAMS:]):
            room -= len(key.encode()) + _STREAM_ENTRY_OVERHEAD
            if room < 0:
                break
            newest.append((key, seq))
        return dict(reversed(newest))

    def send_raw(self, frame: bytes) -> None:
        """Send a frame as is: for tests of how stages treat bad input."""
        with self._send_lock:
            assert self._pub is not None
            self._pub.send(frame)

    # --- receiving ----------------------------------------------------------

    def receive(self, timeout: float) -> Message[Body] | None:
        """The next valid message within `timeout` seconds, or None.

        Invalid frames are counted, logged and reported as error events, then skipped. Raises BusLost
        the moment the connection to the broker drops; after that, each call first tries a new
        handshake (returning None while no broker answers).
        """
        assert self._sub is not None, "open() first"
        deadline = time.monotonic() + timeout
        if self.lost:
            try:
                self.ensure_live(min(timeout, REHANDSHAKE_S))
            except BusUnavailable:
                return None
        while True:
            frame = self._pending.popleft() if self._pending else self._take_queued()
            if frame is None:  # nothing waiting: wait for a frame, or for the monitor to report a lost bus
                remaining = max(0.0, deadline - time.monotonic())
                ready = dict(self._poller.poll(int(remaining * 1000)))
                if self._monitor is not None and self._monitor in ready:
                    self._bus_event()
                if self._sub not in ready:
                    if time.monotonic() >= deadline:
                        return None
                    continue
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

    def waiting(self) -> bool:
        """Whether a frame is already queued for `receive`: a stage that batches its output holds it
        while this is true (Stage.caught_up)."""
        if self._pending:
            return True
        return self._sub is not None and bool(int(self._sub.getsockopt(zmq.EVENTS)) & zmq.POLLIN)

    def _take_queued(self) -> bytes | None:
        """A frame already queued on the SUB, without polling: while messages stream, the per-message cost
        stays what it was before the broker was watched."""
        assert self._sub is not None
        try:
            frame: bytes = self._sub.recv(zmq.NOBLOCK)
        except zmq.Again:
            return None
        return frame

    def _bus_event(self) -> None:
        """A monitor event: the connection to the broker dropped."""
        from zmq.utils.monitor import recv_monitor_message  # imports asyncio and ssl (9 MB): not for every stage

        assert self._monitor is not None
        event = recv_monitor_message(self._monitor)
        if event["event"] == zmq.EVENT_DISCONNECTED and not self.lost:
            self.lost = True
            self._beats = Recent(_MAX_TRACKED)  # every heartbeat sent while the bus was away is lost: BusLost says so
            self.counters["bus_lost"] += 1
            self._log.info("lost the bus at %s", self.endpoints.outbound)  # the caller says it, in its own words
            raise BusLost(f"the voxpipe bus at {self.endpoints.outbound} went away (its process ended or "
                          f"hung), so what was in flight is lost; `voxpipe run` restarts it")

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
        """Report seq gaps within a stream, tail losses that a heartbeat reveals, and lost heartbeats:
        a subscriber too slow for its queue loses whatever overflowed (docs/protocol.md §2.4), and a
        publisher's heartbeats come every second, so a jump in them tells it so even when no stream of
        that time goes on. A lower heartbeat seq is a restarted publisher."""
        if isinstance(message.body, Heartbeat):
            beat = self._beats.get(message.src)
            if beat is not None and message.seq > beat + 1:
                self._gap(message.src, _stream_key(message.kind, "", ""), beat + 1, message.seq - 1)
            self._beats[message.src] = message.seq
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
