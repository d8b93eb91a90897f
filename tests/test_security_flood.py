"""Issue 14, item 11: a flood cannot exhaust the broker's memory, and oversize frames are refused.

The attack of the security review, on real processes: a real broker (`voxpipe stage bus`), a
subscriber that stops reading (a voxpipe participant, and `voxpipe tap`, both stopped with SIGSTOP
as Ctrl-Z would) and gigabytes of legitimate-size frames. With the former limits (200 000 messages
of up to 8 MiB queued per subscriber) the broker grew with the flood (to 3.7 GB here, 4.15 GB in the
review); now each of its queues holds at most BROKER_HIGH_WATER_MARK frames of at most
BROKER_MAX_BYTES (docs/protocol.md §2.4), and this test prints what it measured. The other
participants keep working, the stopped one learns what it lost once it reads again (a `gap` error),
and the memory comes back when it leaves.

Then an oversize frame of each kind: refused by the sender (`Connection.publish`) with the kind's
limit named, and, sent raw, reported by a real stage (history) with an `invalid_message` error and
its `invalid` counter, while the stage goes on answering.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import PYTHON, ROOT, base_env, connect, start_stage, stop_process, wait_ready
from tests.test_protocol import BOUNDED_BY_FIELDS, heaviest_payload, padded_frame
from voxpipe import protocol
from voxpipe.protocol import (
    Audio,
    Context,
    ContextQuery,
    Error,
    Heartbeat,
    Image,
    Message,
    ProtocolError,
    Request,
    Token,
)
from voxpipe.runtime import Connection

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
QUEUE_BYTES = protocol.BROKER_HIGH_WATER_MARK * protocol.BROKER_MAX_BYTES
"""What one of the broker's queues can hold at most: 256 frames of 4 MiB, 1 GiB."""
BROKER_BOUND = QUEUE_BYTES + 256 * MiB
"""The broker's growth this test allows, 1.25 GiB: the queues towards the stopped subscriber and the
stopped tap full of the flood's first frames, which ZeroMQ shares between them (a frame is counted,
not copied, per queue), and room for the queue from the flooder, which the broker empties as fast as
it forwards. The reader's queue holds only pings. The flood is 5 GiB."""
BIG_FLOOD = 3 * 1024 * MiB
AUDIO_FLOOD = 2 * 1024 * MiB

SLOW_SUBSCRIBER = """
import json, sys, time
from pathlib import Path
from tests.harness import connect
bus = connect(Path(sys.argv[1]), "slow", "audio", "request", "heartbeat")
while (beat := bus.receive(5.0)) is None or beat.src != "bus":
    pass  # a subscriber that has run a while has seen the bus's heartbeats
print("ready", flush=True)
sys.stdin.readline()  # the test stops this process (SIGSTOP) before it sends the line: it reads nothing until then
deadline = time.monotonic() + 4
while time.monotonic() < deadline:
    bus.receive(0.2)
print(json.dumps(dict(bus.counters)), flush=True)
sys.stdin.readline()
"""
"""A participant that subscribes to the flooded kinds, then reads nothing until told, then reads for
4 s (its queue, then what comes) and says what its connection counted."""


def rss_bytes(pid: int) -> int:
    """The resident memory of a process, from /proc/<pid>/status (VmRSS, in kB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


@pytest.fixture
def runtime() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="vp-flood-") as directory:
        yield Path(directory) / "run"


def started_bus(runtime: Path) -> subprocess.Popen[str]:
    bus = start_stage("bus", runtime)
    deadline = time.monotonic() + 60
    while not (runtime / "out.sock").exists() and time.monotonic() < deadline:
        assert bus.poll() is None, f"the bus exited: {bus.communicate()[1]}"
        time.sleep(0.05)
    wait_ready(runtime, "bus")
    return bus


def test_a_subscriber_that_stops_reading_cannot_grow_the_broker(runtime: Path) -> None:
    bus = started_bus(runtime)
    env = base_env({"VOXPIPE_BUS__RUNTIME_DIR": str(runtime), "XDG_CONFIG_HOME": str(runtime)})
    slow = subprocess.Popen([PYTHON, "-c", SLOW_SUBSCRIBER, str(runtime)], cwd=ROOT, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    tap = subprocess.Popen([PYTHON, "-m", "launcher", "tap"], cwd=ROOT, env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    flooder = pinger = reader = None
    try:
        assert slow.stdout is not None and slow.stdin is not None and tap.stdout is not None
        assert slow.stdout.readline().strip() == "ready"
        reader = connect(runtime, "reader", "token", "error")
        flooder = connect(runtime, "flood")
        pinger = connect(runtime, "pinger")
        shown: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [shown.put(line) for line in tap.stdout], daemon=True).start()
        deadline = time.monotonic() + 60
        while "tap, show this" not in drained(shown) and time.monotonic() < deadline:
            flooder.publish("s1", "probe", Token(text="tap, show this"))  # until tap's subscription is live
            time.sleep(0.2)
        slow.send_signal(signal.SIGSTOP)
        tap.send_signal(signal.SIGSTOP)
        start = peak = rss_bytes(bus.pid)

        audio = Audio(chunk=0, frame=0, rate=48000, channels=2, width=2, pcm=bytes(protocol.kinds.PCM_BYTES),
                      last=False, final=False)
        image = Image(mime="image/png", data=bytes(protocol.MAX_MESSAGE_BYTES // 2 - 1024))
        big = Request(text="look", images=(image, image))
        floods = [(big, BIG_FLOOD), (audio, AUDIO_FLOOD)]  # the big frames first: they fill the queues
        began, pings = time.monotonic(), 0
        for body, total in floods:
            size = len(protocol.encode(Message(body, "s1", "r1", 0, 0.0, "flood")))
            assert size > protocol.MAX_MESSAGE_BYTES * 0.99 or body is audio, "the big frames are at the limit"
            for number in range(total // size):
                flooder.publish("s1", "r1", body)
                if number % 64 == 0:
                    pinger.publish("s1", "ping", Token(text=str(pings)))
                    pings += 1
                    peak = max(peak, rss_bytes(bus.pid))
        flood_s = time.monotonic() - began
        time.sleep(1.0)
        peak = max(peak, rss_bytes(bus.pid))
        print(f"\nflood: {(AUDIO_FLOOD + BIG_FLOOD) // MiB} MiB in {flood_s:.1f} s; broker RSS {start / MiB:.0f} MiB "
              f"before, peak {peak / MiB:.0f} MiB (bound: +{BROKER_BOUND // MiB} MiB)")
        assert peak - start < BROKER_BOUND, "the broker's queues are bounded in bytes"

        # the reader, subscribed to other kinds, lost nothing meanwhile; a new participant's handshake
        # (a round trip through the broker) works at once
        got = []
        while (message := reader.receive(2.0)) is not None:
            if isinstance(message.body, Token) and message.id == "ping":
                got.append(int(message.body.text))
        assert got == list(range(pings)), "every ping reached the reader while the broker was flooded"
        assert reader.counters["gaps"] == 0
        connect(runtime, "late").close()

        # the stopped subscriber reads again: it lost what overflowed, and says so
        slow.send_signal(signal.SIGCONT)
        slow.stdin.write("read\n")
        slow.stdin.flush()
        time.sleep(1.5)  # it drains its queue, then the next frame of each stream shows the gap
        flooder.publish("s1", "r1", big)
        flooder.publish("s1", "r1", audio)
        counters = json.loads(slow.stdout.readline())
        assert counters["gaps"] >= 1, counters
        gaps = []
        while (message := reader.receive(2.0)) is not None:
            if isinstance(message.body, Error) and message.src == "slow":
                gaps.append(message.body)
        assert {error.code for error in gaps} == {"gap"}
        assert any("stream request/s1/r1 from flood" in error.message for error in gaps), gaps
        assert any("stream heartbeat// from bus" in error.message for error in gaps), \
            "the bus's lost heartbeats show the stall even where no stream goes on"

        # the slow subscribers leave: the broker lets go of their queues
        slow.stdin.write("bye\n")
        slow.stdin.flush()
        assert slow.wait(30) == 0
        tap.send_signal(signal.SIGCONT)
        tap.terminate()
        tap.wait(30)
        time.sleep(1.0)
        after = rss_bytes(bus.pid)
        print(f"after the slow subscribers left: broker RSS {after / MiB:.0f} MiB")
        assert after - start < QUEUE_BYTES, "the memory of the queues comes back"
        assert bus.poll() is None
    finally:
        for connection in (flooder, pinger, reader):
            if connection is not None:
                connection.close()
        for process in (slow, tap):
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
                process.wait(30)
        code, err = stop_process(bus)
    assert code == 0, err


def test_an_oversize_frame_of_each_kind_is_refused_by_its_sender_and_reported_by_a_stage(runtime: Path) -> None:
    bus = started_bus(runtime)
    history = start_stage("history", runtime, VOXPIPE_HISTORY__DB_PATH=str(runtime.parent / "history.db"))
    client: Connection | None = None
    try:
        wait_ready(runtime, "history")
        client = connect(runtime, "front", "error", "heartbeat", "context")

        # the sender: every kind whose fields can add up past its frame limit is refused, naming that limit
        for kind in sorted(set(protocol.KINDS) - BOUNDED_BY_FIELDS):
            message = protocol.validate(heaviest_payload(kind))
            limit = protocol.KINDS[kind].max_bytes
            with pytest.raises(ProtocolError, match=rf"^{kind} message is \d+ bytes, over the limit of {limit} for "
                                                    rf"{kind} \(docs/protocol.md §2.4\); send less"):
                client.publish(message.session, "big", message.body)

        # the receiver: a frame one byte over its kind's limit, of each kind the history stage reads (but
        # the largest kinds: over BROKER_MAX_BYTES, the broker cuts the sender instead, test_protocol_transport)
        kinds = sorted(kind for kind in history_kinds() if protocol.KINDS[kind].max_bytes < protocol.BROKER_MAX_BYTES)
        for kind in kinds:
            client.send_raw(padded_frame(kind, protocol.KINDS[kind].max_bytes + 1))
        reported: dict[str, str] = {}
        invalid = 0
        deadline = time.monotonic() + 60
        while (len(reported) < len(kinds) or invalid < len(kinds)) and time.monotonic() < deadline:
            message = client.receive(0.5)
            if message is None or message.src != "history":
                continue
            if isinstance(message.body, Error) and message.body.code == "invalid_message":
                kind = message.body.message.split("'")[1].split("/")[0]
                reported[kind] = message.body.message
            elif isinstance(message.body, Heartbeat):
                invalid = message.body.counters.get("invalid", 0)
        assert sorted(reported) == kinds
        for kind, text in reported.items():
            limit = protocol.KINDS[kind].max_bytes
            assert text.endswith(f"{kind} message is {limit + 1} bytes, the limit for {kind} is {limit}"), text
        assert invalid == len(kinds), "each refused frame is counted"

        # and the stage goes on: it answers a context query
        client.publish("s1", "q1", ContextQuery(limit=5))
        deadline = time.monotonic() + 30
        answer = None
        while answer is None and time.monotonic() < deadline:
            message = client.receive(0.5)
            if message is not None and isinstance(message.body, Context) and message.id == "q1":
                answer = message
        assert answer is not None, "history still answers"
        assert history.poll() is None
    finally:
        if client is not None:
            client.close()
        code, err = stop_process(history)
        stop_process(bus)
    assert code == 0, err


def drained(lines: queue.Queue[str]) -> str:
    """What a process printed since the last call."""
    text = ""
    while not lines.empty():
        text += lines.get()
    return text


def history_kinds() -> tuple[str, ...]:
    """What the history stage subscribes to: its handlers' kinds and the heartbeats."""
    from voxpipe.runtime.registry import stage_class
    return (*stage_class("history").kinds(), "heartbeat")
