"""The MiSide mod test double (tests/fakes/miside_mod.py), against a tiny server that answers like the
NeuroMita app: every key on every reply, json.dumps, one send, close (design R9).

The link's tests trust the double to behave like the game, so the double's own rules are checked here,
each against the fact of docs/design/game-link.md it comes from.  Timing bounds are generous: the
double runs on real sleeps, and the bench measures timing.
"""

from __future__ import annotations

import itertools
import json
import math
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.miside_mod import (
    IDLE_EVENT,
    TOO_LONG,
    ModDouble,
    ShownLine,
    dotnet_json_string,
    voice_level,
    wav_header_problem,
    wine_path,
)
from voxpipe.frontends.game.wav import to_game_wav
from voxpipe.stages.audio import AudioFormat

pytestmark = pytest.mark.integration
"""No process starts here, but the double runs on real sleeps (about 20 s in all): kept out of the
in-seconds unit set."""

FAST_POLL_S = 0.1
"""A quicker poll loop for the tests whose subject is not the poll timing (the mod's is 0.35 s, A26)."""
Answer = Callable[[dict[str, Any]], "dict[str, Any] | bytes | None"]
"""A script: the request → the keys to change in the app's reply, raw bytes to send instead, or None
to close without a reply."""


def app_reply(request: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """The NeuroMita app's reply (HEAD:server.py:168-199, defaults R8): every key, typed, a constant silero."""
    return {"id": request["id"], "type": "answer", "character": request["character"], "response": "",
            "silero": True, "id_sound": request["id"], "patch_to_sound_file": "", "user_input": "",
            "GM_ON": False, "GM_READ": False, "GM_VOICE": False, "GM_REPEAT": 2, "CC_Limit_mod": 100,
            "LANGUAGE": "RU", "MITAS_MENU": False, "EMOTION_MENU": False, "TEXT_WAIT_TIME": 40,
            "VOICE_WAIT_TIME": 40, "instant_send": False, **changes}


class AppServer:
    """Reads one JSON object per connection, answers per `answer`, closes (R9).  `raw` keeps the bytes each
    request arrived as, to show the mod sends no newline and no shutdown (A5)."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.raw: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
                try:
                    request = json.loads(data)
                    break
                except ValueError:
                    continue
            self.raw.append(data)
            answer = self.answer(request)
            if answer is not None:
                try:
                    data = answer if isinstance(answer, bytes) else json.dumps(app_reply(request, **answer)).encode()
                    conn.sendall(data)
                except OSError:
                    pass  # the mod gave up on this exchange (its text timeout) or stopped

    def close(self) -> None:
        self.listener.close()


@contextmanager
def game(answer: Answer, **options: Any) -> Iterator[tuple[AppServer, ModDouble]]:
    server = AppServer(answer)
    mod = ModDouble(server.port, **options)
    try:
        with mod:
            yield server, mod
    finally:
        server.close()


def voice_file(folder: Path, name: str, seconds: float, amplitude: int = 8000, pin: bool = True) -> Path:
    """A game WAV (44.1 kHz stereo, the link's own writer) of a square wave."""
    frames = int(44100 * seconds)
    pcm = b"".join(struct.pack("<h", amplitude if (i // 50) % 2 else -amplitude) for i in range(frames))
    path = folder / name
    path.write_bytes(to_game_wav([(pcm, AudioFormat(44100, 1, 2))], pin=pin))
    return path


def as_wine(path: Path) -> str:
    return "Z:" + str(path).replace("/", "\\")


def finished(mod: ModDouble) -> list[ShownLine]:
    """The lines whose text is done."""
    return [line for line in mod.lines() if line.text_end]


def polls(answer: dict[str, Any] | None = None) -> Answer:
    return lambda request: answer or {}


# --- the pure parts


def test_strings_are_escaped_as_system_text_json_does() -> None:
    """A15: non-ASCII and the HTML-sensitive characters as uppercase \\uXXXX, the usual short escapes."""
    assert dotnet_json_string("Привет <b>&'+\"`\n\\ 😀") == (
        '"\\u041F\\u0440\\u0438\\u0432\\u0435\\u0442 \\u003Cb\\u003E\\u0026\\u0027\\u002B\\u0022\\u0060\\n\\\\ '
        '\\uD83D\\uDE00"')
    assert json.loads(dotnet_json_string("Привет <b>&'+\"`\n\\ 😀")) == "Привет <b>&'+\"`\n\\ 😀"


def test_wine_paths_and_wav_checks(tmp_path: Path) -> None:
    assert wine_path("Z:\\home\\u\\a.wav", Path("/")) == Path("/home/u/a.wav")
    assert wine_path("z:\\tmp\\a.wav", tmp_path) == tmp_path / "tmp" / "a.wav"
    assert wine_path("/tmp/a.wav", Path("/")) == Path("/tmp/a.wav")
    good = voice_file(tmp_path, "a.wav", 0.1).read_bytes()
    assert wav_header_problem(good) == ""
    assert "not" in wav_header_problem(good[:40] + struct.pack("<I", 4) + good[44:])
    assert wav_header_problem(b"RIFF") != ""


def test_loudness_follows_the_header_words_unless_pinned(tmp_path: Path) -> None:
    """F3/F9: the peak is taken over every int16 word, the header's included ("fm" = 28006), so a quiet
    file is scaled by its own odd factor; the link's pin (+32767, design §2.8) makes the factor ≈ 1."""
    pinned = voice_level(voice_file(tmp_path, "p.wav", 0.5, amplitude=3000).read_bytes())
    assert pinned.gain == pytest.approx(32768 / 32767)
    assert pinned.level_dbfs == pytest.approx(20 * math.log10(3000 / 32768), abs=0.5)
    quiet = voice_level(voice_file(tmp_path, "q.wav", 0.5, amplitude=3000, pin=False).read_bytes())
    assert quiet.gain == pytest.approx(32768 / 28006)  # the header's "fm" is the peak
    assert quiet.level_dbfs > pinned.level_dbfs + 1


# --- over sockets


def test_polls_are_well_formed_single_flight_and_paced() -> None:
    """A4-A7, A9-A12, A25: the request's fields and order; A26/A27: one at a time, ~0.45-0.5 s apart;
    A28: a prompt app shows no "..."; R4: menus off when the app says so."""
    with game(polls()) as (server, mod):
        mod.wait_for(lambda: len(mod.replies()) >= 3, timeout=5)
    requests = mod.requests()
    assert [request.id for request in requests] == list(range(len(requests)))
    first = requests[0].fields
    assert list(first) == ["id", "type", "character", "input", "dataToSentSystem", "systemInfo", "distance",
                           "roomPlayer", "roomMita", "hierarchy", "currentInfo", "dialog_active"]
    assert first == {"id": 0, "type": "chat", "character": "Crazy", "input": "waiting", "dataToSentSystem": "-",
                     "systemInfo": "-", "distance": "0,00", "roomPlayer": -1, "roomMita": -1, "hierarchy": "-",
                     "currentInfo": "-", "dialog_active": False}
    assert server.raw[0] == requests[0].raw and not server.raw[0].endswith(b"\n")
    starts = [request.sent_at for request in requests[:3]]
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    assert all(0.44 <= gap < 1.5 for gap in gaps), gaps
    replies = mod.replies()
    assert all(reply.noticed_at and reply.received_at and 0 <= reply.noticed_at - reply.received_at <= 0.3
               for reply in replies)
    assert mod.log.dots == 0 and mod.log.failures() == [] and mod.silero
    assert mod.log.settings["MITAS_MENU"] is False and mod.log.settings["TEXT_WAIT_TIME"] == 40


def test_a_player_line_plays_its_voice_file(tmp_path: Path) -> None:
    """A17/A12: the typed line and the game state go out; R7/V2/V5: the voice found at once by the reply id;
    F1-F7: all bytes read, deleted after 100 ms, then played for len/4/44100 s; V10/V11: the text ends
    before a longer voice; A12: polls repeat the state of the last request that waited."""
    voice = voice_file(tmp_path, "line.wav", 2.0)
    size = voice.stat().st_size

    def answer(request: dict[str, Any]) -> dict[str, Any]:
        if request["input"] == "waiting":
            return {}
        return {"response": "<e>smile</e>Привет! Как дела?", "patch_to_sound_file": as_wine(voice)}

    with game(answer) as (_, mod):
        mod.set_state(distance=3.27, room_player=1, room_mita=0, hierarchy="Стол", current_info="-Стоит\n")
        assert mod.say("Привет <Мита> & 'ты'+")
        line = mod.wait_for(lambda: mod.voiced_lines(), timeout=5)[0]
        mod.set_state(distance=9.0)
        mod.wait_for(lambda: line.text_end, timeout=5)
        polled = mod.wait_for(lambda: [r for r in mod.requests() if r.kind == "poll" and r.id > line.id], timeout=5)
    spoken = next(request for request in mod.requests() if request.kind == "player")
    assert spoken.fields["input"] == "Привет <Мита> & 'ты'+\n"
    assert b"\\u041F" in spoken.raw and b"\\u003C" in spoken.raw and b"\\u002B" in spoken.raw
    assert (spoken.fields["distance"], spoken.fields["roomPlayer"], spoken.fields["roomMita"]) == ("3,27", 1, 0)
    assert (spoken.fields["hierarchy"], spoken.fields["currentInfo"]) == ("Стол", "-Стоит\n")
    assert (polled[0].fields["distance"], polled[0].fields["currentInfo"]) == ("3,27", "-")
    assert line.id == spoken.id and line.character == "Crazy" and line.stars == 0
    assert line.parts == ["<e>smile</e>Привет! Как дела?"]
    assert line.wav_bytes == size and line.audio_s == pytest.approx((size) / 4 / 44100)
    assert not voice.exists() and line.header_problem == "" and line.gain == pytest.approx(32768 / 32767)
    reply = next(reply for reply in mod.replies() if reply.request_id == spoken.id)
    assert reply.noticed_at is not None and line.audio_start is not None and line.audio_end is not None
    assert line.audio_start - reply.noticed_at >= 0.1  # F7: the load blocks past the delete
    assert line.text_end is not None and line.text_end < line.audio_end  # V11: 1.05 s of text, 2 s of voice
    assert not line.blips and mod.log.failures() == []


def test_a_voice_from_a_later_poll_is_waited_for_with_stars(tmp_path: Path) -> None:
    """V5: the line waits, "***" every 0.75 s, until a later reply stores its path under its id (the app's
    whole-reply way); V7: a second path for an id already taken is never played."""
    voice, again = voice_file(tmp_path, "late.wav", 0.3), voice_file(tmp_path, "again.wav", 0.3)
    asked: list[int] = []

    def answer(request: dict[str, Any]) -> dict[str, Any]:
        if request["input"] != "waiting":
            asked.append(request["id"])
            return {"response": "Раз."}
        if asked and request["id"] == asked[0] + 5:  # 1 s or more later: a star shows at 0.8 s
            return {"id_sound": asked[0], "patch_to_sound_file": as_wine(voice)}
        if asked and request["id"] == asked[0] + 6:
            return {"id_sound": asked[0], "patch_to_sound_file": as_wine(again)}
        return {}

    with game(answer, poll_s=FAST_POLL_S) as (_, mod):
        mod.say("Ну?")
        line = mod.wait_for(lambda: mod.voiced_lines(), timeout=6)[0]
        mod.wait_for(lambda: len(mod.replies()) > asked[0] + 7, timeout=6)
    assert line.stars >= 1 and mod.log.stars == line.stars
    assert line.wav_file == voice and not voice.exists()
    assert again.exists() and len(mod.voiced_lines()) == 1


def test_a_silero_false_reply_cancels_the_voice_wait() -> None:
    """V1/V6: every reply sets the global silero; a poll answering false ends the wait of a line whose
    voice has not come, so it shows without a voice, with the text blips (V8)."""
    asked: list[int] = []

    def answer(request: dict[str, Any]) -> dict[str, Any]:
        if request["input"] != "waiting":
            asked.append(request["id"])
            return {"response": "Молчу."}
        return {"silero": not asked}

    with game(answer, poll_s=FAST_POLL_S) as (_, mod):
        mod.say("Скажи")
        line = mod.wait_for(lambda: finished(mod), timeout=5)[0]
    assert line.audio_start is None and line.blips and not mod.silero


def test_cooldown_loses_text_and_a_duplicate_is_dropped() -> None:
    """A18/A19: text typed within 2 s of the last send is cleared and never sent; A20: a text equal to the
    previous one is dropped and that exchange skipped."""
    with game(polls()) as (_, mod):
        mod.say("раз")
        first = mod.wait_for(lambda: [r for r in mod.requests() if r.kind == "player"], timeout=3)[0]
        mod.say("два")
        mod.wait_for(lambda: mod.log.lost, timeout=3)
        mod.wait_for(lambda: time.monotonic() - first.sent_at > 2.1, timeout=3)
        mod.say("раз")
        mod.wait_for(lambda: mod.log.duplicates, timeout=3)
        mod.say("три")
        mod.wait_for(lambda: len([r for r in mod.requests() if r.kind == "player"]) == 2, timeout=3)
    sent = [request.fields["input"] for request in mod.requests() if request.kind == "player"]
    assert sent == ["раз\n", "три\n"]
    assert mod.log.lost == ["два\n"] and mod.log.duplicates == ["раз\n"]
    assert mod.log.blocked == []


def test_events_infos_character_and_idle() -> None:
    """A21: events as "-" + line + "\\n"; A13: infos ride on any exchange, a poll too; A24: the character
    switch before sending; A22: the idle event, exact and without "-", after the cooldown (A18)."""
    with game(polls()) as (_, mod):
        mod.event("Игрок вошёл")
        mod.event("Свет погас")
        mod.info("Дождь")
        event = mod.wait_for(lambda: [r for r in mod.requests() if r.kind == "event"], timeout=3)[0]
        mod.set_character("Cappy")
        mod.info("Гром", character="Cappy")
        mod.idle()
        idle = mod.wait_for(lambda: [r for r in mod.requests() if r.kind == "idle"], timeout=4)[0]
    assert event.fields["dataToSentSystem"] == "-Игрок вошёл\nСвет погас\n"
    assert event.fields["systemInfo"] == "-Дождь\n" and event.fields["currentInfo"] == "-"
    polls_after = [r for r in mod.requests() if event.id < r.id < idle.id]
    assert polls_after[0].fields["systemInfo"] == "-Гром\n" and polls_after[0].fields["character"] == "Cappy"
    assert all(r.fields["input"] == "waiting" and r.fields["dataToSentSystem"] == "-" for r in polls_after)
    assert idle.fields["dataToSentSystem"] == IDLE_EVENT and idle.sent_at - event.sent_at > 2.0
    with pytest.raises(ValueError, match="characterType"):
        mod.set_character("Mita")


def test_a_slow_reply_shows_dots_then_runs_out() -> None:
    """A28: "..." every 0.5 s while a reply is late; A29: at TEXT_WAIT_TIME the mod gives up, shows its
    "Too long waited" line and turns silero off."""
    def answer(request: dict[str, Any]) -> dict[str, Any]:
        if request["input"] != "waiting":
            time.sleep(1.6)
        return {"TEXT_WAIT_TIME": 1}

    with game(answer) as (_, mod):
        mod.wait_for(lambda: mod.replies(), timeout=3)
        mod.say("Эй")
        line = mod.wait_for(lambda: mod.lines(), timeout=4)[0]
    assert line.text == TOO_LONG and line.audio_start is None and not mod.silero
    assert mod.log.dots >= 1 and len(mod.log.too_long) == 1
    assert any(reply.abandoned for reply in mod.replies())


def test_replies_the_mod_cannot_read(tmp_path: Path) -> None:
    """R3: a wrong type in a required key loses the reply; R5: a wrong optional key keeps the line (read
    before it) but loses the voice path and the silero flag; P1: a poll reply's line is shown; R1: bytes
    beyond one recv(32000) are never seen (recorded); R2: a close without a reply shows nothing."""
    voice = voice_file(tmp_path, "lost.wav", 0.2)
    script: dict[int, Any] = {
        1: {"response": "Видно", "patch_to_sound_file": as_wine(voice), "VOICE_WAIT_TIME": 1, "instant_send": 0,
            "silero": False},
        2: {"id": "2"},
        3: {"response": "x" * 40000},
        4: None,
    }

    def answer(request: dict[str, Any]) -> dict[str, Any] | None:
        return script.get(request["id"], {"VOICE_WAIT_TIME": 1})  # read live by a waiting line (V5)

    with game(answer, poll_s=FAST_POLL_S) as (_, mod):
        line = mod.wait_for(lambda: finished(mod), timeout=6)[0]
        mod.wait_for(lambda: len(mod.replies()) >= 5, timeout=4)
    errors = {reply.request_id: reply for reply in mod.replies()}
    assert "instant_send" in errors[1].error and "id" in errors[2].error
    assert line.text == "Видно" and line.id == 1 and line.audio_start is None and voice.exists()
    assert line.stars >= 1 and not line.blips  # the silero false of reply 1 was never applied, its wait time was
    assert errors[3].pending and errors[3].error and errors[4].raw == b"" and "not JSON" in errors[4].error
    assert len(mod.lines()) == 1


def test_lines_take_turns_and_report_dialog_active() -> None:
    """V4: a second line waits for the first; A14: requests sent meanwhile say dialog_active; V12: no typing
    while a part shows."""
    def answer(request: dict[str, Any]) -> dict[str, Any]:
        return {"silero": False, "response": f"Строка {request['id']}." if request["id"] in (0, 1) else ""}

    with game(answer, poll_s=FAST_POLL_S) as (_, mod):
        mod.wait_for(lambda: len(finished(mod)) >= 2, timeout=5)
        first, second = finished(mod)[:2]
        assert mod.can_type()
    assert first.text_end is not None and second.text_start is not None and second.text_start >= first.text_end
    during = [r for r in mod.requests() if first.text_start and first.text_end and
              first.text_start < r.sent_at < first.text_end]
    assert during and all(r.fields["dialog_active"] for r in during)


def test_restart_resets_ids_and_no_listener_sends_nothing() -> None:
    """A6: ids count from 0 again in a new game process; A3: 3 connect attempts, then no request at all
    (the id is taken only once connected, NC:51)."""
    with game(polls(), poll_s=FAST_POLL_S) as (_, mod):
        mod.wait_for(lambda: len(mod.requests()) >= 2, timeout=3)
        mod.restart_game()
        mod.wait_for(lambda: mod.log.restarts and mod.requests()[-1].sent_at > mod.log.restarts[0], timeout=3)
    assert next(request.id for request in mod.requests() if request.sent_at > mod.log.restarts[0]) == 0
    free = socket.create_server(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    with ModDouble(port, connect_retry_s=0.05, poll_s=FAST_POLL_S) as lonely:
        lonely.wait_for(lambda: lonely.log.connect_failures, timeout=3)
    assert lonely.requests() == [] and "no listener" in lonely.log.failures()[0]
