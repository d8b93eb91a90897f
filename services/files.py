"""Private files: what voxpipe writes about a conversation is for its user alone.

The history database (and SQLite's -wal and -shm files beside it), exports and WAV recordings
hold what was said. Every directory voxpipe creates for them is 0700 and every file 0600, private
from its first byte: a file created open and narrowed afterwards could be opened by another user
in between, and an open descriptor keeps working after the chmod.

What voxpipe finds already on disk is checked with one rule (`exposure`) before it is used: it must
be the user's own and closed to group and others, to reading too where it holds secrets, to writing
where it decides whom to trust.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path
from typing import NamedTuple

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
OTHERS = 0o077
"""The mode bits that open a file or directory to its group or to everyone."""
OTHERS_WRITE = 0o022
"""The mode bits that let its group or everyone change a file, or add and replace files in a directory."""


class Exposure(NamedTuple):
    """Why other users can reach a file or directory, and the command that ends it."""

    problem: str
    """In words, to follow the path: `belongs to uid 65534, not you (uid 1000)` or `has mode 644`."""
    fix: str
    """`chown UID PATH` or `chmod MODE PATH`."""
    foreign: bool
    """Another user owns it. Only root may chown it back, so a caller may point to a place of the
    user's own instead."""


def exposure(path: Path, info: os.stat_result, open_bits: int, mode: int) -> Exposure | None:
    """What lets other users at `path` (whose stat or lstat is `info`), or None when it is the
    user's own and none of `open_bits` is set; `mode` is what the chmod fix sets.

    The owner comes first: they may change the mode back at will, so a closed mode on a file another
    user owns is no help. The caller stats, so it decides whether a symlink is followed, and what a
    missing path means."""
    if info.st_uid != os.getuid():
        return Exposure(f"belongs to uid {info.st_uid}, not you (uid {os.getuid()})",
                        f"chown {os.getuid()} {path}", True)
    current = stat.S_IMODE(info.st_mode)
    if current & open_bits:
        return Exposure(f"has mode {current:o}", f"chmod {mode:o} {path}", False)
    return None


def private_dirs(directory: Path) -> None:
    """Create `directory` and each missing parent with mode 0700 (`Path.mkdir(parents=True)`
    would make the parents 0777 less the umask, 0755 as a rule). Existing ones are left as they are."""
    missing = [path for path in (directory, *directory.parents) if not path.exists()]
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=PRIVATE_DIR)


def open_private(path: Path, flags: int) -> int:
    """A descriptor of `path`, created 0600 if it is new; an existing file is narrowed to 0600 before
    anything is written to it (opening keeps a file's mode, so a 0644 file would stay readable)."""
    descriptor = os.open(path, flags | os.O_CREAT, PRIVATE_FILE)
    try:
        os.fchmod(descriptor, PRIVATE_FILE)
    except OSError:
        os.close(descriptor)
        raise
    return descriptor


def warn_if_open(directory: Path, log: logging.Logger, what: str) -> None:
    """Log a warning, with the chmod to run, when other users may list or enter `directory`: the
    files in it are private, but their names (session and reply ids) are not."""
    mode = stat.S_IMODE(directory.stat().st_mode)
    if mode & OTHERS:
        log.warning("%s %s has mode %o, so other users can see the names of the files in it. Run: chmod 700 %s",
                    what, directory, mode, directory)
