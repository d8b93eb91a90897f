"""Two machines, one bus: the bus host and a TTS host in network namespaces, over TCP with CURVE.

Host A (10.77.0.1) runs the bus (tcp, CURVE, bound on its veth address), llm (against the fake
OpenAI server, also in A), chunker and history.  Host B (10.77.0.2) runs two tts shards and the
player, with its own client key authorised on A.  A client on A asks; the reply must complete,
spoken on B.  Needs root and iproute2 (`ip netns`); skipped otherwise.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import PYTHON, ROOT, base_env, write_toml
from voxpipe.runtime.shard import shard_of

HOST_A, HOST_B = "10.77.0.1", "10.77.0.2"
PORT = 7600
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces (ip netns add)"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2's `ip` for network namespaces"),
]


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


class Hosts:
    """Two namespaces joined by a veth pair; `spawn` runs a process in one of them."""

    def __init__(self) -> None:
        tag = str(os.getpid())[-7:]
        self.a, self.b = f"vpa{tag}", f"vpb{tag}"
        self.dir = Path(tempfile.mkdtemp(prefix="vp-2h-"))
        self.processes: list[tuple[str, subprocess.Popen[str], Path]] = []

    def create(self) -> None:
        try:
            ip("netns", "add", self.a)
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"cannot create a network namespace here: {exc.stderr.strip()}")
        ip("netns", "add", self.b)
        ip("link", "add", f"{self.a}e", "type", "veth", "peer", "name", f"{self.b}e")
        for ns, address in ((self.a, HOST_A), (self.b, HOST_B)):
            ip("link", "set", f"{ns}e", "netns", ns)
            ip("-n", ns, "addr", "add", f"{address}/24", "dev", f"{ns}e")
            ip("-n", ns, "link", "set", f"{ns}e", "up")
            ip("-n", ns, "link", "set", "lo", "up")

    def spawn(self, ns: str, name: str, *args: str, stdout: Any = None) -> subprocess.Popen[str]:
        log = self.dir / f"{name}.log"
        with open(log, "w") as sink:
            process = subprocess.Popen(["ip", "netns", "exec", ns, PYTHON, *args], cwd=ROOT, text=True,
                                       env=base_env({"XDG_CONFIG_HOME": str(self.dir / "xdg")}),
                                       stdout=stdout or sink, stderr=sink if stdout else subprocess.STDOUT)
        self.processes.append((name, process, log))
        return process

    def run(self, ns: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", ns, PYTHON, *args], cwd=ROOT, text=True, capture_output=True,
                              env=base_env({"XDG_CONFIG_HOME": str(self.dir / "xdg")}), timeout=timeout)

    def logs(self) -> str:
        return "\n".join(f"--- {name} (exit {process.poll()}):\n{log.read_text()[-3000:]}"
                         for name, process, log in self.processes if log.exists())

    def destroy(self) -> None:
        for _, process, _ in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        for _, process, _ in self.processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for ns in (self.a, self.b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture()
def hosts() -> Iterator[Hosts]:
    pair = Hosts()
    try:
        pair.create()
        yield pair
    finally:
        pair.destroy()


def launcher(config: Path, *args: str) -> list[str]:
    return ["-m", "launcher", "--config", str(config), *args]


def test_heavy_tts_on_another_host_over_tcp_and_curve(hosts: Hosts) -> None:
    keys_a, keys_b = hosts.dir / "keys-a", hosts.dir / "keys-b"
    # The bus host makes its keys; the tts host makes a client key; each side gets the other's public key.
    made = hosts.run(hosts.a, "-m", "launcher", "keys", "generate", "--dir", str(keys_a))
    assert made.returncode == 0, made.stderr
    made = hosts.run(hosts.b, "-m", "launcher", "keys", "generate", "--dir", str(keys_b), "--client", "gpu")
    assert made.returncode == 0 and "authorized/gpu.key" in made.stdout, made.stderr
    shutil.copy(keys_b / "client.key", keys_a / "authorized" / "gpu.key")
    shutil.copy(keys_a / "server.key", keys_b / "server.key")

    fake = hosts.spawn(hosts.a, "fake-openai", "-m", "tests.fakes.openai_server", stdout=subprocess.PIPE)
    line = fake.stdout.readline()
    assert line.startswith("PORT "), hosts.logs()
    url = f"http://127.0.0.1:{int(line.split()[1])}/v1"

    wav_dir = hosts.dir / "wav"
    config_a, config_b = hosts.dir / "host-a.toml", hosts.dir / "host-b.toml"
    write_toml(config_a, {
        "bus": {"runtime_dir": str(hosts.dir / "run-a"), "transport": "tcp", "tcp_bind": HOST_A, "tcp_port": PORT,
                "curve": True, "keys_dir": str(keys_a)},
        "llm": {"profile": "fake", "profiles": {"fake": {"provider": "openai", "base_url": url,
                                                         "model": "fake-model", "api_key_env": "FAKE_OPENAI_KEY"}}},
        "history": {"db_path": str(hosts.dir / "history.db")},
    })
    write_toml(config_b, {
        "bus": {"runtime_dir": str(hosts.dir / "run-b"), "transport": "tcp", "connect_host": HOST_A,
                "tcp_port": PORT, "curve": True, "keys_dir": str(keys_b)},
        "player": {"backend": "wav", "wav_dir": str(wav_dir)},
    })
    os.environ["FAKE_OPENAI_KEY"] = "test-key"
    try:
        hosts.spawn(hosts.a, "bus", *launcher(config_a, "stage", "bus"))
        for stage in ("llm", "chunker", "history"):
            hosts.spawn(hosts.a, stage, *launcher(config_a, "stage", stage))
    finally:
        del os.environ["FAKE_OPENAI_KEY"]
    hosts.spawn(hosts.b, "tts@0", *launcher(config_b, "stage", "tts", "--shard", "0/2"))
    hosts.spawn(hosts.b, "tts@1", *launcher(config_b, "stage", "tts", "--shard", "1/2"))
    hosts.spawn(hosts.b, "player", *launcher(config_b, "stage", "player"))

    expected = {"bus", "llm", "chunker", "history", "tts@0", "tts@1", "player"}
    deadline = time.monotonic() + 120
    seen: set[str] = set()
    while time.monotonic() < deadline and not expected <= seen:
        status = hosts.run(hosts.a, *launcher(config_a, "status"))
        seen = {row.split()[0] for row in status.stdout.splitlines()[1:] if row.strip()}
        if not expected <= seen:
            time.sleep(1)
    assert expected <= seen, f"stages seen on the bus: {sorted(seen)}\n{hosts.logs()}"

    # one session for each tts shard, so both remote shards speak
    sessions = [next(f"remote-{n}" for n in range(100) if shard_of(f"remote-{n}", 2) == shard)
                for shard in (0, 1)]
    for session in sessions:
        text = f"hello from {session}"
        reply = hosts.run(hosts.a, *launcher(config_a, "say", text, "--session", session, "--timeout", "60"),
                          timeout=120)
        assert reply.returncode == 0, f"{reply.stderr}\n{hosts.logs()}"
        assert re.fullmatch(rf"Echo: {text}\. Done +here\.", reply.stdout.strip()), reply.stdout  # tag removed
        assert f"audio written to {wav_dir}" in reply.stderr
    assert len(list(wav_dir.glob("*.wav"))) >= 2
    # the bus really listened on the veth address, with CURVE
    assert f"bus listening on tcp://{HOST_A}:{PORT} and tcp://{HOST_A}:{PORT + 1} (CURVE)" in \
        (hosts.dir / "bus.log").read_text()
