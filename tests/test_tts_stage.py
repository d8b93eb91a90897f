"""The tts stage with real espeak-ng in a real process: languages, order across sessions, cancel, voices."""

from __future__ import annotations

import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from tests.harness import connect, start_stage, stop_process, wait_ready
from tests.test_tts_espeak import EN, RU, crossings, same_speech
from voxpipe.config import load
from voxpipe.protocol import Cancel, Chunk, Message, Request
from voxpipe.runtime.shard import Shard
from voxpipe.stages.tts.stage import TtsStage


@pytest.fixture()
def bus() -> Iterator[Path]:
    runtime = Path(tempfile.mkdtemp(prefix="vp-tts-")) / "run"
    broker = start_stage("bus", runtime)
    connect(runtime, "probe").close()
    yield runtime
    stop_process(broker)


@pytest.fixture()
def tts(bus: Path) -> Iterator[Path]:
    stage = start_stage("tts", bus)
    wait_ready(bus, "tts")
    yield bus
    assert stop_process(stage)[0] == 0


def collect(client, until, timeout: float = 30.0) -> list[Message]:
    messages: list[Message] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not until(messages):
        message = client.receive(0.5)
        if message is not None:
            messages.append(message)
    return messages


def send_chunks(client, session: str, texts: list[str], reply: str = "r1") -> None:
    for index, text in enumerate(texts):
        client.publish(session, reply, Chunk(text=text, index=index, final=index == len(texts) - 1))


def audio_by_chunk(messages: list[Message]) -> dict[int, list[Message]]:
    chunks: dict[int, list[Message]] = defaultdict(list)
    for message in messages:
        if message.kind == "audio":
            chunks[message.body.chunk].append(message)
    return chunks


def finished(messages: list[Message], count: int = 1) -> bool:
    return sum(1 for m in messages if m.kind == "audio" and m.body.last and m.body.final) >= count


def test_russian_english_and_mixed_chunks_become_audio(tts: Path) -> None:
    client = connect(tts, "speaker", "audio", "error")
    texts = ["Привет! Как дела?", "Hello there, how are you?", "Это test на двух языках.", ""]
    send_chunks(client, "lang", texts)
    messages = collect(client, finished)
    client.close()
    chunks = audio_by_chunk(messages)
    assert sorted(chunks) == [0, 1, 2, 3]
    for index, frames in chunks.items():
        assert [f.body.frame for f in frames] == list(range(len(frames)))
        assert [f.body.last for f in frames] == [False] * (len(frames) - 1) + [True]
        assert all(f.body.chars == len(texts[index]) for f in frames)
        assert all(len(f.body.pcm) <= 22050 * 2 * 0.2 for f in frames)       # at most 200 ms each
        assert {(f.body.rate, f.body.channels, f.body.width) for f in frames if f.body.pcm} <= {(22050, 1, 2)}
    for index in (0, 1, 2):
        assert sum(len(f.body.pcm) for f in chunks[index]) > 22050 * 2 * 0.5  # real speech, > 0.5 s
    assert sum(len(f.body.pcm) for f in chunks[3]) == 0                      # an empty final chunk ends it
    assert not [m for m in messages if m.kind == "error"]


def test_order_is_kept_under_twenty_concurrent_sessions(tts: Path) -> None:
    client = connect(tts, "orderly", "audio")
    sessions = [f"s{n}" for n in range(20)]
    for index in range(3):                       # interleave: chunk 0 of all, then 1, then 2
        for session in sessions:
            client.publish(session, "r", Chunk(text=f"Sentence {index} for {session}.", index=index,
                                               final=index == 2))
    messages = collect(client, lambda got: finished(got, 20), timeout=60)
    client.close()
    per_session: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for message in messages:
        per_session[message.session].append((message.body.chunk, message.body.frame))
    assert sorted(per_session) == sorted(sessions)
    for session, order in per_session.items():
        assert order == sorted(order), f"{session} audio out of order"
        assert {chunk for chunk, _ in order} == {0, 1, 2}


def test_cancel_mid_reply_stops_that_sessions_audio_only(tts: Path) -> None:
    client = connect(tts, "canceller", "audio")
    long_reply = [f"This is sentence number {n} of a long reply that keeps going." for n in range(40)]
    send_chunks(client, "long", long_reply)
    send_chunks(client, "other", ["A short and independent reply."])
    first = collect(client, lambda got: any(m.session == "long" for m in got))
    client.publish("long", "", Cancel(reason="barge-in"))
    cancelled_at = time.monotonic()
    rest = collect(client, lambda got: finished([m for m in got if m.session == "other"]), timeout=30)
    late = collect(client, lambda got: False, timeout=1.0)
    client.close()
    long_audio = [m for m in first + rest + late if m.session == "long"]
    assert not any(m.body.final for m in long_audio), "the cancelled reply was synthesised to the end"
    assert len({m.body.chunk for m in long_audio}) < 5
    assert not [m for m in late if m.session == "long"], "audio kept coming after cancel"
    assert finished([m for m in rest if m.session == "other"])
    assert time.monotonic() - cancelled_at < 30


def pcm_by_reply(messages: list[Message]) -> dict[tuple[str, str], bytes]:
    spoken: dict[tuple[str, str], bytes] = defaultdict(bytes)
    for message in messages:
        if message.kind == "audio":
            spoken[(message.session, message.id)] += message.body.pcm
    return spoken


def test_each_reply_speaks_in_the_voice_of_its_request(tts: Path) -> None:
    client = connect(tts, "voices", "audio", "error")
    replies = {("v1", "auto"): ("", RU), ("v1", "en"): ("en", RU),
               ("v2", "plain"): ("", EN), ("v2", "f3"): ("en+f3", EN)}
    for (session, reply), (voice, text) in replies.items():
        client.publish(session, reply, Request(text="Say something.", voice=voice))
        send_chunks(client, session, [text], reply)
    messages = collect(client, lambda got: finished(got, len(replies)))
    client.close()
    assert not [m for m in messages if m.kind == "error"]
    spoken = pcm_by_reply(messages)
    assert len(spoken["v1", "en"]) > 1.5 * len(spoken["v1", "auto"])  # en spells the Cyrillic letters out
    assert crossings(spoken["v2", "f3"]) > 1.2 * crossings(spoken["v2", "plain"])  # the female variant is higher


def test_an_unknown_voice_is_reported_once_and_the_reply_speaks_in_the_configured_voice(tts: Path) -> None:
    client = connect(tts, "unknown-voice", "audio", "error")
    texts = ["Hello there, how are you?", EN]
    client.publish("u1", "bad", Request(text="Say something.", voice="xx-nope"))
    send_chunks(client, "u1", texts, "bad")
    send_chunks(client, "u2", texts, "none")  # chunks without any request: the configured voice
    messages = collect(client, lambda got: finished(got, 2))
    client.close()
    errors = [m for m in messages if m.kind == "error"]
    assert [(m.body.code, m.session, m.id, m.body.ref_kind, m.src) for m in errors] == \
        [("unknown_voice", "u1", "bad", "request", "tts")]
    text = errors[0].body.message
    assert text.startswith("voice 'xx-nope' cannot be used, so the configured voice speaks: ")
    assert "Languages: af, " in text and ", f3, " in text
    chunks = {session: audio_by_chunk([m for m in messages if m.session == session]) for session in ("u1", "u2")}
    for index in range(len(texts)):
        bad, configured = (b"".join(f.body.pcm for f in chunks[session][index]) for session in ("u1", "u2"))
        assert len(bad) > 22050 * 2 * 0.5 and same_speech(bad, configured)


def test_a_request_with_a_bad_voice_field_is_rejected_with_an_error(tts: Path) -> None:
    client = connect(tts, "bad-voice", "audio", "error")
    for seq, voice in enumerate([5, "v" * 65]):
        payload = {"v": 1, "kind": "request", "session": "b1", "id": "r1", "seq": seq, "ts": time.time(),
                   "src": "bad-voice", "text": "Say something.", "voice": voice}
        client.send_raw(b"request/b1 " + msgpack.packb(payload, use_bin_type=True))
    send_chunks(client, "b1", [EN])
    messages = collect(client, finished)
    client.close()
    rejected = [m.body.message for m in messages if m.kind == "error" and m.body.code == "invalid_message"]
    assert len(rejected) == 2
    assert "request: field 'voice' must be a string, got int" in rejected[0]
    assert "request: field 'voice' is 65 characters, the limit is 64" in rejected[1]
    assert sum(len(m.body.pcm) for m in messages if m.kind == "audio") > 22050 * 2 * 0.5  # the stage goes on


def test_a_shard_remembers_only_its_own_sessions_voices_and_at_most_4096(tmp_path: Path) -> None:
    """The real stage class and dispatch (with its shard filter) in this process; the null engine."""
    config = load(env={"XDG_CONFIG_HOME": str(tmp_path), "VOXPIPE_BUS__RUNTIME_DIR": str(tmp_path / "run"),
                       "VOXPIPE_TTS__ENGINE": "null"})
    shard = Shard(0, 2)
    stage = TtsStage(config, shard)
    stage.prepare()
    sessions = [f"s{n}" for n in range(10_000)]
    for session in sessions:
        stage._dispatch(Message(Request(text="Hi", voice="ru"), session, "r", src="t"))
        stage._dispatch(Message(Request(text="Hi"), session, "plain", src="t"))
    own = [(session, "r") for session in sessions if shard.owns(session)]
    assert 4096 < len(own) < len(sessions)
    # the newest, never another shard's, never an empty voice
    assert stage.queue.replies.items() == [(reply, "ru") for reply in own[-4096:]]
    assert stage.bus.counters["foreign"] == 2 * (len(sessions) - len(own))
    session = own[-1][0]
    stage._dispatch(Message(Cancel(), session, "r", src="t"))
    assert (session, "r") not in stage.queue.replies and len(stage.queue.replies) == 4095
    assert stage.bus.counters["failures"] == 0
    stage.engine.close()
