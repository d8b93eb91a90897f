"""Player backends: wav and null in-process; simpleaudio and sounddevice for real through ALSA, in
subprocesses, because ALSA_CONFIG_PATH must be set before the process first opens a device."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import wave
from pathlib import Path

import pytest

from tests.fakes.alsa_fifo import PacedFifo
from voxpipe.stages.audio import AudioFormat, PcmFrame
from voxpipe.stages.player.backends import create_backend
from voxpipe.stages.player.backends.simpleaudio_backend import SimpleaudioBackend

REPO = Path(__file__).resolve().parent.parent
ALSA_NULL = REPO / "tests" / "alsa_null.conf"
FMT = AudioFormat(rate=22050, channels=1, sample_width=2)


def tone_frames(count: int = 5) -> list[PcmFrame]:
    """Frames of distinct content and uneven sizes, so order and loss both show."""
    return [PcmFrame(bytes([i + 1, 0]) * (2205 + 37 * i), FMT) for i in range(count)]


def run_with_alsa(conf: Path, *script_parts: str) -> object:
    """Run the script in a fresh interpreter whose ALSA reads `conf`; it prints its result as JSON."""
    script = "\n".join(textwrap.dedent(part) for part in script_parts)
    env = {**os.environ, "ALSA_CONFIG_PATH": str(conf), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- wav ----------------------------------------------------------------------------------------


@pytest.fixture
def wav_backend(tmp_path):
    backend = create_backend("wav", {"backend": "wav", "wav_dir": str(tmp_path)})
    yield backend
    backend.close()


def read_wav(path: str) -> tuple[tuple, bytes]:
    with wave.open(path, "rb") as w:
        return (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()), w.readframes(10**9)


def test_wav_file_per_reply_with_correct_header_and_data(wav_backend, tmp_path):
    frames = tone_frames()
    wav_backend.begin("s1", "r1", FMT)
    for frame in frames:
        wav_backend.write(frame)
    path = wav_backend.end()
    expected = b"".join(frame.pcm for frame in frames)
    assert path == str(tmp_path / "s1-r1.wav")
    assert read_wav(path) == ((1, 2, 22050, len(expected) // 2), expected)


def test_wav_file_is_valid_while_written_and_after_stop(wav_backend):
    first, second = tone_frames(2)
    wav_backend.begin("s", "r", FMT)
    wav_backend.write(first)
    path = str(wav_backend.wav_dir / "s-r.wav")
    assert read_wav(path)[1] == first.pcm  # readable before end(): nothing is left for close to fix
    wav_backend.stop()
    wav_backend.write(second)
    assert wav_backend.end() == path
    assert read_wav(path)[1] == first.pcm


def test_wav_and_null_take_any_format_and_count_written_audio_as_played(wav_backend):
    odd = AudioFormat(rate=12345, channels=3, sample_width=4)
    for backend in (wav_backend, create_backend("null", {})):
        assert backend.output_format(odd) == odd
        backend.begin("s", "r", FMT)
        for frame in tone_frames(3):
            backend.write(frame)
        backend.stop()
        backend.write(tone_frames(1)[0])
        played = sum(frame.duration_ms for frame in tone_frames(3))
        assert backend.played_ms() == pytest.approx(played)
        backend.end()
        assert backend.played_ms() == pytest.approx(played)  # still readable after end()


def test_simpleaudio_output_format_is_one_it_can_play():
    """play_buffer takes 11 rates, 1-2 channels, and plays 4-byte samples as floats."""
    backend = SimpleaudioBackend()
    assert backend.output_format(FMT) == FMT
    assert backend.output_format(AudioFormat(12000, 1, 2)) == AudioFormat(16000, 1, 2)
    assert backend.output_format(AudioFormat(24000, 6, 4)) == AudioFormat(24000, 2, 3)
    assert backend.output_format(AudioFormat(384000, 1, 1)) == AudioFormat(192000, 1, 1)


def test_wav_names_are_sanitised_into_wav_dir(wav_backend, tmp_path):
    wav_backend.begin("../../etc/x y", ".hidden/ü", FMT)
    path = Path(wav_backend.end())
    assert path.parent == tmp_path and not path.name.startswith(".")
    assert read_wav(str(path))[0] == (1, 2, 22050, 0)


def test_wav_default_dir_is_created_under_temp():
    backend = create_backend("wav", {"wav_dir": ""})
    backend.begin("s", "r", FMT)
    path = Path(backend.end())
    assert path.parent.name == "wav" and path.is_file()
    shutil.rmtree(path.parent.parent)


def test_wav_refuses_format_change_and_skips_empty_frames(wav_backend):
    wav_backend.begin("s", "r", FMT)
    wav_backend.write(PcmFrame(b"", FMT))
    with pytest.raises(ValueError, match="format"):
        wav_backend.write(PcmFrame(bytes(4), AudioFormat(rate=16000, channels=1, sample_width=2)))
    assert read_wav(wav_backend.end())[0][3] == 0


# --- null and the registry ----------------------------------------------------------------------


def test_null_checks_frames_like_a_real_backend():
    backend = create_backend("null", {"wav_dir": "ignored"})
    with pytest.raises(RuntimeError, match="begin"):
        backend.write(tone_frames(1)[0])
    backend.begin("s", "r", FMT)
    backend.write(PcmFrame(b"", FMT))
    with pytest.raises(ValueError):
        backend.write(PcmFrame(bytes(4), AudioFormat(rate=22050, channels=2, sample_width=2)))
    assert backend.end() is None


def test_unknown_backend_lists_the_allowed_names():
    with pytest.raises(ValueError, match="allowed: simpleaudio, sounddevice, wav, null, auto"):
        create_backend("speakers", {})


def test_pcm_frame_refuses_a_cut_sample():
    with pytest.raises(ValueError, match="sample frames"):
        PcmFrame(bytes(3), FMT)


def test_auto_falls_back_to_wav_when_no_device_plays(tmp_path):
    conf = tmp_path / "no_device.conf"
    conf.write_text("</usr/share/alsa/alsa.conf>\npcm.!default { type hw card 99 }\n")
    result = run_with_alsa(conf, f"""
        import json
        from voxpipe.stages.player.backends import create_backend
        print(json.dumps(create_backend("auto", {{"wav_dir": {str(tmp_path)!r}}}).name))
    """)
    assert result == "wav"


# --- simpleaudio, for real ----------------------------------------------------------------------

# Plays tone_frames(), each after an empty frame, through the backend named NAME.
PLAY_FRAMES = """
    import json
    from voxpipe.stages.player.backends import create_backend
    from voxpipe.stages.audio import PcmFrame
    from tests.test_player_backends import FMT, tone_frames
    backend = create_backend(NAME, {})
    backend.begin("s", "r", FMT)
    for frame in tone_frames():
        backend.write(PcmFrame(b"", FMT))  # simpleaudio crashes on an empty buffer: must be skipped
        backend.write(frame)
    result = {"name": backend.name, "end": backend.end()}
"""


def test_simpleaudio_plays_on_the_alsa_null_device():
    result = run_with_alsa(ALSA_NULL, 'NAME = "simpleaudio"', PLAY_FRAMES, "print(json.dumps(result))")
    assert result == {"name": "simpleaudio", "end": None}


def test_auto_prefers_sounddevice_then_simpleaudio():
    with_both = run_with_alsa(ALSA_NULL, 'NAME = "auto"', PLAY_FRAMES, "print(json.dumps(result))")
    without_portaudio = run_with_alsa(ALSA_NULL, 'import sys; sys.modules["sounddevice"] = None; NAME = "auto"',
                                      PLAY_FRAMES, "print(json.dumps(result))")
    assert (with_both["name"], without_portaudio["name"]) == ("sounddevice", "simpleaudio")


@pytest.fixture
def fifo_device(tmp_path) -> tuple[Path, Path]:
    """An ALSA default device whose samples go into a FIFO: the test sees exactly what was played,
    and a FIFO nobody reads is a device that hangs."""
    fifo = tmp_path / "device.fifo"
    os.mkfifo(fifo)
    conf = tmp_path / "fifo.conf"
    conf.write_text(f'</usr/share/alsa/alsa.conf>\n'
                    f'pcm.!default {{ type file; slave.pcm "null"; file "{fifo}"; format "raw" }}\n')
    return conf, fifo


def test_simpleaudio_plays_every_frame_in_order(fifo_device):
    conf, fifo = fifo_device
    played = run_with_alsa(conf, f"""
        import os, threading
        reader = os.open({str(fifo)!r}, os.O_RDONLY | os.O_NONBLOCK)
        heard, ended = bytearray(), threading.Event()
        def drain():
            while not ended.is_set():
                try:
                    heard.extend(os.read(reader, 65536))
                except BlockingIOError:
                    pass
                ended.wait(0.002)
        drainer = threading.Thread(target=drain)
        drainer.start()
        NAME = "simpleaudio"  # not auto: its probe would play a little silence into the FIFO first
    """, PLAY_FRAMES, """
        ended.set()
        drainer.join()
        heard.extend(os.read(reader, 1 << 20))
        print(json.dumps(bytes(heard).hex()))
    """)
    assert bytes.fromhex(played) == b"".join(frame.pcm for frame in tone_frames())


def test_simpleaudio_stop_from_another_thread_releases_a_blocked_write(fifo_device):
    conf, fifo = fifo_device
    result = run_with_alsa(conf, f"""
        import json, os, threading, time
        from voxpipe.stages.audio import AudioFormat, PcmFrame
        from voxpipe.stages.player.backends import create_backend
        reader = os.open({str(fifo)!r}, os.O_RDONLY | os.O_NONBLOCK)  # never read: the device hangs
        fmt = AudioFormat(22050, 1, 2)
        backend = create_backend("simpleaudio", {{}})
        backend.begin("s", "r", fmt)
        backend.write(PcmFrame(bytes(22050 * 2 * 3), fmt))  # 3 s: starts, then blocks in the device
        writer = threading.Thread(target=backend.write, args=(PcmFrame(bytes(4410), fmt),))
        writer.start()
        time.sleep(0.3)
        blocked = writer.is_alive()
        started = time.monotonic()
        backend.stop()
        writer.join(timeout=5)
        released_s = time.monotonic() - started
        ended = backend.end()
        print(json.dumps({{"blocked": blocked, "released": not writer.is_alive(),
                           "released_s": released_s, "end": ended}}))
        os.close(reader)  # unblocks simpleaudio's own device thread, so the process exits
    """)
    assert result["blocked"] and result["released"] and result["end"] is None
    assert result["released_s"] < 2  # a generous bound on a hang; the real latency is a benchmark



# --- sounddevice, for real, on a device that plays in real time ----------------------------------


@pytest.fixture
def paced_device(tmp_path) -> PacedFifo:
    with PacedFifo(tmp_path, FMT.rate * FMT.block_align) as fifo:
        yield fifo


def test_sounddevice_plays_every_frame_in_order_without_gaps(paced_device):
    """Between the first and the last sample nothing is lost, doubled or padded with silence."""
    result = run_with_alsa(paced_device.conf, 'NAME = "sounddevice"', PLAY_FRAMES, """
        result["played_ms"] = backend.played_ms()
        print(json.dumps(result))
    """)
    assert paced_device.wait_closed()
    expected = b"".join(frame.pcm for frame in tone_frames())
    heard = bytes(paced_device.heard)
    start = heard.find(expected)
    assert start >= 0 and not heard[:start].strip(b"\0") and not heard[start + len(expected):].strip(b"\0")
    assert result == {"name": "sounddevice", "end": None,
                      "played_ms": pytest.approx(sum(frame.duration_ms for frame in tone_frames()))}


# Writes 3 s of audio from a thread (the queue holds 300 ms, so the writer blocks), then stops.
STOP_WHILE_WRITING = """
    import json, os, threading, time
    from voxpipe.stages.audio import PcmFrame
    from voxpipe.stages.player.backends import create_backend
    from tests.test_player_backends import FMT
    backend = create_backend("sounddevice", {})
    sounded = []  # when callbacks that handed the device non-silent samples began
    play = backend._callback
    def spy(outdata, frames, at, status):
        began = time.monotonic()
        play(outdata, frames, at, status)
        if any(bytes(outdata)):
            sounded.append(began)
    backend._callback = spy
    backend.begin("s", "r", FMT)
    loud = PcmFrame(bytes([1, 1]) * 2205, FMT)  # 100 ms
    writer = threading.Thread(target=lambda: [backend.write(loud) for _ in range(30)])
    writer.start()
    time.sleep(0.6)
    blocked = writer.is_alive()
    stopping = time.monotonic()
    backend.stop()
    stopped = time.monotonic()
    writer.join(timeout=5)
    played = backend.played_ms()
    time.sleep(0.1)
    result = {"blocked": blocked, "released": not writer.is_alive(), "stop_ms": (stopped - stopping) * 1000,
              "played_ms": played, "frozen": backend.played_ms() == played,
              "last_sound_after_stop_ms": (sounded[-1] - stopped) * 1000 if sounded else None}
"""


def test_sounddevice_stop_silences_at_once_and_releases_a_blocked_write(paced_device):
    result = run_with_alsa(paced_device.conf, STOP_WHILE_WRITING, """
        backend.end()
        print(json.dumps(result))
    """)
    assert result["blocked"] and result["released"] and result["frozen"]
    assert 0 < result["played_ms"] < 3000
    assert result["last_sound_after_stop_ms"] < 0  # no callback begun after stop() returned made sound


def test_sounddevice_stop_returns_even_when_the_device_hangs(paced_device):
    paced_device.pause()
    result = run_with_alsa(paced_device.conf, STOP_WHILE_WRITING, """
        print(json.dumps(result), flush=True)
        os._exit(0)  # end() would wait for the wedged device, as would PortAudio's exit handler
    """)
    assert result["blocked"] and result["released"]
    assert result["stop_ms"] < 1000  # a generous bound on a hang; the real latency is a benchmark
