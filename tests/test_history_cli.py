"""`voxpipe history show | import` and `voxpipe stats` as real CLI processes on real SQLite, and what
a failed or interrupted exchange sends the model next, through a running daemon."""

from __future__ import annotations

import itertools
import json
import socket
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.fakes.wire_server import WireServer, sse_script
from tests.harness import Daemon
from voxpipe import protocol
from voxpipe.protocol import Body, LlmDone, Message, Request
from voxpipe.runtime import Connection, endpoints_for
from voxpipe.stages.history.store import HistoryStore

QUESTION = "What is in this picture?"
KEY = {"WIRE_KEY": "sk-test-history"}


def stream(*pieces: str, delay: float = 0.0):
    events: list[Any] = [{"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "scripted",
                          "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                         for piece in pieces]
    return sse_script([*events, "[DONE]"], delay=delay)


def profile(base_url: str) -> dict[str, Any]:
    return {"provider": "openai", "base_url": base_url, "model": "scripted", "api_key_env": "WIRE_KEY",
            "retries": 0, "connect_timeout_s": 1.0, "first_token_timeout_s": 5.0, "idle_timeout_s": 5.0}


def dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def turns(record) -> list[tuple[str, str]]:
    """The conversation one request sent the model, without the system prompt."""
    return [(m["role"], m["content"]) for m in record.json["messages"] if m["role"] != "system"]


def without_stamps(output: str) -> list[str]:
    """`history show` lines without their `[HH:MM:SS] ` prefix (detail lines keep their indent)."""
    return [line.split("] ", 1)[1] if line.startswith("[") else line for line in output.splitlines()]


class Asker:
    """Sends requests in one session and collects tokens and llm.done per request."""

    def __init__(self, daemon: Daemon, session: str) -> None:
        self.session = session
        self.client = Connection("test-history", endpoints_for(daemon.config()),
                                 [protocol.subscription(kind, session) for kind in ("token", "llm.done")])
        self.client.open()
        self.seen: list[Message[Body]] = []

    def ask(self, request_id: str, text: str, profile: str) -> str:
        self.client.publish(self.session, request_id, Request(text=text, profile=profile))
        return request_id

    def wait(self, request_id: str, kind: str, timeout: float = 30.0) -> Message[Body]:
        deadline = time.monotonic() + timeout
        while True:
            found = next((m for m in self.seen if m.id == request_id and m.kind == kind), None)
            if found is not None:
                return found
            assert time.monotonic() < deadline, f"no {kind} for {request_id}: {self.seen}"
            message = self.client.receive(0.5)
            if message is not None:
                self.seen.append(message)

    def done(self, request_id: str) -> LlmDone:
        """The request's llm.done."""
        done = self.wait(request_id, "llm.done").body
        assert isinstance(done, LlmDone)
        return done


def test_failed_and_interrupted_exchanges_in_the_next_prompt_and_in_history_show() -> None:
    with WireServer() as wire:
        settings = {"llm": {"profile": "wire", "profiles": {
            "wire": profile(wire.url("/v1")), "wire2": profile(wire.url("/v1")),
            "refused": profile(f"http://127.0.0.1:{dead_port()}/v1")}}}
        with Daemon(settings, env=KEY) as daemon:
            asker = Asker(daemon, "pic")
            errors = [asker.done(asker.ask(f"fail{n}", QUESTION, "refused")) for n in range(2)]
            assert [done.status for done in errors] == ["error", "error"]

            wire.enqueue(stream("It is ", "a cat."))
            assert asker.done(asker.ask("ok", QUESTION, "wire")).status == "ok"
            assert turns(wire.records[0]) == [("user", QUESTION)], "the failed attempts reached the model"

            wire.enqueue(stream(*[f"word{n} " for n in range(100)], delay=0.05), stream("Sure."))
            asker.wait(asker.ask("third", "Third", "wire"), "token")
            asker.ask("barge", "barge in", "wire")
            assert asker.done("third").status == "interrupted"
            assert asker.done("barge").status == "ok"

            wire.enqueue(stream("Fine."))
            assert asker.done(asker.ask("after", "After", "wire2")).status == "ok"
            asker.client.close()
            sent = turns(wire.records[3])
            assert sum(content.count(QUESTION) for _, content in sent) == 1
            assert sent[:2] == [("user", QUESTION), ("assistant", "It is a cat.")]
            users = [content for role, content in sent if role == "user"]
            assert "\n".join(users).split("\n")[1:] == ["Third", "barge in", "After"]
            assert sent[-1] == ("user", "After") and all(a[0] != b[0] for a, b in itertools.pairwise(sent))

            deadline = time.monotonic() + 20
            while True:
                shown = daemon.run_cli("history", "show", "pic")
                if "assistant: Fine." in shown.stdout or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
    assert shown.returncode == 0, shown.stderr
    lines = [line for line in without_stamps(shown.stdout) if not line.startswith("    ")]
    assert all("cannot reach" in done.error for done in errors)
    assert lines[:6] == [f"user: {QUESTION}", f"assistant (error: {errors[0].error})",
                         f"user: {QUESTION}", f"assistant (error: {errors[1].error})",
                         f"user: {QUESTION}", "assistant: It is a cat."]
    assert lines[6] == "user: Third" and lines[7].startswith("assistant (interrupted)")
    assert lines[8:] == ["user: barge in", "assistant: Sure.", "user: After", "assistant: Fine."]
    assert "interrupted, interrupted" not in shown.stdout


SAMPLE = {"fixed_parts": ["Ты — Мита."],
          "messages": [{"role": "user", "content": "Привет!", "time": "2024-05-01 12:00:00"},
                       {"role": "assistant", "content": "Привет! <e>smile</e>", "time": "01.05.2024 12:00:05"},
                       {"role": "user", "content": "Как дела?", "time": "2024-05-01T09:00:10+00:00"},
                       {"role": "assistant", "content": "Хорошо."}],
          "temp_context": [], "variables": {"attitude": 60}}


def test_import_keeps_the_files_times_and_a_bad_file_changes_nothing(tmp_path: Path) -> None:
    good, bad = tmp_path / "mita.json", tmp_path / "bad.json"
    good.write_text(json.dumps(SAMPLE, ensure_ascii=False))
    broken = json.loads(json.dumps(SAMPLE))
    broken["messages"][0]["content"] = "Changed"
    broken["messages"][1]["time"] = "yesterday"
    bad.write_text(json.dumps(broken, ensure_ascii=False))
    daemon = Daemon({})
    try:
        before = time.time()
        imported = daemon.run_cli("history", "import", str(good))
        after = time.time()
        assert imported.returncode == 0, imported.stderr
        refused = daemon.run_cli("history", "import", str(bad), "--session", "mita")
        assert refused.returncode == 2
        assert refused.stderr.strip() == ("voxpipe: messages[1].time \"yesterday\" is not a date like "
                                          "\"2024-05-01 12:00:00\" or \"01.05.2024 12:00\"; correct it, or "
                                          "delete the \"time\" field to give the message the time of import")
        shown = daemon.run_cli("history", "show", "mita")
        exported = daemon.run_cli("history", "export", "mita")
        store = HistoryStore(daemon.db_path)
        try:
            messages = store.messages("mita")
            replay_from = store.last_ts()
        finally:
            store.close()
    finally:
        daemon.close()
    stamps = [message["ts"] for message in messages]
    assert stamps[:3] == [datetime(2024, 5, 1, 12, 0, 0).timestamp(), datetime(2024, 5, 1, 12, 0, 5).timestamp(),
                          datetime(2024, 5, 1, 9, 0, 10, tzinfo=UTC).timestamp()]
    assert before <= stamps[3] <= after, "a message without a time gets the time of import"
    assert messages[0]["content"] == "Привет!", "the refused file changed the session"
    assert replay_from == 0.0, "imported times must not move where a catch-up replay starts"
    assert without_stamps(shown.stdout)[:2] == ["user: Привет!", "assistant: Привет! <e>smile</e>"]
    assert shown.stdout.startswith("[12:00:00] user: Привет!\n[12:00:05] assistant:")
    assert [m.get("time") for m in json.loads(exported.stdout)["messages"][:3]] == [
        "2024-05-01 12:00:00", "01.05.2024 12:00:05", "2024-05-01T09:00:10+00:00"]


def timeline(profile: str, provider: str, engine: str, first_token: float, status: str = "ok") -> dict[str, Any]:
    reached = status != "error"
    return {"profile": profile, "provider": provider, "engine": engine, "status": status,
            "first_token_ms": first_token if reached else -1.0, "first_chunk_ms": first_token + 50 if reached else -1.0,
            "first_audio_ms": first_token + 200 if reached else -1.0,
            "first_playback_ms": first_token + 210 if reached else -1.0}


def test_stats_groups_by_profile_and_engine_and_counts_failed_requests() -> None:
    replies = [timeline("fast", "openai", "espeak", 100), timeline("fast", "openai", "espeak", 300),
               timeline("smart", "openai", "espeak", 900), timeline("smart", "", "espeak", 0, status="error"),
               timeline("fast", "openai", "coqui", 120)]
    daemon = Daemon({})
    try:
        store = HistoryStore(daemon.db_path)
        try:
            for number, metrics in enumerate(replies):
                store.add_message("s", f"r{number}", "user", "hi", time.time())
                store.add_message("s", f"r{number}", "assistant", "", time.time(), status=metrics["status"])
                store.add_metrics("s", f"r{number}", metrics)
        finally:
            store.close()
        stats = daemon.run_cli("stats")
    finally:
        daemon.close()
    assert stats.returncode == 0, stats.stderr
    header, *rows = stats.stdout.splitlines()
    assert header.split()[:5] == ["PROFILE", "PROVIDER", "ENGINE", "REPLIES", "FAILED"]
    cells = [row.split() for row in rows]
    assert [row[:5] for row in cells] == [["fast", "openai", "coqui", "1", "0"],
                                          ["fast", "openai", "espeak", "2", "0"],
                                          ["smart", "openai", "espeak", "2", "1"]]
    assert cells[1][5:8] == ["100", "/", "300"] and cells[2][5:8] == ["900", "/", "900"]
