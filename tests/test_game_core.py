"""The game link's state machine (services/frontends/game/core.py), pure: every answer the mod gets is
read by the mod's strict reader (tests/fakes/mod_reply.py), and the phrase scheme of the design
(docs/design/game-link.md §2, §5) is checked step by step with the time passed in."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fakes.mod_reply import read_reply
from voxpipe.frontends.game.core import (
    FADE_S,
    Answer,
    Character,
    Delete,
    Effect,
    Link,
    MakeWav,
    Publish,
    Settings,
    game_text,
)
from voxpipe.frontends.game.modmodel import text_seconds
from voxpipe.frontends.game.wire import ARequest
from voxpipe.protocol import Cancel, Chunk, LlmDone, Mark, Playback, Request
from voxpipe.stages.audio import AudioFormat

pytestmark = pytest.mark.unit

ESPEAK = AudioFormat(22050, 1, 2)
SESSION = "game.Crazy"


def request(id: int, text: str = "", *, character: str = "Crazy", events: tuple[str, ...] = (),
            infos: tuple[str, ...] = (), distance: float | None = 3.27) -> ARequest:
    return ARequest(id=id, character=character, player_text=text, events=events, infos=infos, distance=distance,
                    room_player="MainHall", room_character="Kitchen", hierarchy=(), current_info=(),
                    dialog_active=False)


def answers(effects: list[Effect]) -> list[tuple[int, dict[str, Any]]]:
    return [(effect.conn, read_reply(effect.data)) for effect in effects if isinstance(effect, Answer)]


def published(effects: list[Effect], kind: type) -> list[Any]:
    return [effect.body for effect in effects if isinstance(effect, Publish) and isinstance(effect.body, kind)]


class Game:
    """A link with a clock, and the steps the bus and the shell would take."""

    def __init__(self, **overrides: Any) -> None:
        self.link = Link(replace(Settings(), **overrides), "t")
        self.now = 100.0
        self.mod_id = 0
        self.files: list[str] = []

    def ask(self, text: str, conn: int = 1, **fields: Any) -> tuple[str, list[Effect]]:
        effects = self.link.request(conn, request(self.next_id(), text, **fields), self.now)
        asked = [effect for effect in effects if isinstance(effect, Publish) and isinstance(effect.body, Request)]
        return (asked[-1].id if asked else ""), effects

    def next_id(self) -> int:
        self.mod_id += 1
        return self.mod_id

    def poll(self, conn: int = 9, character: str = "Crazy") -> dict[str, Any]:
        effects = self.link.request(conn, request(self.next_id(), character=character), self.now)
        (answer,) = answers(effects)
        return answer[1]

    def speak(self, id: str, index: int, text: str, *, final: bool = False, marks: tuple[Mark, ...] = (),
              seconds: float = 1.0, session: str = SESSION) -> list[Effect]:
        """The chunk, its audio (`seconds` of espeak-ng PCM) and, for a MakeWav, the written file."""
        effects = self.link.chunk(session, id, Chunk(text=text, index=index, final=final, marks=marks), self.now)
        pcm = bytes(int(ESPEAK.rate * seconds) * 2)
        made = self.link.audio(session, id, index, pcm, ESPEAK, True, self.now, self.now)
        effects += made
        for effect in made:
            if isinstance(effect, MakeWav):
                path = f"/voice/{id}-{effect.index}.wav"
                self.files.append(path)
                total = sum(len(pcm) for pcm, _ in effect.pieces) / 2 / ESPEAK.rate
                effects += self.link.wav_ready(session, id, effect.index, path, "Z:" + path, total, self.now)
        return effects


def test_a_poll_is_answered_at_once_well_typed_and_asks_nothing() -> None:
    game = Game()
    effects = game.link.request(3, request(0), game.now)
    assert [type(effect) for effect in effects] == [Answer]
    (conn, answer), = answers(effects)
    assert conn == 3 and answer["id"] == 0 and answer["response"] == "" and answer["silero"] is True
    assert answer["missing"] == ()  # every settings key, or the mod turns its menus off (R4)


def test_player_text_asks_the_character_with_its_persona_and_the_game_state_and_holds_the_request() -> None:
    game = Game(characters={"crazy": Character(persona="crazy-mita", voice="ru+f3")})
    game.link.request(9, request(0, infos=("The player looked at the door.",)), game.now)
    _, effects = game.ask("Привет!\nКак дела?")
    (asked,) = published(effects, Request)
    assert asked.text == "Привет!\nКак дела?" and asked.persona == "crazy-mita" and asked.voice == "ru+f3"
    assert asked.playback == "client"
    assert "3.27" in asked.system and "MainHall" in asked.system and "The player looked at the door." in asked.system
    assert answers(effects) == []  # held until the first phrase


def test_the_first_phrase_goes_on_the_held_request_with_its_voice_under_the_same_id() -> None:
    game = Game()
    id, _ = game.ask("Hi")
    effects = game.speak(id, 0, "Hello, player!")
    ((conn, answer),) = answers(effects)
    assert conn == 1 and answer["id"] == 1 and answer["id_sound"] == 1
    assert answer["response"] == "Hello, player!" and answer["patch_to_sound_file"] == "Z:/voice/" + f"{id}-0.wav"
    assert published(effects, Playback) == []  # it starts in the game once the mod noticed and loaded it
    game.now += game.link.settings.load_s
    (started,) = published(game.link.tick(game.now), Playback)
    assert started.event == "started" and started.chunk == 0


def test_next_phrases_come_in_polls_in_order_each_once_its_predecessor_is_about_to_end() -> None:
    game = Game()
    id, _ = game.ask("Hi")
    game.speak(id, 0, "One.", seconds=2.0)
    game.speak(id, 1, "Two.", seconds=1.0)
    game.speak(id, 2, "Three.", seconds=1.0, final=True)
    assert game.poll()["response"] == ""  # phrase 0 is still sounding
    game.now += 2.0 + game.link.settings.load_s - game.link.settings.load_s - FADE_S  # its end, minus the fade
    answer = game.poll()
    assert answer["response"] == "Two." and answer["id_sound"] == answer["id"] and answer["patch_to_sound_file"]
    game.now += 1.0
    assert game.poll()["response"] == "Three."
    game.now += 5.0
    assert game.poll()["response"] == ""
    assert game.link.replies == {}


def test_a_line_whose_text_outlasts_its_audio_holds_the_next_one_back() -> None:
    game = Game()
    id, _ = game.ask("Hi")
    long_text = "A sentence long enough to be shown for a good while on the screen."
    game.speak(id, 0, long_text, seconds=0.5)
    game.speak(id, 1, "Next.", seconds=0.5, final=True)
    delivered_at = game.now
    game.now += 0.6
    before = game.poll()
    assert before["response"] == ""  # phrase 1 would start only once phrase 0's text is gone (V4)
    game.now = delivered_at + game.link.settings.load_s + text_seconds(long_text)
    assert game.poll()["response"] == "Next."


def test_tags_go_inline_where_they_stood_and_only_the_allowed_ones() -> None:
    marks = (Mark(tag="e", body="smile", chunk=0, offset=0), Mark(tag="+memory", body="high|x", chunk=0, offset=5),
             Mark(tag="a", body="bad<b>", chunk=0, offset=5))
    assert game_text("Hello there.", marks, Settings().tags) == "<e>smile</e>Hello there."
    game = Game()
    id, _ = game.ask("Hi")
    ((_, answer),) = answers(game.speak(id, 0, "Hello there.", marks=marks[:1], final=True))
    assert answer["response"] == "<e>smile</e>Hello there."


def test_barge_in_cancels_every_unfinished_reply_drops_its_files_and_reports_where_it_stopped() -> None:
    game = Game()
    id, _ = game.ask("Tell me a story")
    game.speak(id, 0, "Once upon a time.", seconds=2.0)
    game.speak(id, 1, "There was a cat.", seconds=2.0)
    game.now += 1.0
    new_id, effects = game.ask("Stop!", conn=2)
    (cancel,) = published(effects, Cancel)
    assert "barge-in" in cancel.reason
    assert Delete(f"/voice/{id}-1.wav") in effects  # the undelivered phrase's file
    *_, stopped = published(effects, Playback)  # after the `started` of what the mod holds
    assert stopped.event == "stopped" and stopped.chunk == 0 and stopped.final and 0 < stopped.heard < 1
    assert new_id != id and list(game.link.replies) == [(SESSION, new_id)]
    assert game.speak(id, 2, "Late.", final=True) == []  # what is still in flight for it is ignored


def test_barge_in_while_held_answers_the_held_request_empty() -> None:
    game = Game()
    game.ask("First")
    _, effects = game.ask("Second", conn=2)
    ((conn, answer),) = answers(effects)
    assert conn == 1 and answer["response"] == "" and answer["silero"] is True


def test_events_during_a_reply_are_answered_like_polls_and_asked_together_once_it_ends() -> None:
    game = Game()
    id, _ = game.ask("Hi")
    game.speak(id, 0, "Hello.", seconds=0.5, final=True)
    effects = game.link.request(5, request(game.next_id(), events=("The lights went out.",)), game.now)
    assert published(effects, Request) == [] and len(answers(effects)) == 1
    game.link.request(6, request(game.next_id(), events=("A door slammed.",)), game.now)
    game.now += 1.0
    effects = game.link.tick(game.now)
    (asked,) = published(effects, Request)
    assert asked.text.splitlines()[1:] == ["The lights went out.", "A door slammed."]
    assert asked.text.splitlines()[0] == "[Событие игры]"


def test_an_event_with_nothing_in_progress_is_asked_at_once_and_held() -> None:
    game = Game(mod=replace(Settings().mod, language="EN"))
    effects = game.link.request(4, request(0, events=("Player did nothing for 90 seconds",)), game.now)
    (asked,) = published(effects, Request)
    assert asked.text == "[Game event]\nPlayer did nothing for 90 seconds" and answers(effects) == []


def test_an_empty_or_failed_reply_releases_the_held_request_empty() -> None:
    game = Game()
    id, _ = game.ask("Hi")
    game.link.done(SESSION, id, LlmDone(status="error", text="", tokens=0, error="boom"), game.now)
    effects = game.speak(id, 0, "", final=True)
    ((conn, answer),) = answers(effects)
    assert conn == 1 and answer["response"] == ""
    assert any(isinstance(effect, Publish) and isinstance(effect.body, Playback) and effect.body.final
               for effect in effects + game.link.tick(game.now))


def test_a_held_request_is_answered_empty_at_the_first_phrase_timeout_and_the_phrase_comes_in_a_poll() -> None:
    game = Game(first_phrase_timeout_s=10.0)
    id, _ = game.ask("Hi")
    game.now += 10.0
    ((conn, answer),) = answers(game.link.tick(game.now))
    assert conn == 1 and answer["response"] == ""
    game.speak(id, 0, "Finally.", final=True)
    assert game.poll()["response"] == "Finally."


def test_a_tags_only_final_chunk_is_its_own_line_with_a_voice_file() -> None:
    game = Game()
    id, _ = game.ask("Hi")
    game.speak(id, 0, "Hello.", seconds=0.2)
    effects = game.speak(id, 1, "", final=True, marks=(Mark(tag="e", body="smile", chunk=1, offset=0),), seconds=0)
    assert any(isinstance(effect, MakeWav) and effect.pieces == () for effect in effects)  # the shell writes silence
    game.now += 1.0
    answer = game.poll()
    assert answer["response"] == "<e>smile</e>" and answer["patch_to_sound_file"]


def test_whole_mode_sends_the_text_when_written_then_one_voice_file_under_the_text_id() -> None:
    game = Game(delivery="whole")
    id, _ = game.ask("Hi")
    assert answers(game.speak(id, 0, "One.")) == []
    effects = game.speak(id, 1, "Two.", final=True)
    ((conn, text),) = answers(effects)
    assert conn == 1 and text["response"] == "One. Two." and text["patch_to_sound_file"] == ""
    whole = [effect for effect in effects if isinstance(effect, MakeWav)]
    assert [effect.index for effect in whole] == [-1] and len(whole[0].pieces) == 2
    voice = game.poll()
    assert voice["response"] == "" and voice["id_sound"] == text["id"] and voice["patch_to_sound_file"]
    assert game.poll()["patch_to_sound_file"] == ""


@pytest.mark.parametrize("scene", ["two characters", "speaker marker", "game master"])
def test_scenes_where_lines_are_passed_between_characters_go_whole(scene: str) -> None:
    game = Game()
    character = "Crazy"
    if scene == "two characters":
        game.ask("Hi Kind", character="Kind")
    elif scene == "game master":
        character = "GameMaster"
    infos = ("[SPEAKER] : Kind said: <hello>",) if scene == "speaker marker" else ()
    id, _ = game.ask("Hi", character=character, conn=2, infos=infos)
    assert game.link.replies[(f"game.{character}", id)].whole


def test_silero_is_the_same_on_every_answer_and_voice_off_makes_no_files() -> None:
    game = Game(voice=False)
    id, _ = game.ask("Hi")
    effects = game.speak(id, 0, "Hello.", final=True)
    assert not any(isinstance(effect, MakeWav) for effect in effects)
    ((_, answer),) = answers(effects)
    assert answer["response"] == "Hello." and answer["silero"] is False and answer["patch_to_sound_file"] == ""
    assert game.poll()["silero"] is False


def test_delivered_files_are_deleted_after_their_time_to_live_if_the_mod_never_did() -> None:
    game = Game(file_ttl_s=60.0)
    id, _ = game.ask("Hi")
    game.speak(id, 0, "Hello.", final=True)
    game.now += 59.0
    assert not any(isinstance(effect, Delete) for effect in game.link.tick(game.now))
    game.now += 1.0
    assert Delete(f"/voice/{id}-0.wav") in game.link.tick(game.now)


def test_a_game_restart_drops_everything_in_progress() -> None:
    game = Game()
    id, _ = game.ask("Hi")
    game.speak(id, 0, "One.")
    game.speak(id, 1, "Two.", final=True)
    effects = game.link.request(7, request(0), game.now)  # the id counter started again
    assert published(effects, Cancel) and Delete(f"/voice/{id}-1.wav") in effects
    assert game.link.replies == {}


def test_stop_answers_held_requests_cancels_and_deletes_every_file() -> None:
    game = Game()
    first, _ = game.ask("Hi")
    game.speak(first, 0, "Hello.", final=True)
    game.ask("Again", conn=2)
    effects = game.link.stop()
    assert [conn for conn, _ in answers(effects)] == [2]
    assert published(effects, Cancel) and Delete(f"/voice/{first}-0.wav") in effects


def test_a_malformed_request_gets_a_well_typed_empty_answer_with_its_id() -> None:
    ((conn, answer),) = answers(Game().link.refuse(4, -1))
    assert conn == 4 and answer["id"] == -1 and answer["response"] == ""


def test_a_connection_gone_while_held_leaves_the_reply_to_the_polls() -> None:
    game = Game()
    id, _ = game.ask("Hi")
    game.link.closed(1)
    assert answers(game.speak(id, 0, "Hello.", final=True)) == []
    assert game.poll()["response"] == "Hello."


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["poll", "chunk", "wait"]), st.floats(0.05, 1.5)), min_size=1, max_size=40),
       st.integers(1, 6))
def test_every_phrase_is_delivered_once_in_order_whatever_the_interleaving(steps: list[tuple[str, float]],
                                                                            count: int) -> None:
    game = Game()
    id, _ = game.ask("Tell me")
    texts = [f"Phrase {index}." for index in range(count)]
    shown: list[str] = []
    sent = 0
    for step, seconds in steps:
        if step == "chunk" and sent < count:
            effects = game.speak(id, sent, texts[sent], final=sent == count - 1, seconds=seconds)
            shown += [answer["response"] for _, answer in answers(effects) if answer["response"]]
            sent += 1
        elif step == "poll":
            response = game.poll()["response"]
            shown += [response] if response else []
        game.now += seconds
    while sent < count:
        effects = game.speak(id, sent, texts[sent], final=sent == count - 1, seconds=0.3)
        shown += [answer["response"] for _, answer in answers(effects) if answer["response"]]
        sent += 1
    for _ in range(200):
        if not game.link.replies:
            break
        game.now += 0.4
        response = game.poll()["response"]
        shown += [response] if response else []
    assert shown == texts
    assert game.link.replies == {}


def test_a_reply_cancelled_or_interrupted_elsewhere_ends_and_releases_what_it_held() -> None:
    game = Game()
    id, _ = game.ask("Hi")
    effects = game.link.cancelled(SESSION, "", game.now)  # `cancel` with an empty id: every reply of the session
    assert [conn for conn, _ in answers(effects)] == [1] and not published(effects, Cancel)
    assert game.link.replies == {}
    id, _ = game.ask("Again", conn=2)
    game.speak(id, 0, "One.", seconds=1.0)
    effects = game.link.done(SESSION, id, LlmDone(status="interrupted", text="One.", tokens=1), game.now)
    *_, stopped = published(effects, Playback)
    assert stopped.event == "stopped" and stopped.final and game.link.replies == {}


def test_a_reply_that_stalls_waiting_for_the_daemon_is_dropped() -> None:
    game = Game(stall_s=10.0)
    id, _ = game.ask("Hi")
    game.speak(id, 0, "One.", seconds=0.5)
    game.link.chunk(SESSION, id, Chunk(text="Two.", index=1, final=True), game.now)  # its audio never ends
    game.now += 9.0
    assert published(game.link.tick(game.now), Cancel) == []
    game.now += 1.0
    (cancel,) = published(game.link.tick(game.now), Cancel)
    assert "stall" in cancel.reason and game.link.replies == {}


def test_a_voice_file_that_cannot_be_written_ends_the_reply() -> None:
    game = Game()
    id, _ = game.ask("Hi")
    game.link.chunk(SESSION, id, Chunk(text="One.", index=0, final=True), game.now)
    effects = game.link.wav_failed(SESSION, id, "No space left on device", game.now)
    assert [conn for conn, _ in answers(effects)] == [1] and published(effects, Cancel)


def test_events_waiting_when_the_player_speaks_become_notes_of_the_players_request() -> None:
    game = Game()
    game.ask("Hi")
    game.link.request(5, request(game.next_id(), events=("The lights went out.",)), game.now)
    _, effects = game.ask("What was that?", conn=2)
    (asked,) = published(effects, Request)
    assert asked.text == "What was that?" and "The lights went out." in asked.system


def test_notes_between_replies_are_bounded() -> None:
    game = Game()
    for number in range(200):
        game.link.request(9, request(game.next_id(), infos=(f"note {number}",)), game.now)
    _, effects = game.ask("Hi")
    (asked,) = published(effects, Request)
    assert "note 199" in asked.system and "note 100" not in asked.system


def test_an_event_for_another_character_ends_what_the_first_could_not_finish_saying() -> None:
    """A24: the mod turns to the event's character before it sends, so its polls carry that one: the
    first character's undelivered phrases could only come minutes later, out of place."""
    game = Game()
    crazy, _ = game.ask("Hi")
    game.speak(crazy, 0, "One.")
    game.speak(crazy, 1, "Two.", final=True)
    effects = game.link.request(5, request(game.next_id(), character="Kind", events=("Kind walked in.",)), game.now)
    assert [cancel.reason for cancel in published(effects, Cancel)] == ["the game turned to Kind"]
    assert Delete(f"/voice/{crazy}-1.wav") in effects and (SESSION, crazy) not in game.link.replies


def test_a_reply_whose_character_is_no_longer_polled_is_dropped_with_its_files() -> None:
    game = Game(stall_s=30.0)
    id, _ = game.ask("Hi")
    game.speak(id, 0, "One.")
    game.speak(id, 1, "Two.", final=True)
    game.now += 30.0  # no poll of Crazy came since phrase 0
    effects = game.link.tick(game.now)
    assert published(effects, Cancel) and Delete(f"/voice/{id}-1.wav") in effects and game.link.replies == {}


def test_tags_at_the_very_end_go_with_the_last_words_not_as_a_line_of_their_own() -> None:
    game = Game()
    id, _ = game.ask("Hi")
    game.speak(id, 0, "One.", seconds=0.5)
    game.speak(id, 1, "Two.", seconds=0.5)
    game.speak(id, 2, "", final=True, marks=(Mark(tag="e", body="smile", chunk=2, offset=0),), seconds=0)
    game.now += 1.0
    assert game.poll()["response"] == "Two.<e>smile</e>"
    game.now += 2.0
    assert game.poll()["response"] == ""  # no empty line with only a tag
    game.link.tick(game.now)
    assert game.link.replies == {}


def test_a_character_without_a_persona_of_its_own_gets_the_default_one() -> None:
    settings = Settings()
    assert settings.character("Crazy").persona == "Crazy"
    assert settings.character("None").persona == "" and settings.character("SomeNewMita").persona == ""


def test_the_game_sees_voice_paths_the_way_its_platform_names_them() -> None:
    from pathlib import Path

    from voxpipe.frontends.game.link import game_path
    path = Path("/home/me/.cache/voxpipe/game-voice/a.wav")
    assert game_path(path, "wine") == r"Z:\home\me\.cache\voxpipe\game-voice\a.wav"
    assert game_path(path, "wsl", {"WSL_DISTRO_NAME": "Debian"}) == \
        r"\\wsl.localhost\Debian\home\me\.cache\voxpipe\game-voice\a.wav"
    assert game_path(path, "posix") == str(path)
