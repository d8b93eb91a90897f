"""The stage loop every stage process runs, and how a stage declares what it handles.

A stage subclasses `Stage`, names itself, and marks one method per kind it consumes with
`@handles(Kind)`; the method takes the typed `Message[Kind]`. The runtime subscribes to exactly
those kinds, skips sessions another shard owns, turns a handler's exception into an `internal`
error event, and runs the heartbeats, sd_notify and a clean stop.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import zmq

from .. import protocol
from ..config import Config
from ..protocol import Body, ErrorCode, Heartbeat, Message, ProtocolError
from . import sdnotify
from .broker import runtime_dir
from .connection import BusLost, BusUnavailable, Connection, endpoints_for
from .instance import InstanceLock
from .shard import Shard

Handler = TypeVar("Handler", bound=Callable[..., None])
CATCH_UP_EVERY = 64
"""The most messages a stage takes in before its held output goes out, however far behind it is."""


def handles(*kinds: type[Body]) -> Callable[[Handler], Handler]:
    """Declare a Stage method the handler of these kinds: `@handles(Token)` on
    `def on_token(self, message: Message[Token])`. The stage subscribes to what its handlers take."""
    def declare(method: Handler) -> Handler:
        method.__dict__["handles"] = tuple(kind.kind for kind in kinds)
        return method
    return declare


class Stage:
    """Base of every stage process: subscribe, dispatch, heartbeat, notify systemd, stop cleanly.

    Subclasses set `name`, declare their handlers with `@handles`, and override the hooks; the
    hooks and handlers run on the main thread, and worker threads may call `self.bus.publish`.
    """

    name = "stage"
    handlers: ClassVar[dict[str, str]] = {}
    """Kind -> the name of the method that handles it, collected from the `@handles` marks."""
    sharded = False
    heartbeat_interval = 1.0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.handlers = {kind: name for klass in reversed(cls.__mro__) for name, value in vars(klass).items()
                        for kind in getattr(value, "handles", ())}

    @classmethod
    def kinds(cls) -> tuple[str, ...]:
        """The kinds this stage consumes (heartbeats aside, which every participant reads)."""
        return tuple(cls.handlers)

    def __init__(self, config: Config, shard: Shard = Shard()) -> None:
        self.config = config
        self.shard = shard
        self.src = self.name if shard.count == 1 else f"{self.name}@{shard.index}"
        self.log = logging.getLogger(f"voxpipe.{self.src}")
        subscriptions = [protocol.subscription(kind) for kind in (*self.kinds(), "heartbeat")]
        self.bus = Connection(self.src, endpoints_for(config), subscriptions)
        self._stop = threading.Event()
        self._started_at = time.monotonic()
        self._instance = InstanceLock(runtime_dir(config["bus"]["runtime_dir"]), f"stage-{self.src}")
        self.exit_code = 0
        self._lost_bus = False

    # --- hooks ----------------------------------------------------------------

    def prepare(self) -> None:
        """Load what the stage needs before it connects (models, databases)."""

    def started(self) -> None:
        """Connected and about to report ready: start worker threads here."""

    def tick(self, now: float) -> None:
        """Periodic work on the main thread; `now` is time.monotonic()."""

    def next_tick(self) -> float | None:
        """The monotonic time tick() next has work, or None."""
        return None

    def shutdown(self) -> None:
        """Stop workers and release resources; the bus is still open."""

    def caught_up(self) -> None:
        """Nothing more is queued for this stage (or CATCH_UP_EVERY messages went by): publish what was
        held to be sent together. A stage that keeps up is called after every message, so holding costs
        nothing there; one that fell behind sends one message where it would have sent several."""

    def bus_back(self) -> None:
        """A broker answers again and our subscriptions are confirmed: catch up on what went by while
        there was none."""

    def bus_lost(self) -> None:
        """The broker went away: every client's reply in flight has ended with an error, so drop
        what is held of them (nothing of it could reach anyone). The runtime handshakes again
        when a broker is back."""

    # --- the loop -------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    def run(self) -> int:
        """Run until SIGTERM/SIGINT or request_stop(); returns the exit code.

        Raises AlreadyRunning, before it loads or connects anything, when this stage and shard
        already runs for this user (a second one would take half of the first one's traffic)."""
        self._instance.acquire(f"voxpipe stage {self.src}",
                               "stop that one first (`voxpipe status` lists it), or start another shard")
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, lambda *_: self._stop.set())
        self.prepare()
        self.bus.open()
        try:
            self.started()
            sdnotify.notify("READY=1")
            self._heartbeat("ready")
            self.log.info("ready (shard %s)", self.shard)
            self._loop()
        finally:
            sdnotify.notify("STOPPING=1")
            self._guarded(lambda _: self.caught_up(), None)
            self._heartbeat("stopping")
            self.shutdown()
            self.bus.close()
            self._instance.release()
        return self.exit_code

    def _loop(self) -> None:
        next_beat = time.monotonic() + self.heartbeat_interval
        due = self.next_tick()  # asked once per message: with many replies in flight it is not free
        behind = 0
        while not self._stop.is_set():
            now = time.monotonic()
            wake = min(next_beat, due or next_beat, now + 0.2)
            try:
                message = self.bus.receive(max(0.0, wake - now))
            except BusLost as exc:
                self.log.warning("%s", exc)
                self._guarded(lambda _: self.bus_lost(), None)
                self._lost_bus = True
                continue
            if self._lost_bus and not self.bus.lost:
                self._lost_bus = False
                self.log.info("the bus is back; subscriptions confirmed again")
                self._guarded(lambda _: self.bus_back(), None)
            if message is not None:
                self._dispatch(message)
                behind += 1
            now = time.monotonic()
            due = self.next_tick()
            if due is not None and due <= now:
                self._guarded(self.tick, now)
                due = self.next_tick()
            if behind >= CATCH_UP_EVERY or not self.bus.waiting():
                self._guarded(lambda _: self.caught_up(), None)
                behind = 0
            if now >= next_beat:
                self._heartbeat("ready")
                sdnotify.notify("WATCHDOG=1")
                next_beat = now + self.heartbeat_interval

    def _dispatch(self, message: Message[Body]) -> None:
        if isinstance(message.body, Heartbeat) and message.src == self.src:
            self._check_twin(message.body)
            return
        handler = self.handlers.get(message.kind)
        if handler is None:
            return
        if self.sharded and message.session and not self.shard.owns(message.session):
            self.bus.counters["foreign"] += 1
            return
        self._guarded(getattr(self, handler), message)

    def _check_twin(self, beat: Heartbeat) -> None:
        """Another process heartbeats under our name (a copy on another host, which no lock file can
        see): both would take the same sessions' traffic. The younger one reports it and stops, so
        the one that was serving goes on alone."""
        mine = time.monotonic() - self._started_at
        if beat.pid == os.getpid() and abs(beat.uptime - mine) < 5.0:
            return  # our own heartbeat, back through the broker
        if beat.state == "ready" and beat.uptime > mine:
            self.bus.report(ErrorCode.DUPLICATE_STAGE,
                            f"another {self.src} (pid {beat.pid}, up {beat.uptime:.0f} s) already serves this bus; "
                            f"this one (pid {os.getpid()}) stops. Run one instance per stage and shard",
                            stage=self.src)
            self.exit_code = 2
            self._stop.set()

    def _guarded(self, hook: Any, argument: Any) -> None:
        """Run a hook; a failure becomes an error event and a counter, never a crash."""
        try:
            hook(argument)
        except Exception as exc:  # the stage must survive any one bad message
            self.log.exception("%s failed", getattr(hook, "__name__", "hook"))
            session = getattr(argument, "session", "")
            id = getattr(argument, "id", "")
            self.bus.counters["failures"] += 1
            self.bus.report(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}", session, id,
                            getattr(argument, "kind", ""))

    def _heartbeat(self, state: str) -> None:
        counters = dict(self.bus.counters)
        try:
            self.bus.publish("", "", Heartbeat(pid=os.getpid(), uptime=time.monotonic() - self._started_at,
                                               state=state, shard=str(self.shard), counters=counters,
                                               streams=self.bus.take_recent_streams()))
        except (zmq.ZMQError, BusUnavailable, ProtocolError) as exc:
            self.log.error("heartbeat not sent: %s", exc)
