"""gpt4free (`g4f`) through its own client, streaming and not: an optional extra.

    pip install 'voxpipe[g4f]'

The profile picks what g4f talks to:

- `extra.provider = "Name"`: a g4f provider class, looked up by name the way g4f's own
  client does (`g4f.Provider.ProviderUtils.convert`, ignoring case, "-" and "_"), e.g. "OpenaiTemplate",
  "Ollama", "Pollinations".
- `base_url = "http://host:port/v1"`: any OpenAI-compatible server, through g4f's
  OpenaiTemplate. Combined with an `extra.provider` that is itself an OpenaiTemplate
  subclass, that provider is pointed at `base_url` instead of its own host.
- neither: g4f's AnyProvider picks a free public provider for `model` (needs the internet).

Every other key of `extra` is passed to g4f's `create()` as a keyword (e.g. `proxy`,
`reasoning_effort`, `web_search`). `model` may be empty (the provider's default).

Each generation drives g4f's AsyncClient on a private event loop in the thread that
iterates it, one `__anext__` at a time, so that close() can cancel the step in flight.

What close() (from any thread) can and cannot interrupt:

- It CAN cut an async provider mid-await: before the first byte and mid-stream. That covers
  OpenaiTemplate and every aiohttp-based provider. The awaiting task is cancelled, aiohttp
  drops the unfinished connection (so the server sees the disconnect), and the iterator
  returns at once without raising.
- It CAN stop any provider between chunks. A close() before iteration starts sends nothing.
- It CANNOT cut a blocking read inside a synchronous provider (one that implements only
  `create_completion`, e.g. with `requests`). The iterator returns when that provider
  hands over its next chunk, and the rest is then dropped. Work that a provider runs in a
  worker thread (`asyncio.to_thread`) is abandoned, not stopped: the iterator still
  returns at once, but that thread finishes its call in the background.

Side effects that are g4f's own: its client appends one usage line per request to
`<g4f cookies dir>/.usage/<date>.jsonl`; it condenses and de-duplicates the messages it
is given (this module passes copies); its client-side `max_tokens` counts chunks and its
stop strings cut the text. In non-streaming mode g4f joins every visible piece a provider
yields (such as a list of sources) into the message; when streaming, only plain text is
kept as reply text.
"""

from __future__ import annotations

import asyncio
import base64
import mimetypes
import re
import threading
from collections.abc import Awaitable, Iterator, Mapping
from typing import Any

from . import provider_settings
from .base import ChatRequest, Delta, Outcome, Provider, ProviderError, quote, status_code, usage_counts

NOT_INSTALLED = "g4f is not installed: pip install 'voxpipe[g4f]'"
STATUS_IN_MESSAGE = re.compile(r"^(?:Response|Error) (\d{3})\b")


class _Closed(Exception):
    """close() stopped the step in flight."""


class G4fProvider(Provider):
    name = "g4f"
    accepts_images = True
    """Images go to g4f as `media` (data URIs), which it renders per provider: OpenaiTemplate sends
    OpenAI image_url parts; a provider or model without vision ignores or refuses them."""

    def __init__(self, profile: Mapping[str, Any] | None = None, /, **settings: Any) -> None:
        settings = provider_settings(self.name, profile, settings)
        self.model = settings["model"]
        self.base_url = settings["base_url"].rstrip("/")
        extra = dict(settings["extra"])
        self.provider_name = extra.pop("provider", "")
        if not isinstance(self.provider_name, str):
            raise ValueError(f"extra.provider must be a g4f provider class name (a string), "
                             f"got {self.provider_name!r}")
        self.options = extra
        self._lock = threading.Lock()
        self._loaded = False
        self._provider_class: Any = None
        self._client_class: Any = None
        self._template: Any = None

    def load(self) -> None:
        """Import g4f and resolve the provider class; raise ProviderError if either is impossible."""
        with self._lock:
            if self._loaded:
                return
            try:
                import g4f.debug
                from g4f.client import AsyncClient
                from g4f.Provider.template import OpenaiTemplate
            except ImportError:
                raise ProviderError(NOT_INSTALLED, code="not_installed") from None
            g4f.debug.version_check = False  # else its first call starts a thread asking PyPI/GitHub for news
            self._client_class = AsyncClient
            self._template = OpenaiTemplate
            self._provider_class = self._resolve()
            self._loaded = True

    def _resolve(self) -> Any:
        from g4f.client import create_custom_provider
        from g4f.Provider import ProviderUtils
        from g4f.providers.types import BaseProvider

        pinned = {"models": [self.model]} if self.model else {}  # else g4f asks the server for /models
        if not self.provider_name:
            if not self.base_url:
                return None  # g4f's AnyProvider
            return create_custom_provider(self.base_url, name="VoxpipeOpenAI", default_model=self.model, **pinned)
        found = ProviderUtils.convert.get(self.provider_name)
        if not (isinstance(found, type) and issubclass(found, BaseProvider)):
            raise ProviderError(
                f"g4f has no provider {self.provider_name!r} (extra.provider). "
                f"Names are g4f provider class names (case, '-' and '_' ignored), "
                f"e.g. OpenaiTemplate, Ollama, Pollinations; "
                f"list them with: python -c \"import g4f.Provider as P; "
                f"print(*P.ProviderLoader.names, *P.ProviderLoader.extra)\"", code="bad_request")
        patch: dict[str, Any] = {}
        if self.base_url and issubclass(found, self._template):
            patch.update(url=self.base_url, base_url=self.base_url, backup_url=None, api_endpoint=None, **pinned)
        if not hasattr(found, "use_stream_timeout"):
            patch["use_stream_timeout"] = False  # g4f's async client reads it, but sync-only providers lack it
        return type(found.__name__, (found,), patch) if patch else found

    def open(self, request: ChatRequest, api_key: str) -> G4fGeneration:
        return G4fGeneration(self, request, api_key)

    def arguments(self, request: ChatRequest) -> dict[str, Any]:
        """The keywords of `AsyncClient.chat.completions.create()` (stream excluded)."""
        params = request.params
        arguments: dict[str, Any] = {**self.options, "messages": to_g4f_messages(request.messages),
                                     "model": self.model, "max_tokens": params.max_tokens}
        if self.base_url:
            arguments["base_url"] = self.base_url
        media = to_g4f_media(request.messages)
        if media:
            arguments["media"] = media
        optional = {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
                    "presence_penalty": params.presence_penalty, "stop": list(params.stop) or None}
        arguments.update({key: value for key, value in optional.items() if value is not None})
        if self._provider_class is not None and issubclass(self._provider_class, self._template):
            # OpenaiTemplate forwards only some keywords; the rest reach the server through extra_body.
            body: dict[str, Any] = {key: value for key, value in (("presence_penalty", params.presence_penalty),
                                                  ("top_k", params.top_k)) if value is not None}
            if params.reasoning_budget is not None:
                body["reasoning"] = {"max_tokens": params.reasoning_budget}
            if body:
                arguments["extra_body"] = {**body, **dict(self.options.get("extra_body") or {})}
        return arguments

    @property
    def where(self) -> str:
        label = self.provider_name or ("OpenaiTemplate" if self.base_url else "AnyProvider")
        return f"g4f {label}" + (f" at {self.base_url}" if self.base_url else "")


class G4fGeneration:
    """One g4f call. Iterate it on one thread; close() may come from any other (see the module docstring)."""

    def __init__(self, provider: G4fProvider, request: ChatRequest, key: str) -> None:
        self.outcome = Outcome(model=provider.model)
        self._provider = provider
        self._request = request
        self._key = key
        self._lock = threading.Lock()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[Any] | None = None

    def __iter__(self) -> Iterator[Delta]:
        if self._closed:
            return
        self._provider.load()
        loop = asyncio.new_event_loop()
        with self._lock:
            self._loop = loop
        try:
            if self._request.stream:
                yield from self._streamed(loop)
            else:
                yield from self._whole(loop)
        except _Closed:
            return
        except ProviderError:
            raise
        except Exception as exc:
            if self._closed:
                return
            raise self._error(exc) from None
        finally:
            with self._lock:
                self._loop = None
            _shut_down(loop)

    def _client(self) -> Any:
        provider = self._provider
        return provider._client_class(provider=provider._provider_class, api_key=self._key or None)

    def _streamed(self, loop: asyncio.AbstractEventLoop) -> Iterator[Delta]:
        timeouts = self._request.timeouts
        chunks = self._client().chat.completions.create(stream=True, **self._provider.arguments(self._request))
        started = False
        try:
            while True:
                try:
                    chunk = self._step(loop, chunks.__anext__(), timeouts.idle if started else timeouts.first_token)
                except StopAsyncIteration:
                    return
                if self._closed:  # a chunk that a blocking provider handed over after close()
                    return
                if getattr(chunk, "model", None):
                    self.outcome.model = chunk.model
                if getattr(chunk, "usage", None) is not None:
                    self.outcome.usage = _usage(chunk.usage)
                for choice in getattr(chunk, "choices", None) or ():
                    if choice.finish_reason:
                        self.outcome.finish_reason = choice.finish_reason
                    delta = Delta(text=_text(choice.delta.content), reasoning=_text(choice.delta.reasoning))
                    if delta.text or delta.reasoning:
                        started = True
                        yield delta
        finally:
            try:
                self._step(loop, chunks.aclose(), 2.0, cancellable=False)
            except BaseException:
                pass

    def _whole(self, loop: asyncio.AbstractEventLoop) -> Iterator[Delta]:
        completion = self._step(loop, self._client().chat.completions.create(
            stream=False, **self._provider.arguments(self._request)), self._request.timeouts.first_token)
        if getattr(completion, "model", None):
            self.outcome.model = completion.model
        if getattr(completion, "usage", None) is not None:
            self.outcome.usage = _usage(completion.usage)
        if completion.choices:
            choice = completion.choices[0]
            self.outcome.finish_reason = choice.finish_reason or ""
            message = choice.message
            delta = Delta(text=_text(message.content), reasoning=_text(getattr(message, "reasoning", None)))
            if (delta.text or delta.reasoning) and not self._closed:
                yield delta

    def _step(self, loop: asyncio.AbstractEventLoop, awaitable: Awaitable[Any], timeout: float,
              cancellable: bool = True) -> Any:
        """Run one await on the private loop; close() cancels it from another thread."""
        async def bounded() -> Any:
            return await asyncio.wait_for(awaitable, timeout)

        task = loop.create_task(bounded())
        if cancellable:
            with self._lock:
                if self._closed:
                    task.cancel()
                self._task = task
        try:
            return loop.run_until_complete(task)
        except asyncio.CancelledError:
            if self._closed:
                raise _Closed from None
            raise ProviderError(f"{self._provider.where}: the call was cancelled", code="connect") from None
        except TimeoutError:  # asyncio.TimeoutError is TimeoutError since 3.11
            if self._closed:
                raise _Closed from None
            raise ProviderError(f"{self._provider.where}: no answer within {timeout:g} s", code="timeout") from None
        finally:
            if cancellable:
                with self._lock:
                    self._task = None

    def close(self) -> None:
        """Stop the call: cancel the await in flight (if any) and end the iteration without an error."""
        with self._lock:
            self._closed = True
            loop, task = self._loop, self._task
        if loop is not None and task is not None:
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:  # the loop closed meanwhile: the iteration is over anyway
                pass

    def _error(self, exc: BaseException) -> ProviderError:
        """Map what g4f, aiohttp or requests raised to a ProviderError the stage can act on."""
        code, status = _classify(exc)
        missing = "; a dependency of this g4f provider: install it into voxpipe's environment"
        message = (f"{self._provider.where} failed ({type(exc).__name__}{missing if code == 'not_installed' else ''}): "
                   f"{str(exc).strip() or type(exc).__name__}")
        return ProviderError(quote(message, self._key), code=code, status=status)


def _classify(exc: BaseException) -> tuple[str, int | None]:
    """(ProviderError code, HTTP status if one is known) for an exception from inside a g4f call."""
    from g4f import errors

    status = getattr(exc, "status", None) or getattr(getattr(exc, "response", None), "status_code", None)
    if not isinstance(status, int):
        match = STATUS_IN_MESSAGE.match(str(exc))
        status = int(match.group(1)) if match else None
    if isinstance(exc, (TimeoutError, errors.TimeoutError)):
        return "timeout", status
    if status is not None and 400 <= status < 600:
        return status_code(status), status
    table: list[tuple[Any, str]] = [
        ((errors.MissingAuthError, errors.NoValidHarFileError), "auth"),
        (errors.PaymentRequiredError, "billing"),
        ((errors.RateLimitError, errors.ConversationLimitError), "rate_limited"),
        ((errors.BadRequestError, errors.ModelNotFoundError, errors.ModelNotAllowedError,
          errors.ProviderNotFoundError), "bad_request"),
        (errors.StreamNotSupportedError, "unsupported"),
        (errors.MissingRequirementsError, "not_installed"),
        (errors.G4FError, "server"),  # ResponseError, ProviderNotWorking, RetryNoProvider, ...
    ]
    for kinds, code in table:
        if isinstance(exc, kinds):
            return code, status
    return _transport_code(exc), status


def _transport_code(exc: BaseException) -> str:
    try:
        import aiohttp
    except ImportError:  # pragma: no cover - g4f requires aiohttp
        aiohttp = None  # type: ignore[assignment]
    import requests

    if aiohttp is not None and isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)):
        return "connect"
    if isinstance(exc, requests.Timeout):
        return "timeout"
    if isinstance(exc, (requests.ConnectionError, ConnectionError)):
        return "connect"
    return "protocol"  # a provider that choked on what its site sent (KeyError, JSONDecodeError, ...)


def to_g4f_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Plain {"role", "content"} copies (g4f edits the list it is given in place)."""
    return [{"role": message["role"], "content": message["content"]} for message in messages]


def to_g4f_media(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The images as g4f `media`: (data URI, file name) pairs, which g4f attaches to the last message."""
    media: list[tuple[str, str]] = []
    for index, message in enumerate(messages):
        for number, image in enumerate(message.get("images") or ()):
            if index != len(messages) - 1:
                raise ProviderError("g4f takes images only with the last message; earlier images must be "
                                    "left out of the history", code="unsupported")
            extension = (mimetypes.guess_extension(image.mime) or ".png").lstrip(".")
            media.append((f"data:{image.mime};base64,{base64.b64encode(image.data).decode()}",
                          f"image{number}.{extension}"))
    return media


def _text(value: Any) -> str:
    """Plain text only: g4f also passes media, sources and audio objects through `content`."""
    return value if isinstance(value, str) else ""


def _usage(usage: Any) -> dict[str, float]:
    fields = ("prompt_tokens", "completion_tokens", "total_tokens")
    return usage_counts({name: getattr(usage, name, None) for name in fields})


def _shut_down(loop: asyncio.AbstractEventLoop) -> None:
    """Close this loop's shared aiohttp connector, cancel leftovers, close the loop (never waits on threads)."""
    async def close_connector() -> None:
        from g4f.requests import get_shared_connector

        connector = get_shared_connector()  # the one g4f keeps for this loop (made now if none)
        if connector is not None and not connector.closed:
            await connector.close()

    try:
        try:
            loop.run_until_complete(asyncio.wait_for(close_connector(), 2.0))
        except Exception:
            pass
        leftovers = asyncio.all_tasks(loop)
        for task in leftovers:
            task.cancel()
        if leftovers:
            loop.run_until_complete(asyncio.wait(leftovers, timeout=2.0))
        loop.run_until_complete(asyncio.wait_for(loop.shutdown_asyncgens(), 2.0))
    except Exception:
        pass
    finally:
        loop.close()  # shuts the default executor down without waiting for its threads


__all__ = ["G4fProvider", "G4fGeneration", "NOT_INSTALLED", "to_g4f_media", "to_g4f_messages"]
