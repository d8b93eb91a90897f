"""The wire format: the envelope, and how a message becomes one frame and back.

A message is ONE ZeroMQ frame: ``<kind>/<session> <msgpack map>``.  The topic
and payload share one frame because pyzmq moves single frames ~3.6x faster
than multipart ones, and the topic prefix is what SUB sockets filter on.  The
map holds the envelope (below) and the fields of the kind's `Body` (kinds.py).

`encode` validates what it sends and `decode` what it receives, by the same
checks (each kind's fields and its frame limit), so a sender learns at once what
every receiver would refuse.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgpack

from .checks import FAST_PATHS, Field, integer, number, text
from .kinds import KINDS, SESSION_PATTERN, SHORT, Body

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = max(cls.max_bytes for cls in KINDS.values())
"""The largest frame of any kind (kinds.BULK_BYTES, 4 MiB); each kind has its own, lower or equal
limit (`Body.max_bytes`), which `encode` and `decode` enforce."""
BROKER_MAX_BYTES = MAX_MESSAGE_BYTES
"""ZMQ_MAXMSGSIZE of every broker socket and of voxpipe's own: a larger frame disconnects its sender
rather than being queued, so no queue ever holds a frame over MAX_MESSAGE_BYTES."""
HIGH_WATER_MARK = 1000
"""Messages a participant's PUB or SUB queues before ZeroMQ drops (the libzmq default). Its SUB's
I/O thread reads ahead of the stage, so bursts wait here, in the participant's own memory."""
BROKER_HIGH_WATER_MARK = 256
"""Messages the broker queues per peer (each subscriber, each publisher): ZeroMQ counts messages, not
bytes, so this times BROKER_MAX_BYTES, 1 GiB (128 MiB of streaming frames), is what one subscriber
that stops reading can make the broker hold. A subscriber that reads keeps this queue near empty,
but under load its I/O thread can wait for a CPU while every stage publishes: 128 lost tokens in
tests/test_pipeline.py's thousand replies on two cores, 256 did not. One that stops reading loses
what overflows, and sees the gap (docs/protocol.md §2.4, §4.2)."""
TOPIC_SEPARATOR = b" "


class ProtocolError(ValueError):
    """Raised for any frame that is not a valid voxpipe message; the text says why."""


ENVELOPE: dict[str, Field] = {
    "v": Field(integer(1, 1000)),
    "kind": Field(text(32)),
    "session": Field(text(64, SESSION_PATTERN)),
    "id": Field(text(SHORT)),
    "seq": Field(integer()),
    "ts": Field(number),
    "src": Field(text(SHORT)),
}
SESSIONLESS_KINDS = frozenset(name for name, cls in KINDS.items() if cls.sessionless)
"""Kinds that may carry an empty session (a stage-wide event)."""
_FRAME_LIMITS = {name.encode(): cls.max_bytes for name, cls in KINDS.items()}
"""Each kind's frame limit by the kind's name as a topic starts with it, for `decode`'s first check."""
_LONGEST_KIND = max(len(name) for name in _FRAME_LIMITS)
B_co = TypeVar("B_co", bound=Body, covariant=True)


# --- the message ----------------------------------------------------------

@dataclass(frozen=True)
class Message(Generic[B_co]):
    """A message: the envelope as attributes and the kind's typed fields as `body`.

    A stage's handler for a kind takes a `Message[ThatKind]`, so `message.body.text` is typed.
    Publishers pass only the body to `Connection.publish`, which fills in the envelope."""

    body: B_co
    session: str
    id: str
    seq: int = 0
    ts: float = 0.0
    src: str = ""
    v: int = PROTOCOL_VERSION

    @property
    def kind(self) -> str:
        return self.body.kind

    @property
    def topic(self) -> str:
        return topic(self.body.kind, self.session)

    def to_wire(self) -> dict[str, Any]:
        """The payload map as it travels on the wire."""
        return {"v": self.v, "kind": self.body.kind, "session": self.session, "id": self.id,
                "seq": self.seq, "ts": self.ts, "src": self.src, **self.body.to_wire()}


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


def encode(message: Message[Body]) -> bytes:
    """Validate and serialise to the single wire frame. Refuses what no stage would accept, so the
    sender learns it at once instead of every receiver reporting it (or, over BROKER_MAX_BYTES, the
    broker silently dropping the sender's connection)."""
    data = message.to_wire()
    _check(data)
    frame = message.topic.encode() + TOPIC_SEPARATOR + msgpack.packb(data, use_bin_type=True)
    limit = message.body.max_bytes
    if len(frame) > limit:
        raise ProtocolError(f"{message.kind} message is {len(frame)} bytes, over the limit of {limit} for "
                            f"{message.kind} (docs/protocol.md §2.4); send less: shorter text or audio frames, "
                            f"fewer or smaller images")
    return frame


def decode(frame: bytes) -> Message[Body]:
    """Parse and validate one wire frame; raises ProtocolError and nothing else."""
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise ProtocolError("frame must be bytes")
    frame = bytes(frame)
    _check_size(frame)
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


def _check_size(frame: bytes) -> None:
    """Refuse a frame over the limit of the kind its topic names (over MAX_MESSAGE_BYTES when it names
    none), before anything is parsed. A topic that names another kind than the payload's fails later."""
    limit = _FRAME_LIMITS.get(frame[:_LONGEST_KIND + 1].partition(b"/")[0])
    if limit is None:
        if len(frame) > MAX_MESSAGE_BYTES:
            raise ProtocolError(f"message is {len(frame)} bytes, the limit is {MAX_MESSAGE_BYTES}")
    elif len(frame) > limit:
        kind = frame.partition(b"/")[0].decode()
        raise ProtocolError(f"{kind} message is {len(frame)} bytes, the limit for {kind} is {limit}")


def validate(data: Any) -> Message[Body]:
    """Check a decoded payload map against the envelope and its kind's fields; the typed message."""
    envelope, cls, body = _check(data)
    message: Message[Body] = object.__new__(Message)
    # Checked already, so filled in directly: a frozen dataclass's __init__ costs a setattr per field.
    message.__dict__.update(body=cls.from_checked(body), session=envelope["session"], id=envelope["id"],
                            seq=envelope["seq"], ts=float(envelope["ts"]), src=envelope["src"], v=envelope["v"])
    return message


def _check(data: Any) -> tuple[dict[str, Any], type[Body], dict[str, Any]]:
    """The checked envelope, the kind's class and the checked body fields (defaults filled in)."""
    if not isinstance(data, dict):
        raise ProtocolError(f"payload must be a map, got {type(data).__name__}")
    version = data.get("v")
    if isinstance(version, int) and not isinstance(version, bool) and version > PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version} is newer than this voxpipe "
                            f"(speaks {PROTOCOL_VERSION}); upgrade voxpipe")
    envelope = _check_fields("envelope", ENVELOPE, data)
    kind = envelope["kind"]
    cls = KINDS.get(kind)
    if cls is None:
        raise ProtocolError(f"unknown kind {kind!r}; known kinds: {', '.join(sorted(KINDS))}")
    if not envelope["session"] and not cls.sessionless:
        raise ProtocolError(f"{kind}: field 'session' must not be empty")
    return envelope, cls, _check_fields(kind, cls.spec, data)


def _check_fields(where: str, spec: Mapping[str, Field], data: Mapping[str, Any]) -> dict[str, Any]:
    """Return the spec's fields from data (defaults filled); unknown extra fields are ignored."""
    checker = _CHECKERS.get(id(spec))
    if checker is None:
        checker = _CHECKERS[id(spec)] = _compile(where, spec)
    return checker(data)


_CHECKERS: dict[int, Callable[[Mapping[str, Any]], dict[str, Any]]] = {}
"""The compiled checker of each spec (the envelope's and each kind's), by the spec's identity."""
_MISSING = object()


def _compile(where: str, spec: Mapping[str, Field]) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """One function that checks every field of `spec` in order, as a loop over the fields would, but
    with each common check's fast path inlined (checks.FAST_PATHS): on the per-token and per-frame path
    the checks were most of the cost of a message, a call per field. A value that fails the fast path
    goes to its check, which accepts it or names the problem, so the messages are the checks' own."""
    names: dict[str, Any] = {"_MISSING": _MISSING, "_fail": _fail, "_copy": _copy}
    lines = ["def checker(data):", "    get = data.get", "    checked = {}"]
    for position, (name, rule) in enumerate(spec.items()):
        names[f"check{position}"], names[f"default{position}"] = rule.check, rule.default
        fast_path = FAST_PATHS.get(rule.check)
        lines += [f"    v = get({name!r}, _MISSING)",
                  "    if v is _MISSING:",
                  f"        {'_fail(' + repr(where) + ', ' + repr(name) + ', None)' if rule.required else ''}"
                  f"{'' if rule.required else f'v = _copy(default{position})'}",
                  f"    elif not ({fast_path or 'False'}):",
                  f"        problem = check{position}(v)",
                  "        if problem:",
                  f"            _fail({where!r}, {name!r}, problem)",
                  f"    checked[{name!r}] = v"]
    lines.append("    return checked")
    exec("\n".join(lines), names)  # the code is built above from the specs' own names and expressions
    checker: Callable[[Mapping[str, Any]], dict[str, Any]] = names["checker"]
    return checker


def _fail(where: str, name: str, problem: str | None) -> None:
    if problem is None:
        raise ProtocolError(f"{where}: missing field {name!r}")
    raise ProtocolError(f"{where}: field {name!r} {problem}")


def _copy(default: Any) -> Any:
    return default.copy() if isinstance(default, (dict, list)) else default
