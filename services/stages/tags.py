"""The tag grammar, shared by the chunker (never show or speak a tag) and history (judge each tag).

Both run one `TagStripper` over a reply, the chunker as the reply streams and history over the
whole reply, so they agree on every tag by construction: history reports and refuses only what
the chunker hid, and the chunker hides only what history reports.

At a '<' of the reply, outside a `<think>` block:
- A configured name (`chunker.tags`) opens a tag anywhere, even in code: `<e>smile</e>`. A reply
  that ends inside one ends the tag, unclosed; a stray configured closing tag is dropped. One that
  does not close within `lookahead` characters of its '<' is still a tag, reported `oversize`: its
  body is read on to its closing tag, or to the reply's end, and discarded as it streams, so it is
  never shown nor spoken (a 100 kB memory dump is not read aloud) and costs no memory. No '<' of
  prose is swallowed this way: only an exact `<name>` of a configured name opens one.
- Outside code (a fenced block, or an inline `span`):
  - a FORMATTING element, opening or closing, paired or not, is markup: the markup is dropped and
    its text stays, so `<b>Важно:</b> завтра` shows and speaks "Важно: завтра";
  - any other `<name>` but a VOID element opens a tag if its closing tag ends within `lookahead`
    characters of the '<': `<bogus>x</bogus>` is neither shown nor spoken, and history refuses it
    visibly.
- Everything else is text: `a < b`, `x<y>z`, `<3`, `<br>`, `<br/>`, `<b class="x">`, and a pair
  of another name longer than the lookahead.

Memory tags carry an operator before the name and close without it, as the companion app writes
them: `<+memory>high|text</memory>`. Names match case-insensitively; a tag is reported by its
configured spelling, or else by its name in lowercase.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace

DEFAULT_TAGS = ("e", "c", "a", "m", "f", "v", "p", "music", "hint", "clothes", "interaction",
                "+memory", "#memory", "-memory")
LOOKAHEAD = 600
"""How far past its '<' a tag must close (`chunker.tag_lookahead`): the longest memory tag the
allowlist takes (about 530 characters) fits, and a '<' that never becomes a tag is still released,
as text, after 600 characters. A configured tag that has not closed by then is oversize (see the
module docstring): its body is never released."""
OPERATORS = "+#-"

_OPERATOR, _WORD = r"[+#\-]?", r"[A-Za-z]\w{0,31}"
NAME = _OPERATOR + _WORD
"""A tag name: an ASCII letter, then up to 31 letters, digits or '_', after an optional operator."""
OPENING = re.compile(rf"<({NAME})>")
OPENING_START = re.compile(rf"<{_OPERATOR}(?:{_WORD})?")
"""What may still grow into an OPENING: a stream holds it back until it can tell."""
CLOSING = re.compile(rf"</({_WORD})>")
CLOSING_START = re.compile(rf"</(?:{_WORD})?")
"""What may still grow into a CLOSING (of a FORMATTING element), held back the same way."""

VOID = frozenset("area base br col embed hr img input link meta source track wbr".split())
"""HTML's void elements never have a closing tag, so `<br>` opens no pair: it is markup, and waiting
for its `</br>` would only hold the text after it back (models put `<br>` in table cells)."""

FORMATTING = frozenset("b big code del em i ins kbd mark s small span strike strong sub sup u".split())
"""HTML's inline formatting elements. Models write `<b>Важно:</b>` for emphasis as they write
`**Важно:**`: the words are the reply's, and a command would hide them (and history refuse
them) as if the model had asked for something. So their markup goes, opening or closing, paired or
not, and their text stays, in the display and in speech alike. The one-letter command names of
DEFAULT_TAGS (`a`, `p`, ...) are not here, and a configured name is a command whatever it is."""


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


# --- finding the tags of a reply ----------------------------------------------------------

@dataclass(frozen=True)
class Tag:
    """A tag met in a reply."""

    name: str       # the configured spelling, or the name in lowercase
    body: str       # the text between the opening and the closing tag, stripped
    shown: int      # where it stood in the display text
    closed: bool = True
    """False when the reply ended inside it (a configured tag only): history refuses it as unclosed."""
    oversize: bool = False
    """True when it did not close within the lookahead (a configured tag only): `body` is only the
    start that fitted, the rest was discarded unread, and history refuses it as too long."""


_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
_THINK_OPEN_RE, _THINK_CLOSE_RE = (re.compile(re.escape(pattern), re.I) for pattern in (_THINK_OPEN, _THINK_CLOSE))
FENCE_OPEN = re.compile(r"[ \t]{0,3}(`{3,}|~{3,})")
"""A line opening a fenced code block; its group is the fence."""
_FENCE_CLOSE = re.compile(r"[ \t]{0,3}(`{3,}|~{3,})[ \t]*")
_CODE_PIECE = re.compile(r"\n|`+|[^`\n]+")
_FENCE_REACH = 64   # how much of a line a fence line is judged on


def closes_fence(line: str, fence: str) -> bool:
    """Whether `line` closes the code block `fence` opened: the same character, at least as many."""
    close = _FENCE_CLOSE.fullmatch(line)
    return close is not None and close.group(1)[0] == fence[0] and len(close.group(1)) >= len(fence)


class TagStripper:
    """Removes tags, formatting markup and `<think>` blocks from a reply as it streams, and reports the tags.

    What it releases never depends on how the reply was split into pieces: a piece that could
    still become a tag is held, from its '<', until it can be told, and a tag's body for at most
    `lookahead` characters from its '<', so the display never waits long on a stray '<' and what
    is held stays bounded. Past that, an oversize configured tag's body is discarded as it comes,
    as a `<think>` block's is. History pushes a whole reply at once with `at_end`.

    Each push costs time linear in the text it walks: each '<' is judged once its window has
    come (at most `lookahead` characters scanned for its closing tag), and a discarded body is
    searched once for its closing tag."""

    def __init__(self, configured: tuple[str, ...], lookahead: int) -> None:
        strays = (*(closing for tag in configured for closing in closers(tag)), _THINK_CLOSE)
        self._configured = configured
        self._opening = _any_of(f"<{tag}>" for tag in configured)   # group i + 1 opens configured[i]
        self._stray = _any_of(strays)
        self._patterns = tuple(pattern.lower() for pattern in (*(f"<{tag}>" for tag in configured), *strays,
                                                               _THINK_OPEN))
        self._longest = max(map(len, self._patterns))
        self._lookahead = lookahead
        self._code = _Code()
        self._pending = ""
        self._in_think = False
        self._oversize: Tag | None = None   # the oversize tag being discarded, as it will be reported
        self._shown = 0

    def push(self, text: str, at_end: bool) -> tuple[str, list[Tag]]:
        """Takes the next piece of the reply; returns the display text it can release now and the
        tags it completed. `at_end`: the reply ends with this piece, so nothing is held. The text is
        walked by position, not sliced per '<', so a whole reply costs time linear in its length."""
        pending, pos = self._pending + text, 0
        shown: list[str] = []
        found: list[Tag] = []
        while pos < len(pending):
            if self._in_think:
                close = _THINK_CLOSE_RE.search(pending, pos)
                if not close:
                    pos = len(pending) - (0 if at_end else held_back(pending[pos:], (_THINK_CLOSE,), fold_case=True))
                    break
                pos, self._in_think = close.end(), False
                continue
            if self._oversize:
                pos = self._discard(pending, pos, at_end, found)
                if self._oversize:
                    break
                continue
            lt = pending.find("<", pos)
            if lt != pos:
                end = len(pending) if lt < 0 else lt
                shown.append(self._release(pending[pos:end]))
                pos = end
                continue
            step = self._at_angle(pending, pos, at_end)
            if step is None:
                break
            used, tag = step
            if not used:
                shown.append(self._release("<"))
                pos += 1
                continue
            pos += used
            if tag:
                found.append(tag)
        if at_end and self._oversize:   # the reply ended inside it: still a command, never speech
            found.append(replace(self._oversize, closed=False))
            self._oversize = None
        self._pending = pending[pos:]
        return "".join(shown), found

    def _discard(self, pending: str, pos: int, at_end: bool, found: list[Tag]) -> int:
        """Inside an oversize tag: skips its body up to its closing tag, reporting it then; without
        one, skips all but what may be the start of its closing tag."""
        tag = self._oversize
        assert tag is not None
        close = closer(tag.name).search(pending, pos)
        if close:
            self._oversize = None
            found.append(tag)
            return close.end()
        return len(pending) - (0 if at_end else held_back(pending[pos:], _lowered(closers(tag.name)), fold_case=True))

    def _release(self, text: str) -> str:
        self._shown += len(text)
        self._code.feed(text)
        return text

    def _at_angle(self, pending: str, pos: int, at_end: bool) -> tuple[int, Tag | None] | None:
        """For the '<' at `pos`: (characters used, the tag they made); 0 used means the '<' is
        plain text; None means it cannot be told yet."""
        opening = self._opening.match(pending, pos)
        if opening:
            tag = self._configured[(opening.lastindex or 1) - 1]  # one group per configured name
            return self._pair(pending, pos, opening.end() - pos, tag, at_end, configured=True)
        think = _THINK_OPEN_RE.match(pending, pos)
        if think:
            self._in_think = True
            return think.end() - pos, None
        stray = self._stray.match(pending, pos)
        if stray:
            return stray.end() - pos, None
        if not self._code.inside:
            opening = OPENING.match(pending, pos)
            name = opening.group(1).lower() if opening else ""
            if opening and name in FORMATTING:
                return opening.end() - pos, None
            if opening and name not in VOID:
                return self._pair(pending, pos, opening.end() - pos, name, at_end, configured=False)
            closing = CLOSING.match(pending, pos)
            if closing and closing.group(1).lower() in FORMATTING:
                return closing.end() - pos, None
            if not at_end and (OPENING_START.fullmatch(pending, pos) or CLOSING_START.fullmatch(pending, pos)):
                return None
        rest = pending[pos:pos + self._longest]
        if not at_end and len(rest) < self._longest and any(p.startswith(rest.lower()) for p in self._patterns):
            return None
        return 0, None

    def _pair(self, pending: str, pos: int, used: int, name: str, at_end: bool,
              configured: bool) -> tuple[int, Tag | None] | None:
        """A tag opened by the `used` characters at `pos`: closed, or still open, or text."""
        window = pending[pos:pos + self._lookahead]
        close = closer(name).search(window, used)
        if close:
            return close.end(), Tag(name, window[used:close.start()].strip(), self._shown)
        if len(window) >= self._lookahead:
            if not configured:
                return 0, None   # a long <bogus>…</bogus> is text
            # a command, but too long to hold: its body is discarded from here on, up to where its
            # closing tag may have begun
            kept = len(window) - held_back(window, _lowered(closers(name)), fold_case=True)
            self._oversize = Tag(name, window[used:kept].strip(), self._shown, oversize=True)
            return kept, None
        if not at_end:
            return None
        if configured:  # the reply stopped inside a command: still a command, never speech
            return len(window), Tag(name, window[used:].strip(), self._shown, closed=False)
        return 0, None   # x<y>z: a lone opening is text


def _lowered(markers: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(marker.lower() for marker in markers)


def _any_of(patterns: Iterable[str]) -> re.Pattern[str]:
    """Any of the literal `patterns`, each its own group, case-insensitively (a regex, so no index
    shifts as `lower()` could: 'İ' lowercases to two characters)."""
    return re.compile("|".join(f"({re.escape(pattern)})" for pattern in patterns) or "(?!)", re.I)


class _Code:
    """Follows whether the display text so far ends inside code: a fenced block, or an inline
    `span` (which, kept simple, also ends at a line's end). Fences are judged on whole lines
    the way the chunker's speech cleaner judges them."""

    def __init__(self) -> None:
        self._line = ""         # the start of the current line
        self._fence = ""        # the fence of the open code block
        self._span = 0          # the backticks that opened an inline span; 0 outside one
        self._ticks = 0         # the backtick run the text ends with, not yet judged

    @property
    def inside(self) -> bool:
        return bool(self._fence) or bool(self._span_after_run())

    def feed(self, text: str) -> None:
        for piece in _CODE_PIECE.findall(text):
            if piece[0] == "`":
                self._ticks += len(piece)
            else:
                self._span, self._ticks = self._span_after_run(), 0
            if piece == "\n":
                self._end_line()
            elif len(self._line) < _FENCE_REACH:
                self._line += piece[:_FENCE_REACH]

    def _span_after_run(self) -> int:
        """A run of backticks opens a span, or closes the span a run as long opened."""
        if not self._ticks:
            return self._span
        if not self._span:
            return self._ticks
        return 0 if self._ticks == self._span else self._span

    def _end_line(self) -> None:
        line, self._line, self._span = self._line, "", 0
        if self._fence:
            if len(line) < _FENCE_REACH and closes_fence(line, self._fence):
                self._fence = ""
        elif opening := FENCE_OPEN.match(line):
            self._fence = opening.group(1)


def held_back(text: str, markers: Iterable[str], fold_case: bool = False) -> int:
    """How many characters at the end of streamed `text` must wait for the next piece: the longest end
    that is the start of one of `markers` but not yet all of it. The one helper for every stream that
    looks for a marker split across pieces: a closing `</think>` here, `<think>` tags in the llm stage
    (llm/think.py), and its guards' stop strings and user-turn prefixes (llm/guards.py). With
    `fold_case`, the markers are lowercase and the text matches them in any case."""
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), longest, -1):
            end = text[-size:]
            if marker.startswith(end.lower() if fold_case else end):
                longest = size
                break
    return longest


# --- commands in words --------------------------------------------------------------------

_MEANINGS = {"c": "command", "a": "animation", "m": "movement", "f": "face effect", "v": "effect",
             "music": "music", "hint": "hint", "clothes": "clothes", "interaction": "interaction"}
"""What the default allowlist's one-letter tags stand for (voxpipe.stages.history.commands)."""
_VARIABLES = ("attitude", "boredom", "stress")


def describe(name: str, args: tuple[str, ...]) -> str:
    """An accepted command in words a person reads at a glance, for front-ends: `<p>1,0,-1</p>`
    is "attitude +1, boredom 0, stress −1", not "p 1 0 -1". A tag the default allowlist does
    not know, or one a commands file reshaped, is shown as written: "command: name arg arg"."""
    name = name.lower()
    numbers = [number for number in map(_integer, args) if number is not None]
    if name == "p" and len(args) == len(numbers) == len(_VARIABLES):
        return ", ".join(f"{variable} {_signed(number)}" for variable, number in zip(_VARIABLES, numbers, strict=True))
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
