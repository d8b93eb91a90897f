"""Command tags against the allowlist: valid, invalid and malicious input (pure core)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from services.history.commands import Allowlist, load_allowlist, memory_ids, parse_reply


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
    ("<-memory>all</memory>", "<-memory> argument 1: 'all' is not allowed text"),
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
