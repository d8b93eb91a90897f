"""Player backends: wav and null in-process; simpleaudio for real through ALSA, in subprocesses,
because ALSA_CONFIG_PATH must be set before the process first opens a device."""

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

from services.audio import AudioFormat, PcmFrame
from services.player.backends import create_backend

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
    with pytest.raises(ValueError, match="allowed: simpleaudio, wav, null, auto"):
        create_backend("speakers", {})


def test_pcm_frame_refuses_a_cut_sample():
    with pytest.raises(ValueError, match="sample frames"):
        PcmFrame(bytes(3), FMT)


def test_auto_falls_back_to_wav_when_no_device_plays(tmp_path):
    conf = tmp_path / "no_device.conf"
    conf.write_text("</usr/share/alsa/alsa.conf>\npcm.!default { type hw card 99 }\n")
    result = run_with_alsa(conf, f"""
        import json
        from services.player.backends import create_backend
        print(json.dumps(create_backend("auto", {{"wav_dir": {str(tmp_path)!r}}}).name))
    """)
    assert result == "wav"


# --- simpleaudio, for real ----------------------------------------------------------------------

# Plays tone_frames(), each after an empty frame, through the backend named NAME.
PLAY_FRAMES = """
    import json
    from services.player.backends import create_backend
    from services.audio import PcmFrame
    from tests.test_player_backends import FMT, tone_frames
    backend = create_backend(NAME, {})
    backend.begin("s", "r", FMT)
    for frame in tone_frames():
        backend.write(PcmFrame(b"", FMT))  # simpleaudio crashes on an empty buffer: must be skipped
        backend.write(frame)
    result = {"name": backend.name, "end": backend.end()}
"""


def test_simpleaudio_plays_on_the_alsa_null_device():
    result = run_with_alsa(ALSA_NULL, 'NAME = "auto"', PLAY_FRAMES, "print(json.dumps(result))")
    assert result == {"name": "simpleaudio", "end": None}


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
        from services.audio import AudioFormat, PcmFrame
        from services.player.backends import create_backend
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

