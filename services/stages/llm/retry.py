"""What to do when a provider fails before the first token: rotate the key, retry later, or give up.

After the first token the stage never retries (that would duplicate speech), so
these rules only ever see failures that produced no text.  Pure: no I/O, no clock;
jitter is passed in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .providers.base import ProviderError

MAX_RETRY_AFTER_S = 60.0
"""A Retry-After longer than this is not waited for: the user would rather hear the error."""


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 2
    backoff_s: float = 0.5
    backoff_max_s: float = 8.0

    @classmethod
    def from_profile(cls, profile: Mapping[str, Any]) -> RetryPolicy:
        return cls(profile["retries"], profile["backoff_s"], profile["backoff_max_s"])


@dataclass(frozen=True)
class Step:
    """The decision: rotate to the next key first or not, and how long to wait before trying."""

    rotate: bool
    delay: float


def next_step(error: ProviderError, retries_done: int, keys_left: int, policy: RetryPolicy,
              jitter: float) -> Step | None:
    """None means give up. `jitter` in [0, 1) spreads retries of many clients apart."""
    if error.rotates_key and keys_left > 0:
        return Step(rotate=True, delay=0.0)
    if not error.retryable or retries_done >= policy.retries:
        return None
    backoff = min(policy.backoff_max_s, policy.backoff_s * 2 ** retries_done) * (0.5 + jitter / 2)
    if error.retry_after is not None:
        if error.retry_after > MAX_RETRY_AFTER_S:
            return None
        backoff = max(backoff, error.retry_after)
    return Step(rotate=False, delay=backoff)
