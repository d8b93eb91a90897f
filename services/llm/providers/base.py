"""The provider interface: one small contract every LLM backend implements.

A provider knows its vendor's wire format; the llm stage knows none of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Protocol


class ProviderError(RuntimeError):
    """A provider failed; the message is safe to show (no secrets) and says what to fix."""


@dataclass(frozen=True)
class ChatRequest:
    """What to ask: the chat messages, whether to stream, and sampling parameters."""

    messages: list[dict[str, str]]
    stream: bool = True
    max_tokens: int = 200
    temperature: float = 0.7


@dataclass
class Outcome:
    """What a generation reports besides its text, filled in as it runs."""

    model: str = ""
    finish_reason: str = ""
    usage: dict[str, float] = field(default_factory=dict)


class Generation(Protocol):
    """One running reply: iterate for text deltas; close() from any thread stops it."""

    outcome: Outcome

    def __iter__(self) -> Iterator[str]: ...

    def close(self) -> None: ...


class Provider(Protocol):
    """Builds generations for one configured profile."""

    name: str

    def __init__(self, profile: Mapping[str, Any]) -> None: ...

    def load(self) -> None:
        """Prepare before the stage reports ready (load a model, build a client)."""

    def open(self, request: ChatRequest) -> Generation: ...
