"""The voxpipe wire protocol: every message kind as a type, the error codes, and the wire format.

- `kinds`: one frozen dataclass per kind (`Token`, `Chunk`, `Audio`, ...), with its fields' checks;
- `errors`: `ErrorCode`, every code an `error` message carries;
- `wire`: the envelope (`Message`), `encode`, `decode`, topics and subscriptions;
- `checks`: the field checks the kinds are built from.

This package is the only place that knows how a message looks on the wire; `docs/protocol.md`
documents exactly what is here. Everything is re-exported, so `from voxpipe.protocol import Chunk`.
"""

from .errors import ErrorCode
from .kinds import (
                    DONE_STATUSES,
                    KINDS,
                    PLAYBACK_EVENTS,
                    SESSION_PATTERN,
                    Audio,
                    Body,
                    Cancel,
                    ChatMessage,
                    Chunk,
                    Command,
                    Context,
                    ContextQuery,
                    Error,
                    Heartbeat,
                    Hello,
                    HistorySaved,
                    Image,
                    LlmDone,
                    Mark,
                    Metrics,
                    Playback,
                    Reasoning,
                    Replay,
                    ReplayDone,
                    ReplayQuery,
                    Request,
                    Text,
                    TextMark,
                    Token,
)
from .wire import (
                    BROKER_HIGH_WATER_MARK,
                    BROKER_MAX_BYTES,
                    ENVELOPE,
                    HIGH_WATER_MARK,
                    MAX_MESSAGE_BYTES,
                    PROTOCOL_VERSION,
                    SESSIONLESS_KINDS,
                    TOPIC_SEPARATOR,
                    Message,
                    ProtocolError,
                    decode,
                    encode,
                    subscription,
                    topic,
                    validate,
)

__all__ = [
    "Message", "Body", "ErrorCode", "ProtocolError", "encode", "decode", "validate", "topic", "subscription",
    "Hello", "Request", "Cancel", "Token", "Reasoning", "LlmDone", "ContextQuery", "Context", "ReplayQuery",
    "ReplayDone", "Replay", "Text", "Chunk", "Audio", "Playback", "Metrics", "Command", "HistorySaved", "Error",
    "Heartbeat", "Image", "Mark", "TextMark", "ChatMessage",
    "KINDS", "ENVELOPE", "SESSIONLESS_KINDS", "SESSION_PATTERN", "DONE_STATUSES", "PLAYBACK_EVENTS",
    "PROTOCOL_VERSION", "MAX_MESSAGE_BYTES", "BROKER_MAX_BYTES", "HIGH_WATER_MARK",
    "BROKER_HIGH_WATER_MARK", "TOPIC_SEPARATOR",
]
