"""What the HTTP providers' reply readers share: a server's JSON and the errors it reports in it.

Pure functions, no HTTP stack: the openai provider reads its replies with them (through openai_wire)
without importing requests, which only the requests-based providers' transport needs.
"""

from __future__ import annotations

import json
from typing import Any

from .base import ProviderError


def error_text(body: bytes) -> str:
    """The server's own words about a failure: its JSON error message if it has one, else its text.

    Whole: the message quoting it is scrubbed and then clipped (Transport.error), never the other way round.
    """
    text = body.decode("utf-8", "replace")
    try:
        payload = json.loads(text)
    except ValueError:
        payload = None
    return _error_message(payload) or text


def check_error(payload: Any) -> None:
    """Raise what a server reports with {"error": ...} inside a 200 body, where it fails mid-reply
    (whole: the caller scrubs and clips it, as HttpGeneration does through Transport.error)."""
    if isinstance(payload, dict) and "error" in payload:
        message = _error_message(payload) or str(payload["error"])
        raise ProviderError(f"the server failed mid-reply: {message}", code="server")


def _error_message(payload: Any) -> str | None:
    """The message of the usual error shapes: {"error": {"message"}}, {"error": "..."}, {"message"}, [that]."""
    if isinstance(payload, list) and payload:
        payload = payload[0]
    if not isinstance(payload, dict):
        return None
    error = payload.get("error", payload)
    message = error.get("message") if isinstance(error, dict) else error
    return message if isinstance(message, str) and message else None


def parse_json(text: str | bytes) -> Any:
    """A JSON document from the server; anything else is a protocol error quoting it (whole, as check_error)."""
    try:
        return json.loads(text)
    except ValueError:
        shown = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        raise ProviderError(f"malformed JSON from the server: {shown!r}", code="protocol") from None


def optional_text(value: Any) -> str:
    """Servers send null, or sometimes an object, where a text is optional."""
    return value if isinstance(value, str) else ""
