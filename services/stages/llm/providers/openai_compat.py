"""OpenAI-compatible chat completions through the `openai` library.

Serves OpenAI, OpenRouter, llama.cpp's server, Ollama's /v1, vLLM and LM Studio.
One client per API key is shared by all generations (connections and the TLS
context are reused); close() shuts the response's socket down, so a blocked
read returns at once and the server sees the disconnect and stops.
"""

from __future__ import annotations

import base64
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import httpx2
import openai

from . import provider_settings
from .base import (
    ChatRequest,
    Delta,
    Outcome,
    Provider,
    ProviderError,
    parse_retry_after,
    quote,
    status_code,
    usage_counts,
)
from .openai_wire import openai_stream

_RAW_RESPONSE = "X-Stainless-Raw-Response"
"""The SDK's request header for "return the response unread" (openai._constants.RAW_RESPONSE_HEADER)."""


def to_openai_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages in OpenAI's shape: images become image_url parts with data URLs."""
    converted = []
    for message in messages:
        images = message.get("images")
        if not images:
            converted.append({"role": message["role"], "content": message["content"]})
            continue
        parts: list[dict[str, Any]] = [{"type": "text", "text": message["content"]}]
        parts += [{"type": "image_url", "image_url": {
            "url": f"data:{image.mime};base64,{base64.b64encode(image.data).decode()}"}} for image in images]
        converted.append({"role": message["role"], "content": parts})
    return converted


class OpenAIProvider(Provider):
    name = "openai"
    accepts_images = True

    def __init__(self, profile: Mapping[str, Any] | None = None, /, **settings: Any) -> None:
        settings = provider_settings(self.name, profile, settings)
        self.base_url = settings["base_url"] or "https://api.openai.com/v1"
        self.model = settings["model"]
        self.extra = dict(settings["extra"])
        if not self.model:
            raise ValueError("provider openai needs model = \"...\"")
        self._clients: dict[str, openai.OpenAI] = {}
        self._lock = threading.Lock()

    def load(self) -> None:
        """Nothing to load; keys are read per request so a rotated secret takes effect."""

    def warm(self, api_key: str) -> None:
        """Build the key's client now: its construction and the HTTP stack it imports (httpcore2, h11,
        truststore) took about 50 ms of the first request. It connects to nothing."""
        self._client(api_key)

    def open(self, request: ChatRequest, api_key: str) -> OpenAIGeneration:
        return OpenAIGeneration(self, request, api_key, self._client(api_key))

    def _client(self, key: str) -> openai.OpenAI:
        with self._lock:
            if key not in self._clients:
                self._clients[key] = openai.OpenAI(base_url=self.base_url, api_key=key or "unset", max_retries=0)
            return self._clients[key]

    def arguments(self, request: ChatRequest, stream: bool) -> dict[str, Any]:
        """The create() arguments; non-standard parameters travel in extra_body."""
        params = request.params
        timeouts = request.timeouts
        arguments: dict[str, Any] = {
            "model": self.model, "messages": to_openai_messages(request.messages), "stream": stream,
            "max_tokens": params.max_tokens,
            "timeout": openai.Timeout(max(timeouts.first_token, timeouts.idle), connect=timeouts.connect)}
        optional = {"temperature": params.temperature, "top_p": params.top_p,
                    "presence_penalty": params.presence_penalty, "stop": list(params.stop) or None}
        arguments.update({key: value for key, value in optional.items() if value is not None})
        extra = dict(self.extra)
        if params.top_k is not None:
            extra["top_k"] = params.top_k
        if params.reasoning_budget is not None:
            extra["reasoning"] = {"max_tokens": params.reasoning_budget}
        if extra:
            arguments["extra_body"] = extra
        return arguments


class OpenAIGeneration:
    def __init__(self, provider: OpenAIProvider, request: ChatRequest, key: str, client: openai.OpenAI) -> None:
        self.outcome = Outcome(model=provider.model)
        self._provider = provider
        self._request = request
        self._key = key
        self._client = client
        self._closed = threading.Event()
        self._response: Any = None

    def __iter__(self) -> Iterator[Delta]:
        try:
            if self._request.stream:
                yield from self._streamed()
            else:
                yield from self._whole()
        except openai.APIStatusError as exc:
            raise ProviderError(self._safe(f"{self._provider.base_url} answered {exc.status_code}: {exc.message}"),
                                code=status_code(exc.status_code), status=exc.status_code,
                                retry_after=_retry_after(exc.response)) from None
        except openai.APITimeoutError:
            raise ProviderError(f"{self._provider.base_url} did not answer in time", code="timeout") from None
        except openai.APIConnectionError as exc:
            if self._closed.is_set():
                return
            raise ProviderError(self._safe(f"cannot reach {self._provider.base_url}: {exc.__cause__ or exc}"),
                                code="connect") from None
        except ProviderError:
            raise
        except Exception as exc:  # transport errors when close() cuts a read, or a malformed body
            if self._closed.is_set():
                return
            raise ProviderError(self._safe(f"malformed response from {self._provider.base_url}: "
                                           f"{type(exc).__name__}: {exc}"), code="protocol") from None
        finally:
            if self._response is not None:
                self._response.close()

    def _streamed(self) -> Iterator[Delta]:
        """The SDK's raw streaming response, read by openai_wire's SSE reader.

        The request goes through the SDK's `client.post` (its documented way to send a body as is),
        so its auth, base URL, headers, timeouts and status errors all apply, but `create()`'s
        per-request transform of the typed arguments (about 0.6 ms of CPU before the request leaves)
        is skipped; and the SDK's own iterator, which builds a pydantic object per chunk (about 180 µs
        of the llm stage's CPU per token), is not used. The raw-response header is how the SDK's own
        `with_streaming_response` asks it not to read the body before returning."""
        arguments = self._provider.arguments(self._request, stream=True)
        timeout = arguments.pop("timeout")
        body = {**arguments, **arguments.pop("extra_body", {})}
        response = self._client.post("/chat/completions", cast_to=httpx2.Response, body=body, stream=True,
                                     options={"headers": {_RAW_RESPONSE: "stream"}, "timeout": timeout})
        self._response = response
        if self._closed.is_set():
            self.close()
        content_type = response.headers.get("content-type", "")
        if not content_type.startswith("text/event-stream"):
            raise ProviderError(f"{self._provider.base_url} answered with {content_type or 'no content type'}, "
                                f"not an event stream; is base_url an OpenAI-compatible API?", code="protocol")
        try:
            yield from openai_stream(response.iter_bytes(), self.outcome)
        except ProviderError as exc:  # the body's words: scrubbed like every other error text
            raise ProviderError(self._safe(str(exc)), code=exc.code, status=exc.status,
                                retry_after=exc.retry_after) from None

    def _whole(self) -> Iterator[Delta]:
        response = self._client.chat.completions.create(**self._provider.arguments(self._request, stream=False))
        self.outcome.model = response.model or self.outcome.model
        if response.usage:
            self.outcome.usage = _usage(response.usage)
        if response.choices:
            choice = response.choices[0]
            self.outcome.finish_reason = choice.finish_reason or ""
            delta = Delta(text=choice.message.content or "", reasoning=_reasoning(choice.message))
            if (delta.text or delta.reasoning) and not self._closed.is_set():
                yield delta

    def close(self) -> None:
        """Shut the socket down: a plain close would not wake the reading thread.

        Before the response headers there is no socket to reach; the stage then
        ends the reply without waiting, and the call ends at its read timeout.
        """
        self._closed.set()
        stream = self._response.extensions.get("network_stream") if self._response is not None else None
        sock = stream.get_extra_info("socket") if stream is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _safe(self, text: str) -> str:
        return quote(text, self._key)


def _reasoning(delta: Any) -> str:
    """reasoning_content (DeepSeek, vLLM, llama.cpp) or reasoning (OpenRouter), whichever is present."""
    extra = getattr(delta, "model_extra", None) or {}
    return extra.get("reasoning_content") or extra.get("reasoning") or ""


def _retry_after(response: Any) -> float | None:
    value = response.headers.get("retry-after") if response is not None else None
    return parse_retry_after(value, time.time()) if value is not None else None


def _usage(usage: Any) -> dict[str, float]:
    return usage_counts(usage.model_dump())
