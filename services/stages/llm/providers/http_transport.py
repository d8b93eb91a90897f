"""The HTTP call under the requests-based providers (gemini, http), and the helpers they share.

The stage owns retries and watchdogs, so a call here is one attempt that either
streams or raises a `ProviderError` saying what the server did.  Cancel must be
instant and visible to the server: closing a socket's fd from another thread does
not wake a thread blocked in recv() on Linux, but shutdown(SHUT_RDWR) does, and it
sends the server a FIN.  So each Transport records the sockets its connections
open and `close()` shuts them down, from any thread, at any moment of the call.
"""

from __future__ import annotations

import base64
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter

from .base import Delta, Outcome, ProviderError, Timeouts, parse_retry_after, quote, status_code
from .wire import error_text

READ_SIZE = 65536


def merged(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with a profile's `extra` laid over it, nested tables merged key by key."""
    result = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = value
    return result


def given(**fields: Any) -> dict[str, Any]:
    """The fields that are set: None means "the server's default", so it is not sent."""
    return {name: value for name, value in fields.items() if value is not None}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _where(url: str) -> str:
    """The endpoint as a message may show it: no query, no credentials."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def _innermost(exc: BaseException) -> str:
    """The socket error that requests and urllib3 wrap in layers of their own text."""
    while True:
        inner = getattr(exc, "reason", None)
        if not isinstance(inner, BaseException):
            inner = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else exc.__cause__
        if inner is None:
            return str(exc)
        exc = inner


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed or never connected: nothing left to wake
        pass


class _WatchedAdapter(HTTPAdapter):
    """An adapter whose connections report their socket, once connected, to `on_connect`."""

    def __init__(self, on_connect: Callable[[socket.socket], None]) -> None:
        self._on_connect = on_connect
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self._watch(self.poolmanager)

    def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
        known = proxy in self.proxy_manager
        manager = super().proxy_manager_for(proxy, **kwargs)
        return manager if known else self._watch(manager)

    def _watch(self, manager: Any) -> Any:
        """Every pool the manager builds gets a connection class that reports its socket."""
        on_connect = self._on_connect

        def watched(pool_class: Any) -> Callable[..., Any]:
            def build(*args: Any, **kwargs: Any) -> Any:
                pool = pool_class(*args, **kwargs)

                class Reporting(pool.ConnectionCls):  # type: ignore[name-defined]
                    def connect(self) -> None:
                        super().connect()
                        on_connect(self.sock)

                pool.ConnectionCls = Reporting
                return pool
            return build

        classes = manager.pool_classes_by_scheme
        manager.pool_classes_by_scheme = {scheme: watched(cls) for scheme, cls in classes.items()}
        return manager


class Transport:
    """One HTTP call that `close()` cuts from any thread, before or after the headers arrive."""

    def __init__(self, secret: str = "") -> None:
        self._secret = secret
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._closed = False
        self._session = requests.Session()
        adapter = _WatchedAdapter(self._attach)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    @property
    def closed(self) -> bool:
        return self._closed

    def start(self, method: str, url: str, headers: Mapping[str, str], json_body: Any, timeouts: Timeouts,
              accept: tuple[str, ...] = ()) -> requests.Response:
        """Send the request and return the streaming response once its status and type are good.

        `accept` lists the media types a successful body may have; an empty tuple accepts any.
        """
        where = _where(url)
        if self._closed:
            raise ProviderError(f"{where}: the call was closed before it started", code="connect")
        if accept:
            headers = {"Accept": ", ".join(accept), **headers}
        read_timeout = max(timeouts.first_token, timeouts.idle)
        try:
            response = self._session.request(method, url, headers=dict(headers), json=json_body, stream=True,
                                             timeout=(timeouts.connect, read_timeout), allow_redirects=False)
        except requests.ConnectTimeout:
            raise self.error(f"{where}: could not connect within {timeouts.connect:g} s", "timeout") from None
        except requests.Timeout:
            raise self.error(f"{where}: no response within {read_timeout:g} s", "timeout") from None
        except requests.ConnectionError as exc:
            raise self.error(f"{where}: cannot connect: {_innermost(exc)}", "connect") from None
        except requests.RequestException as exc:
            raise self.error(f"{where}: invalid request: {_innermost(exc)}", "bad_request") from None
        if not 200 <= response.status_code < 300:
            raise self._status_error(response, where)
        media_type = response.headers.get("Content-Type", "").partition(";")[0].strip().lower()
        if accept and media_type and media_type not in accept:
            snippet = self._snippet(response)
            raise self.error(f"{where} answered with {media_type}, expected {accept[0]}: {snippet}", "protocol")
        return response

    def chunks(self, response: requests.Response) -> Iterator[bytes]:
        """The body as it arrives: read1 returns whatever came, so a token is never held back."""
        try:
            while piece := response.raw.read1(READ_SIZE, decode_content=True):
                yield piece
        except urllib3.exceptions.ReadTimeoutError:
            raise self.error("the server went silent mid-reply (socket timeout)", "timeout") from None
        except urllib3.exceptions.DecodeError as exc:
            raise self.error(f"the reply could not be decoded: {exc}", "protocol") from None
        except (urllib3.exceptions.ProtocolError, OSError) as exc:
            raise self.error(f"the connection broke mid-reply: {_innermost(exc)}", "connect") from None

    def close(self) -> None:
        """Cut the call now, from any thread: a blocked read returns and the server sees the disconnect."""
        with self._lock:
            self._closed = True
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            _shutdown(sock)

    def release(self, response: requests.Response | None) -> None:
        """Free the connection; called by the thread that read the response, once it is done."""
        self.close()
        if response is not None:
            response.close()
        self._session.close()

    def error(self, message: str, code: str, status: int | None = None,
              retry_after: float | None = None) -> ProviderError:
        """A ProviderError whose message cannot carry the key, even where the server echoed it (see `quote`)."""
        return ProviderError(quote(message, self._secret), code=code, status=status, retry_after=retry_after)

    def _attach(self, sock: socket.socket) -> None:
        with self._lock:
            if not self._closed:
                self._sockets.append(sock)
                return
        _shutdown(sock)  # close() came while this connection was being made

    def _status_error(self, response: requests.Response, where: str) -> ProviderError:
        status = response.status_code
        retry_after = parse_retry_after(response.headers.get("Retry-After"), time.time())
        message = f"{where} answered {status} {response.reason or ''}".rstrip()
        return self.error(f"{message}: {self._snippet(response)}", status_code(status), status, retry_after)

    def _snippet(self, response: requests.Response) -> str:
        """The start of a body that is not the reply, to quote in the error; the response is closed."""
        try:
            return error_text(response.raw.read(4096, decode_content=True))
        except (urllib3.exceptions.HTTPError, OSError):
            return "(no readable body)"
        finally:
            response.close()


Decode = Callable[[Iterator[bytes], Outcome], Iterator[Delta]]
"""A wire format: the body's byte pieces in, deltas out, the outcome filled in on the way."""


@dataclass(frozen=True)
class Call:
    """One POST: where, with which headers and body, and the media types its answer may have."""

    url: str
    headers: Mapping[str, str]
    body: Any
    accept: tuple[str, ...]


class HttpGeneration:
    """A Generation over one HTTP call: the transport carries bytes and `decode` turns them into deltas.

    Whatever fails after close() is the cut itself, not a server fault, so iteration just ends.
    """

    def __init__(self, call: Call, timeouts: Timeouts, decode: Decode, secret: str, outcome: Outcome) -> None:
        self.outcome = outcome
        self._call = call
        self._timeouts = timeouts
        self._decode = decode
        self._transport = Transport(secret)

    def __iter__(self) -> Iterator[Delta]:
        transport, response = self._transport, None
        try:
            response = transport.start("POST", self._call.url, self._call.headers, self._call.body,
                                       self._timeouts, self._call.accept)
            for delta in self._decode(transport.chunks(response), self.outcome):
                if transport.closed:
                    return
                yield delta
        except ProviderError as exc:
            if not transport.closed:
                raise transport.error(str(exc), exc.code, exc.status, exc.retry_after) from None
        except (KeyError, TypeError, AttributeError, IndexError) as exc:
            if not transport.closed:
                raise transport.error(f"unexpected response shape ({type(exc).__name__}: {exc})",
                                      "protocol") from None
        finally:
            transport.release(response)

    def close(self) -> None:
        self._transport.close()
