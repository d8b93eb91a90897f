"""Field checks: each returns None for a good value, or what is wrong with it, phrased to follow
the field's name ("field 'text' must be a string, got int").

The message kinds (kinds.py) attach one check to each field; `wire.validate` runs them on the
decoded map, so a sender and a receiver judge a message by the same rules.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

Check = Callable[[Any], str | None]
FAST_PATHS: dict[Check, str] = {}
"""For the common checks, a Python expression in `v` that is true for every value the check accepts
(most of them: a subclass of str fails it and goes to the check itself). `wire` compiles each kind's
checks into one function that tries this first, so a valid field costs no call; only a value that
fails it runs the check, which accepts it or says what is wrong."""


def fast(expression: str, check: Check) -> Check:
    FAST_PATHS[check] = expression
    return check


@dataclass(frozen=True)
class Field:
    """One payload field: its check, whether it may be omitted, and its default."""

    check: Check
    required: bool = True
    default: Any = None


def text(limit: int, pattern: re.Pattern[str] | None = None,
         choices: tuple[str, ...] = ()) -> Check:
    def check(value: Any) -> str | None:
        if not isinstance(value, str):
            return f"must be a string, got {type(value).__name__}"
        if len(value) > limit:
            return f"is {len(value)} characters, the limit is {limit}"
        if pattern is not None and not pattern.fullmatch(value):
            return f"must match {pattern.pattern}"
        if choices and value not in choices:
            return f"must be one of {', '.join(choices)}, got {value!r}"
        return None
    if pattern is not None:
        return check
    return fast(f"type(v) is str and len(v) <= {limit}" + (f" and v in {choices!r}" if choices else ""), check)


def integer(low: int = 0, high: int = 2**53) -> Check:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be an integer, got {type(value).__name__}"
        if not low <= value <= high:
            return f"must be between {low} and {high}, got {value}"
        return None
    return fast(f"type(v) is int and {low} <= v <= {high}", check)


def number(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"must be a number, got {type(value).__name__}"
    if not math.isfinite(value):
        return "must be finite"
    return None


fast("type(v) is float and v - v == 0 or type(v) is int", number)  # inf - inf and nan - nan are nan


def fraction(value: Any) -> str | None:
    problem = number(value)
    if problem:
        return problem
    return None if 0 <= value <= 1 else f"must be between 0 and 1, got {value}"


def boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"must be true or false, got {type(value).__name__}"


fast("v is True or v is False", boolean)


def optional_boolean(value: Any) -> str | None:
    return None if value is None else boolean(value)


def binary(limit: int) -> Check:
    def check(value: Any) -> str | None:
        if not isinstance(value, bytes):
            return f"must be binary, got {type(value).__name__}"
        if len(value) > limit:
            return f"is {len(value)} bytes, the limit is {limit}"
        return None
    return fast(f"type(v) is bytes and len(v) <= {limit}", check)


def list_of(item: Check, limit: int) -> Check:
    def check(value: Any) -> str | None:
        if not isinstance(value, (list, tuple)):
            return f"must be a list, got {type(value).__name__}"
        if len(value) > limit:
            return f"has {len(value)} items, the limit is {limit}"
        for position, element in enumerate(value):
            problem = item(element)
            if problem:
                return f"item {position} {problem}"
        return None
    return check


def record(fields: Mapping[str, Check]) -> Check:
    def check(value: Any) -> str | None:
        if not isinstance(value, dict):
            return f"must be a map, got {type(value).__name__}"
        for name, field_check in fields.items():
            if name not in value:
                return f"lacks field {name!r}"
            problem = field_check(value[name])
            if problem:
                return f"field {name!r} {problem}"
        return None
    return check


def counter_map(values: Check) -> Check:
    key_check = text(256)

    def check(value: Any) -> str | None:
        if not isinstance(value, dict):
            return f"must be a map, got {type(value).__name__}"
        if len(value) > 4096:
            return f"has {len(value)} entries, the limit is 4096"
        for key, item in value.items():
            problem = key_check(key) or values(item)
            if problem:
                return f"entry {key!r} {problem}"
        return None
    return check


