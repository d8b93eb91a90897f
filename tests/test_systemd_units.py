"""The systemd units in deploy/systemd/, and the sd_notify protocol they rely on.

`systemd-analyze verify` checks every unit (templates through instance names) as a user
unit, with `%h/.local/bin/voxpipe` resolving to this venv's `voxpipe`; any output fails,
since it exits 0 on unknown keys. The notify tests listen on a datagram socket standing in
for systemd's NOTIFY_SOCKET and take each sender's pid from SCM_CREDENTIALS, as systemd
does for NotifyAccess=main.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.harness import PYTHON, ROOT, Daemon, base_env, connect, start_stage, stop_process
from voxpipe.protocol import Cancel

UNIT_DIR = ROOT / "deploy" / "systemd"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
VOXPIPE = Path(sys.executable).parent / "voxpipe"
STAGES = ("llm", "chunker", "tts", "player", "history")
UNITS = ("voxpipe-bus.service", "voxpipe-run.service", "voxpipe-web.service", "voxpipe-game.service", "voxpipe.target",
         *(f"voxpipe@{stage}.service" for stage in STAGES),
         "voxpipe-shard@tts-0-2.service", "voxpipe-shard@chunker-1-3.service")

needs_systemd_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")


# --- systemd-analyze verify ----------------------------------------------------------------


@pytest.fixture(scope="module")
def user_home() -> Iterator[Path]:
    """A private $HOME with .local/bin/voxpipe (this venv's) and an $XDG_RUNTIME_DIR for --user."""
    assert VOXPIPE.exists(), f"{VOXPIPE} is missing: install voxpipe into this venv (make install)"
    home = Path(tempfile.mkdtemp(prefix="vp-units-"))
    (home / ".local" / "bin").mkdir(parents=True)
    (home / ".local" / "bin" / "voxpipe").symlink_to(VOXPIPE)
    (home / "xdg").mkdir(mode=0o700)
    yield home
    shutil.rmtree(home, ignore_errors=True)


def verify(home: Path, *paths: Path) -> str:
    """All output of `systemd-analyze --user verify PATH...`, with its exit code when non-zero."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("XDG_", "SYSTEMD_"))}
    env.update(HOME=str(home), XDG_RUNTIME_DIR=str(home / "xdg"), SYSTEMD_LOG_COLOR="0")
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run([SYSTEMD_ANALYZE, "--user", "verify", *map(str, paths)], env=env,
                            capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    return output + (f"(exit code {result.returncode})" if result.returncode else "")


@needs_systemd_analyze
@pytest.mark.parametrize("unit", UNITS)
def test_unit_verifies_without_any_output(user_home: Path, unit: str) -> None:
    # An instance path that does not exist as a file is loaded from its template in the same
    # directory, and the rest of the units (the bus, the target) are found there too.
    assert verify(user_home, UNIT_DIR / unit) == ""


def test_every_shipped_unit_is_checked() -> None:
    shipped = {path.name for path in UNIT_DIR.iterdir()}
    checked = {re.sub(r"@[^.]+\.", "@.", unit) for unit in UNITS}
    assert shipped == checked


@needs_systemd_analyze
def test_verify_output_catches_what_systemd_would_ignore(user_home: Path, tmp_path: Path) -> None:
    """The check above is only worth something if a slip produces output; here are two."""
    for path in UNIT_DIR.iterdir():
        shutil.copy(path, tmp_path / path.name)
    template = tmp_path / "voxpipe@.service"
    template.write_text(template.read_text().replace("NoNewPrivileges=yes", "NoNewPrivilege=yes"))
    assert "Unknown key 'NoNewPrivilege'" in verify(user_home, tmp_path / "voxpipe@llm.service")
    bus = tmp_path / "voxpipe-bus.service"
    bus.write_text(bus.read_text().replace("%h/.local/bin/voxpipe", "%h/.local/bin/voxpipe-missing"))
    assert "is not executable" in verify(user_home, bus)


def expand_exec_start(unit: Path, home: Path, instance: str) -> list[str]:
    """ExecStart= as systemd runs it: %-specifiers, then $$, then its shell-like quoting."""
    line = next(line for line in unit.read_text().splitlines() if line.startswith("ExecStart="))
    specifiers = {"%": "%", "h": str(home), "i": instance, "I": instance.replace("-", "/")}
    expanded = re.sub(r"%(.)", lambda match: specifiers[match.group(1)], line.removeprefix("ExecStart="))
    return shlex.split(expanded.replace("$$", "$"))


@pytest.mark.parametrize(("instance", "argv"), [("tts-0-2", "stage tts --shard 0/2"),
                                                ("chunker-2-3", "stage chunker --shard 2/3")])
def test_shard_template_runs_the_stage_with_its_shard(tmp_path: Path, instance: str, argv: str) -> None:
    fake = tmp_path / ".local" / "bin" / "voxpipe"
    fake.parent.mkdir(parents=True)
    fake.write_text('#!/bin/sh\necho "$$ $*"\n')
    fake.chmod(0o755)
    command = expand_exec_start(UNIT_DIR / "voxpipe-shard@.service", tmp_path, instance)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    out, _ = process.communicate(timeout=10)
    # `exec` keeps the pid systemd started, so NotifyAccess=main accepts the stage's READY=1.
    assert out == f"{process.pid} {argv}\n"


# --- sd_notify ------------------------------------------------------------------------------


@dataclass
class NotifyListener:
    """A stand-in for systemd's notify socket: every datagram with its sender's pid."""

    path: Path
    sock: socket.socket = field(init=False)
    received: list[tuple[float, int, str]] = field(default_factory=list)
    _lock: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.2)
        self._running = True
        # Read all the time: a sender blocks once a datagram socket's queue is full.
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while self._running:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except TimeoutError:
                continue
            except OSError:
                return
            pid = next(struct.unpack("iII", bytes(cdata[:12]))[0] for level, kind, cdata in ancillary
                       if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS)
            with self._lock:
                self.received.append((time.monotonic(), pid, data.decode()))
                self._lock.notify_all()

    def wait_for(self, pid: int, state: str, timeout: float = 30.0, after: int = 0) -> int:
        """Index of the first `state` from `pid` at or after index `after`."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for index, (_, sender, text) in enumerate(self.received[after:], after):
                    if sender == pid and text == state:
                        return index
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"no {state} from pid {pid} within {timeout} s; got {self.received}"
                self._lock.wait(remaining)

    def from_pid(self, pid: int) -> list[str]:
        with self._lock:
            return [text for _, sender, text in self.received if sender == pid]

    def close(self) -> None:
        self._running = False
        self._thread.join()
        self.sock.close()


@pytest.fixture()
def listener() -> Iterator[NotifyListener]:
    directory = Path(tempfile.mkdtemp(prefix="vp-notify-"))
    listener = NotifyListener(directory / "notify.sock")
    yield listener
    listener.close()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def supervised_run() -> Iterator[tuple[int, list[tuple[float, int, str]]]]:
    """`voxpipe run` under a NOTIFY_SOCKET: the supervisor's pid and every datagram, until it exited."""
    directory = Path(tempfile.mkdtemp(prefix="vp-notify-"))
    listener = NotifyListener(directory / "notify.sock")
    daemon = Daemon({"run": {"stages": ["chunker", "history"]}},
                    env={"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "10000000"})
    try:
        daemon.start(timeout=60)
        pid = daemon.process.pid
        ready = listener.wait_for(pid, "READY=1")
        listener.wait_for(pid, "WATCHDOG=1", timeout=10, after=ready)
        assert daemon.stop() == 0
        listener.wait_for(pid, "STOPPING=1", timeout=5)
        time.sleep(0.3)  # the last stages' STOPPING=1, if they send any
    finally:
        daemon.close()
        listener.close()
        shutil.rmtree(directory, ignore_errors=True)
    yield pid, listener.received


def test_run_sends_ready_then_watchdog_then_stopping(supervised_run: tuple[int, list]) -> None:
    pid, received = supervised_run
    states = [text for _, sender, text in received if sender == pid]
    assert states[0] == "READY=1" and states[-1] == "STOPPING=1", states
    assert set(states[1:-1]) == {"WATCHDOG=1"}, states


def test_run_is_the_only_sender_under_its_unit(supervised_run: tuple[int, list]) -> None:
    pid, received = supervised_run
    assert {sender for _, sender, _ in received} == {pid}


WEDGE_STAGE = """
import sys, time
from pathlib import Path
from voxpipe.config import load
from voxpipe.protocol import Cancel
from voxpipe.runtime import Stage, handles

class Wedge(Stage):
    name = "wedge"

    @handles(Cancel)
    def on_cancel(self, message):
        # The main loop hangs here, as a stuck handler would, until the test releases it.
        flag = Path(sys.argv[1])
        (flag / "wedged").touch()
        while not (flag / "release").exists():
            time.sleep(0.05)

sys.exit(Wedge(load()).run())
"""


def test_a_wedged_main_loop_stops_the_watchdog_pings(listener: NotifyListener, tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    bus = start_stage("bus", runtime, XDG_CONFIG_HOME=str(tmp_path))
    stage = subprocess.Popen([PYTHON, "-c", WEDGE_STAGE, str(tmp_path)], cwd=ROOT, text=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env=base_env({"VOXPIPE_BUS__RUNTIME_DIR": str(runtime), "XDG_CONFIG_HOME": str(tmp_path),
                                           "NOTIFY_SOCKET": str(listener.path)}))
    try:
        listener.wait_for(stage.pid, "WATCHDOG=1", after=listener.wait_for(stage.pid, "READY=1"))
        client = connect(runtime, "probe")
        client.publish("s1", "", Cancel())
        deadline = time.monotonic() + 20
        while not (tmp_path / "wedged").exists():
            assert time.monotonic() < deadline and stage.poll() is None, "the stage never took the message"
            time.sleep(0.05)
        pings_before = len(listener.from_pid(stage.pid))
        time.sleep(3.0)  # three heartbeat intervals
        assert len(listener.from_pid(stage.pid)) == pings_before, "pinged while its main loop was stuck"
        (tmp_path / "release").touch()
        listener.wait_for(stage.pid, "WATCHDOG=1", timeout=10, after=len(listener.received))
        client.close()
        code, err = stop_process(stage)
        assert code == 0, err
        listener.wait_for(stage.pid, "STOPPING=1", timeout=5)
    finally:
        if stage.poll() is None:
            stage.send_signal(signal.SIGKILL)
            stage.wait()
        stop_process(bus)
