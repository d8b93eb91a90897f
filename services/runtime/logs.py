"""Logging for every voxpipe process: one format, lines safe for a terminal, and floods cut short.

Every process (`voxpipe run`, each stage it starts, the front-end commands) configures logging
through `configure`, called once by `voxpipe.cli.main`.

Bad input must not become a flood of log lines: 100k garbage frames once wrote 237k lines (36 MB)
in a second, which fills a disk or a journal and buries everything else. So warnings and errors
are rate-limited per (logger, code): `BURST` of them per `WINDOW_S`, then they are only counted,
and one line says how many were left out when the window closes (or, at the latest, when the
process exits). The counters (`Connection.report`, the heartbeat's `errors` and `invalid`) still
count every one; only the log is thinned. Info and debug lines are never held back.

A log line also quotes untrusted text (a rejected topic, a provider's error, a refused command's
reason), and `voxpipe run` writes its log to a terminal: control characters are written out
(`voxpipe.frontends.terminal.printable`), so a log line cannot drive the terminal either.
"""

from __future__ import annotations

import atexit
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..frontends.terminal import printable
from ..protocol import ErrorCode

FORMAT = "%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s"
WINDOW_S = 10.0
"""How long one rate-limit window of a (logger, code) lasts."""
BURST = 5
"""Lines of one (logger, code) let through per window: enough to see what is wrong, and its variety."""


@dataclass(frozen=True)
class Summary:
    """The one line that stands for the warnings a window left out."""

    logger: str
    code: str
    level: int
    count: int
    seconds: float

    @property
    def text(self) -> str:
        return f"suppressed {self.count} similar warnings of {self.code} in the last {self.seconds:.0f} s"


@dataclass
class _Window:
    start: float
    level: int
    passed: int = 1
    suppressed: int = 0


class RepeatLimiter:
    """The rate limit itself, a pure core: no logging, no threads; the clock is passed in.

    Not thread-safe: `RepeatFilter` serialises the calls. A window opens with the first line of
    its (logger, code) and is forgotten once it has closed and been summarised, so the state
    holds only what was logged in the last `window` seconds.
    """

    def __init__(self, window: float = WINDOW_S, burst: int = BURST,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self.burst = burst
        self.clock = clock
        self._windows: dict[tuple[str, str], _Window] = {}

    def admit(self, logger: str, code: str, level: int) -> tuple[bool, list[Summary]]:
        """Whether this line may be written, and the summaries of windows that have closed since
        (say them first, so the log reads in order)."""
        now = self.clock()
        summaries = self.closed()
        window = self._windows.get((logger, code))
        if window is None:
            self._windows[(logger, code)] = _Window(now, level)
            return True, summaries
        if window.passed < self.burst:
            window.passed += 1
            return True, summaries
        window.suppressed += 1
        window.level = max(window.level, level)
        return False, summaries

    def closed(self) -> list[Summary]:
        """The summaries of the windows that have run out, which are then forgotten."""
        now = self.clock()
        return self._take([key for key, window in self._windows.items() if now - window.start >= self.window])

    def pending(self) -> list[Summary]:
        """The summaries of every window, closed or not (at exit), which are then forgotten."""
        return self._take(list(self._windows))

    def next_close(self) -> float | None:
        """When the earliest window that left something out closes (clock time), or None."""
        ends = [window.start + self.window for window in self._windows.values() if window.suppressed]
        return min(ends, default=None)

    def _take(self, keys: list[tuple[str, str]]) -> list[Summary]:
        now = self.clock()
        summaries = []
        for key in keys:
            window = self._windows.pop(key)
            if window.suppressed:
                summaries.append(Summary(key[0], key[1], window.level, window.suppressed,
                                         min(now - window.start, self.window)))
        return summaries


def code_of(record: logging.LogRecord) -> str:
    """What makes two lines "the same warning": the protocol error code among the arguments
    (`Connection.report` logs `"%s: %s", code, text`), else the message template."""
    if isinstance(record.args, tuple):
        for arg in record.args:
            if isinstance(arg, ErrorCode):
                return arg.value
    return repr(str(record.msg))


class RepeatFilter(logging.Filter):
    """The shell around `RepeatLimiter` on a log handler: holds back lines over the limit, and
    writes each summary as a line of its own, from the logger that was thinned.

    A window that closes while its logger is quiet is summarised by a timer (a daemon thread that
    exists only while something is held back); `flush` at exit says the rest.
    """

    def __init__(self, limiter: RepeatLimiter) -> None:
        super().__init__()
        self.limiter = limiter
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or getattr(record, "voxpipe_summary", False):
            return True
        with self._lock:
            admitted, summaries = self.limiter.admit(record.name, code_of(record), record.levelno)
            if not admitted:
                self._schedule()
        self._say(summaries)
        return admitted

    def flush(self) -> None:
        """Say every window's summary now, closed or not (at exit)."""
        with self._lock:
            summaries = self.limiter.pending()
        self._say(summaries)

    def _schedule(self) -> None:
        """Start the timer for the earliest window to close, unless one is running (lock held)."""
        due = self.limiter.next_close()
        if self._timer is None and due is not None:
            self._timer = threading.Timer(max(0.0, due - self.limiter.clock()), self._tick)
            self._timer.daemon = True
            self._timer.start()

    def _tick(self) -> None:
        with self._lock:
            self._timer = None
            summaries = self.limiter.closed()
            self._schedule()
        self._say(summaries)

    @staticmethod
    def _say(summaries: list[Summary]) -> None:
        for summary in summaries:
            logger = logging.getLogger(summary.logger)
            logger.handle(logger.makeRecord(summary.logger, summary.level, "", 0, summary.text, (), None,
                                            extra={"voxpipe_summary": True}))


class PrintableFormatter(logging.Formatter):
    """The usual format, with control characters written out (newlines kept, for tracebacks)."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


def configure(level: str) -> None:
    """Log to stderr at `level` (the config's log.level), rate-limited and terminal-safe.

    Like `logging.basicConfig`, nothing changes when the root logger already has a handler (an
    embedding program, or pytest, decides where lines go)."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(PrintableFormatter(FORMAT))
    limit = RepeatFilter(RepeatLimiter())
    handler.addFilter(limit)
    root.addHandler(handler)
    root.setLevel(level.upper())
    atexit.register(limit.flush)  # before logging's own shutdown, which was registered first
