"""OpenAI-compatible chat completions through the `openai` library.

Serves OpenAI, OpenRouter, llama.cpp's server, Ollama's /v1, vLLM and LM Studio.
Each generation owns its HTTP client, so close() from another thread drops the
connection and the server stops generating.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Iterator, Mapping

import openai

from .base import ChatRequest, Outcome, ProviderError


def scrub(text: str, secret: str) -> str:
    """Remove a secret (and any prefix of it a server echoes back) from a message."""
    if secret:
        text = text.replace(secret, "***")
        if len(secret) > 8:
            text = text.replace(secret[:8], "***")
    return text


class OpenAIProvider:
    name = "openai"

    def __init__(self, profile: Mapping[str, Any]) -> None:
        self.base_url = profile["base_url"] or "https://api.openai.com/v1"
        self.model = profile["model"]
        self.timeout = float(profile["timeout_s"])
        self.key_env = profile["api_key_env"]
        if not self.model:
            raise ValueError(f"profile {profile['name']!r}: provider openai needs model = \"...\"")

    def load(self) -> None:
        """Nothing to load; the key is read per request so a rotated secret takes effect."""

    def open(self, request: ChatRequest) -> "OpenAIGeneration":
        key = os.environ.get(self.key_env, "") if self.key_env else ""
        return OpenAIGeneration(self, request, key)


class OpenAIGeneration:
    def __init__(self, provider: OpenAIProvider, request: ChatRequest, key: str) -> None:
        self.outcome = Outcome(model=provider.model)
        self._provider = provider
        self._request = request
        self._key = key
        self._closed = threading.Event()
        self._client = openai.OpenAI(
            base_url=provider.base_url, api_key=key or "unset", max_retries=1,
            timeout=openai.Timeout(provider.timeout, connect=min(10.0, provider.timeout)))

    def __iter__(self) -> Iterator[str]:
        try:
            if self._request.stream:
                yield from self._streamed()
            else:
                yield from self._whole()
        except openai.APIStatusError as exc:
            hint = f"; set ${self._provider.key_env}" if exc.status_code in (401, 403) else ""
            raise ProviderError(self._safe(f"{self._provider.base_url} answered {exc.status_code}: "
                                           f"{exc.message}{hint}")) from None
        except Exception as exc:  # the transport's own errors surface when close() cuts a read
            if self._closed.is_set():
                return
            if not isinstance(exc, openai.APIError):
                raise
            raise ProviderError(self._safe(f"{self._provider.base_url}: {type(exc).__name__}: {exc}")) from None
        finally:
            self._client.close()

    def _call(self, stream: bool) -> Any:
        return self._client.chat.completions.create(
            model=self._provider.model, messages=self._request.messages, stream=stream,
            max_tokens=self._request.max_tokens, temperature=self._request.temperature)

    def _streamed(self) -> Iterator[str]:
        for chunk in self._call(stream=True):
            if self._closed.is_set():
                return
            if chunk.model:
                self.outcome.model = chunk.model
            if chunk.usage:
                self.outcome.usage = _usage(chunk.usage)
            for choice in chunk.choices:
                if choice.finish_reason:
                    self.outcome.finish_reason = choice.finish_reason
                if choice.delta and choice.delta.content:
                    yield choice.delta.content

    def _whole(self) -> Iterator[str]:
        response = self._call(stream=False)
        self.outcome.model = response.model or self.outcome.model
        if response.usage:
            self.outcome.usage = _usage(response.usage)
        if response.choices:
            choice = response.choices[0]
            self.outcome.finish_reason = choice.finish_reason or ""
            if choice.message.content and not self._closed.is_set():
                yield choice.message.content

    def close(self) -> None:
        self._closed.set()
        self._client.close()

    def _safe(self, text: str) -> str:
        return scrub(text, self._key)


def _usage(usage: Any) -> dict[str, float]:
    return {name: float(value) for name, value in usage.model_dump().items() if isinstance(value, (int, float))}
