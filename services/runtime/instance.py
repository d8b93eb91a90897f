"""One instance of each thing per user: a second `voxpipe run`, or a second copy of one stage and shard,
is refused before it starts anything, instead of joining the first.

Each holds an exclusive `flock` on a file in the runtime directory for its whole life. The kernel
drops the lock when the process ends, however it ends (kill -9 included), so a stale file never
blocks a restart, and there is no race between two starts. The file holds the holder's pid, so the
refusal can name it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import IO


class AlreadyRunning(RuntimeError):
    """Another live process holds the lock; the message names it and says what to do."""


class InstanceLock:
    """An exclusive lock named `name` in `directory`, held from `acquire()` until `release()` or exit."""

    def __init__(self, directory: Path, name: str) -> None:
        self.path = directory / f"{name}.lock"
        self._file: IO[str] | None = None

    def acquire(self, what: str, hint: str) -> None:
        """Take the lock, or raise AlreadyRunning: "<what> is already running (pid N); <hint>".

        The directory is made private first, or refused (ConfigError) when another user owns it or
        may enter it: there they could hold the lock to keep voxpipe from starting, or plant a
        symlink at the lock's path to have us truncate a file of theirs choosing. The lock file is
        opened without following a symlink all the same."""
        from .broker import ensure_private_dir  # the runtime dir's one rule; broker imports this module

        ensure_private_dir(self.path.parent)
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        handle = os.fdopen(descriptor, "r+", encoding="ascii")
        os.fchmod(descriptor, 0o600)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise AlreadyRunning(f"{what} is already running (pid {holder}); {hint}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
