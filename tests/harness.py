"""Real-process test harness: a fake provider server, a running daemon, and CLI calls.

Everything here starts real processes and talks real ZeroMQ; nothing is mocked.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
ALSA_NULL = ROOT / "tests" / "alsa_null.conf"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_toml(path: Path, data: Mapping[str, Any], prefix: str = "") -> None:
    """A small TOML writer for test configs (tables of scalars and lists)."""
    lines: list[str] = []

    def emit(table: Mapping[str, Any], name: str) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        if name and scalars:
            lines.append(f"[{name}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in scalars.items())
        for key, value in table.items():
            if isinstance(value, dict):
                emit(value, f"{name}.{key}" if name else key)

    emit(data, prefix)
    path.write_text("\n".join(lines) + "\n")


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago (the OS picked it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def base_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("VOXPIPE_")}
    env["PYTHONPATH"] = str(ROOT)
    env["ALSA_CONFIG_PATH"] = str(ALSA_NULL)
    env.update(extra or {})
    return env


@contextmanager
def fake_openai(delay: float = 0.0, module: str = "tests.fakes.openai_server") -> Iterator[str]:
    """Start a fake OpenAI server process (`module` runs one); yields its base URL."""
    process = subprocess.Popen([PYTHON, "-m", module, str(delay)], cwd=ROOT,
                               stdout=subprocess.PIPE, text=True, env=base_env())
    try:
        line = process.stdout.readline()
        assert line.startswith("PORT "), f"fake server did not start: {line!r}"
        yield f"http://127.0.0.1:{int(line.split()[1])}/v1"
    finally:
        process.kill()
        process.wait()


class Daemon:
    """`voxpipe run` as a real process with a private runtime dir, database and config."""

    def __init__(self, settings: Mapping[str, Any], env: Mapping[str, str] | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="vp-"))
        self.runtime_dir = self.dir / "run"
        self.db_path = self.dir / "history.db"
        self.wav_dir = self.dir / "wav"
        config: dict[str, Any] = {
            "bus": {"runtime_dir": str(self.runtime_dir)},
            "history": {"db_path": str(self.db_path)},
            "player": {"backend": "null", "wav_dir": str(self.wav_dir)},
            "log": {"level": "info"},
        }
        _deep_update(config, settings)
        self.config_path = self.dir / "voxpipe.toml"
        write_toml(self.config_path, config)
        self.env = base_env(env)
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        self.process: subprocess.Popen[str] | None = None

    def cli(self, *args: str) -> list[str]:
        return [PYTHON, "-m", "launcher", "--config", str(self.config_path), *args]

    def start(self, timeout: float = 120.0) -> Daemon:
        self.process = subprocess.Popen(self.cli("run"), cwd=ROOT, env=self.env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()
        self.wait_for("voxpipe ready", timeout)
        return self

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.log.append(line)
            self.lines.put(line)

    def wait_for(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.process is not None and self.process.poll() is not None:
                    break
                continue
            if text in line:
                return line
        raise AssertionError(f"{text!r} not seen within {timeout} s; daemon output:\n{''.join(self.log)}")

    def say(self, text: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.cli("say", text, "--timeout", "30", *args), cwd=ROOT, env=self.env,
                              text=True, capture_output=True, timeout=timeout)

    def run_cli(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.cli(*args), cwd=ROOT, env=self.env, text=True, capture_output=True,
                              timeout=timeout)

    def config(self) -> Any:
        from voxpipe.config import load
        return load(self.config_path, env={})

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode

    def close(self) -> None:
        self.stop()
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def openai_settings(base_url: str, stream: bool = True) -> dict[str, Any]:
    return {"llm": {"profile": "fake", "profiles": {"fake": {
        "provider": "openai", "base_url": base_url, "model": "fake-model",
        "api_key_env": "FAKE_OPENAI_KEY", "stream": stream}}}}


def _deep_update(target: dict[str, Any], source: Mapping[str, Any]) -> None:
    for key, value in source.items():
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = value


def start_stage(name: str, runtime: Path, **env: str) -> subprocess.Popen[str]:
    """`voxpipe stage NAME` as a real process on a private runtime dir (env: VOXPIPE_* overrides)."""
    return subprocess.Popen([PYTHON, "-m", "launcher", "stage", name], cwd=ROOT, text=True,
                            env=base_env({"VOXPIPE_BUS__RUNTIME_DIR": str(runtime), **env}),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def connect(runtime: Path, name: str, *kinds: str) -> Any:
    """A bus Connection subscribed to `kinds` (all sessions), opened with the hello handshake."""
    from voxpipe import protocol
    from voxpipe.config import load
    from voxpipe.runtime import Connection, endpoints_for
    config = load(env={"VOXPIPE_BUS__RUNTIME_DIR": str(runtime), "XDG_CONFIG_HOME": str(runtime)})
    deadline = time.monotonic() + 30
    while not runtime.exists() and time.monotonic() < deadline:  # a participant never makes it: a bus just
        time.sleep(0.05)                                           # started does
    client = Connection(name, endpoints_for(config), [protocol.subscription(kind) for kind in kinds])
    client.open(timeout=30)
    return client


def heartbeat_pids(runtime: Path, *wanted: str, seconds: float = 2.5, timeout: float = 20.0) -> dict[str, int]:
    """src -> pid of each process whose `ready` heartbeat came: until every `wanted` src was seen (an
    AssertionError after `timeout`), or, when none is named, for `seconds`."""
    from voxpipe.protocol import Heartbeat
    watcher = connect(runtime, "test-pids", "heartbeat")
    found: dict[str, int] = {}
    deadline = time.monotonic() + (timeout if wanted else seconds)
    try:
        while time.monotonic() < deadline and not (wanted and set(wanted) <= set(found)):
            message = watcher.receive(0.2)
            if message is not None and isinstance(message.body, Heartbeat) and message.body.state == "ready":
                found[message.src] = message.body.pid
    finally:
        watcher.close()
    assert set(wanted) <= set(found), f"no heartbeat from {sorted(set(wanted) - set(found))}"
    return found


def stop_process(process: subprocess.Popen[str]) -> tuple[int, str]:
    """SIGTERM and collect (exit code, stderr)."""
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=15)
    return process.returncode, err or ""


def wait_ready(runtime: Path, src: str, timeout: float = 60.0) -> None:
    """Block until stage `src` has sent a heartbeat (it is connected and serving)."""
    watcher = connect(runtime, f"wait-{src}", "heartbeat")
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            beat = watcher.receive(0.5)
            if beat is not None and beat.src == src:
                return
        raise AssertionError(f"stage {src} sent no heartbeat within {timeout} s")
    finally:
        watcher.close()
