"""Issue 14 item 12: a flood of bad frames must not become a flood of log lines.

The rate limit (`voxpipe.runtime.logs`) is a pure core with the clock passed in, tested here
line by line; then the attack itself on real processes: a real broker and a real chunker stage,
100k garbage frames from a PUB socket on the bus, and the stage's own stderr.
"""

from __future__ import annotations

import io
import logging
import re
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import connect, start_stage, stop_process, wait_ready
from voxpipe import protocol
from voxpipe.protocol import Chunk, ErrorCode, Heartbeat, LlmDone, Token
from voxpipe.runtime.logs import FORMAT, PrintableFormatter, RepeatFilter, RepeatLimiter, Summary, code_of

WARNING = logging.WARNING


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- the core ----------------------------------------------------------------------------------


def test_a_burst_passes_then_lines_are_counted_and_summarised_when_the_window_closes() -> None:
    clock = Clock()
    limiter = RepeatLimiter(window=10.0, burst=3, clock=clock)
    verdicts = [limiter.admit("voxpipe.chunker", "invalid_message", WARNING) for _ in range(1000)]
    assert [admitted for admitted, _ in verdicts] == [True] * 3 + [False] * 997
    assert all(summaries == [] for _, summaries in verdicts)
    clock.now += 9.9
    assert limiter.closed() == []                   # still open
    assert limiter.next_close() == 1010.0
    clock.now += 0.1
    assert limiter.closed() == [Summary("voxpipe.chunker", "invalid_message", WARNING, 997, 10.0)]
    assert limiter.closed() == [] and limiter.next_close() is None   # said once, then forgotten
    assert limiter.admit("voxpipe.chunker", "invalid_message", WARNING) == (True, [])  # a new window


def test_the_next_line_after_a_closed_window_comes_after_its_summary() -> None:
    clock = Clock()
    limiter = RepeatLimiter(window=10.0, burst=1, clock=clock)
    assert limiter.admit("a", "gap", WARNING) == (True, [])
    assert limiter.admit("a", "gap", logging.ERROR) == (False, [])
    clock.now += 25.0                               # nobody summarised it in between (no timer)
    admitted, summaries = limiter.admit("a", "gap", WARNING)
    assert admitted and summaries == [Summary("a", "gap", logging.ERROR, 1, 10.0)]  # the worst level left out
    assert Summary("a", "gap", WARNING, 1, 10.0).text == "suppressed 1 similar warnings of gap in the last 10 s"


def test_each_logger_and_code_has_its_own_window() -> None:
    clock = Clock()
    limiter = RepeatLimiter(window=10.0, burst=2, clock=clock)
    keys = [("voxpipe.llm", "gap"), ("voxpipe.llm", "internal"), ("voxpipe.tts", "gap")]
    for logger, code in keys * 5:
        limiter.admit(logger, code, WARNING)
    clock.now += 10.0
    assert sorted((s.logger, s.code, s.count) for s in limiter.closed()) == sorted((*key, 3) for key in keys)


def test_a_window_that_held_nothing_back_closes_silently() -> None:
    clock = Clock()
    limiter = RepeatLimiter(window=10.0, burst=5, clock=clock)
    for _ in range(5):
        assert limiter.admit("a", "gap", WARNING) == (True, [])
    assert limiter.next_close() is None             # nothing to say: no timer needed
    clock.now += 10.0
    assert limiter.closed() == [] and limiter.pending() == []


def test_pending_says_every_open_window_with_its_real_length() -> None:
    clock = Clock()
    limiter = RepeatLimiter(window=10.0, burst=1, clock=clock)
    for _ in range(4):
        limiter.admit("a", "gap", WARNING)
    clock.now += 2.5
    assert limiter.pending() == [Summary("a", "gap", WARNING, 3, 2.5)]
    assert limiter.pending() == []


def test_the_code_is_the_error_code_argument_else_the_template() -> None:
    def record(msg: str, *args: object) -> logging.LogRecord:
        return logging.LogRecord("voxpipe.x", WARNING, "", 0, msg, args, None)

    assert code_of(record("%s: %s", ErrorCode.INVALID_MESSAGE, "rejected")) == "invalid_message"
    assert code_of(record("%s: %s", ErrorCode.GAP, "lost 1..2")) == "gap"
    assert code_of(record("refused <%s>: %s", "e", "why")) == "'refused <%s>: %s'"
    assert code_of(record("no args at all")) == "'no args at all'"


# --- the filter on a real logging handler, in this process --------------------------------------


@pytest.fixture()
def log() -> Iterator[tuple[logging.Logger, io.StringIO, RepeatFilter, Clock]]:
    clock = Clock()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(PrintableFormatter("%(name)s %(levelname)s %(message)s"))
    limit = RepeatFilter(RepeatLimiter(window=10.0, burst=2, clock=clock))
    handler.addFilter(limit)
    logger = logging.getLogger("voxpipe.test-limit")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    yield logger, stream, limit, clock
    logger.removeHandler(handler)


def test_the_filter_thins_warnings_never_info_and_says_the_rest_at_exit(log) -> None:
    logger, stream, limit, _ = log
    for n in range(100):
        logger.warning("%s: %s", ErrorCode.INVALID_MESSAGE, f"rejected frame {n}")
        logger.info("request %d", n)
    limit.flush()                                   # what configure() registers for exit
    lines = stream.getvalue().splitlines()
    assert lines[:3] == ["voxpipe.test-limit WARNING invalid_message: rejected frame 0",
                         "voxpipe.test-limit INFO request 0",
                         "voxpipe.test-limit WARNING invalid_message: rejected frame 1"]
    assert sum(" INFO " in line for line in lines) == 100
    assert sum(" WARNING invalid_message: " in line for line in lines) == 2
    assert lines[-1] == "voxpipe.test-limit WARNING suppressed 98 similar warnings of invalid_message in the last 0 s"


def test_the_summary_precedes_the_next_line_let_through(log) -> None:
    logger, stream, _, clock = log
    for _ in range(5):
        logger.error("%s failed", "on_token")
    clock.now += 11.0
    logger.error("%s failed", "on_token")
    assert stream.getvalue().splitlines()[-2:] == [
        "voxpipe.test-limit ERROR suppressed 3 similar warnings of '%s failed' in the last 10 s",
        "voxpipe.test-limit ERROR on_token failed"]


def test_a_quiet_logger_is_summarised_when_its_window_closes() -> None:
    """The shell's timer: nothing else is logged, and the summary still comes (real clock)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RepeatFilter(RepeatLimiter(window=0.2, burst=1)))
    logger = logging.getLogger("voxpipe.test-timer")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        for _ in range(10):
            logger.warning("%s: %s", ErrorCode.GAP, "lost")
        deadline = time.monotonic() + 30            # only catches a hang
        while "suppressed" not in stream.getvalue() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue().splitlines()[-1].startswith("suppressed 9 similar warnings of gap in the last")


def test_log_lines_cannot_drive_the_terminal(log) -> None:
    logger, stream, _, _ = log
    logger.warning("refused <%s>: %s", "e", "\x1b]0;pwned\x07\x1b[2J\rNUL\x00")
    assert stream.getvalue() == "voxpipe.test-limit WARNING refused <e>: \\x1b]0;pwned\\x07\\x1b[2J\\x0dNUL\\x00\n"
    assert FORMAT.startswith("%(asctime)s")


# --- the attack, on real processes ---------------------------------------------------------------

FLOOD = 100_000
IN_FLIGHT = 200
"""Garbage frames sent and not yet rejected by the stage. The bus drops what overflows its
high-water marks rather than queue it without bound (item 11), so the flood is paced to stay well
below them: nearly every frame reaches the stage, and the stage's counter says how many did."""


class Lines(threading.Thread):
    """Reads a process's stderr as it comes (a full pipe would stall the process)."""

    def __init__(self, stream) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.lines: list[str] = []
        self.start()

    def run(self) -> None:
        for line in self.stream:
            self.lines.append(line)

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if found := re.search(pattern, line):
                    return found
            time.sleep(0.1)
        raise AssertionError(f"{pattern!r} not logged within {timeout} s:\n{''.join(self.lines[-50:])}")


def flood(runtime: Path, frame: bytes, count: int, src: str, timeout: float) -> None:
    """Send `frame` `count` times from a plain PUB on the bus (after its hello), as fast as `src`
    rejects them. Each rejection is an `error` event whose `seq` says how many there were so far
    (the stage's heartbeat counts them too, for the events this slow reader misses); what is still
    in flight after a second without any is taken as dropped by the bus."""
    sender = connect(runtime, "flood")
    acks = connect(runtime, "flood-acks", "error", "heartbeat")
    sent = rejected = dropped = 0
    deadline = time.monotonic() + timeout
    try:
        while sent < count:
            while sent < count and sent - rejected - dropped < IN_FLIGHT:
                sender.send_raw(frame)
                sent += 1
            assert time.monotonic() < deadline, f"{src} rejected {rejected} of {sent} frames within {timeout} s"
            message = acks.receive(1.0)
            if message is None:
                dropped = sent - rejected
            elif message.src == src and isinstance(message.body, Heartbeat):
                rejected = max(rejected, message.body.counters.get("invalid", 0))
            elif message.src == src and message.body.code == ErrorCode.INVALID_MESSAGE:
                rejected = max(rejected, message.seq + 1)
    finally:
        sender.close()
        acks.close()


def settled_counters(watcher, src: str, timeout: float) -> dict[str, int]:
    """`src`'s counters once two heartbeats in a row agree on them (it has caught up)."""
    last: dict[str, int] | None = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = watcher.receive(0.5)
        if message is not None and isinstance(message.body, Heartbeat) and message.src == src:
            counters = {key: message.body.counters.get(key, 0) for key in ("invalid", "errors")}
            if counters == last:
                return dict(message.body.counters)
            last = counters
    raise AssertionError(f"{src}'s counters did not settle within {timeout} s: {last}")


def test_100k_garbage_frames_give_a_few_log_lines_all_counted_and_the_stage_still_serves() -> None:
    runtime = Path(tempfile.mkdtemp(prefix="vp-logs-")) / "run"
    bus = start_stage("bus", runtime)
    try:
        connect(runtime, "probe").close()
        chunker = start_stage("chunker", runtime)
        log = Lines(chunker.stderr)
        wait_ready(runtime, "chunker")
        watcher = connect(runtime, "watch", "heartbeat", "chunk")
        flood(runtime, protocol.subscription("token") + b"flood \xc1 not msgpack", FLOOD, "chunker", timeout=600)
        counters = settled_counters(watcher, "chunker", timeout=60)
        assert counters["invalid"] >= FLOOD * 0.95, counters   # nearly all came through the bus
        assert counters["errors"] >= counters["invalid"], counters

        # The stage still serves a real reply.
        sender = connect(runtime, "after")
        sender.publish("after", "r1", Token(text="Still here after the flood."))
        sender.publish("after", "r1", LlmDone(status="ok", text="Still here after the flood.", tokens=1))
        deadline = time.monotonic() + 60
        chunks = []
        while not any(c.body.final for c in chunks) and time.monotonic() < deadline:
            message = watcher.receive(0.5)
            if message is not None and message.session == "after" and isinstance(message.body, Chunk):
                chunks.append(message)
        assert "".join(c.body.text for c in chunks).strip() == "Still here after the flood.", chunks
        sender.close()
        watcher.close()

        # The window closes by itself (no further line is needed) and says what it left out.
        log.wait_for(r"suppressed \d+ similar warnings of invalid_message", timeout=60)
        chunker.send_signal(signal.SIGTERM)     # not stop_process: `log` is the one reader of its stderr
        assert chunker.wait(30) == 0
        log.join(15)
    finally:
        stop_process(bus)
    text = "".join(log.lines)
    shown = sum("invalid_message: rejected message" in line for line in log.lines)
    suppressed = sum(int(n) for n in re.findall(r"suppressed (\d+) similar warnings of invalid_message", text))
    # The counter counts every frame the stage got, and the log accounts for each: a line or a count.
    assert shown + suppressed == counters["invalid"], (shown, suppressed, counters)
    assert len(log.lines) < 200 and len(text.encode()) < 50_000, (len(log.lines), len(text))
