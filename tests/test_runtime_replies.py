"""The runtime's shared bookkeeping: the one cancel rule, the bounded reply registry, and how a stage
declares its handlers. Pure units: no bus, no processes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from voxpipe.protocol import Cancel, Chunk, Message, Token
from voxpipe.runtime import Stage, handles
from voxpipe.runtime.replies import Recent, Replies, cancels

sessions = st.sampled_from(["s1", "s2", "s10"])
ids = st.sampled_from(["", "r1", "r2"])


@given(sessions, st.sampled_from(["r1", "r2"]), sessions, ids)
def test_the_cancel_rule(session: str, id: str, cancel_session: str, cancel_id: str) -> None:
    """A cancel with an id ends that reply of its session; an empty id ends every reply of the session;
    another session is never touched (s1 is not a prefix match of s10)."""
    expected = session == cancel_session and cancel_id in ("", id)
    assert cancels((session, id), cancel_session, cancel_id) is expected


def test_recent_keeps_the_newest_and_a_rewrite_counts_as_new() -> None:
    recent: Recent[str, int] = Recent(limit=3)
    for n, key in enumerate("abcd"):
        recent[key] = n
    assert list(recent) == ["b", "c", "d"]
    recent["b"] = 9  # touched: now the newest
    recent["e"] = 5
    assert list(recent) == ["d", "b", "e"] and recent["b"] == 9 and "c" not in recent


def test_replies_open_end_and_drop_late_messages() -> None:
    replies: Replies[list[str]] = Replies()
    state = replies.open(("s", "r1"), list)
    assert state == [] and replies.open(("s", "r1"), list) is state
    assert replies.end(("s", "r1")) is state
    assert replies.is_ended(("s", "r1")) and replies.open(("s", "r1"), list) is None
    assert len(replies) == 0


def test_a_session_cancel_ends_every_reply_of_the_session_and_only_those() -> None:
    replies: Replies[str] = Replies()
    for key in [("s1", "a"), ("s1", "b"), ("s10", "a")]:
        replies.open(key, lambda key=key: "/".join(key))
    ended = replies.cancel("s1", "")
    assert ended == [(("s1", "a"), "s1/a"), (("s1", "b"), "s1/b")]
    assert list(replies) == [("s10", "a")]


def test_a_cancel_by_id_ends_a_reply_that_has_not_started_yet() -> None:
    """So its first message, arriving after the cancel, is dropped."""
    replies: Replies[str] = Replies()
    assert replies.cancel("s", "later") == [(("s", "later"), None)]
    assert replies.open(("s", "later"), str) is None


@pytest.mark.parametrize("memory", [1, 5])
def test_memory_stays_bounded(memory: int) -> None:
    replies: Replies[int] = Replies(memory)
    for n in range(50):
        replies.open(("s", str(n)), lambda n=n: n)
        if n % 2:
            replies.end(("s", str(n)))
    assert len(replies.live) <= memory and len(replies.ended) <= memory


def test_a_stage_subscribes_to_what_its_handlers_declare() -> None:
    class Base(Stage):
        @handles(Cancel)
        def on_cancel(self, message: Message[Cancel]) -> None: ...

    class Speaker(Base):
        @handles(Token, Chunk)
        def on_text(self, message: Message[Token | Chunk]) -> None: ...

    assert Speaker.handlers == {"cancel": "on_cancel", "token": "on_text", "chunk": "on_text"}
    assert Speaker.kinds() == ("cancel", "token", "chunk") and Base.kinds() == ("cancel",)
    assert Stage.kinds() == ()
