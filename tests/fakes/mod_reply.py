"""How the MiSide mod reads a dialect-A reply, as strictly as it does: the judge of every reply in tests.

Written from the mod's DataChange (fd26ab7, DC:228-289; docs/design/game-link.md R1-R5), not from
the link's builder, so a test that passes here is a reply the game would take. Shared by the wire
tests and the test double of the mod (tests/fakes/miside_mod.py).

The mod reads one ReceiveAsync of at most 32 000 bytes (R1), decodes UTF-8 and deserialises a
Dictionary<string, JsonElement>. Then, in this order: the required keys with JsonElement's getters,
then each optional key if present. A missing required key, or any key of the wrong JSON type, throws,
and every later statement of the block is skipped (R3, R5): the error says which key, and carries
what had been read before it (`partial`), since e.g. the response is already taken when an optional
key fails, and the line is still shown.

Stricter than the mod in two places, both things a correct link never sends: JSON null for a
string (GetString returns null, which the mod would then trip over later), and a duplicate key.
"""

from __future__ import annotations

import json
from typing import Any

MAX_READ = 32000
"""`new byte[32000]`, read once (R1)."""
INT32 = range(-2**31, 2**31)

REQUIRED = (("id", "int"), ("type", "string"), ("character", "string"), ("response", "string"),
            ("silero", "bool"), ("id_sound", "int"))
"""DC:237-244, in the order the mod reads them."""
OPTIONAL = (("patch_to_sound_file", "string", ""), ("user_input", "string", ""), ("GM_ON", "bool", False),
            ("GM_READ", "bool", False), ("GM_VOICE", "bool", False), ("GM_REPEAT", "int", 2),
            ("CC_Limit_mod", "int", 100), ("LANGUAGE", "string", None), ("MITAS_MENU", "bool", False),
            ("EMOTION_MENU", "bool", False), ("TEXT_WAIT_TIME", "int", None), ("VOICE_WAIT_TIME", "int", None),
            ("instant_send", "bool", False))
"""DC:247-267, in the mod's order, with the value the mod uses when the key is missing (None: the
mod keeps its current setting)."""


class ModReplyError(Exception):
    """The mod would throw reading this reply; `partial` holds the keys it had read before."""

    def __init__(self, reason: str, partial: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.partial = partial or {}


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ModReplyError(f"duplicate keys {duplicates}")
    return dict(pairs)


def _get(kind: str, key: str, value: Any) -> Any:
    """JsonElement.GetInt32 / GetString / GetBoolean on one value, or the InvalidOperation/Format error."""
    if kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool) and value in INT32
    elif kind == "string":
        ok = isinstance(value, str)
    else:
        ok = isinstance(value, bool)
    if not ok:
        raise ValueError(f"{key}: {kind} expected, got {json.dumps(value)[:40]}")
    return value


def read_reply(raw: bytes) -> dict[str, Any]:
    """Every key the mod reads, with its value or the mod's default, plus `missing`: the optional keys
    that were absent (a missing MITAS_MENU or EMOTION_MENU turns that menu off)."""
    if len(raw) > MAX_READ:
        raise ModReplyError(f"{len(raw)} bytes: the mod reads {MAX_READ} and parses a cut object")
    try:
        message = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModReplyError(f"not JSON: {error}") from None
    if not isinstance(message, dict):
        raise ModReplyError("not a JSON object")
    read: dict[str, Any] = {}
    missing: list[str] = []
    try:
        for key, kind in REQUIRED:
            if key not in message:
                raise ValueError(f"{key}: missing (KeyNotFoundException)")
            read[key] = _get(kind, key, message[key])
        for key, kind, default in OPTIONAL:
            if key in message:
                read[key] = _get(kind, key, message[key])
            else:
                read[key] = default
                missing.append(key)
    except ValueError as error:
        raise ModReplyError(str(error), read) from None
    read["missing"] = tuple(missing)
    return read
