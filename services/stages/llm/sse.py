"""Incremental Server-Sent Events and NDJSON parsing, with no I/O so every edge is tested in-process.

Feed the body in whatever pieces the network delivers (bytes or text); whole events
or lines come out.  The SSE rules are the WHATWG ones: lines end at CRLF, LF or CR,
`:` starts a comment (keep-alive), `data:` lines of one event join with "\\n", a
blank line dispatches.  Unlike a browser, `flush()` at EOF also dispatches a last
event that lacks its blank line, because some servers end their stream that way.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

_LINE_END = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True)
class Event:
    data: str
    event: str = "message"
    id: str = ""


class LineSplitter:
    """Splits a stream into lines, whatever the piece boundaries (even inside CRLF or a UTF-8 character)."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8-sig")("replace")
        self._pending = ""
        self._after_cr = False

    def feed(self, piece: bytes | str) -> list[str]:
        text = self._decoder.decode(piece) if isinstance(piece, bytes) else piece
        if not text:
            return []
        if self._after_cr and text[0] == "\n":  # the LF of a CRLF cut between pieces
            text = text[1:]
        self._after_cr = text.endswith("\r")
        lines = _LINE_END.split(self._pending + text)
        self._pending = lines.pop()
        return lines

    def flush(self) -> list[str]:
        """At EOF: the last line, even without its line ending."""
        last = self._pending + self._decoder.decode(b"", final=True)
        self._pending, self._after_cr = "", False
        return [last] if last else []


class SSEParser:
    """Turns SSE lines into events; `id` is the last event id seen, as the spec keeps it."""

    def __init__(self) -> None:
        self._lines = LineSplitter()
        self._data: list[str] = []
        self._event = ""
        self._id = ""

    def feed(self, piece: bytes | str) -> list[Event]:
        return self._dispatch(self._lines.feed(piece))

    def flush(self) -> list[Event]:
        """At EOF: dispatch the event still being built, as if its blank line had come."""
        return self._dispatch([*self._lines.flush(), ""])

    def _dispatch(self, lines: list[str]) -> list[Event]:
        events = []
        for line in lines:
            if not line:
                if self._data:
                    events.append(Event("\n".join(self._data), self._event or "message", self._id))
                self._data, self._event = [], ""
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                self._field(name, value[1:] if value.startswith(" ") else value)
        return events

    def _field(self, name: str, value: str) -> None:
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value


def events(pieces: Iterable[bytes | str]) -> Iterator[Event]:
    """The SSE events of a body, yielded as soon as each one is complete."""
    parser = SSEParser()
    for piece in pieces:
        yield from parser.feed(piece)
    yield from parser.flush()


def lines(pieces: Iterable[bytes | str]) -> Iterator[str]:
    """The non-blank lines of an NDJSON body, yielded as soon as each one is complete."""
    splitter = LineSplitter()
    for piece in pieces:
        yield from filter(str.strip, splitter.feed(piece))
    yield from filter(str.strip, splitter.flush())
