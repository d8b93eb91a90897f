"""Writes each reply to `<wav_dir>/<session>-<reply_id>.wav`: for machines without a sound device.

The header is patched and flushed after every frame, so the file on disk is a valid WAV at every
moment, including after stop() or a crash mid-reply. What was said is private: the files are 0600
and the directories the backend makes 0700 (voxpipe.files).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
import wave
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

from ....files import open_private, private_dirs, warn_if_open
from ...audio import AudioFormat, PcmFrame
from . import backend_settings
from .base import ReplyState

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def _safe_name(part: str) -> str:
    """A file-name component that cannot leave wav_dir or hide the file."""
    return _UNSAFE.sub("_", part)[:80].lstrip(".") or "_"


class WavBackend:
    name = "wav"

    def __init__(self, table: Mapping[str, Any] | None = None, /, **settings: Any) -> None:
        """`wav_dir` empty means a `wav` directory in a new private temporary directory."""
        wav_dir = backend_settings(self.name, table, settings)["wav_dir"]
        self.wav_dir = Path(wav_dir) if wav_dir else Path(tempfile.mkdtemp(prefix="voxpipe-")) / "wav"
        private_dirs(self.wav_dir)
        warn_if_open(self.wav_dir, logging.getLogger("voxpipe.player"), "player.wav_dir")
        self._reply = ReplyState()
        self._lock = threading.Lock()  # stop() and close() may come from another thread
        self._file: BinaryIO | None = None
        self._wave: wave.Wave_write | None = None
        self._path: Path | None = None

    def output_format(self, fmt: AudioFormat) -> AudioFormat:
        return fmt

    def begin(self, session: str, reply_id: str, fmt: AudioFormat) -> None:
        """Also finishes a reply left open, so its file stays valid."""
        with self._lock:
            self._finish()
            self._path = self.wav_dir / f"{_safe_name(session)}-{_safe_name(reply_id)}.wav"
            self._file = os.fdopen(open_private(self._path, os.O_WRONLY | os.O_TRUNC), "wb")
            self._wave = wave.open(self._file, "wb")  # noqa: SIM115 - closed in _finish
            self._wave.setnchannels(fmt.channels)
            self._wave.setsampwidth(fmt.sample_width)
            self._wave.setframerate(fmt.rate)
            self._wave.writeframes(b"")  # writes the header: a stopped empty reply is still a WAV
            self._file.flush()
            self._reply.begin(fmt)

    def write(self, frame: PcmFrame) -> None:
        with self._lock:
            if self._reply.wants(frame) and self._wave is not None and self._file is not None:
                self._wave.writeframes(frame.pcm)
                self._file.flush()
                self._reply.played_ms += frame.duration_ms

    def stop(self) -> None:
        self._reply.stopped.set()

    def played_ms(self) -> float:
        """What is in the file: written counts as played."""
        return self._reply.played_ms

    def end(self) -> str | None:
        with self._lock:
            path = self._path
            self._finish()
            return str(path) if path else None

    def close(self) -> None:
        with self._lock:
            self._finish()

    def _finish(self) -> None:
        if self._wave is not None:
            self._wave.close()  # does not close a file it did not open
        if self._file is not None:
            self._file.close()
        self._wave = self._file = self._path = None
        self._reply.end()
