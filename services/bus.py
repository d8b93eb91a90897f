"""The bus broker: one XSUB/XPUB proxy that every participant connects to.

Participants connect (never bind), so any stage can restart and any front-end
can attach without anyone rebinding.  The broker owns the runtime directory:
it refuses to start beside a live broker (a second ipc bind would silently
steal the path), removes stale socket files, and caps message size.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import zmq

from . import protocol

log = logging.getLogger("voxpipe.bus")
LINGER_MS = 200


class BusError(RuntimeError):
    """The bus cannot be started or reached; the message says what to do."""


@dataclass(frozen=True)
class Endpoints:
    """Where the broker listens: `inbound` takes publishes, `outbound` serves subscribers."""

    inbound: str
    outbound: str
    capture: str

    @classmethod
    def in_dir(cls, directory: Path) -> "Endpoints":
        return cls(inbound=f"ipc://{directory / 'in.sock'}",
                   outbound=f"ipc://{directory / 'out.sock'}",
                   capture=f"ipc://{directory / 'capture.sock'}")


def runtime_dir(configured: str = "", env: Mapping[str, str] = os.environ) -> Path:
    """The private directory for ipc sockets: configured, else $XDG_RUNTIME_DIR/voxpipe, else /tmp."""
    if configured:
        return Path(configured)
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "voxpipe"
    return Path(tempfile.gettempdir()) / f"voxpipe-{os.getuid()}"


def ensure_private_dir(directory: Path) -> None:
    """Create the runtime dir with mode 0700, or refuse one that other users could reach."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = directory.stat()
    if info.st_uid != os.getuid():
        raise BusError(f"runtime dir {directory} belongs to uid {info.st_uid}, not you; "
                       f"set bus.runtime_dir to a directory you own")
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise BusError(f"runtime dir {directory} has mode {stat.S_IMODE(info.st_mode):o}; other users could "
                       f"reach the bus. Run: chmod 700 {directory}")


class Broker:
    """Binds the proxy sockets and runs `zmq.proxy_steerable` until stopped."""

    def __init__(self, directory: Path, context: zmq.Context | None = None) -> None:
        self.directory = directory
        self.endpoints = Endpoints.in_dir(directory)
        self._context = context or zmq.Context.instance()
        self._lock_file: Any = None
        self._control_endpoint = f"inproc://voxpipe-bus-control-{id(self)}"
        self._thread: threading.Thread | None = None
        self._bound = threading.Event()
        self._failure: BaseException | None = None

    def start(self) -> None:
        """Take the directory lock, clear stale sockets and start proxying in a thread."""
        ensure_private_dir(self.directory)
        self._take_lock()
        for name in ("in.sock", "out.sock", "capture.sock"):
            (self.directory / name).unlink(missing_ok=True)
        self._thread = threading.Thread(target=self._serve, name="bus-proxy", daemon=True)
        self._thread.start()
        self._bound.wait(10)
        if self._failure is not None:
            raise BusError(f"bus cannot bind in {self.directory}: {self._failure}")

    def stop(self) -> None:
        """Ask the proxy to terminate, wait for it, and release the lock."""
        if self._thread is not None and self._thread.is_alive():
            control = self._context.socket(zmq.PAIR)
            control.linger = LINGER_MS
            control.connect(self._control_endpoint)
            control.send(b"TERMINATE")
            self._thread.join(5)
            control.close()
        if self._lock_file is not None:
            for name in ("in.sock", "out.sock", "capture.sock"):
                (self.directory / name).unlink(missing_ok=True)
            self._lock_file.close()
            self._lock_file = None

    def _take_lock(self) -> None:
        handle = open(self.directory / "bus.lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise BusError(f"a voxpipe bus (pid {holder}) is already running in {self.directory}; "
                           f"stop it first (voxpipe status shows it) or set bus.runtime_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock_file = handle

    def _serve(self) -> None:
        sockets = []
        try:
            inbound = self._socket(zmq.XSUB, sockets)
            inbound.setsockopt(zmq.MAXMSGSIZE, protocol.BROKER_MAX_BYTES)
            inbound.bind(self.endpoints.inbound)
            # Subscribe upstream to everything: publishers then never filter, so the
            # hello handshake of any participant proves its publishes reach the broker.
            inbound.send(b"\x01")
            outbound = self._socket(zmq.XPUB, sockets)
            outbound.bind(self.endpoints.outbound)
            capture = self._socket(zmq.PUB, sockets)
            capture.bind(self.endpoints.capture)
            control = self._socket(zmq.PAIR, sockets)
            control.bind(self._control_endpoint)
            for name in ("in.sock", "out.sock", "capture.sock"):
                os.chmod(self.directory / name, 0o600)
        except zmq.ZMQError as exc:
            self._failure = exc
            self._bound.set()
            _close(sockets)
            return
        self._bound.set()
        try:
            zmq.proxy_steerable(inbound, outbound, capture, control)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.ETERM:
                log.error("bus proxy stopped: %s", exc)
        finally:
            _close(sockets)

    def _socket(self, kind: int, sockets: list[zmq.Socket]) -> zmq.Socket:
        sock = self._context.socket(kind)
        sock.linger = LINGER_MS
        sock.sndhwm = sock.rcvhwm = protocol.HIGH_WATER_MARK
        sockets.append(sock)
        return sock


def _close(sockets: list[zmq.Socket]) -> None:
    for sock in sockets:
        sock.close()
