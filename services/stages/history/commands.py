"""Commands: the tags a model embeds in its reply, parsed against an allowlist.

Model output is untrusted input: a command is accepted only when its tag is on
the allowlist and every argument passes its rule; anything else is refused with
a reason the front-end can show.  A per-reply cap stops a model that spams
commands.  What is a tag at all is the chunker's call (voxpipe.stages.tags): history
finds the tags with the same stripper, so it refuses only what the chunker hid
and never a `<b>` the user reads, a `<br>`, an `x<y>z` or tag-like code.
Pure: no I/O.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..tags import DEFAULT_TAGS, LOOKAHEAD, OPENING, Tag, TagStripper

_IDS = re.compile(r"\d+(?:\s*[-,]\s*\d+)*")


@dataclass(frozen=True)
class ArgRule:
    """One argument: enum (one of `values`), text (matching `pattern`), int or number in [low, high]."""

    kind: str = "text"
    values: tuple[str, ...] = ()
    pattern: str = r"[^<>\x00-\x1f]{1,200}"
    low: float = float("-inf")
    high: float = float("inf")

    def problem(self, value: str) -> str | None:
        if self.kind == "enum":
            return None if value.lower() in self.values else f"{value!r} is not one of {', '.join(self.values)}"
        if self.kind in ("int", "number"):
            try:
                number = int(value) if self.kind == "int" else float(value)
            except ValueError:
                return f"{value!r} is not {'an integer' if self.kind == 'int' else 'a number'}"
            return None if self.low <= number <= self.high else f"{value} is outside {self.low:g}..{self.high:g}"
        return None if re.fullmatch(self.pattern, value) else f"{value[:40]!r} is not allowed text"


@dataclass(frozen=True)
class CommandSpec:
    """A tag on the allowlist: how its body splits into arguments and the rule for each position."""

    separator: str = ""
    args: tuple[ArgRule, ...] = (ArgRule(),)
    min_args: int = 1
    max_args: int = 1

    def problem(self, args: list[str]) -> str | None:
        if not self.min_args <= len(args) <= self.max_args:
            wanted = str(self.min_args) if self.min_args == self.max_args else f"{self.min_args}..{self.max_args}"
            return f"takes {wanted} argument(s), got {len(args)}"
        for position, value in enumerate(args):
            rule = self.args[min(position, len(self.args) - 1)]
            problem = rule.problem(value)
            if problem:
                return f"argument {position + 1}: {problem}"
        return None

    def split(self, body: str) -> list[str]:
        parts = body.split(self.separator) if self.separator else [body]
        return [part.strip() for part in parts]


EMOTIONS = ("smile", "laugh", "happy", "sad", "angry", "surprise", "surprised", "scared", "shy", "smug",
            "neutral", "thinking", "confused", "tired", "bored", "love", "disgust", "discontent")
PRIORITIES = ("low", "normal", "high", "critical")
_NAME = ArgRule(pattern=r"[\w .,'!?\-]{1,100}")
_TEXT = ArgRule(pattern=r"[^<>\x00-\x1f]{1,200}")

DEFAULT_ALLOWLIST: dict[str, CommandSpec] = {
    "e": CommandSpec(args=(ArgRule("enum", EMOTIONS),)),
    "c": CommandSpec(separator=",", args=(_NAME,), max_args=4),
    "a": CommandSpec(args=(_NAME,)),
    "m": CommandSpec(args=(_NAME,)),
    "f": CommandSpec(args=(_NAME,)),
    "v": CommandSpec(separator=",", args=(_NAME, ArgRule("number", low=0.1, high=60)), max_args=2),
    "music": CommandSpec(args=(_TEXT,)),
    "hint": CommandSpec(args=(_TEXT,)),
    "clothes": CommandSpec(args=(_NAME,)),
    "interaction": CommandSpec(args=(_TEXT,)),
    "p": CommandSpec(separator=",", args=(ArgRule("int", low=-5, high=5),), min_args=3, max_args=3),
    "+memory": CommandSpec(separator="|", args=(ArgRule("enum", PRIORITIES), ArgRule(pattern=r"[^<>\x00-\x09]{1,500}")),
                           min_args=2, max_args=2),
    "#memory": CommandSpec(separator="|", args=(ArgRule("int", low=1, high=2**31), ArgRule("enum", PRIORITIES),
                                                ArgRule(pattern=r"[^<>\x00-\x09]{1,500}")),
                           min_args=3, max_args=3),
    "-memory": CommandSpec(args=(ArgRule(pattern=_IDS.pattern),)),
}


@dataclass(frozen=True)
class Command:
    """One tag found in a reply: accepted with its arguments, or refused with the reason."""

    name: str
    args: tuple[str, ...]
    accepted: bool
    reason: str = ""
    body: str = ""


@dataclass
class Allowlist:
    """What history accepts (`specs`, at most `max_per_reply` per reply), and what the chunker takes
    for a tag (`tags`, its configured names, and `lookahead`, as in `chunker.*`): history must find
    the tags the chunker found, or it would refuse text the user reads or miss a tag the user never saw."""

    specs: Mapping[str, CommandSpec] = field(default_factory=lambda: dict(DEFAULT_ALLOWLIST))
    max_per_reply: int = 30
    tags: tuple[str, ...] = DEFAULT_TAGS
    lookahead: int = LOOKAHEAD


def parse_reply(text: str, allowlist: Allowlist) -> list[Command]:
    """Every tag of a full reply (the ones the chunker hid), in order, each accepted or refused with a reason."""
    _, found = TagStripper(allowlist.tags, allowlist.lookahead).push(text, at_end=True)
    return _cap([_judge(tag, allowlist) for tag in found], allowlist.max_per_reply)


def _judge(tag: Tag, allowlist: Allowlist) -> Command:
    name, body = tag.name.lower(), tag.body
    if not tag.closed:
        return Command(name, (), False, f"unclosed <{name}> tag", body)
    spec = allowlist.specs.get(name)
    if spec is None:
        return Command(name, (), False, f"unknown command <{name}>", body)
    if OPENING.search(body):
        return Command(name, (), False, "nested tags are not allowed", body)
    args = spec.split(body)
    problem = spec.problem(args)
    if problem:
        return Command(name, tuple(args), False, f"<{name}> {problem}", body)
    return Command(name, tuple(args), True, "", body)


def _cap(commands: list[Command], limit: int) -> list[Command]:
    capped = []
    for number, command in enumerate(commands):
        if number >= limit and command.accepted:
            command = Command(command.name, command.args, False,
                              f"more than {limit} commands in one reply", command.body)
        capped.append(command)
    return capped


def memory_ids(spec: str) -> list[int]:
    """`-memory` targets: "3", "3,5" and "3-6" (ranges capped at 1000 ids)."""
    ids: list[int] = []
    for part in spec.replace(" ", "").split(","):
        low, _, high = part.partition("-")
        first, last = int(low), int(high or low)
        ids.extend(range(first, min(last, first + 999) + 1))
    return ids


def load_allowlist(path: str, max_per_reply: int, tags: tuple[str, ...] = DEFAULT_TAGS,
                   lookahead: int = LOOKAHEAD) -> Allowlist:
    """The built-in allowlist, with tags from a TOML file added or replaced; `tags` and `lookahead`
    are the chunker's (`chunker.tags`, `chunker.tag_lookahead`), see Allowlist.

    The file has one table per tag: separator, min_args, max_args, and `args`, a list
    of tables with kind (enum | text | int | number), values, pattern, low, high.
    """
    specs = dict(DEFAULT_ALLOWLIST)
    if path:
        with open(Path(path).expanduser(), "rb") as handle:
            data = tomllib.load(handle)
        for tag, table in data.items():
            specs[tag.lower()] = _spec_from(tag, table)
    return Allowlist(specs, max_per_reply, tags, lookahead)


def _spec_from(tag: str, table: Mapping[str, Any]) -> CommandSpec:
    try:
        rules = tuple(ArgRule(kind=rule.get("kind", "text"), values=tuple(v.lower() for v in rule.get("values", ())),
                              pattern=rule.get("pattern", _TEXT.pattern), low=rule.get("low", float("-inf")),
                              high=rule.get("high", float("inf"))) for rule in table.get("args", [{}]))
        spec = CommandSpec(separator=table.get("separator", ""), args=rules or (ArgRule(),),
                           min_args=table.get("min_args", 1), max_args=table.get("max_args", 1))
        for rule in spec.args:
            if rule.kind not in ("enum", "text", "int", "number"):
                raise ValueError(f"kind {rule.kind!r} is not one of enum, text, int, number")
            re.compile(rule.pattern)
    except (TypeError, ValueError, AttributeError, re.error) as exc:
        raise ValueError(f"commands file: tag <{tag}>: {exc}") from None
    return spec
