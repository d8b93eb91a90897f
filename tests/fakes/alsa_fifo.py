"""An ALSA default device that plays in real time into a FIFO this process reads.

ALSA's null device takes audio as fast as it is written, so it cannot show what a cut-off
reply sounded like. Here the default device is ALSA's `file` plugin writing into a FIFO whose
pipe buffer is one page, and a thread reads it at the audio's byte rate: the device then
plays at real-time pace, `heard` holds exactly what was played, and `pause()` makes the device
hang (nobody reads). Give `conf` to the player process as ALSA_CONFIG_PATH.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

_F_SETPIPE_SZ = 1031
_PIPE_BYTES = 4096
_TICK_S = 0.002


class PacedFifo:
    def __init__(self, directory: Path, bytes_per_s: int) -> None:
        self.path = directory / "device.fifo"
        os.mkfifo(self.path)
        self.conf = directory / "fifo.conf"
        self.conf.write_text(f'</usr/share/alsa/alsa.conf>\n'
                             f'pcm.!default {{ type file; slave.pcm "null"; file "{self.path}"; format "raw" }}\n')
        self.bytes_per_s = bytes_per_s
        self.heard = bytearray()
        self.first_at: float | None = None
        """When the first byte came: the device's clock starts then."""
        self.starved_ms = 0.0
        """How long the device had nothing to play between its first and its latest byte: the
        silence a player that closes the device between buffers leaves."""
        self._fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)  # a writer's open() then never blocks
        fcntl.fcntl(self._fd, _F_SETPIPE_SZ, _PIPE_BYTES)
        self._reading = threading.Event()
        self._reading.set()
        self._done = threading.Event()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def pause(self) -> None:
        """Stop reading: the pipe fills and the device hangs, as a wedged sound card does."""
        self._reading.clear()

    def wait_closed(self, timeout: float = 10.0) -> bool:
        """Until the player has closed the device and everything it played has been read."""
        return self._closed.wait(timeout)

    def close(self) -> None:
        self._done.set()
        self._thread.join()
        os.close(self._fd)

    def __enter__(self) -> PacedFifo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self) -> None:
        """Read at the byte rate, like a device's clock; credit unused while starved is capped at
        one pipe buffer, so after a gap the device does not race to catch up."""
        credit, last, starving = 64.0, time.monotonic(), 0.0
        while not self._done.wait(_TICK_S):
            now = time.monotonic()
            if self.first_at is not None:
                credit = min(credit + (now - last) * self.bytes_per_s, _PIPE_BYTES)
            tick, last = now - last, now
            if not self._reading.is_set():
                continue
            try:
                data = os.read(self._fd, int(credit))
                writers_gone = not data
            except BlockingIOError:  # a writer has the FIFO open but wrote nothing yet
                data, writers_gone = b"", False
            if data:
                self.first_at = self.first_at or now
                self.starved_ms, starving = self.starved_ms + starving, 0.0
            elif self.first_at is not None and credit >= self.bytes_per_s * _TICK_S:
                starving += tick * 1000  # counted once more audio proves it was a gap, not the end
                if writers_gone:
                    self._closed.set()
            credit -= len(data)
            self.heard += data
