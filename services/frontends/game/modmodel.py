"""The mod's own model of how long a line stays on screen: a port of its C# text splitting and timing.

The link paces phrases by when the mod will be done with each one (design §2.4), and the test double
of the mod shows lines the same way, so both take the mod's rules from here rather than guess them.
Ported from the v0.011 mod (commit fd26ab7, fact ids of docs/design/game-link.md), quirks included:
the point is to predict what the game does, not to split text well.

C# semantics kept on purpose: `string.Length` counts UTF-16 code units (an emoji is 2), `Trim()` and
`IsNullOrWhiteSpace` use `Char.IsWhiteSpace` (which, unlike Python's `str.isspace`, excludes
U+001C..U+001F), and `int / int` is an integer division. .NET and Python regular expressions agree on
the patterns used here (lazy `.*?`, `.` not matching `\\n`, `[^>]` matching it).
"""

from __future__ import annotations

import re

MAX_PART = 70
"""`SplitText(modifiedResponse, maxLength: 70)` (DLG:121)."""
SYMBOLS_PER_SECOND = 15
MIN_PART_S = 0.5
MAX_PART_S = 8.0
DELAY_MODIFIER = 1.05
"""DLG:21-24: a part shows for clamp(len / 15, 0.5, 8) seconds, then waits that times 1.05 (DLG:259)."""

_CS_WHITESPACE = ("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
                  "\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
"""`Char.IsWhiteSpace`: Python's whitespace minus U+001C..U+001F, which .NET does not count."""

_TAG_BLOCK = re.compile(r"<.*?>.*?</.*?>")
"""SplitText's "service parts" (DLG:361), swapped for placeholders while the text is split."""
_TAG_PAIR = re.compile(r"<[^>]+>.*?</[^>]+>")
_TAG = re.compile(r"<[^>]+>")
"""CleanFromTags (UT:40-41): tag pairs with their content first, then any lone tag."""
_MOVEMENT = re.compile(r"<m>.*?</m>")
"""MitaMovement.FindMovementStyle (MitaMovement.cs:49) removes these before the text is split (DLG:97)."""
_SENTENCE_END = re.compile(r"[.!?]")


def _cs_len(text: str) -> int:
    """C# `string.Length`: UTF-16 code units, so a character outside the BMP counts twice."""
    return len(text) + sum(1 for char in text if ord(char) > 0xFFFF)


def _cs_trim(text: str) -> str:
    return text.strip(_CS_WHITESPACE)


def split_text(text: str, max_len: int = MAX_PART) -> list[str]:
    """DialogueControl.SplitText (DLG:355-418), line for line, quirks included (V9).

    - Tag blocks `<x>…</x>` become `@@k@@` placeholders first, so the length test counts 5 characters
      for each, whatever the tag holds; they are put back at the end.
    - Lines (split on `\\n`, empty ones dropped, whitespace-only ones kept) of at most `max_len` are
      kept trimmed, so a whitespace-only line gives an empty part.
    - A longer line is cut at every `.`, `!`, `?` (empty pieces dropped, whitespace-only ones kept,
      which gives "." parts); the trimmed pieces are joined with spaces into parts, each piece
      ending in "." (so "!" and "?" become "."), while `len + piece + 1 <= max_len` (the joining
      space is not counted, so a part can reach max_len + 1); a piece that does not fit starts the
      next part however long it is.
    """
    placeholders: dict[str, str] = {}

    def swap(match: re.Match[str]) -> str:
        placeholder = f"@@{len(placeholders)}@@"
        placeholders[placeholder] = match.group(0)
        return placeholder

    processed = _TAG_BLOCK.sub(swap, text)
    parts: list[str] = []
    for line in processed.split("\n"):
        if not line:
            continue
        if _cs_len(line) <= max_len:
            parts.append(_cs_trim(line))
            continue
        current = ""
        for sentence in _SENTENCE_END.split(line):
            if not sentence:
                continue
            trimmed = _cs_trim(sentence)
            if _cs_len(current) + _cs_len(trimmed) + 1 <= max_len:
                current += (" " if current else "") + trimmed + "."
            else:
                if _cs_trim(current):
                    parts.append(_cs_trim(current))
                current = trimmed + "."
        if _cs_trim(current):
            parts.append(_cs_trim(current))
    for index, part in enumerate(parts):
        for placeholder, original in placeholders.items():
            part = part.replace(placeholder, original)
        parts[index] = part
    return parts


def clean_from_tags(text: str) -> str:
    """Utils.CleanFromTags (UT:38-44): what of a part is text the player reads."""
    return _TAG.sub("", _TAG_PAIR.sub("", text))


def part_seconds(part: str) -> float:
    """How long the mod spends on one part: clamp(len // 15, 0.5, 8) × 1.05 (V10, DLG:136 and DLG:259).

    `partCleaned.Length / simbolsPerSecond` is int / int in C#, so 29 characters give 1 s, not 1.93 s.
    """
    seconds = _cs_len(clean_from_tags(part)) // SYMBOLS_PER_SECOND
    return min(max(seconds, MIN_PART_S), MAX_PART_S) * DELAY_MODIFIER


def display_parts(response: str) -> list[str]:
    """The parts the mod shows for a reply's `response`: `<m>` blocks removed (DLG:97), then SplitText."""
    return split_text(_MOVEMENT.sub("", response))


def text_seconds(response: str) -> float:
    """How long the mod's line for `response` keeps `dialogActive` (its text, not its voice: V11)."""
    return sum(part_seconds(part) for part in display_parts(response))
