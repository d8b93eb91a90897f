"""Command tags against the allowlist: valid, invalid and malicious input (pure core)."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from voxpipe import protocol
from voxpipe.protocol import Command as CommandEvent
from voxpipe.protocol import Message
from voxpipe.stages.chunker.core import Chunker, ChunkerPolicy
from voxpipe.stages.history.commands import (
    MAX_ARGS,
    REASON_CHARS,
    Allowlist,
    load_allowlist,
    memory_ids,
    parse_reply,
)


def parse(text: str, limit: int = 30):
    return parse_reply(text, Allowlist(max_per_reply=limit))


def test_the_companion_tag_set_is_accepted() -> None:
    reply = ("Привет! <e>smile</e> <c>Подойти к игроку</c> <a>wave</a> <m>follow</m> <f>blush</f> "
             "<v>glitch,2.5</v> <music>Calm piano</music> <hint>Look left</hint> <clothes>dress</clothes> "
             "<interaction>sit on chair</interaction> <p>1,-2,0</p> <+memory>high|Игрок любит кошек</memory> "
             "<#memory>3|low|Игрок любит собак</memory> <-memory>4-6</memory>")
    commands = parse(reply)
    assert [c.name for c in commands] == ["e", "c", "a", "m", "f", "v", "music", "hint", "clothes", "interaction",
                                          "p", "+memory", "#memory", "-memory"]
    assert all(c.accepted for c in commands), [c.reason for c in commands if not c.accepted]
    assert commands[5].args == ("glitch", "2.5") and commands[10].args == ("1", "-2", "0")
    assert commands[11].args == ("high", "Игрок любит кошек")


@pytest.mark.parametrize("reply, reason", [
    ("<e>furious-ish</e>", "<e> argument 1: 'furious-ish' is not one of"),
    ("<p>9,0,0</p>", "<p> argument 1: 9 is outside -5..5"),
    ("<p>1,2</p>", "<p> takes 3 argument(s), got 2"),
    ("<v>glitch,600</v>", "<v> argument 2: 600 is outside 0.1..60"),
    ("<teleport>moon</teleport>", "unknown command <teleport>"),
    ("<e>smile", "unclosed <e> tag"),
    ("<e><c>rm -rf /</c></e>", "nested tags are not allowed"),
    ("<c>open door, <script>alert(1)</script></c>", "nested tags are not allowed"),
    ("<c>run\x00payload</c>", "<c> argument 1: 'run\\x00payload' is not allowed text"),
    ("<+memory>urgent|x</memory>", "<+memory> argument 1: 'urgent' is not one of"),
    ("<-memory>all</memory>", "<-memory> argument 1: 'all' is not an id or a range of ids like 3 or 4-6"),
    ("<-memory>9-3</memory>", "<-memory> argument 1: '9-3' is a range that ends before it starts"),
    ("<-memory>12345678901</memory>", "<-memory> argument 1: '12345678901': an id has at most 10 digits"),
    ("<-memory>1-999,2-1000</memory>", "<-memory> argument 1: names 1998 memories; at most 1000 in one tag"),
])
def test_invalid_and_malicious_tags_are_refused_with_the_reason(reply: str, reason: str) -> None:
    commands = parse(reply)
    assert not commands[0].accepted
    assert commands[0].reason.startswith(reason), commands[0].reason


def test_a_thousand_tags_are_capped_and_parsed_fast() -> None:
    reply = " ".join("word <e>smile</e>" for _ in range(1000))
    started = time.process_time()
    commands = parse(reply, limit=30)
    assert time.process_time() - started < 1.0
    assert len(commands) == 1000
    assert sum(c.accepted for c in commands) == 30
    assert commands[30].reason == "more than 30 commands in one reply"


def test_text_that_only_looks_like_tags_is_not_a_command() -> None:
    assert parse("a < b and 3 > 2, also <3 you") == []
    assert parse("x<y>z, vector<int> and a<br>line</br>") == []    # a lone opening, a void element


def test_formatting_is_not_a_command_paired_or_not() -> None:
    assert parse("<b>Важно:</b> завтра <STRONG>очень</strong> <i>важно</em> <span>x</span>") == []
    commands = parse("<b><e>smile</e>Да</b>")
    assert [(c.name, c.accepted) for c in commands] == [("e", True)]


def test_tag_like_code_is_not_a_command_but_a_configured_tag_in_code_is() -> None:
    reply = "Пример:\n```html\n<li>x</li> <bogus>y</bogus> <e>smile</e>\n```\nИ `<div>z</div>` тоже. <bogus>w</bogus>"
    assert [(c.name, c.body, c.accepted) for c in parse(reply)] == [("e", "smile", True), ("bogus", "w", False)]


def test_a_pair_is_a_tag_only_if_it_closes_within_the_lookahead() -> None:
    long = "<bogus>" + "x" * 40 + "</bogus> <e>" + "y" * 40 + "</e>"
    assert [(c.name, c.accepted, c.reason) for c in parse_reply(long, Allowlist(lookahead=30))] == [
        ("e", False, "<e> does not close within 30 characters (chunker.tag_lookahead)")]   # a configured one
    assert [c.name for c in parse_reply(long, Allowlist(lookahead=60))] == ["bogus", "e"]
    assert [c.reason for c in parse_reply("<bogus>x <e>smile", Allowlist(lookahead=30))] == ["unclosed <e> tag"]


def test_reasoning_is_no_command_and_letters_that_grow_in_lowercase_shift_nothing() -> None:
    assert parse("<think>I could <e>smile</e></think>Да.") == []
    commands = parse("İİİİ <e>smile</e> İ<bogus>x</bogus>")
    assert [(c.name, c.args, c.accepted, c.body) for c in commands] == [
        ("e", ("smile",), True, "smile"), ("bogus", (), False, "x")]


def test_memory_id_lists() -> None:
    assert memory_ids("3") == [3]
    assert memory_ids("3, 5") == [3, 5]
    assert memory_ids("4-6") == [4, 5, 6]


def test_a_commands_file_adds_and_replaces_tags(tmp_path: Path) -> None:
    path = tmp_path / "commands.toml"
    path.write_text('[e]\nargs = [{kind = "enum", values = ["Grin"]}]\n'
                    '[dance]\nseparator = ","\nmin_args = 1\nmax_args = 2\n'
                    'args = [{kind = "text", pattern = "[a-z]+"}, {kind = "int", low = 1, high = 10}]\n')
    allowlist = load_allowlist(str(path), 30)
    commands = parse_reply("<e>grin</e><e>smile</e><dance>salsa,3</dance><dance>salsa,99</dance>", allowlist)
    assert [c.accepted for c in commands] == [True, False, True, False]
    path.write_text('[x]\nargs = [{kind = "colour"}]\n')
    with pytest.raises(ValueError, match="tag <x>: kind 'colour' is not one of enum, text, int, number"):
        load_allowlist(str(path), 30)


# --- history finds exactly the tags the chunker hid ------------------------------------------

PIECES = ["<", ">", "</", "/", "e", "E", "b", "i", "strong", "br", "bogus", "y", "+memory", "memory", "+", "think",
          "smile", " ", "\n", "```", "`", "Привет", "İ", "a < b", "x" * 12, "<e>smile</e>", "<bogus>x</bogus>",
          "<b>Важно:</b>", "<e><c>wave</c></e>", "<+memory>high|кошки</memory>", "<think>", "</think>"]


def split(raw: str, cuts: list[int]) -> list[str]:
    points = sorted({0, len(raw), *(c % (len(raw) + 1) for c in cuts)})
    return [raw[a:b] for a, b in itertools.pairwise(points)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(PIECES), max_size=50), st.integers(33, 80),
       st.lists(st.integers(0, 10_000), max_size=20))
def test_history_reports_exactly_the_tags_the_chunker_marked_however_the_reply_streamed(pieces, lookahead, cuts):
    raw = "".join(pieces)
    chunker = Chunker(ChunkerPolicy(tag_lookahead=lookahead))
    chunks = [chunk for delta in split(raw, cuts) for chunk in chunker.feed(delta, 0.0).chunks]
    chunks += chunker.finish(0.0).chunks
    marks = [(mark.tag.lower(), mark.body) for chunk in chunks for mark in chunk.marks]
    assert [(c.name, c.body) for c in parse_reply(raw, Allowlist(lookahead=lookahead))] == marks


def test_a_refusal_always_fits_a_command_event() -> None:
    """Whatever the tag, its `command` event is valid: reason, name and arguments are cut to the
    protocol's limits (which REASON_CHARS and MAX_ARGS must match), so one bad tag cannot fail the
    events of the tags after it."""
    reply = ("<e>" + "x" * 90_000 + "</e><c>" + ",".join(["a"] * 500) + "</c><p>" + "9" * 4000 + ",0,0</p>"
             "<v>glitch," + "1" * 5000 + "</v><+memory>normal|" + "m" * 90_000 + "</memory>")
    commands = parse_reply(reply, Allowlist(lookahead=100_000))
    assert [c.accepted for c in commands] == [False] * 5
    for command in commands:
        event = CommandEvent(name=command.name, args=command.args, accepted=False, reason=command.reason)
        protocol.encode(Message(event, session="s", id="r"))   # raises if any field is over its limit
    assert len(commands[1].args) == MAX_ARGS
    at_limit = CommandEvent(name="c", args=("a",) * MAX_ARGS, accepted=False, reason="r" * REASON_CHARS)
    protocol.encode(Message(at_limit, session="s", id="r"))
    for over in ({"args": ("a",) * (MAX_ARGS + 1)}, {"reason": "r" * (REASON_CHARS + 1)}):
        with pytest.raises(protocol.ProtocolError):
            protocol.encode(Message(CommandEvent(**{**at_limit.__dict__, **over}), session="s", id="r"))
