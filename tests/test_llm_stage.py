"""The llm stage against a scripted real HTTP server, in real processes: faults, retries, cancel, keys.

Every fault must end in the right llm.done (or error), never a hang and never a duplicate token.
"""

from __future__ import annotations

import itertools
import json
import re
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.fakes.wire_server import Script, WireServer, json_script, sse_script
from tests.harness import Daemon, fake_openai
from voxpipe import protocol
from voxpipe.protocol import Cancel, Image, LlmDone, Message, Request
from voxpipe.runtime import Connection, endpoints_for

SECRET = "sk-test-SECRET-0123456789abcdef"
RESERVE = "sk-test-RESERVE-fedcba9876543210"
_ids = itertools.count()


def chunk(content: str | None = None, reasoning: str | None = None, finish: str | None = None,
          usage: dict | None = None) -> dict[str, Any]:
    """One OpenAI chat.completion.chunk event."""
    delta: dict[str, Any] = {"content": content}
    if reasoning is not None:
        delta["reasoning_content"] = reasoning
    event: dict[str, Any] = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "scripted",
                             "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage:
        event["usage"] = usage
    return event


def stream(*pieces: str, delay: float = 0.0, **options: Any) -> Script:
    events = [chunk(piece) for piece in pieces] + [chunk(finish="stop"), "[DONE]"]
    return sse_script(events, delay=delay, **options)


def arrival(server: WireServer, before: int, timeout: float = 10.0):
    """The request that arrives after the first `before` ones."""
    deadline = time.monotonic() + timeout
    while len(server.records) <= before:
        assert time.monotonic() < deadline, "the request never reached the server"
        time.sleep(0.01)
    return server.records[before]


def authorization(record) -> str:
    return next(value for name, value in record.headers.items() if name.lower() == "authorization")


def dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server() -> Iterator[WireServer]:
    with WireServer() as wire:
        yield wire


class SilentServer:
    """Accepts every connection, reads what comes, and never answers: no status line, no byte.
    It notes when each connection came and when its client hung up."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted: list[float] = []
        self.hung_up: dict[int, float] = {}
        self._selector = selectors.DefaultSelector()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> SilentServer:
        self._selector.register(self.listener, selectors.EVENT_READ)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self._selector.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._selector.select(0.05):
                if key.fileobj is self.listener:
                    conn, _ = self.listener.accept()
                    self._selector.register(conn, selectors.EVENT_READ, len(self.accepted))
                    self.accepted.append(time.monotonic())
                    continue
                conn = key.fileobj  # type: ignore[assignment]
                try:
                    data = conn.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    self.hung_up[key.data] = time.monotonic()
                    self._selector.unregister(conn)
                    conn.close()


@pytest.fixture(scope="module")
def silent() -> Iterator[SilentServer]:
    with SilentServer() as quiet:
        yield quiet


PROFILE = {"provider": "openai", "model": "scripted", "api_key_env": "WIRE_KEY",
           "reserve_key_envs": ["WIRE_RESERVE_KEY"], "first_token_timeout_s": 1.5, "idle_timeout_s": 1.0,
           "connect_timeout_s": 1.0, "retries": 1, "backoff_s": 0.1, "backoff_max_s": 0.2,
           "stop_strings": ["<END>"]}


SILENT = {**PROFILE, "first_token_timeout_s": 1.0, "idle_timeout_s": 1.0, "retries": 5, "backoff_s": 0.0,
          "backoff_max_s": 0.0, "first_token_total_s": 2.5}
"""Six attempts of 1 s each (6 s of silence) were it not for first_token_total_s."""


@pytest.fixture(scope="module")
def daemon(server: WireServer, silent: SilentServer) -> Iterator[Daemon]:
    settings = {"llm": {"profile": "wire", "history_limit": 0, "profiles": {
        "wire": {**PROFILE, "base_url": server.url("/v1")},
        "refused": {**PROFILE, "base_url": f"http://127.0.0.1:{dead_port()}/v1"},
        "silent": {**SILENT, "base_url": silent.url("/v1")},
        "silent-http": {**SILENT, "provider": "http", "url": silent.url("/v1/chat/completions")},
        "local": {"provider": "local"}}}}
    with Daemon(settings, env={"WIRE_KEY": SECRET, "WIRE_RESERVE_KEY": RESERVE}) as running:
        yield running


class Session:
    """A test client: sends one request and collects everything about it until llm.done."""

    KINDS = ("token", "reasoning", "llm.done", "error", "chunk", "text")

    def __init__(self, daemon: Daemon, name: str | None = None) -> None:
        self.name = name or f"t{next(_ids)}"
        self.client = Connection(f"test-{self.name}", endpoints_for(daemon.config()),
                                 [protocol.subscription(kind, self.name) for kind in self.KINDS])
        self.client.open()
        self.messages: list[Message[Any]] = []

    def ask(self, text: str = "hi", **fields: Any) -> str:
        request_id = f"r{next(_ids)}"
        self.client.publish(self.name, request_id, Request(text=text, **fields))
        return request_id

    def until_done(self, request_id: str, timeout: float = 20.0) -> LlmDone:
        """The request's llm.done."""
        for message in self.messages:
            if message.kind == "llm.done" and message.id == request_id:
                return message.body
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.client.receive(0.5)
            if message is None:
                continue
            self.messages.append(message)
            if message.kind == "llm.done" and message.id == request_id:
                return message.body
        raise AssertionError(f"no llm.done for {request_id} within {timeout} s: {self.messages}")

    def tokens(self, request_id: str) -> list[str]:
        return [m.body.text for m in self.messages if m.kind == "token" and m.id == request_id]

    def of(self, kind: str, request_id: str) -> list[Message[Any]]:
        return [m for m in self.messages if m.kind == kind and m.id == request_id]

    def close(self) -> None:
        self.client.close()


@pytest.fixture()
def session(daemon: Daemon) -> Iterator[Session]:
    client = Session(daemon)
    yield client
    client.close()


def test_usage_chunk_keepalives_crlf_and_null_content(server: WireServer, session: Session) -> None:
    events = [": keep-alive", chunk(None), chunk("Hel"), chunk("lo."), chunk(finish="stop"),
              chunk(usage={"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}), "[DONE]"]
    lines = [f"data: {json.dumps(event)}" if isinstance(event, dict) else event if event.startswith(":")
             else f"data: {event}" for event in events]
    writes = [(0.0, line.encode() + b"\r\n\r\n") for line in lines]
    server.enqueue(Script(writes=writes))
    request = session.ask()
    done = session.until_done(request)
    assert done.status == "ok" and done.text == "Hello." and session.tokens(request) == ["Hel", "lo."]
    assert done.finish_reason == "stop" and done.metrics["usage_total_tokens"] == 5
    assert done.tokens == 2 and "ttft_ms" in done.metrics


def test_reasoning_content_and_think_tags_never_reach_the_reply(server: WireServer, session: Session) -> None:
    server.enqueue(sse_script([chunk(reasoning="Let me think. "), chunk("<thi"), chunk("nk>inline plan</th"),
                               chunk("ink>Answer"), chunk("!"), chunk(finish="stop"), "[DONE]"]))
    request = session.ask()
    done = session.until_done(request)
    assert done.text == "Answer!" and "".join(session.tokens(request)) == "Answer!"
    assert "".join(m.body.text for m in session.of("reasoning", request)) == "Let me think. inline plan"
    assert done.reasoning == "Let me think. inline plan"


def test_disconnect_mid_stream_ends_in_error_keeping_the_partial_text(server: WireServer, session: Session) -> None:
    server.enqueue(sse_script([chunk("one "), chunk("two ")], end="abort"))
    before = len(server.records)
    request = session.ask()
    done = session.until_done(request)
    assert done.status == "error" and done.text == "one two " and done.tokens == 2
    assert session.tokens(request) == ["one ", "two "]  # no duplicate: no silent retry after a token
    assert len(server.records) == before + 1
    assert any(m.body.code == "provider_error" for m in session.of("error", request))


def test_stall_before_the_first_byte_is_retried(server: WireServer, session: Session) -> None:
    server.enqueue(Script(stall=10.0), stream("late ", "but fine."))
    before = len(server.records)
    request = session.ask()
    done = session.until_done(request, timeout=30)
    assert done.status == "ok" and done.text == "late but fine."
    assert len(server.records) == before + 2


def test_stall_mid_stream_is_an_idle_timeout(server: WireServer, session: Session) -> None:
    server.enqueue(Script(writes=[(0.0, f"data: {json.dumps(chunk('partial'))}\n\n".encode()), (10.0, b"")]))
    request = session.ask()
    started = time.monotonic()
    done = session.until_done(request)
    assert done.status == "error" and done.text == "partial" and "no token for 1 s" in done.error
    assert time.monotonic() - started < 8


@pytest.mark.parametrize(("profile", "hang_up_s"), [
    ("silent-http", 0.5),  # requests' transport is cut at once, even before the response headers
    ("silent", 1.5),       # the openai client's socket is out of reach before the headers: its read timeout ends it
])
def test_a_server_that_never_answers_costs_first_token_total_s_not_retries_times_the_timeout(
        silent: SilentServer, session: Session, profile: str, hang_up_s: float) -> None:
    before = len(silent.accepted)
    asked = time.monotonic()
    request = session.ask(profile=profile)
    done = session.until_done(request, timeout=15)
    waited = time.monotonic() - asked
    assert done.status == "error" and done.text == "" and done.tokens == 0
    attempts = len(silent.accepted) - before
    assert done.error.startswith(f"no first token within 2.5 s over {attempts} attempts "
                                 f"(llm.profiles.{profile}.first_token_total_s)"), done.error
    assert 2 <= attempts <= 3  # at about 0, 1 and 2 s; six without the total
    assert re.search(r"attempt \d failed: ", done.error)
    assert 2.5 <= done.metrics["total_ms"] / 1000 < 3.2 and waited < 4.0  # not 6 s
    errors = session.of("error", request)
    assert [(m.body.code, m.body.message) for m in errors] == [("provider_error", done.error)]
    # every call was closed: the server sees each client hang up, the last one soon after llm.done
    deadline = time.monotonic() + hang_up_s + 1.0
    while len([n for n in silent.hung_up if n >= before]) < attempts and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sorted(n for n in silent.hung_up if n >= before) == list(range(before, before + attempts))
    assert silent.hung_up[before + attempts - 1] - (asked + 2.5) < hang_up_s
    time.sleep(0.5)
    assert len(silent.accepted) - before == attempts  # and no retry after the reply ended


def test_429_with_retry_after_then_success(server: WireServer, daemon: Daemon) -> None:
    session = Session(daemon)
    try:
        throttled = json_script({"error": {"message": "slow down"}}, status=429, headers={"Retry-After": "1"})
        server.enqueue(throttled, throttled, stream("ok."))
        before = len(server.records)
        request = session.ask()
        done = session.until_done(request)
        assert done.status == "ok" and done.text == "ok."
        records = server.records[before:]
        assert len(records) == 3
        # the first 429 rotates to the reserve key at once; the second waits for Retry-After
        assert authorization(records[0]) == f"Bearer {SECRET}"
        assert authorization(records[1]) == f"Bearer {RESERVE}"
        assert records[2].received_at - records[1].received_at >= 0.95
    finally:
        session.close()


def test_500_then_success(server: WireServer, session: Session) -> None:
    server.enqueue(json_script({"error": {"message": "boom"}}, status=500), stream("fine."))
    request = session.ask()
    assert session.until_done(request).text == "fine."


def test_malformed_event_is_a_protocol_error(server: WireServer, session: Session) -> None:
    server.enqueue(sse_script([chunk("good "), "{not json"]))
    request = session.ask()
    done = session.until_done(request)
    assert done.status == "error" and done.text == "good "
    assert "malformed" in done.error


def test_wrong_content_type_is_a_protocol_error(server: WireServer, session: Session) -> None:
    html = Script(headers={"Content-Type": "text/html"}, writes=[(0.0, b"<html>proxy login</html>")])
    server.enqueue(html)
    request = session.ask()
    done = session.until_done(request)
    assert done.status == "error" and "text/html" in done.error


def test_connection_refused_gives_up_with_a_clear_error(session: Session) -> None:
    request = session.ask(profile="refused")
    done = session.until_done(request)
    assert done.status == "error" and "cannot reach" in done.error


def test_cancel_reaches_the_server_within_100_ms(server: WireServer, session: Session) -> None:
    server.enqueue(stream(*[f"w{n} " for n in range(400)], delay=0.05))
    before = len(server.records)
    request = session.ask()
    record = arrival(server, before)
    while not session.tokens(request):
        message = session.client.receive(5)
        assert message is not None
        session.messages.append(message)
    session.client.publish(session.name, request, Cancel(reason="test"))
    cancelled = time.monotonic()
    assert record.hung_up.wait(2)
    assert record.hung_up_at - cancelled < 0.1
    done = session.until_done(request)
    assert done.status == "interrupted" and done.text and "w399" not in done.text


def test_stop_string_guard_keeps_the_text_before_it(server: WireServer, session: Session) -> None:
    server.enqueue(stream("Fine.", " <EN", "D> leaked"))
    request = session.ask()
    done = session.until_done(request)
    assert done.text == "Fine. " and done.guard == "stop_string" and done.finish_reason == "guard"
    assert "".join(session.tokens(request)) == "Fine. "


def test_images_go_to_vision_providers_and_are_refused_elsewhere(server: WireServer, session: Session) -> None:
    server.enqueue(stream("A cat."))
    image = Image(mime="image/png", data=b"\x89PNG\r\n\x1a\n")
    before = len(server.records)
    request = session.ask("what is this?", images=(image,))
    assert session.until_done(request).text == "A cat."
    content = server.records[before].json["messages"][-1]["content"]
    assert content[1] == {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    refused = session.ask("and this?", profile="local", images=(image,))
    done = session.until_done(refused)
    assert done.status == "error" and "does not accept images" in done.error


def test_a_slow_session_never_delays_another(server: WireServer, daemon: Daemon) -> None:
    slow, fast = Session(daemon), Session(daemon)
    try:
        server.enqueue(stream("slow", delay=0.0, stall=1.2))
        before = len(server.records)
        slow_request = slow.ask()
        arrival(server, before)
        server.enqueue(stream("fast."))
        started = time.monotonic()
        fast_done = fast.until_done(fast.ask())
        assert fast_done.text == "fast." and time.monotonic() - started < 1.0
        assert slow.until_done(slow_request).status == "ok"
    finally:
        slow.close()
        fast.close()


def test_the_key_never_reaches_logs_or_the_bus(server: WireServer, daemon: Daemon) -> None:
    """The server echoes the key in its 401 body; neither logs nor any bus message may carry it."""
    tap = Connection("keytap", endpoints_for(daemon.config()), [b""])
    tap.open()
    session = Session(daemon)
    try:
        refusal = json_script({"error": {"message": f"Incorrect API key provided: {SECRET}"}}, status=401)
        server.enqueue(refusal, refusal)
        done = session.until_done(session.ask())
        assert done.status == "error" and "401" in done.error and "$WIRE_KEY" in done.error
        frames = []
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            if (message := tap.receive(0.2)) is not None:
                frames.append(protocol.encode(message))
    finally:
        session.close()
        tap.close()
    for secret in (SECRET, RESERVE, SECRET[:12], RESERVE[:12]):
        assert not any(secret.encode() in frame for frame in frames)
        assert secret not in "".join(daemon.log)


@pytest.mark.parametrize("policy", ["queue", "reject"])
def test_on_busy_queue_and_reject(policy: str) -> None:
    with WireServer() as wire:
        settings = {"llm": {"profile": "wire", "history_limit": 0, "on_busy": policy,
                            "profiles": {"wire": {**PROFILE, "base_url": wire.url("/v1")}}}}
        with Daemon(settings, env={"WIRE_KEY": SECRET}) as daemon:
            session = Session(daemon)
            wire.enqueue(stream("first ", "reply.", delay=0.3), stream("second."))
            first = session.ask()
            arrival(wire, 0)
            second = session.ask()
            done_first = session.until_done(first)
            done_second = session.until_done(second)
            session.close()
    assert done_first.status == "ok" and done_first.text == "first reply."
    if policy == "queue":
        assert done_second.status == "ok" and done_second.text == "second."
    else:
        assert done_second.status == "error" and "busy" in done_second.error


def test_streaming_on_and_off_give_the_same_chunks_and_history() -> None:
    with fake_openai() as url, Daemon({"llm": {"profile": "fake", "profiles": {"fake": {
            "provider": "openai", "base_url": url, "model": "m", "api_key_env": "FAKE_OPENAI_KEY"}}}},
            env={"FAKE_OPENAI_KEY": "test-key"}) as daemon:
        results = {}
        for stream_mode in (True, False):
            session = Session(daemon)
            request = session.ask("Tell me. Something longer, with clauses, and more.", stream=stream_mode)
            done = session.until_done(request)
            deadline = time.monotonic() + 10
            while not any(m.kind == "chunk" and m.body.final for m in session.messages) and time.monotonic() < deadline:
                if (message := session.client.receive(0.5)) is not None:
                    session.messages.append(message)
            results[stream_mode] = (done.text, [m.body.text for m in session.of("chunk", request)],
                                    "".join(m.body.delta for m in session.of("text", request)))
            session.close()
    assert results[True] == results[False]
    assert len(results[True][1]) >= 2


def test_persona_file_and_replying_without_a_history_stage(tmp_path) -> None:
    persona = tmp_path / "persona.txt"
    persona.write_text("You are Mita, a cheerful companion.\n")
    with WireServer() as wire:
        settings = {"llm": {"profile": "wire", "persona_file": str(persona), "context_timeout_ms": 300,
                            "profiles": {"wire": {**PROFILE, "base_url": wire.url("/v1")}}},
                    "run": {"stages": ["llm", "chunker", "tts", "player"]}}
        with Daemon(settings, env={"WIRE_KEY": SECRET}) as daemon:
            wire.enqueue(stream("Hi!"))
            session = Session(daemon)
            done = session.until_done(session.ask("hello"))
            session.close()
            log = "".join(daemon.log)
        assert done.status == "ok" and done.text == "Hi!"
        assert wire.records[0].json["messages"][0] == {"role": "system",
                                                       "content": "You are Mita, a cheerful companion."}
        assert "history did not answer within 300 ms" in log


def test_a_request_names_its_persona_and_brings_context_for_its_reply_only(tmp_path) -> None:
    """The game link's requests (docs/design/game-link.md §4.2): the persona by name, from [llm.personas]
    or shipped in the package, the request's system context last in the system prompt; an unknown
    persona ends the reply as an unknown profile does, saying how to add it."""
    mine = tmp_path / "crazy.md"
    mine.write_text("You are my own Mita.\n")
    with WireServer() as wire:
        settings = {"llm": {"profile": "wire", "history_limit": 0, "personas": {"Crazy": str(mine)},
                            "profiles": {"wire": {**PROFILE, "base_url": wire.url("/v1")}}}}
        with Daemon(settings, env={"WIRE_KEY": SECRET}) as daemon:
            wire.enqueue(stream("Hi!"), stream("Hello."))
            session = Session(daemon)
            crazy = session.until_done(session.ask("hello", persona="Crazy", system="Distance to the player: 3 m"))
            kind = session.until_done(session.ask("hello", persona="Kind"))
            unknown = session.until_done(session.ask("hello", persona="Nobody"))
            session.close()
    assert crazy.status == kind.status == "ok"
    systems = [record.json["messages"][0] for record in wire.records]
    assert systems[0] == {"role": "system",
                          "content": "You are my own Mita.\n\nContext for this reply:\nDistance to the player: 3 m"}
    assert systems[1]["content"].startswith("You are Kind Mita from the game MiSide")
    assert len(wire.records) == 2, "an unknown persona never reaches the provider"
    assert unknown.status == "error" and unknown.error.startswith(
        "unknown persona 'Nobody'; add [llm.personas] Nobody = \"/path/file\"")
