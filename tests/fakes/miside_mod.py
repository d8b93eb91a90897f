"""A test double of the MiSide NeuroMita mod (dialect A, release v0.011 = fd26ab7), over real sockets.

The game link is tested against this instead of the game, so every behaviour here is the mod's, as
docs/design/game-link.md §1 establishes it from the C# sources; each rule names its fact id
(A.. connection and requests, R.. reading the reply, V.. silero and the voice wait, F.. the voice file).
What the mod's code does not show is marked [I] there and here.  The double runs on a faithful clock
(real sleeps), in three threads like the mod's coroutines:

- the poll loop (MitaCore.ConnectionTimer + DataChange.HandleDialogue): one exchange at a time, the next
  0.35 s after the previous ends (A26), the reply noticed at the next 0.1 s tick (A27);
- one socket thread per exchange (NetworkController's async Task): connect, one send, one recv (A2-A5, R1);
- the display (DialogueControl): lines one after another (V4, FIFO here), each waiting for its voice (V5),
  loading the file the mod's way (F1-F7), then showing its text parts (V9/V10).

Everything that happens goes into `EventLog`; tests assert on it.

    with ModDouble(port) as mod:
        mod.say("Привет")
        line = mod.wait_for(lambda: mod.voiced_lines(), timeout=10)[0]
"""

from __future__ import annotations

import json
import math
import operator
import queue
import select
import socket
import struct
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any, TypeVar

from tests.fakes.mod_reply import ModReplyError, read_reply
from voxpipe.frontends.game.modmodel import display_parts, part_seconds

T = TypeVar("T")

CHARACTERS = ("Player", "None", "Crazy", "Cappy", "Kind", "Cart_portal", "ShortHair", "Cart_divan", "Mila",
              "Sleepy", "Creepy", "GameMaster")
"""The mod's characterType names (A8); `character` is sent as one of them (A7)."""
COOLDOWN_S = 6.0 - 4.0
"""actionCooldown − 4: needToIgnoreTimeout() is true in both branches, so the cooldown is 2 s (A18)."""
IDLE_EVENT = "Player did nothing for 90 seconds"
"""dataToSentSystem of the idle timer, with no leading "-" (A22)."""
IDLE_AFTER_S = 180.0
"""MitaBoringInterval (A22)."""
CONNECT_ATTEMPTS = 3
"""TryConnectAsync: 3 attempts (A3); the delay between them is ModDouble's connect_retry_s (2 s in the mod)."""
RECV_BYTES = 32000
"""The one ReceiveAsync's buffer (R1)."""
TEXT_TIMEOUT_S = 40.0
"""DataChange.textTimeout before any reply's TEXT_WAIT_TIME (A29)."""
VOICE_TIMEOUT_S = 30.0
"""DialogueControl.voiceTimout before any reply's VOICE_WAIT_TIME (V5)."""
DOTS_EVERY_S = 0.5
"""A "..." bubble every 0.5 s of waiting for a reply while no line shows (A28)."""
STARS_EVERY_S = 0.75
"""A "***" bubble every 0.75 s of waiting for a voice (V5)."""
TOO_LONG = "Too long waited for text from python"
"""The line shown when the text wait runs out (A29)."""
FADE_FLOATS = 44100 // 10
"""ApplyFadeIn over 4410 interleaved floats = 50 ms of stereo (F4)."""
DELETE_AFTER_S = 0.1
"""Task.Delay(100) before File.Delete, inside the blocking load (F6, F7)."""
SETTINGS = ("GM_ON", "GM_READ", "GM_VOICE", "GM_REPEAT", "CC_Limit_mod", "LANGUAGE", "MITAS_MENU", "EMOTION_MENU",
            "TEXT_WAIT_TIME", "VOICE_WAIT_TIME", "instant_send")
"""The optional keys the mod applies as it reads them (R4), kept in EventLog.settings."""
PENDING_CHECK_S = 0.1
"""How long the double looks for bytes beyond the one recv (not the mod: it never looks, R1)."""


def dotnet_json_string(text: str) -> str:
    """A JSON string as System.Text.Json's default encoder writes it (A15, [I]): everything outside
    printable ASCII and the HTML-sensitive `" & ' + < > \\`` as uppercase \\uXXXX (UTF-16 units)."""
    short = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}
    out = ['"']
    for char in text:
        if char in short:
            out.append(short[char])
        elif " " <= char < "\x7f" and char not in "\"&'+<>`":
            out.append(char)
        else:
            units = char.encode("utf-16-be")
            out.extend(f"\\u{units[i] << 8 | units[i + 1]:04X}" for i in range(0, len(units), 2))
    out.append('"')
    return "".join(out)


def request_bytes(fields: list[tuple[str, str | int | bool]]) -> bytes:
    """JsonSerializer.Serialize of the anonymous request object: compact, in field order (A4, A15)."""
    def value(item: str | int | bool) -> str:
        if isinstance(item, bool):
            return "true" if item else "false"
        return str(item) if isinstance(item, int) else dotnet_json_string(item)
    return ("{" + ",".join(f"{dotnet_json_string(key)}:{value(item)}" for key, item in fields) + "}").encode()


def wine_path(path: str, z_root: Path) -> Path:
    """The file a Windows path names under Wine, whose default Z: drive is the POSIX root ([I], design §7.2);
    any other form is opened as given."""
    windows = PureWindowsPath(path)
    if windows.drive.upper() == "Z:":
        return z_root.joinpath(*windows.parts[1:])
    return Path(path)


def wav_header_problem(data: bytes) -> str:
    """Why `data` is not the canonical 44-byte PCM/2ch/44100/16 WAV the link promises ("" when it is).
    A check beyond the mod, which parses no header at all (F2)."""
    if len(data) < 44:
        return f"{len(data)} bytes, shorter than a header"
    riff, size, wave, fmt, fmt_size, codec, channels, rate, byte_rate, align, bits, tag, data_size = struct.unpack(
        "<4sI4s4sIHHIIHH4sI", data[:44])
    expected = (b"RIFF", len(data) - 8, b"WAVE", b"fmt ", 16, 1, 2, 44100, 176400, 4, 16, b"data", len(data) - 44)
    got = (riff, size, wave, fmt, fmt_size, codec, channels, rate, byte_rate, align, bits, tag, data_size)
    if got != expected:
        return f"header {got} is not {expected}"
    return "" if data_size % 4 == 0 else f"data size {data_size} is not whole stereo frames"


@dataclass(frozen=True)
class VoiceLevel:
    """What the mod's loader makes of a file's bytes (F1-F4): `gain` is 1 / the peak over every int16 word,
    the header's included (F3, F9); `level_dbfs` the RMS of what then plays, after the fade-in (F4)."""

    gain: float
    level_dbfs: float


def voice_level(data: bytes) -> VoiceLevel:
    """ConvertByteArrayToFloatArray → NormalizeAudioData → ApplyFadeIn, measured (F2-F4)."""
    words = array("h")
    words.frombytes(data[:len(data) // 2 * 2])  # F2: Length / 2 little-endian int16, no header parsing
    if not words:
        return VoiceLevel(1.0, -math.inf)
    peak = max(max(words), -min(words)) / 32768
    gain = 1 / peak if peak > 0 else 1.0
    energy = float(sum(map(operator.mul, words, words)))
    for index in range(min(FADE_FLOATS, len(words))):
        energy -= words[index] ** 2 * (1 - (index / FADE_FLOATS) ** 2)
    rms = math.sqrt(max(energy, 0.0) / len(words)) / 32768 * gain
    return VoiceLevel(gain, 20 * math.log10(rms) if rms > 0 else -math.inf)


@dataclass
class SentRequest:
    """One request as sent (A4): the raw bytes, the same parsed back, and what made it."""

    id: int
    kind: str  # poll | player | event | idle (A21, A22, A25)
    raw: bytes
    fields: dict[str, Any]
    sent_at: float = 0.0  # time.monotonic() once the send returned


@dataclass
class ReceivedReply:
    """What the one recv of an exchange returned and what the mod made of it (R1-R5)."""

    request_id: int
    sent_at: float
    raw: bytes | None = None  # None: no connection, or the recv failed (R2)
    received_at: float | None = None
    noticed_at: float | None = None  # the 0.1 s tick that saw it (A27)
    fields: dict[str, Any] | None = None  # read_reply's result when the reply was well-typed
    error: str = ""  # why the mod read nothing or only part (R2, R3, R5)
    pending: int | None = None  # bytes beyond the one recv (a failure); None until checked
    abandoned: bool = False  # the text wait ran out first (A29): the mod never reads it

    @property
    def latency(self) -> float | None:
        """From the send to the moment the recv returned."""
        return None if self.received_at is None else self.received_at - self.sent_at


@dataclass
class ShownLine:
    """One reply line as the display shows it (V3-V11, F1-F7)."""

    id: int  # the reply's id, which keys the voice (R7)
    character: str  # the mod's characterToSend, not the reply's character (R6)
    text: str
    parts: list[str]
    queued_at: float
    source: str = "mita"  # mita | cart (V3, V11)
    voice: bool = True  # whether it waits for a voice at all (V5; GameMaster: GM_VOICE)
    started_at: float | None = None  # the display took it (dialog_active from here, V4)
    stars: int = 0  # "***" bubbles while it waited for its voice (V5)
    wav_path: str = ""  # the path as the reply gave it
    wav_file: Path | None = None
    wav_bytes: int = 0
    audio_s: float = 0.0  # len / 4 / 44100, what the mod plays (F1, F2, F5)
    gain: float = 1.0
    level_dbfs: float = -math.inf
    header_problem: str = ""
    load_error: str = ""
    delete_error: str = ""
    audio_start: float | None = None
    audio_end: float | None = None  # cut short when a later cart voice replaced it (V11)
    cut: bool = False
    text_start: float | None = None
    text_end: float | None = None
    blips: bool = False  # a part showed with silero off: the mod's text blips instead of a voice (V8)


@dataclass
class EventLog:
    """Everything the double did; read it through ModDouble's helpers, which copy under its lock."""

    requests: list[SentRequest] = field(default_factory=list)
    replies: list[ReceivedReply] = field(default_factory=list)
    lines: list[ShownLine] = field(default_factory=list)  # from the moment each is queued for display
    dots: int = 0  # "..." bubbles (A28)
    stars: int = 0  # "***" bubbles (V5)
    too_long: list[float] = field(default_factory=list)  # when "Too long waited…" showed (A29)
    lost: list[str] = field(default_factory=list)  # player text inside the cooldown (A19)
    duplicates: list[str] = field(default_factory=list)  # player text equal to the previous one (A20)
    blocked: list[str] = field(default_factory=list)  # say() while input was blocked (V12)
    connect_failures: int = 0  # exchanges that found no listener after every attempt (A3)
    hidden_gm: list[str] = field(default_factory=list)  # GameMaster lines not shown (GM_READ false, V3)
    user_inputs: list[str] = field(default_factory=list)  # non-empty user_input (InputControl.UpdateInput)
    settings: dict[str, Any] = field(default_factory=dict)  # the R4 settings in force
    restarts: list[float] = field(default_factory=list)

    def failures(self) -> list[str]:
        """What a correct link never causes: replies the mod cannot read in full, bytes beyond the one recv,
        voice files it cannot use, a text wait that ran out."""
        found = [f"reply to {reply.request_id}: {reply.error}" for reply in self.replies if reply.error]
        found += [f"reply to {reply.request_id}: {reply.pending} bytes beyond the one recv"
                  for reply in self.replies if reply.pending]
        for line in self.lines:
            found += [f"line {line.id}: {problem}" for problem in (line.header_problem, line.load_error,
                                                                  line.delete_error) if problem]
        found += [f"text wait ran out at {at:.2f}" for at in self.too_long]
        found += [f"{self.connect_failures} exchanges found no listener"] if self.connect_failures else []
        return found


@dataclass
class _Exchange:
    """One exchange in flight.  HandleDialogue fills the plan; the socket thread, once connected, the request
    and the reply (the mod takes the id and reads the state only then, NC:40-66), then sets `done`."""

    character: str
    data: str  # input
    system: str  # dataToSentSystem
    info: str  # systemInfo
    kind: str
    reply: ReceivedReply | None = None
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Game:
    """Every static the mod keeps, at its initial value: a new one per game process (A6)."""

    character: str
    next_id: int = 0  # A6
    player_message: str = ""
    last_player: str = ""
    last_action: float = -math.inf
    boring_since: float = field(default_factory=time.monotonic)
    system_messages: deque[tuple[str, str]] = field(default_factory=deque)
    system_infos: list[tuple[str, str]] = field(default_factory=list)
    last_system: dict[str, str] = field(default_factory=dict)
    prepared: dict[str, Any] = field(default_factory=lambda: {
        "distance": 0.0, "room_player": -1, "room_mita": -1, "hierarchy": "-", "current_info": ""})
    silero: bool = False
    sound_files: dict[int, str | None] = field(default_factory=dict)
    text_timeout: float = TEXT_TIMEOUT_S
    voice_timeout: float = VOICE_TIMEOUT_S
    display: queue.Queue[ShownLine] = field(default_factory=queue.Queue)
    lines_pending: int = 0
    block_changes: list[tuple[float, bool]] = field(default_factory=list)
    last_cart: ShownLine | None = None


class ModDouble:
    """The mod, talking to the link at host:port.  See the module docstring; the API is what a player does
    (say, set_character, set_state, restart_game) and what the game does (event, info, idle)."""

    def __init__(self, port: int, host: str = "127.0.0.1", *, character: str = "Crazy",
                 connect_retry_s: float = 2.0, poll_s: float = 0.35, tick_s: float = 0.1,
                 voice_root: Path | None = None, decimal_comma: bool = True) -> None:
        """voice_root is the directory Wine's Z: drive maps to (default /); decimal_comma formats distance
        as a Russian Windows does (A9)."""
        self._check_character(character)
        self.host, self.port = host, port
        self.first_character = character
        self.connect_retry_s, self.poll_s, self.tick_s = connect_retry_s, poll_s, tick_s
        self.voice_root = voice_root or Path("/")
        self.decimal_comma = decimal_comma
        self.log = EventLog()
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: set[socket.socket] = set()
        self._live: dict[str, Any] = {"distance": 0.0, "room_player": -1, "room_mita": -1, "hierarchy": "-",
                                      "current_info": "-"}
        self._game = _Game(character)

    # --- what the player and the game do

    def say(self, text: str) -> bool:
        """The player types `text` and presses Enter: `text + "\\n"` is appended to playerMessage (A17).
        Enter does nothing while a dialogue part shows (V12): then this returns False and logs it."""
        with self._lock:
            if self.input_blocked():
                self.log.blocked.append(text)
                return False
            self._game.player_message += f"{text}\n"
            self._game.boring_since = time.monotonic()  # PlayerTalk resets MitaBoringtimer (DLG:177)
            return True

    def event(self, text: str, character: str | None = None) -> None:
        """A game event: CharacterMessages.sendSystemMessage, for the current character by default (A21)."""
        with self._lock:
            self._game.system_messages.append((text, character or self._game.character))

    def info(self, text: str, character: str | None = None) -> None:
        """A game fact: sendSystemInfo; it rides on the next exchange for that character, a poll too (A13)."""
        with self._lock:
            self._game.system_infos.append((text, character or self._game.character))

    def idle(self) -> None:
        """The idle timer runs out now instead of after 180 s (A22)."""
        with self._lock:
            self._game.boring_since = -math.inf

    def set_character(self, name: str) -> None:
        """The current character changes (addChangeMita); later polls carry it (A7, A24)."""
        self._check_character(name)
        with self._lock:
            self._game.character = name

    def set_state(self, **state: Any) -> None:
        """The live game state: distance (float), room_player / room_mita (int, A10), hierarchy,
        current_info.  The mod reads it only when a request waits for a response (prepareForSend, A12),
        so polls repeat the values of the last such request."""
        unknown = set(state) - set(self._live)
        if unknown:
            raise ValueError(f"unknown state {sorted(unknown)}")
        with self._lock:
            self._live.update(state)

    def restart_game(self) -> None:
        """The game process restarts: every static resets, the request id first (A6)."""
        self.stop()
        with self._lock:
            self._game = _Game(self.first_character)
            self.log.restarts.append(time.monotonic())
        self.start()

    # --- lifecycle

    def start(self) -> ModDouble:
        self._stop.clear()
        self._threads = [threading.Thread(target=self._poll_loop, name="mod-poll", daemon=True),
                         threading.Thread(target=self._display_loop, name="mod-display", daemon=True)]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Ends the loops; an exchange in flight is cut as when the game closes."""
        self._stop.set()
        with self._lock:
            for sock in self._sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> ModDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- for tests

    def wait_for(self, predicate: Callable[[], T], timeout: float) -> T:
        """The first truthy value of predicate(), polled every 20 ms; AssertionError after `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {timeout} s; failures so far: {self.log.failures()}")
            time.sleep(0.02)

    def lines(self) -> list[ShownLine]:
        with self._lock:
            return list(self.log.lines)

    def voiced_lines(self) -> list[ShownLine]:
        """Lines whose voice has started."""
        return [line for line in self.lines() if line.audio_start is not None]

    def requests(self) -> list[SentRequest]:
        with self._lock:
            return list(self.log.requests)

    def replies(self) -> list[ReceivedReply]:
        with self._lock:
            return list(self.log.replies)

    @property
    def dialog_active(self) -> bool:
        """DialogueControl.dialogActive: a line is taken or waiting to be (V4, A14)."""
        with self._lock:
            return self._game.lines_pending > 0

    @property
    def silero(self) -> bool:
        """NetworkController.connectedToSilero, the last reply's value (V1)."""
        with self._lock:
            return self._game.silero

    def input_blocked(self, now: float | None = None) -> bool:
        """InputControl.isInputBlocked: one flag that every dialogue sequence sets at its start and clears at
        its end, bubbles included (V12), so the latest start or end decides."""
        now = time.monotonic() if now is None else now
        with self._lock:
            past = sorted(change for change in self._game.block_changes if change[0] <= now)
            self._game.block_changes = [change for change in self._game.block_changes if change[0] > now] + past[-1:]
            return past[-1][1] if past else False

    def can_type(self) -> bool:
        return not self.input_blocked()

    # --- checks

    @staticmethod
    def _check_character(name: str) -> None:
        if name not in CHARACTERS:
            raise ValueError(f"{name!r} is not a characterType (A8)")

    # --- the poll loop (MitaCore.ConnectionTimer, DataChange.HandleDialogue)

    def _poll_loop(self) -> None:
        """One exchange at a time; the timer restarts when one ends (A26)."""
        while not self._stop.wait(self.poll_s):
            self._handle_dialogue()

    def _handle_dialogue(self) -> None:
        with self._lock:
            chosen = self._choose()
            if chosen is None:
                return
            exchange = self._prepare(*chosen)
        threading.Thread(target=self._exchange, args=(exchange,), name="mod-socket", daemon=True).start()
        response, reply_id, character = self._await(exchange)
        if response:
            self._show(reply_id, character, response)

    def _choose(self) -> tuple[str, str, str, str] | None:
        """What this exchange sends: (character, input, dataToSentSystem, kind), or None when the mod skips
        it.  Player text first, then the queued events, then the idle timer, and only outside the cooldown
        (A16-A22)."""
        text, self._game.player_message = self._game.player_message, ""  # A16: taken and cleared unconditionally
        character, data, system, kind = self._game.character, "waiting", "-", "poll"  # A25
        now = time.monotonic()
        if now - self._game.last_action <= COOLDOWN_S:  # A18
            if text:
                self.log.lost.append(text)  # A19: already cleared, never sent
        elif text:
            if text == self._game.last_player:
                self.log.duplicates.append(text)  # A20: and the whole exchange is skipped
                return None
            self._game.last_player = text
            data, kind = text, "player"  # A23: the first character to answer; the double has one
            self._game.last_action = now
            self._game.boring_since = now
        elif self._game.system_messages:
            system, character = self._events_batch()
            kind, self._game.last_action, self._game.boring_since = "event", now, now
        elif now - self._game.boring_since >= IDLE_AFTER_S:
            system, kind = IDLE_EVENT, "idle"  # A22
            self._game.last_action, self._game.boring_since = now, now
        return character, data, system, kind

    def _events_batch(self) -> tuple[str, str]:
        """All queued system messages in one dataToSentSystem, "-" + each + "\\n" (A21), for the character of
        the last one taken.  A message for a second character is queued again, but it was already added
        and it already set the character (DC:95-137, ported as written)."""
        system, character, first = "-", self._game.character, ""
        while self._game.system_messages:
            text, character = self._game.system_messages.popleft()
            system += text + "\n"
            if self._game.last_system.get(character) == text:
                continue  # a repeat: maxDuplicates 0 makes it "too many", yet it is already in the batch
            self._game.last_system[character] = text
            if first in ("", character):
                first = character
            else:
                self._game.system_messages.append((text, character))
                break
        return system, character

    def _prepare(self, character: str, data: str, system: str, kind: str) -> _Exchange:
        """Infos for this character (A13), the character switch before sending (A24), and prepareForSend
        for a request that waits for a response (A12): only then does the mod read the game state."""
        info = "-"
        for item in list(self._game.system_infos):
            if item[1] == character:
                info += item[0] + "\n"
                self._game.system_infos.remove(item)
        self._game.character = character
        if data != "waiting" or system != "-":
            self._game.prepared = dict(self._live)
        return _Exchange(character, data, system, info, kind)

    def _request(self, exchange: _Exchange) -> tuple[SentRequest, ReceivedReply]:
        """The request object (A4-A14), made once connected: the id is taken only then (A6, NC:51)."""
        waits = exchange.data != "waiting" or exchange.system != "-"  # NC:40
        prepared = self._game.prepared
        current = prepared["current_info"] if waits else "-"  # A12
        distance = f"{float(prepared['distance']):.2f}"  # A9: F2
        request_id, self._game.next_id = self._game.next_id, self._game.next_id + 1  # A6: polls too
        raw = request_bytes([
            ("id", request_id), ("type", "chat"), ("character", exchange.character), ("input", exchange.data),
            ("dataToSentSystem", exchange.system), ("systemInfo", exchange.info),
            ("distance", distance.replace(".", ",") if self.decimal_comma else distance),
            ("roomPlayer", int(prepared["room_player"])), ("roomMita", int(prepared["room_mita"])),
            ("hierarchy", prepared["hierarchy"] or "-"), ("currentInfo", current or "-"),
            ("dialog_active", self._game.lines_pending > 0)])
        request = SentRequest(request_id, exchange.kind, raw, json.loads(raw))
        self.log.requests.append(request)
        exchange.reply = ReceivedReply(request_id=request_id, sent_at=time.monotonic())
        return request, exchange.reply

    def _exchange(self, exchange: _Exchange) -> None:
        """NetworkController.GetResponseFromPythonSocketAsync: a new IPv4 socket (A2), 3 connect attempts
        (A3), one send of the bytes with no newline and no shutdown (A5), one recv(32000) (R1).  Then, beyond
        the mod, whether more bytes were waiting, which the mod would never see."""
        for attempt in range(CONNECT_ATTEMPTS):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.connect((self.host, self.port))
                break
            except OSError:
                sock.close()
                if attempt + 1 == CONNECT_ATTEMPTS or self._stop.wait(self.connect_retry_s):
                    with self._lock:
                        self.log.connect_failures += 1
                    exchange.done.set()  # no request sent, no id taken; the mod reads nothing (R2)
                    return
        with self._lock:
            self._sockets.add(sock)
            request, reply = self._request(exchange)
        try:
            sock.sendall(request.raw)
            reply.sent_at = request.sent_at = time.monotonic()
            reply.raw = sock.recv(RECV_BYTES)
            reply.received_at = time.monotonic()
        except OSError as exc:
            reply.error = f"recv failed: {exc} (R2)"
        exchange.done.set()
        try:
            if reply.raw is not None and select.select([sock], [], [], PENDING_CHECK_S)[0]:
                reply.pending = len(sock.recv(1 << 20, socket.MSG_PEEK | socket.MSG_DONTWAIT))
            else:
                reply.pending = 0
        except OSError:
            reply.pending = 0
        finally:
            with self._lock:
                self._sockets.discard(sock)
            sock.close()

    def _await(self, exchange: _Exchange) -> tuple[str, int, str]:
        """HandleDialogue's wait: a 0.1 s tick until the reply is there (A27), "..." every 0.5 s while no line
        shows (A28), the text timeout (A29).  Returns (response, the reply's id, the character it shows as)."""
        character, ticks, last_dots = exchange.character, 0, 0
        dots_ticks = math.ceil(DOTS_EVERY_S / self.tick_s - 1e-9)
        while not exchange.done.is_set():
            ticks += 1
            if ticks * self.tick_s >= self._game.text_timeout - 1e-9:
                with self._lock:
                    if exchange.reply is not None:
                        exchange.reply.abandoned = True
                        self.log.replies.append(exchange.reply)
                    self.log.too_long.append(time.monotonic())
                    self._game.silero = False  # DC:304
                return TOO_LONG, 0, character
            if ticks - last_dots >= dots_ticks and not self.dialog_active:
                self._bubble("...")
                last_dots = ticks
            if self._stop.wait(self.tick_s):
                return "", 0, character
        with self._lock:
            reply = exchange.reply
            if reply is None:
                return "", 0, character
            reply.noticed_at = time.monotonic()
            self.log.replies.append(reply)
            return (*self._read(reply), character)

    def _read(self, reply: ReceivedReply) -> tuple[str, int]:
        """DataChange's reading of the reply, statement by statement (R3-R5, V1, V2): (response, id).

        A key that throws skips every later statement (R5): what was read before still counts, so a bad
        optional key keeps the line (response is read at DC:241) but loses its voice path and the silero
        flag, which come after every optional key (DC:270-285)."""
        if reply.raw is None:
            return "", 0
        try:
            fields = read_reply(reply.raw)
        except ModReplyError as exc:
            reply.error = f"{exc} (R3, R5)"
            fields, complete = exc.partial, False
        else:
            reply.fields, complete = fields, True
        settings = {key: fields[key] for key in SETTINGS if fields.get(key) is not None}  # None: kept as it was
        self.log.settings.update(settings)  # R4: a missing MITAS_MENU/EMOTION_MENU reads as false
        if "TEXT_WAIT_TIME" in settings:
            self._game.text_timeout = float(settings["TEXT_WAIT_TIME"])
        if "VOICE_WAIT_TIME" in settings:
            self._game.voice_timeout = float(settings["VOICE_WAIT_TIME"])
        if complete:
            if fields["patch_to_sound_file"]:
                self._game.sound_files[fields["id_sound"]] = fields["patch_to_sound_file"]  # V2
            self._game.silero = fields["silero"]  # V1: every reply, polls included
            if fields["user_input"]:
                self.log.user_inputs.append(fields["user_input"])
        return fields.get("response", ""), fields.get("id", 0)

    # --- the display (DialogueControl)

    def _bubble(self, text: str) -> None:
        """A waiting bubble: a dialogue sequence of one part that blocks input while it shows (V12)."""
        now = time.monotonic()
        with self._lock:
            if text == "...":
                self.log.dots += 1
            else:
                self.log.stars += 1
            self._game.block_changes += [(now, True), (now + part_seconds(text), False)]

    def _show(self, reply_id: int, character: str, response: str) -> None:
        """DataChange's display branch (V3): carts play on their own AudioSource; a GameMaster line shows only
        with GM_READ, voiced only with GM_VOICE."""
        with self._lock:
            settings = self.log.settings
            if character == "GameMaster" and not settings.get("GM_READ", False):
                self.log.hidden_gm.append(response)
                return
            line = ShownLine(reply_id, character, response, display_parts(response), time.monotonic(),
                             source="cart" if "Cart" in character else "mita",
                             voice=settings.get("GM_VOICE", False) if character == "GameMaster" else True)
            self.log.lines.append(line)
            self._game.lines_pending += 1  # dialogActive is set as the coroutine starts (V4, A14)
        self._game.display.put(line)

    def _display_loop(self) -> None:
        """Lines one at a time (V4: the mod's coroutines wait on dialogActive; the double takes them FIFO)."""
        while not self._stop.is_set():
            try:
                line = self._game.display.get(timeout=0.05)
            except queue.Empty:
                continue
            self._display_line(line)
            with self._lock:
                self._game.lines_pending -= 1  # V11: as soon as the text is done, whatever the voice does

    def _display_line(self, line: ShownLine) -> None:
        line.started_at = time.monotonic()
        path = self._wait_voice(line) if line.voice else None
        if path:
            self._load_voice(line, path)
        now = time.monotonic()
        with self._lock:
            if line.wav_bytes and not line.load_error:
                line.audio_start, line.audio_end = now, now + line.audio_s
                if line.source == "cart":  # PlaySound replaces the clip of the one cart AudioSource (V11)
                    previous = self._game.last_cart
                    if previous and previous.audio_end is not None and previous.audio_end > now:
                        previous.audio_end, previous.cut = now, True
                    self._game.last_cart = line
            line.text_start = now
            self._game.block_changes.append((now, True))
        for part in line.parts:  # V9, V10 (<m> blocks removed first, DLG:97)
            line.blips = line.blips or not self.silero  # V8: read as each part shows
            if self._stop.wait(part_seconds(part)):
                return
        with self._lock:
            line.text_end = time.monotonic()
            self._game.block_changes.append((line.text_end, False))

    def _wait_voice(self, line: ShownLine) -> str | None:
        """The voice wait (V5): while silero holds, read live each step (V1, V6), look for the id, take the
        path and leave None in its place (V7); "***" every 0.75 s; up to VOICE_WAIT_TIME."""
        ticks = last_stars = 0
        stars_ticks = math.ceil(STARS_EVERY_S / self.tick_s - 1e-9)
        while ticks * self.tick_s < self._game.voice_timeout - 1e-9 and self.silero:
            with self._lock:
                if line.id in self._game.sound_files:
                    path, self._game.sound_files[line.id] = self._game.sound_files[line.id], None
                    return path
            if ticks - last_stars >= stars_ticks:
                self._bubble("***")
                line.stars += 1
                last_stars = ticks
            ticks += 1
            if self._stop.wait(self.tick_s):
                return None
        return None

    def _load_voice(self, line: ShownLine, path: str) -> None:
        """LoadAudioClipFromFileAsync(path).Result: all bytes (F1), int16 stereo 44.1 kHz (F2, F5), peak
        normalised with the header (F3), faded in (F4), deleted after 100 ms (F6), and only then played:
        the load blocks the display (F7)."""
        line.wav_path = path
        line.wav_file = wine_path(path, self.voice_root)
        try:
            data = line.wav_file.read_bytes()
        except OSError as exc:
            line.load_error = f"cannot read {line.wav_file}: {exc}"  # caught in the mod: no clip, no delete
            return
        level = voice_level(data)
        line.wav_bytes, line.audio_s = len(data), len(data) / 4 / 44100
        line.gain, line.level_dbfs = level.gain, level.level_dbfs
        line.header_problem = wav_header_problem(data)
        self._stop.wait(DELETE_AFTER_S)
        try:
            line.wav_file.unlink()
        except OSError as exc:
            line.delete_error = f"cannot delete {line.wav_file}: {exc}"
