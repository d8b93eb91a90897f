"""The client library's events carry every field of their wire kind, so they cannot fall behind it."""

from __future__ import annotations

import dataclasses

import pytest

from voxpipe import protocol
from voxpipe.frontends.client import REPLY_KINDS, Audio, Chunk, Command, Done, Error, Playback, Reasoning, TextDelta, event_from

EVENTS = (TextDelta, Chunk, Audio, Command, Reasoning, Playback, Done, Error)


@pytest.mark.parametrize("event", EVENTS, ids=lambda event: event.kind)
def test_an_event_has_exactly_the_fields_of_its_kind(event: type) -> None:
    fields = {field.name for field in dataclasses.fields(event)} - {"session", "id"}
    assert fields == set(protocol.KINDS[event.kind])


def test_every_reply_kind_has_an_event() -> None:
    assert {event.kind for event in EVENTS} == set(REPLY_KINDS)


@pytest.mark.parametrize("kind, body", [
    ("playback", {"event": "stopped", "chunk": 2, "final": True, "heard": 0.5, "heard_chars": 7, "audio_s": 3.5}),
    ("llm.done", {"status": "ok", "text": "Hi.", "tokens": 3, "model": "m", "profile": "p", "finish_reason": "stop"}),
    ("error", {"code": "invalid_message", "message": "bad", "ref_kind": "audio", "stage": "player"}),
    ("audio", {"chunk": 0, "frame": 1, "rate": 22050, "channels": 1, "width": 2, "pcm": b"\0\0", "last": True,
               "final": False, "chars": 12}),
])
def test_an_event_reads_what_the_wire_carries(kind: str, body: dict) -> None:
    message = protocol.decode(protocol.encode(protocol.make(kind, session="s", id="r", seq=0, ts=0.0, src="t",
                                                            **body)))
    event = event_from(message)
    assert event is not None
    for name, value in body.items():
        assert getattr(event, name) == value
