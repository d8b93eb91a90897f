"""The broker's death is noticed at once and survived: a client following a reply ends within a second
with a clear error (never at its own timeout), `voxpipe say` exits 1 naming it, and once `voxpipe run`
has restarted the bus, every participant has handshaken again and the next request is answered.

Real processes: `voxpipe run` with a slow fake OpenAI server, and `kill -9` on the bus child."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time

import pytest

import voxpipe
from tests.harness import ROOT, Daemon, fake_openai, heartbeat_pids, openai_settings
from voxpipe.config import load
from voxpipe.protocol import LlmDone, Text
from voxpipe.runtime import BusLost

KEY = {"FAKE_OPENAI_KEY": "test-key"}
LONG = "Tell me a long story about a lighthouse keeper and the sea, with many details. " * 3


@pytest.mark.timeout(180)
def test_a_killed_bus_ends_the_reply_at_once_and_the_next_request_works() -> None:
    with fake_openai(delay=0.05) as url, Daemon(openai_settings(url), env=KEY) as daemon:
        bus = heartbeat_pids(daemon.runtime_dir, "bus")["bus"]
        config = load(daemon.config_path, env={**os.environ, **daemon.env})
        with voxpipe.connect(config, session="lost", name="test") as client:
            reply = client.ask(LONG, timeout=45)
            got_text = False
            for event in reply:
                if isinstance(event.body, Text) and event.body.delta:
                    got_text = True
                    break
            assert got_text, "the reply was streaming when the bus died"
            os.kill(bus, signal.SIGKILL)
            killed = time.monotonic()
            with pytest.raises(BusLost, match="went away"):
                for _ in reply:
                    pass
            assert time.monotonic() - killed < 1.5, "noticed within a second, not at the 45 s timeout"

            daemon.wait_for("started bus", timeout=15)
            deadline = time.monotonic() + 20
            done = None
            while done is None and time.monotonic() < deadline:
                try:
                    for event in client.ask("Are you back?", timeout=20):
                        if isinstance(event.body, LlmDone):
                            done = event.body
                except BusLost:
                    continue  # the old connection's loss may still be in the queue: ask again
                except Exception as exc:
                    if "answered" not in str(exc):
                        raise
                    time.sleep(0.2)
            assert done is not None and done.status == "ok" and "Are you back?" in done.text
            # the reply cut by the bus's death ended (llm ends its jobs) while no bus carried its llm.done:
            # history asks llm's journal once the bus is back, so it is stored all the same
            lost_id = reply.id
            stored = None
            deadline = time.monotonic() + 10
            while stored is None and time.monotonic() < deadline:
                time.sleep(0.3)
                database = sqlite3.connect(daemon.db_path)
                try:
                    stored = database.execute("SELECT status FROM messages WHERE role = 'assistant' AND "
                                              "request_id = ?", (lost_id,)).fetchone()
                finally:
                    database.close()
            assert stored is not None and stored[0] in ("interrupted", "ok"), stored


@pytest.mark.timeout(180)
def test_say_exits_at_once_with_the_reason_when_the_bus_dies() -> None:
    with fake_openai(delay=0.05) as url, Daemon(openai_settings(url), env=KEY) as daemon:
        bus = heartbeat_pids(daemon.runtime_dir, "bus")["bus"]
        say = subprocess.Popen(daemon.cli("say", LONG, "--timeout", "45"), cwd=ROOT, env=daemon.env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert say.stdout is not None
        say.stdout.read(10)  # the reply is streaming
        os.kill(bus, signal.SIGKILL)
        killed = time.monotonic()
        _, err = say.communicate(timeout=10)
        assert time.monotonic() - killed < 3.0
        assert say.returncode == 1 and "went away" in err, err


@pytest.mark.timeout(180)
def test_tap_says_when_the_bus_goes_and_when_it_is_back() -> None:
    with fake_openai() as url, Daemon(openai_settings(url), env=KEY) as daemon:
        bus = heartbeat_pids(daemon.runtime_dir, "bus")["bus"]
        tap = subprocess.Popen(daemon.cli("tap"), cwd=ROOT, env=daemon.env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(1.0)  # connected
            os.kill(bus, signal.SIGKILL)
            assert tap.stderr is not None
            assert "lost the bus" in tap.stderr.readline()
            assert "the bus is back" in tap.stderr.readline()
        finally:
            tap.kill()
            tap.wait()
