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

from ...protocol.kinds import SHORT, TEXT
from ..tags import DEFAULT_TAGS, LOOKAHEAD, OPENING, Tag, TagStripper

MAX_ARGS = 64
"""The most arguments a `command` event carries (protocol: `args`, at most 64 items of TEXT characters)."""
REASON_CHARS = 500
"""The longest reason a `command` event carries (protocol: `reason`)."""
SHOWN_CHARS = 40
"""How much of an offending value a reason quotes: enough to recognise it, never enough to push the
reason past its limit."""
REFUSED_ARG_CHARS = 500
"""How much of each argument a refused command keeps: the longest the default allowlist accepts (a
memory's text), so a command refused only for the per-reply cap is shown whole, and a 100 kB one is
not (the stored reply keeps every character)."""
MAX_IDS = 1000
"""The most memories one `<-memory>` may name, ranges expanded: a persona keeps far fewer (store.MEMORY_LIMIT)."""
ID_DIGITS = 10
"""The most digits of a memory id (ids are below 2**31)."""


def _shown(value: str, quoted: bool = True) -> str:
    """An offending value as a reason quotes it: its start, so a 100 kB value gives a short reason."""
    start = value[:SHOWN_CHARS] + ("…" if len(value) > SHOWN_CHARS else "")
    return repr(start) if quoted else start


@dataclass(frozen=True)
class ArgRule:
    """One argument: enum (one of `values`), text (matching `pattern`), int or number in [low, high],
    or ids (memory ids: "3", "3,5", "3-6"; see memory_ids)."""

    kind: str = "text"
    values: tuple[str, ...] = ()
    pattern: str = r"[^<>\x00-\x1f]{1,200}"
    low: float = float("-inf")
    high: float = float("inf")

    def problem(self, value: str) -> str | None:
        if self.kind == "enum":
            return None if value.lower() in self.values else f"{_shown(value)} is not one of {', '.join(self.values)}"
        if self.kind in ("int", "number"):
            try:
                number = int(value) if self.kind == "int" else float(value)
            except ValueError:
                return f"{_shown(value)} is not {'an integer' if self.kind == 'int' else 'a number'}"
            if not self.low <= number <= self.high:
                return f"{_shown(value, quoted=False)} is outside {self.low:g}..{self.high:g}"
            return None
        if self.kind == "ids":
            try:
                memory_ids(value)
            except ValueError as exc:
                return str(exc)
            return None
        return None if re.fullmatch(self.pattern, value) else f"{_shown(value)} is not allowed text"


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
    "-memory": CommandSpec(args=(ArgRule("ids"),)),
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
    return read_reply(text, allowlist)[1]


def read_reply(text: str, allowlist: Allowlist) -> tuple[str, list[Command]]:
    """A full reply's display text (what the chunker shows of it: the text without its tags) and its
    commands (`parse_reply`), from one pass of the tag grammar."""
    display, found = TagStripper(allowlist.tags, allowlist.lookahead).push(text, at_end=True)
    return display, _cap([_judge(tag, allowlist) for tag in found], allowlist.max_per_reply)


def _judge(tag: Tag, allowlist: Allowlist) -> Command:
    name, body = tag.name.lower(), tag.body
    if tag.oversize:
        return refused(Command(name, (), False, body=body),
                       f"<{name}> does not close within {allowlist.lookahead} characters (chunker.tag_lookahead)")
    if not tag.closed:
        return refused(Command(name, (), False, body=body), f"unclosed <{name}> tag")
    spec = allowlist.specs.get(name)
    if spec is None:
        return refused(Command(name, (), False, body=body), f"unknown command <{name}>")
    if OPENING.search(body):
        return refused(Command(name, (), False, body=body), "nested tags are not allowed")
    args = spec.split(body)
    command = Command(name, tuple(args), True, "", body)
    problem = spec.problem(args) or _unfit(args)
    return refused(command, f"<{name}> {problem}") if problem else command


def _unfit(args: list[str]) -> str | None:
    """What keeps accepted arguments out of a `command` event (a commands file may allow more than it
    carries), so that a command is refused alone instead of failing the event and every later one."""
    if len(args) > MAX_ARGS:
        return f"has {len(args)} arguments; a command carries at most {MAX_ARGS}"
    size = sum(map(len, args))
    return f"has {size} characters of arguments; a command carries at most {TEXT}" if size > TEXT else None


def refused(command: Command, reason: str) -> Command:
    """`command` refused for `reason`, cut to what a `command` event carries: the reason to its limit,
    the name to SHORT, the arguments to MAX_ARGS of REFUSED_ARG_CHARS each."""
    args = tuple(arg[:REFUSED_ARG_CHARS] for arg in command.args[:MAX_ARGS])
    return Command(command.name[:SHORT], args, False, reason[:REASON_CHARS], command.body)


def _cap(commands: list[Command], limit: int) -> list[Command]:
    capped = []
    for number, command in enumerate(commands):
        if number >= limit and command.accepted:
            command = refused(command, f"more than {limit} commands in one reply")
        capped.append(command)
    return capped


def memory_ids(spec: str) -> list[int]:
    """`-memory` targets: "3", "3,5" and "3-6", in order; raises ValueError, saying why, for anything
    else, for an id of more than ID_DIGITS digits, and for more than MAX_IDS ids in all. The judge
    runs it before a command is accepted, so applying an accepted one cannot fail halfway, and the
    expansion is bounded before it is built."""
    ranges = []
    for part in "".join(spec.split()).split(","):
        low, dash, high = part.partition("-")
        if not (low.isdecimal() and (high.isdecimal() or not dash) and low.isascii() and high.isascii()):
            raise ValueError(f"{_shown(part)} is not an id or a range of ids like 3 or 4-6")
        if max(len(low), len(high)) > ID_DIGITS:
            raise ValueError(f"{_shown(part)}: an id has at most {ID_DIGITS} digits")
        first, last = int(low), int(high or low)
        if last < first:
            raise ValueError(f"{_shown(part)} is a range that ends before it starts")
        ranges.append((first, last))
    count = sum(last - first + 1 for first, last in ranges)
    if count > MAX_IDS:
        raise ValueError(f"names {count} memories; at most {MAX_IDS} in one tag")
    return [memory_id for first, last in ranges for memory_id in range(first, last + 1)]


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
            if rule.kind not in ("enum", "text", "int", "number", "ids"):
                raise ValueError(f"kind {rule.kind!r} is not one of enum, text, int, number, ids")
        if spec.max_args > MAX_ARGS:
            raise ValueError(f"max_args {spec.max_args} is more than a command carries ({MAX_ARGS})")
            re.compile(rule.pattern)
    except (TypeError, ValueError, AttributeError, re.error) as exc:
        raise ValueError(f"commands file: tag <{tag}>: {exc}") from None
    return spec
