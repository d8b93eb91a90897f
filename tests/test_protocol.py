"""The wire protocol: round trips for every kind, and each way a frame can be wrong."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_protocol_doc import spec_of
from voxpipe import protocol
from voxpipe.protocol import Chunk, ErrorCode, Mark, Message, ProtocolError, Request, Token

ENVELOPE = {"session": "s1", "id": "r1", "seq": 3, "ts": 1764500000.25, "src": "test"}

EXAMPLES = {
    "hello": {},
    "request": {"text": "Привет! How are you?", "profile": "local", "stream": False,
                "images": [{"mime": "image/png", "data": b"\x89PNG\r\n"}], "voice": "en+f3", "persona": "Crazy",
                "system": "Game state for this reply:\n- Distance to the player: 3.27 m"},
    "cancel": {"reason": "user pressed stop"},
    "token": {"text": "Hel"},
    "reasoning": {"text": "The user greets me, "},
    "llm.done": {"status": "ok", "text": "Hello <e>smile</e>.", "tokens": 4, "provider": "openai",
                 "model": "gpt-4o-mini", "finish_reason": "stop", "metrics": {"ttft_ms": 120.5},
                 "guard": "", "reasoning": "Greet back."},
    "context.query": {"limit": 20, "persona": "Cart_portal"},
    "context": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                "memory": "1. [high] likes cats", "variables": {"attitude": 55}},
    "replay.query": {"since": 1764500000.0},
    "replay.done": {"since": 1764500000.0, "count": 2, "complete": True, "oldest": 1764400000.0},
    "replay": {"status": "ok", "text": "Hi", "tokens": 1, "request_text": "hello", "request_ts": 1.0,
               "done_ts": 2.0, "request_persona": "Mila", "error": "", "provider": "", "model": "",
               "finish_reason": "", "metrics": {}, "guard": "", "reasoning": ""},
    "text": {"delta": "Hello ", "final": False},
    "chunk": {"text": "Hello.", "index": 0, "final": True,
              "marks": [{"tag": "e", "body": "smile", "chunk": 0, "offset": 6}]},
    "audio": {"chunk": 0, "frame": 2, "rate": 22050, "channels": 1, "width": 2, "pcm": b"\x00\x01" * 10,
              "last": True, "final": True, "chars": 12},
    "playback": {"event": "stopped", "chunk": 0, "path": "/tmp/x.wav", "final": True, "heard": 0.5,
                 "heard_chars": 6, "audio_ts": 1764500000.5, "audio_s": 1.25},
    "metrics": {"request_ts": 1764500000.0, "provider": "openai", "model": "m", "engine": "espeak",
                "status": "ok", "first_token_ms": 300.0, "first_chunk_ms": 400.0, "first_audio_ms": 410.0,
                "first_playback_ms": 415.0, "end_ms": 5000.0, "tokens": 20, "chars": 80, "audio_s": 4.5},
    "command": {"name": "e", "args": ["smile"], "chunk": 0, "offset": 6, "accepted": True},
    "history.saved": {"role": "assistant", "message_id": 7},
    "error": {"code": "gap", "message": "lost messages 3..4", "ref_kind": "token"},
    "heartbeat": {"pid": 42, "uptime": 3.5, "state": "ready", "shard": "0/1",
                  "counters": {"received": 3}, "streams": {"token/s1/r1": 9}},
}


def message_of(kind: str, **fields: object) -> Message:
    """The message a receiver gets for this payload map."""
    return protocol.validate({"v": 1, "kind": kind, **ENVELOPE, **fields})


def test_every_kind_has_an_example() -> None:
    assert set(EXAMPLES) == set(protocol.KINDS)


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_round_trip(kind: str) -> None:
    message = message_of(kind, **EXAMPLES[kind])
    assert isinstance(message.body, protocol.KINDS[kind]) and message.kind == kind
    frame = protocol.encode(message)
    assert frame.startswith(f"{kind}/s1 ".encode())
    assert protocol.decode(frame) == message


def test_a_body_built_by_keyword_is_the_body_a_receiver_gets() -> None:
    """Publishers build the typed object; the frame it makes decodes to an equal one (nested maps as
    records, lists as tuples)."""
    body = Chunk(text="Hello.", index=0, final=True, marks=(Mark(tag="e", body="smile", chunk=0, offset=6),))
    sent = Message(body, **ENVELOPE)
    assert protocol.decode(protocol.encode(sent)) == sent == message_of("chunk", **EXAMPLES["chunk"])
    assert sent.body.marks[0].tag == "e"


def test_defaults_are_filled() -> None:
    request = message_of("request", text="hi").body
    assert isinstance(request, Request)
    assert request.profile == "" and request.stream is None and request.voice == "" and request.images == ()
    assert Request(text="hi") == request


def test_a_bad_body_is_refused_at_the_sender_by_the_receivers_rules() -> None:
    with pytest.raises(ProtocolError, match="token: field 'text' must be a string, got int"):
        protocol.encode(Message(Token(text=5), **ENVELOPE))  # type: ignore[arg-type]


def test_error_codes_travel_as_their_strings() -> None:
    error = protocol.Error(code=ErrorCode.GAP, message="lost messages 3..4")
    received = protocol.decode(protocol.encode(Message(error, **ENVELOPE))).body
    assert isinstance(received, protocol.Error)
    assert received.code == "gap" == ErrorCode.GAP and type(received.code) is str


def frame_of(payload: object, topic: bytes = b"request/s1") -> bytes:
    return topic + b" " + msgpack.packb(payload, use_bin_type=True)


def good_request(**changes: object) -> dict:
    return {"v": 1, "kind": "request", **ENVELOPE, "text": "hi", **changes}


@pytest.mark.parametrize("frame, reason", [
    (b"request/s1-without-separator", "no topic separator"),
    (b"request/s1 \xc1", "not valid msgpack"),
    (frame_of([1, 2, 3]), "payload must be a map"),
    (frame_of(good_request(text=5)), "field 'text' must be a string"),
    (frame_of(good_request(seq="3")), "field 'seq' must be an integer"),
    (frame_of(good_request(seq=-1)), "field 'seq' must be between"),
    (frame_of({k: v for k, v in good_request().items() if k != "text"}), "missing field 'text'"),
    (frame_of({k: v for k, v in good_request().items() if k != "src"}), "missing field 'src'"),
    (frame_of(good_request(text="x" * 70_000)), "the limit is 65536"),
    (frame_of(good_request(kind="teleport"), b"teleport/s1"), "unknown kind 'teleport'"),
    (frame_of(good_request(v=2)), "protocol version 2 is newer"),
    (frame_of(good_request(session="a b")), "field 'session' must match"),
    (frame_of(good_request(session=""), b"request/"), "must not be empty"),
    (frame_of(good_request(stream="yes")), "field 'stream' must be true or false"),
    (frame_of(good_request(ts=float("nan"))), "must be finite"),
    (frame_of(good_request(images=[{"mime": "text/html", "data": b"x"}])), "field 'images' item 0 field 'mime'"),
    (frame_of(good_request(voice=3)), "field 'voice' must be a string, got int"),
    (frame_of(good_request(voice=None)), "field 'voice' must be a string, got NoneType"),
    (frame_of(good_request(voice="v" * 65)), "field 'voice' is 65 characters, the limit is 64"),
    (frame_of(good_request(persona="../Crazy")), "field 'persona' must match"),
    (frame_of(good_request(persona="p" * 65)), "field 'persona' is 65 characters, the limit is 64"),
    (frame_of(good_request(system="s" * 65_537)), "field 'system' is 65537 characters, the limit is 65536"),
    (frame_of(good_request(), b"request/other"), "does not match"),
    (b"request/s1 " + b"\x00" * (protocol.MAX_MESSAGE_BYTES + 1), "the limit for request is 4194304"),
    (b"token/s1 " + b"\x00" * protocol.Token.max_bytes, "the limit for token is 524288"),
    (b"teleport/s1 " + b"\x00" * protocol.MAX_MESSAGE_BYTES, "the limit is 4194304"),
])
def test_rejections_name_the_reason(frame: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason.replace("(", r"\(")):
        protocol.decode(frame)


def test_subscription_prefix_never_matches_a_longer_session() -> None:
    frame = protocol.encode(Message(Token(text="x"), **{**ENVELOPE, "session": "s10"}))
    assert not frame.startswith(protocol.subscription("token", "s1"))
    assert frame.startswith(protocol.subscription("token", "s10"))
    assert frame.startswith(protocol.subscription("token"))


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_protocol_error(frame: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        protocol.decode(frame)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(sorted(EXAMPLES)), st.dictionaries(st.sampled_from(
    ["v", "kind", "session", "id", "seq", "ts", "src", "text", "index", "final", "pcm", "messages", "counters"]),
    msgpack_values, max_size=6))
def test_random_payloads_only_raise_protocol_error(kind: str, changes: dict) -> None:
    payload = {"v": 1, "kind": kind, **ENVELOPE, **EXAMPLES[kind], **changes}
    try:
        message = protocol.decode(frame_of(payload, f"{payload.get('kind')}/{payload.get('session')}".encode()))
    except ProtocolError:
        return
    assert protocol.decode(protocol.encode(message)) == message


def test_a_frame_no_stage_would_accept_is_refused_at_the_sender() -> None:
    image = protocol.Image(mime="image/png", data=bytes(3 * 1024 * 1024))
    big = Message(Request(text="x", images=(image, image)), "s", "r", 0, 0.0, "t")
    with pytest.raises(protocol.ProtocolError, match=r"over the limit of 4194304 for request .*; send less"):
        protocol.encode(big)


# --- frame limits per kind (docs/protocol.md §2.4) ---------------------------------------------------

WIDE = "\U0001F600"
"""A character of four UTF-8 bytes: the most a string of a given length can weigh."""


def heaviest(check: object, budget: int) -> object:
    """The heaviest value a field check accepts, or, for lists and maps, one heavier than `budget`
    bytes when the check allows that much (so no test builds gigabytes to show a limit)."""
    maker, args = spec_of(check)  # type: ignore[arg-type]
    if maker == "text":
        if args["choices"]:
            return max(args["choices"], key=len)
        if args["pattern"] is not None:
            return next(value for value in ("a" * args["limit"], "image/" + "a" * (args["limit"] - 6))
                        if args["pattern"].fullmatch(value))
        return WIDE * args["limit"]
    if maker == "integer":
        return args["high"]
    if maker == "binary":
        return bytes(args["limit"])
    if maker in ("boolean", "optional_boolean"):
        return True
    if maker in ("number", "fraction"):
        return 0.5
    if maker == "record":
        return {name: heaviest(field, budget) for name, field in args["fields"].items()}
    if maker == "list_of":
        item = heaviest(args["item"], budget)
        return [item] * min(args["limit"], budget // len(msgpack.packb(item)) + 1)
    if maker == "counter_map":
        value, width = heaviest(args["values"], budget), spec_of(args["key_check"])[1]["limit"] - 8
        count = min(4096, budget // len(msgpack.packb(WIDE * width)) + 1)
        return {WIDE * width + f"{n:08d}": value for n in range(count)}
    raise AssertionError(f"teach heaviest() the check made by {maker}")


def heaviest_payload(kind: str) -> dict:
    """The kind's heaviest message as the field limits allow it, in the heaviest envelope."""
    cls = protocol.KINDS[kind]
    return {"v": 1, "kind": kind, "session": "s" * 64, "id": WIDE * 128, "seq": 2**53, "ts": 0.5, "src": WIDE * 128,
            **{name: heaviest(rule.check, cls.max_bytes) for name, rule in cls.spec.items()}}


BOUNDED_BY_FIELDS = {"hello", "cancel", "token", "reasoning", "context.query", "replay.query", "replay.done", "audio",
                     "playback", "metrics", "history.saved", "error"}
"""The kinds whose every field at its limit still fits the kind's frame limit; for the others (lists of
records, maps, several long texts) the frame limit is the tighter one (docs/protocol.md §2.4)."""


@pytest.mark.parametrize("kind", sorted(protocol.KINDS))
def test_a_kind_at_its_field_limits_fits_its_frame_limit_or_is_refused_at_the_sender(kind: str) -> None:
    payload = heaviest_payload(kind)
    message = protocol.validate(payload)
    if kind in BOUNDED_BY_FIELDS:
        assert len(protocol.encode(message)) <= protocol.KINDS[kind].max_bytes
        return
    limit = protocol.KINDS[kind].max_bytes
    with pytest.raises(ProtocolError, match=rf"^{kind} message is \d+ bytes, over the limit of {limit} for {kind} "):
        protocol.encode(message)


def padded_frame(kind: str, size: int) -> bytes:
    """A valid frame of `kind` (its example) of exactly `size` bytes, padded in an unknown field, which
    receivers ignore: at its kind's limit it is accepted, one byte over it is not."""
    payload = {"v": 1, "kind": kind, **ENVELOPE, **EXAMPLES[kind], "pad": b""}
    if kind in protocol.SESSIONLESS_KINDS:
        payload["session"] = ""
    topic = f"{kind}/{payload['session']}".encode()
    payload["pad"] = bytes(size - len(frame_of(payload, topic)))
    payload["pad"] = bytes(len(payload["pad"]) - (len(frame_of(payload, topic)) - size))  # less the pad's header
    frame = frame_of(payload, topic)
    assert len(frame) == size
    return frame


@pytest.mark.parametrize("kind", sorted(protocol.KINDS))
def test_a_frame_over_its_kinds_limit_is_refused_by_the_receiver_and_one_at_it_accepted(kind: str) -> None:
    limit = protocol.KINDS[kind].max_bytes
    assert protocol.decode(padded_frame(kind, limit)).kind == kind
    with pytest.raises(ProtocolError, match=f"^{kind} message is {limit + 1} bytes, the limit for {kind} is {limit}$"):
        protocol.decode(padded_frame(kind, limit + 1))


def test_the_largest_kind_limit_is_what_the_broker_and_every_socket_let_through() -> None:
    assert protocol.MAX_MESSAGE_BYTES == protocol.BROKER_MAX_BYTES == max(
        cls.max_bytes for cls in protocol.KINDS.values()) == 4 * 1024 * 1024
