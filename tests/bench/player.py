"""Player benchmark: the gap between consecutive frames and the time from cancel to silence.

Both run on an ALSA device that plays in real time (tests/fakes/alsa_fifo.py), because ALSA's null
device swallows audio as fast as it is written. The gap is measured where it is heard: for
sounddevice, the silence its callback had to insert between the first and the last sample of a
reply; for simpleaudio, the wall time between one buffer's end and the next one's start.
Cancel-to-silence goes through the real bus and player stage: from the `cancel` publish to the
moment the backend's stop() returned, after which no callback hands the device sound (counted).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from tests.bench.stats import median
from tests.fakes.alsa_fifo import PacedFifo
from tests.harness import PYTHON, ROOT
from tests.test_player_stage import FMT, INSTRUMENTED_PLAYER, player, tone
from voxpipe.protocol import Cancel

GAP_FRAMES = 30  # of 100 ms each

# Plays GAP_FRAMES frames through NAME as a tts stage that keeps up would hand them over; prints
# the silence sounddevice's callback inserted between the first and the last sample, in ms.
GAP_SCRIPT = """
    import json
    from voxpipe.stages.audio import AudioFormat, PcmFrame
    from voxpipe.stages.player.backends import create_backend
    fmt = AudioFormat(22050, 1, 2)
    backend = create_backend(NAME, {})
    output = bytearray()
    if NAME == "sounddevice":
        play = backend._callback
        def kept(outdata, frames, at, status):
            play(outdata, frames, at, status)
            output.extend(bytes(outdata))
        backend._callback = kept
    backend.begin("s", "r", fmt)
    for n in range(COUNT):
        backend.write(PcmFrame(bytes([n % 250 + 1, 1]) * 2205, fmt))
    backend.end()
    print(json.dumps(fmt.duration_ms(bytes(output).strip(b"\\0").count(b"\\0\\0") * 2)))
"""


def frame_gaps(name: str) -> float:
    """Silence between the frames of one reply, in ms: inserted by the player, or left by the
    device going idle (simpleaudio closes it between buffers)."""
    with tempfile.TemporaryDirectory(prefix="vp-bench-") as directory, \
            PacedFifo(Path(directory), FMT.rate * FMT.block_align) as device:
        script = f"NAME, COUNT = {name!r}, {GAP_FRAMES}\n" + textwrap.dedent(GAP_SCRIPT)
        env = {**os.environ, "ALSA_CONFIG_PATH": str(device.conf), "PYTHONPATH": str(ROOT)}
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                              timeout=60, check=True)
        time.sleep(0.2)  # the device plays out what is still in the pipe
        return json.loads(done.stdout.strip().splitlines()[-1]) + device.starved_ms


def cancel_to_silence(replies: int) -> tuple[list[float], list[float], dict]:
    """Per cancel: ms to stop() returned and ms to the `stopped` event; and the player's marks."""
    sent: list[float] = []
    events: list[float] = []
    with (tempfile.TemporaryDirectory(prefix="vp-bench-") as directory,
          PacedFifo(Path(directory), FMT.rate * FMT.block_align) as device,
          player("sounddevice", [PYTHON, "-c", INSTRUMENTED_PLAYER], ALSA_CONFIG_PATH=str(device.conf)) as p):
        for number in range(replies):
            p.send_chunk(f"r{number}", 0, [tone(200, level=n + 1) for n in range(5)], final=True)
            assert p.next_event().body.event == "started"
            time.sleep(0.3)
            sent.append(time.monotonic())
            p.client.publish("s1", f"r{number}", Cancel())
            assert p.next_event().body.event == "stopped"
            events.append(time.monotonic())
    marks = json.loads(p.output.strip().splitlines()[-1])
    stopped = [(returned - at) * 1000 for at, (_, returned) in zip(sent, marks["stops"], strict=False)]
    return stopped, [(event - at) * 1000 for at, event in zip(sent, events, strict=True)], marks


def bench_player(replies: int) -> tuple[list[str], list[str]]:
    gaps = {name: frame_gaps(name) for name in ("sounddevice", "simpleaudio")}
    stopped, reported, marks = cancel_to_silence(replies)
    lines = [
        f"One reply of {GAP_FRAMES} frames of 100 ms, written as fast as the backend takes them, on a "
        f"real-time device: the silence heard between its first and last sample.",
        "",
        "| backend | silence in total | per frame boundary |",
        "|---|---|---|",
        *(f"| {name} | {gap:.1f} ms | {gap / (GAP_FRAMES - 1):.1f} ms |" for name, gap in gaps.items()),
        "",
        f"Cancel to silence, sounddevice, through the bus and the player stage ({replies} cancels):",
        "",
        "| from the `cancel` publish to | median | max |",
        "|---|---|---|",
        f"| stop() returned: the queue is empty, later callbacks play silence | {median(stopped):.2f} ms | "
        f"{max(stopped):.2f} ms |",
        f"| the `stopped` event received (after the stream is aborted) | {median(reported):.2f} ms | "
        f"{max(reported):.2f} ms |",
        "",
        f"Callbacks begun after a stop() that still handed the device sound: {marks['sound_after_stop']}. "
        f"One in flight when stop() returns plays out its period: at most {marks['period_ms']:.1f} ms here.",
    ]
    return lines, []
