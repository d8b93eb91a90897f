"""A program on a real pseudo-terminal, typed at like a person: for interactive front-end tests."""

from __future__ import annotations

import fcntl
import os
import re
import signal
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[()][A-Za-z0-9]|\x1b[=>78]")
CTRL_C, CTRL_D, ENTER = "\x03", "\x04", "\r"


def _controlling_terminal() -> None:
    """In the child, after setsid: make the pty (fd 0) the controlling terminal, so ^C is SIGINT.

    SIGINT and SIGQUIT go back to their defaults, as in a program started from a person's shell:
    a test run launched in the background (`make test &`, some CI runners) ignores them, the
    child would inherit that, and ^C would then do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """Runs `argv` with a pty as stdin, stdout and stderr; collects what the screen would show."""

    def __init__(self, argv: Sequence[str], *, env: Mapping[str, str], cwd: Path, columns: int = 160) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
        self.process = subprocess.Popen(list(argv), stdin=slave, stdout=slave, stderr=slave, cwd=cwd,
                                        env={**env, "TERM": "xterm-256color"}, start_new_session=True,
                                        preexec_fn=_controlling_terminal)
        os.close(slave)
        self.master = master
        self._raw = ""
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 4096)
            except OSError:  # EIO once the child has closed the pty
                data = b""
            with self._changed:
                if not data:
                    self._raw += "\0EOF"
                    self._changed.notify_all()
                    return
                self._raw += data.decode("utf-8", "replace")
                self._changed.notify_all()

    @property
    def screen(self) -> str:
        """Everything shown so far, without escape sequences and carriage returns."""
        with self._changed:
            raw = self._raw
        return _ESCAPES.sub("", raw).replace("\r", "").replace("\0EOF", "")

    @property
    def raw(self) -> str:
        """Everything written to the terminal, escape sequences and all (what `screen` cleans up)."""
        with self._changed:
            return self._raw.replace("\0EOF", "")

    def mark(self) -> int:
        """A position in `screen`: expect(..., after=mark) looks only at what came later."""
        return len(self.screen)

    def expect(self, pattern: str, timeout: float = 60.0, after: int = 0) -> re.Match[str]:
        """Wait until `pattern` (a regex) shows after position `after`; fail with the screen."""
        regex = re.compile(pattern, re.S)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = regex.search(self.screen, after)
                if found:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._raw.endswith("\0EOF"):
                    raise AssertionError(f"{pattern!r} did not show within {timeout} s; screen:\n{self.screen}")
                self._changed.wait(min(remaining, 0.5))

    def type(self, text: str, delay: float = 0.03) -> None:
        """Type like a person: one key at a time, a short pause between keys."""
        for char in text:
            os.write(self.master, char.encode())
            time.sleep(delay)

    def press(self, key: str) -> None:
        os.write(self.master, key.encode())

    def wait(self, timeout: float = 30.0) -> int:
        return self.process.wait(timeout)

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._reader.join(5)
        os.close(self.master)
