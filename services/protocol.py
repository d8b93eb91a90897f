"""The voxpipe wire protocol: every message kind, its fields, encoding and validation.

This module is the only place that knows how a message looks on the wire.
Stages, the client library and the CLI build messages with `make()` and read
them with `decode()`; `docs/protocol.md` documents exactly what is here.

A message is ONE ZeroMQ frame: ``<kind>/<session> <msgpack map>``.  The topic
and payload share one frame because pyzmq moves single frames ~3.6x faster
than multipart ones, and the topic prefix is what SUB sockets filter on.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
"""Largest frame a stage accepts; the broker disconnects peers above BROKER_MAX_BYTES."""
BROKER_MAX_BYTES = 8 * 1024 * 1024
HIGH_WATER_MARK = 200_000
"""Messages queued per socket before ZeroMQ drops: bursts fit, gaps are still detected."""
TOPIC_SEPARATOR = b" "
SESSION_PATTERN = re.compile(r"[A-Za-z0-9_.:@-]{0,64}")
_SHORT = 128
_TEXT = 64 * 1024
_REPLY = 512 * 1024


class ProtocolError(ValueError):
    """Raised for any frame that is not a valid voxpipe message; the text says why."""


# --- field specifications -------------------------------------------------

@dataclass(frozen=True)
class Field:
    """One payload field: its check, whether it may be omitted, and its default."""

    check: Callable[[Any], str | None]
    required: bool = True
    default: Any = None


def _str(limit: int, pattern: re.Pattern[str] | None = None,
         choices: tuple[str, ...] = ()) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if not isinstance(value, str):
            return f"must be a string, got {type(value).__name__}"
        if len(value) > limit:
            return f"is {len(value)} characters, the limit is {limit}"
        if pattern is not None and not pattern.fullmatch(value):
            return f"must match {pattern.pattern}"
        if choices and value not in choices:
            return f"must be one of {', '.join(choices)}, got {value!r}"
        return None
    return check


def _int(low: int = 0, high: int = 2**53) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be an integer, got {type(value).__name__}"
        if not low <= value <= high:
            return f"must be between {low} and {high}, got {value}"
        return None
    return check


def _number(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"must be a number, got {type(value).__name__}"
    if not math.isfinite(value):
        return "must be finite"
    return None


def _fraction(value: Any) -> str | None:
    problem = _number(value)
    if problem:
        return problem
    return None if 0 <= value <= 1 else f"must be between 0 and 1, got {value}"


def _bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"must be true or false, got {type(value).__name__}"


def _optional_bool(value: Any) -> str | None:
    return None if value is None else _bool(value)


def _bytes(limit: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if not isinstance(value, bytes):
            return f"must be binary, got {type(value).__name__}"
        if len(value) > limit:
            return f"is {len(value)} bytes, the limit is {limit}"
        return None
    return check


def _list(item: Callable[[Any], str | None], limit: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if not isinstance(value, list):
            return f"must be a list, got {type(value).__name__}"
        if len(value) > limit:
            return f"has {len(value)} items, the limit is {limit}"
        for position, element in enumerate(value):
            problem = item(element)
            if problem:
                return f"item {position} {problem}"
        return None
    return check


def _record(fields: Mapping[str, Callable[[Any], str | None]]) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if not isinstance(value, dict):
            return f"must be a map, got {type(value).__name__}"
        for name, field_check in fields.items():
            if name not in value:
                return f"lacks field {name!r}"
            problem = field_check(value[name])
            if problem:
                return f"field {name!r} {problem}"
        return None
    return check


def _counter_map(values: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    key_check = _str(256)

    def check(value: Any) -> str | None:
        if not isinstance(value, dict):
            return f"must be a map, got {type(value).__name__}"
        if len(value) > 4096:
            return f"has {len(value)} entries, the limit is 4096"
        for key, item in value.items():
            problem = key_check(key) or values(item)
            if problem:
                return f"entry {key!r} {problem}"
        return None
    return check


IMAGE = _record({"mime": _str(64, re.compile(r"image/[a-z0-9.+-]+")), "data": _bytes(3 * 1024 * 1024)})
MARK = _record({"tag": _str(_SHORT), "body": _str(_TEXT), "chunk": _int(), "offset": _int()})
TEXT_MARK = _record({"tag": _str(_SHORT), "body": _str(_TEXT), "offset": _int()})
CHAT_MESSAGE = _record({"role": _str(16, choices=("system", "user", "assistant")), "content": _str(_REPLY)})
DONE_STATUSES = ("ok", "error", "interrupted")
PLAYBACK_EVENTS = ("started", "finished", "stopped")

ENVELOPE: dict[str, Field] = {
    "v": Field(_int(1, 1000)),
    "kind": Field(_str(32)),
    "session": Field(_str(64, SESSION_PATTERN)),
    "id": Field(_str(_SHORT)),
    "seq": Field(_int()),
    "ts": Field(_number),
    "src": Field(_str(_SHORT)),
}

KINDS: dict[str, dict[str, Field]] = {
    "hello": {},
    "request": {
        "text": Field(_str(_TEXT)),
        "profile": Field(_str(64), required=False, default=""),
        "stream": Field(_optional_bool, required=False, default=None),
        "images": Field(_list(IMAGE, 8), required=False, default=[]),
        "voice": Field(_str(64), required=False, default=""),
    },
    "cancel": {
        "reason": Field(_str(200), required=False, default=""),
    },
    "token": {
        "text": Field(_str(_TEXT)),
    },
    "reasoning": {
        "text": Field(_str(_TEXT)),
    },
    "llm.done": {
        "status": Field(_str(16, choices=DONE_STATUSES)),
        "text": Field(_str(_REPLY)),
        "tokens": Field(_int()),
        "error": Field(_str(2000), required=False, default=""),
        "provider": Field(_str(64), required=False, default=""),
        "model": Field(_str(256), required=False, default=""),
        "finish_reason": Field(_str(64), required=False, default=""),
        "metrics": Field(_counter_map(_number), required=False, default={}),
        "guard": Field(_str(32), required=False, default=""),
        "reasoning": Field(_str(_REPLY), required=False, default=""),
        "profile": Field(_str(64), required=False, default=""),
    },
    "context.query": {
        "limit": Field(_int(0, 1000), required=False, default=20),
    },
    "context": {
        "messages": Field(_list(CHAT_MESSAGE, 1000)),
        "memory": Field(_str(_REPLY), required=False, default=""),
        "variables": Field(_counter_map(_number), required=False, default={}),
    },
    "replay.query": {
        "since": Field(_number),
    },
    "replay.done": {
        "since": Field(_number),
        "count": Field(_int()),
        "complete": Field(_bool),
        "oldest": Field(_number, required=False, default=0.0),
    },
    "text": {
        "delta": Field(_str(_TEXT)),
        "final": Field(_bool, required=False, default=False),
        "marks": Field(_list(TEXT_MARK, 1000), required=False, default=[]),
    },
    "chunk": {
        "text": Field(_str(_TEXT)),
        "index": Field(_int()),
        "final": Field(_bool),
        "marks": Field(_list(MARK, 1000), required=False, default=[]),
    },
    "audio": {
        "chunk": Field(_int()),
        "frame": Field(_int()),
        "rate": Field(_int(1000, 384000)),
        "channels": Field(_int(1, 8)),
        "width": Field(_int(1, 4)),
        "pcm": Field(_bytes(1024 * 1024)),
        "last": Field(_bool),
        "final": Field(_bool),
        "chars": Field(_int(0, _TEXT), required=False, default=0),
    },
    "playback": {
        "event": Field(_str(16, choices=PLAYBACK_EVENTS)),
        "chunk": Field(_int(-1), required=False, default=-1),
        "path": Field(_str(4096), required=False, default=""),
        "final": Field(_bool, required=False, default=False),
        "heard": Field(_fraction, required=False, default=0.0),
        "heard_chars": Field(_int(0, _TEXT), required=False, default=0),
        "audio_ts": Field(_number, required=False, default=0.0),
        "audio_s": Field(_number, required=False, default=0.0),
    },
    "metrics": {
        "request_ts": Field(_number),
        "profile": Field(_str(64), required=False, default=""),
        "provider": Field(_str(64), required=False, default=""),
        "model": Field(_str(256), required=False, default=""),
        "engine": Field(_str(64), required=False, default=""),
        "status": Field(_str(16), required=False, default=""),
        "first_token_ms": Field(_number, required=False, default=-1.0),
        "first_chunk_ms": Field(_number, required=False, default=-1.0),
        "first_audio_ms": Field(_number, required=False, default=-1.0),
        "first_playback_ms": Field(_number, required=False, default=-1.0),
        "end_ms": Field(_number, required=False, default=-1.0),
        "tokens": Field(_int(), required=False, default=0),
        "chars": Field(_int(), required=False, default=0),
        "audio_s": Field(_number, required=False, default=0.0),
    },
    "command": {
        "name": Field(_str(_SHORT)),
        "args": Field(_list(_str(_TEXT), 64), required=False, default=[]),
        "chunk": Field(_int(-1), required=False, default=-1),
        "offset": Field(_int(-1), required=False, default=-1),
        "accepted": Field(_bool),
        "reason": Field(_str(500), required=False, default=""),
    },
    "history.saved": {
        "role": Field(_str(16, choices=("user", "assistant"))),
        "message_id": Field(_int()),
    },
    "error": {
        "code": Field(_str(64)),
        "message": Field(_str(2000)),
        "ref_kind": Field(_str(32), required=False, default=""),
        "stage": Field(_str(64), required=False, default=""),
    },
    "heartbeat": {
        "pid": Field(_int()),
        "uptime": Field(_number),
        "state": Field(_str(16, choices=("ready", "stopping"))),
        "shard": Field(_str(32), required=False, default=""),
        "counters": Field(_counter_map(_int()), required=False, default={}),
        "streams": Field(_counter_map(_int()), required=False, default={}),
    },
}
KINDS["replay"] = {
    **KINDS["llm.done"],
    "request_text": Field(_str(_TEXT)),
    "request_ts": Field(_number),
    "done_ts": Field(_number),
}
"""A finished reply re-sent from llm's journal, so a restarted history stage catches up."""
SESSIONLESS_KINDS = frozenset({"heartbeat", "error", "replay.query", "replay.done"})
"""Kinds that may carry an empty session (a stage-wide event)."""


# --- the message ----------------------------------------------------------

@dataclass(frozen=True)
class Message:
    """A validated message: the envelope as attributes, the body as a mapping."""

    kind: str
    session: str
    id: str
    seq: int
    ts: float
    src: str
    body: dict[str, Any] = field(default_factory=dict)
    v: int = PROTOCOL_VERSION

    def __getitem__(self, name: str) -> Any:
        return self.body[name]

    @property
    def topic(self) -> str:
        return topic(self.kind, self.session)

    def as_dict(self) -> dict[str, Any]:
        """The payload map as it travels on the wire."""
        return {"v": self.v, "kind": self.kind, "session": self.session, "id": self.id,
                "seq": self.seq, "ts": self.ts, "src": self.src, **self.body}


def topic(kind: str, session: str) -> str:
    """The routing topic of a message: ``kind/session``."""
    return f"{kind}/{session}"


def subscription(kind: str = "", session: str | None = None) -> bytes:
    """The SUB prefix that selects one kind (all sessions) or one kind in one session.

    A session prefix ends with the separator so that ``s1`` never matches ``s10``.
    """
    if not kind:
        return b""
    if session is None:
        return f"{kind}/".encode()
    return topic(kind, session).encode() + TOPIC_SEPARATOR


def make(kind: str, *, session: str, id: str, seq: int, ts: float, src: str, **body: Any) -> Message:
    """Build a message, filling defaults and validating it as a receiver would."""
    return validate({"v": PROTOCOL_VERSION, "kind": kind, "session": session, "id": id,
                     "seq": seq, "ts": ts, "src": src, **body})


def encode(message: Message) -> bytes:
    """Serialise to the single wire frame; refuses a frame no stage would accept, so the sender learns
    it at once instead of every receiver reporting it (or, over BROKER_MAX_BYTES, the broker silently
    dropping the sender's connection)."""
    payload = msgpack.packb(message.as_dict(), use_bin_type=True)
    frame = message.topic.encode() + TOPIC_SEPARATOR + payload
    if len(frame) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"{message.kind} message is {len(frame)} bytes, over the limit of {MAX_MESSAGE_BYTES}; "
                            f"send less (for images: smaller or fewer)")
    return frame


def decode(frame: bytes) -> Message:
    """Parse and validate one wire frame; raises ProtocolError and nothing else."""
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise ProtocolError("frame must be bytes")
    frame = bytes(frame)
    if len(frame) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message is {len(frame)} bytes, the limit is {MAX_MESSAGE_BYTES}")
    head, separator, payload = frame.partition(TOPIC_SEPARATOR)
    if not separator:
        raise ProtocolError("frame has no topic separator (expected '<kind>/<session> <msgpack>')")
    try:
        data = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many unrelated types for bad input
        raise ProtocolError(f"payload is not valid msgpack: {type(exc).__name__}") from None
    message = validate(data)
    if head != message.topic.encode():
        raise ProtocolError(f"topic {head[:80]!r} does not match kind/session {message.topic!r}")
    return message


def validate(data: Any) -> Message:
    """Check a decoded payload map against the envelope and its kind's fields."""
    if not isinstance(data, dict):
        raise ProtocolError(f"payload must be a map, got {type(data).__name__}")
    version = data.get("v")
    if isinstance(version, int) and not isinstance(version, bool) and version > PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version} is newer than this voxpipe "
                            f"(speaks {PROTOCOL_VERSION}); upgrade voxpipe")
    envelope = _check_fields("envelope", ENVELOPE, data)
    kind = envelope["kind"]
    spec = KINDS.get(kind)
    if spec is None:
        raise ProtocolError(f"unknown kind {kind!r}; known kinds: {', '.join(sorted(KINDS))}")
    if not envelope["session"] and kind not in SESSIONLESS_KINDS:
        raise ProtocolError(f"{kind}: field 'session' must not be empty")
    body = _check_fields(kind, spec, data)
    return Message(kind=kind, session=envelope["session"], id=envelope["id"], seq=envelope["seq"],
                   ts=float(envelope["ts"]), src=envelope["src"], body=body, v=envelope["v"])


def _check_fields(where: str, spec: Mapping[str, Field], data: Mapping[str, Any]) -> dict[str, Any]:
    """Return the spec's fields from data (defaults filled); unknown extra fields are ignored."""
    checked: dict[str, Any] = {}
    for name, rule in spec.items():
        if name not in data:
            if rule.required:
                raise ProtocolError(f"{where}: missing field {name!r}")
            default = rule.default
            checked[name] = default.copy() if isinstance(default, (dict, list)) else default
            continue
        problem = rule.check(data[name])
        if problem:
            raise ProtocolError(f"{where}: field {name!r} {problem}")
        checked[name] = data[name]
    return checked
