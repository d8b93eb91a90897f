"""The g4f (gpt4free) provider, offline: through g4f's own client, never the internet.

Two real paths: g4f provider classes defined here (async and sync, registered by name as a
profile's extra.provider), and g4f's OpenaiTemplate against real local HTTP servers speaking
OpenAI chat completions (the echo server in its own process, and the scriptable wire server
for faults and cancel). Every test runs with name lookups and connects limited to loopback.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

pytest.importorskip("g4f")

import g4f
import g4f.cookies
from g4f.Provider import ProviderLoader
from g4f.providers.base_provider import AbstractProvider, AsyncGeneratorProvider
from g4f.providers.response import FinishReason, Reasoning, Usage

from tests.fakes.openai_server import pieces, reply_for
from tests.fakes.wire_server import Reader, Script, WireServer, json_script, sse_script
from tests.harness import Daemon
from voxpipe.stages.llm.providers import create_provider
from voxpipe.stages.llm.providers.base import ChatRequest, Delta, Image, Params, ProviderError, Timeouts
from voxpipe.stages.llm.providers.g4f import NOT_INSTALLED, G4fProvider

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key"
CANCEL_BOUND_S = 0.1
LOOPBACK = {"127.0.0.1", "::1", "localhost"}


# --- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[list[Any]]:
    """Refuse (and record) every lookup or connect beyond loopback; keep g4f's usage log in tmp_path."""
    outside: list[Any] = []
    real_getaddrinfo = socket.getaddrinfo
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host is not None and (host.decode() if isinstance(host, bytes) else host) not in LOOPBACK:
            outside.append(host)
            raise socket.gaierror(socket.EAI_NONAME, f"test is offline: {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    def guarded(real: Any) -> Any:
        def connect(sock: socket.socket, address: Any) -> Any:
            if isinstance(address, tuple) and address[0] not in LOOPBACK:
                outside.append(address)
                raise ConnectionRefusedError(f"test is offline: {address}")
            return real(sock, address)
        return connect

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", guarded(real_connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guarded(real_connect_ex))
    monkeypatch.setattr(g4f.cookies.CookiesConfig, "cookies_dir", str(tmp_path / "g4f" / "cookies"))
    monkeypatch.setenv("G4F_CACHE_DIR", str(tmp_path / "g4f" / "cache"))
    yield outside
    assert outside == [], f"g4f tried to reach beyond loopback: {outside}"


@pytest.fixture
def register(monkeypatch: pytest.MonkeyPatch):
    """Make a g4f provider class defined here resolvable by name, as extra.provider."""
    def add(cls: type) -> str:
        monkeypatch.setitem(ProviderLoader.loaded, cls.__name__, cls)
        return cls.__name__
    return add


@pytest.fixture(scope="module")
def echo_server() -> Iterator[str]:
    """tests.fakes.openai_server in its own process; yields its /v1 base URL."""
    process = subprocess.Popen([sys.executable, "-m", "tests.fakes.openai_server"], cwd=ROOT,
                               stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith("PORT "), line
        yield f"http://127.0.0.1:{int(line.split()[1])}/v1"
    finally:
        process.terminate()
        process.wait(5)
        process.stdout.close()


@pytest.fixture
def server() -> Iterator[WireServer]:
    with WireServer() as running:
        yield running


# --- helpers ---------------------------------------------------------------------------------------



def ask(text: str = "hello", stream: bool = True, **options: Any) -> ChatRequest:
    return ChatRequest([{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}],
                       stream=stream, **options)


def text_of(deltas: list[Delta]) -> str:
    return "".join(delta.text for delta in deltas)


def last_user(messages: list[dict[str, Any]]) -> str:
    return [message["content"] for message in messages if message["role"] == "user"][-1]


def chunk(content: str | None = None, finish: str | None = None) -> dict[str, Any]:
    return {"id": "c1", "object": "chat.completion.chunk", "model": "served-model",
            "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}]}


class Echo(AsyncGeneratorProvider):
    """An async g4f provider: some reasoning, then the echo reply in 3-character pieces."""

    working = True
    supports_stream = True
    calls: ClassVar[list[dict[str, Any]]] = []

    @classmethod
    async def create_async_generator(cls, model: str, messages: list[dict[str, Any]], stream: bool = False,
                                     **kwargs: Any):
        cls.calls.append({"model": model, "messages": messages, "stream": stream, **kwargs})
        text = reply_for(last_user(messages))
        yield Reasoning("Thinking it over.")
        for piece in pieces(text) if stream else [text]:
            await asyncio.sleep(0)
            yield piece
        yield FinishReason("stop")
        yield Usage(prompt_tokens=5, completion_tokens=9, total_tokens=14)


class SyncEcho(AbstractProvider):
    """A synchronous g4f provider (create_completion only)."""

    working = True
    supports_stream = True

    @classmethod
    def create_completion(cls, model: str, messages: list[dict[str, Any]], stream: bool, **kwargs: Any):
        text = reply_for(last_user(messages))
        yield from pieces(text) if stream else [text]


def stalling(first: str | None, blocking: bool = False) -> type:
    """A provider that yields `first` (if any), then stalls for 30 s: in an await, or in a blocking sleep."""
    events = {name: threading.Event() for name in ("stalled", "cancelled", "ended")}

    class Stall(AsyncGeneratorProvider):
        working = True
        supports_stream = True
        seen = events

        @classmethod
        async def create_async_generator(cls, model: str, messages: Any, **kwargs: Any):
            try:
                if first:
                    yield first
                events["stalled"].set()
                await asyncio.sleep(30)
                yield "late"
            except asyncio.CancelledError:
                events["cancelled"].set()
                raise
            finally:
                events["ended"].set()

    class BlockingStall(AbstractProvider):
        working = True
        supports_stream = True
        seen = events

        @classmethod
        def create_completion(cls, model: str, messages: Any, stream: bool, **kwargs: Any):
            try:
                yield first
                events["stalled"].set()
                time.sleep(0.3)  # a blocking read no cancel can cut
                yield "late"
                yield "later"
            finally:
                events["ended"].set()

    return BlockingStall if blocking else Stall


# --- provider classes defined here ------------------------------------------------------------------

def test_registry_builds_it_without_importing_g4f_at_construction() -> None:
    provider = create_provider({"name": "g4f-test", "provider": "g4f", "extra": {"provider": "Echo"}})
    assert isinstance(provider, G4fProvider) and provider.name == "g4f"


@pytest.mark.parametrize("stream", [True, False])
def test_async_provider_class_streaming_and_not(register, stream: bool) -> None:
    Echo.calls = []
    provider = G4fProvider(model="echo-1", extra={"provider": register(Echo)})
    provider.load()
    params = Params(max_tokens=99, temperature=0.3, top_p=0.9, presence_penalty=0.5, stop=("NEVER",))
    generation = provider.open(ask("hello", stream=stream, params=params), "")
    deltas = list(generation)
    expected = reply_for("hello")
    assert text_of(deltas) == expected
    assert "".join(delta.reasoning for delta in deltas) == "Thinking it over."
    if stream:
        assert deltas[0] == Delta(reasoning="Thinking it over.")
        assert [delta.text for delta in deltas[1:]] == pieces(expected)
    else:
        assert deltas == [Delta(text=expected, reasoning="Thinking it over.")]
    assert generation.outcome.finish_reason == "stop"
    assert generation.outcome.model == "echo-1"
    assert generation.outcome.usage == {"prompt_tokens": 5.0, "completion_tokens": 9.0, "total_tokens": 14.0}
    call = Echo.calls[-1]
    assert call["stream"] is stream and call["model"] == "echo-1"
    assert (call["max_tokens"], call["temperature"], call["top_p"], call["presence_penalty"], call["stop"]) == \
        (99, 0.3, 0.9, 0.5, ["NEVER"])
    assert call["messages"][-1] == {"role": "user", "content": "hello"}


def test_both_modes_give_the_same_text(register) -> None:
    provider = G4fProvider(extra={"provider": register(Echo)})
    streamed = text_of(list(provider.open(ask("same", stream=True), "")))
    whole = text_of(list(provider.open(ask("same", stream=False), "")))
    assert streamed == whole == reply_for("same")


@pytest.mark.parametrize("stream", [True, False])
def test_sync_provider_class(register, stream: bool) -> None:
    provider = G4fProvider(extra={"provider": register(SyncEcho)})
    deltas = list(provider.open(ask("sync", stream=stream), ""))
    assert text_of(deltas) == reply_for("sync")
    assert len(deltas) == (len(pieces(reply_for("sync"))) if stream else 1)


def test_extra_keys_reach_g4f_and_load_is_lazy(register) -> None:
    Echo.calls = []
    provider = G4fProvider(extra={"provider": register(Echo), "reasoning_effort": "low"})
    list(provider.open(ask(), ""))  # open() without load(): the stage loads only the default profile
    assert Echo.calls[-1]["reasoning_effort"] == "low"


def test_unknown_provider_name_is_a_bad_request_that_says_where_names_are() -> None:
    provider = G4fProvider(extra={"provider": "NoSuchProviderXyz"})
    with pytest.raises(ProviderError) as caught:
        provider.load()
    assert caught.value.code == "bad_request" and not caught.value.retryable
    assert "NoSuchProviderXyz" in str(caught.value) and "ProviderLoader.names" in str(caught.value)
    with pytest.raises(ProviderError):
        list(provider.open(ask(), ""))


def test_bad_extra_is_a_config_error() -> None:
    with pytest.raises(ValueError, match=r"extra\.provider"):
        G4fProvider(extra={"provider": 3})


def test_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in sys.modules if name == "g4f" or name.startswith("g4f.")]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules makes the import fail
    provider = G4fProvider(extra={"provider": "Echo"})
    for attempt in (provider.load, lambda: list(provider.open(ask(), ""))):
        with pytest.raises(ProviderError) as caught:
            attempt()
        assert caught.value.code == "not_installed"
        assert str(caught.value) == "g4f is not installed: pip install 'voxpipe[g4f]'" == NOT_INSTALLED


# --- close() from another thread ---------------------------------------------------------------------

@pytest.mark.parametrize("first", ["First", None], ids=["mid-stream", "before-first-chunk"])
def test_close_cancels_an_async_provider_mid_await(register, first: str | None) -> None:
    stall = stalling(first)
    reader = Reader(G4fProvider(extra={"provider": register(stall)}).open(ask(), ""))
    assert stall.seen["stalled"].wait(5)
    time.sleep(0.05)  # parked in the 30 s await
    closed_at = time.monotonic()
    reader.generation.close()
    assert reader.done.wait(2), "the reader stayed blocked after close()"
    assert reader.finished_at - closed_at < CANCEL_BOUND_S
    assert stall.seen["cancelled"].is_set() and stall.seen["ended"].is_set()
    assert reader.error is None and text_of(reader.deltas) == (first or "")


def test_close_stops_a_sync_provider_at_its_next_chunk(register) -> None:
    stall = stalling("First", blocking=True)
    reader = Reader(G4fProvider(extra={"provider": register(stall)}).open(ask(), ""))
    assert reader.first.wait(5) and stall.seen["stalled"].wait(5)
    reader.generation.close()
    assert reader.done.wait(2), "the reader never returned"
    assert reader.error is None and text_of(reader.deltas) == "First"  # "late" and "later" are dropped
    assert stall.seen["ended"].wait(2)


def test_close_before_iterating_calls_nothing(register) -> None:
    Echo.calls = []
    generation = G4fProvider(extra={"provider": register(Echo)}).open(ask(), "")
    generation.close()
    assert list(generation) == [] and Echo.calls == []


# --- an OpenAI-compatible server through g4f's OpenaiTemplate ------------------------------------------

@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("extra", [{}, {"provider": "OpenaiTemplate"}], ids=["base_url", "named-template"])
def test_openai_compatible_server(echo_server: str, stream: bool, extra: dict[str, Any]) -> None:
    provider = G4fProvider(base_url=echo_server, model="fake-model", extra=extra)
    provider.load()
    generation = provider.open(ask("over http", stream=stream), KEY)
    deltas = list(generation)
    assert text_of(deltas) == reply_for("over http")
    assert len(deltas) == (len(pieces(reply_for("over http"))) if stream else 1)
    assert generation.outcome.model == "fake-model" and generation.outcome.finish_reason == "stop"
    assert generation.outcome.usage["total_tokens"] > 0


def test_concurrent_generations_each_on_their_own_loop(echo_server: str) -> None:
    provider = G4fProvider(base_url=echo_server, model="fake-model")
    readers = [Reader(provider.open(ask(f"session {index}", stream=index % 2 == 0), KEY)) for index in range(6)]
    for index, reader in enumerate(readers):
        assert reader.done.wait(10) and reader.error is None
        assert text_of(reader.deltas) == reply_for(f"session {index}")


def test_the_daemon_speaks_through_a_g4f_profile(echo_server: str, tmp_path: Path) -> None:
    """The whole pipeline in real processes, with g4f's OpenaiTemplate as the llm provider."""
    settings = {"llm": {"profile": "free", "profiles": {"free": {
        "provider": "g4f", "base_url": echo_server, "model": "fake-model", "api_key_env": "G4F_TEST_KEY"}}}}
    env = {"G4F_TEST_KEY": KEY, "G4F_CONFIG_DIR": str(tmp_path / "g4f")}  # g4f's usage log goes there
    with Daemon(settings, env=env) as daemon:
        for flags in ([], ["--no-stream"]):
            result = daemon.say("Hello there", *flags)
            assert result.returncode == 0, result.stderr
            assert result.stdout == reply_for("Hello there").replace("<e>smile</e>", "") + "\n"


def test_wrong_key_is_an_auth_error_without_the_key(echo_server: str) -> None:
    secret = "sk-wrong-0123456789abcdef"
    generation = G4fProvider(base_url=echo_server, model="m").open(ask(), secret)
    with pytest.raises(ProviderError) as caught:
        list(generation)
    assert caught.value.code == "auth" and caught.value.status == 401 and caught.value.rotates_key
    assert secret not in str(caught.value) and secret[:8] not in str(caught.value)


def test_a_provider_out_of_credit_is_a_billing_error(register) -> None:
    """g4f's PaymentRequiredError reads as HTTP 402 does everywhere: billing, another key may do, no retry."""
    from g4f.errors import PaymentRequiredError

    class Unpaid(AsyncGeneratorProvider):
        working = True
        supports_stream = True

        @classmethod
        async def create_async_generator(cls, model: str, messages: Any, **kwargs: Any):
            raise PaymentRequiredError("this model needs a paid plan")
            yield ""

    with pytest.raises(ProviderError) as caught:
        list(G4fProvider(extra={"provider": register(Unpaid)}).open(ask(), ""))
    assert caught.value.code == "billing" and caught.value.rotates_key and not caught.value.retryable
    assert "paid plan" in str(caught.value)


def test_request_carries_params_key_and_images(server: WireServer) -> None:
    server.enqueue(sse_script([chunk("Hi"), chunk(finish="stop"), "[DONE]"]))
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 16
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "what is this?", "images": [Image(png, "image/png")]}]
    params = Params(max_tokens=42, temperature=0.2, top_p=0.8, top_k=7, presence_penalty=0.4, stop=("END",))
    provider = G4fProvider(base_url=server.url("/v1"), model="vision-model")
    assert text_of(list(provider.open(ChatRequest(messages, params=params), KEY))) == "Hi"
    record = server.records[-1]
    body = record.json
    assert record.path == "/v1/chat/completions" and record.headers["Authorization"] == f"Bearer {KEY}"
    assert body["model"] == "vision-model" and body["stream"] is True
    assert (body["max_tokens"], body["temperature"], body["top_p"], body["top_k"], body["presence_penalty"],
            body["stop"]) == (42, 0.2, 0.8, 7, 0.4, ["END"])
    parts = body["messages"][-1]["content"]
    assert {"type": "text", "text": "what is this?"} in parts
    assert {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}} \
        in parts
    assert [record.method for record in server.records] == ["POST"]  # no GET /models behind our back


@pytest.mark.parametrize("status, code", [(429, "rate_limited"), (500, "server"), (400, "bad_request")])
def test_http_failures_map_to_codes(server: WireServer, status: int, code: str) -> None:
    server.enqueue(json_script({"error": {"message": f"scripted {status}"}}, status=status))
    generation = G4fProvider(base_url=server.url("/v1"), model="m").open(ask(), KEY)
    with pytest.raises(ProviderError) as caught:
        list(generation)
    assert (caught.value.code, caught.value.status) == (code, status)
    assert f"scripted {status}" in str(caught.value)


def test_connection_refused_is_a_connect_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    generation = G4fProvider(base_url=f"http://127.0.0.1:{port}/v1", model="m").open(ask(), KEY)
    with pytest.raises(ProviderError) as caught:
        list(generation)
    assert caught.value.code == "connect" and caught.value.retryable


def test_first_token_timeout(server: WireServer) -> None:
    server.enqueue(Script(stall=30.0))
    request = ask(timeouts=Timeouts(connect=1.0, first_token=0.3, idle=0.3))
    generation = G4fProvider(base_url=server.url("/v1"), model="m").open(request, KEY)
    started = time.monotonic()
    with pytest.raises(ProviderError) as caught:
        list(generation)
    assert caught.value.code == "timeout" and time.monotonic() - started < 3
    assert server.records[-1].hung_up.wait(2)


def test_close_over_http_before_the_first_byte_and_mid_stream(server: WireServer) -> None:
    provider = G4fProvider(base_url=server.url("/v1"), model="m")
    for script, expected in [(Script(stall=30.0), ""),
                             (Script(writes=[(0.0, f"data: {json.dumps(chunk('First'))}\n\n".encode()),
                                             (30.0, b"")]), "First")]:
        server.enqueue(script)
        reader = Reader(provider.open(ask(), KEY))
        record = server.next_request()
        if expected:
            assert reader.first.wait(5)
        time.sleep(0.1)  # blocked reading
        closed_at = time.monotonic()
        reader.generation.close()
        assert reader.done.wait(2), "the reader stayed blocked after close()"
        assert record.hung_up.wait(2), "the server never saw the disconnect"
        assert reader.finished_at - closed_at < CANCEL_BOUND_S
        assert record.hung_up_at - closed_at < CANCEL_BOUND_S
        assert reader.error is None and text_of(reader.deltas) == expected
