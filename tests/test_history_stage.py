"""Commands and history in real processes with real SQLite: the pipeline, interruptions, a crash, import,
and what a failed or interrupted exchange leaves for the next prompt."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Daemon, connect, fake_openai, openai_settings, start_stage, stop_process, wait_ready
from voxpipe import protocol
from voxpipe.protocol import (
    Cancel,
    ChatMessage,
    Chunk,
    Command,
    Context,
    ContextQuery,
    Error,
    ErrorCode,
    Heartbeat,
    HistorySaved,
    LlmDone,
    Message,
    Metrics,
    Playback,
    Replay,
    Request,
    Text,
)
from voxpipe.runtime import Connection, endpoints_for
from voxpipe.stages.history.stage import UNPLAYED_WAIT_S
from voxpipe.stages.history.store import HistoryStore
from voxpipe.stages.llm.core import build_messages, render_dialogue

KEY = {"FAKE_OPENAI_KEY": "test-key"}
TAGGED = ("Привет <e>smile</e> и <c>Подойти к игроку</c>. Запомни <+memory>high|Игрок любит кошек</memory> "
          "и <p>2,-1,0</p>. Нельзя <teleport>moon</teleport> <e>furious-ish</e>.")


@pytest.fixture(scope="module")
def server() -> str:
    with fake_openai() as url:
        yield url


def follow(client: Connection, request_id: str, until, timeout: float = 30.0) -> list[Message]:
    messages: list[Message] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not until(messages):
        message = client.receive(0.5)
        if message is not None and message.id == request_id:
            messages.append(message)
    return messages


def commands_of(messages: list[Message]) -> list[tuple[Any, ...]]:
    return [(m.body.name, m.body.args, m.body.accepted, m.body.chunk, m.body.offset) for m in messages
            if isinstance(m.body, Command)]


def test_commands_in_a_streamed_reply_are_published_placed_and_applied(server: str) -> None:
    with Daemon(openai_settings(server), env=KEY) as daemon:
        client = Connection("cmd", endpoints_for(daemon.config()),
                            [protocol.subscription(kind) for kind in ("command", "context", "history.saved")])
        client.open()
        results = {}
        for mode in (True, False):
            session, request_id = f"cmd-{mode}", f"r-{mode}"
            client.publish(session, request_id, Request(text=TAGGED, stream=mode))
            messages = follow(client, request_id, lambda got: len([m for m in got if m.kind == "command"]) >= 7)
            results[mode] = commands_of(messages)
        # the fake server's reply is "Echo: <the message>. Done <e>smile</e> here."
        reply = results[True]
        assert [(name, accepted) for name, _, accepted, _, _ in reply] == [
            ("e", True), ("c", True), ("+memory", True), ("p", True), ("teleport", False), ("e", False),
            ("e", True)]
        # every well-formed tag is a chunker mark, an unknown one too (it is refused, never shown): all are placed
        assert all(chunk >= 0 and offset >= 0 for _, _, _, chunk, offset in reply)
        assert results[True] == results[False], "streaming on and off must give the same command events"

        client.publish("cmd-True", "probe", ContextQuery(limit=10))
        context = follow(client, "probe", lambda got: any(m.kind == "context" for m in got))[-1].body
        client.close()
        assert isinstance(context, Context)
        assert context.memory == '1. [high] "Игрок любит кошек"\n2. [high] "Игрок любит кошек"'  # one per reply
        assert context.variables == {"attitude": 54.0, "boredom": 48.0, "stress": 50.0}  # two replies: 2*(+2,-1)
        with sqlite3.connect(daemon.db_path) as db:
            stored = db.execute("SELECT session, content FROM messages WHERE role='assistant' ORDER BY session")
            texts = dict(stored.fetchall())
            refused = db.execute("SELECT COUNT(*) FROM commands WHERE accepted=0").fetchone()[0]
        assert texts["cmd-True"] == texts["cmd-False"] and "<e>smile</e>" in texts["cmd-True"]
        assert refused == 4  # 2 refused tags per reply, in both modes


def test_an_interrupted_reply_is_stored_with_what_was_heard_and_the_next_context_uses_it() -> None:
    runtime = Path(tempfile.mkdtemp(prefix="vp-hist-")) / "run"
    db = runtime.parent / "history.db"
    bus = start_stage("bus", runtime)
    try:
        connect(runtime, "probe").close()
        history = start_stage("history", runtime, VOXPIPE_HISTORY__DB_PATH=str(db))
        wait_ready(runtime, "history")
        client = connect(runtime, "front", "history.saved", "context")
        client.publish("talk", "q1", Request(text="Tell me a story."))
        follow(client, "q1", lambda got: any(m.kind == "history.saved" for m in got))
        reply = "Once upon a time there was a cat. It lived in a tall tower by the sea."
        client.publish("talk", "q1", LlmDone(status="ok", text=reply, tokens=1))
        follow(client, "q1", lambda got: len([m for m in got if m.kind == "history.saved"]) >= 1)
        first, second = "Once upon a time there was a cat.", "It lived in a tall tower by the sea."
        client.publish("talk", "q1", Chunk(text=first, index=0, final=False))
        client.publish("talk", "q1", Chunk(text=second, index=1, final=True))
        client.publish("talk", "q1", Playback(event="finished", chunk=0, heard=1.0, heard_chars=len(first)))
        client.publish("talk", "q1", Playback(event="stopped", chunk=1, heard=0.3, heard_chars=11, final=True))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with sqlite3.connect(db) as database:
                row = database.execute("SELECT spoken, interrupted, content FROM messages WHERE role='assistant'")
                spoken, interrupted, content = row.fetchone() or (None, 0, "")
            if spoken:
                break
            time.sleep(0.1)
        assert (spoken, interrupted, content) == (f"{first} It lived in", 1, reply)
        client.publish("talk", "q2", ContextQuery(limit=10))
        context = follow(client, "q2", lambda got: any(m.kind == "context" for m in got))[-1].body
        client.close()
        assert isinstance(context, Context)
        assert context.messages == (ChatMessage(role="user", content="Tell me a story."),
                                    ChatMessage(role="assistant", content=f"{first} It lived in"))
        assert stop_process(history)[0] == 0
    finally:
        stop_process(bus)


def test_memories_and_variables_belong_to_the_persona_of_the_request_that_made_the_reply() -> None:
    """A game speaks as several characters: each keeps its own memories and state (docs/design/game-link.md
    §4.2). A reply's commands change its request's persona, a replayed one's too, and a context query gets
    the memories and variables of the persona it names ("" is history.persona)."""
    runtime = Path(tempfile.mkdtemp(prefix="vp-persona-")) / "run"
    bus = start_stage("bus", runtime)
    try:
        connect(runtime, "probe").close()
        history = start_stage("history", runtime, VOXPIPE_HISTORY__DB_PATH=str(runtime.parent / "history.db"))
        wait_ready(runtime, "history")
        client = connect(runtime, "front", "history.saved", "context")

        def saved(request_id: str, role: str) -> None:
            assert follow(client, request_id, lambda got: any(
                isinstance(m.body, HistorySaved) and m.body.role == role for m in got), 10), (request_id, role)

        for request_id, persona, reply in [
                ("q1", "Crazy", "Ok <+memory>high|The player likes cats</memory> <p>2,-1,0</p>"),
                ("q2", "", "Fine <+memory>low|The player drinks tea</memory>")]:
            client.publish("game", request_id, Request(text="hi", persona=persona))
            saved(request_id, "user")
            client.publish("game", request_id, LlmDone(status="ok", text=reply, tokens=1))
            saved(request_id, "assistant")
        client.publish("game", "q3", Replay(status="ok", text="<+memory>normal|Mila lent a book</memory>", tokens=1,
                                            request_text="hi", request_ts=time.time(), done_ts=time.time(),
                                            request_persona="Mila"))
        saved("q3", "assistant")

        contexts = {}
        for persona in ("Crazy", "", "Mila", "Kind"):
            client.publish("game", f"ask-{persona}", ContextQuery(limit=10, persona=persona))
            got = follow(client, f"ask-{persona}", lambda got: any(m.kind == "context" for m in got), 10)
            contexts[persona] = got[-1].body
        client.close()
        assert {persona: context.memory for persona, context in contexts.items()} == {
            "Crazy": '1. [high] "The player likes cats"', "": '2. [low] "The player drinks tea"',
            "Mila": '3. [normal] "Mila lent a book"', "Kind": ""}
        assert contexts["Crazy"].variables == {"attitude": 52.0, "boredom": 49.0, "stress": 50.0}
        assert contexts[""].variables == contexts["Kind"].variables == {"attitude": 50.0, "boredom": 50.0,
                                                                          "stress": 50.0}
        assert len(contexts["Kind"].messages) == 6  # the turns are the session's (3 exchanges), whoever answered
        assert stop_process(history)[0] == 0
    finally:
        stop_process(bus)


def test_kill_history_under_load_then_it_catches_up(server: str) -> None:
    with fake_openai(delay=0.01) as slow, Daemon(openai_settings(slow), env=KEY) as daemon:
        client = Connection("load", endpoints_for(daemon.config()), [
            protocol.subscription(kind) for kind in ("history.saved", "llm.done", "error", "heartbeat")])
        client.open()
        history_pid = next(m.body.pid for m in iter(lambda: client.receive(2), None)
                           if isinstance(m.body, Heartbeat) and m.src == "history")
        ids = [f"load-{n}" for n in range(100)]
        for number, request_id in enumerate(ids):
            client.publish(f"s{number}", request_id, Request(text=f"question {number}"))
        saved, done, gaps, killed = set(), set(), [], False
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(done) < 100:
            message = client.receive(0.5)
            if message is None:
                continue
            if message.kind == "llm.done":
                done.add(message.id)
                if len(done) == 30 and not killed:
                    os.kill(history_pid, signal.SIGKILL)
                    killed = True
            elif isinstance(message.body, HistorySaved) and message.body.role == "assistant":
                saved.add(message.id)
            elif isinstance(message.body, Error) and message.body.code == ErrorCode.HISTORY_GAP:
                gaps.append(message)
        assert killed and len(done) == 100
        stored: set[str] = set()
        deadline = time.monotonic() + 60   # the restarted stage catches up: poll until it has
        while time.monotonic() < deadline and stored != set(ids) and not gaps:
            message = client.receive(0.5)
            if message is not None and isinstance(message.body, HistorySaved) and message.body.role == "assistant":
                saved.add(message.id)
            elif message is not None and isinstance(message.body, Error) and message.body.code == ErrorCode.HISTORY_GAP:
                gaps.append(message)
            with sqlite3.connect(daemon.db_path) as db:
                stored = {row[0] for row in db.execute("SELECT request_id FROM messages WHERE role='assistant'")}
        client.close()
        with sqlite3.connect(daemon.db_path) as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            stored = {row[0] for row in db.execute("SELECT request_id FROM messages WHERE role='assistant'")}
            users = {row[0] for row in db.execute("SELECT request_id FROM messages WHERE role='user'")}
        assert saved <= stored, "a reply announced as saved is missing"
        assert stored == set(ids) or gaps, f"{100 - len(stored)} replies missing and no history_gap reported"
        assert users >= stored


def test_companion_history_import_round_trips_through_export(tmp_path: Path) -> None:
    sample = {"fixed_parts": ["Ты — Мита."],
              "messages": [{"role": "user", "content": "Привет!", "time": "2024-05-01 12:00:00"},
                           {"role": "assistant", "content": "Привет! <e>smile</e>", "time": "2024-05-01 12:00:05"}],
              "temp_context": [], "variables": {"attitude": 60, "boredom": 10, "stress": 5}}
    path = tmp_path / "mita.json"
    path.write_text(json.dumps(sample, ensure_ascii=False))
    daemon = Daemon({})
    try:
        imported = daemon.run_cli("history", "import", str(path))
        assert imported.returncode == 0, imported.stderr
        assert "imported 2 messages into session mita" in imported.stdout
        exported = daemon.run_cli("history", "export", "mita")
        assert exported.returncode == 0, exported.stderr
        assert json.loads(exported.stdout) == sample
        listed = daemon.run_cli("history", "list")
        assert "mita" in listed.stdout and "2 messages" in listed.stdout
        shown = daemon.run_cli("history", "show", "mita")
        assert "assistant: Привет! <e>smile</e>" in shown.stdout
        missing = daemon.run_cli("history", "export", "nobody")
        assert missing.returncode == 1 and "no session 'nobody'" in missing.stderr
        assert daemon.run_cli("history", "clear", "mita").returncode == 0
        assert HistoryStore(daemon.db_path).messages("mita") == []
    finally:
        daemon.close()


def test_the_next_prompt_leaves_out_failed_exchanges_and_never_repeats_a_turn(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path / "history.db")
    question = "What is in this picture?"

    def exchange(request_id: str, text: str, reply: str | None = None, **outcome: Any) -> None:
        store.add_message("s", request_id, "user", text, time.time())
        if reply is not None:
            store.add_message("s", request_id, "assistant", reply, time.time(), **outcome)

    try:
        exchange("fail1", question, "", status="error", error="cannot reach the provider")
        exchange("fail2", question, "", status="error", error="cannot reach the provider")
        exchange("now", question)
        assert store.context("s", 20, exclude_request="now") == []
        assert build_messages("", [], question) == [{"role": "user", "content": question}]

        exchange("now", question, "A cat.")
        exchange("third", "Third")
        exchange("barge", "barge in")   # stored before the reply it cut off
        exchange("third", "Third", "Once upon a time", status="interrupted", interrupted=True)
        store.set_spoken("s", "third", "Once", True)
        exchange("barge", "barge in", "Sure.")
        exchange("late", "And then?", "It went", status="error", error="no token for 5 s; the reply was cut off")
        exchange("cut", "Again?", "", status="interrupted", interrupted=True)
        exchange("cut2", "Again?")
        context = store.context("s", 20, exclude_request="cut2")
        assert [(turn.role, turn.content) for turn in context] == [
            ("user", question), ("assistant", "A cat."), ("user", "Third"), ("assistant", "Once"),
            ("user", "barge in"), ("assistant", "Sure."), ("user", "And then?"), ("assistant", "It went"),
            ("user", "Again?")]
        assert store.context("s", 3, exclude_request="cut2") == context[-3:]
    finally:
        store.close()
    messages = build_messages("Be kind.", context, "Again?")
    assert messages[-2:] == [{"role": "assistant", "content": "It went"}, {"role": "user", "content": "Again?"}]
    prompt, _ = render_dialogue("", context, "Again?", "Mita")
    assert prompt.split("\n")[-3:] == ["Mita: It went", "User: Again?", "Mita:"]
    repeated = [ChatMessage(role="user", content="hi"), ChatMessage(role="user", content="again")]
    assert build_messages("", repeated, "hi") == [
        {"role": "user", "content": "hi\nagain\nhi"}], "only a repeat of the turn just before is left out"


# --- metrics: the reply's timeline ends at the later of llm.done and the final playback ------------

@pytest.fixture(scope="module")
def history_alone() -> Iterator[tuple[Path, Connection]]:
    """A bus and a history stage as real processes; the test plays every other stage, so it chooses
    the order history gets the events in."""
    runtime = Path(tempfile.mkdtemp(prefix="vp-metrics-")) / "run"
    db = runtime.parent / "history.db"
    bus = start_stage("bus", runtime)
    try:
        connect(runtime, "probe").close()
        history = start_stage("history", runtime, VOXPIPE_HISTORY__DB_PATH=str(db))
        try:
            wait_ready(runtime, "history")
            client = connect(runtime, "front", "history.saved", "metrics")
            yield db, client
            client.close()
        finally:
            stop_process(history)
    finally:
        stop_process(bus)


def metrics_of(client: Connection, request_id: str, timeout: float) -> tuple[float, Metrics] | None:
    """When the reply's metrics came (monotonic) and what they say, or None within `timeout`."""
    got = follow(client, request_id, lambda seen: any(m.kind == "metrics" for m in seen), timeout)
    found = [m.body for m in got if isinstance(m.body, Metrics)]
    return (time.monotonic(), found[0]) if found else None


def asked(client: Connection, session: str, request_id: str) -> Message:
    request = client.publish(session, request_id, Request(text="Tell me a story."))
    follow(client, request_id, lambda got: any(m.kind == "history.saved" for m in got), 10)
    return request


def done_body(status: str, text: str) -> LlmDone:
    return LlmDone(status=status, text=text, tokens=6, provider="openai", model="m1", profile="cloud",
                   metrics={"ttft_ms": 120.0})


@pytest.mark.parametrize("order", ["playback, cancelled, then llm.done", "llm.done, then playback",
                                   "llm.done, then cancelled while playing"])
def test_metrics_go_out_at_once_when_the_later_of_llm_done_and_the_final_playback_comes(
        history_alone: tuple[Path, Connection], order: str) -> None:
    """A cancel while the model writes cuts the sound first: the final `stopped` reaches history before
    the interrupted llm.done. Either way the timeline ends at the later of the two, and no metrics go
    out before it (a reply that started playing always gets its final event)."""
    db, client = history_alone
    request_id = order.replace(" ", "-").replace(",", "")
    session = f"order-{request_id}"
    text = "Once upon a time there was a cat."
    request = asked(client, session, request_id)
    chunk = client.publish(session, request_id, Chunk(text=text, index=0, final=True))
    started = client.publish(session, request_id, Playback(event="started", chunk=0, audio_ts=chunk.ts + 0.05))
    if order.startswith("playback"):
        client.publish(session, "", Cancel(reason="test"))
        final = client.publish(session, request_id, Playback(event="stopped", chunk=0, heard=0.5, heard_chars=16,
                                                             final=True, audio_s=0.9))
        assert metrics_of(client, request_id, UNPLAYED_WAIT_S + 1.0) is None, "metrics before llm.done"
        done = client.publish(session, request_id, done_body("interrupted", "Once upon a time there"))
    else:
        done = client.publish(session, request_id, done_body("ok", text))
        if order.endswith("cancelled while playing"):
            client.publish(session, "", Cancel(reason="test"))
        assert metrics_of(client, request_id, UNPLAYED_WAIT_S + 1.0) is None, "metrics before the final playback"
        final = client.publish(session, request_id, Playback(
            event="stopped" if "cancelled" in order else "finished", chunk=0, heard=1.0, heard_chars=len(text),
            final=True, audio_s=2.25))
    later = time.monotonic()
    result = metrics_of(client, request_id, 5.0)
    assert result is not None, "no metrics"
    arrived, metrics = result
    assert arrived - later < 1.0, f"metrics came {arrived - later:.2f} s after the later event"

    def ms(ts: float) -> float:
        return pytest.approx((ts - request.ts) * 1000, abs=0.01)

    assert metrics == Metrics(
        request_ts=pytest.approx(request.ts), profile="cloud", provider="openai", model="m1", engine="espeak",
        status=done.body.status, first_token_ms=120.0, first_chunk_ms=ms(chunk.ts), first_audio_ms=ms(chunk.ts + 0.05),
        first_playback_ms=ms(started.ts), end_ms=ms(max(final.ts, done.ts)), tokens=6, chars=len(done.body.text),
        audio_s=final.body.audio_s)
    assert metrics_of(client, request_id, 0.5) is None, "metrics are published once per reply"
    with sqlite3.connect(db) as database:
        stored = json.loads(database.execute("SELECT metrics FROM messages WHERE request_id=? AND role='assistant'",
                                             (request_id,)).fetchone()[0])
    assert stored["end_ms"] == metrics.end_ms and stored["audio_s"] == metrics.audio_s


@pytest.mark.parametrize("when", ["while the model writes", "after llm.done", "with its audio queued"])
def test_a_reply_cancelled_before_it_played_gets_its_metrics_once_no_playback_can_come(
        history_alone: tuple[Path, Connection], when: str) -> None:
    """None of the reply started playing: the player answers the cancel at once with a final `stopped`
    if it held audio of it (queued behind another reply), and otherwise never, so history waits
    UNPLAYED_WAIT_S for it, not the 30 s kept for a final event that fails to come."""
    _, client = history_alone
    request_id = when.replace(" ", "-")
    session = f"unplayed-{request_id}"
    request = asked(client, session, request_id)
    client.publish(session, request_id, Chunk(text="Once upon a time.", index=0, final=False))
    if when == "while the model writes":
        client.publish(session, "", Cancel(reason="test"))
        cancelled = time.monotonic()
        time.sleep(0.1)  # llm's cancel grace
        done = client.publish(session, request_id, done_body("interrupted", "Once upon a time. There"))
    else:
        done = client.publish(session, request_id, done_body("ok", "Once upon a time."))
        time.sleep(0.3)
        client.publish(session, request_id, Cancel(reason="test"))
        cancelled = time.monotonic()
    due, final = cancelled + UNPLAYED_WAIT_S, None
    if when == "with its audio queued":
        time.sleep(0.2)
        final = client.publish(session, request_id, Playback(event="stopped", chunk=-1, final=True))
        due = time.monotonic()
    result = metrics_of(client, request_id, UNPLAYED_WAIT_S + 5.0)
    assert result is not None, "no metrics"
    arrived, metrics = result
    assert -0.2 < arrived - due < 1.0, f"metrics came {arrived - due:+.2f} s from when they were due"
    end = max(done.ts, final.ts) if final else done.ts
    assert (metrics.status, metrics.first_playback_ms, metrics.audio_s) == (done.body.status, -1.0, 0.0)
    assert metrics.end_ms == pytest.approx((end - request.ts) * 1000, abs=0.01)


def test_history_never_wakes_for_text_and_stores_the_display_text_from_llm_done(
        history_alone: tuple[Path, Connection]) -> None:
    """`text` comes once per token; what history keeps of it, the display text, is llm.done's text without
    its tags (the chunker's tag grammar), so history does not subscribe to it (issue 15: 170 µs of
    history's CPU per token at 200 sessions)."""
    db, client = history_alone
    beats = connect(db.parent / "run", "beats", "heartbeat")
    try:
        def received() -> int:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                beat = beats.receive(0.5)
                if beat is not None and beat.src == "history" and isinstance(beat.body, Heartbeat):
                    return beat.body.counters.get("received", 0)
            raise AssertionError("no heartbeat from history")

        session, request_id = "shown", "r-shown"
        asked(client, session, request_id)
        before = received()
        for number in range(300):
            client.publish(session, request_id, Text(delta=f"word{number} "))
        client.publish(session, request_id, done_body("ok", "Hi <e>smile</e>there. <bogus>x</bogus>Bye."))
        follow(client, request_id, lambda got: any(m.kind == "history.saved" for m in got), 10)
        received()  # the heartbeat under way may have been counted before the burst
        assert received() - before < 30, "history received the text messages"
    finally:
        beats.close()
    with sqlite3.connect(db) as database:
        row = database.execute("SELECT shown, content FROM messages WHERE request_id=? AND role='assistant'",
                               (request_id,)).fetchone()
    assert row == ("Hi there. Bye.", "Hi <e>smile</e>there. <bogus>x</bogus>Bye.")
