"""The provider interface: one small contract every LLM backend implements.

A provider knows its vendor's wire format; the llm stage knows none of them.
The stage owns everything shared: retries, key rotation, timeouts, guards,
reasoning routing and cancel.  A provider only has to:

- turn a `ChatRequest` into its vendor's call, mapping `Params` to the vendor's names;
- yield `Delta`s (reply text and reasoning kept apart) as they arrive;
- raise `ProviderError` with the HTTP status and Retry-After it saw, so the stage can decide;
- make `close()` (called from another thread) stop the call at once, so the server sees it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any, Protocol

from ....secrets import scrub

STATUS_CODES = {401: "auth", 402: "billing", 403: "auth", 429: "rate_limited"}
"""The error codes of HTTP statuses besides 5xx (server) and the other 4xx (bad_request). 402 is
billing, not auth: the key is good but its account has no credit, which the user fixes elsewhere."""
ROTATING_CODES = frozenset({"auth", "billing", "rate_limited"})
"""Refusals that another API key (another account, another quota) may get past."""
ERROR_TEXT_LIMIT = 500
"""How long a provider's error message may be, the server's own words in it included."""
USAGE_MAX = 2**53
"""The largest usage count kept: beyond it a count is nonsense (and no longer exact as a float)."""
USAGE_NAMES = 32
"""The most usage counts kept from one reply, and (in characters) the longest name of one."""


def status_code(status: int) -> str:
    """The error code of an HTTP error status: the one reading of a refusal that every HTTP provider and
    the openai-speech engine share."""
    return STATUS_CODES.get(status) or ("server" if status >= 500 else "bad_request")


class ProviderError(RuntimeError):
    """A provider failed. The message is safe to show (no secrets) and says what to fix.

    `code` is one of: auth (401/403), billing (402), rate_limited (429), server (5xx), bad_request
    (other 4xx), connect, timeout, protocol (malformed response), blocked (safety filter),
    unsupported, not_installed.
    """

    def __init__(self, message: str, *, code: str = "provider_error", status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        """Worth another attempt before the first token (never after it)."""
        return self.code in ("rate_limited", "server", "connect", "timeout")

    @property
    def rotates_key(self) -> bool:
        """Another API key may succeed where this one was refused or throttled."""
        return self.code in ROTATING_CODES


def quote(text: str, secret: str, limit: int = ERROR_TEXT_LIMIT) -> str:
    """An error message with a server's words in it, safe to show: the key is scrubbed out first, and
    only then is the text put on one line and clipped to `limit` characters.  Clipping first could cut
    the key, and a cut key no longer matches it: the secret part would be shown.  Every transport
    builds its errors with this."""
    text = " ".join(scrub(text, secret).split())
    return text if len(text) <= limit else text[:limit] + "…"


def usage_counts(usage: Mapping[str, Any]) -> dict[str, float]:
    """The counts of a server's usage report that are counts: finite numbers from 0 to USAGE_MAX,
    under names of at most USAGE_NAMES characters, at most USAGE_NAMES of them.  Anything else (NaN,
    -1, 1e308, "x", a nested table) is left out, so that no server can make llm.done invalid."""
    counts: dict[str, float] = {}
    for name, value in usage.items():
        if (len(counts) < USAGE_NAMES and isinstance(name, str) and len(name) <= USAGE_NAMES
                and isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= USAGE_MAX):
            counts[name] = float(value)  # NaN fails the range test; a huge int is out of range before float()
    return counts


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header, which holds delta-seconds or an HTTP-date."""
    if not value or not value.strip():
        return None
    try:
        seconds = float(value)
    except ValueError:
        import email.utils  # only HTTP-dates need it, and it is a heavy import for every stage
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - now
    return max(0.0, seconds) if math.isfinite(seconds) else None


@dataclass(frozen=True)
class Image:
    """An image attached to a user message."""

    data: bytes
    mime: str


@dataclass(frozen=True)
class Params:
    """Sampling parameters; None means "the provider's default", so nothing is sent."""

    max_tokens: int = 200
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    presence_penalty: float | None = None
    stop: tuple[str, ...] = ()
    reasoning_budget: int | None = None


@dataclass(frozen=True)
class Timeouts:
    """Seconds allowed to connect, to the first token, and between tokens."""

    connect: float = 10.0
    first_token: float = 60.0
    idle: float = 30.0


@dataclass(frozen=True)
class ChatRequest:
    """What to ask. Each message is {"role", "content"}; a user message may add "images": [Image].

    `prompt`, when set, is the whole prompt as plain text (the dialogue style), for providers that
    complete raw text; `messages` then still holds the same conversation for the others.
    """

    messages: list[dict[str, Any]]
    stream: bool = True
    prompt: str = ""
    params: Params = Params()
    timeouts: Timeouts = Timeouts()

    @property
    def has_images(self) -> bool:
        return any(message.get("images") for message in self.messages)


@dataclass(frozen=True)
class Delta:
    """A piece of the reply: spoken/shown text, or reasoning that is never spoken."""

    text: str = ""
    reasoning: str = ""


@dataclass
class Outcome:
    """What a generation reports besides its text, filled in as it runs."""

    model: str = ""
    finish_reason: str = ""
    usage: dict[str, float] = field(default_factory=dict)


class Generation(Protocol):
    """One running call: iterate for deltas; close() from any thread stops it at once."""

    outcome: Outcome

    def __iter__(self) -> Iterator[Delta]: ...

    def close(self) -> None: ...


class Provider(Protocol):
    """Builds generations for one configured profile. A provider class subclasses it, so it gets
    the default of what it need not implement (`warm`)."""

    name: str
    accepts_images: bool

    def __init__(self, profile: Mapping[str, Any] | None = None, /, **settings: Any) -> None:
        """Takes the keys its registry entry declares from `profile`, with `settings` over them, checked
        and completed by `provider_settings` (services/plugins.py: every plugin is built so)."""

    def load(self) -> None:
        """Prepare before the stage reports ready (load a model); raise ProviderError if impossible."""

    def warm(self, api_key: str) -> None:
        """Get ready to call with this key, after load(), before the stage reports ready, so the first
        request does not pay for it (the openai provider builds its client). It sends nothing: a server
        down at start must not stop the stage. By default there is nothing to do."""
        return None  # a body besides the docstring: mypy takes a bare one as abstract in a subclass

    def open(self, request: ChatRequest, api_key: str) -> Generation:
        """Start the call with this key ("" when the profile has none)."""
