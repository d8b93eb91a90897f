"""`voxpipe run`: start the bus and every stage as child processes and keep them alive.

Readiness comes from the stages' own "ready" heartbeats, so the supervisor
knows a stage is serving, not merely started.  A crashed stage is restarted
with exponential backoff; too many crashes in a window is a crash loop, which
stops everything with a message naming the stage.
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
from typing import Any

from .. import protocol
from ..config import Config
from ..protocol import ErrorCode, Heartbeat
from ..runtime import BusLost, BusUnavailable, Connection, endpoints_for, sdnotify
from ..runtime.broker import runtime_dir
from ..runtime.instance import InstanceLock
from ..runtime.shard import Shard
from .prometheus import Exposition, serve

log = logging.getLogger("voxpipe.run")
STOP_BUDGET_S = 5.0
BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 10.0
_PR_SET_PDEATHSIG = 1
HOME = Path(__file__).resolve().parents[2]
"""Where children start: the folder that holds voxpipe (the checkout, where launcher.py is), never
the package folder itself, whose secrets.py and config.py would shadow the standard library's."""


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

    @property
    def src(self) -> str:
        return self.stage if self.shard.count == 1 else f"{self.stage}@{self.shard.index}"


class Supervisor:
    def __init__(self, config: Config) -> None:
        self.config = config
        run = config["run"]
        self.bus = Child("bus", Shard())
        self.children = [Child(name, Shard(index, run["instances"][name]))
                         for name in run["stages"] for index in range(run["instances"][name])]
        self.stop = threading.Event()
        self.ready: set[str] = set()
        self.connection: Connection | None = None
        self.exposition: Exposition | None = None
        self.http: Any = None
        self.lock = InstanceLock(runtime_dir(config["bus"]["runtime_dir"]), "run")

    def _command(self, child: Child) -> list[str]:
        command = [sys.executable, "-m", "launcher", "stage", child.stage]
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
        self.ready.discard(child.src)
        log.info("started %s (pid %d)", child.src, child.process.pid)

    def run(self) -> int:
        """Supervise until stopped; returns the exit code. Raises AlreadyRunning, before anything is
        started, when this user's voxpipe already runs on this runtime directory."""
        self.lock.acquire("voxpipe run", "stop it first (`voxpipe status` shows it; `systemctl --user stop "
                                         "voxpipe` for the service), or give this one another bus.runtime_dir")
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.stop.set())
        try:
            return self._run()
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
                return False
            kinds = ("heartbeat", "metrics") if self.config["metrics"]["prometheus_port"] else ("heartbeat",)
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
        if metrics["prometheus_port"]:
            self.exposition = Exposition()
            self.http = serve(self.exposition, metrics["prometheus_bind"], metrics["prometheus_port"])
            log.info("prometheus metrics on http://%s:%d/metrics", metrics["prometheus_bind"],
                     metrics["prometheus_port"])

    def _watch(self) -> bool:
        """Take heartbeats for 0.2 s, then restart dead children; False on a crash loop."""
        assert self.connection is not None
        try:
            message = self.connection.receive(0.2)
        except BusLost:
            message = None  # the bus child is seen dead below and restarted; receive() handshakes again
        if message is not None and isinstance(message.body, Heartbeat) and message.body.state == "ready":
            self.ready.add(message.src)
        if message is not None and self.exposition is not None:
            self.exposition.observe(message, time.monotonic())
        now = time.monotonic()
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

    def _schedule_restart(self, child: Child, code: int, now: float) -> bool:
        run = self.config["run"]
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
        self.connection.report(ErrorCode.STAGE_CRASHED, f"stage {child.src} exited with code {code}; "
                               f"restarting in {delay:.1f} s", stage=child.stage)
        child.restart_at = now + delay
        return True

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
