"""A scriptable local HTTP server for provider and stage fault tests.

Each request gets a `Script`: a status, headers, and timed writes of raw bytes, so a
test can serve any wire format (SSE, NDJSON, JSON) and any fault (stall before the
headers, stall mid-stream, abort mid-stream, 429/500, wrong content type).  Scripts
come from a queue (consumed in order, any path) or from routes (by path, reused).
Every request is recorded with its path, headers and body, and with the moment the
server saw the client hang up, which is how tests prove that cancel reaches it.

    with WireServer() as server:
        server.enqueue(Script(status=429, headers={"Retry-After": "1"}), sse_script(['{"a": 1}']))
        url = server.url("/v1/chat/completions")
"""

from __future__ import annotations

import json
import queue
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SSE = "text/event-stream"


@dataclass
class Script:
    """One scripted response.

    framing: "chunked" (each write is a chunk), "close" (no length; the body ends when the
    server closes), or "length" (Content-Length from all writes; delays still apply).
    end: "finish" ends the body properly; "abort" closes the socket mid-body.
    stall: seconds to wait after reading the request and before the status line.
    """

    status: int = 200
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": SSE})
    writes: list[tuple[float, bytes]] = field(default_factory=list)
    stall: float = 0.0
    framing: str = "chunked"
    end: str = "finish"


@dataclass
class Record:
    """What the server saw of one request; `hung_up` is set when it saw the client disconnect."""

    method: str
    path: str
    headers: dict[str, str]
    raw: bytes
    received_at: float
    hung_up_at: float | None = None
    hung_up: threading.Event = field(default_factory=threading.Event)

    @property
    def json(self) -> Any:
        return json.loads(self.raw)


def sse_script(events: Iterable[str | dict[str, Any]], delay: float = 0.0, newline: str = "\n",
               **options: Any) -> Script:
    """An SSE response: each event (a dict is sent as JSON) as `data: ...` plus a blank line."""
    writes = []
    for event in events:
        data = json.dumps(event) if isinstance(event, dict) else event
        writes.append((delay, f"data: {data}{newline}{newline}".encode()))
    return Script(writes=writes, **options)


def ndjson_script(objects: Iterable[dict[str, Any]], delay: float = 0.0, **options: Any) -> Script:
    writes = [(delay, (json.dumps(obj) + "\n").encode()) for obj in objects]
    return Script(headers={"Content-Type": "application/x-ndjson"}, writes=writes, **options)


def json_script(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Script:
    return Script(status=status, headers={"Content-Type": "application/json", **(headers or {})},
                  writes=[(0.0, json.dumps(payload).encode())], framing="length")


class WireServer:
    """A ThreadingHTTPServer on 127.0.0.1 (port chosen by the OS) serving scripts; use as a context manager.

    With `tls=(certfile, keyfile)` it serves HTTPS, to test the client's TLS path.
    """

    def __init__(self, tls: tuple[str, str] | None = None) -> None:
        self._queue: list[Script] = []
        self._routes: dict[str, Script] = {}
        self._lock = threading.Lock()
        self.records: list[Record] = []
        self.arrivals: queue.Queue[Record] = queue.Queue()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.wire = self  # type: ignore[attr-defined]
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
        self.scheme = "https" if tls else "http"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def url(self, path: str = "/") -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def enqueue(self, *scripts: Script) -> None:
        """Answer the next requests (any path) with these scripts, in order, once each."""
        with self._lock:
            self._queue.extend(scripts)

    def route(self, path: str, script: Script) -> None:
        """Answer every request for `path` (query ignored) with `script` when the queue is empty."""
        with self._lock:
            self._routes[path] = script

    def next_request(self, timeout: float = 5.0) -> Record:
        """The next request to arrive (its record is live: hang-up fields fill in later)."""
        return self.arrivals.get(timeout=timeout)

    def start(self) -> WireServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> WireServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _script_for(self, path: str) -> Script:
        with self._lock:
            if self._queue:
                return self._queue.pop(0)
            script = self._routes.get(path.partition("?")[0])
        if script is None:
            return json_script({"error": {"message": f"no script for {path}"}}, status=404)
        return script


class _HungUp(Exception):
    """The client disconnected; the handler stops writing."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        """Quiet: tests assert on records, not on an access log."""

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def _serve(self) -> None:
        wire: WireServer = self.server.wire  # type: ignore[attr-defined]
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        record = Record(self.command, self.path, dict(self.headers.items()), raw, time.monotonic())
        self.record = record
        with wire._lock:
            wire.records.append(record)
        wire.arrivals.put(record)
        script = wire._script_for(self.path)
        self.close_connection = True
        try:
            self._wait(script.stall)
            self._respond(script)
        except _HungUp:
            pass

    def _respond(self, script: Script) -> None:
        self.send_response(script.status)
        for name, value in script.headers.items():
            self.send_header(name, value)
        if script.framing == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
        elif script.framing == "length":
            self.send_header("Content-Length", str(sum(len(data) for _, data in script.writes)))
        self.send_header("Connection", "close")
        try:
            self.end_headers()
        except OSError:
            self._hang_up()
        for delay, data in script.writes:
            self._wait(delay)
            if data:
                self._send(b"%x\r\n%s\r\n" % (len(data), data) if script.framing == "chunked" else data)
        if script.end == "abort":
            self.connection.shutdown(socket.SHUT_RDWR)
        elif script.framing == "chunked":
            self._send(b"0\r\n\r\n")

    def _send(self, data: bytes) -> None:
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:
            self._hang_up()

    def _wait(self, seconds: float) -> None:
        """Sleep, watching the socket, so a client hang-up is seen the moment it happens."""
        if seconds <= 0:
            return
        deadline = time.monotonic() + seconds
        if select.select([self.connection], [], [], seconds)[0]:
            try:
                peeked = socket.socket.recv(self.connection, 1, socket.MSG_PEEK)  # below TLS, if any
            except OSError:
                peeked = b""
            if not peeked:
                self._hang_up()
            time.sleep(max(0.0, deadline - time.monotonic()))  # the client sent more bytes: just wait

    def _hang_up(self) -> None:
        if not self.record.hung_up.is_set():
            self.record.hung_up_at = time.monotonic()
            self.record.hung_up.set()
        raise _HungUp


class Reader(threading.Thread):
    """Iterates a provider generation on its own thread, as the llm stage's worker does, so a test can
    close() it from another thread and time how fast the reading side returns."""

    def __init__(self, generation: Any) -> None:
        super().__init__(daemon=True)
        self.generation = generation
        self.deltas: list[Any] = []
        self.error: Exception | None = None
        self.first = threading.Event()
        self.done = threading.Event()
        self.finished_at = 0.0
        self.start()

    def run(self) -> None:
        try:
            for delta in self.generation:
                self.deltas.append(delta)
                self.first.set()
        except Exception as exc:  # the test inspects it
            self.error = exc
        finally:
            self.finished_at = time.monotonic()
            self.done.set()
