"""One daemon per user, one instance per stage and shard: a second `voxpipe run`, or a second copy of a
running stage, is refused before it starts anything (exit 2, naming the one that runs), and a copy
that slips past the lock (another host on a TCP bus) is found from the heartbeats and stops.

Real commands on a real daemon: the first one must go on serving, untouched."""

from __future__ import annotations

import os
import subprocess
import time

from tests.harness import ROOT, Daemon, connect, fake_openai, heartbeat_pids, openai_settings
from voxpipe.protocol import Error, ErrorCode, Heartbeat, Message, Request

KEY = {"FAKE_OPENAI_KEY": "test-key"}


def run_cli(daemon: Daemon, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(daemon.cli(*args), cwd=ROOT, env=daemon.env, capture_output=True, text=True,
                          timeout=timeout)


def test_a_second_run_and_a_second_stage_are_refused_and_the_first_goes_on() -> None:
    with fake_openai() as url, Daemon(openai_settings(url), env=KEY) as daemon:
        before = heartbeat_pids(daemon.runtime_dir)
        assert {"bus", "llm", "chunker", "tts", "player", "history"} <= set(before)

        started = time.monotonic()
        second = run_cli(daemon, "run")
        assert second.returncode == 2, second.stderr
        assert "voxpipe run is already running (pid " in second.stderr and "voxpipe status" in second.stderr
        assert time.monotonic() - started < 15, "refused before starting anything, not after a timeout"

        for stage in ("tts", "bus"):
            copy = run_cli(daemon, "stage", stage)
            assert copy.returncode == 2, copy.stderr
            assert f"voxpipe stage {stage} is already running (pid {before[stage]})" in copy.stderr

        assert heartbeat_pids(daemon.runtime_dir) == before, "the first daemon's processes, and only those, still serve"
        said = run_cli(daemon, "say", "Hello there", "--timeout", "30")
        assert said.returncode == 0 and said.stdout.count("Hello there") == 1, said.stdout + said.stderr


def test_a_twin_seen_in_the_heartbeats_is_reported_and_the_younger_stops() -> None:
    """A copy of chunker on another host would carry the same src: the real chunker, younger than the
    twin claims to be, reports duplicate_stage and steps aside; the supervisor restarts it, and with
    the twin gone the pipeline answers again."""
    with fake_openai() as url, Daemon(openai_settings(url), env=KEY) as daemon:
        before = heartbeat_pids(daemon.runtime_dir)
        twin = connect(daemon.runtime_dir, "chunker", "error")
        twin.publish("", "", Heartbeat(pid=os.getpid(), uptime=1e6, state="ready", shard="0/1"))
        deadline = time.monotonic() + 10
        reported: Message[Error] | None = None
        while reported is None and time.monotonic() < deadline:
            message = twin.receive(0.2)
            if message is not None and isinstance(message.body, Error) and \
                    message.body.code == ErrorCode.DUPLICATE_STAGE:
                reported = message  # type: ignore[assignment]
        twin.close()
        assert reported is not None and reported.src == "chunker"
        assert f"pid {before['chunker']}" in reported.body.message and f"pid {os.getpid()}" in reported.body.message
        daemon.wait_for("started chunker", timeout=20)
        watcher = connect(daemon.runtime_dir, "ask", "llm.done")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until the restarted chunker heartbeats
            if heartbeat_pids(daemon.runtime_dir).get("chunker") not in (None, before["chunker"]):
                break
        watcher.publish("twin", "r1", Request(text="Still there?"))
        done = None
        while done is None and time.monotonic() < deadline:
            message = watcher.receive(0.5)
            if message is not None and message.id == "r1":
                done = message
        watcher.close()
        assert done is not None and done.body.status == "ok"
