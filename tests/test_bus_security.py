"""Bus transport security in real processes: TCP opt-in, CURVE, authorised keys, key and secret file modes."""

from __future__ import annotations

import os
import pwd
import selectors
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from tests.harness import PYTHON, ROOT, base_env, connect, start_stage, stop_process
from voxpipe import protocol
from voxpipe.config import load
from voxpipe.runtime import BusUnavailable, Connection, endpoints_for


@pytest.fixture()
def home() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="vp-sec-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def free_ports(count: int = 3) -> int:
    """A port p with p .. p+count-1 all free on loopback (the bus takes three in a row)."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count > 65535:
            continue
        try:
            holders = []
            for port in range(base, base + count):
                holder = socket.socket()
                holders.append(holder)
                holder.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for holder in holders:
                holder.close()
        return base
    raise RuntimeError("no three consecutive free ports")


def tcp_env(home: Path, port: int, bind: str = "127.0.0.1", curve: bool = False, keys: Path | None = None,
            **extra: str) -> dict[str, str]:
    env = {"VOXPIPE_BUS__RUNTIME_DIR": str(home / "run"), "VOXPIPE_BUS__TRANSPORT": "tcp",
           "VOXPIPE_BUS__TCP_BIND": bind, "VOXPIPE_BUS__TCP_PORT": str(port),
           "VOXPIPE_BUS__CURVE": "true" if curve else "false", "XDG_CONFIG_HOME": str(home / "config")}
    if keys is not None:
        env["VOXPIPE_BUS__KEYS_DIR"] = str(keys)
    env.update(extra)
    return env


def voxpipe(env: dict[str, str], *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "launcher", *args], cwd=ROOT, env=base_env(env), text=True,
                          capture_output=True, timeout=timeout)


def start_bus(env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([PYTHON, "-m", "launcher", "stage", "bus"], cwd=ROOT, text=True, env=base_env(env),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def participant(env: dict[str, str], name: str, *kinds: str, timeout: float = 30) -> Connection:
    client = Connection(name, endpoints_for(load(env=env)), [protocol.subscription(kind) for kind in kinds])
    client.open(timeout=timeout)
    return client


def generate_keys(home: Path) -> Path:
    keys = home / "keys"
    result = voxpipe({"XDG_CONFIG_HOME": str(home / "config")}, "keys", "generate", "--dir", str(keys))
    assert result.returncode == 0, result.stderr
    return keys


def round_trip(sender: Connection, receiver: Connection, text: str) -> None:
    """The receiver gets what the sender publishes (retrying until the subscription is live)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        sender.publish("sec", "r1", protocol.Request(text=text))
        message = receiver.receive(0.2)
        if message is not None and isinstance(message.body, protocol.Request) and message.body.text == text:
            return
    raise AssertionError(f"{text!r} never arrived")


# --- TCP without CURVE -------------------------------------------------------------------------

def test_tcp_bind_off_loopback_without_curve_is_refused(home: Path) -> None:
    bus = start_bus(tcp_env(home, 7600, bind="0.0.0.0"))
    _, err = bus.communicate(timeout=30)
    assert bus.returncode == 2, err
    assert "bus.tcp_bind = '0.0.0.0' is off loopback" in err and "Set bus.curve = true" in err
    # a participant told to cross the network without CURVE refuses as well
    status = voxpipe(tcp_env(home, 7600, VOXPIPE_BUS__CONNECT_HOST="10.1.2.3"), "status")
    assert status.returncode == 2
    assert "bus.connect_host = '10.1.2.3' is off loopback" in status.stderr and "bus.curve = true" in status.stderr


def test_loopback_tcp_without_curve_works(home: Path) -> None:
    env = tcp_env(home, free_ports())
    bus = start_bus(env)
    try:
        sender, receiver = participant(env, "tcp-a"), participant(env, "tcp-b", "request")
        round_trip(sender, receiver, "over loopback tcp")
        sender.close()
        receiver.close()
    finally:
        assert stop_process(bus)[0] == 0


# --- CURVE -------------------------------------------------------------------------------------

def test_keys_generate_file_modes(home: Path) -> None:
    keys = generate_keys(home)
    mode = lambda path: oct(path.stat().st_mode & 0o777)  # noqa: E731
    assert mode(keys) == "0o700" and mode(keys / "authorized") == "0o700"
    assert mode(keys / "server.key_secret") == "0o600" and mode(keys / "client.key_secret") == "0o600"
    assert mode(keys / "server.key") == "0o644" and mode(keys / "client.key") == "0o644"
    assert (keys / "authorized" / "local.key").read_text() == (keys / "client.key").read_text()
    assert "secret-key" not in (keys / "server.key").read_text() + (keys / "client.key").read_text()

    again = voxpipe({"XDG_CONFIG_HOME": str(home / "config")}, "keys", "generate", "--dir", str(keys))
    assert again.returncode == 2 and "already exists" in again.stderr and "--force" in again.stderr

    remote = home / "remote"
    result = voxpipe({"VOXPIPE_BUS__KEYS_DIR": str(remote), "XDG_CONFIG_HOME": str(home / "config")},
                     "keys", "generate", "--client", "gpu1")
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in remote.iterdir()) == ["client.key", "client.key_secret"]
    assert mode(remote / "client.key_secret") == "0o600"
    assert "authorized/gpu1.key" in result.stdout and "server.key" in result.stdout


def test_curve_with_authorised_key_works_and_tap_sees_it(home: Path) -> None:
    keys = generate_keys(home)
    env = tcp_env(home, free_ports(), curve=True, keys=keys)
    bus = start_bus(env)
    try:
        sender, receiver = participant(env, "curve-a"), participant(env, "curve-b", "request")
        assert sender.endpoints.curve is not None and "secret" not in repr(sender.endpoints)
        round_trip(sender, receiver, "over curve")
        status = voxpipe(env, "status")
        assert status.returncode == 0 and "bus" in status.stdout, status.stderr
        tap = subprocess.Popen([PYTHON, "-m", "launcher", "tap", "request"], cwd=ROOT, text=True,
                               env=base_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        selector = selectors.DefaultSelector()
        selector.register(tap.stdout, selectors.EVENT_READ)
        line = ""
        deadline = time.monotonic() + 20
        while "tapped over curve" not in line and time.monotonic() < deadline:
            sender.publish("sec", "r2", protocol.Request(text="tapped over curve"))
            line = tap.stdout.readline() if selector.select(0.3) else ""
        tap.kill()
        tap.communicate()
        assert "tapped over curve" in line
        sender.close()
        receiver.close()
    finally:
        assert stop_process(bus)[0] == 0


def test_unknown_key_receives_nothing_and_cannot_publish(home: Path) -> None:
    keys = generate_keys(home)
    env = tcp_env(home, free_ports(), curve=True, keys=keys)
    stranger_keys = home / "stranger"
    made = voxpipe({"XDG_CONFIG_HOME": str(home / "config")}, "keys", "generate", "--dir", str(stranger_keys),
                   "--client", "stranger")
    assert made.returncode == 0, made.stderr
    shutil.copy(keys / "server.key", stranger_keys / "server.key")  # it knows the bus, but is not authorised
    stranger_env = {**env, "VOXPIPE_BUS__KEYS_DIR": str(stranger_keys)}
    bus = start_bus(env)
    try:
        insider = participant(env, "insider")
        watcher = participant(env, "watcher", "")  # everything the bus carries
        with pytest.raises(BusUnavailable, match="authorized dir"):
            participant(stranger_env, "stranger", "", timeout=2)

        # Raw sockets, so nothing hides a failure: one with the stranger's keys, one without CURVE at all.
        context = zmq.Context.instance()
        endpoints = endpoints_for(load(env=stranger_env))
        plain = endpoints_for(load(env={**env, "VOXPIPE_BUS__CURVE": "false"}))
        sockets = []
        for ends in (endpoints, plain):
            for kind, address in ((zmq.SUB, ends.outbound), (zmq.SUB, ends.capture), (zmq.PUB, ends.inbound)):
                sock = ends.prepare(context.socket(kind))
                sock.linger = 0
                if kind == zmq.SUB:
                    sock.setsockopt(zmq.SUBSCRIBE, b"")
                sock.connect(address)
                sockets.append(sock)
        listeners = [sock for sock in sockets if sock.type == zmq.SUB]
        injectors = [sock for sock in sockets if sock.type == zmq.PUB]
        heard: list[bytes] = []
        watched: list[str] = []
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            insider.publish("sec", "inside", protocol.Request(text="for members only"))
            for injector in injectors:
                injector.send(protocol.encode(protocol.Message(protocol.Request(text="injected"), "sec", "outside", 0,
                                                               time.time(), "stranger")))
            for listener in listeners:
                while listener.poll(0):
                    heard.append(listener.recv())
            if (message := watcher.receive(0.05)) is not None:
                watched.append(message.id)
        assert heard == []
        assert "inside" in watched and "outside" not in watched
        for sock in sockets:
            sock.close()
        insider.close()
        watcher.close()
    finally:
        assert stop_process(bus)[0] == 0


def test_secret_key_files_looser_than_0600_are_refused(home: Path) -> None:
    keys = generate_keys(home)
    env = tcp_env(home, free_ports(), curve=True, keys=keys)
    os.chmod(keys / "server.key_secret", 0o640)
    bus = start_bus(env)
    _, err = bus.communicate(timeout=30)
    assert bus.returncode == 2
    assert "has mode 640" in err and f"chmod 600 {keys / 'server.key_secret'}" in err

    os.chmod(keys / "client.key_secret", 0o644)
    status = voxpipe(env, "status")
    assert status.returncode == 2 and f"chmod 600 {keys / 'client.key_secret'}" in status.stderr

    os.chmod(keys / "server.key_secret", 0o600)
    os.chmod(keys / "client.key_secret", 0o600)
    os.chmod(keys / "authorized", 0o777)
    bus = start_bus(env)
    _, err = bus.communicate(timeout=30)
    assert bus.returncode == 2 and f"chmod 700 {keys / 'authorized'}" in err


def test_secret_key_files_another_user_owns_are_refused(home: Path) -> None:
    """A 0600 secret key file that another user owns is theirs to read or to swap for a key of their
    own: refused with the chown, like a group-readable one. Root could still read it, so only the
    owner check stops the bus here."""
    nobody = pwd.getpwnam("nobody").pw_uid
    keys = generate_keys(home)
    env = tcp_env(home, free_ports(), curve=True, keys=keys)
    os.chown(keys / "server.key_secret", nobody, -1)
    bus = voxpipe(env, "stage", "bus")  # subprocess.run: a bus that wrongly starts is killed at the timeout
    assert bus.returncode == 2, bus.stderr
    assert f"{keys / 'server.key_secret'} belongs to uid {nobody}, not you" in bus.stderr, bus.stderr
    assert f"chown {os.getuid()} {keys / 'server.key_secret'}" in bus.stderr, bus.stderr

    os.chown(keys / "server.key_secret", os.getuid(), -1)
    os.chown(keys / "client.key_secret", nobody, -1)
    status = voxpipe(env, "status")
    assert status.returncode == 2 and f"chown {os.getuid()} {keys / 'client.key_secret'}" in status.stderr


def test_ipc_stays_the_default_and_private(home: Path) -> None:
    config = load(env={"XDG_CONFIG_HOME": str(home)})
    assert config["bus"]["transport"] == "ipc" and not config["bus"]["curve"]
    assert endpoints_for(config).inbound.startswith("ipc://") and endpoints_for(config).curve is None
    runtime = home / "run"
    bus = start_stage("bus", runtime)
    try:
        connect(runtime, "probe").close()
        assert oct(runtime.stat().st_mode & 0o777) == "0o700"
        for name in ("in.sock", "out.sock", "capture.sock"):
            assert oct((runtime / name).stat().st_mode & 0o777) == "0o600"
    finally:
        assert stop_process(bus)[0] == 0
