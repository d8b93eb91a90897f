"""Issue 14 item 9: text from the model or the bus cannot drive the terminal it is printed on.

A real daemon talks to a provider whose reply (and whose error text) carries a screen clear, an
OSC window title, a bell, a CR, a NUL and a bidi override; the real `voxpipe say` and `voxpipe
chat` run on a real pseudo-terminal, and the raw bytes they write are checked. A participant on
the bus publishes heartbeats with a hostile `src` and counter name; the real `voxpipe status` and
`voxpipe tap` print them escaped.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest

from tests.fakes.wire_server import WireServer, json_script, sse_script
from tests.harness import ROOT, Daemon, connect
from tests.terminal import ENTER, Terminal
from voxpipe.frontends.terminal import printable, printable_json
from voxpipe.ops.stats import table

HOSTILE = "Look\x1b[2J here\x1b]0;pwned\x07 and A\rB, nul\x00 and \u202eevil. Done <e>smile</e> here."
ATTACKS = ("\x1b[2J", "\x1b]0;pwned", "\x07", "\x00", "\u202e", "A\rB")
"""What must never reach the terminal as it is."""
ESCAPED = ("\\x1b[2J", "\\x1b]0;pwned\\x07", "\\x00", "\\u202e", "A\\x0dB")
"""What the reader sees instead."""
CHAT_OWN = ("\r\x1b[K", "\x1b[2m", "\x1b[0m")
"""What chat writes itself: the return that clears its `…` placeholder, dim, and reset."""
_READLINE_MODE = re.compile(r"\x1b\[\?\d+[hl]")
"""Private mode switches that readline writes around the prompt (bracketed paste, meta key)."""
KEY = "sk-test-terminal"


def chunk(content: str) -> dict[str, Any]:
    return {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "scripted",
            "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]}


@pytest.fixture(scope="module")
def server() -> Iterator[WireServer]:
    """Replies with HOSTILE in 3-character pieces (so sequences are cut between deltas); the
    `broken` route fails with a hostile error text."""
    pieces = [HOSTILE[index:index + 3] for index in range(0, len(HOSTILE), 3)]
    with WireServer() as wire:
        wire.route("/v1/chat/completions", sse_script([chunk(piece) for piece in pieces] + ["[DONE]"]))
        wire.route("/broken/v1/chat/completions", json_script(
            {"error": {"message": "quota\x1b]0;pwned\x07 gone\x1b[2J\rnul\x00\u202e"}}, status=400))
        yield wire


@pytest.fixture(scope="module")
def daemon(server: WireServer) -> Iterator[Daemon]:
    profile = {"provider": "openai", "model": "scripted", "api_key_env": "TERMINAL_KEY", "retries": 0}
    settings = {"llm": {"profile": "hostile", "history_limit": 0, "profiles": {
        "hostile": {**profile, "base_url": server.url("/v1")},
        "broken": {**profile, "base_url": server.url("/broken/v1")}}}}
    with Daemon(settings, env={"TERMINAL_KEY": KEY}) as running:
        yield running


def on_terminal(daemon: Daemon, *args: str) -> Terminal:
    return Terminal(daemon.cli(*args), env=daemon.env, cwd=ROOT)


def output_of(daemon: Daemon, *args: str, code: int = 0) -> str:
    """Everything a command wrote to its terminal, once it exited with `code`."""
    term = on_terminal(daemon, *args)
    try:
        assert term.wait(90) == code, term.screen
        return term.raw
    finally:
        term.close()


def assert_harmless(raw: str, own: tuple[str, ...] = ()) -> None:
    """No attack reached the terminal as it is; without what the front-end writes itself (`own`,
    readline's mode switches, the terminal's CR before each newline) no ESC or CR is left."""
    for attack in ATTACKS:
        assert attack not in raw, f"{attack!r} reached the terminal: {raw!r}"
    rest = _READLINE_MODE.sub("", raw)
    for sequence in own:
        rest = rest.replace(sequence, "")
    assert "\x1b" not in rest and not re.search(r"\r(?!\n)", rest), f"not written by the front-end: {rest!r}"


def test_say_prints_a_hostile_reply_escaped(daemon: Daemon) -> None:
    raw = output_of(daemon, "say", "hello", "--timeout", "60")
    assert_harmless(raw)                             # say writes no colours of its own
    for escaped in ESCAPED:
        assert escaped in raw, raw
    assert re.search(r"Done +here\.", raw)           # the command tag is still not shown


def test_history_export_to_a_terminal_is_harmless_and_still_the_same_data(daemon: Daemon) -> None:
    assert daemon.run_cli("say", "--session", "hostile-export", "hello", "--timeout", "60").returncode == 0
    assert_harmless(output_of(daemon, "history", "export", "hostile-export"))
    exported = daemon.run_cli("history", "export", "hostile-export")
    assert not re.search("[\x7f-\x9f\u202e]", exported.stdout)
    replies = [m["content"] for m in json.loads(exported.stdout)["messages"] if m["role"] == "assistant"]
    assert replies and "\x1b[2J" in replies[-1] and "\u202e" in replies[-1]  # the same data, unescaped by JSON


def test_printable_json_escapes_del_c1_and_bidi_and_round_trips() -> None:
    value = {"text": "a\x1b[31m\x7f\x9b\u202e Привет"}
    text = printable_json(value)
    assert json.loads(text) == value
    assert not re.search("[\x00-\x1f\x7f-\x9f\u202e]", text.replace("\n", "")) and "Привет" in text


def test_say_prints_a_hostile_error_text_escaped(daemon: Daemon) -> None:
    raw = output_of(daemon, "say", "hello", "--profile", "broken", "--timeout", "60", code=1)
    assert_harmless(raw)
    assert "quota\\x1b]0;pwned\\x07 gone" in raw, raw


def test_chat_escapes_the_reply_and_errors_but_keeps_its_own_colours(daemon: Daemon) -> None:
    term = on_terminal(daemon, "chat", "--session", "hostile-chat", "--timeout", "60")
    try:
        term.expect(r"you> ")
        start = term.mark()
        term.type("hello")
        term.press(ENTER)
        term.expect(r"Done \[e: smile\] here\..*you> ", after=start)
        start = term.mark()
        term.type("/history")
        term.press(ENTER)
        term.expect(r"assistant: .*Done <e>smile</e> here\..*you> ", after=start)
        term.press("\x04")                           # Ctrl-D: quit
        assert term.wait(30) == 0
        raw = term.raw
    finally:
        term.close()
    assert_harmless(raw, CHAT_OWN)
    assert "\x1b[2m[e: smile]\x1b[0m" in raw         # chat's own dim colour, where it always was
    for escaped in ESCAPED:
        assert raw.count(escaped) >= 2, escaped      # in the streamed reply and in /history

    term = on_terminal(daemon, "chat", "--session", "hostile-chat-2", "--profile", "broken", "--timeout", "60")
    try:
        term.expect(r"you> ")
        start = term.mark()
        term.type("hello")
        term.press(ENTER)
        term.expect(r"quota.*you> ", after=start)
        term.press("\x04")
        assert term.wait(30) == 0
        raw = term.raw
    finally:
        term.close()
    assert_harmless(raw, CHAT_OWN)
    assert "quota\\x1b]0;pwned\\x07 gone" in raw, raw


EVIL_SRC = "evil\x1b]0;pwned\x07\x1b[2J\rA\x00\u202e"
EVIL_COUNTER = "n\x1b[31mred\rB\x00"


def hostile_heartbeat() -> bytes:
    """A heartbeat as any participant may publish it: msgpack by hand, no voxpipe code."""
    payload = {"v": 1, "kind": "heartbeat", "session": "", "id": "", "seq": 0, "ts": time.time(),
               "src": EVIL_SRC, "pid": 4242, "uptime": 1.0, "state": "ready", "counters": {EVIL_COUNTER: 7}}
    return b"heartbeat/ " + msgpack.packb(payload, use_bin_type=True)


@pytest.fixture()
def hostile_beats(daemon: Daemon) -> Iterator[None]:
    """Publishes the hostile heartbeat on the real bus every 0.2 s while the test runs."""
    sender = connect(daemon.runtime_dir, "heart-attack")
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(0.2):
            sender.send_raw(hostile_heartbeat())

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(5)
    sender.close()


def test_status_and_tap_print_a_hostile_src_and_counter_escaped(daemon: Daemon, hostile_beats: None) -> None:
    src, counter = printable(EVIL_SRC, one_line=True), printable(EVIL_COUNTER, one_line=True)
    assert src == "evil\\x1b]0;pwned\\x07\\x1b[2J\\x0dA\\x00\\u202e"
    term = on_terminal(daemon, "status")
    try:
        assert term.wait(60) == 0, term.screen
        raw = term.raw
    finally:
        term.close()
    assert_harmless(raw)
    assert f"{src} " in raw and f"{counter}=7" in raw, raw
    assert re.search(r"^llm +\d+ ready", term.screen, re.M)  # the real stages are still listed

    term = on_terminal(daemon, "tap", "heartbeat")
    try:
        term.expect(re.escape(src), timeout=30)
        raw = term.raw
    finally:
        term.close()
    assert_harmless(raw)
    assert repr({EVIL_COUNTER: 7}) in raw, raw      # tap shows a body field as its repr: escaped too


def test_stats_rows_escape_names_from_the_bus() -> None:
    rows = table([{"profile": "p\x1b[2J", "engine": "e\rx", "provider": "o\nv", "status": "ok",
                   "first_token_ms": 5}])
    assert len(rows) == 2 and all(name in rows[1] for name in ("p\\x1b[2J", "o\\x0av", "e\\x0dx")), rows
    assert not re.search("[\x00-\x1f]", rows[1]), rows


def test_printable_writes_out_every_control_and_keeps_text() -> None:
    assert printable("a\x1b[31mb\x07\x00\x7f\x9b\r") == "a\\x1b[31mb\\x07\\x00\\x7f\\x9b\\x0d"  # C0, DEL, C1 (CSI)
    assert printable("\u202e\u2066\u200f\u061c") == "\\u202e\\u2066\\u200f\\u061c"             # bidi controls
    assert printable("line\n\ttab") == "line\n\ttab"
    assert printable("line\n\ttab", one_line=True) == "line\\x0a\\x09tab"
    assert printable("Привет, 世界 — ok") == "Привет, 世界 — ok"
