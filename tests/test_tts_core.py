"""The tts core in-process: frame numbering and the last frame, chunk order, cancel, voices, memory."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from voxpipe import protocol
from voxpipe.protocol import Audio, Chunk, Message, Request
from voxpipe.runtime.replies import MEMORY
from voxpipe.stages.audio import AudioFormat, PcmFrame
from voxpipe.stages.tts.core import SILENT_FORMAT, FrameNumbers, SpeechQueue

FMT = AudioFormat(22050, 1, 2)


def chunk(session: str = "s1", id: str = "r1", index: int = 0, text: str = "Hello.",
          final: bool = False) -> Message[Chunk]:
    return Message(Chunk(text=text, index=index, final=final), session, id, src="t")


def request(session: str = "s1", id: str = "r1", voice: str = "") -> Message[Request]:
    return Message(Request(text="Hi", voice=voice), session, id, src="t")


def number(message: Message[Chunk], frames: list[PcmFrame]) -> list[Audio]:
    """The audio bodies in the order the shell publishes them."""
    numbers = FrameNumbers(message.body)
    bodies = [body for frame in frames if (body := numbers.push(frame)) is not None]
    return [*bodies, numbers.finish()]


# --- frames ---------------------------------------------------------------------------------------

def test_a_chunk_without_audio_still_ends_with_one_empty_last_frame() -> None:
    assert number(chunk(index=3, text="", final=True), []) == [
        Audio(chunk=3, frame=0, rate=SILENT_FORMAT.rate, channels=1, width=2, pcm=b"", last=True, final=True,
              chars=0)]


def test_a_frame_goes_out_only_once_the_next_one_came() -> None:
    numbers = FrameNumbers(chunk(text="Hi there").body)
    first, second = PcmFrame(b"\x01\x00", FMT), PcmFrame(b"\x02\x00" * 2, AudioFormat(24000, 2, 2))
    assert numbers.push(first) is None
    assert numbers.push(second) == Audio(chunk=0, frame=0, rate=22050, channels=1, width=2, pcm=b"\x01\x00",
                                         last=False, final=False, chars=8)
    assert numbers.finish() == Audio(chunk=0, frame=1, rate=24000, channels=2, width=2, pcm=b"\x02\x00" * 2,
                                     last=True, final=False, chars=8)


@given(st.lists(st.binary(max_size=8).map(lambda pcm: pcm[:len(pcm) // 2 * 2]), max_size=20), st.booleans())
def test_frames_are_numbered_in_order_and_exactly_one_is_last(pcms: list[bytes], final: bool) -> None:
    bodies = number(chunk(index=7, final=final), [PcmFrame(pcm, FMT) for pcm in pcms])
    assert [body.frame for body in bodies] == list(range(max(len(pcms), 1)))
    assert [body.last for body in bodies] == [False] * (len(bodies) - 1) + [True]
    assert b"".join(body.pcm for body in bodies) == b"".join(pcms)
    assert {(body.chunk, body.final, body.chars) for body in bodies} == {(7, final, 6)}
    for body in bodies:  # each is a valid audio message
        protocol.encode(Message(body, "s", "r", src="t"))


# --- the queue --------------------------------------------------------------------------------------

def test_chunks_are_spoken_in_the_order_they_came() -> None:
    queue = SpeechQueue()
    sent = [chunk(session, "r", index) for index in range(3) for session in ("a", "b")]
    for message in sent:
        queue.chunk(message)
    assert list(queue.chunks) == sent


@pytest.mark.parametrize(("cancel", "kept"), [
    (("a", "r1"), [("a", "r2"), ("b", "r1")]),   # one reply
    (("a", ""), [("b", "r1")]),                  # every reply of the session
    (("c", ""), [("a", "r1"), ("a", "r2"), ("b", "r1")]),
])
def test_a_cancel_drops_the_queued_chunks_of_the_reply_or_the_session(cancel: tuple[str, str],
                                                                      kept: list[tuple[str, str]]) -> None:
    queue = SpeechQueue()
    for session, id in [("a", "r1"), ("a", "r2"), ("b", "r1"), ("a", "r1")]:
        queue.chunk(chunk(session, id))
    queue.cancel(*cancel)
    assert sorted({(m.session, m.id) for m in queue.chunks}) == kept
    assert all(not queue.is_cancelled(m) for m in queue.chunks)


def test_the_chunk_being_spoken_and_late_chunks_of_a_cancelled_reply_are_cancelled_too() -> None:
    queue = SpeechQueue()
    queue.chunk(speaking := chunk("a", "r1", 0))
    queue.chunks.popleft()  # the worker took it
    queue.cancel("a", "")
    assert queue.is_cancelled(speaking)
    assert queue.is_cancelled(chunk("a", "r1", 1))
    assert not queue.is_cancelled(chunk("a", "r2", 0))  # the next reply of the session is spoken


def test_cancelled_replies_are_remembered_up_to_the_limit() -> None:
    queue = SpeechQueue()
    for n in range(MEMORY + 10):
        queue.cancel("s", f"r{n}")
    assert len(queue.replies.ended) == MEMORY
    assert not queue.is_cancelled(chunk("s", "r9")) and queue.is_cancelled(chunk("s", "r10"))


def test_late_chunks_of_a_cancelled_reply_are_not_even_queued() -> None:
    queue = SpeechQueue()
    queue.cancel("s1", "r1")
    queue.chunk(chunk())
    assert not queue.chunks and not queue.replies


# --- voices and memory ------------------------------------------------------------------------------

def test_only_chosen_voices_are_remembered_and_the_newest_win() -> None:
    queue = SpeechQueue()
    queue.request(request(id="plain"))
    assert not queue.replies and queue.voice(chunk(id="plain")) == ""
    for n in range(MEMORY + 1):
        queue.request(request(id=f"r{n}", voice="en"))
    assert len(queue.replies) == MEMORY and ("s1", "r0") not in queue.replies
    assert queue.voice(chunk(id=f"r{MEMORY}")) == "en"


@pytest.mark.parametrize("end", ["cancel reply", "cancel session", "refused", "final chunk spoken"])
def test_a_voice_is_forgotten_when_its_reply_ends_or_the_engine_refuses_it(end: str) -> None:
    queue = SpeechQueue()
    queue.request(request(voice="xx"))
    queue.chunk(chunk())
    queue.chunks.popleft()
    queue.spoken(chunk(final=False))
    assert queue.voice(chunk()) == "xx"
    {"cancel reply": lambda: queue.cancel("s1", "r1"), "cancel session": lambda: queue.cancel("s1", ""),
     "refused": lambda: queue.refuse_voice(chunk()), "final chunk spoken": lambda: queue.spoken(chunk(final=True)),
     }[end]()
    assert queue.voice(chunk()) == ""


def test_a_sessions_bookkeeping_is_gone_once_its_last_reply_was_spoken() -> None:
    queue = SpeechQueue()
    for id in ("r1", "r2"):
        queue.chunk(chunk(id=id, final=True))
    queue.spoken(queue.chunks.popleft())
    assert list(queue.replies) == [("s1", "r2")]
    queue.spoken(queue.chunks.popleft())
    assert not queue.replies and not queue.chunks


def test_a_session_cancel_ends_only_the_replies_it_saw_and_the_next_one_is_spoken() -> None:
    queue = SpeechQueue()
    queue.request(request(id="r1", voice="en"))
    queue.chunk(chunk(id="r2"))
    queue.cancel("s1", "")
    assert not queue.replies and not queue.chunks
    queue.request(request(id="r3", voice="ru"))
    queue.chunk(chunk(id="r3"))
    assert [m.id for m in queue.chunks] == ["r3"] and queue.voice(chunk(id="r3")) == "ru"


def test_the_longest_frame_of_any_format_and_setting_fits_an_audio_message() -> None:
    """max_frame_ms goes to 1000: at 96 kHz stereo 32-bit that is 768 KB, over the protocol's PCM limit,
    so an engine's frames are cut to the limit (whole sample frames) and the bus never refuses one."""
    from voxpipe.protocol.kinds import PCM_BYTES

    for rate, channels, width in [(96000, 2, 4), (48000, 3, 3), (22050, 1, 2), (8000, 1, 1)]:
        fmt = AudioFormat(rate, channels, width)
        for ms in (10, 200, 1000):
            size = fmt.longest_frame(ms)
            assert size <= PCM_BYTES and size % fmt.block_align == 0
            assert size == min(fmt.frame_bytes(ms), PCM_BYTES - PCM_BYTES % fmt.block_align)
            body = Audio(chunk=0, frame=0, rate=rate, channels=channels, width=width, pcm=bytes(size),
                         last=True, final=True)
            protocol.encode(Message(body, session="s", id="r"))
