"""A generic HTTP provider for servers the openai library does not fit.

The profile's `url` is the full endpoint and `wire` names its format:
- "openai-sse": an OpenAI chat-completions body; the reply is SSE ending in `data: [DONE]`
  (or one JSON object when not streaming);
- "ndjson": Ollama's /api/chat; the reply is one JSON object per line, the last with "done": true.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .. import sse
from . import provider_settings
from .base import ChatRequest, Delta, Outcome, Provider, ProviderError, usage_counts
from .http_transport import Call, Decode, HttpGeneration, b64, given, merged
from .openai_wire import openai_stream, openai_whole
from .wire import check_error, optional_text, parse_json


class HttpProvider(Provider):
    name = "http"
    accepts_images = True

    def __init__(self, profile: Mapping[str, Any] | None = None, /, **settings: Any) -> None:
        settings = provider_settings(self.name, profile, settings)
        self.url = settings["url"]
        self.model = settings["model"]
        self.extra = dict(settings["extra"])
        if not self.url:
            raise ValueError("provider http needs url = \"http://host:port/path\" (the full endpoint)")
        self.wire = WIRES[settings["wire"]]

    def load(self) -> None:
        """Nothing to load: the server is remote and the key comes with each call."""

    def open(self, request: ChatRequest, api_key: str) -> HttpGeneration:
        call = Call(url=self.url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
                    body=merged(self.wire.body(request, self.model), self.extra),
                    accept=self.wire.stream_types if request.stream else ("application/json",))
        return HttpGeneration(call, request.timeouts, self.wire.streamed if request.stream else self.wire.whole,
                              api_key, Outcome(model=self.model))


@dataclass(frozen=True)
class Wire:
    """A request body builder and the decoders of its two answers."""

    body: Callable[[ChatRequest, str], dict[str, Any]]
    streamed: Decode
    whole: Decode
    stream_types: tuple[str, ...]


# --- openai-sse ----------------------------------------------------------------------------------

def openai_body(request: ChatRequest, model: str) -> dict[str, Any]:
    params = request.params
    body = given(model=model or None, max_tokens=params.max_tokens, temperature=params.temperature,
                 top_p=params.top_p, top_k=params.top_k, presence_penalty=params.presence_penalty,
                 stop=list(params.stop) or None)
    body["messages"] = [_openai_message(message) for message in request.messages]
    body["stream"] = request.stream
    if request.stream:
        body["stream_options"] = {"include_usage": True}
    return body


def _openai_message(message: Mapping[str, Any]) -> dict[str, Any]:
    """Images go as image_url data URLs next to the text, the form every vision server takes."""
    if not message.get("images"):
        return {"role": message["role"], "content": message["content"]}
    content = [{"type": "text", "text": message["content"]}] if message["content"] else []
    content += [{"type": "image_url", "image_url": {"url": f"data:{image.mime};base64,{b64(image.data)}"}}
                for image in message["images"]]
    return {"role": message["role"], "content": content}


# --- ndjson (Ollama /api/chat) -------------------------------------------------------------------

def ollama_body(request: ChatRequest, model: str) -> dict[str, Any]:
    params = request.params
    body: dict[str, Any] = {
        "model": model, "stream": request.stream,
        "messages": [_ollama_message(message) for message in request.messages],
        "options": given(num_predict=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                         top_k=params.top_k, presence_penalty=params.presence_penalty,
                         stop=list(params.stop) or None)}
    if params.reasoning_budget is not None:
        body["think"] = params.reasoning_budget != 0  # Ollama thinks or not; it takes no budget
    return body


def _ollama_message(message: Mapping[str, Any]) -> dict[str, Any]:
    result = {"role": message["role"], "content": message["content"]}
    if message.get("images"):
        result["images"] = [b64(image.data) for image in message["images"]]
    return result


def _ollama_streamed(pieces: Iterator[bytes], outcome: Outcome) -> Iterator[Delta]:
    for line in sse.lines(pieces):
        yield from _ollama_payload(parse_json(line), outcome)
        if outcome.finish_reason:
            return
    raise ProviderError("the stream ended before a line with \"done\": true", code="connect")


def _ollama_whole(pieces: Iterator[bytes], outcome: Outcome) -> Iterator[Delta]:
    yield from _ollama_payload(parse_json(b"".join(pieces)), outcome)


def _ollama_payload(payload: dict[str, Any], outcome: Outcome) -> Iterator[Delta]:
    check_error(payload)
    outcome.model = payload.get("model") or outcome.model
    message = payload.get("message") or {}
    delta = Delta(optional_text(message.get("content")), optional_text(message.get("thinking")))
    if delta.text or delta.reasoning:
        yield delta
    if payload.get("done"):
        outcome.finish_reason = payload.get("done_reason") or "stop"
        outcome.usage = usage_counts(given(prompt_tokens=payload.get("prompt_eval_count"),
                                           completion_tokens=payload.get("eval_count")))
        if len(outcome.usage) == 2:
            outcome.usage["total_tokens"] = sum(outcome.usage.values())


WIRES = {
    "openai-sse": Wire(openai_body, openai_stream, openai_whole, ("text/event-stream",)),
    "ndjson": Wire(ollama_body, _ollama_streamed, _ollama_whole,
                   ("application/x-ndjson", "application/ndjson", "application/jsonl", "application/json")),
}
"""By the `wire` names the registry declares (tests/test_plugins.py keeps the two the same)."""
