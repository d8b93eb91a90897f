"""The OpenAI chat-completions reply, read from its bytes: the SSE stream and the whole completion.

Both the openai provider (from the SDK's raw response) and the http provider's "openai-sse" wire read
replies with it, so it imports neither the SDK nor requests: the llm with an openai profile holds no
requests (about 4 MB of RSS, docs/bench.md §7), and the http provider no SDK.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import Any

from .. import sse
from .base import Delta, Outcome, ProviderError, usage_counts
from .wire import check_error, optional_text, parse_json


def openai_stream(pieces: Iterator[bytes], outcome: Outcome) -> Iterator[Delta]:
    """An OpenAI chat-completions SSE body, as the network delivers it, as deltas (the openai provider
    reads the SDK's raw response with it: parsing the raw events skips the SDK's pydantic object per chunk).

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


def openai_whole(pieces: Iterator[bytes], outcome: Outcome) -> Iterator[Delta]:
    """A whole (non-streamed) chat completion's body."""
    yield from _openai_payload(parse_json(b"".join(pieces)), outcome, "message")


def _openai_payload(payload: dict[str, Any], outcome: Outcome, key: str) -> Iterator[Delta]:
    """A chunk (key "delta") or a whole completion (key "message"); the usage chunk has no choices."""
    check_error(payload)
    outcome.model = payload.get("model") or outcome.model
    if payload.get("usage"):
        outcome.usage = _openai_usage(payload["usage"])
    for choice in (payload.get("choices") or [])[:1]:
        part = choice.get(key) or {}
        delta = Delta(optional_text(part.get("content")),
                      optional_text(part.get("reasoning_content") or part.get("reasoning")))
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
