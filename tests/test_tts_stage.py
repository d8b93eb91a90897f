"""The tts stage with real espeak-ng in a real process: languages, order across sessions, cancel."""

from __future__ import annotations

import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import pytest

from services.protocol import Message
from tests.harness import connect, start_stage, stop_process, wait_ready


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
        client.publish("chunk", session, reply, text=text, index=index, final=index == len(texts) - 1)


def audio_by_chunk(messages: list[Message]) -> dict[int, list[Message]]:
    chunks: dict[int, list[Message]] = defaultdict(list)
    for message in messages:
        if message.kind == "audio":
            chunks[message["chunk"]].append(message)
    return chunks


def finished(messages: list[Message], count: int = 1) -> bool:
    return sum(1 for m in messages if m.kind == "audio" and m["last"] and m["final"]) >= count


def test_russian_english_and_mixed_chunks_become_audio(tts: Path) -> None:
    client = connect(tts, "speaker", "audio", "error")
    texts = ["Привет! Как дела?", "Hello there, how are you?", "Это test на двух языках.", ""]
    send_chunks(client, "lang", texts)
    messages = collect(client, finished)
    client.close()
    chunks = audio_by_chunk(messages)
    assert sorted(chunks) == [0, 1, 2, 3]
    for index, frames in chunks.items():
        assert [f["frame"] for f in frames] == list(range(len(frames)))
        assert [f["last"] for f in frames] == [False] * (len(frames) - 1) + [True]
        assert all(f["chars"] == len(texts[index]) for f in frames)
        assert all(len(f["pcm"]) <= 22050 * 2 * 0.2 for f in frames)       # at most 200 ms each
        assert {(f["rate"], f["channels"], f["width"]) for f in frames if f["pcm"]} <= {(22050, 1, 2)}
    for index in (0, 1, 2):
        assert sum(len(f["pcm"]) for f in chunks[index]) > 22050 * 2 * 0.5  # real speech, > 0.5 s
    assert sum(len(f["pcm"]) for f in chunks[3]) == 0                      # an empty final chunk ends it
    assert not [m for m in messages if m.kind == "error"]


def test_order_is_kept_under_twenty_concurrent_sessions(tts: Path) -> None:
    client = connect(tts, "orderly", "audio")
    sessions = [f"s{n}" for n in range(20)]
    for index in range(3):                       # interleave: chunk 0 of all, then 1, then 2
        for session in sessions:
            client.publish("chunk", session, "r", text=f"Sentence {index} for {session}.", index=index,
                           final=index == 2)
    messages = collect(client, lambda got: finished(got, 20), timeout=60)
    client.close()
    per_session: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for message in messages:
        per_session[message.session].append((message["chunk"], message["frame"]))
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
    client.publish("cancel", "long", "", reason="barge-in")
    cancelled_at = time.monotonic()
    rest = collect(client, lambda got: finished([m for m in got if m.session == "other"]), timeout=30)
    late = collect(client, lambda got: False, timeout=1.0)
    client.close()
    long_audio = [m for m in first + rest + late if m.session == "long"]
    assert not any(m["final"] for m in long_audio), "the cancelled reply was synthesised to the end"
    assert len({m["chunk"] for m in long_audio}) < 5
    assert not [m for m in late if m.session == "long"], "audio kept coming after cancel"
    assert finished([m for m in rest if m.session == "other"])
    assert time.monotonic() - cancelled_at < 30
