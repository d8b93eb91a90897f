"""The openai-speech engine against a real local HTTP server speaking `/v1/audio/speech`."""

from __future__ import annotations

import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.fakes.wire_server import Script, WireServer, json_script
from tests.harness import connect, start_stage, stop_process, wait_ready
from voxpipe.protocol import Chunk, Request
from voxpipe.stages.audio import AudioFormat
from voxpipe.stages.tts.engines import create_engine
from voxpipe.stages.tts.engines.base import VoiceError
from voxpipe.stages.tts.engines.openai_speech import OpenAISpeechEngine, SpeechError

NEVER = lambda: False  # noqa: E731
PCM24 = AudioFormat(rate=24000, channels=1, sample_width=2)
KEY = "sk-test-0123456789abcdef"


def tone(ms: int, fmt: AudioFormat = PCM24, seed: int = 1) -> bytes:
    """Distinct non-zero samples, so lost, doubled or reordered bytes show."""
    count = fmt.frame_bytes(ms) // 2
    return struct.pack(f"<{count}h", *((seed * 7919 + i * 31) % 20000 + 1 for i in range(count)))


def audio_script(*writes: tuple[float, bytes], content_type: str = "audio/pcm") -> Script:
    return Script(headers={"Content-Type": content_type}, writes=list(writes))


def wav_header(fmt: AudioFormat, data_size: int = 0xFFFFFFFF, tag: int = 1, extra: bytes = b"") -> bytes:
    """A streamed WAV header: sizes unknown, a LIST chunk before the data to be skipped."""
    fmt_chunk = struct.pack("<HHIIHH", tag, fmt.channels, fmt.rate, fmt.rate * fmt.block_align,
                            fmt.block_align, fmt.sample_width * 8)
    info = b"INFOISFT\x05\x00\x00\x00test\x00\x00"
    return (b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt_chunk
            + b"LIST" + struct.pack("<I", len(info)) + info + extra + b"data" + struct.pack("<I", data_size))


@pytest.fixture
def server():
    with WireServer() as wire:
        yield wire


@pytest.fixture
def engine_for(server, monkeypatch):
    monkeypatch.setenv("VP_TEST_SPEECH_KEY", KEY)
    engines = []

    def make(**options) -> OpenAISpeechEngine:
        engine = create_engine("openai-speech", {"base_url": server.url("/v1"), "api_key_env": "VP_TEST_SPEECH_KEY",
                                                 "timeout_s": 10, **options})
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


def test_pcm_request_and_frames(server, engine_for):
    body = tone(700)
    # odd cuts: a sample split across reads must be rejoined, not dropped or shifted
    server.enqueue(audio_script((0, body[:4801]), (0.05, body[4801:20001]), (0.05, body[20001:])))
    engine = engine_for(model="kokoro", voice="af_sky", speed=1.25)
    frames = list(engine.synthesize("Hello there.", NEVER))
    record = server.records[0]
    assert record.path == "/v1/audio/speech"
    assert record.json == {"model": "kokoro", "voice": "af_sky", "input": "Hello there.",
                           "response_format": "pcm", "speed": 1.25}
    assert {name.lower(): value for name, value in record.headers.items()}["authorization"] == f"Bearer {KEY}"
    assert b"".join(frame.pcm for frame in frames) == body
    assert {frame.format for frame in frames} == {PCM24}
    assert all(0 < frame.duration_ms <= 200 for frame in frames)


def test_pcm_rate_is_configurable(server, engine_for):
    server.enqueue(audio_script((0, tone(100, AudioFormat(22050, 1, 2)))))
    frames = list(engine_for(sample_rate=22050).synthesize("Hi.", NEVER))
    assert frames[0].format == AudioFormat(22050, 1, 2) and frames[0].duration_ms == 100


def test_frames_come_while_the_body_is_still_streaming_and_closing_hangs_up(server, engine_for):
    """The second write is 30 s away: the first frame must come from the first write alone, and
    closing the generator (as the tts stage does on cancel) must close the connection."""
    server.enqueue(audio_script((0, tone(100)), (30, tone(100, seed=2))))
    frames = engine_for().synthesize("A long reply.", NEVER)
    started = time.monotonic()
    first = next(frames)
    assert time.monotonic() - started < 10 and first.pcm == tone(100)
    frames.close()
    assert server.next_request().hung_up.wait(5)


def test_should_stop_ends_the_stream_between_reads(server, engine_for):
    server.enqueue(audio_script(*[(0.05, tone(50, seed=i)) for i in range(40)]))
    stop = threading.Event()
    received = []
    for frame in engine_for().synthesize("Stop me.", stop.is_set):
        received.append(frame)
        if len(received) == 2:
            stop.set()
    assert len(received) < 5
    assert server.next_request().hung_up.wait(5)


def test_blank_text_or_stop_before_start_sends_nothing(server, engine_for):
    engine = engine_for()
    assert list(engine.synthesize("  \n", NEVER)) == []
    assert list(engine.synthesize("Hello", lambda: True)) == []
    assert server.records == []


@pytest.mark.parametrize("data_size", [0xFFFFFFFF, 0], ids=["size-ffffffff", "size-0"])
def test_streamed_wav_takes_its_format_from_the_header(server, engine_for, data_size):
    fmt = AudioFormat(16000, 2, 2)
    body = tone(500, fmt)
    header = wav_header(fmt, data_size)
    server.enqueue(audio_script((0, header[:10]), (0.02, header[10:] + body[:999]), (0.02, body[999:]),
                                content_type="audio/wav"))
    frames = list(engine_for(response_format="wav").synthesize("Hello.", NEVER))
    assert server.records[0].json["response_format"] == "wav"
    assert {frame.format for frame in frames} == {fmt}
    assert b"".join(frame.pcm for frame in frames) == body
    assert all(frame.duration_ms <= 200 for frame in frames)


def test_wav_with_a_known_size_ignores_what_follows_the_data(server, engine_for):
    fmt = AudioFormat(22050, 1, 2)
    body = tone(100, fmt)
    server.enqueue(audio_script((0, wav_header(fmt, len(body)) + body + b"junkjunk"), content_type="audio/wav"))
    frames = list(engine_for(response_format="wav").synthesize("Hello.", NEVER))
    assert b"".join(frame.pcm for frame in frames) == body


def test_wav_that_is_not_integer_pcm_is_refused(server, engine_for):
    server.enqueue(audio_script((0, wav_header(PCM24, tag=3) + bytes(400)), content_type="audio/wav"))
    with pytest.raises(SpeechError, match="not integer PCM"):
        list(engine_for(response_format="wav").synthesize("Hello.", NEVER))


def test_401_names_the_key_variable_but_never_the_key(server, engine_for):
    server.enqueue(json_script({"error": {"message": f"Incorrect API key provided: {KEY}. Or {KEY[:8]}..."}},
                               status=401))
    with pytest.raises(SpeechError) as failure:
        list(engine_for().synthesize("Hello.", NEVER))
    text = str(failure.value)
    assert "401" in text and "$VP_TEST_SPEECH_KEY" in text
    assert KEY not in text and KEY[:8] not in text


def bearer(record) -> str:
    return {name.lower(): value for name, value in record.headers.items()}["authorization"]


def test_keys_come_from_a_0600_file_and_reserves_take_over_from_a_refused_key(server, tmp_path, monkeypatch):
    """The same keys as a profile's (services/secrets.py): the file's lines first, then the variables.
    A refused key gives way before any audio, and the one that worked stays in use."""
    keys = tmp_path / "speech.key"
    keys.write_text(f"# speech keys\n{KEY}-old\n")
    keys.chmod(0o600)
    monkeypatch.setenv("VP_TEST_SPEECH_RESERVE", KEY)
    engine = create_engine("openai-speech", {"base_url": server.url("/v1"), "api_key_env": "",
                                             "api_key_file": str(keys), "reserve_key_envs": ["VP_TEST_SPEECH_RESERVE"]})
    server.enqueue(json_script({"error": {"message": "Incorrect API key"}}, status=401),
                   audio_script((0, tone(100))), audio_script((0, tone(100, seed=2))))
    assert b"".join(frame.pcm for frame in engine.synthesize("Hi.", NEVER)) == tone(100)
    assert b"".join(frame.pcm for frame in engine.synthesize("Again.", NEVER)) == tone(100, seed=2)
    assert [bearer(record) for record in server.records] == [f"Bearer {KEY}-old", f"Bearer {KEY}", f"Bearer {KEY}"]
    engine.close()


def test_a_key_file_others_can_read_is_refused_before_any_request(server, tmp_path):
    keys = tmp_path / "speech.key"
    keys.write_text(KEY)
    keys.chmod(0o644)
    with pytest.raises(ValueError, match=rf"key tts.openai-speech.api_key_file: .*Run: chmod 600 {keys}") as refused:
        create_engine("openai-speech", {"base_url": server.url("/v1"), "api_key_file": str(keys)})
    assert KEY not in str(refused.value) and server.records == []


def test_402_after_every_key_says_the_account_needs_credit(server, engine_for, monkeypatch):
    monkeypatch.setenv("VP_TEST_SPEECH_RESERVE", "sk-reserve-0123456789")
    server.enqueue(*[json_script({"error": {"message": "Insufficient credits"}}, status=402)] * 2)
    with pytest.raises(SpeechError) as failure:
        list(engine_for(reserve_key_envs=["VP_TEST_SPEECH_RESERVE"]).synthesize("Hello.", NEVER))
    text = str(failure.value)
    assert "answered 402" in text and "Insufficient credits; the key's account needs credit" in text
    assert len(server.records) == 2


def test_json_instead_of_audio_is_an_error_not_noise(server, engine_for):
    server.enqueue(json_script({"detail": "this is not a speech API"}))
    with pytest.raises(SpeechError, match="not audio"):
        list(engine_for().synthesize("Hello.", NEVER))


def test_unreachable_server_and_timeout_are_clear_errors(server, engine_for):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    engine = OpenAISpeechEngine(base_url=f"http://127.0.0.1:{closed_port}/v1", api_key_env="")
    with pytest.raises(SpeechError, match="cannot reach"):
        list(engine.synthesize("Hello.", NEVER))
    server.enqueue(Script(stall=5))
    with pytest.raises(SpeechError, match=r"did not answer within 0\.3 s"):
        list(engine_for(timeout_s=0.3).synthesize("Hello.", NEVER))


def test_bad_options_fail_at_construction():
    with pytest.raises(ValueError, match="response_format"):
        OpenAISpeechEngine(response_format="mp3")


def test_a_chosen_voice_is_sent_and_a_refused_one_is_a_voice_error(server, engine_for):
    server.enqueue(audio_script((0, tone(100))),
                   json_script({"error": {"message": f"Voice 'nope' not found. Key {KEY}"}}, status=400),
                   json_script({"error": {"message": "input too long"}}, status=400))
    engine = engine_for(voice="alloy")
    assert b"".join(frame.pcm for frame in engine.synthesize("Hi.", NEVER, "nova")) == tone(100)
    assert server.records[0].json["voice"] == "nova"
    with pytest.raises(VoiceError) as refused:
        list(engine.synthesize("Hi.", NEVER, "nope"))
    text = str(refused.value)
    assert "refused voice 'nope' (400: " in text and "not found" in text and KEY not in text
    with pytest.raises(SpeechError, match="400"):   # without a chosen voice, a 400 is not the voice's fault
        list(engine.synthesize("Hi.", NEVER))
    assert [record.json["voice"] for record in server.records] == ["nova", "nope", "alloy"]


@contextmanager
def speech_stage(server: WireServer) -> Iterator[Path]:
    """A bus and a tts stage that speaks through `server`, configured only by environment variables;
    yields the runtime directory."""
    runtime = Path(tempfile.mkdtemp(prefix="vp-rt-")) / "run"
    env = {"VOXPIPE_TTS__ENGINE": "openai-speech",
           "VOXPIPE_TTS__OPENAI-SPEECH__BASE_URL": server.url("/v1"),
           "VOXPIPE_TTS__OPENAI-SPEECH__API_KEY_ENV": ""}
    processes = [start_stage(name, runtime, **env) for name in ("bus", "tts")]
    try:
        wait_ready(runtime, "tts")
        yield runtime
    finally:
        for process in reversed(processes):
            code, err = stop_process(process)
            assert code == 0, err


def test_tts_stage_speaks_through_the_engine_from_config(server):
    """The real stage, configured only by environment variables, publishes the server's audio."""
    body = tone(450)
    server.route("/v1/audio/speech", audio_script((0, body[:9000]), (0.05, body[9000:])))
    with speech_stage(server) as runtime:
        client = connect(runtime, "test", "audio")
        client.publish("s1", "r1", Chunk(text="Hello there.", index=0, final=True))
        frames = []
        while not (frames and frames[-1].body.last):
            message = client.receive(20)
            assert message is not None, "no audio from the tts stage"
            if message.kind == "audio":
                frames.append(message)
        assert b"".join(frame.body.pcm for frame in frames) == body
        assert {(f.body.rate, f.body.channels, f.body.width, f.body.chars) for f in frames} == {(24000, 1, 2, 12)}
        assert [frame.body.frame for frame in frames] == list(range(len(frames)))
        client.close()


def test_an_engine_error_in_one_chunk_does_not_stop_the_next(server):
    """The server fails the first chunk (500); the stage reports it, ends that chunk, speaks the next."""
    body = tone(300)
    server.enqueue(json_script({"error": {"message": "engine overloaded"}}, status=500),
                   audio_script((0, body)))
    with speech_stage(server) as runtime:
        client = connect(runtime, "test", "audio", "error")
        client.publish("f1", "r1", Chunk(text="First sentence.", index=0, final=False))
        client.publish("f1", "r1", Chunk(text="Second sentence.", index=1, final=True))
        frames, errors = [], []
        while not (frames and frames[-1].body.last and frames[-1].body.final):
            message = client.receive(20)
            assert message is not None, "the tts stage stopped after the failed chunk"
            (frames if message.kind == "audio" else errors).append(message)
        client.close()
        first = [f for f in frames if f.body.chunk == 0]
        second = [f for f in frames if f.body.chunk == 1]
        assert [(f.body.pcm, f.body.last) for f in first] == [(b"", True)]
        assert b"".join(f.body.pcm for f in second) == body
        assert [(e.body.code, e.id) for e in errors if e.body.code == "tts_failed"] == [("tts_failed", "r1")]
        assert "500" in next(e.body.message for e in errors if e.body.code == "tts_failed")


def test_a_voice_the_server_refuses_is_reported_and_the_configured_voice_speaks(server):
    body = tone(300)
    server.enqueue(json_script({"error": {"message": "Voice 'nope' not found"}}, status=400), audio_script((0, body)))
    with speech_stage(server) as runtime:
        client = connect(runtime, "test", "audio", "error")
        client.publish("v1", "r1", Request(text="Say hello.", voice="nope"))
        client.publish("v1", "r1", Chunk(text="Hello.", index=0, final=True))
        frames, errors = [], []
        while not (frames and frames[-1].body.last):
            message = client.receive(20)
            assert message is not None, "no audio from the tts stage"
            (frames if message.kind == "audio" else errors).append(message)
        client.close()
    assert b"".join(frame.body.pcm for frame in frames) == body
    assert [(e.body.code, e.id) for e in errors] == [("unknown_voice", "r1")]
    assert "'nope'" in errors[0].body.message and "not found" in errors[0].body.message
    assert [record.json["voice"] for record in server.records] == ["nope", "alloy"]
