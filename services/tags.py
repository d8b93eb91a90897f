"""The command-tag grammar, shared by the chunker (never show or speak them) and history (parse them).

A tag is `<name>body</name>`. Memory tags carry an operator before the name and
close without it, as the companion app writes them: `<+memory>high|text</memory>`.

Any well-formed pair counts, not only the allowlisted ones: history refuses an unknown
`<bogus>x</bogus>` visibly, so the chunker must neither show nor speak it, or the
window would show what the refused-commands list says was refused. What is not a pair
stays text: `a < b`, `x<y>z`, `<3`, a self-closing `<br/>`.
"""

from __future__ import annotations

import functools
import re

DEFAULT_TAGS = ("e", "c", "a", "m", "f", "v", "p", "music", "hint", "clothes", "interaction",
                "+memory", "#memory", "-memory")
OPERATORS = "+#-"

_OPERATOR, _WORD = r"[+#\-]?", r"[A-Za-z]\w{0,31}"
NAME = _OPERATOR + _WORD
"""A tag name: an ASCII letter, then up to 31 letters, digits or '_', after an optional operator."""
OPENING = re.compile(rf"<({NAME})>")
OPENING_START = re.compile(rf"<{_OPERATOR}(?:{_WORD})?")
"""What may still grow into an OPENING: a stream holds it back until it can tell."""

VOID = frozenset("area base br col embed hr img input link meta source track wbr".split())
"""HTML's void elements never have a closing tag, so `<br>` opens no pair: it is markup, and waiting
for its `</br>` would only hold the text after it back (models put `<br>` in table cells)."""


def closers(tag: str) -> tuple[str, ...]:
    """The closing tags that end `tag`: `</+memory>` and `</memory>` both end `<+memory>`."""
    names = [tag]
    if tag[:1] in OPERATORS and len(tag) > 1:
        names.append(tag[1:])
    return tuple(f"</{name}>" for name in names)


@functools.lru_cache(maxsize=256)
def closer(tag: str) -> re.Pattern[str]:
    """Any closing tag of `tag`, case-insensitively (a regex, so no index shifts as `lower()` could)."""
    return re.compile("|".join(map(re.escape, closers(tag))), re.I)


_MEANINGS = {"c": "command", "a": "animation", "m": "movement", "f": "face effect", "v": "effect",
             "music": "music", "hint": "hint", "clothes": "clothes", "interaction": "interaction"}
"""What the default allowlist's one-letter tags stand for (services.history.commands)."""
_VARIABLES = ("attitude", "boredom", "stress")


def describe(name: str, args: tuple[str, ...]) -> str:
    """An accepted command in words a person reads at a glance, for front-ends: `<p>1,0,-1</p>`
    is "attitude +1, boredom 0, stress −1", not "p 1 0 -1". A tag the default allowlist does
    not know, or one a commands file reshaped, is shown as written: "command: name arg arg"."""
    name = name.lower()
    numbers = [_integer(arg) for arg in args]
    if name == "p" and len(args) == len(_VARIABLES) and None not in numbers:
        return ", ".join(f"{variable} {_signed(number)}" for variable, number in zip(_VARIABLES, numbers))
    if name == "v" and len(args) == 2:
        return f"effect {args[0]} for {args[1]} s"
    if name == "+memory" and len(args) == 2:
        return f"remember ({args[0]}): {args[1]}"
    if name == "#memory" and len(args) == 3:
        return f"memory {args[0]} now ({args[1]}): {args[2]}"
    if name == "-memory" and len(args) == 1:
        return f"forget memor{'y' if args[0].isdigit() else 'ies'} {args[0]}"
    if name in _MEANINGS and args:
        return f"{_MEANINGS[name]}: {', '.join(args)}"
    return f"command: {name} {' '.join(args)}".strip()


def _integer(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _signed(number: int) -> str:
    """+1, 0, −1: a typographic minus, as a person writes it."""
    return f"+{number}" if number > 0 else f"\u2212{-number}" if number < 0 else "0"
