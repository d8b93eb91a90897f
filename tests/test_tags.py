"""The shared tag grammar, its stripper, and the words front-ends show for a command."""

from __future__ import annotations

import pytest

from voxpipe.stages.tags import (
    CLOSING,
    CLOSING_START,
    DEFAULT_TAGS,
    FORMATTING,
    OPENING,
    OPENING_START,
    VOID,
    Tag,
    TagStripper,
    closer,
    describe,
)


@pytest.mark.parametrize("name, args, words", [
    ("p", ("1", "0", "-1"), "attitude +1, boredom 0, stress \u22121"),
    ("P", ("+5", "-5", "0"), "attitude +5, boredom \u22125, stress 0"),
    ("e", ("smile",), "command: e smile"),   # the emotion has a label of its own
    ("c", ("Подойти к игроку",), "command: Подойти к игроку"),
    ("c", ("wave", "2"), "command: wave, 2"),
    ("a", ("dance",), "animation: dance"),
    ("f", ("blush",), "face effect: blush"),
    ("v", ("blur", "2.5"), "effect blur for 2.5 s"),
    ("+memory", ("high", "Игрок любит кошек"), "remember (high): Игрок любит кошек"),
    ("#memory", ("3", "low", "likes tea"), "memory 3 now (low): likes tea"),
    ("-memory", ("3",), "forget memory 3"),
    ("-memory", ("3-6",), "forget memories 3-6"),
    ("teleport", ("moon",), "command: teleport moon"),              # a tag a commands file added
    ("p", ("calm", "1", "2"), "command: p calm 1 2"),              # a `p` a commands file reshaped
])
def test_a_command_reads_in_words(name, args, words):
    assert describe(name, args) == words


def test_an_opening_is_a_name_in_angle_brackets_and_its_start_is_held():
    assert [m.group(1) for m in OPENING.finditer("<e> <+memory> <Tag_ё1> <1a> <a b> <ab/> <>")] == [
        "e", "+memory", "Tag_ё1"]
    assert all(OPENING_START.fullmatch(text) for text in ("<", "<+", "<b", "<bogus", "<" + "a" * 32))
    assert not any(OPENING_START.fullmatch(text) for text in ("< ", "<3", "<a b", "<" + "a" * 33, "</b"))


def test_a_closer_matches_any_case_and_a_memory_tag_closes_without_its_operator():
    assert closer("bogus").search("x</BoGuS>").start() == 1
    assert [m.group() for m in closer("+memory").finditer("</memory></+MEMORY></-memory>")] == [
        "</memory>", "</+MEMORY>"]


def test_formatting_is_neither_a_default_command_nor_void_and_its_closing_start_is_held():
    assert not FORMATTING & {tag.lower() for tag in DEFAULT_TAGS} and not FORMATTING & VOID
    assert [m.group(1) for m in CLOSING.finditer("</b> </STRONG> </+b> </ b> </b/>")] == ["b", "STRONG"]
    assert all(CLOSING_START.fullmatch(text) for text in ("</", "</s", "</stro"))
    assert not any(CLOSING_START.fullmatch(text) for text in ("</ ", "</3", "</b>"))


def strip(pieces: list[str], configured: tuple[str, ...] = ("e", "+memory"), lookahead: int = 40):
    stripper = TagStripper(configured, lookahead)
    outs = [stripper.push(piece, False) for piece in pieces] + [stripper.push("", True)]
    return "".join(display for display, _ in outs), [tag for _, found in outs for tag in found]


def test_the_stripper_reports_each_tag_where_it_stood_in_the_display_text():
    reply = "Hi <E>smile</e>, <b>bold</b> <bogus> x </bogus><br>done <+memory>high|cats"
    want = ("Hi , bold <br>done ",
            [Tag("e", "smile", 3), Tag("bogus", "x", 10), Tag("+memory", "high|cats", 19, closed=False)])
    assert strip([reply]) == want
    assert strip(list(reply)) == want
    assert strip([reply + " " + "x" * 40])[1][-1:] == [Tag("bogus", "x", 10)]   # the tail is no longer inside it
    assert strip([reply], lookahead=15) == (   # neither pair closes within 15 characters of its '<'
        "Hi , bold <bogus> x </bogus><br>done <+memory>high|cats", [Tag("e", "smile", 3)])


def test_the_stripper_keeps_code_and_drops_reasoning():
    assert strip(["`<b>x</b> <bogus>y</bogus>` <think>hm <e>x</e></think>ok <e>smile</e>"]) == (
        "`<b>x</b> <bogus>y</bogus>` ok ", [Tag("e", "smile", 31)])
