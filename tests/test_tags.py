"""The shared tag grammar and the words front-ends show for a command."""

from __future__ import annotations

import pytest

from services.tags import OPENING, OPENING_START, closer, describe


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
