"""`voxpipe chunk`: the chunker core over JSON lines, for offline runs and outside tools.

The protocol is fixed, because outside tools drive it:
- `{"ready": true}` is printed once, before the first line is read;
- each input line is `{"delta": "...", "t": seconds}` (`t` optional); `{"end": true}` ends
  the current reply, whose chunks are printed, then `{"end": true}`; the next delta starts
  a new reply. EOF ends the last reply the same way. Blank lines are skipped;
- each chunk is printed as `{"text", "index", "final", "marks"}` as soon as it is decided.

Time: there is no clock. Stall flushes happen only when lines carry `t`, checked when
each line arrives; without `t` the same lines always give the same chunks, so runs reproduce.
Where a line's delta ends counts as a delta's end (chunker.first_at_delta_end, on by default:
the first chunk may end there); with it off, the chunks depend on the text alone.
A bad line stops the run with exit code 2 and one message naming the line; every chunk
decided before it has already been printed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from ...protocol import Chunk
from .core import Chunker, ChunkerPolicy

USAGE_ERROR = 2
_KEYS = ("delta", "end", "t")


class BadLine(ValueError):
    """An input line that does not follow the protocol."""


@dataclasses.dataclass(frozen=True)
class Line:
    delta: str
    end: bool
    t: float | None


def run(stdin: TextIO, stdout: TextIO, policy: ChunkerPolicy, stderr: TextIO | None = None) -> int:
    """Runs the protocol until EOF; returns the exit code."""
    replies = _Replies(policy, stdout)
    replies.write({"ready": True})
    last_t = None
    for number, text in enumerate(stdin, 1):
        if not text.strip():
            continue
        try:
            line = parse_line(text, last_t)
        except BadLine as error:
            print(f"voxpipe chunk: line {number}: {error}", file=stderr or sys.stderr, flush=True)
            return USAGE_ERROR
        last_t = line.t if line.t is not None else last_t
        replies.handle(line)
    replies.end_open_reply()
    return 0


def parse_line(text: str, last_t: float | None) -> Line:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise BadLine(f'expected a JSON object such as {{"delta": "text"}}, '
                      f'got invalid JSON ({error.msg})') from None
    if not isinstance(data, dict):
        raise BadLine(f'expected a JSON object such as {{"delta": "text"}}, got {type(data).__name__}')
    unknown = [key for key in data if key not in _KEYS]
    if unknown:
        raise BadLine(f"unknown key {unknown[0]!r}; allowed keys: {', '.join(_KEYS)}")
    if not isinstance(data.get("delta", ""), str):
        raise BadLine(f'"delta" must be a string, got {data["delta"]!r}')
    if data.get("end", True) is not True:
        raise BadLine(f'"end" must be true, got {data["end"]!r}')
    if "delta" not in data and "end" not in data:
        raise BadLine('expected "delta" (a string) or "end": true')
    return Line(data.get("delta", ""), "end" in data, _time(data.get("t"), last_t))


def _time(value: Any, last_t: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadLine(f'"t" must be a number of seconds, got {value!r}')
    if last_t is not None and value < last_t:
        raise BadLine(f'"t" must not go back in time: {value} after {last_t}')
    return float(value)


class _Replies:
    """The reply being split, and the output it goes to."""

    def __init__(self, policy: ChunkerPolicy, stdout: TextIO) -> None:
        self._policy = policy
        self._stdout = stdout
        self._chunker: Chunker | None = None
        self._now = 0.0

    def handle(self, line: Line) -> None:
        if line.t is not None:
            self._now = line.t
            if self._chunker:
                self._write_chunks(self._chunker.tick(self._now).chunks)
        if line.delta or not line.end:
            self._write_chunks(self._open().feed(line.delta, self._now).chunks)
        if line.end:
            self._end(self._open())

    def end_open_reply(self) -> None:
        if self._chunker:
            self._end(self._chunker)

    def write(self, data: dict[str, Any]) -> None:
        self._stdout.write(json.dumps(data, ensure_ascii=False) + "\n")
        self._stdout.flush()

    def _open(self) -> Chunker:
        if self._chunker is None:
            self._chunker = Chunker(self._policy)
        return self._chunker

    def _end(self, chunker: Chunker) -> None:
        self._write_chunks(chunker.finish(self._now).chunks)
        self._chunker = None
        self.write({"end": True})

    def _write_chunks(self, chunks: Iterable[Chunk]) -> None:
        for chunk in chunks:
            self.write(chunk.to_wire())
