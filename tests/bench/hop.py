"""Bus hop latency: one publisher process and one subscriber process, two paths side by side.

Messages alternate between the broker (`voxpipe stage bus`) and a direct PUB->SUB ipc
socket, so both paths share the same load and drift and only the broker differs.  Each is
a real `token` frame; the sender's time.monotonic_ns() travels in its text (CLOCK_MONOTONIC
is one clock for every process on Linux) and the receiver subtracts it after decoding, so a
hop is what a stage sees from publish to a decoded message.

Child roles: `python -m tests.bench.hop pub|sub RUN_DIR DIRECT_ENDPOINT [COUNT RATE]`.
"""

from __future__ import annotations

import json
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq

from tests.harness import PYTHON, ROOT, base_env
from voxpipe import protocol
from voxpipe.runtime.broker import Endpoints

PATHS = ("broker", "direct")
SUBSCRIBE = protocol.subscription("token")


def frame(path: str, id: str, seq: int, text: str) -> bytes:
    return protocol.encode(protocol.Message(protocol.Token(text=text), path, id, seq, time.time(), "bench.pub"))


def codec_us(rounds: int = 5000) -> float:
    """Median µs to make, encode and decode one hop frame in-process: the part of a hop that is not transport."""
    costs = []
    for seq in range(rounds):
        start = time.perf_counter_ns()
        protocol.decode(frame("direct", "hop", seq, str(start)))
        costs.append((time.perf_counter_ns() - start) / 1000)
    return sorted(costs)[rounds // 2]


def _socket(context: zmq.Context, kind: int) -> zmq.Socket:
    sock = context.socket(kind)
    sock.linger = 1000
    sock.sndhwm = sock.rcvhwm = protocol.HIGH_WATER_MARK
    return sock


def publish(run_dir: Path, direct: str, count: int, rate: float) -> None:
    """Probe both paths until the parent says GO, then send `count` stamped messages per path."""
    context = zmq.Context()
    sockets = {"broker": _socket(context, zmq.PUB), "direct": _socket(context, zmq.PUB)}
    sockets["broker"].connect(Endpoints.in_dir(run_dir).inbound)
    sockets["direct"].bind(direct)
    while not select.select([sys.stdin], [], [], 0.01)[0]:
        for path, sock in sockets.items():
            sock.send(frame(path, "probe", 0, ""))
    sys.stdin.readline()
    time.sleep(0.2)  # the last probes drain before the first timed message
    interval = 1.0 / rate
    start = time.monotonic()
    for seq in range(2 * count):
        path = PATHS[seq % 2]
        pause = start + seq * interval - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        stamp = time.monotonic_ns()
        sockets[path].send(frame(path, "hop", seq // 2, str(stamp)))
    for path, sock in sockets.items():
        sock.send(frame(path, "end", 0, ""))
        sock.close()
    context.term()


def subscribe(run_dir: Path, direct: str) -> None:
    """Print READY once probes arrive on both paths, then the latencies (µs) as one JSON line."""
    context = zmq.Context()
    sockets = {"broker": _socket(context, zmq.SUB), "direct": _socket(context, zmq.SUB)}
    sockets["broker"].connect(Endpoints.in_dir(run_dir).outbound)
    sockets["direct"].connect(direct)
    poller = zmq.Poller()
    for sock in sockets.values():
        sock.setsockopt(zmq.SUBSCRIBE, SUBSCRIBE)
        poller.register(sock, zmq.POLLIN)
    samples: dict[str, list[float]] = {path: [] for path in PATHS}
    probed: set[str] = set()
    ended: set[str] = set()
    while len(ended) < len(PATHS):
        ready = poller.poll(10_000)
        if not ready:
            break  # a lost end marker; the parent reports the shortfall
        for sock, _ in ready:
            message = protocol.decode(sock.recv())
            now = time.monotonic_ns()
            if message.id == "hop":
                samples[message.session].append((now - int(message.body.text)) / 1000)
            elif message.id == "end":
                ended.add(message.session)
            elif message.session not in probed:
                probed.add(message.session)
                if len(probed) == len(PATHS):
                    print("READY", flush=True)
    print(json.dumps(samples), flush=True)
    for sock in sockets.values():
        sock.close()
    context.term()


def measure(count: int, rate: float) -> dict[str, list[float]]:
    """Run broker, subscriber and publisher processes; returns µs latencies per path.

    `rate` is messages per second over both paths together.
    """
    directory = Path(tempfile.mkdtemp(prefix="vpb-", dir="/tmp"))  # ipc paths are limited to ~107 bytes
    config = directory / "bench.toml"
    config.write_text("")
    run_dir = directory / "run"
    direct = f"ipc://{directory / 'direct.sock'}"
    env = base_env({"VOXPIPE_BUS__RUNTIME_DIR": str(run_dir)})
    children: list[subprocess.Popen[str]] = []

    def child(*args: str, **kwargs: object) -> subprocess.Popen[str]:
        process = subprocess.Popen([PYTHON, "-m", *args], cwd=ROOT, env=env, text=True, **kwargs)
        children.append(process)
        return process

    try:
        child("launcher", "--config", str(config), "stage", "bus", stderr=subprocess.DEVNULL)
        _wait_for(run_dir / "out.sock")
        role = ("tests.bench.hop",)
        sub = child(*role, "sub", str(run_dir), direct, stdout=subprocess.PIPE)
        pub = child(*role, "pub", str(run_dir), direct, str(count), str(rate), stdin=subprocess.PIPE)
        if sub.stdout.readline().strip() != "READY":
            raise RuntimeError("hop subscriber never saw the probes")
        pub.stdin.write("GO\n")
        pub.stdin.flush()
        samples = json.loads(sub.stdout.readline())
        pub.wait(30)
        return samples
    finally:
        for process in reversed(children):
            process.terminate()
            process.wait(10)
        shutil.rmtree(directory, ignore_errors=True)


def _wait_for(path: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the broker did not create {path} within {timeout:g} s")
        time.sleep(0.02)


def main(argv: list[str]) -> None:
    role, run_dir, direct = argv[0], Path(argv[1]), argv[2]
    if role == "pub":
        publish(run_dir, direct, int(argv[3]), float(argv[4]))
    else:
        subscribe(run_dir, direct)


if __name__ == "__main__":
    main(sys.argv[1:])
