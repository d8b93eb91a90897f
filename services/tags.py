"""The tag grammar, shared by the chunker (never show or speak a tag) and history (judge each tag).

Both run one `TagStripper` over a reply, the chunker as the reply streams and history over the
whole reply, so they agree on every tag by construction: history reports and refuses only what
the chunker hid, and the chunker hides only what history reports.

At a '<' of the reply, outside a `<think>` block:
- A configured name (`chunker.tags`) opens a tag anywhere, even in code: `<e>smile</e>`. A reply
  that ends inside one ends the tag, unclosed; a stray configured closing tag is dropped.
- Outside code (a fenced block, or an inline `span`):
  - a FORMATTING element, opening or closing, paired or not, is markup: the markup is dropped and
    its text stays, so `<b>Важно:</b> завтра` shows and speaks "Важно: завтра";
  - any other `<name>` but a VOID element opens a tag if its closing tag ends within `lookahead`
    characters of the '<': `<bogus>x</bogus>` is neither shown nor spoken, and history refuses it
    visibly.
- Everything else is text: `a < b`, `x<y>z`, `<3`, `<br>`, `<br/>`, `<b class="x">`, and a pair
  longer than the lookahead.

Memory tags carry an operator before the name and close without it, as the companion app writes
them: `<+memory>high|text</memory>`. Names match case-insensitively; a tag is reported by its
configured spelling, or else by its name in lowercase.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

DEFAULT_TAGS = ("e", "c", "a", "m", "f", "v", "p", "music", "hint", "clothes", "interaction",
                "+memory", "#memory", "-memory")
LOOKAHEAD = 500
"""How far past its '<' a tag must close (`chunker.tag_lookahead`): long memory tags fit, and a '<'
that never becomes a tag is still released, as text, after 500 characters."""
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


_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
_THINK_CLOSE_RE = re.compile(re.escape(_THINK_CLOSE), re.I)
FENCE_OPEN = re.compile(r"[ \t]{0,3}(`{3,}|~{3,})")
"""A line opening a fenced code block; its group is the fence."""
_FENCE_CLOSE = re.compile(r"[ \t]{0,3}(`{3,}|~{3,})[ \t]*")
_CODE_PIECE = re.compile(r"\n|`+|[^`\n]+")
_FENCE_REACH = 64   # how much of a line a fence line is judged on


def closes_fence(line: str, fence: str) -> bool:
    """Whether `line` closes the code block `fence` opened: the same character, at least as many."""
    close = _FENCE_CLOSE.fullmatch(line)
    return bool(close) and close.group(1)[0] == fence[0] and len(close.group(1)) >= len(fence)


class TagStripper:
    """Removes tags, formatting markup and `<think>` blocks from a reply as it streams, and reports the tags.

    What it releases never depends on how the reply was split into pieces: a piece that could
    still become a tag is held, from its '<', until it can be told, and a tag's body for at most
    `lookahead` characters from its '<', so the display never waits long on a stray '<'. History
    pushes a whole reply at once with `at_end`."""

    def __init__(self, configured: tuple[str, ...], lookahead: int) -> None:
        self._opening = {f"<{tag.lower()}>": tag for tag in configured}
        self._stray = (*{closing.lower() for tag in configured for closing in closers(tag)}, _THINK_CLOSE)
        self._patterns = (*self._opening, *self._stray, _THINK_OPEN)
        self._longest = max(map(len, self._patterns))
        self._lookahead = lookahead
        self._code = _Code()
        self._pending = ""
        self._in_think = False
        self._shown = 0

    def push(self, text: str, at_end: bool) -> tuple[str, list[Tag]]:
        """Takes the next piece of the reply; returns the display text it can release now and the
        tags it completed. `at_end`: the reply ends with this piece, so nothing is held."""
        self._pending += text
        shown: list[str] = []
        found: list[Tag] = []
        while self._pending:
            if self._in_think:
                if not self._skip_think(at_end):
                    break
                continue
            lt = self._pending.find("<")
            if lt != 0:
                shown.append(self._release(len(self._pending) if lt < 0 else lt))
                continue
            step = self._at_angle(at_end)
            if step is None:
                break
            used, tag = step
            if not used:
                shown.append(self._release(1))
                continue
            self._pending = self._pending[used:]
            if tag:
                found.append(tag)
        return "".join(shown), found

    def _release(self, count: int) -> str:
        text, self._pending = self._pending[:count], self._pending[count:]
        self._shown += count
        self._code.feed(text)
        return text

    def _at_angle(self, at_end: bool) -> tuple[int, Tag | None] | None:
        """For the '<' opening the pending text: (characters used, the tag they made); 0 used means
        the '<' is plain text; None means it cannot be told yet."""
        pending = self._pending
        for opening, tag in self._opening.items():
            if _starts_with(pending, opening):
                return self._pair(len(opening), tag, at_end, configured=True)
        if _starts_with(pending, _THINK_OPEN):
            self._in_think = True
            return len(_THINK_OPEN), None
        for closing in self._stray:
            if _starts_with(pending, closing):
                return len(closing), None
        if not self._code.inside:
            opening = OPENING.match(pending)
            name = opening.group(1).lower() if opening else ""
            if name in FORMATTING:
                return opening.end(), None
            if opening and name not in VOID:
                return self._pair(opening.end(), name, at_end, configured=False)
            closing = CLOSING.match(pending)
            if closing and closing.group(1).lower() in FORMATTING:
                return closing.end(), None
            if not at_end and (OPENING_START.fullmatch(pending) or CLOSING_START.fullmatch(pending)):
                return None
        if not at_end and len(pending) < self._longest and any(p.startswith(pending.lower()) for p in self._patterns):
            return None
        return 0, None

    def _pair(self, used: int, name: str, at_end: bool, configured: bool) -> tuple[int, Tag | None] | None:
        """A tag opened by the first `used` pending characters: closed, or still open, or text."""
        window = self._pending[:self._lookahead]
        close = closer(name).search(window, used)
        if close:
            return close.end(), Tag(name, window[used:close.start()].strip(), self._shown)
        if len(self._pending) >= self._lookahead:
            return 0, None
        if not at_end:
            return None
        if configured:  # the reply stopped inside a command: still a command, never speech
            return len(self._pending), Tag(name, self._pending[used:].strip(), self._shown, closed=False)
        return 0, None   # x<y>z: a lone opening is text

    def _skip_think(self, at_end: bool) -> bool:
        close = _THINK_CLOSE_RE.search(self._pending)
        if close:
            self._pending = self._pending[close.end():]
            self._in_think = False
            return True
        keep = 0 if at_end else _partial_suffix(self._pending, _THINK_CLOSE)
        self._pending = self._pending[len(self._pending) - keep:]
        return False


def _starts_with(text: str, pattern: str) -> bool:
    """Whether `text` starts with the lowercase `pattern`, in any case; the comparison is of equal
    lengths, so a character that lowercases to two ('İ') shifts nothing."""
    return text[:len(pattern)].lower() == pattern


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


def _partial_suffix(text: str, pattern: str) -> int:
    """Length of the longest end of `text` that could be the start of `pattern`."""
    for size in range(min(len(pattern) - 1, len(text)), 0, -1):
        if text[-size:].lower() == pattern[:size]:
            return size
    return 0


# --- commands in words --------------------------------------------------------------------

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
