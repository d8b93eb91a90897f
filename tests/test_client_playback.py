"""A reply played on the client (request `playback` "client", as the browser front-end asks): tts still
speaks it, the daemon's player stays silent for it, and history records what the client reports it
played exactly as it records the player's events.

The daemon is real (fake OpenAI server, espeak-ng, the wav player, so a reply the player played
leaves a file); the test stands in for the front-end that plays the audio itself.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness import Daemon, fake_openai, openai_settings
from tests.test_player_heard import Watch, stored
from voxpipe.protocol import Audio, Cancel, Message, Playback, Request
from voxpipe.runtime.replies import MEMORY
from voxpipe.stages.player.core import Playlist

KEY = {"FAKE_OPENAI_KEY": "test-key"}
QUESTION = "Tell me a story about a small red fox that lives by the river"
FIRST = "Echo: Tell me a story about a small red fox"
"""The reply's first chunk: the chunker cuts it early, for a fast first sound."""
HEARD = 0.4
HEARD_TEXT = "Echo: Tell me a"
"""FIRST cut at 0.4 of its 43 characters: 17, one character into "story", which so counts as unheard."""


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    with fake_openai() as llm, Daemon({**openai_settings(llm), "tts": {"engine": "espeak"},
                                       "player": {"backend": "wav"}}, env=KEY) as running:
        yield running


def final_audio(message: Message) -> bool:
    return isinstance(message.body, Audio) and message.body.last and message.body.final


def test_the_player_skips_a_reply_the_client_plays_and_still_plays_a_plain_one(daemon: Daemon) -> None:
    watch = Watch(daemon, "skip")
    watch.client.publish("skip", "client-1", Request(text=QUESTION, playback="client"))
    watch.until("the client reply's final audio", lambda m: final_audio(m) and m.id == "client-1")
    # a plain request after it: the player plays replies in the order their audio came, so once this
    # one has played out, anything the player did with the first one has happened
    watch.client.publish("skip", "plain-1", Request(text="Hello there.", playback="daemon"))
    watch.until("the plain reply's final playback",
                lambda m: isinstance(m.body, Playback) and m.body.final and m.id == "plain-1", timeout=60)
    watch.client.close()

    assert watch.first("audio", lambda m: m.id == "client-1") is not None, "tts speaks a client reply too"
    assert watch.first("playback", lambda m: m.id == "client-1") is None, "the player reported a client reply"
    played = watch.first("playback", lambda m: m.id == "plain-1" and m.body.final)
    assert played is not None and played[1].body.event == "finished"
    assert [path.name for path in daemon.wav_dir.iterdir()] == ["skip-plain-1.wav"]


def test_history_records_what_a_client_reports_it_played_as_it_does_the_players(daemon: Daemon) -> None:
    """The client played the first chunk and was stopped 40 % into it (Stop: a cancel, then the final
    `stopped`): history stores the heard text cut there, and the reply's metrics take their playback
    times from the client's events."""
    watch = Watch(daemon, "heard")
    request = watch.client.publish("heard", "client-1", Request(text=QUESTION, playback="client"))
    watch.until("the final audio", final_audio)
    watch.until("llm.done", lambda m: m.kind == "llm.done")
    chunk = watch.first("chunk", lambda m: m.body.index == 0)
    first_audio = watch.first("audio", lambda m: m.body.chunk == 0)
    assert chunk is not None and first_audio is not None and chunk[1].body.text == FIRST
    chars = first_audio[1].body.chars
    watch.client.publish("heard", "client-1", Playback(event="started", chunk=0, audio_ts=first_audio[1].ts))
    watch.client.publish("heard", "", Cancel(reason="stop"))
    watch.client.publish("heard", "client-1", Playback(event="stopped", chunk=0, final=True, heard=HEARD,
                                                       heard_chars=round(HEARD * chars), audio_s=1.2))
    final = watch.until("the client's final playback", lambda m: isinstance(m.body, Playback) and m.body.final)

    metrics = watch.metrics(request, lambda: final, "ok")
    watch.client.close()
    spoken, interrupted, status = stored(daemon.db_path, "heard", lambda text: text == HEARD_TEXT)
    assert (spoken, interrupted, status) == (HEARD_TEXT, 1, "ok")
    assert metrics.audio_s == 1.2 and 0 < metrics.first_audio_ms < metrics.first_playback_ms < metrics.end_ms
    assert {m.src for _, m in watch.seen if isinstance(m.body, Playback)} == {"heard-test"}, \
        "the player must not report a client reply"


# --- the player's core: where it remembers client replies ----------------------------------------

def request(id: str, playback: str) -> Message[Request]:
    return Message(Request(text="hi", playback=playback), "s1", id, ts=1.0, src="t")


def audio(id: str) -> Message[Audio]:
    return Message(Audio(chunk=0, frame=0, rate=1000, channels=1, width=2, pcm=b"\0\0" * 10, last=True, final=True),
                   "s1", id, ts=2.0, src="t")


@pytest.mark.unit
def test_only_a_reply_whose_request_said_client_is_skipped() -> None:
    playlist = Playlist()
    playlist.request(request("client", "client"))
    playlist.request(request("daemon", "daemon"))
    playlist.request(request("default", ""))
    for id in ("client", "daemon", "default", "never-asked"):
        assert playlist.audio(audio(id))
    assert [key[1] for key in playlist.replies] == ["daemon", "default", "never-asked"]


@pytest.mark.unit
def test_the_player_remembers_only_the_newest_client_replies() -> None:
    playlist = Playlist()
    for index in range(MEMORY + 1):
        playlist.request(request(f"r{index}", "client"))
    assert len(playlist.elsewhere) == MEMORY
    playlist.audio(audio("r0"))  # pushed out long ago: its audio is long past, so it plays
    playlist.audio(audio(f"r{MEMORY}"))
    assert [key[1] for key in playlist.replies] == ["r0"]
