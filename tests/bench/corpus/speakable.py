"""The reference speakable text of a corpus reply, computed without voxpipe.

`speak(raw)` is what a perfect chunker would say for a reply: the rules of issue 4
("never spoken, and never lost"), applied in one non-streaming pass with plain regular
expressions. It is deliberately independent of `services/chunker`, so that the benchmark
can check voxpipe against it, and feed the same cleaned text to stream2sentence.

Removed, in this order of precedence at each position:
- `<think>...</think>` blocks (an unclosed one runs to the end);
- command tags with their bodies, `<e>smile</e>`, `<+memory>...</+memory>` (names in TAGS),
  and stray closing tags;
- fenced code blocks (``` or ~~~ to the matching fence, or to the end): a line break;
- markdown links `[text](url)`: the text stays, `[`, `](url)` go;
- HTML tags without attributes (`<b>`, `</i>`; `<br>` becomes a line break);
- at a line start: heading `#`s, quote `>`s, bullets `-`, `*`, `+`, `•`; rules `---`, `***`,
  and table rules `|---|---|`;
- markup runs `*`, `_`, `` ` ``, `~~`, `|`: a space where they stood between two letters
  or digits (`snake_case` -> `snake case`), else nothing;
- emoji (as the `emoji` package knows them), with their variation selectors and joiners.
Kept verbatim: bare URLs (`https://...`, `www....`) and e-mail addresses, numbered list
markers (`1.`), dialogue dashes, every other character.

Besides the text, `clean()` returns where it cut things out, so a benchmark can map
positions between the raw reply and the speakable text, and tell which removed pieces
(tag bodies, reasoning, code, link URLs) must never be heard.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import emoji

TAGS = ("e", "c", "a", "m", "f", "v", "p", "music", "hint", "clothes", "interaction",
        "+memory", "#memory", "-memory")
"""The command tags of the product (the brief's `<e>`, `<c>`, `<p>`, memory tags...)."""

_NAMES = "|".join(re.escape(tag) for tag in sorted(TAGS, key=len, reverse=True))
_THINK = re.compile(r"<think>.*?(?:</think>|\Z)", re.I | re.S)
_COMMAND = re.compile(rf"<({_NAMES})>(.*?)(?:</\1>|\Z)", re.I | re.S)
_STRAY = re.compile(rf"</(?:{_NAMES}|think)>", re.I)
_FENCE = re.compile(r"[ \t]{0,3}(`{3,}|~{3,})[^\n]*(?:\n|\Z)")
_LINK = re.compile(r"!?\[([^\]\n]*)\]\(([^)\n]*)\)")
_HTML = re.compile(r"</?[A-Za-z][\w-]{0,30}[ \t]{0,3}/?>")
_RULE = re.compile(r"[ \t]*([-*_=])(?:[ \t]*\1){2,}[ \t]*(?=\n|\Z)")
_TABLE_RULE = re.compile(r"[ \t]*\|?(?:[ \t]*:?-{3,}:?[ \t]*\|)+(?:[ \t]*:?-{3,}:?[ \t]*)?(?=\n|\Z)")
_LINE_MARKERS = re.compile(r"[ \t]*(?:#{1,6}[ \t]+|(?:>[ \t]?)+|[-*+•][ \t]+)")
_MARKUP = re.compile(r"\*+|_+|`+|~~+|\|")
_BARE = re.compile(r"(?:https?://|www\.)[^\s<>\]\[()«»\"]+|[\w.+-]+@[\w-]+(?:\.[\w-]+)+", re.I)
_TRAILING = ".,;:!?…"


@dataclass(frozen=True)
class Edit:
    """Raw text [start, end) replaced by `text`; `removed` is what must never be heard."""

    start: int
    end: int
    text: str
    kind: str
    removed: str = ""


@dataclass(frozen=True)
class Cleaned:
    raw: str
    text: str
    edits: tuple[Edit, ...]
    positions: tuple[int, ...]
    """positions[i]: length of the speakable text once raw[:i] is known; an edit's
    replacement appears only when its last raw character is known."""
    junctions: frozenset[int]
    """Speakable-text offsets where something was cut out (a word gap even without a space)."""

    def removed(self) -> list[str]:
        """The removed contents a listener must never hear, whitespace-normalised."""
        return [" ".join(edit.removed.split()) for edit in self.edits if edit.removed.strip()]

    def markup_spans(self) -> list[tuple[int, int]]:
        """The raw spans that are not speech."""
        return [(edit.start, edit.end) for edit in self.edits]


def speak(raw: str) -> str:
    """The reference speakable text of a reply."""
    return clean(raw).text


def clean(raw: str) -> Cleaned:
    """The speakable text of a reply, with the edits that made it (see the module docstring)."""
    edits: list[Edit] = []
    scheduled: dict[int, Edit] = {}   # the `](url)` tail of a link whose text is being read
    i = 0
    line_start = True
    emoji_at = {item["match_start"]: item["match_end"] for item in emoji.emoji_list(raw)}
    while i < len(raw):
        edit = scheduled.pop(i, None) or _edit_at(raw, i, line_start, emoji_at, scheduled)
        if edit is None:
            bare = _BARE.match(raw, i) if (i == 0 or not raw[i - 1].isalnum()) else None
            end = (i + len(bare.group().rstrip(_TRAILING))) if bare else i + 1
            line_start = raw[end - 1] == "\n"
            i = end
            continue
        edits.append(edit)
        if edit.end > edit.start:
            line_start = (edit.text.endswith("\n") or raw[edit.end - 1] == "\n"
                          or (line_start and edit.kind == "line"))
        i = edit.end
    return _assemble(raw, edits)


def _edit_at(raw: str, i: int, line_start: bool, emoji_at: dict[int, int],
             scheduled: dict[int, Edit]) -> Edit | None:
    char = raw[i]
    if char == "<":
        for pattern, kind in ((_THINK, "think"), (_COMMAND, "tag"), (_STRAY, "tag"), (_HTML, "html")):
            found = pattern.match(raw, i)
            if found:
                removed = ""
                if pattern is _COMMAND:
                    removed = found.group(2)
                elif pattern is _THINK:
                    removed = found.group()[len("<think>"):].removesuffix("</think>")
                text = "\n" if kind == "html" and found.group().lower().startswith("<br") else ""
                return Edit(i, found.end(), text, kind, removed)
        return None
    if line_start:
        fence = _FENCE.match(raw, i)
        if fence:
            return _code_block(raw, i, fence)
        rule = _RULE.match(raw, i) or _TABLE_RULE.match(raw, i)
        if rule:
            return Edit(i, rule.end(), "", "line")
        markers = _LINE_MARKERS.match(raw, i)
        if markers and raw[i:markers.end()].strip():
            return Edit(i, markers.end(), "", "line")
    if char in "[!":
        link = _LINK.match(raw, i)
        if link:   # the text stays and is read on; `](url)` goes when it is reached
            scheduled[link.end(1)] = Edit(link.end(1), link.end(), "", "link", link.group(2))
            return Edit(i, link.start(1), "", "link")
        return None
    if char in "*_`~|":
        run = _MARKUP.match(raw, i)
        if run:
            before = raw[i - 1] if i else " "
            after = raw[run.end()] if run.end() < len(raw) else " "
            joint = " " if before.isalnum() and after.isalnum() else ""
            return Edit(i, run.end(), joint, "markup")
        return None
    if i in emoji_at:
        end = emoji_at[i]
        while end < len(raw) and raw[end] in "\ufe0f\u200d":
            end += 1
        return Edit(i, end, "", "emoji")
    if char in "\ufe0f\u200d":
        return Edit(i, i + 1, "", "emoji")
    return None


def _code_block(raw: str, start: int, fence: re.Match[str]) -> Edit:
    mark = fence.group(1)
    pos = fence.end()
    closing = re.compile(rf"[ \t]{{0,3}}{re.escape(mark[0])}{{{len(mark)},}}[ \t]*(?:\n|\Z)")
    while pos < len(raw):
        found = closing.match(raw, pos)
        if found:
            return Edit(start, found.end(), "\n", "code", raw[fence.end():pos])
        newline = raw.find("\n", pos)
        pos = len(raw) if newline < 0 else newline + 1
    return Edit(start, len(raw), "\n", "code", raw[fence.end():])


def _assemble(raw: str, edits: list[Edit]) -> Cleaned:
    parts: list[str] = []
    junctions = set()
    out = 0
    known = [0] * (len(raw) + 1)
    k = 0
    edit_at = {edit.start: n for n, edit in enumerate(edits)}
    while k <= len(raw):
        n = edit_at.get(k)
        if n is not None:
            edit = edits[n]
            junctions.add(out)
            parts.append(edit.text)
            for j in range(edit.start + 1, edit.end + 1):
                known[j] = out
            out += len(edit.text)
            known[edit.end] = out
            junctions.add(out)
            if edit.end > k:
                k = edit.end
                continue
            del edit_at[k]
            continue
        if k == len(raw):
            break
        parts.append(raw[k])
        out += 1
        known[k + 1] = out
        k += 1
    return Cleaned(raw, "".join(parts), tuple(edits), tuple(known), frozenset(junctions))
