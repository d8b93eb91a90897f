"""The client library hands out the protocol's own types, so its events cannot fall behind the wire:
no duplicate classes, and a Reply yields typed bodies carrying every field of their wire kind."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import pytest

import voxpipe
from voxpipe import protocol
from voxpipe.frontends import client
from voxpipe.frontends.client import REPLY_KINDS, REPLY_TYPES, Reply

EXPORTED = ("Message", "Text", "Chunk", "Audio", "Command", "Reasoning", "Playback", "LlmDone", "Error", "Mark",
            "TextMark", "ErrorCode")
DELETED = ("Event", "TextDelta", "Done", "event_from", "AnyEvent")


@pytest.mark.parametrize("name", EXPORTED)
def test_the_exported_event_types_are_the_protocol_classes(name: str) -> None:
    assert getattr(client, name) is getattr(protocol, name)
    assert getattr(voxpipe, name) is getattr(protocol, name)
    assert name in client.__all__ and name in voxpipe.__all__


def test_the_client_defines_no_event_classes_of_its_own() -> None:
    own = {name for name, value in vars(client).items()
           if isinstance(value, type) and value.__module__ == client.__name__}
    assert own == {"Client", "Reply", "VoxpipeTimeout"}
    for name in DELETED:
        assert not hasattr(client, name) and name not in voxpipe.__all__
        with pytest.raises(AttributeError):
            getattr(voxpipe, name)


def test_every_reply_kind_has_its_protocol_class() -> None:
    assert tuple(body.kind for body in REPLY_TYPES) == REPLY_KINDS
    assert all(protocol.KINDS[kind] is body for kind, body in zip(REPLY_KINDS, REPLY_TYPES, strict=True))
    assert {getattr(client, body.__name__) for body in REPLY_TYPES} == set(REPLY_TYPES)


# Every field of each reply kind, none at its default: what the wire carries, in the order a reply may bring it
# (the llm.done last, so the reply is complete only then).
WIRE: dict[str, dict[str, Any]] = {
    "text": {"delta": "Hi there", "final": True, "marks": [{"tag": "e", "body": "smile", "offset": 3}]},
    "chunk": {"text": "Hi there", "index": 2, "final": True,
              "marks": [{"tag": "e", "body": "smile", "chunk": 2, "offset": 3}]},
    "audio": {"chunk": 2, "frame": 1, "rate": 22050, "channels": 2, "width": 2, "pcm": b"\1\0\2\0", "last": True,
              "final": True, "chars": 12},
    "command": {"name": "p", "args": ["1", "0", "-1"], "chunk": 2, "offset": 3, "accepted": False,
                "reason": "not on the allowlist"},
    "reasoning": {"text": "They greet me."},
    "playback": {"event": "stopped", "chunk": 2, "path": "/tmp/r.wav", "final": True, "heard": 0.5,
                 "heard_chars": 7, "audio_ts": 12.5, "audio_s": 3.5},
    "error": {"code": "tts_failed", "message": "bad", "ref_kind": "chunk", "stage": "tts"},
    "llm.done": {"status": "ok", "text": "Hi there", "tokens": 3, "error": "none", "provider": "openai",
                 "model": "m", "finish_reason": "stop", "metrics": {"total_ms": 12.0}, "guard": "repetition",
                 "reasoning": "They greet me.", "profile": "p"},
}


def test_the_samples_cover_every_field_of_every_reply_kind() -> None:
    assert set(WIRE) == set(REPLY_KINDS)
    for kind, fields in WIRE.items():
        spec = protocol.KINDS[kind].spec
        assert set(fields) == set(spec), kind
        assert all(value != spec[name].default for name, value in fields.items() if not spec[name].required), kind


class FakeClient:
    """Stands in for Client: hands the Reply the given messages, then nothing."""

    def __init__(self, messages: list[protocol.Message]) -> None:
        self.messages = messages

    def _receive(self, timeout: float) -> protocol.Message | None:
        return self.messages.pop(0) if self.messages else None


def frame(kind: str, session: str, id: str, seq: int, fields: dict[str, Any]) -> bytes:
    """A frame built by hand from the wire map, as any sender (say, the JavaScript front-end) makes it."""
    data = {"v": 1, "kind": kind, "session": session, "id": id, "seq": seq, "ts": 1.5, "src": "test", **fields}
    return f"{kind}/{session} ".encode() + msgpack.packb(data, use_bin_type=True)


def plain(value: Any) -> Any:
    """A body field as msgpack carries it: tuples as lists, records as maps."""
    if isinstance(value, tuple):
        return [plain(item) for item in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value.to_wire()
    return value


def test_a_reply_yields_typed_bodies_with_every_wire_field() -> None:
    frames = [frame(kind, "s", "r", seq, fields) for seq, (kind, fields) in enumerate(WIRE.items())]
    frames.insert(1, frame("text", "s", "other", 0, WIRE["text"]))  # another reply's: not yielded
    reply = Reply(FakeClient([protocol.decode(item) for item in frames]), "s", "r",  # type: ignore[arg-type]
                  wait_text=True, wait_audio=True, timeout=1.0)
    events = list(reply)
    assert [event.kind for event in events] == list(WIRE)
    for event in events:
        assert isinstance(event, protocol.Message) and (event.session, event.id, event.src) == ("s", "r", "test")
        body = event.body
        assert type(body) is protocol.KINDS[event.kind]
        assert {field.name for field in dataclasses.fields(body)} == set(WIRE[event.kind])
        for name, value in WIRE[event.kind].items():
            assert plain(getattr(body, name)) == value, (event.kind, name)
    text, chunk, _, command = (event.body for event in events[:4])
    assert isinstance(text.marks[0], protocol.TextMark) and isinstance(chunk.marks[0], protocol.Mark)
    assert command.args == ("1", "0", "-1")
    assert reply.complete and reply.text == "Hi there" and reply.done is events[-1]
    assert events[6].body.code == protocol.ErrorCode.TTS_FAILED and reply.crashed is None
