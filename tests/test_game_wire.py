"""The game link's wire formats: framing, the mod's requests, replies the mod accepts, dialect B shapes.

Replies are judged by tests/fakes/mod_reply.py, which reads them as strictly as the mod's DataChange
does (R1-R5), so "the mod would take it" is checked by an independent reader, not by the builder.
"""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fakes.mod_reply import MAX_READ, ModReplyError, read_reply
from voxpipe.frontends.game.wire import (
    IDLE_EVENT,
    MAX_REPLY_BYTES,
    ROOMS,
    AReply,
    ARequest,
    BAction,
    BadFrame,
    Malformed,
    ModSettings,
    ObjectScanner,
    b_aborted,
    b_error,
    b_info,
    b_loaded_settings,
    b_task,
    b_task_status,
    b_task_update,
    build_a,
    detect,
    parse_a,
    parse_b,
)

POLL = {"id": 57, "type": "chat", "character": "Crazy", "input": "waiting", "dataToSentSystem": "-", "systemInfo": "-",
        "distance": "3,27", "roomPlayer": 1, "roomMita": 0, "hierarchy": "-", "currentInfo": "-",
        "dialog_active": False}
"""A plain poll as the mod sends it (A4, A25; the notes' example)."""

# --- the object scanner ----------------------------------------------------------------------

TRICKY = '{"a":"}{\\"\\\\","b":{"c":["{",{"d":"\\u007d\\\\"}]},"e":"Привет } {"}'.encode()
"""Braces and quotes in strings, an escaped quote, an escaped backslash before a closing quote,
a \\u escape of "}", nesting, and UTF-8."""

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet=st.characters(codec="utf-8")),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(alphabet='{}[]"\\:,ab \n', max_size=4), children, max_size=3),
    max_leaves=12)
objects = st.dictionaries(st.text(alphabet='{}"\\ab', max_size=4), json_values, max_size=4)
whitespace = st.text(alphabet=" \t\r\n", max_size=3)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(objects, st.booleans(), whitespace), min_size=1, max_size=4), st.data())
def test_objects_come_out_whole_wherever_the_stream_is_cut(items, data):
    encoded = [json.dumps(obj, ensure_ascii=ascii).encode() for obj, ascii, _ in items]
    stream = b"".join(space.encode() + raw for raw, (_, _, space) in zip(encoded, items, strict=True))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    scanner, found = ObjectScanner(), []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        found += scanner.feed(stream[start:end])
    assert found == encoded
    assert scanner.pending == 0


def test_every_split_point_and_byte_by_byte():
    for cut in range(len(TRICKY) + 1):
        scanner = ObjectScanner()
        first = scanner.feed(TRICKY[:cut])
        assert first == ([TRICKY] if cut == len(TRICKY) else [])
        assert scanner.pending == (cut if cut < len(TRICKY) else 0)
        assert first + scanner.feed(TRICKY[cut:]) == [TRICKY]
    scanner = ObjectScanner()
    assert [obj for byte in TRICKY for obj in scanner.feed(bytes([byte]))] == [TRICKY]
    assert json.loads(TRICKY)["b"]["c"][1]["d"] == "}\\"


def test_several_objects_and_whitespace_in_one_feed():
    stream = b' \r\n{"a":1}\n{"b":"}"}  \t{"c":{}}\n{"d"'
    scanner = ObjectScanner()
    assert scanner.feed(stream) == [b'{"a":1}', b'{"b":"}"}', b'{"c":{}}']
    assert scanner.pending == 4
    assert scanner.feed(b":2}\n") == [b'{"d":2}']


@pytest.mark.parametrize("stream", [b"[1,2]", b"GET / HTTP/1.1\r\n", b"  x{}", b'"a"', b"\x00{}"])
def test_a_stream_that_does_not_start_with_an_object_is_not_json(stream):
    with pytest.raises(BadFrame) as refused:
        ObjectScanner().feed(stream)
    assert refused.value.reason == "not JSON"


def test_garbage_after_an_object_keeps_the_object_and_fails_the_next_feed():
    scanner = ObjectScanner()
    assert scanner.feed(b'{"a":1} junk') == [b'{"a":1}']
    with pytest.raises(BadFrame, match="not JSON"):
        scanner.feed(b'{"b":2}')


def test_oversize_is_refused_mid_stream_and_whole():
    obj = b'{"a":"' + b"x" * 92 + b'"}'  # 100 bytes
    assert ObjectScanner(limit=100).feed(obj) == [obj]
    with pytest.raises(BadFrame, match="too big"):
        ObjectScanner(limit=99).feed(obj)
    scanner = ObjectScanner(limit=100)
    scanner.feed(b'{"a":"' + b"x" * 90)
    with pytest.raises(BadFrame, match="too big"):  # never completed: refused as soon as it passes the limit
        scanner.feed(b"x" * 10)


def test_invalid_utf8_in_a_string_is_framed_and_left_to_json():
    raw = b'{"a":"\xff\xfe}"}'
    assert ObjectScanner().feed(raw) == [raw]
    with pytest.raises(UnicodeDecodeError):
        json.loads(raw)


def test_a_large_string_is_scanned_in_pieces():
    raw = b'{"image_base64_list":["' + b"QUJD" * 300_000 + b'"],"id":1}'
    scanner = ObjectScanner()
    found = [obj for start in range(0, len(raw), 65536) for obj in scanner.feed(raw[start:start + 65536])]
    assert found == [raw]


def test_detect():
    assert detect(POLL) == "A"
    assert detect({"action": "create_task"}) == "B"
    assert detect({"action": 5, "id": 1, "input": ""}) == "A"
    assert detect({"id": 1}) is None
    assert detect([POLL]) is None


# --- dialect A requests ----------------------------------------------------------------------


def request(**changes: object) -> dict[str, object]:
    return {**POLL, **changes}


def test_a_plain_poll():
    assert parse_a(POLL) == ARequest(id=57, character="Crazy", player_text="", events=(), infos=(), distance=3.27,
                                     room_player="MainHall", room_character="Kitchen", hierarchy=(),
                                     current_info=(), dialog_active=False)
    assert parse_a(POLL).kind == "poll"


def test_player_text_is_stripped_and_keeps_its_lines():
    assert parse_a(request(input="Привет\n")).player_text == "Привет"
    sent_twice = parse_a(request(input="Привет\nКак дела?\n"))
    assert sent_twice.player_text == "Привет\nКак дела?" and sent_twice.kind == "player"
    assert parse_a(request(input="waiting\n")).player_text == "waiting"  # typed: the mod adds "\n" (A17)
    for nothing in ("waiting", "", "\n", "  \n"):
        assert parse_a(request(input=nothing)).kind == "poll"


def test_events_and_the_idle_line():
    event = parse_a(request(dataToSentSystem="-Игрок смотрел на кухню\nИгрок ушёл\n"))
    assert event.events == ("Игрок смотрел на кухню", "Игрок ушёл") and event.kind == "event"
    assert parse_a(request(dataToSentSystem=IDLE_EVENT)).events == (IDLE_EVENT,)  # no leading "-" (A22)
    boring = parse_a(request(input="boring"))
    assert boring.events == (IDLE_EVENT,) and boring.kind == "event" and boring.player_text == ""
    both = parse_a(request(input="hi\n", dataToSentSystem="-e\n"))
    assert both.kind == "player" and both.events == ("e",)


def test_dash_and_null_mean_nothing():
    for nothing in ("-", None):
        parsed = parse_a(request(dataToSentSystem=nothing, systemInfo=nothing, hierarchy=nothing, currentInfo=nothing))
        assert (parsed.events, parsed.infos, parsed.hierarchy, parsed.current_info) == ((), (), (), ())
    parsed = parse_a({key: value for key, value in POLL.items() if key not in ("systemInfo", "hierarchy")})
    assert parsed.infos == () and parsed.hierarchy == ()


def test_infos_can_come_with_a_plain_poll():
    parsed = parse_a(request(systemInfo="-[SPEAKER] : Player said: 'hi'\n"))
    assert parsed.infos == ("[SPEAKER] : Player said: 'hi'",) and parsed.kind == "poll"


def test_hierarchy_keeps_its_depth_dashes_and_current_info_loses_its_prefix():
    parsed = parse_a(request(hierarchy="House 1,0 м\r\n-Kitchen 2,5 м\r\n--Table 0,8 м\r\n",
                             currentInfo="-Your game object name is <Mita>\nCurrent movement type: walkNear\n"))
    assert parsed.hierarchy == ("House 1,0 м", "-Kitchen 2,5 м", "--Table 0,8 м")
    assert parsed.current_info == ("Your game object name is <Mita>", "Current movement type: walkNear")


@pytest.mark.parametrize(("value", "distance"), [
    ("3,27", 3.27), ("3.27", 3.27), ("-1,50", -1.5), ("12", 12.0), (3.5, 3.5), (4, 4.0),
    ("abc", None), ("nan", None), ("inf", None), ("1e5", None), ("3,2,7", None), ("", None), (None, None),
    (True, None), ([1], None),
])
def test_distance(value, distance):
    assert parse_a(request(distance=value)).distance == distance


def test_rooms():
    for number, name in ROOMS.items():
        assert parse_a(request(roomPlayer=number, roomMita=number)).room_player == name
    for odd in (7, "1", True, None, 1.0):
        parsed = parse_a(request(roomPlayer=odd, roomMita=odd))
        assert parsed.room_player == parsed.room_character == "Unknown"


def test_dialog_active_is_true_only_for_true():
    assert parse_a(request(dialog_active=True)).dialog_active
    for other in (1, "true", None):
        assert not parse_a(request(dialog_active=other)).dialog_active
    assert not parse_a({key: value for key, value in POLL.items() if key != "dialog_active"}).dialog_active


def test_id_must_be_an_int32():
    assert parse_a(request(id=2**31 - 1)).id == 2**31 - 1
    assert parse_a(request(id=-2**31)).id == -2**31
    for bad in (2**31, -2**31 - 1, True, False, 1.0, "5", None):
        parsed = parse_a(request(id=bad))
        assert isinstance(parsed, Malformed) and parsed.id == -1
    assert parse_a({key: value for key, value in POLL.items() if key != "id"}) == Malformed("no id", -1)


def test_other_fatal_fields_echo_the_id():
    for bad in ("", "a b", "x" * 33, 5, None, "Crazy\n", "Кот"):
        assert parse_a(request(character=bad)) == Malformed("character is not a character name", 57)
    assert parse_a(request(character="x" * 32)).character == "x" * 32
    assert parse_a(request(input=None)) == Malformed("input is not a string", 57)
    assert parse_a(request(dataToSentSystem=5)) == Malformed("dataToSentSystem is not a string", 57)
    assert parse_a(request(currentInfo=["-"])) == Malformed("currentInfo is not a string", 57)
    assert parse_a([POLL]) == Malformed("not an object", -1)


def test_images_only_when_asked_and_unknown_keys_ignored():
    sent = request(image_base64_list=["QUJD", "REVG"], something_new={"x": 1})
    assert parse_a(sent).images == ()
    assert parse_a(sent, images=True).images == ("QUJD", "REVG")
    assert parse_a(request(image_base64_list=[1]), images=True).images == ()


# --- dialect A replies -----------------------------------------------------------------------

APP_KEYS = ["id", "type", "character", "response", "silero", "id_sound", "patch_to_sound_file", "user_input",
            "GM_ON", "GM_READ", "GM_VOICE", "GM_REPEAT", "CC_Limit_mod", "instant_send", "LANGUAGE", "MITAS_MENU",
            "EMOTION_MENU", "TEXT_WAIT_TIME", "VOICE_WAIT_TIME"]
"""The app's reply, key by key in its order (HEAD:server.py:168-198)."""


def test_every_key_every_time_in_the_apps_order_with_the_mods_types():
    raw = build_a(AReply(id=58, character="Crazy", silero=True, response="<e>smile</e>Привет!", id_sound=58,
                         wav_path="Z:\\home\\u\\a.wav"), ModSettings())
    assert list(json.loads(raw)) == APP_KEYS
    assert raw.isascii() and b" " not in raw.replace(b"Z:", b"")
    read = read_reply(raw)
    assert read["missing"] == ()
    assert (read["id"], read["type"], read["character"], read["response"], read["silero"], read["id_sound"]) == (
        58, "chat", "Crazy", "<e>smile</e>Привет!", True, 58)
    assert read["patch_to_sound_file"] == "Z:\\home\\u\\a.wav"
    assert (read["GM_ON"], read["GM_READ"], read["GM_VOICE"], read["GM_REPEAT"], read["CC_Limit_mod"]) == (
        False, False, False, 2, 100)
    assert (read["LANGUAGE"], read["MITAS_MENU"], read["EMOTION_MENU"], read["TEXT_WAIT_TIME"],
            read["VOICE_WAIT_TIME"], read["instant_send"]) == ("RU", False, False, 40, 40, False)


def test_id_sound_zero_is_kept_and_a_malformed_answer_is_well_typed():
    assert read_reply(build_a(AReply(id=0, character="Crazy", silero=True, wav_path="a.wav"), ModSettings()))[
        "id_sound"] == 0
    empty = read_reply(build_a(AReply(id=-1, character="", silero=False), ModSettings()))
    assert (empty["id"], empty["response"], empty["silero"]) == (-1, "", False)
    with pytest.raises(ValueError, match="int32"):
        build_a(AReply(id=2**31, character="Crazy", silero=True), ModSettings())


def test_settings_from_the_config_section():
    section = {"language": "EN", "text_wait_time": 60, "voice_wait_time": 45, "mitas_menu": True,
               "emotion_menu": True, "gm_on": True, "gm_read": True, "gm_voice": True, "gm_repeat": 3,
               "cc_limit_mod": 50, "port": 12345, "delivery": "phrases"}
    mod = ModSettings.from_config(section)
    read = read_reply(build_a(AReply(id=1, character="Kind", silero=True), mod))
    assert [read[key] for key in APP_KEYS[8:]] == [True, True, True, 3, 50, False, "EN", True, True, 60, 45]
    assert ModSettings.from_config({}) == ModSettings()
    for bad in ({"gm_on": 1}, {"gm_repeat": True}, {"text_wait_time": 2**31}, {"language": None}):
        with pytest.raises(ValueError, match="game\\."):
            ModSettings.from_config(bad)


@pytest.mark.parametrize("unit", ["Hello there, my friend. ", "Привет, как у тебя дела? ", "😀 ok! ", "x"])
def test_an_overlong_response_is_cut_at_a_boundary_and_the_json_fits(unit):
    response = (unit * (100_000 // len(unit) + 1))[:100_000]
    raw = build_a(AReply(id=7, character="Crazy", silero=True, response=response, id_sound=7), ModSettings())
    assert len(raw) <= MAX_REPLY_BYTES
    sent = read_reply(raw)["response"]
    assert sent.endswith("…")
    kept = sent[:-1]
    assert response.startswith(kept)
    if unit != "x":  # whitespace to cut at: a phrase end, with only whitespace dropped after it
        assert kept[-1] in ".!?" and response[len(kept)].isspace()
    assert len(raw) > MAX_REPLY_BYTES - 100  # nothing much lost: it was filled up to the limit


def test_a_cut_never_falls_inside_a_tag():
    tag = "<c>Подойти к игроку и сказать что-то очень длинное</c>"
    response = "Hi. " + "word " * 5000 + tag + "word " * 5000
    for extra in range(0, 120, 7):  # move the limit over the tag
        cut = read_reply(build_a(AReply(id=1, character="Crazy", silero=True, response=response,
                                        user_input="u" * extra), ModSettings()))["response"]
        opened, closed = cut.count("<c>"), cut.count("</c>")
        assert opened == closed


def test_a_response_that_fits_is_sent_as_it_is():
    overhead = len(build_a(AReply(id=1, character="Crazy", silero=True), ModSettings()))
    exact = "a" * (MAX_REPLY_BYTES - overhead)
    raw = build_a(AReply(id=1, character="Crazy", silero=True, response=exact), ModSettings())
    assert len(raw) == MAX_REPLY_BYTES and read_reply(raw)["response"] == exact


# --- the strict reader itself (the mod's side) -------------------------------------------------


def app_reply(**changes: object) -> bytes:
    reply = json.loads(build_a(AReply(id=5, character="Crazy", silero=True, response="Hi"), ModSettings()))
    reply.update(changes)
    return json.dumps({key: value for key, value in reply.items() if value is not ...}).encode()


def test_the_reader_refuses_what_the_mods_getters_refuse():
    for key, bad in [("id", True), ("id", 1.0), ("id", 2**31), ("id", "5"), ("silero", 1), ("silero", "true"),
                     ("response", None), ("response", 5), ("id_sound", False), ("type", ...)]:
        with pytest.raises(ModReplyError, match=re.escape(key)):
            read_reply(app_reply(**{key: bad}))
    with pytest.raises(ModReplyError, match="bytes"):
        read_reply(b" " * (MAX_READ + 1))
    with pytest.raises(ModReplyError, match="not JSON"):
        read_reply(b'{"id":1')
    with pytest.raises(ModReplyError, match="duplicate"):
        read_reply(b'{"id":1,"id":2}')


def test_a_bad_optional_key_loses_the_rest_but_the_response_was_read():
    """R5: the line shows, but the voice path, after it in the mod's order, is never stored."""
    with pytest.raises(ModReplyError) as error:
        read_reply(app_reply(GM_REPEAT="2", patch_to_sound_file="a.wav"))
    assert error.value.partial["response"] == "Hi" and error.value.partial["patch_to_sound_file"] == "a.wav"
    assert "VOICE_WAIT_TIME" not in error.value.partial
    menus = read_reply(app_reply(MITAS_MENU=..., EMOTION_MENU=...))
    assert menus["missing"] == ("MITAS_MENU", "EMOTION_MENU") and menus["MITAS_MENU"] is False


# --- dialect B -------------------------------------------------------------------------------


def line(raw: bytes) -> dict[str, object]:
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1 and raw.isascii()
    return json.loads(raw)


def test_parse_b_create_task():
    action = parse_b({"action": "create_task", "type": "answer", "character": "Kind", "req_id": "r7",
                      "sender": "Player", "participants": "Kind, Crazy,", "data": {"message": "Привет"},
                      "context": {"distance": "2,50", "roomPlayer": 2, "roomMita": 3, "hierarchy": "House\r\n-Bed",
                                  "currentInfo": "-a\nb"}})
    assert action == BAction(action="create_task", type="answer", character="Kind", message="Привет", req_id="r7",
                             participants=("Kind", "Crazy"), distance=2.5, room_player="Bedroom",
                             room_character="Toilet", hierarchy=("House", "-Bed"), current_info=("a", "b"))


def test_parse_b_defaults_and_refusals():
    assert parse_b({"action": "create_task"}) == BAction(action="create_task")  # answer, "Mita" (create_task.py)
    assert parse_b({"action": "get_task_status", "task_uid": "u1"}).task_uid == "u1"
    assert parse_b({"action": "x", "req_id": 12, "data": {"participants": ["A", ""]}}).participants == ("A",)
    assert parse_b({"action": "x", "data": None, "context": None}) == BAction(action="x")
    for bad in ({"type": 5}, {"data": [1]}, {"data": {"message": 1}}, {"req_id": [1]}, {"req_id": True},
                {"character": "a b"}):
        assert isinstance(parse_b({"action": "create_task", **bad}), Malformed)
    assert parse_b({"id": 1}) == Malformed("no action")


def test_task_updates():
    task = b_task("u1", "VOICING", "chat", {"character": "Crazy", "req_id": "r1"}, 10.0, 11.5,
                  {"response": "Привет"})
    assert list(task) == ["uid", "status", "type", "data", "created_at", "updated_at", "result", "error"]
    assert line(b_task_update(task)) == {"type": "task_update", "uid": "u1", "status": "VOICING", "body": task}
    with pytest.raises(ValueError, match="status"):
        b_task("u1", "DONE", "chat", {}, 0, 0)
    with pytest.raises(ValueError, match="error"):
        b_task_update({key: value for key, value in task.items() if key != "error"})


def test_aborted_has_the_apps_shape():
    assert line(b_aborted("Crazy", "react", "r1", "React disabled by settings", uid="abrt_1")) == {
        "type": "task_update", "uid": "abrt_1", "status": "ABORTED",
        "body": {"uid": "abrt_1", "status": "ABORTED", "type": "chat",
                 "data": {"character": "Crazy", "event_type": "react", "req_id": "r1"},
                 "created_at": 0, "updated_at": 0, "result": {}, "error": "React disabled by settings"}}
    idle = line(b_aborted("Kind", "idle_timeout", None, "x"))
    assert re.fullmatch("abrt_[0-9a-f]{32}", idle["uid"]) and idle["body"]["type"] == "idle"
    assert idle["body"]["data"] == {"character": "Kind", "event_type": "idle_timeout"}


def test_task_status_adds_the_success_fields():
    done = b_task("u2", "SUCCESS", "chat", {}, 1.0, 2.0, {"response": "x", "voiceover_path": "Z:\\v.wav"})
    status = line(b_task_status(done, silero_connected=True, game_master=False, gm_voice=True))
    assert status["result"]["audio_path"] == "Z:\\v.wav" and status["silero_connected"] is True
    assert (status["GM_ON"], status["GM_READ"], status["GM_VOICE"]) == (False, False, False)
    pending = b_task("u3", "PENDING", "chat", {}, 1.0, 1.0)
    assert line(b_task_status(pending, silero_connected=True, game_master=True, gm_voice=True)) == pending


def test_settings_info_and_error():
    settings_line = line(b_loaded_settings(ModSettings(mitas_menu=True), "Crazy",
                                           {"Crazy": {"attitude": 60, "boredom": 10.0, "stress": 5}}))
    assert settings_line == {"type": "loaded_settings", "body": {
        "settings": {"ACTION_MENU": False, "MITAS_MENU": True, "IGNORE_GAME_REQUESTS": False,
                     "GAME_BLOCK_LEVEL": "Idle events", "CHARACTER": "Crazy"},
        "characters_stats": {"Crazy": {"attitude": 60.0, "boredom": 10.0, "stress": 5.0}}}}
    assert b_info(3) == b'{"type":"info","stored":3}\n'
    assert b_error("Unknown action: x\n") == b'{"type":"error","error":"Unknown action: x\\n"}\n'
