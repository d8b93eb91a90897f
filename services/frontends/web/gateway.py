"""`voxpipe web`: serve the page and bridge one WebSocket per browser tab to the bus.

The gateway is a front-end like `voxpipe chat`: one bus `Connection` (src `web`), which a thread
reads and hands to the asyncio loop, where every message of a session goes to that session's tabs,
and a reply's `audio` only to the tab that asked it with playback "client". What the tabs send is
checked, limited and published on the bus. docs/protocol.md §8 is the contract; this module keeps it.

Security, since a WebSocket can be opened by any page the user visits (docs/protocol.md §8.1):
- it binds to loopback unless told otherwise; any other address needs the access token, generated
  at start and printed once as a link (or read from `web.token_file`, a 0600 file of the user's own);
- with a token, every request carries it (`?token=`); without one, the `Host` must be a loopback
  name, so a DNS-rebinding page cannot borrow the loopback gateway under its own name;
- the WebSocket's `Origin` must be the gateway's own: no other site can drive the daemon;
- each connection is limited in frame size and rate, and the number of connections is bounded.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import json
import logging
import os
import re
import secrets
import signal
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import zmq
from aiohttp import WSMsgType, web

from ... import protocol
from ...config import EXIT_OK, EXIT_USAGE, Config
from ...protocol import Audio, Body, Cancel, ContextQuery, Heartbeat, Message, Playback, ProtocolError, Request
from ...runtime import BusUnavailable, Connection, endpoints_for, sdnotify
from ...runtime.broker import runtime_dir
from ...runtime.instance import InstanceLock
from ...runtime.loop_feed import feed_loop, serve_attached
from .access import access_token, is_loopback

log = logging.getLogger("voxpipe.web")

STATIC = Path(__file__).resolve().parent / "static"
"""The page and its assets (index.html and what it loads): shipped in the package, no CDN."""
MAX_FRAME_BYTES = 64 * 1024
"""A text frame from a tab larger than this is refused; the connection goes on."""
MAX_WS_BYTES = 4 * MAX_FRAME_BYTES
"""Past this aiohttp itself closes the connection (1009) without reading the frame into memory whole."""
MESSAGES_PER_S = 20
BURST = 40
"""A tab's token bucket: MESSAGES_PER_S frames a second, BURST at once."""
FLOOD_REFUSALS = 40
FLOOD_WINDOW_S = 10.0
"""A tab that has FLOOD_REFUSALS frames refused within FLOOD_WINDOW_S is closed with 1008."""
FLUSH_S = 1.0
"""How long a tab closed for flooding gets to read the refusals still queued for it."""
MAX_TABS = 16
OUTBOX_FRAMES = 4096
"""Frames queued for one tab; a tab that falls this far behind is closed with 1013 (try again later)."""
ASKED_PER_TAB = 256
"""Replies a tab is remembered to have asked (for its audio and its playback reports); the oldest go."""
HISTORY_TIMEOUT_S = 5.0
FORWARDED = ("text", "command", "llm.done", "error", "metrics", "playback")
"""The kinds every tab of a session receives as JSON; `audio` goes as binary to the asking tab only."""
ID_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
DEFAULT_SESSION = "web"
HEARTBEAT_S = 1.0
CLOSE_POLICY, CLOSE_TRY_LATER, CLOSE_GOING_AWAY = 1008, 1013, 1001
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # the page's URL holds the token
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'",
    "Cache-Control": "no-store",
}


class Refused(Exception):
    """A frame from a tab that the gateway does not pass on; the message is the `refused` reason."""


class Bucket:
    """A token bucket: `rate` a second, `burst` at once."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.at = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


@dataclass(eq=False)
class Tab:
    """One browser tab's WebSocket: its session, what it asked, and the frames waiting for it."""

    ws: web.WebSocketResponse
    session: str
    outbox: asyncio.Queue[str | bytes] = field(default_factory=lambda: asyncio.Queue(OUTBOX_FRAMES))
    bucket: Bucket = field(default_factory=lambda: Bucket(MESSAGES_PER_S, BURST))
    refusals: collections.deque[float] = field(default_factory=collections.deque)
    asked: collections.OrderedDict[str, str] = field(default_factory=collections.OrderedDict)
    """Reply id -> its playback ("", "daemon" or "client"), newest last."""
    audio_ts: dict[tuple[str, int], float] = field(default_factory=dict)
    """(reply id, chunk) -> the `ts` of the chunk's first `audio` sent to this tab: a `started` report
    carries it, as the player's does, so history's time to first audio holds for browser replies."""
    closing: int = 0
    """The close code once the gateway has decided to close this tab."""
    closer: asyncio.Future[bool] | None = None
    """The close of a tab that fell behind, which its reader does not wait for."""


def audio_frame(message: Message[Body]) -> bytes:
    """The binary frame of an `audio` message: [uint32 LE N][N bytes of JSON header][PCM]."""
    body = message.body
    assert isinstance(body, Audio)
    header = json.dumps({"id": message.id, "chunk": body.chunk, "seq": message.seq, "rate": body.rate,
                         "channels": body.channels, "width": body.width, "last": body.last,
                         "final": body.final, "chars": body.chars}, separators=(",", ":")).encode()
    return struct.pack("<I", len(header)) + header + body.pcm


def json_frame(message: Message[Body]) -> str:
    """The JSON frame of a forwarded message: its kind as `type`, the envelope, then the body's fields."""
    return json.dumps({"type": message.kind, "session": message.session, "id": message.id, "seq": message.seq,
                       "ts": message.ts, **message.body.to_wire()}, ensure_ascii=False, separators=(",", ":"))


class Gateway:
    """The aiohttp app and the bus connection; `run()` serves until SIGTERM or SIGINT."""

    def __init__(self, config: Config, host: str, port: int, token: str) -> None:
        self.config = config
        self.host, self.port, self.token = host, port, token
        kinds = (*FORWARDED, "audio", "context")
        self.bus = Connection("web", endpoints_for(config), [protocol.subscription(kind) for kind in kinds])
        self.tabs: dict[str, set[Tab]] = {}
        """Session -> its open tabs."""
        self.owners: dict[tuple[str, str], Tab] = {}
        """(session, reply id) -> the tab that asked it."""
        self.queries: dict[tuple[str, str], Tab] = {}
        """(session, context.query id) -> the tab waiting for the history."""
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop = asyncio.Event()
        self.stopped = threading.Event()
        self.started_at = time.monotonic()
        self.lock = InstanceLock(runtime_dir(config["bus"]["runtime_dir"]), "web")

    # --- the app ----------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard])
        app.router.add_get("/", self._page)
        app.router.add_get("/static/{name}", self._asset)
        app.router.add_get("/ws", self._websocket)
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """The token on every request when one is set; a loopback Host when none is (DNS rebinding)."""
        if self.token:
            if not secrets.compare_digest(request.query.get("token", "").encode(), self.token.encode()):
                raise web.HTTPForbidden(text="voxpipe web: open the link with ?token= that `voxpipe web` printed\n")
        elif not is_loopback(request.url.host or ""):
            raise web.HTTPForbidden(text="voxpipe web: open it as localhost or 127.0.0.1\n")
        response: web.StreamResponse = await handler(request)
        if not isinstance(response, web.WebSocketResponse):
            response.headers.update(SECURITY_HEADERS)
        return response

    async def _page(self, request: web.Request) -> web.StreamResponse:
        if not self.token:
            return await self._asset_named("index.html")
        # The page's style sheet and script need the token too, and the CSP allows no inline script that
        # could add it: it goes onto their links here (a URL-safe token needs no escaping).
        page = re.sub(r'((?:src|href)="static/[^"?]+)"', rf'\1?token={self.token}"',
                      (STATIC / "index.html").read_text())
        return web.Response(text=page, content_type="text/html")

    async def _asset(self, request: web.Request) -> web.StreamResponse:
        return await self._asset_named(request.match_info["name"])

    async def _asset_named(self, name: str) -> web.StreamResponse:
        """A file straight in static/ (no subfolders, no dot files), so no path can leave it."""
        path = STATIC / name
        if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*", name) or not path.is_file():
            raise web.HTTPNotFound(text=f"voxpipe web: no {name} in the page's files\n")
        return web.FileResponse(path)

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        session = request.query.get("session", DEFAULT_SESSION)
        if not session or not protocol.SESSION_PATTERN.fullmatch(session):
            raise web.HTTPBadRequest(text="voxpipe web: session must be 1-64 of A-Z a-z 0-9 _ . : @ -\n")
        origin = request.headers.get("Origin", "")
        if origin not in (f"http://{request.host}", f"https://{request.host}"):
            raise web.HTTPForbidden(text="voxpipe web: this WebSocket takes only the gateway's own page\n")
        if sum(len(tabs) for tabs in self.tabs.values()) >= MAX_TABS:
            raise web.HTTPServiceUnavailable(text=f"voxpipe web: {MAX_TABS} tabs are open already\n")
        ws = web.WebSocketResponse(max_msg_size=MAX_WS_BYTES, compress=False, heartbeat=30.0)
        await ws.prepare(request)
        tab = Tab(ws, session)
        self._send(tab, json.dumps({"type": "hello", "session": session,
                                    "profiles": sorted(self.config["llm"]["profiles"]),
                                    "default_profile": self.config["llm"]["profile"],
                                    "limits": {"max_frame_bytes": MAX_FRAME_BYTES, "messages_per_s": MESSAGES_PER_S}}))
        self.tabs.setdefault(session, set()).add(tab)
        self.bus.counters["tabs"] += 1
        writer = asyncio.create_task(self._write(tab))
        try:
            async for frame in ws:
                if frame.type == WSMsgType.TEXT:
                    self._take(tab, frame.data)
                elif frame.type == WSMsgType.BINARY:
                    self._refuse(tab, "binary frames are not taken: send JSON text frames")
                if tab.closing:
                    break
        finally:
            self._forget(tab)
            if tab.closing == CLOSE_POLICY:  # the refusals first, so the tab can tell why it was closed
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(tab.outbox.join(), FLUSH_S)
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
            await ws.close(code=tab.closing or CLOSE_GOING_AWAY,
                           message=b"flooding: too many refused frames" if tab.closing == CLOSE_POLICY else b"")
        return ws

    def _forget(self, tab: Tab) -> None:
        tabs = self.tabs.get(tab.session, set())
        tabs.discard(tab)
        if not tabs:
            self.tabs.pop(tab.session, None)
        for id in tab.asked:
            self.owners.pop((tab.session, id), None)
        for key in [key for key, waiting in self.queries.items() if waiting is tab]:
            del self.queries[key]

    async def _write(self, tab: Tab) -> None:
        """Send the tab's frames in order; ends when the socket does."""
        with contextlib.suppress(ConnectionError, RuntimeError):
            while True:
                frame = await tab.outbox.get()
                if isinstance(frame, bytes):
                    await tab.ws.send_bytes(frame)
                else:
                    await tab.ws.send_str(frame)
                tab.outbox.task_done()

    def _send(self, tab: Tab, frame: str | bytes) -> None:
        try:
            tab.outbox.put_nowait(frame)
        except asyncio.QueueFull:
            if not tab.closing:
                log.warning("a tab of session %s fell %d frames behind; closing it", tab.session, OUTBOX_FRAMES)
                tab.closing = CLOSE_TRY_LATER
                tab.closer = asyncio.ensure_future(tab.ws.close(code=CLOSE_TRY_LATER,
                                                                message=b"too slow: frames piled up"))

    # --- from the tabs ----------------------------------------------------------------------

    def _refuse(self, tab: Tab, reason: str) -> None:
        """Say why a frame was not taken; a tab that keeps sending refused frames is closed (1008)."""
        self.bus.counters["refused"] += 1
        self._send(tab, json.dumps({"type": "refused", "reason": reason}))
        now = time.monotonic()
        tab.refusals.append(now)
        while tab.refusals and tab.refusals[0] < now - FLOOD_WINDOW_S:
            tab.refusals.popleft()
        if len(tab.refusals) >= FLOOD_REFUSALS:
            log.warning("closing a tab of session %s: %d frames refused within %g s", tab.session,
                        FLOOD_REFUSALS, FLOOD_WINDOW_S)
            tab.closing = CLOSE_POLICY

    def _take(self, tab: Tab, data: str) -> None:
        if not tab.bucket.take():
            self._refuse(tab, f"too fast: at most {MESSAGES_PER_S} messages a second")
            return
        if len(data.encode()) > MAX_FRAME_BYTES:
            self._refuse(tab, f"too big: a frame may have at most {MAX_FRAME_BYTES} bytes")
            return
        try:
            frame = json.loads(data)
            if not isinstance(frame, dict):
                raise Refused("a frame is a JSON object with a \"type\"")
            handler = {"request": self._request, "cancel": self._cancel, "playback": self._playback,
                       "history": self._history}.get(str(frame.get("type")))
            if handler is None:
                raise Refused(f"unknown type {str(frame.get('type'))[:64]!r}: send request, cancel, playback "
                              f"or history")
            handler(tab, frame)
        except json.JSONDecodeError as exc:
            self._refuse(tab, f"not JSON: {exc}")
        except (Refused, ProtocolError) as exc:
            self._refuse(tab, str(exc))

    def _request(self, tab: Tab, frame: dict[str, Any]) -> None:
        id = _reply_id(frame)
        text, profile, stream = frame.get("text"), frame.get("profile", ""), frame.get("stream")
        playback = frame.get("playback", "")
        if not isinstance(text, str) or not isinstance(profile, str) or not isinstance(playback, str):
            raise Refused("text, profile and playback are strings")
        if stream is not None and not isinstance(stream, bool):
            raise Refused("stream is null, true or false")
        owner = self.owners.get((tab.session, id))
        if owner is not None and owner is not tab:
            raise Refused(f"id {id} is another tab's reply: choose a new id for each request")
        self._publish(tab.session, id, Request(text=text, profile=profile, stream=stream, playback=playback))
        tab.asked[id] = playback
        tab.asked.move_to_end(id)
        self.owners[(tab.session, id)] = tab
        while len(tab.asked) > ASKED_PER_TAB:
            gone = tab.asked.popitem(last=False)[0]
            self.owners.pop((tab.session, gone), None)
            tab.audio_ts = {key: ts for key, ts in tab.audio_ts.items() if key[0] != gone}

    def _cancel(self, tab: Tab, frame: dict[str, Any]) -> None:
        id = frame.get("id", "")
        if id != "":
            id = _reply_id(frame)
        self._publish(tab.session, id, Cancel(reason="stopped in the browser"))

    def _playback(self, tab: Tab, frame: dict[str, Any]) -> None:
        id = _reply_id(frame)
        if tab.asked.get(id) != "client":
            raise Refused(f"id {id} is no reply this tab asked with playback \"client\"")
        if "event" not in frame:
            raise Refused("a playback frame names its event: started, finished or stopped")
        values: dict[str, Any] = {name: frame[name] for name in ("event", "chunk", "final", "heard", "heard_chars")
                                  if name in frame}
        if frame["event"] == "started":
            values["audio_ts"] = tab.audio_ts.get((id, frame.get("chunk", -1)), 0.0)
        self._publish(tab.session, id, Playback(**values))

    def _history(self, tab: Tab, frame: dict[str, Any]) -> None:
        limit = frame.get("limit", 20)
        id = f"web-history-{secrets.token_hex(6)}"
        self.queries[(tab.session, id)] = tab
        self._publish(tab.session, id, ContextQuery(limit=limit))
        assert self.loop is not None
        self.loop.call_later(HISTORY_TIMEOUT_S, self._history_late, tab, (tab.session, id))

    def _history_late(self, tab: Tab, key: tuple[str, str]) -> None:
        if self.queries.pop(key, None) is not None:
            self._send(tab, json.dumps({"type": "refused", "reason": f"history did not answer within "
                                        f"{HISTORY_TIMEOUT_S:g} s: is the history stage running?"}))

    def _publish(self, session: str, id: str, body: Body) -> None:
        """Publish for a tab (Connection.publish is thread-safe). While the bus is away nothing would
        arrive: say so instead of dropping the frame silently."""
        if self.bus.lost:
            raise Refused("the voxpipe bus is away; try again in a moment (`voxpipe run` restarts it)")
        try:
            self.bus.publish(session, id, body)
        except (BusUnavailable, zmq.ZMQError) as exc:
            raise Refused(f"not sent: {exc}") from None

    # --- from the bus -----------------------------------------------------------------------

    def _listen(self) -> None:
        """The bus reader thread: each message goes to the loop, in order."""
        loop = self.loop
        assert loop is not None
        feed_loop(self.bus, loop, self._deliver, self.stopped)

    def _deliver(self, message: Message[Body]) -> None:
        key = (message.session, message.id)
        if message.kind == "audio":
            owner = self.owners.get(key)
            if owner is not None and owner.asked.get(message.id) == "client":
                owner.audio_ts.setdefault((message.id, cast(Audio, message.body).chunk), message.ts)
                self._send(owner, audio_frame(message))
        elif message.kind == "context":
            waiting = self.queries.pop(key, None)
            if waiting is not None:
                turns = message.body.to_wire()["messages"]
                self._send(waiting, json.dumps({"type": "history", "messages": turns}, ensure_ascii=False))
        elif message.session in self.tabs:
            frame = json_frame(message)
            for tab in self.tabs[message.session]:
                self._send(tab, frame)

    # --- running ----------------------------------------------------------------------------

    def _heartbeat(self, state: str) -> None:
        with contextlib.suppress(BusUnavailable, zmq.ZMQError, ProtocolError):
            self.bus.publish("", "", Heartbeat(pid=os.getpid(), uptime=time.monotonic() - self.started_at,
                                               state=state, counters=dict(self.bus.counters),
                                               streams=self.bus.take_recent_streams()))

    async def _beat(self) -> None:
        """Heartbeats for `voxpipe status` and `voxpipe run`, and systemd's watchdog, from the loop:
        a loop that hangs stops them both."""
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            self._heartbeat("ready")
            sdnotify.notify("WATCHDOG=1")

    def link(self) -> str:
        """The address to open, with the token: a wildcard bind is shown under this machine's name."""
        host = socket.gethostname() if self.host in ("", "0.0.0.0", "::") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/" + (f"?token={self.token}" if self.token else "")

    async def serve(self) -> int:
        self.loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(signum, self.stop.set)
        runner = web.AppRunner(self.app(), access_log=None)  # the access log would record every ?token=
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host or None, self.port).start()
        except OSError as exc:
            await runner.cleanup()
            why = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound: {exc.strerror}"
            print(f"voxpipe web: port {self.port} on {self.host or '*'} {why}; choose another with --port "
                  f"(or web.port)", file=sys.stderr)
            return EXIT_USAGE
        reader = threading.Thread(target=self._listen, name="web-bus", daemon=True)
        reader.start()
        beat = asyncio.create_task(self._beat())
        self._heartbeat("ready")
        sdnotify.notify("READY=1")
        print(f"voxpipe web: open {self.link()}\n", end="", flush=True)  # one write: `run` shares the pipe
        try:
            await self.stop.wait()
        finally:
            sdnotify.notify("STOPPING=1")
            beat.cancel()
            for tabs in list(self.tabs.values()):
                for tab in list(tabs):
                    await tab.ws.close(code=CLOSE_GOING_AWAY, message=b"voxpipe web is stopping")
            await runner.cleanup()
            self.stopped.set()
            reader.join()
            self._heartbeat("stopping")
        return EXIT_OK

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT; raises AlreadyRunning when a `voxpipe web` serves this bus already,
        BusUnavailable when no bus answers."""
        return serve_attached(self.lock, "voxpipe web", self.bus, self.serve)


def _reply_id(frame: dict[str, Any]) -> str:
    id = frame.get("id")
    if not isinstance(id, str) or not ID_PATTERN.fullmatch(id):
        raise Refused("id must be 1-64 of A-Z a-z 0-9 _ . : -")
    return id


def run(config: Config, host: str | None = None, port: int | None = None) -> int:
    """`voxpipe web`: the command line's --host and --port, else the [web] section's."""
    settings = config["web"]
    host = settings["host"] if host is None else host
    port = settings["port"] if port is None else port
    token = access_token(host, settings["token_file"])
    if token and not settings["token_file"]:
        print(f"voxpipe web: {host or '*'} is not a loopback address, so every request needs the access token "
              f"(made now, valid until this process stops; keep the link private)\n", end="", flush=True)
    return Gateway(config, host, port, token).run()
