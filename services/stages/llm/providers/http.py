"""A generic HTTP provider for servers the openai library does not fit.

The profile's `url` is the full endpoint and `wire` names its format:
- "openai-sse": an OpenAI chat-completions body; the reply is SSE ending in `data: [DONE]`
  (or one JSON object when not streaming);
- "ndjson": Ollama's /api/chat; the reply is one JSON object per line, the last with "done": true.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .. import sse
from . import provider_settings
from .base import ChatRequest, Delta, Outcome, ProviderError, usage_counts
from .http_transport import Call, Decode, HttpGeneration, b64, check_error, given, merged, parse_json


class HttpProvider:
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


def openai_stream(pieces: Iterator[bytes], outcome: Outcome) -> Iterator[Delta]:
    """An OpenAI chat-completions SSE body, as the network delivers it, as deltas (also the openai
    provider's reader: parsing the raw events skips the SDK's pydantic object per chunk).

    The events of one network read become one delta. They were all there already, so passing them on
    one by one would add nothing but a message per token at every stage downstream: a server faster
    than the pipeline, or a burst after a network stall, is met with bigger deltas, not a queue (the
    first sentence of an instant reply reaches the chunker whole, not as twenty messages)."""
    parser = sse.SSEParser()
    for piece in pieces:
        if (yield from _openai_read(parser.feed(piece), outcome)):
            return
    if (yield from _openai_read(parser.flush(), outcome)):
        return
    if not outcome.finish_reason:
        raise ProviderError("the stream ended without [DONE] or a finish_reason", code="connect")


def _openai_read(events: list[sse.Event], outcome: Outcome) -> Generator[Delta, None, bool]:
    """The deltas of one read's events joined into one; True once [DONE] came. When an event fails
    (an error the server reports mid-reply, malformed JSON), the text before it is passed on first."""
    text: list[str] = []
    reasoning: list[str] = []
    done = False
    try:
        for event in events:
            if event.data.strip() == "[DONE]":
                done = True
                break
            for delta in _openai_payload(parse_json(event.data), outcome, "delta"):
                text.append(delta.text)
                reasoning.append(delta.reasoning)
    finally:
        if text:
            yield Delta("".join(text), "".join(reasoning))
    return done


def _openai_whole(pieces: Iterator[bytes], outcome: Outcome) -> Iterator[Delta]:
    yield from _openai_payload(parse_json(b"".join(pieces)), outcome, "message")


def _openai_payload(payload: dict[str, Any], outcome: Outcome, key: str) -> Iterator[Delta]:
    """A chunk (key "delta") or a whole completion (key "message"); the usage chunk has no choices."""
    check_error(payload)
    outcome.model = payload.get("model") or outcome.model
    if payload.get("usage"):
        outcome.usage = _openai_usage(payload["usage"])
    for choice in (payload.get("choices") or [])[:1]:
        part = choice.get(key) or {}
        delta = Delta(_text(part.get("content")), _text(part.get("reasoning_content") or part.get("reasoning")))
        if delta.text or delta.reasoning:
            yield delta
        if choice.get("finish_reason"):
            outcome.finish_reason = choice["finish_reason"]


def _openai_usage(usage: Any) -> dict[str, float]:
    if not isinstance(usage, dict):
        return {}
    details = usage.get("completion_tokens_details")
    reasoning = details.get("reasoning_tokens") if isinstance(details, dict) else None
    return usage_counts({**usage, "reasoning_tokens": reasoning} if reasoning is not None else usage)


def _text(value: Any) -> str:
    """Servers send null, or sometimes an object, where a text is optional."""
    return value if isinstance(value, str) else ""


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
    delta = Delta(_text(message.get("content")), _text(message.get("thinking")))
    if delta.text or delta.reasoning:
        yield delta
    if payload.get("done"):
        outcome.finish_reason = payload.get("done_reason") or "stop"
        outcome.usage = usage_counts(given(prompt_tokens=payload.get("prompt_eval_count"),
                                           completion_tokens=payload.get("eval_count")))
        if len(outcome.usage) == 2:
            outcome.usage["total_tokens"] = sum(outcome.usage.values())


WIRES = {
    "openai-sse": Wire(openai_body, openai_stream, _openai_whole, ("text/event-stream",)),
    "ndjson": Wire(ollama_body, _ollama_streamed, _ollama_whole,
                   ("application/x-ndjson", "application/ndjson", "application/jsonl", "application/json")),
}
"""By the `wire` names the registry declares (tests/test_plugins.py keeps the two the same)."""
