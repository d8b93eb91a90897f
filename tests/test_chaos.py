"""Chaos: `kill -9` on a random process of `voxpipe run` in the middle of a reply, round after round.

Each round asks for a long reply (a fake OpenAI server streaming at 20 tokens/s), kills one random
child (the bus or a stage) once the reply is streaming, and asserts:
- the client following the reply ends within 2 s of the kill, with a clear error, or, when only
  history was killed (the reply does not pass through it), goes on and completes;
- the next request, sent 2 s after the kill, is answered: it either succeeds, or fails at once with
  `stage_down`/a lost bus while the stage is still restarting, and then succeeds when asked again
  (within 15 s);
and at the end, that every reply the client saw complete is stored by history, and that SQLite's
`pragma integrity_check` is ok.

The seed and the number of rounds come from VOXPIPE_CHAOS_SEED and VOXPIPE_CHAOS_ROUNDS: `make test`
runs 10 rounds, `make chaos` 100.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import time

import pytest

import voxpipe
from tests.harness import Daemon, fake_openai, heartbeat_pids, openai_settings
from voxpipe.config import load
from voxpipe.frontends.client import Client, VoxpipeError
from voxpipe.protocol import ErrorCode, Text

KEY = {"FAKE_OPENAI_KEY": "test-key"}
ROUNDS = int(os.environ.get("VOXPIPE_CHAOS_ROUNDS", "10"))
SEED = int(os.environ.get("VOXPIPE_CHAOS_SEED", "20261206"))
VICTIMS = ("bus", "llm", "chunker", "tts", "player", "history")
LONG = "Tell me a long story about a lighthouse keeper, the sea, the gulls and the storms. " * 2
ENDS_WITHIN_S = 2.0


def ask_until_answered(client: Client, text: str, completed: set[str], within: float = 15.0) -> float:
    """Ask; while a stage is still restarting the request fails at once, so ask again. Returns how long
    it took to get a complete reply."""
    start = time.monotonic()
    while time.monotonic() - start < within:
        try:
            reply = client.ask(text, timeout=10)
            for _ in reply:
                pass
        except VoxpipeError:  # the bus is still restarting (BusLost, BusUnavailable)
            time.sleep(0.2)
            continue
        if reply.complete and reply.done is not None and reply.done.body.status == "ok":
            completed.add(reply.id)
            return time.monotonic() - start
        assert reply.crashed is not None, "a reply that is not complete ends with a reason"
        assert reply.crashed.body.code in (ErrorCode.STAGE_DOWN, ErrorCode.STAGE_CRASHED), reply.crashed
        time.sleep(0.2)
    raise AssertionError(f"no complete reply to {text!r} within {within:g} s")


@pytest.mark.timeout(60 + 30 * ROUNDS)
def test_chaos_kill_a_random_process_mid_reply() -> None:
    chance = random.Random(SEED)
    completed: set[str] = set()
    with fake_openai(delay=0.05) as url:
        settings = openai_settings(url)
        settings["run"] = {"restart_limit": 1000}
        with Daemon(settings, env=KEY) as daemon:
            config = load(daemon.config_path, env={**os.environ, **daemon.env})
            with voxpipe.connect(config, session="chaos", name="chaos") as client:
                ask_until_answered(client, "Warm up.", completed)
                for round_ in range(ROUNDS):
                    victim = chance.choice(VICTIMS)
                    pid = heartbeat_pids(daemon.runtime_dir, *VICTIMS)[victim]
                    reply = client.ask(f"Round {round_}. {LONG}", timeout=30)
                    killed_at = None
                    try:
                        for event in reply:
                            if killed_at is None and isinstance(event.body, Text) and event.body.delta:
                                time.sleep(chance.uniform(0.0, 0.5))
                                os.kill(pid, signal.SIGKILL)
                                killed_at = time.monotonic()
                    except VoxpipeError as exc:
                        assert "went away" in str(exc), exc
                    assert killed_at is not None, f"round {round_}: the reply never streamed"
                    ended = time.monotonic() - killed_at
                    if victim == "history":
                        assert reply.complete, f"round {round_}: history's death must not cost the reply"
                        completed.add(reply.id)
                    else:
                        assert ended < ENDS_WITHIN_S, f"round {round_} ({victim}): the client ended {ended:.2f} s " \
                                                      f"after the kill"
                        if reply.complete and reply.done is not None and reply.done.body.status == "ok":
                            completed.add(reply.id)
                    time.sleep(max(0.0, 2.0 - (time.monotonic() - killed_at)))
                    ask_until_answered(client, f"Are you back after round {round_}?", completed)
            time.sleep(2.0)  # history's last writes
            database = sqlite3.connect(daemon.db_path)
            try:
                stored = {row[0] for row in database.execute(
                    "SELECT request_id FROM messages WHERE role = 'assistant'")}
                assert completed <= stored, f"completed replies missing from history: {sorted(completed - stored)}"
                assert database.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            finally:
                database.close()
