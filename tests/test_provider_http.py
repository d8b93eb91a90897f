"""The generic http provider and the transport under it, against a real local server speaking each wire.

Covers OpenAI-style SSE (usage chunk, keep-alives, CRLF, reasoning, null content,
multi-line events), Ollama NDJSON, non-streaming bodies, every HTTP failure the
stage must tell apart, and cancel: close() from another thread returns the reader
and reaches the server within 100 ms, before the first byte and mid-stream.
"""

from __future__ import annotations

import base64
import email.utils
import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.wire_server import Reader, Script, WireServer, json_script, ndjson_script, sse_script
from voxpipe.config import load
from voxpipe.stages.llm.providers import create_provider
from voxpipe.stages.llm.providers.base import (
    ERROR_TEXT_LIMIT,
    ChatRequest,
    Delta,
    Image,
    Params,
    ProviderError,
    Timeouts,
    quote,
)
from voxpipe.stages.llm.providers.http import HttpProvider
from voxpipe.stages.llm.providers.http_transport import merged, parse_retry_after
from voxpipe.stages.llm.providers.wire import error_text
from voxpipe.stages.llm.think import ThinkSplitter

KEY = "sk-test-0123456789abcdef"
CANCEL_BOUND_S = 0.1


@pytest.fixture
def server() -> Iterator[WireServer]:
    with WireServer() as running:
        yield running


def provider(server: WireServer, wire: str = "openai-sse", **settings: Any) -> HttpProvider:
    path = "/api/chat" if wire == "ndjson" else "/v1/chat/completions"
    return HttpProvider(url=server.url(path), wire=wire, model="test-model", **settings)


def ask(stream: bool = True, text: str = "hi", **options: Any) -> ChatRequest:
    return ChatRequest([{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}],
                       stream=stream, **options)


def run(server: WireServer, script: Script, request: ChatRequest | None = None, key: str = KEY, **profile: Any):
    server.enqueue(script)
    generation = provider(server, **profile).open(request or ask(), key)
    return list(generation), generation.outcome


def chunk(content: Any = None, finish: str | None = None, **delta: Any) -> dict[str, Any]:
    if content is not None or "content" in delta:
        delta.setdefault("content", content)
    return {"id": "c1", "object": "chat.completion.chunk", "model": "served-model",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


USAGE = {"id": "c1", "object": "chat.completion.chunk", "model": "served-model", "choices": [],
         "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10,
                   "completion_tokens_details": {"reasoning_tokens": 2}}}


def event(payload: dict[str, Any], newline: str = "\n") -> bytes:
    return f"data: {json.dumps(payload)}{newline}{newline}".encode()


def text_of(deltas: list[Delta]) -> str:
    return "".join(delta.text for delta in deltas)


# --- OpenAI-style SSE ------------------------------------------------------------------------------

def test_openai_sse_tokens_usage_chunk_and_done(server: WireServer) -> None:
    events = [chunk(role="assistant", content=""), chunk("Hel"), chunk("lo."), chunk(finish="stop"), USAGE, "[DONE]"]
    deltas, outcome = run(server, sse_script(events, delay=0.005))
    assert deltas == [Delta("Hel"), Delta("lo.")]
    assert outcome.model == "served-model" and outcome.finish_reason == "stop"
    assert outcome.usage == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10, "reasoning_tokens": 2}


def test_openai_sse_keep_alive_comments_crlf_and_multi_line_event(server: WireServer) -> None:
    body = (b": keep-alive\r\n\r\n:OPENROUTER PROCESSING\r\n\r\n"
            b'data: {"model": "m", "choices": [{"index": 0,\r\ndata:  "delta": {"content": "A"}}]}\r\n\r\n'
            + event(chunk("B", finish="stop"), "\r\n") + b"data: [DONE]\r\n\r\n")
    pieces = [(0.0, body[index:index + 7]) for index in range(0, len(body), 7)]
    deltas, outcome = run(server, Script(writes=pieces))
    assert text_of(deltas) == "AB" and outcome.finish_reason == "stop"


def test_openai_sse_reasoning_fields_and_null_content(server: WireServer) -> None:
    events = [chunk(None, role="assistant", reasoning_content="think "), chunk(None, reasoning="more"),
              chunk("Answer", reasoning_content=None), chunk(None, finish="length"), "[DONE]"]
    deltas, outcome = run(server, sse_script(events))
    assert deltas == [Delta(reasoning="think "), Delta(reasoning="more"), Delta("Answer")]
    assert outcome.finish_reason == "length"


def route_open(deltas: list[Delta], finish_reason: str) -> list[Delta]:
    """Each wire delta through reasoning_start = "open", as the llm stage routes it, then the end."""
    splitter = ThinkSplitter("open")
    return [splitter.push(delta.text, delta.reasoning) for delta in deltas] + [splitter.finish(finish_reason)]


@pytest.mark.parametrize("finish", ["stop", "length"])
def test_open_reasoning_from_a_template_that_opened_think_over_the_wire(server: WireServer, finish: str) -> None:
    """A server whose template put <think> into the prompt streams the reasoning as content, then a
    bare </think> cut across two events: the reasoning never reaches the reply text. Cut off by
    max_tokens before its </think>, what came stays reasoning."""
    events = [chunk(role="assistant", content=""), chunk("Okay, the user"), chunk(" greets me.</th"),
              chunk("ink>\n\nHello"), chunk(" there!"), chunk(finish="stop"), "[DONE]"]
    deltas, outcome = run(server, sse_script(events, delay=0.002))
    routed = route_open(deltas, outcome.finish_reason)
    assert routed == [Delta(), Delta(), Delta("\n\nHello", "Okay, the user greets me."), Delta(" there!"), Delta()]

    cut = [chunk("Okay, so the user"), chunk(" wants"), chunk(finish=finish), "[DONE]"]
    deltas, outcome = run(server, sse_script(cut, delay=0.002))
    expected = Delta("Okay, so the user wants") if finish == "stop" else Delta(reasoning="Okay, so the user wants")
    assert route_open(deltas, outcome.finish_reason)[-1] == expected


def test_open_with_a_server_that_parses_reasoning_itself_holds_nothing(server: WireServer) -> None:
    """llama-server, vLLM, Ollama: reasoning_content first, then the reply, which streams unheld."""
    events = [chunk(None, role="assistant", reasoning_content="The user greets me."), chunk("Hello"),
              chunk(" there!", finish="stop"), "[DONE]"]
    deltas, outcome = run(server, sse_script(events))
    assert route_open(deltas, outcome.finish_reason) == [Delta(), Delta("Hello"), Delta(" there!"), Delta()]


def test_openai_sse_done_without_trailing_blank_line(server: WireServer) -> None:
    script = Script(writes=[(0.0, event(chunk("x"))), (0.0, b"data: [DONE]")], framing="close")
    deltas, _ = run(server, script)
    assert text_of(deltas) == "x"


def test_openai_sse_finish_reason_without_done_is_complete(server: WireServer) -> None:
    deltas, outcome = run(server, sse_script([chunk("x"), chunk(finish="stop")]))
    assert text_of(deltas) == "x" and outcome.finish_reason == "stop"


def test_openai_sse_error_event_mid_stream_keeps_text_before_it(server: WireServer) -> None:
    server.enqueue(sse_script([chunk("Part"), {"error": {"message": "upstream overloaded", "code": 502}}]))
    reader = Reader(provider(server).open(ask(), KEY))
    assert reader.done.wait(5)
    assert text_of(reader.deltas) == "Part"
    assert isinstance(reader.error, ProviderError) and reader.error.code == "server"
    assert "upstream overloaded" in str(reader.error)


def test_openai_sse_events_of_one_read_become_one_delta(server: WireServer) -> None:
    """A burst (an instant server, or a network stall) reaches the pipeline as one message, not twenty;
    events that come apart stay apart, so nothing waits for a batch."""
    burst = b"".join(event(chunk(piece)) for piece in ("Echo", ": ques", "tion.", " Done"))
    server.enqueue(Script(writes=[(0.0, burst), (0.05, event(chunk(" here.", finish="stop"))),
                                  (0.0, b"data: [DONE]\n\n")]))
    assert list(provider(server).open(ask(), KEY)) == [Delta("Echo: question. Done"), Delta(" here.")]


def test_openai_sse_text_before_a_failing_event_of_the_same_read_is_kept(server: WireServer) -> None:
    burst = event(chunk("Kept ")) + event(chunk("too")) + b"data: {\"choices\": [oops\n\n" + event(chunk("never"))
    server.enqueue(Script(writes=[(0.0, burst)]))
    reader = Reader(provider(server).open(ask(), KEY))
    assert reader.done.wait(5)
    assert reader.deltas == [Delta("Kept too")]
    assert reader.error.code == "protocol" and "oops" in str(reader.error)


def test_openai_json_when_not_streaming(server: WireServer) -> None:
    body = {"id": "c1", "object": "chat.completion", "model": "served-model",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "Whole reply.", "reasoning_content": "why"}}],
            "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}}
    deltas, outcome = run(server, json_script(body), ask(stream=False))
    assert deltas == [Delta("Whole reply.", "why")]
    assert outcome.usage["total_tokens"] == 6 and outcome.finish_reason == "stop"
    sent = server.records[0]
    assert sent.json["stream"] is False and "stream_options" not in sent.json
    assert sent.headers["Accept"] == "application/json"


def test_openai_request_body_params_images_auth_and_extra(server: WireServer) -> None:
    image = Image(b"\x89PNG fake", "image/png")
    request = ChatRequest([{"role": "user", "content": "look", "images": [image]}],
                          params=Params(max_tokens=50, temperature=0.3, top_p=0.9, top_k=40, presence_penalty=0.5,
                                        stop=("User:",)))
    run(server, sse_script([chunk("ok", finish="stop"), "[DONE]"]), request,
        extra={"seed": 7, "stream_options": {"extra_flag": True}})
    sent = server.records[0]
    assert sent.method == "POST" and sent.path == "/v1/chat/completions"
    assert sent.headers["Authorization"] == f"Bearer {KEY}" and sent.headers["Accept"] == "text/event-stream"
    body = sent.json
    assert body["model"] == "test-model" and body["stream"] is True and body["seed"] == 7
    assert body["stream_options"] == {"include_usage": True, "extra_flag": True}
    assert (body["max_tokens"], body["temperature"], body["top_p"], body["top_k"], body["presence_penalty"]) == \
        (50, 0.3, 0.9, 40, 0.5)
    assert body["stop"] == ["User:"]
    data_url = "data:image/png;base64," + base64.b64encode(image.data).decode()
    assert body["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": data_url}}]}]


def test_unset_params_and_empty_key_are_not_sent(server: WireServer) -> None:
    run(server, sse_script([chunk("ok", finish="stop")]), key="")
    sent = server.records[0]
    assert "Authorization" not in sent.headers
    assert not {"temperature", "top_p", "top_k", "presence_penalty", "stop"} & set(sent.json)
    assert sent.json["messages"][0] == {"role": "system", "content": "Be brief."}


# --- NDJSON (Ollama /api/chat) -----------------------------------------------------------------------

def ollama(content: str = "", thinking: str | None = None, **fields: Any) -> dict[str, Any]:
    message = {"role": "assistant", "content": content, **({"thinking": thinking} if thinking else {})}
    return {"model": "llama3.2", "created_at": "2025-01-01T00:00:00Z", "message": message, "done": False, **fields}


DONE = ollama(done=True, done_reason="stop", total_duration=1000, prompt_eval_count=12, eval_count=3)


def test_ndjson_stream(server: WireServer) -> None:
    script = ndjson_script([ollama(thinking="hmm"), ollama("Hi"), ollama(" there"), DONE], delay=0.005)
    deltas, outcome = run(server, script, wire="ndjson")
    assert deltas == [Delta(reasoning="hmm"), Delta("Hi"), Delta(" there")]
    assert outcome.finish_reason == "stop" and outcome.model == "llama3.2"
    assert outcome.usage == {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}


def test_ndjson_whole_body(server: WireServer) -> None:
    body = {**ollama("All at once."), **{key: value for key, value in DONE.items() if key != "message"}}
    deltas, outcome = run(server, json_script(body), ask(stream=False), wire="ndjson")
    assert deltas == [Delta("All at once.")] and outcome.finish_reason == "stop"
    assert server.records[0].json["stream"] is False


def test_ndjson_request_body(server: WireServer) -> None:
    request = ChatRequest([{"role": "user", "content": "what is this", "images": [Image(b"jpegbytes", "image/jpeg")]}],
                          params=Params(max_tokens=64, temperature=0.2, top_k=20, stop=("\n\n",), reasoning_budget=0))
    run(server, ndjson_script([DONE]), request, wire="ndjson")
    body = server.records[0].json
    assert server.records[0].path == "/api/chat"
    assert body["model"] == "test-model" and body["stream"] is True and body["think"] is False
    assert body["options"] == {"num_predict": 64, "temperature": 0.2, "top_k": 20, "stop": ["\n\n"]}
    assert body["messages"] == [{"role": "user", "content": "what is this",
                                 "images": [base64.b64encode(b"jpegbytes").decode()]}]


def test_ndjson_without_done_line_is_a_broken_stream(server: WireServer) -> None:
    server.enqueue(ndjson_script([ollama("Hi")]))
    reader = Reader(provider(server, wire="ndjson").open(ask(), KEY))
    assert reader.done.wait(5)
    assert text_of(reader.deltas) == "Hi" and reader.error.code == "connect"


# --- malformed and unexpected bodies -------------------------------------------------------------------

def test_malformed_event_fails_after_the_text_before_it(server: WireServer) -> None:
    server.enqueue(sse_script([chunk("Good"), '{"choices": [oops', chunk("never")]))
    reader = Reader(provider(server).open(ask(), KEY))
    assert reader.done.wait(5)
    assert text_of(reader.deltas) == "Good"
    assert reader.error.code == "protocol" and "oops" in str(reader.error)


def test_malformed_ndjson_line(server: WireServer) -> None:
    server.enqueue(Script(headers={"Content-Type": "application/x-ndjson"},
                          writes=[(0.0, b'{"message": {"content": "ok"}, "done": false}\n{bad\n')]))
    reader = Reader(provider(server, wire="ndjson").open(ask(), KEY))
    assert reader.done.wait(5)
    assert text_of(reader.deltas) == "ok" and reader.error.code == "protocol"


def test_unexpected_json_shape_is_a_protocol_error(server: WireServer) -> None:
    with pytest.raises(ProviderError) as caught:
        run(server, sse_script(['{"choices": "not a list"}']))
    assert caught.value.code == "protocol"


def test_wrong_content_type(server: WireServer) -> None:
    script = Script(headers={"Content-Type": "text/html; charset=utf-8"},
                    writes=[(0.0, b"<html><body>Captive portal login</body></html>")], framing="length")
    with pytest.raises(ProviderError) as caught:
        run(server, script)
    assert caught.value.code == "protocol" and not caught.value.retryable
    assert "text/html" in str(caught.value) and "Captive portal" in str(caught.value)


# --- HTTP failures -----------------------------------------------------------------------------------

def test_429_retry_after_seconds(server: WireServer) -> None:
    with pytest.raises(ProviderError) as caught:
        run(server, json_script({"error": {"message": "Rate limit reached"}}, 429, {"Retry-After": "3"}))
    error = caught.value
    assert (error.code, error.status, error.retry_after) == ("rate_limited", 429, 3.0)
    assert error.retryable and error.rotates_key and "Rate limit reached" in str(error)


def test_429_retry_after_http_date(server: WireServer) -> None:
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    with pytest.raises(ProviderError) as caught:
        run(server, json_script({"error": "slow down"}, 429, {"Retry-After": later}))
    assert 25 <= caught.value.retry_after <= 31


def test_500_is_retryable_and_honours_retry_after(server: WireServer) -> None:
    with pytest.raises(ProviderError) as caught:
        run(server, json_script({"error": {"message": "internal"}}, 503, {"Retry-After": "1"}))
    assert (caught.value.code, caught.value.status, caught.value.retry_after) == ("server", 503, 1.0)
    server.enqueue(Script(status=500, headers={"Content-Type": "text/plain"}, writes=[(0, b"boom")], framing="length"))
    with pytest.raises(ProviderError) as caught:
        list(provider(server).open(ask(), KEY))
    assert caught.value.code == "server" and caught.value.retry_after is None and "boom" in str(caught.value)


def test_401_says_status_and_server_text_without_the_key(server: WireServer) -> None:
    echo = {"error": {"message": f"Incorrect API key provided: {KEY}. Also {KEY[:8]}..."}}
    with pytest.raises(ProviderError) as caught:
        run(server, json_script(echo, 401))
    text = str(caught.value)
    assert caught.value.code == "auth" and caught.value.status == 401 and caught.value.rotates_key
    assert "401" in text and "Incorrect API key provided" in text
    assert KEY not in text and KEY[:8] not in text


def test_402_is_billing_rotated_past_but_not_retried(server: WireServer) -> None:
    with pytest.raises(ProviderError) as caught:
        run(server, json_script({"error": {"message": "Insufficient credits"}}, 402))
    error = caught.value
    assert (error.code, error.status) == ("billing", 402) and error.rotates_key and not error.retryable
    assert "402" in str(error) and "Insufficient credits" in str(error)


def test_other_4xx_is_bad_request_and_not_retried(server: WireServer) -> None:
    with pytest.raises(ProviderError) as caught:
        run(server, json_script({"error": {"message": "model 'x' not found"}}, 404))
    assert caught.value.code == "bad_request" and not caught.value.retryable and "not found" in str(caught.value)


def test_connection_refused(server: WireServer) -> None:
    port = server.port
    server.stop()
    generation = HttpProvider(url=f"http://127.0.0.1:{port}/v1/chat/completions", model="m").open(ask(), KEY)
    with pytest.raises(ProviderError) as caught:
        list(generation)
    assert caught.value.code == "connect" and caught.value.retryable
    assert "refused" in str(caught.value).lower() and KEY not in str(caught.value)


def test_disconnect_mid_stream_is_a_connect_error_after_the_text(server: WireServer) -> None:
    for framing in ("chunked", "close"):
        server.enqueue(sse_script([chunk("Half")], end="abort", framing=framing))
        reader = Reader(provider(server).open(ask(), KEY))
        assert reader.done.wait(5)
        assert text_of(reader.deltas) == "Half"
        assert reader.error.code == "connect", framing


def test_socket_read_timeout_backs_up_the_stage_watchdog(server: WireServer) -> None:
    server.enqueue(Script(writes=[(0.0, event(chunk("a"))), (30.0, b"")]))
    started = time.monotonic()
    request = ask(timeouts=Timeouts(connect=1.0, first_token=0.3, idle=0.3))
    reader = Reader(provider(server).open(request, KEY))
    assert reader.done.wait(5)
    assert text_of(reader.deltas) == "a" and reader.error.code == "timeout"
    assert time.monotonic() - started < 3


# --- cancel ----------------------------------------------------------------------------------------------

def cancel(reader: Reader, record: Any) -> tuple[float, float]:
    """close() the generation; return how long the reader and the server took to notice."""
    closed_at = time.monotonic()
    reader.generation.close()
    assert reader.done.wait(2), "the reader stayed blocked after close()"
    assert record.hung_up.wait(2), "the server never saw the disconnect"
    return reader.finished_at - closed_at, record.hung_up_at - closed_at


def test_close_during_stall_before_first_byte(server: WireServer) -> None:
    server.enqueue(Script(stall=30.0))
    reader = Reader(provider(server).open(ask(), KEY))
    record = server.next_request()
    time.sleep(0.1)  # the client is now blocked reading the status line
    reader_s, server_s = cancel(reader, record)
    assert reader_s < CANCEL_BOUND_S and server_s < CANCEL_BOUND_S
    assert reader.deltas == [] and reader.error is None


def test_close_mid_stream(server: WireServer) -> None:
    server.enqueue(Script(writes=[(0.0, event(chunk("First"))), (30.0, event(chunk("late")))]))
    reader = Reader(provider(server).open(ask(), KEY))
    record = server.next_request()
    assert reader.first.wait(5)
    time.sleep(0.05)  # blocked in the next read
    reader_s, server_s = cancel(reader, record)
    assert reader_s < CANCEL_BOUND_S and server_s < CANCEL_BOUND_S
    assert text_of(reader.deltas) == "First" and reader.error is None


@pytest.mark.skipif(not shutil.which("openssl"), reason="needs the openssl CLI to make a test certificate")
def test_close_over_tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real providers are HTTPS: shutting the TLS socket down must cut the call just as fast."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    with WireServer(tls=(str(cert), str(key))) as server:
        assert server.url().startswith("https://")
        server.enqueue(Script(writes=[(0.0, event(chunk("Secure"))), (30.0, b"")]))
        reader = Reader(provider(server).open(ask(), KEY))
        record = server.next_request()
        assert reader.first.wait(5)
        time.sleep(0.05)
        reader_s, server_s = cancel(reader, record)
        assert reader_s < CANCEL_BOUND_S and server_s < CANCEL_BOUND_S
        assert text_of(reader.deltas) == "Secure" and reader.error is None


def test_close_before_iterating_sends_nothing(server: WireServer) -> None:
    generation = provider(server).open(ask(), KEY)
    generation.close()
    assert list(generation) == [] and server.records == []


def test_close_from_many_threads_at_once_is_safe(server: WireServer) -> None:
    server.enqueue(Script(stall=30.0))
    reader = Reader(provider(server).open(ask(), KEY))
    record = server.next_request()
    closers = [threading.Thread(target=reader.generation.close) for _ in range(8)]
    for closer in closers:
        closer.start()
    assert reader.done.wait(2) and record.hung_up.wait(2) and reader.error is None


# --- pure helpers and registry -----------------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    ("120", 120.0), ("1.5", 1.5), (" 7 ", 7.0), ("-5", 0.0), ("", None), (None, None), ("soon", None),
    ("inf", None), ("nan", None),
    ("Wed, 21 Oct 2015 07:28:30 GMT", 30.0), ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),
])
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    now = email.utils.parsedate_to_datetime("Wed, 21 Oct 2015 07:28:00 GMT").timestamp()
    assert parse_retry_after(value, now) == expected


def test_error_text_shapes_and_clipping() -> None:
    assert error_text(b'{"error": {"message": "bad key", "code": 401}}') == "bad key"
    assert error_text(b'{"error": "model not found"}') == "model not found"
    assert error_text(b'[{"error": {"code": 400, "message": "API key not valid"}}]') == "API key not valid"
    assert quote(error_text(b"<h1>502  Bad\n Gateway</h1>"), "") == "<h1>502 Bad Gateway</h1>"
    assert len(quote(error_text(b"x" * 5000), "")) == ERROR_TEXT_LIMIT + 1


def test_merged() -> None:
    base = {"a": {"b": 1, "c": 2}, "d": 1}
    assert merged(base, {"a": {"c": 3}, "e": [1]}) == {"a": {"b": 1, "c": 3}, "d": 1, "e": [1]}
    assert base == {"a": {"b": 1, "c": 2}, "d": 1}


def test_registry_and_profile_errors(server: WireServer) -> None:
    """Built from its profile by the registry (which names the profile in what it refuses), or directly."""
    profile = load(env={"VOXPIPE_LLM__PROFILES__P__PROVIDER": "http",
                        "VOXPIPE_LLM__PROFILES__P__URL": server.url("/x")}).profile("p")
    assert isinstance(create_provider(profile), HttpProvider)
    with pytest.raises(ValueError, match=r"^profile 'p': provider http needs url"):
        create_provider({**profile, "url": ""})
    with pytest.raises(ValueError, match=r"key llm.profiles.p.wire = 'grpc' is not allowed; "
                                         r"expected one of: openai-sse, ndjson"):
        HttpProvider(profile, wire="grpc")
