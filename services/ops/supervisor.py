"""`voxpipe run`: start the bus and every stage as child processes and keep them alive.

Readiness comes from the stages' own "ready" heartbeats, so the supervisor
knows a stage is serving, not merely started.  A crashed stage is restarted
with exponential backoff, kept short (0.25 s doubling to 2 s) so a stage is
back before a person asks again; too many crashes in a window is a crash loop,
which stops everything with a message naming the stage.

While a stage a reply passes through is down, a request cannot be answered:
the supervisor, which knows first, fails it at once with `stage_down` naming the
stage, instead of letting its client wait for a timeout.  Its own heartbeat
lists every child's state, so `voxpipe status` shows a stage that is down and why.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import zmq

from .. import protocol
from ..config import EXIT_USAGE, Config
from ..protocol import Body, ErrorCode, Heartbeat, Message, Request
from ..runtime import BusLost, BusUnavailable, Connection, endpoints_for, sdnotify
from ..runtime.broker import Broker, participant_endpoints, runtime_dir
from ..runtime.instance import InstanceLock
from ..runtime.shard import Shard
from ..secrets import check_key_files
from .prometheus import Exposition, serve

log = logging.getLogger("voxpipe.run")
STOP_BUDGET_S = 5.0
BACKOFF_START_S = 0.25
BACKOFF_MAX_S = 2.0
REPLY_STAGES = ("llm", "chunker", "tts", "player")
"""The stages a reply passes through: while one is down, a request fails at once."""
_PR_SET_PDEATHSIG = 1
HOME = Path(__file__).resolve().parents[2]
"""Where children start: the folder that holds voxpipe (the checkout, where launcher.py is), never
the package folder itself, whose secrets.py and config.py would shadow the standard library's."""


def preflight(config: Config) -> None:
    """Make now, before any process starts, every refusal that no restart can fix, so that `voxpipe
    run` exits 2 with the fix instead of a child failing or crash-looping: the bus's own (TCP off
    loopback without CURVE, its keys, the authorised keys), a participant's (connect_host off loopback
    without CURVE, the client keys), the stages' key files, and history's database when other users
    could read it. Each check has its one home there."""
    Broker.from_config(config)
    participant_endpoints(config)
    check_key_files(config, config["run"]["stages"])
    if config["web"]["enabled"] and config["web"]["token_file"]:
        from ..frontends.web.access import read_token_file
        read_token_file(config["web"]["token_file"])
    if "history" in config["run"]["stages"]:
        from ..stages.history.stage import default_db_path
        from ..stages.history.store import check_database

        check_database(default_db_path(config["history"]["db_path"]))


def exit_reason(code: int) -> str:
    """How a child ended, as a person reads it: "was killed by SIGKILL", "exited with code 1"."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _die_with_parent() -> None:
    """Child-side: get SIGTERM if the supervisor dies, so no stage is ever orphaned."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    """One supervised process: a stage (or the bus) and one shard of it."""

    stage: str
    shard: Shard
    process: subprocess.Popen[bytes] | None = None
    crashes: collections.deque[float] = field(default_factory=collections.deque)
    restart_at: float | None = None
    down: str = ""
    """Why the process is down ("" while it runs): its exit, and when it restarts."""

    @property
    def src(self) -> str:
        return self.stage if self.shard.count == 1 else f"{self.stage}@{self.shard.index}"


FRONT_ENDS = ("web", "game")
"""Front-ends `voxpipe run` starts when their section says `enabled = true`."""


class Supervisor:
    def __init__(self, config: Config) -> None:
        self.config = config
        run = config["run"]
        self.bus = Child("bus", Shard())
        self.children = [Child(name, Shard(index, run["instances"][name]))
                         for name in run["stages"] for index in range(run["instances"][name])]
        for front_end in FRONT_ENDS:  # `voxpipe web`, `voxpipe game`: supervised like a stage, ready at a heartbeat
            if config[front_end]["enabled"]:
                self.children.append(Child(front_end, Shard()))
        self.stop = threading.Event()
        self.ready: set[str] = set()
        self.connection: Connection | None = None
        self.exposition: Exposition | None = Exposition() if self.config["metrics"]["prometheus_port"] else None
        """Fed from the start, so the stages' ready heartbeats are in it when it is first served (a stage
        that became ready last would otherwise be missing until its next heartbeat)."""
        self.http: Any = None
        self.lock = InstanceLock(runtime_dir(config["bus"]["runtime_dir"]), "run")
        self.started_at = time.monotonic()
        self.by_src = {child.src: child for child in [self.bus, *self.children]}
        self.next_beat = 0.0
        self.refused = False
        """A child exited EXIT_USAGE before it was ready: its configuration is wrong, so `run` stops with
        that code too."""

    def _command(self, child: Child) -> list[str]:
        command = [sys.executable, "-m", "launcher",
                   *((child.stage,) if child.stage in FRONT_ENDS else ("stage", child.stage))]
        if child.shard.count > 1:
            command += ["--shard", str(child.shard)]
        if self.config.path is not None:
            command += ["--config", str(self.config.path)]
        return command

    def _spawn(self, child: Child) -> None:
        # Only `voxpipe run` talks to systemd; a stage's own READY/WATCHDOG would be rejected noise.
        env = {key: value for key, value in os.environ.items()
               if key not in ("NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC")}
        child.process = subprocess.Popen(self._command(child), preexec_fn=_die_with_parent,
                                         cwd=HOME, env=env)
        child.restart_at = None
        child.down = ""
        self.ready.discard(child.src)
        log.info("started %s (pid %d)", child.src, child.process.pid)

    def run(self) -> int:
        """Supervise until stopped; returns the exit code. Raises, before anything is started,
        ConfigError when a config-time check fails (`preflight`; the runtime dir is checked as the lock
        is taken in it), and AlreadyRunning when this user's voxpipe already runs on this runtime dir."""
        preflight(self.config)
        self.lock.acquire("voxpipe run", "stop it first (`voxpipe status` shows it; `systemctl --user stop "
                                         "voxpipe` for the service), or give this one another bus.runtime_dir")
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.stop.set())
        try:
            code = self._run()
            return EXIT_USAGE if self.refused else code
        finally:
            self._stop_all()

    def _run(self) -> int:
        timeout = self.config["run"]["ready_timeout_s"]
        self._spawn(self.bus)
        if not self._connect(time.monotonic() + min(timeout, 30.0)):
            log.error("the bus did not start; run `voxpipe stage bus` to see why")
            return 1
        for child in self.children:
            self._spawn(child)
        if not self._wait_ready(time.monotonic() + timeout):
            return 1 if not self.stop.is_set() else 0
        self._serve_metrics()
        sdnotify.notify("READY=1")
        print("voxpipe ready: " + ", ".join(sorted(self.ready)), flush=True)
        return self._supervise()

    def _connect(self, deadline: float) -> bool:
        """Connect to our own bus, giving up early if its process has died."""
        while time.monotonic() < deadline and not self.stop.is_set():
            if self.bus.process is not None and self.bus.process.poll() is not None:
                self.refused = self.bus.process.returncode == EXIT_USAGE
                return False
            kinds = ("heartbeat", "request", *(("metrics",) if self.config["metrics"]["prometheus_port"] else ()))
            connection = Connection("launcher", endpoints_for(self.config),
                                    [protocol.subscription(kind) for kind in kinds])
            try:
                connection.open(timeout=1.0)
            except BusUnavailable:
                continue
            self.connection = connection
            return True
        return False

    def _wait_ready(self, deadline: float) -> bool:
        while not self.stop.is_set():
            missing = [child.src for child in self.children if child.src not in self.ready]
            if not missing:
                return True
            if time.monotonic() > deadline:
                log.error("not ready within %g s: %s; run `voxpipe stage %s` to see why",
                          self.config["run"]["ready_timeout_s"], ", ".join(missing), missing[0].split("@")[0])
                return False
            if not self._watch():
                return False
        return False

    def _supervise(self) -> int:
        next_ping = time.monotonic()
        while not self.stop.is_set():
            if not self._watch():
                return 1
            if time.monotonic() >= next_ping:
                sdnotify.notify("WATCHDOG=1")
                next_ping = time.monotonic() + 1.0
        return 0

    def _serve_metrics(self) -> None:
        metrics = self.config["metrics"]
        if self.exposition is not None:
            self.http = serve(self.exposition, metrics["prometheus_bind"], metrics["prometheus_port"])
            log.info("prometheus metrics on http://%s:%d/metrics", metrics["prometheus_bind"],
                     metrics["prometheus_port"])

    def _watch(self) -> bool:
        """Take heartbeats for 0.2 s, then restart dead children; False on a crash loop."""
        assert self.connection is not None
        timeout = 0.2
        while True:  # everything that came, so a state is never judged from a stale queue
            try:
                message = self.connection.receive(timeout)
            except BusLost:
                break  # the bus child is seen dead below and restarted; receive() handshakes again
            if message is None:
                break
            timeout = 0.0
            self._take(message)
        now = time.monotonic()
        if now >= self.next_beat:
            self._heartbeat(now)
        for child in [self.bus, *self.children]:
            if child.restart_at is not None:
                if now >= child.restart_at:
                    self._spawn(child)
                continue
            code = child.process.poll() if child.process else None
            if code is None or self.stop.is_set():
                continue
            if not self._schedule_restart(child, code, now):
                return False
        return True

    def _take(self, message: Message[Body]) -> None:
        body = message.body
        if isinstance(body, Heartbeat) and body.state == "ready":
            child = self.by_src.get(message.src)
            # Only the process we run now: a dead one's last heartbeat may still be on its way.
            if child is not None and child.process is not None and child.process.pid == body.pid:
                self.ready.add(message.src)
        if isinstance(body, Request):
            self._refuse_if_down(cast(Message[Request], message))
        if self.exposition is not None:
            self.exposition.observe(message, time.monotonic())

    def _schedule_restart(self, child: Child, code: int, now: float) -> bool:
        run = self.config["run"]
        if code == EXIT_USAGE and child.src not in self.ready:
            # Refused at start: a config problem only that stage can see, or another copy of it running
            # here. A twin found later (exit 2 after ready) steps aside instead, and is restarted.
            log.error("%s exited with code %d before it was ready, a problem only you can fix; its message "
                      "above names the fix (`voxpipe stage %s` shows it again), and no restart can fix it",
                      child.src, code, child.stage)
            self.refused = True
            return False
        child.crashes.append(now)
        while child.crashes and child.crashes[0] < now - run["restart_window_s"]:
            child.crashes.popleft()
        if len(child.crashes) > run["restart_limit"]:
            log.error("%s crashed %d times within %g s (last exit code %d); giving up. "
                      "Run `voxpipe stage %s` to see why.", child.src, len(child.crashes),
                      run["restart_window_s"], code, child.stage)
            return False
        delay = min(BACKOFF_MAX_S, BACKOFF_START_S * 2 ** (len(child.crashes) - 1))
        assert self.connection is not None
        self.ready.discard(child.src)
        child.down = f"{exit_reason(code)}; restarting in {delay:.2f} s"
        self.connection.report(ErrorCode.STAGE_CRASHED, f"stage {child.src} {child.down}", stage=child.stage)
        child.restart_at = now + delay
        return True

    def _refuse_if_down(self, request: Message[Request]) -> None:
        """A request that a down stage would lose fails now, naming the stage, not at its timeout."""
        down = [child for child in self.children if child.stage in REPLY_STAGES and child.src not in self.ready]
        if down and self.connection is not None:
            child = down[0]
            why = child.down or "it is starting again after a crash"
            self.connection.report(ErrorCode.STAGE_DOWN, f"stage {child.src} is down ({why}), so this request "
                                   f"cannot be answered; ask again in a moment (`voxpipe status` shows it)",
                                   request.session, request.id, "request", stage=child.stage)

    def _heartbeat(self, now: float) -> None:
        """The launcher's own heartbeat: every child's state, for `voxpipe status`."""
        self.next_beat = now + 1.0
        children = {child.src: ("ready" if child.src in self.ready else f"down: {child.down}" if child.down
                                else "starting") for child in [self.bus, *self.children]}
        assert self.connection is not None
        with contextlib.suppress(BusUnavailable, zmq.ZMQError):
            self.connection.publish("", "", Heartbeat(pid=os.getpid(), uptime=now - self.started_at, state="ready",
                                                      children=children))

    def _stop_all(self) -> None:
        """SIGTERM the stages, then the bus, all within STOP_BUDGET_S; SIGKILL what is left."""
        sdnotify.notify("STOPPING=1")
        deadline = time.monotonic() + STOP_BUDGET_S
        for group, group_deadline in ((self.children, deadline - 1.0), ([self.bus], deadline)):
            running = [child.process for child in group if child.process and child.process.poll() is None]
            for process in running:
                process.send_signal(signal.SIGTERM)
            for process in running:
                try:
                    process.wait(max(0.05, group_deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("pid %d did not stop in time; killing it", process.pid)
                    process.kill()
                    process.wait()
        if self.connection is not None:
            self.connection.close()
        if self.http is not None:
            self.http.shutdown()
