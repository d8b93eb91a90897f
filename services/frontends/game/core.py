"""The game link's state machine: what to answer the mod, and what to publish on the bus.

Pure: no sockets, files or clock. The shell (`link.py`) passes the time into every call and carries
out the effects each call returns, in order: answer a held or current connection, publish on the
bus, make a phrase's WAV (then tells `wav_ready`), delete a file, log a line.

The scheme (docs/design/game-link.md §2 and §5; the fact ids are the design's):
- Every reply to the mod has `silero` = the link's voice setting, never a per-reply flag: each reply
  overwrites the mod's global flag, and `false` cancels the voice wait of a queued line (V1, V6).
- A request with player text or a game event is held (the mod waits in single flight, A26) until the
  first phrase and its voice are ready; that phrase goes in the answer, its voice under the answer's
  own id (R7, V7), so the mod plays it without waiting for a later poll (V5).
- The next phrases go in answers to the following polls of the same character (P1, P3), one at a
  time, each when the previous phrase's *audio* is about to end: the mod starts a line when the
  previous *text* is done (V11), which is sooner, and would talk over it.
- Polls are answered at once from this state, never through the bus (A28: a late answer shows "...").
- Player text while any reply is unfinished is a barge-in: those replies are cancelled, their
  undelivered phrases dropped and their files deleted (what the mod already holds cannot be recalled).
- `delivery = "whole"` is the app's original behaviour, kept as a fallback: the whole text when the
  reply is written, then one voice file for all of it, in a later poll under the text's id.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ...protocol import Body, Cancel, Chunk, LlmDone, Mark, Playback, Request
from ...runtime.replies import cancels
from ...stages.audio import AudioFormat
from .modmodel import text_seconds
from .wire import AReply, ARequest, BAction, ModSettings, build_a

CHARACTERS = ("Crazy", "Cappy", "Kind", "Cart_portal", "ShortHair", "Cart_divan", "Mila", "Sleepy", "Creepy",
              "GameMaster")
"""The mod's characters (CharacterControl.cs:7-24, A8), each with a built-in persona of the same name
(services/stages/llm/personas/)."""
SESSION_PREFIX = "game."
"""Each character is its own voxpipe session, `game.<Character>`."""
FADE_S = 0.05
"""The mod fades every file in over 50 ms (F4): the next phrase may start that much before the end."""
SAFE_TAG_BODY = 200
NOTES_KEPT = 64
"""Game notes and events kept per character between replies; the oldest go (a reply stuck long, a
chatty game)."""
TEXT_CHARS = 60000
"""A request's text and system take 65,536 characters (docs/protocol.md §5.2): longer game input is cut."""
SYSTEM_CHARS = 60000
"""request.system takes 65,536 characters; a huge hierarchy is cut, never refused."""
MULTI_MARKER = "[SPEAKER]"
"""The mod's marker of a line passed between characters (V13): a multi-character scene."""
HEADINGS = {
    "RU": ("Состояние игры для этого ответа:", "Расстояние до игрока: {} м", "Комната игрока: {}. Твоя комната: {}.",
           "Предметы рядом с тобой:", "Твоё текущее состояние:", "Заметки:", "[Событие игры]"),
    "EN": ("Game state for this reply:", "Distance to the player: {} m", "Player's room: {}. Your room: {}.",
           "Objects near you:", "Your current state:", "Notes:", "[Game event]"),
}


# --- effects -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Answer:
    """Write these bytes to connection `conn` and close it."""

    conn: int
    data: bytes


@dataclass(frozen=True)
class Publish:
    session: str
    id: str
    body: Body


@dataclass(frozen=True)
class MakeWav:
    """Convert `pieces` to one game WAV (silence when empty), write it, then call `wav_ready`."""

    session: str
    id: str
    index: int
    pieces: tuple[tuple[bytes, AudioFormat], ...]


@dataclass(frozen=True)
class Delete:
    path: str


@dataclass(frozen=True)
class Log:
    level: int
    text: str


Effect = Answer | Publish | MakeWav | Delete | Log


class Expiring:
    """Voice files handed to the game, each deleted at its time unless the game did it first (it deletes
    what it loads, F6): one it never loaded (its voice wait timed out, the game closed) would stay."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}

    def add(self, path: str, at: float) -> None:
        self.at[path] = at

    def __contains__(self, path: str) -> bool:
        return path in self.at

    def due(self, now: float) -> list[Effect]:
        paths = [path for path, at in self.at.items() if now >= at]
        for path in paths:
            del self.at[path]
        return [Delete(path) for path in paths]

    def all(self) -> list[Effect]:
        return self.due(math.inf)


# --- settings ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Character:
    persona: str
    voice: str = ""
    profile: str = ""


@dataclass(frozen=True)
class Settings:
    """The `[game]` section, as the core needs it."""

    delivery: str = "phrases"
    multi_character: str = "whole"
    multi_window_s: float = 120.0
    voice: bool = True
    first_phrase_timeout_s: float = 30.0
    load_s: float = 0.2
    stall_s: float = 90.0
    """A reply that has not moved on for this long is dropped: nothing came from the daemon (past llm's
    first-token timeout, 60 s by default, so a slow model is not taken for a lost reply), or no poll
    of its character came to take its phrases (the game turned elsewhere)."""
    file_ttl_s: float = 300.0
    tags: frozenset[str] = frozenset({"e", "c", "a", "m", "f", "v", "music", "hint", "clothes", "interaction"})
    event_label: str = ""
    characters: Mapping[str, Character] = field(default_factory=dict)
    mod: ModSettings = field(default_factory=ModSettings)

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> Settings:
        characters = {name.casefold(): Character(persona=table.get("persona") or name, voice=table.get("voice", ""),
                                      profile=table.get("profile", ""))
                      for name, table in section.get("characters", {}).items()}
        return cls(delivery=section["delivery"], multi_character=section["multi_character"],
                   multi_window_s=float(section["multi_window_s"]), voice=bool(section["voice"]),
                   first_phrase_timeout_s=float(section["first_phrase_timeout_s"]),
                   load_s=section["load_ms"] / 1000, file_ttl_s=float(section["file_ttl_s"]),
                   tags=frozenset(section["tags"]), event_label=section["event_label"], characters=characters,
                   mod=ModSettings.from_config(section))

    def character(self, name: str) -> Character:
        """Its [game.characters.<Name>] table, the name in any case (environment variables lowercase it).
        A character with none gets its built-in persona; one the link does not know (a newer mod's, or
        the mod's `None`), the configured default persona, rather than no reply at all."""
        return self.characters.get(name.casefold()) or Character(persona=name if name in CHARACTERS else "")

    @property
    def headings(self) -> tuple[str, ...]:
        return HEADINGS["RU" if self.mod.language.upper() == "RU" else "EN"]


def game_text(text: str, marks: tuple[Mark, ...], tags: frozenset[str]) -> str:
    """A chunk's words with its allowed tags back where they stood (`<e>smile</e>Привет`): the mod
    applies each tag on the part of the line that carries it. Other tags stay out of the game's text
    (history still records them as commands), and so does a body that could break the mod's markup."""
    allowed = [mark for mark in marks if mark.tag in tags and len(mark.body) <= SAFE_TAG_BODY
               and not any(char in "<>" or ord(char) < 32 for char in mark.body)]
    for mark in sorted(allowed, key=lambda one: one.offset, reverse=True):
        at = min(max(mark.offset, 0), len(text))
        text = f"{text[:at]}<{mark.tag}>{mark.body}</{mark.tag}>{text[at:]}"
    return text


def state_lines(settings: Settings, request: ARequest | BAction) -> list[str]:
    """The game's state that came with a request, as lines of `request.system` in the game's language."""
    heading, distance, rooms, near, state, _, _ = settings.headings
    lines = []
    if request.distance is not None:
        lines.append("- " + distance.format(f"{request.distance:.2f}"))
    if request.room_player != "Unknown" or request.room_character != "Unknown":
        lines.append("- " + rooms.format(request.room_player, request.room_character))
    if request.hierarchy:
        lines += ["- " + near, *request.hierarchy]
    if request.current_info:
        lines += ["- " + state, *request.current_info]
    return [heading, *lines] if lines else []


# --- state -------------------------------------------------------------------------------------

@dataclass
class Phrase:
    index: int
    text: str
    """The text for the mod: the chunk's words with its allowed tags back in place, inline."""
    chars: int
    final: bool
    pieces: list[tuple[bytes, AudioFormat]] = field(default_factory=list)
    audio_ts: float = 0.0
    wav: str = ""
    """Its voice file as the game sees it (game.path_style)."""
    file: str = ""
    """The same file on this machine."""
    duration: float = 0.0
    ready: bool = False
    start: float = 0.0
    end: float = 0.0
    """When its audio is estimated to start and end in the game, once delivered."""

    @property
    def empty(self) -> bool:
        """Nothing to show: the mod would show an empty line (the reply's last chunk often is)."""
        return not self.text.strip()


@dataclass
class Reply:
    session: str
    id: str
    character: str
    mod_id: int
    """The mod request that asked it; whole mode's voice goes under the id its text went under."""
    whole: bool
    voiced: bool
    held: int | None
    asked_at: float
    phrases: dict[int, Phrase] = field(default_factory=dict)
    next: int = 0
    """The chunk index of the next phrase to deliver."""
    last_text_end: float = 0.0
    last_end: float = 0.0
    """The delivered phrases' estimated timeline in the game (§2.4): text end, audio end."""
    starting: list[Phrase] = field(default_factory=list)
    """Delivered phrases whose `started` report is still due (at their estimated start in the game)."""
    finishing: list[Phrase] = field(default_factory=list)
    """Delivered phrases whose `finished` playback report is still due."""
    reported_final: bool = False
    touched: float = 0.0
    """When it last moved on (a chunk, audio, a written file, a phrase handed over): one that has not
    for `Settings.stall_s` is dropped as stalled (a tts restart lost a chunk's end, or the game stopped
    polling its character), so its files go and history hears of it."""
    whole_wav: str = ""
    whole_file: str = ""
    whole_duration: float = 0.0
    text_sent: bool = False

    @property
    def due(self) -> float:
        """When the next phrase should start in the game: the previous one's audio is ending (less the
        fade-in that masks an overlap, F4) and its text is gone. Sent sooner, the mod would start it
        when the text ends (V11), over the voice, and a barge-in could not take it back."""
        return max(self.last_end - FADE_S, self.last_text_end)

    @property
    def final_index(self) -> int | None:
        """The index of the reply's last chunk, once it came: every chunk is in then (the chunker sends
        a final chunk, maybe empty, for every reply that ends, failed ones too)."""
        return next((phrase.index for phrase in self.phrases.values() if phrase.final), None)

    @property
    def text(self) -> str:
        return " ".join(phrase.text for _, phrase in sorted(self.phrases.items()) if not phrase.empty)

    @property
    def exhausted(self) -> bool:
        """Everything of it has been handed to the mod (or there was nothing to hand)."""
        final = self.final_index
        if final is None:
            return False
        if self.whole:
            return self.text_sent and (not self.voiced or self.next > final or not self.text)
        return self.next > final

    @property
    def waiting(self) -> bool:
        """It needs something from the bus to go on: its final chunk, or the next phrase's audio."""
        phrase = self.phrases.get(self.next)
        return self.final_index is None or (phrase is not None and not phrase.ready) or (
            self.whole and self.voiced and bool(self.text) and not self.whole_wav)

    def skip_empty(self) -> None:
        while (phrase := self.phrases.get(self.next)) is not None and phrase.ready and phrase.empty:
            self.next += 1


@dataclass
class Scene:
    """What the link keeps per character between requests."""

    state: list[str] = field(default_factory=list)
    infos: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    reply: Reply | None = None


class Link:
    """The state of one game link. Every method takes the time and returns the effects to carry out."""

    def __init__(self, settings: Settings, id_prefix: str) -> None:
        self.settings = settings
        self.id_prefix = id_prefix
        self.sequence = 0
        self.scenes: dict[str, Scene] = {}
        self.replies: dict[tuple[str, str], Reply] = {}
        self.last_mod_id = -1
        self.speakers: dict[str, float] = {}
        """Character -> when it last got a request that was not a poll (multi-character detection)."""
        self.expiring = Expiring()
        self.counters: collections.Counter[str] = collections.Counter()

    # --- from the mod ---------------------------------------------------------------------------

    def request(self, conn: int, request: ARequest, now: float) -> list[Effect]:
        """A dialect-A request. A poll is answered at once; player text or an event that starts a
        reply holds `conn` until its first phrase (or the reply's end, or the timeout)."""
        effects: list[Effect] = []
        if request.id < self.last_mod_id:  # the mod's counter starts again with the game (A6)
            effects += self._reset("the game was restarted (its request ids started again)", now)
        self.last_mod_id = request.id
        self.counters["requests"] += 1
        scene = self.scenes.setdefault(request.character, Scene())
        scene.state = state_lines(self.settings, request)
        scene.infos = [*scene.infos, *request.infos][-NOTES_KEPT:]
        if request.kind == "player":
            if self.replies:
                self.counters["barge_ins"] += 1
                for reply in list(self.replies.values()):
                    effects += self._drop(reply, "barge-in: the player spoke in the game", now)
            scene.infos, scene.events = [*scene.infos, *scene.events][-NOTES_KEPT:], []  # waiting events: notes now
            return effects + self._ask(scene, request.character, request.player_text, request.id, conn, now)
        if request.kind == "event":
            for reply in [one for one in self.replies.values() if one.character != request.character
                          and not one.exhausted]:  # the mod now speaks as another character (A24)
                effects += self._drop(reply, f"the game turned to {request.character}", now)
            self.counters["events"] += 1
            scene.events = [*scene.events, *request.events][-NOTES_KEPT:]
            if scene.reply is None:
                return effects + self._ask(scene, request.character, self._event_text(scene), request.id, conn, now)
        else:
            self.counters["polls"] += 1
        return effects + self._answer_poll(conn, request, scene, now)

    def refuse(self, conn: int, mod_id: int) -> list[Effect]:
        """A complete but malformed request: a well-typed empty answer, so the mod shows nothing odd."""
        self.counters["malformed"] += 1
        return [Answer(conn, build_a(self._reply(mod_id, ""), self.settings.mod))]

    def closed(self, conn: int) -> list[Effect]:
        """The mod's connection went away while held: the reply goes on, delivered in polls."""
        for reply in self.replies.values():
            if reply.held == conn:
                reply.held = None
        return []

    # --- from the bus ---------------------------------------------------------------------------

    def chunk(self, session: str, id: str, chunk: Chunk, now: float) -> list[Effect]:
        reply = self.replies.get((session, id))
        if reply is None:
            return []
        phrase = Phrase(index=chunk.index, text=game_text(chunk.text, chunk.marks, self.settings.tags),
                        chars=len(chunk.text), final=chunk.final)
        previous = reply.phrases.get(chunk.index - 1)
        if chunk.final and not chunk.text.strip() and previous is not None and previous.index >= reply.next \
                and not reply.whole:  # tags only at the end: they go with the last words, not as a line of their own
            previous.text, phrase.text = previous.text + phrase.text, ""
        reply.phrases[chunk.index] = phrase
        reply.touched = now
        if not reply.voiced or phrase.empty:  # nothing to wait for: shown for its text time, or skipped
            phrase.ready, phrase.duration = True, text_seconds(phrase.text)
        return self._progress(reply, now)

    def audio(self, session: str, id: str, index: int, pcm: bytes, form: AudioFormat, last: bool, ts: float,
              now: float) -> list[Effect]:
        """A frame of a chunk's audio: at the chunk's `last` frame, its WAV is made (whole mode: one
        WAV of every chunk, at the final chunk's last frame)."""
        reply = self.replies.get((session, id))
        phrase = reply.phrases.get(index) if reply is not None else None
        if reply is None or phrase is None or not reply.voiced:
            return []
        phrase.audio_ts = phrase.audio_ts or ts
        reply.touched = now
        if pcm:
            phrase.pieces.append((pcm, form))
        if not last:
            return []
        if not reply.whole:
            pieces, phrase.pieces = tuple(phrase.pieces), []
            return [] if phrase.empty else [MakeWav(session, id, index, pieces)]
        if not phrase.final:
            return []
        everything = tuple(piece for _, one in sorted(reply.phrases.items()) for piece in one.pieces)
        for one in reply.phrases.values():
            one.pieces = []
        return [MakeWav(session, id, -1, everything)] if reply.text else []

    def wav_ready(self, session: str, id: str, index: int, file: str, shown: str, duration: float,
                  now: float) -> list[Effect]:
        """The shell wrote the WAV of a `MakeWav` (index -1: the whole reply's) to `file`, which the game
        sees as `shown`."""
        reply = self.replies.get((session, id))
        if reply is None:  # cancelled meanwhile
            return [Delete(file)]
        reply.touched = now
        if index < 0:
            reply.whole_wav, reply.whole_file, reply.whole_duration = shown, file, duration
        elif (phrase := reply.phrases.get(index)) is not None:
            phrase.wav, phrase.file, phrase.duration, phrase.ready = shown, file, duration, True
        return self._progress(reply, now)

    def done(self, session: str, id: str, done: LlmDone, now: float) -> list[Effect]:
        """llm.done: a failure is logged (the reply's end is its final chunk, which follows); an
        interruption from elsewhere (`voxpipe chat` on the same session, a restart) ends it here."""
        reply = self.replies.get((session, id))
        if reply is None:
            return []
        if done.status == "interrupted":
            return self._drop(reply, "", now)
        if done.status == "error":
            return [Log(logging.WARNING, f"{reply.character}: the reply failed: {done.error}")]
        return []

    def cancelled(self, session: str, id: str, now: float) -> list[Effect]:
        """A `cancel` on the bus (ours come back too, and find nothing): the chunks and audio of the
        reply will not come, so it ends here."""
        return [effect for key, reply in list(self.replies.items()) if cancels(key, session, id)
                for effect in self._drop(reply, "", now)]

    def wav_failed(self, session: str, id: str, why: str, now: float) -> list[Effect]:
        """The shell could not write a voice file (a full disk): without it the mod would wait for the
        voice (V5), so the reply ends."""
        reply = self.replies.get((session, id))
        if reply is None:
            return []
        return [Log(logging.ERROR, f"{reply.character}: cannot write a voice file ({why}); the reply is dropped"),
                *self._drop(reply, f"the game link cannot write a voice file: {why}", now)]

    # --- time -----------------------------------------------------------------------------------

    def tick(self, now: float) -> list[Effect]:
        """Timeouts, `finished` playback estimates, retiring replies, and files the mod did not load."""
        effects: list[Effect] = []
        for reply in list(self.replies.values()):
            if reply.held is not None and now - reply.asked_at >= self.settings.first_phrase_timeout_s:
                effects.append(Log(logging.WARNING, f"{reply.character}: nothing to say within "
                                   f"{self.settings.first_phrase_timeout_s:g} s; the reply goes on in the next polls"))
                effects += self._release(reply, "")
            if not reply.exhausted and now - reply.touched >= self.settings.stall_s:
                waited = "the daemon" if reply.waiting else "the game's polls"
                effects.append(Log(logging.WARNING, f"{reply.character}: the reply stalled (nothing from {waited} "
                                   f"for {self.settings.stall_s:g} s); dropped"))
                effects += self._drop(reply, "the game link saw the reply stall", now)
                continue
            effects += self._finished_reports(reply, now)
            effects += self._retire(reply, now)
        return effects + self.expiring.due(now)

    def stop(self) -> list[Effect]:
        """The link is stopping: answer what is held, cancel the replies, delete every file."""
        effects: list[Effect] = []
        for reply in list(self.replies.values()):
            effects += self._drop(reply, "voxpipe game is stopping", None)
        return effects + self.expiring.all()

    # --- asking ---------------------------------------------------------------------------------

    def _ask(self, scene: Scene, character: str, text: str, mod_id: int, conn: int | None,
             now: float) -> list[Effect]:
        self.speakers[character] = now
        settings = self.settings.character(character)
        self.sequence += 1
        id = f"{self.id_prefix}{self.sequence:06d}"
        session = SESSION_PREFIX + character
        system = self._system(scene)
        scene.infos, scene.events = [], []
        reply = Reply(session=session, id=id, character=character, mod_id=mod_id, whole=self._whole(character, system),
                      voiced=self.settings.voice, held=conn, asked_at=now, touched=now)
        scene.reply = self.replies[(session, id)] = reply
        self.counters["asked"] += 1
        return [Publish(session, id, Request(text=text[:TEXT_CHARS], persona=settings.persona, voice=settings.voice,
                                             profile=settings.profile, system=system, playback="client"))]

    def _whole(self, character: str, context: str) -> bool:
        """Whole-reply delivery: configured, for the GameMaster, or (multi_character = "whole") in a
        scene where several characters talk, where every line is passed on to the others (V13)."""
        if self.settings.delivery == "whole" or character == "GameMaster":
            return True
        if self.settings.multi_character != "whole":
            return False
        since = self.speakers[character] - self.settings.multi_window_s
        talking = {name for name, at in self.speakers.items() if at >= since and name != "GameMaster"}
        return len(talking) > 1 or MULTI_MARKER in context

    def _event_text(self, scene: Scene) -> str:
        """The user turn for game events: every provider needs one, and history shows what the
        character reacted to."""
        return "\n".join((self.settings.event_label or self.settings.headings[6], *scene.events))

    def _system(self, scene: Scene) -> str:
        """`request.system`: the latest request's game state and the notes since the last reply."""
        notes = [self.settings.headings[5], *scene.infos] if scene.infos else []
        return "\n".join((*scene.state, *notes))[:SYSTEM_CHARS]

    # --- delivering -----------------------------------------------------------------------------

    def _reply(self, mod_id: int, character: str, response: str = "", id_sound: int | None = None,
               wav: str = "") -> AReply:
        return AReply(id=mod_id, character=character, silero=self.settings.voice, response=response,
                      id_sound=mod_id if id_sound is None else id_sound, wav_path=wav)

    def _progress(self, reply: Reply, now: float) -> list[Effect]:
        """After anything that may have made the held answer possible."""
        if reply.held is None:
            return self._retire(reply, now)
        if reply.whole:
            if reply.final_index is None:
                return []
            reply.text_sent = True
            return self._release(reply, reply.text) + self._retire(reply, now)
        reply.skip_empty()
        phrase = reply.phrases.get(reply.next)
        if phrase is not None and phrase.ready:
            conn, reply.held = reply.held, None
            return self._deliver(conn, reply.mod_id, reply, phrase, now) + self._retire(reply, now)
        if reply.exhausted:  # nothing to say (an empty or failed reply)
            return self._release(reply, "") + self._retire(reply, now)
        return []

    def _release(self, reply: Reply, response: str) -> list[Effect]:
        conn, reply.held = reply.held, None
        if conn is None:
            return []
        return [Answer(conn, build_a(self._reply(reply.mod_id, reply.character, response), self.settings.mod))]

    def _answer_poll(self, conn: int, request: ARequest, scene: Scene, now: float) -> list[Effect]:
        reply = scene.reply
        effects: list[Effect] = []
        if reply is not None and reply.held is None:
            effects += self._finished_reports(reply, now)
            if reply.whole:
                effects += self._deliver_whole(conn, request.id, reply, now)
            else:
                reply.skip_empty()
                phrase = reply.phrases.get(reply.next)
                if phrase is not None and phrase.ready and now + self.settings.load_s >= reply.due:
                    effects += self._deliver(conn, request.id, reply, phrase, now)
        if not any(isinstance(effect, Answer) for effect in effects):
            effects.append(Answer(conn, build_a(self._reply(request.id, request.character), self.settings.mod)))
        return effects + (self._retire(reply, now) if reply is not None else [])

    def _deliver(self, conn: int, mod_id: int, reply: Reply, phrase: Phrase, now: float) -> list[Effect]:
        """Hand a phrase to the mod with its voice under the answer's own id (V5, V7), and place it on
        the estimated timeline: it starts once the mod noticed and loaded it (load_s), not before the
        previous line's text is done (V4)."""
        reply.next, reply.touched = phrase.index + 1, now
        start = max(now + self.settings.load_s, reply.last_text_end)
        reply.last_text_end = start + text_seconds(phrase.text)
        phrase.start, reply.last_end = start, start + phrase.duration
        phrase.end = reply.last_end
        reply.starting.append(phrase)
        reply.finishing.append(phrase)
        if phrase.file:
            self.expiring.add(phrase.file, now + self.settings.file_ttl_s)
        self.counters["phrases"] += 1
        answer = build_a(self._reply(mod_id, reply.character, phrase.text, wav=phrase.wav), self.settings.mod)
        return [Answer(conn, answer)]

    def _deliver_whole(self, conn: int, mod_id: int, reply: Reply, now: float) -> list[Effect]:
        """Whole mode in a poll: the text, if no held answer carried it, then the one voice file under
        the text's id, where the mod's line waits for it (V5); both at once when both are ready."""
        final = reply.final_index
        if final is None:
            return []
        voice_due = reply.voiced and reply.whole_wav != "" and reply.next <= final
        if reply.text_sent and not voice_due:
            return []
        text = "" if reply.text_sent else reply.text
        if not reply.text_sent:
            reply.text_sent, reply.mod_id = True, mod_id
        if not voice_due:
            return [Answer(conn, build_a(self._reply(mod_id, reply.character, text), self.settings.mod))]
        reply.next = final + 1
        reply.last_end = now + self.settings.load_s + reply.whole_duration
        for _, phrase in sorted(reply.phrases.items()):
            phrase.start, phrase.end = now + self.settings.load_s, reply.last_end
            reply.finishing.append(phrase)
        reply.starting.append(reply.phrases[min(reply.phrases)])
        self.expiring.add(reply.whole_file, now + self.settings.file_ttl_s)
        self.counters["whole_replies"] += 1
        answer = build_a(self._reply(mod_id, reply.character, text, id_sound=reply.mod_id, wav=reply.whole_wav),
                         self.settings.mod)
        return [Answer(conn, answer)]

    def _finished_reports(self, reply: Reply, now: float) -> list[Effect]:
        """The playback reports due by `now`, as the daemon's player would send them: `started` at a
        phrase's estimated start in the game, `finished` at its estimated end."""
        effects: list[Effect] = []
        while reply.starting and now >= reply.starting[0].start:
            effects.append(self._started(reply, reply.starting.pop(0)))
        while reply.finishing and now >= reply.finishing[0].end:
            phrase = reply.finishing.pop(0)
            reply.reported_final = reply.reported_final or phrase.final
            effects.append(Publish(reply.session, reply.id, Playback(
                event="finished", chunk=phrase.index, final=phrase.final, heard=1.0, heard_chars=phrase.chars)))
        return effects

    @staticmethod
    def _started(reply: Reply, phrase: Phrase) -> Publish:
        return Publish(reply.session, reply.id, Playback(event="started", chunk=phrase.index, audio_ts=phrase.audio_ts))

    def _retire(self, reply: Reply, now: float) -> list[Effect]:
        """Forget a reply that has nothing more to give and whose last phrase has sounded; game events
        that came meanwhile then become the next request, answered in polls."""
        if (reply.session, reply.id) not in self.replies or not reply.exhausted or reply.held is not None:
            return []
        effects = self._finished_reports(reply, now)
        if reply.finishing:
            return effects
        if not reply.reported_final:  # the final chunk was empty, so never delivered: its report is still owed
            final = reply.final_index or 0  # not None: an exhausted reply's final chunk came
            effects.append(Publish(reply.session, reply.id, Playback(event="finished", chunk=final, final=True,
                                                                      heard=1.0)))
        del self.replies[(reply.session, reply.id)]
        scene = self.scenes.get(reply.character)
        if scene is not None and scene.reply is reply:
            scene.reply = None
            if scene.events:
                effects += self._ask(scene, reply.character, self._event_text(scene), self.last_mod_id, None, now)
        return effects

    # --- dropping -------------------------------------------------------------------------------

    def _reset(self, why: str, now: float) -> list[Effect]:
        effects: list[Effect] = [Log(logging.INFO, why)]
        for reply in list(self.replies.values()):
            effects += self._drop(reply, why, now)
        self.scenes.clear()
        self.speakers.clear()
        return effects

    def _drop(self, reply: Reply, why: str, now: float | None) -> list[Effect]:
        """End a reply (and cancel it on the bus, with `why`): its undelivered files go, a held answer is
        released empty, and history hears where the sound stopped (an estimate: the mod reports nothing)."""
        effects: list[Effect] = [Publish(reply.session, reply.id, Cancel(reason=why))] if why else []
        effects += self._release(reply, "")
        effects += [Delete(phrase.file) for phrase in reply.phrases.values()
                    if phrase.index >= reply.next and phrase.file]
        if reply.whole_file and reply.whole_file not in self.expiring:
            effects.append(Delete(reply.whole_file))
        effects += [self._started(reply, phrase) for phrase in reply.starting]  # handed over: the mod plays them
        reply.starting.clear()
        if now is not None:
            effects += self._finished_reports(reply, now)
        if reply.finishing:
            phrase = reply.finishing[0]
            heard = 0.0
            if now is not None and phrase.duration > 0:
                heard = min(max(1 - (phrase.end - now) / phrase.duration, 0.0), 1.0)
            effects.append(Publish(reply.session, reply.id, Playback(
                event="stopped", chunk=phrase.index, final=True, heard=heard, heard_chars=int(phrase.chars * heard))))
        elif reply.next > 0 and not reply.reported_final:
            effects.append(Publish(reply.session, reply.id, Playback(event="stopped", chunk=reply.next - 1,
                                                                      final=True, heard=1.0)))
        del self.replies[(reply.session, reply.id)]
        scene = self.scenes.get(reply.character)
        if scene is not None and scene.reply is reply:
            scene.reply = None
        return effects
