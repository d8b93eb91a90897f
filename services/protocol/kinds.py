"""Every message kind, as one frozen dataclass: its fields, each field's check, and what it is for.

A kind is defined here and nowhere else. Publishers build the object (`Chunk(text=..., index=...,
final=...)`) and hand it to `Connection.publish`; receivers get it back as `message.body`, a typed
object, from `wire.decode`.  `docs/protocol.md` documents exactly these classes, and
`tests/test_protocol_doc.py` holds the two together.

Each field carries its check in its metadata (see `wire`); a field with a default may be left out
on the wire.  Lists travel as msgpack arrays and are tuples here, nested maps (marks, images, chat
messages) are small records of their own.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from .checks import (
    Check,
    Field,
    binary,
    boolean,
    counter_map,
    fraction,
    integer,
    list_of,
    number,
    optional_boolean,
    record,
)
from .checks import text as string  # `text` is also a field name in the kinds below

SHORT = 128
TEXT = 64 * 1024
REPLY = 512 * 1024
KIB = 1024
CONTROL_BYTES = 64 * KIB
"""Frame limit of the small kinds (hello, cancel, error, playback, ...): every field at its limit, in
4-byte characters, fits."""
STREAM_BYTES = 512 * KIB
"""Frame limit of the kinds a reply streams (token, text, chunk, audio, ...). Hundreds of them may be
queued for one subscriber, so they are kept small; a TEXT-long piece in 4-byte characters fits, as
does an audio frame of PCM_BYTES."""
HEARTBEAT_BYTES = 1024 * KIB
"""Frame limit of a heartbeat: its stream map is cut to fit (`Connection.take_recent_streams`)."""
BULK_BYTES = 4 * 1024 * KIB
"""Frame limit of the few kinds that carry a whole conversation piece: a request (its images), a
context (the history), llm.done and replay (a whole reply). The largest limit, so it is also what
the broker and every socket let through (`wire.MAX_MESSAGE_BYTES`)."""
PCM_BYTES = 256 * KIB
"""PCM in one audio frame: 200 ms (tts max_frame_ms) of any format an engine makes, up to 96 kHz
stereo 32-bit, fits, and a whole second of 48 kHz stereo 16-bit."""
SESSION_PATTERN = re.compile(r"[A-Za-z0-9_.:@-]{0,64}")
PERSONA_PATTERN = re.compile(r"[A-Za-z0-9_.-]{0,64}")
"""A persona's name (`Request.persona`): a plain word, so it can name a config key and a file, and
history can keep its memories under it (docs/design/game-link.md §4.2)."""
DONE_STATUSES = ("ok", "error", "interrupted")
PLAYBACK_EVENTS = ("started", "finished", "stopped")
PLAYBACK_PLACES = ("", "daemon", "client")
"""Where a reply's audio plays (`Request.playback`): "" or "daemon" on the daemon's player, "client" on
the front-end that asked, which then reports its own `playback` events."""


def wire(check: Check, default: Any = MISSING, *, factory: Any = MISSING) -> Any:
    """A field of a message or record: its check travels in the field's metadata; a field with a
    default (or a factory, for maps) may be omitted on the wire."""
    return field(default=default, default_factory=factory, metadata={"check": check})


def spec_of(cls: type) -> dict[str, Field]:
    """The wire specification of a dataclass's fields, in declaration order."""
    spec = {}
    for item in fields(cls):
        if item.default is not MISSING:
            spec[item.name] = Field(item.metadata["check"], required=False, default=item.default)
        elif item.default_factory is not MISSING:
            spec[item.name] = Field(item.metadata["check"], required=False, default=item.default_factory())
        else:
            spec[item.name] = Field(item.metadata["check"])
    return spec


# --- records nested in messages ---------------------------------------------------------------

@dataclass(frozen=True)
class Record:
    """A map nested in a message (a mark, an image, a chat message): travels as a msgpack map."""

    def to_wire(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def check(cls) -> Check:
        return record({name: rule.check for name, rule in spec_of(cls).items()})


@dataclass(frozen=True)
class Image(Record):
    """An image attached to a request."""

    mime: str = wire(string(64, re.compile(r"image/[a-z0-9.+-]+")))
    data: bytes = wire(binary(3 * 1024 * 1024))


@dataclass(frozen=True)
class Mark(Record):
    """A command tag met in a speakable chunk: `offset` characters into chunk number `chunk`."""

    tag: str = wire(string(SHORT))
    body: str = wire(string(TEXT))
    chunk: int = wire(integer())
    offset: int = wire(integer())


@dataclass(frozen=True)
class TextMark(Record):
    """A command tag met in a piece of display text, `offset` characters into its `delta`."""

    tag: str = wire(string(SHORT))
    body: str = wire(string(TEXT))
    offset: int = wire(integer())


@dataclass(frozen=True)
class ChatMessage(Record):
    """One turn of the conversation history that history sends llm as context."""

    role: str = wire(string(16, choices=("system", "user", "assistant")))
    content: str = wire(string(REPLY))


# --- the kinds ---------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Body:
    """What one kind of message carries besides the envelope (session, id, seq, ts, src).

    `kind` is its name on the wire; `sessionless` kinds may have an empty session (stage-wide
    events); `max_bytes` is its frame limit. `spec` (filled in by `kind()`) is what `wire.validate`
    checks; `records` names the fields that hold nested records, so they are converted to and from
    plain maps at the edge."""

    kind: ClassVar[str] = ""
    sessionless: ClassVar[bool] = False
    max_bytes: ClassVar[int] = 0
    """The largest frame of this kind, envelope and topic included: ZeroMQ bounds queues in messages
    only, so these limits are what bound them in bytes (docs/protocol.md §2.4)."""
    spec: ClassVar[dict[str, Field]] = {}
    records: ClassVar[dict[str, type[Record]]] = {}
    tuples: ClassVar[tuple[str, ...]] = ()

    def to_wire(self) -> dict[str, Any]:
        """The body as a msgpack-ready map (records become maps)."""
        data = dict(self.__dict__)
        for name in self.records:
            data[name] = [item.to_wire() for item in data[name]]
        return data

    @classmethod
    def from_checked(cls: type[B], checked: dict[str, Any]) -> B:
        """The body from a map `wire.validate` has checked (lists become tuples, maps records).

        The checks already ran, so the object is filled in directly rather than through the
        dataclass's __init__: on the per-token and per-frame path that halves the cost."""
        for name, item_type in cls.records.items():
            checked[name] = tuple(item_type(**item) for item in checked[name])
        for name in cls.tuples:
            checked[name] = tuple(checked[name])
        body = object.__new__(cls)
        body.__dict__.update(checked)
        return body


B = TypeVar("B", bound=Body)
KINDS: dict[str, type[Body]] = {}
"""Every kind by its wire name."""


def kind(name: str, *, max_bytes: int, sessionless: bool = False) -> Any:
    """Register a Body class as the kind `name`, with its frame limit, and derive its wire specification."""
    def register(cls: type[B]) -> type[B]:
        cls.kind, cls.sessionless, cls.max_bytes = name, sessionless, max_bytes
        cls.spec = spec_of(cls)
        cls.records = {item.name: item.metadata["record"] for item in fields(cls) if "record" in item.metadata}
        cls.tuples = tuple(item.name for item in fields(cls)
                           if str(item.type).startswith("tuple[") and item.name not in cls.records)
        KINDS[name] = cls
        return cls
    return register


def records(item_type: type[Record], limit: int) -> Any:
    """A field holding a list of nested records, at most `limit`."""
    return field(default=(), metadata={"check": list_of(item_type.check(), limit), "record": item_type})


@kind("hello", max_bytes=CONTROL_BYTES)
@dataclass(frozen=True, kw_only=True)
class Hello(Body):
    """A participant's own probe, sent until it comes back through the broker: then its
    subscriptions are live and nothing it publishes or expects is lost (the handshake)."""


@kind("request", max_bytes=BULK_BYTES)
@dataclass(frozen=True, kw_only=True)
class Request(Body):
    """A user message to answer. `profile` picks the LLM profile ("" for the default), `stream`
    overrides the profile's streaming, `voice` the TTS voice of this reply, `playback` where its
    audio plays (PLAYBACK_PLACES): a front-end in a browser plays it itself, so the daemon's
    player must stay silent for it. `persona` names who answers (its prompt, its memories and
    variables; "" for the configured one), `system` is context for this reply only, added to the
    system prompt (a game's state: docs/design/game-link.md §4.2)."""

    text: str = wire(string(TEXT))
    profile: str = wire(string(64), "")
    stream: bool | None = wire(optional_boolean, None)
    images: tuple[Image, ...] = records(Image, 8)
    voice: str = wire(string(64), "")
    playback: str = wire(string(16, choices=PLAYBACK_PLACES), "")
    persona: str = wire(string(64, PERSONA_PATTERN), "")
    system: str = wire(string(TEXT), "")


@kind("cancel", max_bytes=CONTROL_BYTES)
@dataclass(frozen=True, kw_only=True)
class Cancel(Body):
    """Stop a reply: the one named by the envelope's id, or, with an empty id, every reply of the
    session. Every stage drops what it holds of it (`voxpipe.runtime.replies.cancels`)."""

    reason: str = wire(string(200), "")


@kind("token", max_bytes=STREAM_BYTES)
@dataclass(frozen=True, kw_only=True)
class Token(Body):
    """The next piece of the reply's text, as the model wrote it (tags included)."""

    text: str = wire(string(TEXT))


@kind("reasoning", max_bytes=STREAM_BYTES)
@dataclass(frozen=True, kw_only=True)
class Reasoning(Body):
    """A piece of the model's reasoning: never shown as reply text, never spoken."""

    text: str = wire(string(TEXT))


@kind("llm.done", max_bytes=BULK_BYTES)
@dataclass(frozen=True, kw_only=True)
class LlmDone(Body):
    """The reply's generation ended: `status` ok, error (see `error`) or interrupted, with the whole
    text. Every request gets exactly one."""

    status: str = wire(string(16, choices=DONE_STATUSES))
    text: str = wire(string(REPLY))
    tokens: int = wire(integer())
    error: str = wire(string(2000), "")
    provider: str = wire(string(64), "")
    model: str = wire(string(256), "")
    finish_reason: str = wire(string(64), "")
    metrics: Mapping[str, float] = wire(counter_map(number), factory=dict)
    guard: str = wire(string(32), "")
    reasoning: str = wire(string(REPLY), "")
    profile: str = wire(string(64), "")


@kind("context.query", max_bytes=CONTROL_BYTES)
@dataclass(frozen=True, kw_only=True)
class ContextQuery(Body):
    """llm asks history for the session's recent turns (at most `limit`), and for the memories and
    variables of the request's `persona` ("" for history.persona)."""

    limit: int = wire(integer(0, 1000), 20)
    persona: str = wire(string(64, PERSONA_PATTERN), "")


@kind("context", max_bytes=BULK_BYTES)
@dataclass(frozen=True, kw_only=True)
class Context(Body):
    """history's answer to a context.query: the turns, the memories and the persona's variables."""

    messages: tuple[ChatMessage, ...] = field(
        metadata={"check": list_of(ChatMessage.check(), 1000), "record": ChatMessage})
    memory: str = wire(string(REPLY), "")
    variables: Mapping[str, float] = wire(counter_map(number), factory=dict)


@kind("replay.query", sessionless=True, max_bytes=CONTROL_BYTES)
@dataclass(frozen=True, kw_only=True)
class ReplayQuery(Body):
    """A restarted history asks llm for every reply finished since `since` (a wall-clock time)."""

    since: float = wire(number)


@kind("replay.done", sessionless=True, max_bytes=CONTROL_BYTES)
@dataclass(frozen=True, kw_only=True)
class ReplayDone(Body):
    """llm has re-sent `count` replies; `complete` is false when its journal no longer reaches back
    to `since` (it reaches back to `oldest`)."""

    since: float = wire(number)
    count: int = wire(integer())
    complete: bool = wire(boolean)
    oldest: float = wire(number, 0.0)


@kind("replay", max_bytes=BULK_BYTES)
@dataclass(frozen=True, kw_only=True)
class Replay(LlmDone):
    """A finished reply re-sent from llm's journal, so a restarted history stage catches up; with its
    request's persona, whose memories and variables its commands change."""

    request_text: str = wire(string(TEXT))
    request_ts: float = wire(number)
    done_ts: float = wire(number)
    request_persona: str = wire(string(64, PERSONA_PATTERN), "")


@kind("text", max_bytes=STREAM_BYTES)
@dataclass(frozen=True, kw_only=True)
class Text(Body):
    """The next piece of display text (command tags removed); `final` on the reply's last one.
    `marks` are the tags met in this piece, each at its offset in `delta`."""

    delta: str = wire(string(TEXT))
    final: bool = wire(boolean, False)
    marks: tuple[TextMark, ...] = records(TextMark, 1000)


@kind("chunk", max_bytes=STREAM_BYTES)
@dataclass(frozen=True, kw_only=True)
class Chunk(Body):
    """A speakable phrase, numbered from 0 in the reply; `final` on the reply's last one. `marks`
    are the command tags met in it."""

    text: str = wire(string(TEXT))
    index: int = wire(integer())
    final: bool = wire(boolean)
    marks: tuple[Mark, ...] = records(Mark, 1000)


@kind("audio", max_bytes=STREAM_BYTES)
@dataclass(frozen=True, kw_only=True)
class Audio(Body):
    """A frame of PCM for chunk `chunk`: `width`-byte signed little-endian samples, interleaved.
    Each chunk's frames end with exactly one `last` frame; `final` marks the reply's last chunk;
    `chars` is the length of the chunk's text, for the heard fraction."""

    chunk: int = wire(integer())
    frame: int = wire(integer())
    rate: int = wire(integer(1000, 384000))
    channels: int = wire(integer(1, 8))
    width: int = wire(integer(1, 4))
    pcm: bytes = field(repr=False, metadata={"check": binary(PCM_BYTES)})
    last: bool = wire(boolean)
    final: bool = wire(boolean)
    chars: int = wire(integer(0, TEXT), 0)


@kind("playback", max_bytes=CONTROL_BYTES)
@dataclass(frozen=True, kw_only=True)
class Playback(Body):
    """`started`, `finished` or `stopped` for a chunk; `final` on the reply's last playback event.
    `heard` (and `heard_chars`) is how much of the chunk was heard when it was stopped."""

    event: str = wire(string(16, choices=PLAYBACK_EVENTS))
    chunk: int = wire(integer(-1), -1)
    path: str = wire(string(4096), "")
    final: bool = wire(boolean, False)
    heard: float = wire(fraction, 0.0)
    heard_chars: int = wire(integer(0, TEXT), 0)
    audio_ts: float = wire(number, 0.0)
    audio_s: float = wire(number, 0.0)


@kind("metrics", max_bytes=CONTROL_BYTES)
@dataclass(frozen=True, kw_only=True)
class Metrics(Body):
    """One reply's latencies from its request (ms, -1 when that point never came) and sizes."""

    request_ts: float = wire(number)
    profile: str = wire(string(64), "")
    provider: str = wire(string(64), "")
    model: str = wire(string(256), "")
    engine: str = wire(string(64), "")
    status: str = wire(string(16), "")
    first_token_ms: float = wire(number, -1.0)
    first_chunk_ms: float = wire(number, -1.0)
    first_audio_ms: float = wire(number, -1.0)
    first_playback_ms: float = wire(number, -1.0)
    end_ms: float = wire(number, -1.0)
    tokens: int = wire(integer(), 0)
    chars: int = wire(integer(), 0)
    audio_s: float = wire(number, 0.0)


@kind("command", max_bytes=STREAM_BYTES)
@dataclass(frozen=True, kw_only=True)
class Command(Body):
    """A command tag of the reply, judged against the allowlist; `accepted=False` says why in
    `reason`. `chunk` and `offset` place it in the speech (-1 when it was in no chunk)."""

    name: str = wire(string(SHORT))
    args: tuple[str, ...] = wire(list_of(string(TEXT), 64), ())
    chunk: int = wire(integer(-1), -1)
    offset: int = wire(integer(-1), -1)
    accepted: bool = wire(boolean)
    reason: str = wire(string(500), "")


@kind("history.saved", max_bytes=CONTROL_BYTES)
@dataclass(frozen=True, kw_only=True)
class HistorySaved(Body):
    """history stored a turn as row `message_id`."""

    role: str = wire(string(16, choices=("user", "assistant")))
    message_id: int = wire(integer())


@kind("error", sessionless=True, max_bytes=CONTROL_BYTES)
@dataclass(frozen=True, kw_only=True)
class Error(Body):
    """Something went wrong: `code` is an `ErrorCode`, `message` says what and what to do. About a
    reply when session and id are set; `stage` names the stage it is about when that is not the
    sender (for `stage_crashed`, the crashed stage)."""

    code: str = wire(string(64))
    message: str = wire(string(2000))
    ref_kind: str = wire(string(32), "")
    stage: str = wire(string(64), "")


@kind("heartbeat", sessionless=True, max_bytes=HEARTBEAT_BYTES)
@dataclass(frozen=True, kw_only=True)
class Heartbeat(Body):
    """Every participant's pulse, each second: its state, counters, and the last seq of each stream
    it published since the last beat (so a receiver notices a lost tail)."""

    pid: int = wire(integer())
    uptime: float = wire(number)
    state: str = wire(string(16, choices=("ready", "stopping")))
    shard: str = wire(string(32), "")
    counters: Mapping[str, int] = wire(counter_map(integer()), factory=dict)
    streams: Mapping[str, int] = wire(counter_map(integer()), factory=dict)
    children: Mapping[str, str] = wire(counter_map(string(200)), factory=dict)
    """Only from the launcher (`voxpipe run`): each supervised process's src -> `ready`, `starting`, or
    `down: <why>`, so `voxpipe status` shows a stage that is down, which sends no heartbeat itself."""
