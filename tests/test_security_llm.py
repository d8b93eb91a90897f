"""Issue 14, items 8 and 14: hostile provider data against the real llm stage, over real HTTP.

Item 8: a reply, a model name or usage numbers beyond what llm.done may carry, a malformed chunk
mid-stream, or text that is not UTF-8 once decoded: the client still gets its one llm.done at once,
and history stores what arrived.

Item 14: a server that echoes the API key in its error body, with the key at every position around
the point where the error text is clipped (and cut off where the body is read only in part): no piece
of the key's secret part reaches the error, the error event, the log or any bus message.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.wire_server import Script, WireServer, json_script, sse_script
from tests.harness import Daemon, connect, start_stage, stop_process, write_toml
from tests.test_llm_stage import PROFILE, Session, chunk
from voxpipe import protocol
from voxpipe.config import load
from voxpipe.protocol import LlmDone, Message, Request
from voxpipe.runtime import Connection, endpoints_for
from voxpipe.stages.llm.core import Reply
from voxpipe.stages.llm.guards import SIZE_LIMIT
from voxpipe.stages.llm.providers import create_provider
from voxpipe.stages.llm.providers.base import ERROR_TEXT_LIMIT, ChatRequest, ProviderError, Timeouts
from voxpipe.stages.llm.stage import LlmStage

KEY = "sk-proj-" + "Q7vTz2LmX9pR4wKd8NcY3bHj6FsA1eGu5VoIqZ0t"
"""A key of the shape whose fixed 8-character prefix the old scrub took for the secret."""
SECRET_PART = KEY[8:]
PROMPT_S = 60.0
"""llm.done must come well before the client's own timeout; this only catches a hang."""


def leaks(text: str) -> list[str]:
    """Every 6-character piece of the key's secret part that occurs in `text`."""
    return [piece for start in range(len(SECRET_PART) - 5) if (piece := SECRET_PART[start:start + 6]) in text]


class Client(Session):
    """The stage tests' session client, also told when history stored a turn."""

    KINDS = (*Session.KINDS, "history.saved")

    def stored(self, daemon: Daemon, request_id: str, timeout: float = 30.0) -> sqlite3.Row:
        """The assistant row history stored for the request, once history.saved says it is there."""
        deadline = time.monotonic() + timeout
        while not any(m.body.role == "assistant" for m in self.of("history.saved", request_id)):
            assert time.monotonic() < deadline, f"history stored no reply for {request_id}"
            if (message := self.client.receive(0.5)) is not None:
                self.messages.append(message)
        row_id = next(m.body.message_id for m in self.of("history.saved", request_id) if m.body.role == "assistant")
        with sqlite3.connect(daemon.db_path) as db:
            db.row_factory = sqlite3.Row
            return db.execute("SELECT * FROM messages WHERE id = ?", (row_id,)).fetchone()

    def done_promptly(self, request_id: str) -> LlmDone:
        asked = time.monotonic()
        done = self.until_done(request_id, timeout=PROMPT_S)
        assert time.monotonic() - asked < PROMPT_S
        return done


# --- item 8: provider data beyond llm.done's limits ------------------------------------------------

@pytest.fixture(scope="module")
def server() -> Iterator[WireServer]:
    with WireServer() as wire:
        yield wire


@pytest.fixture(scope="module")
def daemon(server: WireServer) -> Iterator[Daemon]:
    settings = {"llm": {"profile": "wire", "history_limit": 0, "profiles": {
        "wire": {**PROFILE, "base_url": server.url("/v1"), "idle_timeout_s": 30.0},
        "http": {**PROFILE, "provider": "http", "url": server.url("/v1/chat/completions"),
                 "idle_timeout_s": 30.0}}},
        "run": {"stages": ["llm", "history"]}}
    with Daemon(settings, env={"WIRE_KEY": KEY}) as running:
        yield running


@pytest.fixture()
def client(daemon: Daemon) -> Iterator[Client]:
    session = Client(daemon)
    yield session
    session.close()


def words(size: int) -> str:
    """`size` characters of words that never repeat (so the repetition guard stays quiet)."""
    return " ".join(f"w{number}" for number in range(size // 3))[:size]


@pytest.mark.parametrize("stream", [True, False])
def test_a_reply_over_512_kib_is_cut_at_the_size_limit_and_stored(server: WireServer, daemon: Daemon,
                                                                  client: Client, stream: bool) -> None:
    reply = words(600 * 1024)
    if stream:
        pieces = [reply[start:start + 60 * 1024] for start in range(0, len(reply), 60 * 1024)]
        server.enqueue(sse_script([*map(chunk, pieces), chunk(finish="stop"), "[DONE]"]))
    else:
        server.enqueue(json_script({"id": "c", "object": "chat.completion", "created": 1, "model": "m",
                                    "choices": [{"index": 0, "finish_reason": "stop",
                                                 "message": {"role": "assistant", "content": reply}}]}))
    request = client.ask(stream=stream)
    done = client.done_promptly(request)
    assert done.status == "ok" and done.guard == "size" and done.finish_reason == "guard"
    assert len(done.text.encode()) == SIZE_LIMIT and reply.startswith(done.text)
    assert "".join(client.tokens(request)) == done.text and done.tokens == len(client.tokens(request))
    assert client.stored(daemon, request)["content"] == done.text


def test_reasoning_over_512_kib_is_cut_at_the_size_limit(server: WireServer, daemon: Daemon,
                                                          client: Client) -> None:
    thought = "é" * (100 * 1024)  # two bytes each: the limit is in bytes, never in the middle of a character
    server.enqueue(sse_script([chunk("Hi. "), *[chunk(reasoning=thought) for _ in range(4)], chunk("never"),
                               chunk(finish="stop"), "[DONE]"]))
    request = client.ask()
    done = client.done_promptly(request)
    assert done.status == "ok" and done.guard == "size" and done.text == "Hi. "
    assert len(done.reasoning.encode()) == SIZE_LIMIT and set(done.reasoning) == {"é"}
    assert "".join(m.body.text for m in client.of("reasoning", request)) == done.reasoning
    assert client.stored(daemon, request)["content"] == "Hi. "


def test_a_model_name_over_256_characters_is_cut_with_a_mark(server: WireServer, daemon: Daemon,
                                                             client: Client) -> None:
    events = [{**chunk("Fine."), "model": "m" * 300}, {**chunk(finish="x" * 100), "model": "m" * 300}, "[DONE]"]
    server.enqueue(sse_script(events))
    request = client.ask()
    done = client.done_promptly(request)
    assert done.status == "ok" and done.text == "Fine."
    assert done.model == "m" * 255 + "…" and done.finish_reason == "x" * 63 + "…"
    row = client.stored(daemon, request)
    assert row["content"] == "Fine." and row["model"] == done.model


BAD_USAGE = ('{"prompt_tokens": NaN, "completion_tokens": -1, "total_tokens": 1e308, "cached_tokens": "x", '
             '"reasoning_tokens": Infinity, "audio_tokens": ' + "9" * 400 + ', "kept_tokens": 7}')
"""Every way a usage number can be no count, raw: json.dumps would not write NaN or a 400-digit int."""


@pytest.mark.parametrize("profile", ["wire", "http"])
def test_usage_that_is_not_counts_is_left_out(server: WireServer, daemon: Daemon, client: Client,
                                              profile: str) -> None:
    usage_event = json.dumps(chunk(usage={"placeholder": 1})).replace('{"placeholder": 1}', BAD_USAGE)
    server.enqueue(sse_script([chunk("Counted."), chunk(finish="stop"), usage_event, "[DONE]"]))
    request = client.ask(profile=profile)
    done = client.done_promptly(request)
    assert done.status == "ok" and done.text == "Counted."
    assert {name: value for name, value in done.metrics.items() if name.startswith("usage_")} == \
        {"usage_kept_tokens": 7.0}
    assert client.stored(daemon, request)["content"] == "Counted."


@pytest.mark.parametrize(("profile", "bad"), [
    ("wire", "{not json"), ("wire", '{"id": "c", "choices": 5}'),
    ("http", "{not json"), ("http", '{"id": "c", "choices": 5}'),
])
def test_a_malformed_chunk_mid_stream_ends_the_reply_in_an_error_keeping_what_came(
        server: WireServer, daemon: Daemon, client: Client, profile: str, bad: str) -> None:
    server.enqueue(sse_script([chunk("Before "), chunk("the fault."), bad, chunk("never"), "[DONE]"]))
    request = client.ask(profile=profile)
    done = client.done_promptly(request)
    assert done.status == "error" and done.text == "Before the fault."
    assert "malformed" in done.error or "unexpected response shape" in done.error
    assert any(m.body.code == "provider_error" for m in client.of("error", request))
    row = client.stored(daemon, request)
    assert (row["content"], row["status"]) == ("Before the fault.", "error")


def test_text_that_is_not_utf8_once_decoded_still_ends_the_reply(server: WireServer, daemon: Daemon,
                                                                 client: Client) -> None:
    """JSON's "\\ud800" decodes to a lone surrogate, which no message can carry: it must not kill the worker."""
    lone = '{"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m\\ud800", ' \
           '"choices": [{"index": 0, "delta": {"content": "A\\ud800B"}, "finish_reason": "stop"}]}'
    server.enqueue(sse_script([lone, "[DONE]"]))
    request = client.ask()
    done = client.done_promptly(request)
    assert done.status == "ok" and done.text == "A?B" and done.model == "m?"
    assert client.stored(daemon, request)["content"] == "A?B"


def test_an_llm_done_the_protocol_refuses_still_goes_out_as_an_error(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """The last net under the fitting above, for a bug it does not foresee (here usage that bypassed
    usage_counts): the real stage's llm.done sender over a real bus, driven directly."""
    runtime = tmp_path / "run"
    config_path = tmp_path / "voxpipe.toml"
    write_toml(config_path, {"bus": {"runtime_dir": str(runtime)}, "llm": {"profile": "p", "profiles": {
        "p": {"provider": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m"}}}})
    bus = start_stage("bus", runtime)
    try:
        connect(runtime, "probe").close()
        client = connect(runtime, "front", "llm.done", "error")
        stage = LlmStage(load(config_path, env={}))
        stage.prepare()
        stage.bus.open(timeout=30)
        request = Message(Request(text="hi"), "s1", "r1", 0, time.time(), "front")
        reply = Reply("s1", "r1", 0.0)
        reply.add("Partial text.", 0.5)
        with caplog.at_level(logging.ERROR, logger="voxpipe.llm"):
            stage._done(request, reply.done("ok", 1.0, model="m", usage={"bad": float("nan")}))
        got: list[Message[Any]] = []
        deadline = time.monotonic() + 20
        while not any(m.kind == "llm.done" for m in got) and time.monotonic() < deadline:
            if (message := client.receive(0.5)) is not None:
                got.append(message)
        done = next(m.body for m in got if m.kind == "llm.done")
        assert done.status == "error" and done.text == "Partial text." and done.metrics == {} and done.model == ""
        assert done.error.startswith("the llm stage failed: its llm.done was refused") and "usage_bad" in done.error
        assert [m.body.code for m in got if m.kind == "error"] == ["internal"]
        assert "refused by the protocol" in caplog.text
        assert stage.core.journal.entries[-1][1] == done
        stage.bus.close()
        stage.pool.shutdown()
        client.close()
    finally:
        stop_process(bus)


# --- item 14: the key in error texts, at every position around the clip ------------------------------

TRANSPORTS = {
    "http": {"provider": "http", "url": "{url}/chat/completions", "model": "m"},
    "gemini": {"provider": "gemini", "base_url": "{url}", "model": "gemini-test"},
    "g4f": {"provider": "g4f", "base_url": "{url}", "model": "m"},
    "openai": {"provider": "openai", "base_url": "{url}", "model": "m"},
}
FILL = "~"
"""Body filler: no whitespace (which the clip folds) and in no URL, so the probe finds it."""


def profile_for(transport: str, url: str) -> dict[str, Any]:
    return {key: value.format(url=url) if isinstance(value, str) else value
            for key, value in TRANSPORTS[transport].items()}


def refusal(message: str, mid_reply: bool = False) -> Script:
    """A 400 with a JSON error body, or (`mid_reply`) a 200 stream whose first event is an error."""
    if mid_reply:
        return sse_script([{"error": {"message": message, "code": 500}}])
    return json_script({"error": {"message": message, "code": 400}}, status=400)


def echo(before: int, mid_reply: bool = False) -> Script:
    """An error whose message echoes the key after `before` filler characters."""
    return refusal(FILL * before + KEY + FILL * 2 * ERROR_TEXT_LIMIT, mid_reply)


def provider_error(transport: str, url: str, server: WireServer, script: Script) -> str:
    server.enqueue(script)
    provider = create_provider({"name": transport, **profile_for(transport, url)})
    request = ChatRequest([{"role": "user", "content": "hi"}], timeouts=Timeouts(5, 10, 10))
    with pytest.raises(ProviderError) as caught:
        list(provider.open(request, KEY))
    return str(caught.value)


def window(error_of: Callable[[Script], str], mid_reply: bool = False) -> range:
    """The key's start positions in the body around the clip: where the clip falls inside the key,
    and a position on either side.  A probe of filler alone shows how much of the body a message keeps."""
    probe = error_of(refusal(FILL * 3 * ERROR_TEXT_LIMIT, mid_reply))
    assert probe.endswith("…"), probe
    kept = probe.count(FILL)
    assert 0 < kept < ERROR_TEXT_LIMIT
    return range(kept - len(KEY) - 1, kept + 2)


@pytest.mark.parametrize(("transport", "mid_reply"), [
    *[(transport, False) for transport in TRANSPORTS],
    ("http", True), ("gemini", True),  # {"error": ...} inside a 200 stream
])
def test_a_key_at_every_position_around_the_clip_never_shows(transport: str, mid_reply: bool) -> None:
    with WireServer() as server:
        url = server.url("/v1")
        positions = window(lambda script: provider_error(transport, url, server, script), mid_reply)
        for before in positions:
            text = provider_error(transport, url, server, echo(before, mid_reply))
            assert not leaks(text), (before, text)
            assert text.endswith("…")


@pytest.mark.parametrize("transport", ["http", "gemini"])
def test_a_key_cut_where_the_error_body_is_read_in_part_never_shows(transport: str) -> None:
    """The body of an error is read up to 4096 bytes: a key across that point arrives cut."""
    with WireServer() as server:
        url = server.url("/v1")
        for cut in range(1, len(KEY)):
            body = (FILL * (4096 - cut) + KEY + FILL * 100).encode()
            script = Script(status=400, headers={"Content-Type": "text/plain"}, writes=[(0.0, body)],
                            framing="length")
            text = provider_error(transport, url, server, script)
            assert not leaks(text), (cut, text)


def test_no_piece_of_the_key_reaches_the_error_event_the_log_or_the_bus() -> None:
    """Through the real stage: each transport, the key at each position where the clip falls in it."""
    with WireServer() as server:
        url = server.url("/v1")
        windows = {transport: window(lambda script, transport=transport: provider_error(transport, url, server,
                                                                                        script))
                   for transport in ("http", "gemini", "g4f")}
        profiles = {transport: {**profile_for(transport, url), "api_key_env": "LEAK_KEY", "retries": 0}
                    for transport in windows}
        settings = {"llm": {"profile": "http", "history_limit": 0, "profiles": profiles}, "run": {"stages": ["llm"]}}
        with Daemon(settings, env={"LEAK_KEY": KEY}) as daemon:
            tap = Connection("leak-tap", endpoints_for(daemon.config()), [b""])
            tap.open()
            session = Session(daemon)
            frames: list[bytes] = []
            try:
                for transport, positions in windows.items():
                    for before in positions:
                        server.enqueue(echo(before))
                        request = session.ask(profile=transport)
                        done = session.until_done(request, timeout=PROMPT_S)
                        assert done.status == "error" and "400" in done.error, done.error
                        events = session.of("error", request)
                        assert events and not leaks(done.error + "".join(m.body.message for m in events))
                        while (message := tap.receive(0.01)) is not None:
                            frames.append(protocol.encode(message))
                time.sleep(0.5)
                while (message := tap.receive(0.2)) is not None:
                    frames.append(protocol.encode(message))
            finally:
                session.close()
                tap.close()
            log = "".join(daemon.log)
        assert not leaks(log)
        assert not [frame for frame in frames if leaks(frame.decode("utf-8", "replace"))]
        assert len(server.records) >= 3 + sum(map(len, windows.values()))
