"""The player stage in a real process behind a real bus: events with what was heard, conversion,
format changes mid-reply, and cancel on a device that plays in real time."""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
import wave
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.fakes.alsa_fifo import PacedFifo
from tests.harness import PYTHON, ROOT, base_env, connect, start_stage, stop_process, wait_ready
from voxpipe.protocol import Audio, Cancel, Message
from voxpipe.stages.audio import AudioFormat
from voxpipe.stages.player.convert import Converter
from voxpipe.stages.player.core import SPEECH_MS_PER_CHAR

FMT = AudioFormat(22050, 1, 2)


def tone(ms: float, fmt: AudioFormat = FMT, level: int = 1) -> bytes:
    """Non-zero audio (so silence is told apart from sound), `level` making frames distinct."""
    return bytes([level, 1]) * (fmt.frame_bytes(ms) // 2)


class Player:
    """A player stage and a client that publishes audio and reads playback events; `output` is
    what the stage printed, once it has exited."""

    def __init__(self) -> None:
        self.client = None
        self.output = ""

    def send_chunk(self, reply: str, chunk: int, frames: list[bytes], fmt: AudioFormat = FMT, chars: int = 20,
                   last: bool = True, final: bool = False, session: str = "s1") -> None:
        for number, pcm in enumerate(frames):
            self.client.publish(session, reply, Audio(chunk=chunk, frame=number, rate=fmt.rate, channels=fmt.channels,
                                                      width=fmt.sample_width, pcm=pcm,
                                                      last=last and number == len(frames) - 1, final=final,
                                                      chars=chars))

    def events(self, count: int = 1, timeout: float = 20.0) -> list[Message]:
        """Playback events until `count` final ones came."""
        events: list[Message] = []
        deadline = time.monotonic() + timeout
        while sum(event.body.final for event in events) < count:
            message = self.client.receive(max(0.0, deadline - time.monotonic()))
            assert message is not None, f"only these playback events came: {summary(events)}"
            if message.kind == "playback":
                events.append(message)
        return events

    def next_event(self, timeout: float = 20.0) -> Message:
        message = self.client.receive(timeout)
        while message is not None and message.kind != "playback":
            message = self.client.receive(timeout)
        assert message is not None, "no playback event"
        return message


def summary(events: list[Message]) -> list[tuple]:
    return [(e.id, e.body.event, e.body.chunk, e.body.heard, e.body.heard_chars, e.body.final) for e in events]


@contextmanager
def player(backend: str, command: list[str] | None = None, **env: str) -> Iterator[Player]:
    """A bus and a player stage; `env` goes to the player (ALSA_CONFIG_PATH, VOXPIPE_*), and
    `command` replaces `python -m launcher stage player`, for a player with instruments."""
    runtime = Path(tempfile.mkdtemp(prefix="vp-pl-")) / "run"
    bus = start_stage("bus", runtime)
    settings = {"VOXPIPE_PLAYER__BACKEND": backend, **env}
    stage = subprocess.Popen(command or [PYTHON, "-m", "launcher", "stage", "player"], cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=base_env({"VOXPIPE_BUS__RUNTIME_DIR": str(runtime), **settings}))
    session = Player()
    try:
        wait_ready(runtime, "player")
        session.client = connect(runtime, "test", "playback")
        yield session
        session.client.close()
    finally:
        stage.terminate()
        session.output, err = stage.communicate(timeout=15)
        stop_process(bus)
    assert stage.returncode == 0, err


def test_events_carry_what_was_heard(tmp_path):
    with player("null") as p:
        p.send_chunk("r1", 0, [tone(100), tone(100)], chars=30)
        p.send_chunk("r1", 1, [tone(100)], chars=7, final=True)
        # cut off: r2's chunk 0 has no last frame yet, so its length is taken as its text spoken at the usual rate
        p.send_chunk("r2", 0, [tone(100)], chars=12, last=False)
        first = p.events()
        started = p.next_event()  # r2 is playing, not waiting
        time.sleep(0.2)  # `started` goes out just before its frame is written (null: at once)
        p.client.publish("s1", "r2", Cancel())
        stopped = p.next_event()
    assert summary(first) == [("r1", "started", 0, 0.0, 0, False), ("r1", "finished", 0, 1.0, 30, False),
                              ("r1", "started", 1, 0.0, 0, False), ("r1", "finished", 1, 1.0, 7, True)]
    heard = 100 / (12 * SPEECH_MS_PER_CHAR)
    assert summary([started, stopped]) == [("r2", "started", 0, 0.0, 0, False),
                                           ("r2", "stopped", 0, heard, round(heard * 12), True)]
    assert [round(event.body.audio_s, 6) for event in (*first, started, stopped)] == [0, 0, 0, 0.3, 0, 0.1]
    assert all(event.body.audio_ts > 0 for event in (*first, started) if event.body.event == "started")


def test_a_chunk_cut_before_its_audio_all_came_is_measured_at_the_replys_speech_rate():
    """A synthesiser slower than the player (here: frames that stop coming) is cut mid-chunk: what
    came is a part of the chunk whose length the reply's whole chunks tell (40 ms per character)."""
    with player("null") as p:
        p.send_chunk("r1", 0, [tone(200), tone(200)], chars=10)
        p.send_chunk("r1", 1, [tone(200)], chars=20, last=False)  # 800 ms at 40 ms per character
        events = [p.next_event() for _ in range(3)]
        time.sleep(0.2)
        p.client.publish("s1", "r1", Cancel())
        events.append(p.next_event())
    assert summary(events)[2:] == [("r1", "started", 1, 0.0, 0, False), ("r1", "stopped", 1, 0.25, 5, True)]


@pytest.mark.parametrize("backend", ["sounddevice", "simpleaudio"])
def test_a_cut_reports_the_chunk_that_was_sounding_not_the_last_one_started(tmp_path, backend):
    """A backend holds audio ahead of the sound (sounddevice a 300 ms queue, simpleaudio the buffer
    playing), so chunk 0 is `finished` and chunk 1 `started` while chunk 0 still sounds: a cancel
    then stops the reply inside chunk 0, and the stopped event says so, so history drops chunk 1
    and cuts chunk 0."""
    with PacedFifo(tmp_path, FMT.rate * FMT.block_align) as device, \
            player(backend, ALSA_CONFIG_PATH=str(device.conf)) as p:
        p.send_chunk("r1", 0, [tone(200, level=n + 1) for n in range(5)], chars=50)  # 1 s
        p.send_chunk("r1", 1, [tone(200, level=n + 1) for n in range(5)], chars=50, final=True)
        events = [p.next_event() for _ in range(3)]
        p.client.publish("s1", "r1", Cancel())
        stopped = p.next_event()
    assert summary(events) == [("r1", "started", 0, 0.0, 0, False), ("r1", "finished", 0, 1.0, 50, False),
                               ("r1", "started", 1, 0.0, 0, False)]
    assert (stopped.body.event, stopped.body.chunk, stopped.body.final) == ("stopped", 0, True)
    assert 0 < stopped.body.heard < 1 and stopped.body.heard_chars == round(stopped.body.heard * 50)
    assert stopped.body.audio_s == pytest.approx(stopped.body.heard * 1.0, abs=0.01)  # chunk 0 is the first second


def test_wav_is_in_the_first_frames_format_when_the_engine_changes_format(tmp_path):
    """An engine falling back mid-reply (22.05 kHz, then 24 kHz stereo) still gives one valid file."""
    fallback = AudioFormat(24000, 2, 2)
    with player("wav", VOXPIPE_PLAYER__WAV_DIR=str(tmp_path)) as p:
        p.send_chunk("r1", 0, [tone(200), tone(100)])
        p.send_chunk("r1", 1, [tone(200, fallback), tone(100, fallback)], fmt=fallback, final=True)
        events = p.events()
    path = events[-1].body.path
    assert (events[-1].body.event, path) == ("finished", str(tmp_path / "s1-r1.wav"))
    with wave.open(path, "rb") as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (22050, 1, 2)
        assert wav.getnframes() == 6615 + 6615  # 300 ms at 22.05 kHz, twice: exact after resampling


def test_simpleaudio_gets_audio_resampled_to_a_rate_it_plays(tmp_path):
    """simpleaudio cannot play 12 kHz: the stage converts the reply to 16 kHz on its way."""
    low = AudioFormat(12000, 1, 2)
    frames = [tone(100, low, level) for level in (1, 2, 3)]
    converter = Converter(low, AudioFormat(16000, 1, 2))
    expected = b"".join(converter.convert(frame) for frame in frames) + converter.flush()
    with PacedFifo(tmp_path, 10**9) as device:  # read at once: this test is about content
        with player("simpleaudio", ALSA_CONFIG_PATH=str(device.conf)) as p:
            p.send_chunk("r1", 0, frames, fmt=low, final=True)
            assert p.events()[-1].body.event == "finished"
        deadline = time.monotonic() + 10
        while len(device.heard) < len(expected) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert bytes(device.heard) == expected


# The player stage with the sounddevice backend instrumented; at exit it prints when each stop()
# was called and returned (CLOCK_MONOTONIC is one clock for every process on the machine), how
# many callbacks that began after a stop() still handed the device sound, and the longest
# callback period.
INSTRUMENTED_PLAYER = """
import json, sys, time
from voxpipe.cli import main
from voxpipe.stages.player.backends.sounddevice_backend import SounddeviceBackend as Backend
marks = {"stops": [], "sound_after_stop": 0, "period_ms": 0.0}
play, stop = Backend._callback, Backend.stop
def callback(self, outdata, frames, at, status):
    after_stop = self._reply.stopped.is_set()
    play(self, outdata, frames, at, status)
    if any(bytes(outdata)):
        marks["sound_after_stop"] += after_stop
        marks["period_ms"] = max(marks["period_ms"], self._reply.format.duration_ms(len(outdata)))
def stopped(self):
    called = time.monotonic()
    stop(self)
    marks["stops"].append((called, time.monotonic()))
Backend._callback, Backend.stop = callback, stopped
code = main(["stage", "player"])
print(json.dumps(marks), flush=True)
sys.exit(code)
"""


def test_cancel_mid_chunk_silences_sounddevice_and_reports_the_part_heard(tmp_path):
    with PacedFifo(tmp_path, FMT.rate * FMT.block_align) as device, \
            player("sounddevice", [PYTHON, "-c", INSTRUMENTED_PLAYER], ALSA_CONFIG_PATH=str(device.conf)) as p:
        p.send_chunk("r1", 0, [tone(200, level=n + 1) for n in range(10)], chars=40)  # 2 s
        p.send_chunk("r1", 1, [tone(200)], final=True)
        assert p.next_event().body.event == "started"
        time.sleep(0.6)
        cancelled = time.monotonic()
        p.client.publish("s1", "", Cancel())
        stopped = p.next_event()
        reported = time.monotonic()
        # 1 s in one final chunk: the writer is blocked on the last frame when the cancel comes
        p.send_chunk("r2", 0, [tone(200, level=n + 1) for n in range(5)], final=True)
        assert summary([p.next_event()])[0][:2] == ("r2", "started")
        time.sleep(0.4)
        p.client.publish("s1", "r2", Cancel())
        assert summary([p.next_event()])[0][:2] == ("r2", "stopped")
    marks = json.loads(p.output.strip().splitlines()[-1])
    stop_called, stop_returned = marks["stops"][0]
    assert (stopped.body.event, stopped.body.chunk, stopped.body.final) == ("stopped", 0, True)
    assert 0 < stopped.body.heard < 1  # of the whole chunk: its last frame had come
    assert stopped.body.heard_chars == round(stopped.body.heard * 40)
    assert cancelled < stop_called <= stop_returned < reported
    assert marks["sound_after_stop"] == 0
    assert reported - cancelled < 5  # a generous bound on a hang; the latency is a benchmark
