"""A stage that is down fails a request at once, naming the stage (never a wait for the timeout), and is
back within a second or two, so the next request is answered. Real processes: `voxpipe run`, `kill -9`."""

from __future__ import annotations

import os
import signal
import time

import pytest

import voxpipe
from tests.harness import Daemon, connect, fake_openai, heartbeat_pids, openai_settings
from voxpipe.config import load
from voxpipe.protocol import Error, ErrorCode, LlmDone

KEY = {"FAKE_OPENAI_KEY": "test-key"}


@pytest.mark.timeout(120)
def test_a_request_while_tts_is_down_fails_at_once_and_the_next_one_works() -> None:
    with fake_openai() as url, Daemon(openai_settings(url), env=KEY) as daemon:
        tts = heartbeat_pids(daemon.runtime_dir, "tts")["tts"]
        watcher = connect(daemon.runtime_dir, "watch", "error")
        deadline = time.monotonic() + 10
        config = load(daemon.config_path, env={**os.environ, **daemon.env})
        with voxpipe.connect(config, session="down", name="test") as client:
            os.kill(tts, signal.SIGKILL)
            crashed = None
            while crashed is None and time.monotonic() < deadline:
                message = watcher.receive(0.2)
                if message is not None and isinstance(message.body, Error) and \
                        message.body.code == ErrorCode.STAGE_CRASHED:
                    crashed = message.body
            assert crashed is not None and crashed.stage == "tts" and "was killed by SIGKILL" in crashed.message
            asked = time.monotonic()
            reply = client.ask("Are you there?", timeout=30)
            events = list(reply)
            assert time.monotonic() - asked < 2.0, "failed at once, not at the 30 s timeout"
            assert reply.crashed is not None and reply.crashed.body.code == ErrorCode.STAGE_DOWN
            assert "stage tts is down (was killed by SIGKILL" in reply.crashed.body.message
            assert events[-1] is reply.crashed

            back = time.monotonic() + 15
            done = None
            while done is None and time.monotonic() < back:
                reply = client.ask("And now?", timeout=30)
                for event in reply:
                    if isinstance(event.body, LlmDone):
                        done = event.body
                if reply.crashed is not None:
                    time.sleep(0.2)  # still restarting
            assert done is not None and done.status == "ok"
            assert reply.crashed is None and reply.complete, "spoken to the end"
        watcher.close()
