"""Google Gemini through its REST API: `streamGenerateContent?alt=sse` when streaming, `generateContent` when not.

The key travels in the `x-goog-api-key` header, never in the URL, so it cannot leak
into a log line that quotes the endpoint.  Thought parts are reasoning, kept apart
from the reply.  A safety block is an error, raised only after any text that came
before it, so the stage keeps the partial reply.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from .. import sse
from . import provider_settings
from .base import ChatRequest, Delta, Outcome, Params, Provider, ProviderError, usage_counts
from .http_transport import Call, HttpGeneration, b64, given, merged
from .wire import check_error, parse_json

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com/v1beta"

ROLES = {"user": "user", "assistant": "model"}

BLOCKING_FINISH = {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"}
"""Finish reasons that mean a filter stopped the reply rather than the model finishing it."""

USAGE = {"promptTokenCount": "prompt_tokens", "candidatesTokenCount": "completion_tokens",
         "thoughtsTokenCount": "reasoning_tokens", "cachedContentTokenCount": "cached_tokens",
         "totalTokenCount": "total_tokens"}


class GeminiProvider(Provider):
    name = "gemini"
    accepts_images = True

    def __init__(self, profile: Mapping[str, Any] | None = None, /, **settings: Any) -> None:
        settings = provider_settings(self.name, profile, settings)
        self.base_url = (settings["base_url"] or DEFAULT_BASE_URL).rstrip("/")
        self.model = settings["model"].removeprefix("models/")
        self.extra = dict(settings["extra"])
        if not self.model:
            raise ValueError("provider gemini needs model = \"gemini-2.0-flash\" (or another Gemini model)")

    def load(self) -> None:
        """Nothing to load: the API is remote and the key comes with each call."""

    def open(self, request: ChatRequest, api_key: str) -> HttpGeneration:
        method = "streamGenerateContent?alt=sse" if request.stream else "generateContent"
        call = Call(url=f"{self.base_url}/models/{self.model}:{method}",
                    headers={"x-goog-api-key": api_key} if api_key else {},
                    body=merged(request_body(request), self.extra),
                    accept=("text/event-stream",) if request.stream else ("application/json",))
        return HttpGeneration(call, request.timeouts, _streamed if request.stream else _whole, api_key,
                              Outcome(model=self.model))


def request_body(request: ChatRequest) -> dict[str, Any]:
    """The generateContent body: system messages become systemInstruction, the rest contents."""
    system: list[dict[str, Any]] = []
    contents = []
    for message in request.messages:
        parts = _parts(message)
        if message["role"] == "system":
            system.extend(parts)
        elif message["role"] not in ROLES:
            raise ProviderError(f"gemini has no role {message['role']!r}; use system, user or assistant",
                                code="bad_request")
        elif parts:
            contents.append({"role": ROLES[message["role"]], "parts": parts})
    body: dict[str, Any] = {"contents": contents, "generationConfig": generation_config(request.params)}
    if system:
        body["systemInstruction"] = {"parts": system}
    return body


def _parts(message: Mapping[str, Any]) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"text": message["content"]}] if message.get("content") else []
    parts += [{"inline_data": {"mime_type": image.mime, "data": b64(image.data)}}
              for image in message.get("images") or ()]
    return parts


def generation_config(params: Params) -> dict[str, Any]:
    config = given(maxOutputTokens=params.max_tokens, temperature=params.temperature, topP=params.top_p,
                   topK=params.top_k, presencePenalty=params.presence_penalty)
    if params.stop:
        config["stopSequences"] = list(params.stop)
    if params.reasoning_budget is not None:
        config["thinkingConfig"] = {"thinkingBudget": params.reasoning_budget,
                                    "includeThoughts": params.reasoning_budget != 0}
    return config


def _streamed(pieces: Iterator[bytes], outcome: Outcome) -> Iterator[Delta]:
    for event in sse.events(pieces):
        yield from _response(parse_json(event.data), outcome)
    if not outcome.finish_reason:
        raise ProviderError("the stream ended before Gemini finished the reply", code="connect")


def _whole(pieces: Iterator[bytes], outcome: Outcome) -> Iterator[Delta]:
    yield from _response(parse_json(b"".join(pieces)), outcome)


def _response(payload: dict[str, Any], outcome: Outcome) -> Iterator[Delta]:
    """One GenerateContentResponse: its text and thoughts first, then its metadata; a block raises last."""
    check_error(payload)
    outcome.model = payload.get("modelVersion") or outcome.model
    if isinstance(payload.get("usageMetadata"), dict):
        outcome.usage = usage_counts({USAGE[name]: value for name, value in payload["usageMetadata"].items()
                                      if name in USAGE})
    feedback = payload.get("promptFeedback") or {}
    if feedback.get("blockReason"):
        outcome.finish_reason = "blocked"
        message = feedback.get("blockReasonMessage")
        detail = f": {message}" if message else _flagged(feedback.get("safetyRatings"))
        raise ProviderError(f"Gemini refused the prompt (blockReason {feedback['blockReason']}){detail}; "
                            f"rephrase it or adjust safetySettings in the profile's extra", code="blocked")
    for candidate in (payload.get("candidates") or [])[:1]:
        parts = (candidate.get("content") or {}).get("parts", [])
        delta = Delta(text="".join(part.get("text", "") for part in parts if not part.get("thought")),
                      reasoning="".join(part.get("text", "") for part in parts if part.get("thought")))
        if delta.text or delta.reasoning:
            yield delta
        reason = candidate.get("finishReason", "")
        if reason:
            outcome.finish_reason = reason.lower()
        if reason in BLOCKING_FINISH:
            raise ProviderError(f"Gemini stopped the reply (finishReason {reason})"
                                f"{_flagged(candidate.get('safetyRatings'))}", code="blocked")


def _flagged(ratings: list[dict[str, Any]] | None) -> str:
    """The safety categories that caused a block, as a message suffix."""
    flagged = [f"{rating.get('category', '?')} {rating.get('probability', '')}".strip()
               for rating in ratings or () if rating.get("blocked") or rating.get("probability") in ("MEDIUM", "HIGH")]
    return f": {', '.join(flagged)}" if flagged else ""
