"""The player core in-process: reply and frame order, cancel, the stall deadline, the last frame of
a chunk, and where a cut falls: which chunk was sounding and how much of it was heard."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from voxpipe import protocol
from voxpipe.protocol import Audio, Message, Playback
from voxpipe.runtime.replies import MEMORY
from voxpipe.stages.audio import AudioFormat
from voxpipe.stages.player.core import SPEECH_MS_PER_CHAR, Playlist, Timeline, Wait, audio_format, playback

FMT = AudioFormat(1000, 1, 2)
"""One sample a millisecond: a frame of `ms` milliseconds is `ms` samples."""


def sound(chunk: int, ms: int, last: bool = False, final: bool = False, chars: int = 10,
          pcm: bytes | None = None) -> Audio:
    """An audio body of `ms` milliseconds."""
    return Audio(chunk=chunk, frame=0, rate=FMT.rate, channels=1, width=2, pcm=b"\x01\x00" * ms if pcm is None else pcm,
                 last=last, final=final, chars=chars)


def audio(chunk: int, ms: int, last: bool = False, final: bool = False, chars: int = 10, id: str = "r1",
          session: str = "s1", pcm: bytes | None = None) -> Message[Audio]:
    return Message(sound(chunk, ms, last, final, chars, pcm), session, id, ts=5.0, src="t")


def written(*frames: Audio) -> Timeline:
    """A timeline of these frames, written as the shell writes them."""
    timeline = Timeline()
    for frame in frames:
        timeline.frame(frame)
        timeline.wrote(audio_format(frame).duration_ms(len(frame.pcm)))
        if frame.last:
            timeline.chunk_ended()
    return timeline


# --- the heard fraction -------------------------------------------------------------------------------

WHOLE = (sound(0, 600, chars=30), sound(0, 400, last=True, chars=30), sound(1, 1000, last=True, chars=50))


@pytest.mark.parametrize(("frames", "played", "waiting", "expected"), [
    pytest.param((), 0.0, (), (None, 0.0), id="no chunk started"),
    pytest.param(WHOLE, 0.0, (), (0, 0.0), id="none of it played: the first chunk, unheard"),
    pytest.param(WHOLE, 250.0, (), (0, 0.25), id="inside a whole chunk"),
    pytest.param(WHOLE, 1500.0, (), (1, 0.5), id="inside the next chunk"),
    pytest.param(WHOLE, 2000.0, (), (1, 1.0), id="played to the end"),
    pytest.param((*WHOLE[:2], sound(1, 200, chars=50)), 800.0, (), (0, 0.8),
                 id="finished and started run ahead of the sound: the cut is in the chunk sounding"),
    pytest.param((sound(0, 200, chars=12),), 100.0, (sound(0, 300, last=True, chars=12),), (0, 0.2),
                 id="the last frame came but was not written: the chunk's length is known"),
    pytest.param((sound(0, 200, chars=12),), 100.0, (sound(0, 300, chars=12), sound(1, 500, last=True)),
                 (0, 100 / (12 * SPEECH_MS_PER_CHAR)), id="no last frame: at least the text at the usual rate"),
    pytest.param((sound(0, 200, chars=2),), 100.0, (sound(0, 300, chars=2),), (0, 0.2),
                 id="no last frame, but more audio came than the text would take"),
    pytest.param((sound(0, 400, last=True, chars=10), sound(1, 200, chars=20)), 600.0, (), (1, 0.25),
                 id="no last frame: the text at the rate of the reply's whole chunks (40 ms a character)"),
    pytest.param((sound(0, 200, last=True), sound(1, 0, last=True, pcm=b"")), 200.5, (), (1, 1.0),
                 id="a chunk without audio, played past"),
    pytest.param((sound(0, 1000, last=True),), 1200.0, (), (0, 1.0), id="never more than the whole chunk"),
])
def test_where_a_cut_falls(frames: tuple[Audio, ...], played: float, waiting: tuple[Audio, ...],
                           expected: tuple[int | None, float]) -> None:
    span, heard = written(*frames).cut(played, waiting)
    assert (span.chunk if span else None, heard) == (expected[0], pytest.approx(expected[1]))


def test_the_stopped_event_names_the_sounding_chunk_and_the_characters_heard() -> None:
    timeline = written(*WHOLE[:2], sound(1, 200, chars=50))
    assert timeline.stopped(800.0, [], "/tmp/r.wav", 0.8) == Playback(
        event="stopped", chunk=0, path="/tmp/r.wav", final=True, heard=0.8, heard_chars=24, audio_ts=0.0, audio_s=0.8)
    assert Timeline().stopped(0.0, [], None, 0.0) == playback("stopped", -1)


spans = st.lists(st.tuples(st.integers(0, 400), st.integers(0, 60), st.booleans()), min_size=1, max_size=6)


@given(spans, st.floats(0, 3000), st.floats(0, 3000), st.integers(0, 400), st.booleans())
def test_heard_is_a_fraction_that_only_grows_as_more_plays(chunks: list[tuple[int, int, bool]], first: float,
                                                         second: float, queued: int, queued_last: bool) -> None:
    """Whole chunks but the last one, which may still lack its last frame; a frame of it may be waiting."""
    frames = [sound(index, ms, last=index < len(chunks) - 1 or done, chars=chars)
              for index, (ms, chars, done) in enumerate(chunks)]
    timeline = written(*frames)
    waiting = [sound(len(chunks) - 1, queued, last=queued_last, chars=chunks[-1][1])]
    (early_span, early), (late_span, late) = (timeline.cut(played, waiting) for played in sorted((first, second)))
    assert 0.0 <= early <= 1.0 and 0.0 <= late <= 1.0
    assert early_span is not None and late_span is not None and early_span.chunk <= late_span.chunk
    if early_span is late_span:
        assert early <= late


def test_a_chunk_starts_at_its_first_frame_and_ends_at_its_last() -> None:
    timeline = Timeline()
    assert timeline.frame(sound(0, 100)) and not timeline.frame(sound(0, 100))
    timeline.wrote(250.0)
    timeline.chunk_ended()
    assert timeline.frame(sound(2, 100))  # chunk 1's frames were lost: chunk 2 starts anyway
    assert [(s.chunk, s.start_ms, s.end_ms) for s in timeline.spans] == [(0, 0.0, 250.0), (2, 250.0, None)]


def test_playback_bodies() -> None:
    assert playback("started", 3, audio_ts=5.0) == Playback(
        event="started", chunk=3, path="", final=False, heard=0.0, heard_chars=0, audio_ts=5.0, audio_s=0.0)
    finished = playback("finished", 1, "/x.wav", final=True, heard=1.0, chars=7, audio_s=1.5)
    assert (finished.final, finished.heard_chars, finished.path) == (True, 7, "/x.wav")
    assert playback("stopped", 0, heard=0.5, chars=5).final  # a stop ends the reply
    protocol.encode(Message(finished, "s", "r", src="t"))  # a valid message


# --- the playlist ---------------------------------------------------------------------------------------

def test_replies_play_in_the_order_their_first_frame_came_and_frames_in_order() -> None:
    playlist = Playlist()
    sent = [audio(0, 10, id="a"), audio(0, 10, id="b"), audio(1, 10, id="a")]
    assert all(playlist.audio(message) for message in sent)
    reply = playlist.take()
    assert (reply.id, playlist.playing) == ("a", ("s1", "a"))
    assert [playlist.next_frame(reply, 0.0, 1.0) for _ in range(2)] == [sent[0], sent[2]]
    playlist.done(reply)
    assert playlist.playing is None and playlist.take().id == "b"
    playlist.audio(audio(2, 10, id="a"))  # a late frame of a reply that played out
    assert list(playlist.replies) == [("s1", "b")]


def test_a_frame_that_is_not_whole_samples_is_refused() -> None:
    playlist = Playlist()
    assert not playlist.audio(audio(0, 0, pcm=b"\x01\x00\x02"))
    assert not playlist.replies


def test_waiting_for_a_frame_ends_at_the_stall_deadline() -> None:
    playlist = Playlist()
    playlist.audio(audio(0, 10))
    reply = playlist.take()
    first = playlist.next_frame(reply, 0.0, 15.0)
    assert isinstance(first, Message)
    assert playlist.next_frame(reply, 14.9, 15.0) == Wait(15.0)
    assert playlist.next_frame(reply, 15.0, 15.0) is None


@pytest.mark.parametrize(("cancel", "dropped", "silence", "left"), [
    (("s1", "a"), [], True, ["b", "c"]),        # the playing reply: silence the backend; the worker sends its event
    (("s1", "b"), ["b"], False, ["a", "c"]),    # a queued one: its stopped event now
    (("s1", ""), ["b"], True, ["c"]),           # the whole session
    (("s2", ""), ["c"], False, ["a", "b"]),
    (("s1", "later"), [], False, ["a", "b", "c"]),  # a reply whose audio has not come yet
])
def test_a_cancel_ends_the_playing_or_queued_replies(cancel: tuple[str, str], dropped: list[str], silence: bool,
                                                     left: list[str]) -> None:
    playlist = Playlist()
    for session, id in (("s1", "a"), ("s1", "b"), ("s2", "c")):
        playlist.audio(audio(0, 10, id=id, session=session))
    playing = playlist.take()
    ended, stop = playlist.cancel(*cancel)
    assert ([reply.id for reply in ended], stop) == (dropped, silence)
    assert playlist.is_cut(playing) == silence
    assert [reply.id for reply in playlist.replies.values()] == left
    late = cancel[1] or {"s1": "b", "s2": "c"}[cancel[0]]
    playlist.audio(audio(1, 10, id=late, session=cancel[0]))  # late frames of what ended are dropped
    assert [reply.id for reply in playlist.replies.values()] == left
    assert playlist.cancel(*cancel) == ([], silence)  # once is enough


def test_a_cut_reply_gives_no_more_frames_even_when_some_came() -> None:
    playlist = Playlist()
    playlist.audio(audio(0, 10))
    playlist.audio(audio(0, 10))
    reply = playlist.take()
    playlist.cancel("s1", "r1")
    assert playlist.is_cut(reply) and playlist.next_frame(reply, 0.0, 15.0) is None


def test_stopping_cuts_the_playing_reply_once_its_frames_run_out() -> None:
    playlist = Playlist()
    playlist.audio(audio(0, 10))
    reply = playlist.take()
    playlist.stopping = True
    assert playlist.is_cut(reply)
    assert isinstance(playlist.next_frame(reply, 0.0, 15.0), Message)  # the shell sees the cut after it
    assert playlist.next_frame(reply, 0.0, 15.0) is None


def test_ended_replies_are_remembered_up_to_the_limit() -> None:
    playlist = Playlist()
    for n in range(MEMORY + 1):
        playlist.cancel("s1", f"r{n}")
    assert len(playlist.replies.ended) == MEMORY
    playlist.audio(audio(0, 10, id="r0"))  # forgotten: its frames play again
    playlist.audio(audio(0, 10, id="r1"))
    assert list(playlist.replies) == [("s1", "r0")]
