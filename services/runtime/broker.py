"""The bus broker: one XSUB/XPUB proxy that every participant connects to.

Participants connect (never bind), so any stage can restart and any front-end
can attach without anyone rebinding.  The broker owns the runtime directory:
it refuses to start beside a live broker (a second ipc bind would silently
steal the path), removes stale socket files, and caps message size.

The transport is ipc by default (socket files in a private 0700 directory).  TCP is
opt-in (`bus.transport = "tcp"`); off loopback it needs CURVE (`bus.curve = true`):
the broker's sockets are CURVE servers behind a ZAP authenticator that admits only
the public keys in `bus.authorized_dir`, and participants are CURVE clients.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import stat
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from .. import protocol
from ..config import Config, ConfigError
from ..files import OTHERS, PRIVATE_DIR, PRIVATE_FILE, exposure
from . import curve
from .curve import CurveKeys
from .instance import AlreadyRunning, InstanceLock

log = logging.getLogger("voxpipe.bus")
LINGER_MS = 200
ZAP_DOMAIN = "voxpipe"
SOCKET_NAMES = ("in.sock", "out.sock", "capture.sock")
"""The broker's socket files in an ipc runtime dir."""


class BusError(RuntimeError):
    """The bus cannot be started or reached; the message says what to do."""


@dataclass(frozen=True)
class Endpoints:
    """Where the broker listens: `inbound` takes publishes, `outbound` serves subscribers."""

    inbound: str
    outbound: str
    capture: str
    curve: CurveKeys | None = None
    """A participant's CURVE keys and the broker's public key, when the bus uses CURVE."""
    directory: Path | None = None
    """The runtime dir of an ipc bus, checked by `prepare` before every connect."""

    @classmethod
    def in_dir(cls, directory: Path) -> Endpoints:
        return cls(inbound=f"ipc://{directory / 'in.sock'}",
                   outbound=f"ipc://{directory / 'out.sock'}",
                   capture=f"ipc://{directory / 'capture.sock'}", directory=directory)

    @classmethod
    def tcp(cls, host: str, port: int, curve: CurveKeys | None = None) -> Endpoints:
        """inbound on `port`, outbound on `port + 1`, capture on `port + 2`."""
        address = f"[{host}]" if ":" in host else host
        return cls(inbound=f"tcp://{address}:{port}", outbound=f"tcp://{address}:{port + 1}",
                   capture=f"tcp://{address}:{port + 2}", curve=curve)

    def prepare(self, sock: zmq.Socket) -> zmq.Socket:
        """Set a participant's socket up for these endpoints (IPv6, CURVE client keys); call before connect.

        Every participant's sockets pass here just before they connect, so this is where an ipc
        participant checks the runtime dir (`verify_runtime_dir`): it never talks to a broker that
        another user could have put there."""
        if self.directory is not None:
            verify_runtime_dir(self.directory)
        if "://[" in self.inbound:
            sock.ipv6 = True
        if self.curve is not None:
            sock.curve_secretkey = self.curve.secret
            sock.curve_publickey = self.curve.public
            sock.curve_serverkey = self.curve.server_public
        return sock


def is_loopback(host: str) -> bool:
    """True when `host` (an address or a name) reaches only this machine."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    if host in ("", "*"):
        return False
    try:
        infos = socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos)


def connect_host(bus: Mapping[str, Any]) -> str:
    """Where participants connect: bus.connect_host, else bus.tcp_bind (loopback for a wildcard bind)."""
    if bus["connect_host"]:
        return bus["connect_host"]
    return {"*": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(bus["tcp_bind"], bus["tcp_bind"])


def _source(config: Config) -> str:
    return f"config error in {config.path}" if config.path else "config error"


def participant_endpoints(config: Config) -> Endpoints:
    """Where a stage, front-end or CLI command connects, with its CURVE keys when bus.curve is on."""
    bus = config["bus"]
    if bus["transport"] == "ipc":
        return Endpoints.in_dir(runtime_dir(bus["runtime_dir"]))
    host = connect_host(bus)
    if not bus["curve"] and not is_loopback(host):
        raise ConfigError(f"{_source(config)}: bus.connect_host = {host!r} is off loopback and bus.curve is "
                          f"false; bus traffic would cross the network unencrypted and unauthenticated. "
                          f"Set bus.curve = true (keys: `voxpipe keys generate`)")
    return Endpoints.tcp(host, bus["tcp_port"], curve.client_keys(bus) if bus["curve"] else None)


def runtime_dir(configured: str = "", env: Mapping[str, str] = os.environ) -> Path:
    """The private directory for ipc sockets: configured, else $XDG_RUNTIME_DIR/voxpipe, else /tmp."""
    if configured:
        return Path(configured)
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "voxpipe"
    return _shared_fallback()


def _shared_fallback() -> Path:
    """$TMPDIR (or /tmp)/voxpipe-UID: a name any local user can foresee, and so create first."""
    return Path(tempfile.gettempdir()) / f"voxpipe-{os.getuid()}"



def private_dir_problem(directory: Path) -> tuple[str, str] | None:
    """What makes an existing runtime dir unsafe, and the fix; None when it is safe (or missing).

    The one rule for the broker, `voxpipe run`, every stage and front-end, and `voxpipe doctor`.
    Whoever owns the directory, or may enter it, can put a broker of their own at the socket paths
    and read every request and forge every reply. So it must be a real directory (lstat: a symlink
    would let its maker choose where the bus is), ours, closed to group and others, and the socket
    files in it ours and not symlinks."""
    try:
        info = directory.lstat()
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(info.st_mode):
        return ("is a symbolic link, so whoever made it chooses where your bus is",
                f"remove it (rm {directory}), or set bus.runtime_dir to a directory you own")
    if not stat.S_ISDIR(info.st_mode):
        return "is not a directory", f"remove it (rm {directory}), or set bus.runtime_dir elsewhere"
    found = exposure(directory, info, OTHERS, PRIVATE_DIR)
    if found is not None and found.foreign:
        shared = (f"; it is the shared fallback in {directory.parent}, used while XDG_RUNTIME_DIR is unset, "
                  f"and another user created it first" if directory == _shared_fallback() else "")
        return (f"{found.problem}{shared}; its owner could read and forge every bus message",
                "set XDG_RUNTIME_DIR (or bus.runtime_dir) to a directory only you can enter, e.g. "
                "`mkdir -m 700 ~/.voxpipe-run` and bus.runtime_dir = \"~/.voxpipe-run\"")
    if found is not None:
        return f"{found.problem}; other users could reach the bus", found.fix
    for name in SOCKET_NAMES:
        try:
            sock = (directory / name).lstat()
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(sock.st_mode):
            what = "is a symbolic link"
        elif (theirs := exposure(directory / name, sock, 0, PRIVATE_FILE)) is not None:  # 0: ours is enough
            what = theirs.problem
        else:
            continue
        return (f"holds {directory / name}, which {what}; it is not your bus",
                f"stop voxpipe, remove it (rm {directory / name}) and start voxpipe again")
    return None


def _refuse_unsafe(directory: Path) -> None:
    problem = private_dir_problem(directory)
    if problem is not None:
        raise ConfigError(f"runtime dir {directory} {problem[0]}; refusing to use it. Fix: {problem[1]}")


def ensure_private_dir(directory: Path) -> None:
    """The daemon's side (the broker, `voxpipe run`, a stage's lock): create the runtime dir with
    mode 0700, or refuse one that is unsafe (`private_dir_problem`) with ConfigError: exit 2, since
    no restart can fix it."""
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o700, parents=True)
    _refuse_unsafe(directory)


def verify_runtime_dir(directory: Path) -> None:
    """A participant's side, before it connects: the runtime dir must exist (a participant never
    creates it: without it no daemon runs) and be safe (`private_dir_problem`)."""
    if not os.path.lexists(directory):
        raise BusError(f"no voxpipe bus is running ({directory} does not exist); start it with `voxpipe run`")
    _refuse_unsafe(directory)


class Broker:
    """Binds the proxy sockets and runs `zmq.proxy_steerable` until stopped."""

    def __init__(self, directory: Path, context: zmq.Context | None = None, *, bind: Endpoints | None = None,
                 curve: CurveKeys | None = None, authorized: Path | None = None) -> None:
        self.directory = directory
        self.endpoints = bind or Endpoints.in_dir(directory)
        self.curve = curve
        self.authorized = authorized
        self._ipc = self.endpoints.inbound.startswith("ipc://")
        self._auth: Any = None
        self._context = context or zmq.Context.instance()
        self._lock: InstanceLock | None = None
        self._control_endpoint = f"inproc://voxpipe-bus-control-{id(self)}"
        self._thread: threading.Thread | None = None
        self._bound = threading.Event()
        self._failure: BaseException | None = None

    @classmethod
    def from_config(cls, config: Config, context: zmq.Context | None = None) -> Broker:
        """The broker the [bus] section asks for; refuses TCP off loopback without CURVE."""
        bus = config["bus"]
        directory = runtime_dir(bus["runtime_dir"])
        if bus["transport"] == "ipc":
            return cls(directory, context)
        host = bus["tcp_bind"]
        if not bus["curve"] and not is_loopback(host):
            raise ConfigError(f"{_source(config)}: bus.tcp_bind = {host!r} is off loopback and bus.curve is false, "
                              f"so anyone who can reach it could read and inject bus messages; refusing to "
                              f"start. Set bus.curve = true (keys: `voxpipe keys generate`), or bus.tcp_bind = "
                              f"\"127.0.0.1\"")
        if not bus["curve"]:
            return cls(directory, context, bind=Endpoints.tcp(host, bus["tcp_port"]))
        authorized = curve.authorized_dir(bus)
        if not curve.check_authorized_dir(authorized):
            log.warning("no authorised client keys (*.key) in %s: no participant can connect", authorized)
        return cls(directory, context, bind=Endpoints.tcp(host, bus["tcp_port"]), curve=curve.server_keys(bus),
                   authorized=authorized)

    def start(self) -> None:
        """Take the directory lock, clear stale sockets and start proxying in a thread."""
        ensure_private_dir(self.directory)
        self._take_lock()
        for name in SOCKET_NAMES:
            (self.directory / name).unlink(missing_ok=True)
        if self.curve is not None:
            self._start_authenticator()
        self._thread = threading.Thread(target=self._serve, name="bus-proxy", daemon=True)
        self._thread.start()
        self._bound.wait(10)
        if self._failure is not None:
            if self._auth is not None:
                self._auth.stop()
                self._auth = None
            where = self.directory if self._ipc else self.endpoints.inbound
            raise BusError(f"bus cannot bind {where}: {self._failure}")

    def _start_authenticator(self) -> None:
        """ZAP: only client keys in the authorised directory may complete a CURVE handshake."""
        from zmq.auth.thread import ThreadAuthenticator

        self._auth = ThreadAuthenticator(self._context, log=logging.getLogger("voxpipe.bus.auth"))
        self._auth.start()
        self._auth.configure_curve(domain=ZAP_DOMAIN, location=str(self.authorized))

    def stop(self) -> None:
        """Ask the proxy to terminate, wait for it, and release the lock."""
        if self._thread is not None and self._thread.is_alive():
            control = self._context.socket(zmq.PAIR)
            control.linger = LINGER_MS
            control.connect(self._control_endpoint)
            control.send(b"TERMINATE")
            self._thread.join(5)
            control.close()
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._lock is not None:
            for name in SOCKET_NAMES:
                (self.directory / name).unlink(missing_ok=True)
            self._lock.release()
            self._lock = None

    def _take_lock(self) -> None:
        """One bus per runtime directory: a second one would take over the first one's socket files."""
        lock = InstanceLock(self.directory, "bus")
        try:
            lock.acquire(f"a voxpipe bus in {self.directory}",
                         "stop it first (voxpipe status shows it) or set bus.runtime_dir")
        except AlreadyRunning as exc:
            raise BusError(str(exc)) from None
        self._lock = lock

    def _serve(self) -> None:
        sockets: list[zmq.Socket] = []
        try:
            inbound = self._socket(zmq.XSUB, sockets)
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
            if self._ipc:
                for name in SOCKET_NAMES:
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
        # ZeroMQ bounds queues in messages: few messages of at most BROKER_MAX_BYTES each bound in bytes
        # what a peer that stops reading (or a flood) can make the broker hold (docs/protocol.md §2.4).
        sock.sndhwm = sock.rcvhwm = protocol.BROKER_HIGH_WATER_MARK
        # Every socket that can receive (XPUB and PUB take subscriptions) caps what a peer may send.
        sock.setsockopt(zmq.MAXMSGSIZE, protocol.BROKER_MAX_BYTES)
        sockets.append(sock)
        if kind == zmq.PAIR:
            return sock
        if "://[" in self.endpoints.inbound:
            sock.ipv6 = True
        if self.curve is not None:
            sock.curve_server = True
            sock.curve_secretkey = self.curve.secret
            sock.curve_publickey = self.curve.public
            sock.zap_domain = ZAP_DOMAIN.encode()
        return sock


def _close(sockets: list[zmq.Socket]) -> None:
    for sock in sockets:
        sock.close()
