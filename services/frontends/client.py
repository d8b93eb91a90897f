"""The voxpipe client library: ask the daemon something and follow the reply as typed messages.

    from voxpipe import Text, connect

    with connect() as vp:                             # finds the bus like the CLI does
        for event in vp.ask("Hello!", session="me"):  # a Reply: an iterator of Messages
            if isinstance(event.body, Text):
                print(event.body.delta, end="", flush=True)

`connect(config=None, ...)` resolves the config like the `voxpipe` CLI (`config` is a path, a
loaded Config or None for $VOXPIPE_CONFIG / ~/.config/voxpipe/config.toml) and confirms its
subscriptions with the bus's hello handshake before returning, so nothing of a reply is lost.
With no bus it raises `VoxpipeError` at once.

The events are the protocol's own messages (`voxpipe.protocol`), re-exported here: each is a
`Message` with `kind`, `session`, `id` (and `seq`, `ts`, `src`) and a typed `body`, one of `Text`,
`Chunk`, `Audio`, `Command`, `Reasoning`, `Playback`, `LlmDone` and `Error`, with every field of
its wire kind (`docs/protocol.md` §5). Match on the body's class:

    match event.body:
        case Text(delta=delta): ...
        case LlmDone(status="error", error=reason): ...

`Client.ask(text, session=None, *, stream=True, profile="", wait_audio=True, timeout=60.0)`
publishes one request and returns a `Reply`. Iterating it yields the reply's messages in arrival
order and stops when the reply is complete:

- after the `LlmDone` (`llm.done`) and the final `Text`;
- with `wait_audio=True` (the default), also after the final `Playback`, i.e. once the
  reply has been spoken; with `wait_audio=False` it ends as soon as the text is complete;
- at once after an `LlmDone` with status `interrupted`, and without waiting for audio after an
  `LlmDone` with status `error` (the protocol does not promise a final playback then);
- after an `Error` with code `stage_crashed` for llm, chunker, tts or player: the reply is lost;
- after `cancel()` of the reply's session or id: iteration stops without further events.

If nothing of the reply arrives for `timeout` seconds, iteration raises `VoxpipeTimeout`.
History's `Command` events can come after the reply ended: `Reply.late(timeout)` waits for them.
Events a client does not subscribe to (see `kinds`) are not waited for; only the reply kinds
(`REPLY_KINDS`) are yielded.

Threads: use a Client from one thread (each thread that follows replies opens its own
Client). The one exception is `cancel()`, which only publishes and may be called from any
thread, so a UI thread can stop a reply that a worker thread is following.

A Client follows one reply at a time: a new `ask()` ends the iteration of the previous reply.
Subscriptions are per session; asking in a session the client has not subscribed to yet
reconnects once with the larger set of subscriptions (one more handshake, ~50 ms).
"""

from __future__ import annotations

import os
import secrets
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import cast

from .. import protocol
from ..config import Config, load
from ..protocol import (
    Audio,
    Body,
    Cancel,
    Chunk,
    Command,
    Error,
    ErrorCode,
    Heartbeat,
    Image,
    LlmDone,
    Mark,
    Message,
    Playback,
    Reasoning,
    Request,
    Text,
    TextMark,
)
from ..runtime import BusLost, BusUnavailable, Connection, VoxpipeError, endpoints_for
from ..runtime.replies import cancels

__all__ = [
    "connect", "Client", "Reply", "VoxpipeError", "VoxpipeTimeout", "Message", "Text", "TextMark", "Chunk", "Mark",
    "Audio", "Command", "Reasoning", "Playback", "LlmDone", "Error", "ErrorCode", "REPLY_TYPES", "REPLY_KINDS",
    "REPLY_STAGES",
]

REPLY_TYPES: tuple[type[Body], ...] = (Text, Chunk, Audio, Command, Reasoning, LlmDone, Playback, Error)
"""The bodies of what a Reply yields: every kind a reply produces for front-ends."""
REPLY_KINDS = tuple(body.kind for body in REPLY_TYPES)
"""What a Client subscribes to by default (the wire names of REPLY_TYPES)."""
REPLY_STAGES = ("llm", "chunker", "tts", "player")
"""Stages a reply passes through: if one crashes, an in-flight reply cannot complete."""
DEFAULT_TIMEOUT = 60.0
_POLL_S = 0.1
"""How often a waiting Reply looks whether another thread cancelled it."""


class VoxpipeTimeout(VoxpipeError):
    """Nothing of a reply arrived within the timeout."""


# --- a reply ------------------------------------------------------------------------------

class Reply:
    """The messages of one request, in arrival order. Iterate it once (see the module docstring).

    `id` and `session` name the request; `text` is the display text received so far; `done`
    is the `llm.done` message once it arrived; `crashed` the `stage_crashed` error that lost the
    reply; `complete` tells whether the reply ended normally.
    """

    def __init__(self, client: Client, session: str, id: str, *, wait_text: bool, wait_audio: bool,
                 timeout: float) -> None:
        self.session = session
        self.id = id
        self.text = ""
        self.done: Message[LlmDone] | None = None
        self.crashed: Message[Error] | None = None
        self.cancelled = False
        self.asked_ts = time.time()
        """When the request was sent (wall clock, as a message's `ts`)."""
        self._client = client
        self._timeout = timeout
        self._text_final = not wait_text
        self._audio_final = not wait_audio
        self._ended = False

    def __iter__(self) -> Iterator[Message[Body]]:
        return self

    def __next__(self) -> Message[Body]:
        deadline = time.monotonic() + self._timeout
        while True:
            if self._ended or self.cancelled:
                self._ended = True
                raise StopIteration
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise VoxpipeTimeout(self._timeout_message())
            try:
                message = self._client._receive(min(remaining, _POLL_S))
            except BusLost:
                self._ended = True  # the reply cannot complete: say so at once, never after the timeout
                raise
            if message is None:
                continue
            if self._accept(message):
                self._ended = self.complete or self.crashed is not None
                return message

    def late(self, timeout: float) -> Message[Body] | None:
        """After the iteration ended, and before the next ask(): the next event of this reply, or None when
        none comes within `timeout`. History publishes a reply's `command` events once it has both llm.done
        and the final chunk, which with a quick player can be after the final playback that ended it."""
        deadline = time.monotonic() + timeout
        while self._client._reply is self and not self.cancelled and (remaining := deadline - time.monotonic()) > 0:
            message = self._client._receive(min(remaining, _POLL_S))
            if (message is not None and message.kind in REPLY_KINDS and message.id == self.id
                    and message.session == self.session):
                return message
        return None

    @property
    def complete(self) -> bool:
        """True once the reply has ended as described for `Client.ask`."""
        done = self.done
        if done is None:
            return False
        if done.body.status == "interrupted":
            return True
        return self._text_final and (self._audio_final or done.body.status != "ok")

    def _accept(self, message: Message[Body]) -> bool:
        """Whether the message is an event of this reply (noting what it says of the reply's end)."""
        body = message.body
        if message.kind not in REPLY_KINDS:
            return False
        if isinstance(body, Error) and body.code == ErrorCode.STAGE_CRASHED and body.stage in REPLY_STAGES:
            if message.ts < self.asked_ts:
                return False  # a crash before the request: its restart is `stage_down`'s to report, not this
            self.crashed = cast(Message[Error], message)
            return True
        if message.id != self.id or message.session != self.session:
            return False
        if isinstance(body, Error) and body.code == ErrorCode.STAGE_DOWN:
            self.crashed = cast(Message[Error], message)  # no stage will answer it: end at once
        if isinstance(body, Text):
            self.text += body.delta
            self._text_final = self._text_final or body.final
        elif isinstance(body, LlmDone):
            self.done = cast(Message[LlmDone], message)
        elif isinstance(body, Playback) and body.final:
            self._audio_final = True
        return True

    def _timeout_message(self) -> str:
        waiting = "the audio" if self.done is not None and self._text_final else "the reply"
        return (f"no progress on {waiting} for {self._timeout:g} s (request {self.id} in session "
                f"{self.session!r}); check that every stage runs: `voxpipe status`")


# --- the client ---------------------------------------------------------------------------

class Client:
    """A confirmed connection to the bus; see the module docstring for the rules."""

    def __init__(self, config: Config, *, session: str = "default", kinds: Iterable[str] = REPLY_KINDS,
                 name: str = "client", timeout: float = 10.0) -> None:
        self.config = config
        self.session = _check_session(session)
        self.kinds = tuple(dict.fromkeys(kinds))
        unknown = [kind for kind in self.kinds if kind not in protocol.KINDS]
        if unknown:
            raise ValueError(f"unknown message kind(s) {', '.join(unknown)}; known: {', '.join(REPLY_KINDS)}")
        self.name = name
        self._open_timeout = timeout
        self._endpoints = endpoints_for(config)
        self._sessions: list[str] = [self.session]
        self._lock = threading.RLock()
        self._connection: Connection | None = None
        self._reply: Reply | None = None
        self._last_session = self.session
        self._open()

    # --- lifecycle ---------------------------------------------------------------------

    def _subscriptions(self) -> list[bytes]:
        prefixes = [protocol.subscription(kind, session) for session in self._sessions for kind in self.kinds]
        if "error" in self.kinds:
            prefixes.append(protocol.subscription("error", ""))  # stage-wide: stage_crashed
        return prefixes

    def _open(self) -> None:
        src = f"{self.name}.{os.getpid()}.{secrets.token_hex(3)}"
        connection = Connection(src, self._endpoints, self._subscriptions())
        try:
            connection.require_bus()
            connection.open(timeout=self._open_timeout)
        except BusUnavailable as exc:
            raise VoxpipeError(str(exc)) from None
        with self._lock:
            old, self._connection = self._connection, connection
        if old is not None:
            old.close()

    def reachable(self, stage: str = "", timeout: float = 1.0) -> bool:
        """Whether a broker answers a hello handshake now (on a fresh connection, within `timeout`),
        and, if `stage` names one, whether that stage's ready heartbeat comes within `timeout` too."""
        subscriptions = [protocol.subscription("heartbeat")] if stage else []
        probe = Connection(f"{self.name}.probe.{secrets.token_hex(3)}", self._endpoints, subscriptions)
        try:
            probe.require_bus()
            probe.open(timeout=timeout)
            deadline = time.monotonic() + timeout
            while stage:
                beat = probe.receive(max(0.0, deadline - time.monotonic()))
                if beat is None:
                    return False
                if (beat.src.split("@")[0] == stage and isinstance(beat.body, Heartbeat)
                        and beat.body.state == "ready"):
                    break
            return True
        except VoxpipeError:  # BusUnavailable included
            return False
        finally:
            probe.close()

    def reconnect(self) -> None:
        """Connect again with a fresh handshake, e.g. after the broker restarted."""
        self._open()

    def close(self) -> None:
        with self._lock:
            connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def src(self) -> str:
        """The name this client publishes under (unique per connection)."""
        return self._require().src

    def _require(self) -> Connection:
        connection = self._connection
        if connection is None:
            raise VoxpipeError("the client is closed")
        return connection

    # --- asking ------------------------------------------------------------------------

    def ask(self, text: str, session: str | None = None, *, stream: bool | None = True, profile: str = "",
            wait_audio: bool = True, timeout: float = DEFAULT_TIMEOUT,
            images: Iterable[tuple[str, bytes]] = (), voice: str = "") -> Reply:
        """Publish a request and return its Reply (an iterator of the reply's messages).

        `stream`: True/False asks the provider for a streamed/whole reply; None uses the
        profile's setting. `profile`: the LLM profile ("" = llm.profile). `images`:
        (mime, bytes) pairs for vision models. `voice`: the TTS voice that speaks this reply,
        in the engine's naming ("" = the configured voice; an unknown one gets an `unknown_voice`
        error and the configured voice). `wait_audio`: also wait until the reply has been
        spoken (the final Playback). `timeout`: seconds without any event of this reply
        before iteration raises VoxpipeTimeout.
        """
        if "llm.done" not in self.kinds:
            raise VoxpipeError("ask() follows a reply until its llm.done; connect with 'llm.done' among the kinds")
        session = _check_session(self.session if session is None else session)
        if session not in self._sessions:
            self._sessions.append(session)
            self._open()  # subscriptions are confirmed only by a handshake
        if self._reply is not None:
            self._reply._ended = True
        request_id = uuid.uuid4().hex[:16]
        reply = Reply(self, session, request_id, wait_text="text" in self.kinds,
                      wait_audio=wait_audio and "playback" in self.kinds, timeout=timeout)
        self._reply = reply
        self._last_session = session
        pictures = tuple(Image(mime=mime, data=bytes(data)) for mime, data in images)
        self._publish(session, request_id, Request(text=text, profile=profile, stream=stream, images=pictures,
                                                   voice=voice))
        return reply

    def cancel(self, session: str | None = None, id: str | None = None, reason: str = "") -> None:
        """Stop a reply everywhere (LLM, TTS, player): every reply of `session` unless `id` names one.

        `session` defaults to the session of the last ask(). Safe to call from any thread.
        """
        session = _check_session(self._last_session if session is None else session)
        reply = self._reply
        if reply is not None and cancels((reply.session, reply.id), session, id or ""):
            reply.cancelled = True
        self._publish(session, id or "", Cancel(reason=reason or f"cancelled by {self.name}"))

    def _publish(self, session: str, id: str, body: Body) -> None:
        with self._lock:
            try:
                connection = self._require()
                connection.ensure_live()  # after a lost bus: handshake with the new one first
                connection.publish(session, id, body)
            except BusUnavailable as exc:
                raise VoxpipeError(str(exc)) from None

    def _receive(self, timeout: float) -> Message[Body] | None:
        return self._require().receive(timeout)


def connect(config: Config | str | os.PathLike[str] | None = None, *, session: str = "default",
            kinds: Iterable[str] = REPLY_KINDS, name: str = "client", timeout: float = 10.0) -> Client:
    """Open a Client: `config` is a path, a loaded Config or None (found like the CLI does).

    `session` is the default session of ask() and cancel(); `kinds` what to subscribe to
    (() makes a publish-only client); `name` goes into the `src` of what it publishes;
    `timeout` bounds the handshake. Raises VoxpipeError when no bus answers, ConfigError
    for a bad config.
    """
    if not isinstance(config, Config):
        config = load(Path(config) if config is not None else None)
    return Client(config, session=session, kinds=kinds, name=name, timeout=timeout)


def _check_session(session: str) -> str:
    if not session or not protocol.SESSION_PATTERN.fullmatch(session):
        raise ValueError(f"session {session!r} is not valid: use 1-64 of A-Z a-z 0-9 _ . : @ -")
    return session
