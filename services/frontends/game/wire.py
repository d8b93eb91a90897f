"""The game link's wire formats: framing, requests from the mod, replies to it, in both dialects.

Dialect A is what the released v0.011 mod speaks (docs/design/game-link.md §1, fact ids A*, R*): one
JSON object per TCP connection each way, no newline, no length prefix, the reply read by one
`ReceiveAsync` of 32 000 bytes and typed strictly. Dialect B is the newer task API of the app
(§1.8, §8); its C# client is not public, so what it needs is inferred from the app's server.

Pure: bytes and objects in, bytes and dataclasses out. The shell (link.py) owns the sockets.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

MAX_REPLY_BYTES = 32000
"""The mod reads its reply with one ReceiveAsync into `new byte[32000]` (R1): the rest is never seen."""
DEFAULT_LIMIT = 4 * 1024 * 1024
"""`game.max_request_bytes`: the largest request object a connection may send (design §7.1)."""
INT32 = range(-2**31, 2**31)
"""JsonElement.GetInt32 (R3), and the mod's `int id` counter (A6)."""
IDLE_EVENT = "Player did nothing for 90 seconds"
"""The idle timer's dataToSentSystem, sent with no leading "-" (A22)."""
ROOMS: dict[int, str] = {0: "Kitchen", 1: "MainHall", 2: "Bedroom", 3: "Toilet", 4: "Basement", -1: "Unknown"}
"""The mod's Rooms enum (A10, RoomControl.cs:10-18)."""
CHARACTER = re.compile(r"[A-Za-z0-9_]{1,32}")
"""A characterType name (A8) or anything like one; it becomes part of a voxpipe session name."""
ELLIPSIS = "…"

_JSON_WHITESPACE = b" \t\r\n"
_OUTSIDE_STRING = re.compile(rb'[{}"]')
_INSIDE_STRING = re.compile(rb'["\\]')
_DISTANCE = re.compile(r"[+-]?[0-9]+(?:\.[0-9]+)?")
"""`float.ToString("F2")` once the culture's decimal comma is a point (A9); nothing else is a distance."""


class BadFrame(Exception):
    """The bytes on a connection are not a stream of JSON objects: the link closes it without a reply."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ObjectScanner:
    """Cuts complete top-level JSON objects out of a byte stream, without waiting for EOF.

    The mod never closes its side before it reads the reply (A5), so the end of a request is the
    brace that closes its first one. Braces are counted outside strings only, and a string ends at
    an unescaped quote, which is what the app's own `{`-counting got wrong (§1.7). Scanning bytes is
    safe for UTF-8: no byte of a multi-byte character is below 0x80. Only the framing is checked
    here; whether an object is valid JSON is json.loads' business. Long strings (an image in base64)
    are skipped with a regex search rather than byte by byte.

    After BadFrame the scanner is spent: close the connection. Objects completed before the bad
    bytes of the same feed are still returned, and the error comes at the next feed.
    """

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self._buffer = bytearray()
        self._position = 0
        """Where the scan goes on inside `_buffer` (which holds only the current object)."""
        self._depth = 0
        self._in_string = False
        self._error: BadFrame | None = None

    @property
    def pending(self) -> int:
        """Bytes buffered of an object not yet complete (0 between objects)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        """The objects that `data` completes, in order, each from its `{` to its `}`."""
        if self._error is not None:
            raise self._error
        self._buffer += data
        found: list[bytes] = []
        try:
            while self._next_object(found):
                pass
        except BadFrame as error:
            if not found:
                raise
            self._error = error
        return found

    def _next_object(self, found: list[bytes]) -> bool:
        """Scans on; appends the object it completes and returns True, or returns False for more data."""
        buffer = self._buffer
        if self._depth == 0:
            start = 0
            while start < len(buffer) and buffer[start] in _JSON_WHITESPACE:
                start += 1
            del buffer[:start]
            if not buffer:
                return False
            if buffer[0] != ord("{"):
                raise BadFrame("not JSON")
            self._depth, self._position, self._in_string = 1, 1, False
        while self._depth:
            if self._in_string:
                match = _INSIDE_STRING.search(buffer, self._position)
                if match is None:
                    self._position = len(buffer)
                    break
                if match.group() == b"\\":
                    if match.end() >= len(buffer):  # the escaped byte has not come yet
                        self._position = match.start()
                        break
                    self._position = match.end() + 1
                    continue
                self._in_string, self._position = False, match.end()
                continue
            match = _OUTSIDE_STRING.search(buffer, self._position)
            if match is None:
                self._position = len(buffer)
                break
            self._position = match.end()
            token = match.group()
            if token == b'"':
                self._in_string = True
            else:
                self._depth += 1 if token == b"{" else -1
        if self._depth:
            if len(buffer) > self.limit:
                raise BadFrame("too big")
            return False
        if self._position > self.limit:
            raise BadFrame("too big")
        found.append(bytes(buffer[:self._position]))
        del buffer[:self._position]
        self._position = 0
        return True


def detect(obj: object) -> str | None:
    """The dialect of a connection's first object: "B" has a string `action`, "A" has `id` and `input`."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("action"), str):
        return "B"
    if "id" in obj and "input" in obj:
        return "A"
    return None


# --- dialect A: requests ---------------------------------------------------------------------


@dataclass(frozen=True)
class ARequest:
    """One request of the mod (A4), as the link needs it: lines split, "-" placeholders gone."""

    id: int
    character: str
    player_text: str
    """The typed text, stripped ("" for none); several sends between polls stay separate lines (A17)."""
    events: tuple[str, ...]
    """dataToSentSystem lines (A21), or the idle line (A22)."""
    infos: tuple[str, ...]
    """systemInfo lines: context for this character, which can come with a plain poll (A13)."""
    distance: float | None
    room_player: str
    room_character: str
    hierarchy: tuple[str, ...]
    """The object tree near the character, one object per line, dashes for depth (A11)."""
    current_info: tuple[str, ...]
    """The character's state dump, sent only when the request waits for an answer (A12)."""
    dialog_active: bool
    images: tuple[str, ...] = ()
    """image_base64_list: not sent by the public mod; parsed only when asked (`game.images`)."""

    @property
    def kind(self) -> str:
        """"player", "event" or "poll" (A25): what the request asks of the link."""
        if self.player_text:
            return "player"
        return "event" if self.events else "poll"


@dataclass(frozen=True)
class Malformed:
    """A complete object that is not a usable request; A answers it with a well-typed empty reply."""

    reason: str
    id: int = -1
    """The request's id when it was a valid int32, so the empty reply can echo it; else -1."""


def _int32(value: object) -> int | None:
    """A JSON integer in the int32 range; JSON's true/false are not integers here (R3's GetInt32)."""
    if isinstance(value, int) and not isinstance(value, bool) and value in INT32:
        return value
    return None


class _Refused(Exception):
    """A field that makes the whole request unusable; becomes Malformed(reason)."""


def _dash_text(obj: Mapping[str, Any], key: str) -> str | None:
    """A field the mod fills with "-" for nothing (A11-A13, A21): None for "-", null or missing."""
    value = obj.get(key)
    if value is None or value == "-":
        return None
    if not isinstance(value, str):
        raise _Refused(f"{key} is not a string")
    return value


def _dash_lines(obj: Mapping[str, Any], key: str) -> tuple[str, ...]:
    """A list field: the mod writes "-" + each item + "\\n" (A13, A21; CurrentInfoControl.cs:74).

    One leading "-" goes, the rest is split into stripped, non-empty lines; a value without the "-"
    (the idle line, A22) is kept whole.
    """
    text = _dash_text(obj, key)
    if text is None:
        return ()
    text = text.removeprefix("-")
    return tuple(line.strip() for line in text.split("\n") if line.strip())


def _hierarchy(obj: Mapping[str, Any]) -> tuple[str, ...]:
    """hierarchy is a tree with no "-" prefix: its dashes are each object's depth (ObjectHierarchyHelper.cs:73).

    Built with AppendLine, so on Windows its lines end in "\\r\\n"; the dashes are kept.
    """
    text = _dash_text(obj, "hierarchy")
    if text is None:
        return ()
    return tuple(line.rstrip() for line in text.split("\n") if line.strip())


def _distance(value: object) -> float | None:
    """`"3,27"` (a Russian Windows) and `"3.27"` both 3.27 (A9); anything else is unknown, not an error."""
    if isinstance(value, str):
        text = value.strip().replace(",", ".")
        return float(text) if _DISTANCE.fullmatch(text) else None
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _room(value: object) -> str:
    room = _int32(value)
    return ROOMS.get(room, "Unknown") if room is not None else "Unknown"


def _images(value: object) -> tuple[str, ...]:
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    return ()


def _character(value: object) -> str:
    if not isinstance(value, str) or not CHARACTER.fullmatch(value):
        raise _Refused("character is not a character name")
    return value


def parse_a(obj: object, *, images: bool = False) -> ARequest | Malformed:
    """A dialect-A request object (design §3.1), or why it cannot be used.

    Fatal: no int32 `id` (then the reply's id is -1), a `character` that is not a name, `input` not
    a string, a list field that is neither a string nor null. Lenient, because they are context
    only: `distance` (None when unreadable), the rooms ("Unknown"), `dialog_active` (False unless
    true). Unknown keys are ignored.

    `input` is compared before stripping: the mod sends exactly "waiting" on a poll (A25), and the
    player's text always ends in "\\n" (A17), so a player who types "waiting" is still heard. Exactly
    "boring" is what older mods sent when the player was idle, and means the idle event.
    """
    if not isinstance(obj, dict):
        return Malformed("not an object")
    request_id = _int32(obj.get("id"))
    if request_id is None:
        return Malformed("id is missing or not an int32" if "id" in obj else "no id")
    try:
        character = _character(obj.get("character"))
        raw_input = obj.get("input")
        if not isinstance(raw_input, str):
            raise _Refused("input is not a string")
        events = _dash_lines(obj, "dataToSentSystem")
        player_text = ""
        if raw_input == "boring":
            events = (IDLE_EVENT,)
        elif raw_input != "waiting":
            player_text = raw_input.strip()
        return ARequest(
            id=request_id, character=character, player_text=player_text, events=events,
            infos=_dash_lines(obj, "systemInfo"), distance=_distance(obj.get("distance")),
            room_player=_room(obj.get("roomPlayer")), room_character=_room(obj.get("roomMita")),
            hierarchy=_hierarchy(obj), current_info=_dash_lines(obj, "currentInfo"),
            dialog_active=obj.get("dialog_active") is True,
            images=_images(obj.get("image_base64_list")) if images else ())
    except _Refused as refused:
        return Malformed(str(refused), request_id)


# --- dialect A: replies ----------------------------------------------------------------------


def _checked_int32(name: str, value: object) -> None:
    if _int32(value) is None:
        raise ValueError(f"{name} must be an int32, not {value!r}")


@dataclass(frozen=True)
class ModSettings:
    """The settings keys sent on every A reply (R4) and in B's loaded_settings, with the app's defaults (R8).

    Every reply carries all of them: a missing MITAS_MENU or EMOTION_MENU turns that menu off (R4), and
    a value of the wrong JSON type makes the mod drop that reply's voice path and silero flag (R5),
    so the types are checked here, once.
    """

    language: str = "RU"
    text_wait_time: int = 40
    voice_wait_time: int = 40
    mitas_menu: bool = False
    emotion_menu: bool = False
    gm_on: bool = False
    gm_read: bool = False
    gm_voice: bool = False
    gm_repeat: int = 2
    cc_limit_mod: int = 100

    def __post_init__(self) -> None:
        for spec in fields(self):
            value = getattr(self, spec.name)
            if spec.type == "bool" and not isinstance(value, bool):
                raise ValueError(f"game.{spec.name} must be true or false, not {value!r}")
            if spec.type == "int":
                _checked_int32(f"game.{spec.name}", value)
            if spec.type == "str" and not isinstance(value, str):
                raise ValueError(f"game.{spec.name} must be a string, not {value!r}")

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> ModSettings:
        """From the `[game]` config section, same names in lower case; missing ones take the defaults."""
        return cls(**{spec.name: section[spec.name] for spec in fields(cls) if spec.name in section})


@dataclass(frozen=True)
class AReply:
    """What one A reply says; build_a adds the settings keys."""

    id: int
    """The request's id, echoed: the mod keys the line's voice wait on it (R7)."""
    character: str
    """Read by the mod and never used (R6); echoed like the app does."""
    silero: bool
    """The link's voice setting, the same on every reply (V1, V6)."""
    response: str = ""
    id_sound: int = 0
    """Whose line `wav_path` is for; 0 is a real id (request 0), never "no sound" (§1.7)."""
    wav_path: str = ""
    user_input: str = ""


def _a_object(reply: AReply, settings: ModSettings, response: str) -> bytes:
    """The reply object in the app's key order (HEAD:server.py:168-198), exact types, compact."""
    message: dict[str, object] = {
        "id": reply.id, "type": "chat", "character": reply.character, "response": response,
        "silero": reply.silero, "id_sound": reply.id_sound, "patch_to_sound_file": reply.wav_path,
        "user_input": reply.user_input, "GM_ON": settings.gm_on, "GM_READ": settings.gm_read,
        "GM_VOICE": settings.gm_voice, "GM_REPEAT": settings.gm_repeat, "CC_Limit_mod": settings.cc_limit_mod,
        "instant_send": False, "LANGUAGE": settings.language, "MITAS_MENU": settings.mitas_menu,
        "EMOTION_MENU": settings.emotion_menu, "TEXT_WAIT_TIME": settings.text_wait_time,
        "VOICE_WAIT_TIME": settings.voice_wait_time,
    }
    return json.dumps(message, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _escaped_len(char: str) -> int:
    """The bytes one character takes inside an ASCII-escaped JSON string."""
    return len(json.dumps(char, ensure_ascii=True)) - 2


_TAGGED = re.compile(r"<[^<>\n]*>.*?</[^<>\n]*>|<[^<>\n]*>")
"""Tag blocks and lone tags: a cut inside one would show half a tag as text (UT:40-41)."""


def _cut(response: str, budget: int) -> str:
    """The longest start of `response` that fits `budget` escaped bytes with "…" added, cut at a boundary.

    A phrase end (".", "!", "?", "…" before whitespace) in the second half of what fits is taken
    first, else the last whitespace, else the hard limit; never inside a tag.
    """
    room = budget - _escaped_len(ELLIPSIS)
    used, fits = 0, 0
    for char in response:
        used += _escaped_len(char)
        if used > room:
            break
        fits += 1
    spans = [(match.start(), match.end()) for match in _TAGGED.finditer(response)]
    starts = [start for start, _ in spans]

    def inside_tag(cut: int) -> bool:
        index = bisect_left(starts, cut) - 1
        return index >= 0 and cut < spans[index][1]

    # fits < len(response): had all of it fitted, the reply would not have been too long
    words = [cut for cut in range(fits, 0, -1) if response[cut].isspace() and not inside_tag(cut)]
    phrases = [cut for cut in words if response[cut - 1] in ".!?…" and cut * 2 >= fits]
    cut = (phrases or words or [fits])[0]
    return response[:cut].rstrip() + ELLIPSIS


def build_a(reply: AReply, settings: ModSettings) -> bytes:
    """The bytes of one A reply: every key every time (R3, R4), exact JSON types, ≤ MAX_REPLY_BYTES (R1).

    `json.dumps` with ensure_ascii like the app (R9), without its spaces. A response too long for the
    mod's single 32 000-byte read is cut (see _cut) and ends in "…"; the JSON is never cut. The
    caller can tell it happened by comparing the sent response with `reply.response`.
    """
    for name in ("id", "id_sound"):
        _checked_int32(name, getattr(reply, name))
    raw = _a_object(reply, settings, reply.response)
    if len(raw) <= MAX_REPLY_BYTES:
        return raw
    budget = MAX_REPLY_BYTES - len(_a_object(reply, settings, ""))
    if budget < _escaped_len(ELLIPSIS):
        raise ValueError("the reply does not fit the mod's 32000-byte read even with an empty response")
    return _a_object(reply, settings, _cut(reply.response, budget))


# --- dialect B -------------------------------------------------------------------------------

TASK_STATUSES = ("PENDING", "VOICING", "SUCCESS", "FAILED_ON_GENERATION", "FAILED_ON_VOICEOVER", "FAILED",
                 "CANCELLED", "ABORTED")
"""The app's TaskStatus values (task_manager.py:10-18)."""
TASK_KEYS = ("uid", "status", "type", "data", "created_at", "updated_at", "result", "error")
"""Task.to_dict, in its order (task_manager.py:32-42)."""
EVENT_TYPES = ("answer", "idle_timeout", "system_info", "system_info_flush", "react")
"""create_task's `type` values the app knows (create_task.py); any other is ABORTED."""


@dataclass(frozen=True)
class BAction:
    """One dialect-B request (§1.8), with the app's defaults for what is missing.

    `type` is the create_task event type ("answer" when missing, create_task.py:16), `message` is
    `data.message`, and the context fields are read with the A rules (inferred: the B client is not
    public, and the app itself only passes them on as strings, create_task.py:71-77).
    """

    action: str
    type: str = "answer"
    character: str = "Mita"
    message: str = ""
    req_id: str | int | None = None
    """Echoed in the task's data and in ABORTED updates (server.py:195-196)."""
    task_uid: str = ""
    """get_task_status's argument; "" is the app's "Missing task_uid"."""
    sender: str = "Player"
    participants: tuple[str, ...] = ()
    distance: float | None = None
    room_player: str = "Unknown"
    room_character: str = "Unknown"
    hierarchy: tuple[str, ...] = ()
    current_info: tuple[str, ...] = ()
    images: tuple[str, ...] = ()


def _participants(value: object) -> tuple[str, ...]:
    """A list, or a comma-separated string (create_task.py:36-40)."""
    if isinstance(value, str):
        return tuple(name.strip() for name in value.split(",") if name.strip())
    if isinstance(value, list):
        return tuple(str(name) for name in value if str(name).strip())
    return ()


def parse_b(obj: object, *, images: bool = False) -> BAction | Malformed:
    """A dialect-B object. Only its shape is checked here; unknown actions and types are the link's to answer."""
    if not isinstance(obj, dict) or not isinstance(obj.get("action"), str):
        return Malformed("no action")
    try:
        event_type = obj.get("type", "answer")
        if not isinstance(event_type, str):
            raise _Refused("type is not a string")
        data = obj.get("data") or {}
        context = obj.get("context") or {}
        if not isinstance(data, dict) or not isinstance(context, dict):
            raise _Refused("data or context is not an object")
        message = data.get("message", "")
        if not isinstance(message, str):
            raise _Refused("data.message is not a string")
        req_id = obj.get("req_id")
        if req_id is not None and (isinstance(req_id, bool) or not isinstance(req_id, str | int)):
            raise _Refused("req_id is not a string or an integer")
        task_uid = obj.get("task_uid")
        sender = obj.get("sender") or data.get("sender") or "Player"
        participants = obj.get("participants")
        return BAction(
            action=obj["action"], type=event_type, character=_character(obj.get("character", "Mita")),
            message=message, req_id=req_id, task_uid=task_uid if isinstance(task_uid, str) else "",
            sender=str(sender),
            participants=_participants(data.get("participants") if participants is None else participants),
            distance=_distance(context.get("distance")), room_player=_room(context.get("roomPlayer")),
            room_character=_room(context.get("roomMita")), hierarchy=_hierarchy(context),
            current_info=_dash_lines(context, "currentInfo"),
            images=_images(context.get("image_base64_list")) if images else ())
    except _Refused as refused:
        return Malformed(str(refused))


def _line(message: Mapping[str, object]) -> bytes:
    """One B message: ASCII-escaped JSON and "\\n" (server.py:208-215)."""
    return json.dumps(message, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n"


def b_task(uid: str, status: str, type: str, data: Mapping[str, object], created_at: float, updated_at: float,
           result: Mapping[str, object] | None = None, error: str | None = None) -> dict[str, object]:
    """A task as Task.to_dict makes it (task_manager.py:32-42); `type` is "chat", "idle" or "react"."""
    if status not in TASK_STATUSES:
        raise ValueError(f"unknown task status {status!r}")
    return {"uid": uid, "status": status, "type": type, "data": dict(data), "created_at": created_at,
            "updated_at": updated_at, "result": None if result is None else dict(result), "error": error}


def b_task_update(task: Mapping[str, object]) -> bytes:
    """`{"type":"task_update","uid","status","body":task}` (server.py:201-206); `task` as b_task makes it."""
    missing = [key for key in TASK_KEYS if key not in task]
    if missing:
        raise ValueError(f"task has no {', '.join(missing)}")
    return _line({"type": "task_update", "uid": task["uid"], "status": task["status"], "body": dict(task)})


def b_aborted(character: str, event_type: str, req_id: str | int | None, reason: str, *,
              uid: str | None = None) -> bytes:
    """An ABORTED task_update for a request that makes no task (server.py:171-199).

    uid "abrt_<hex>" (random unless given), times 0, an empty result; the task type is "idle" for an
    idle event, else "chat"; req_id goes in data only when truthy, as the app does.
    """
    uid = uid or f"abrt_{uuid.uuid4().hex}"
    data: dict[str, object] = {"character": character, "event_type": event_type}
    if req_id:
        data["req_id"] = req_id
    task = b_task(uid, "ABORTED", "idle" if event_type in ("idle_timeout", "idle") else "chat", data, 0, 0,
                  {}, reason)
    return b_task_update(task)


def b_task_status(task: Mapping[str, object], *, silero_connected: bool, game_master: bool,
                  gm_voice: bool) -> bytes:
    """get_task_status's answer: the bare task (get_task_status.py:23-49).

    On SUCCESS it also has `result.audio_path` (= voiceover_path, when there is one), `silero_connected`,
    and GM_ON = GM_READ = whether the current character is GameMaster, GM_VOICE = that and the setting.
    """
    answer = dict(task)
    result = answer.get("result")
    if answer.get("status") == "SUCCESS" and isinstance(result, Mapping) and result:
        path = result.get("voiceover_path", "")
        if path:
            answer["result"] = {**result, "audio_path": path}
        answer.update(silero_connected=silero_connected, GM_ON=game_master, GM_READ=game_master,
                      GM_VOICE=game_master and gm_voice)
    return _line(answer)


def b_loaded_settings(settings: ModSettings, character: str,
                      characters_stats: Mapping[str, Mapping[str, float]]) -> bytes:
    """The settings push on connect and on get_settings (design §8; body per the notes §3).

    Inferred: ACTION_MENU is what feeds the mod's EMOTION_MENU in the app (fd23ae4), so it is
    `emotion_menu` here; the link never ignores game requests, so IGNORE_GAME_REQUESTS is false and
    GAME_BLOCK_LEVEL the app's default. Stats are {attitude, boredom, stress} per character.
    """
    stats = {name: {key: float(value) for key, value in values.items()}
             for name, values in characters_stats.items()}
    body = {"settings": {"ACTION_MENU": settings.emotion_menu, "MITAS_MENU": settings.mitas_menu,
                         "IGNORE_GAME_REQUESTS": False, "GAME_BLOCK_LEVEL": "Idle events", "CHARACTER": character},
            "characters_stats": stats}
    return _line({"type": "loaded_settings", "body": body})


def b_info(stored: int) -> bytes:
    """system_info's answer: how many infos are buffered for the character (create_task.py:209)."""
    return _line({"type": "info", "stored": stored})


def b_error(text: str) -> bytes:
    """`{"type":"error","error":text}` (server.py:217-218): unknown action, missing or unknown task."""
    return _line({"type": "error", "error": text})
