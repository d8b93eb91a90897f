"""The port of the mod's text splitting and timing, against values worked out by hand from its C#.

Each expected value below was computed on paper from DialogueControl.cs (DLG:121-148, DLG:355-418)
and Utils.cs (UT:38-44) at fd26ab7, not by running the port: the port must make the game's mistakes.
"""

from __future__ import annotations

import pytest

from voxpipe.frontends.game.modmodel import clean_from_tags, display_parts, part_seconds, split_text, text_seconds

SHORT = 0.5 * 1.05
"""The 0.5 s floor times the 1.05 modifier."""


@pytest.mark.parametrize(("chars", "seconds"), [
    (0, SHORT), (14, SHORT), (15, 1.05), (29, 1.05), (30, 2.1), (119, 7 * 1.05), (120, 8 * 1.05), (500, 8 * 1.05),
])
def test_part_time_uses_integer_division_and_the_clamps(chars, seconds):
    """29 characters are 29 / 15 = 1 second in C#, not 1.93."""
    assert part_seconds("a" * chars) == pytest.approx(seconds)


def test_part_time_counts_only_the_text_left_after_clean_from_tags():
    assert part_seconds("<e>smile</e>" + "a" * 15) == pytest.approx(1.05)
    assert part_seconds("<b>" + "a" * 30 + "</b>") == pytest.approx(SHORT)  # a pair goes with its content


def test_part_time_counts_utf16_units():
    """C#'s Length: 8 emoji are 16 units, one second; Python's len would say 8, the floor."""
    assert part_seconds("😀" * 8) == pytest.approx(1.05)


def test_clean_from_tags():
    assert clean_from_tags("<e>smile</e>Привет <a>Щелчек</a>мир<p>1,0,0</p>") == "Привет мир"
    assert clean_from_tags("a <lone> b") == "a  b"
    assert clean_from_tags("<c>two\nlines</c>x") == "two\nlinesx"  # the pair's `.*?` stops at \n: tags only go
    assert clean_from_tags("x<c>a</c\n>") == "x"  # while `[^>]` does cross it


def test_short_lines_are_kept_trimmed_and_empty_lines_dropped():
    assert split_text("Hello!\n\nWorld?") == ["Hello!", "World?"]
    assert split_text("Hi\r\nYo") == ["Hi", "Yo"]


def test_a_whitespace_only_line_gives_an_empty_part():
    """RemoveEmptyEntries drops "" but not " ", and Trim() then makes it ""."""
    assert split_text(" \nHi") == ["", "Hi"]


def test_a_long_line_is_cut_at_sentence_ends_and_every_sentence_ends_in_a_point():
    line = "One two three four five six seven! Eight nine ten eleven twelve? Thirteen."
    assert len(line) > 70
    assert split_text(line) == ["One two three four five six seven. Eight nine ten eleven twelve.", "Thirteen."]


def test_the_joining_space_is_not_counted_so_a_part_can_be_71():
    line = "a" * 59 + ". " + "b" * 9 + ". c"
    parts = split_text(line)
    assert parts == ["a" * 59 + ". " + "b" * 9 + ".", "c."]
    assert len(parts[0]) == 71


def test_a_whitespace_sentence_becomes_a_lone_point():
    assert split_text("x" * 70 + ". . y") == ["x" * 70 + ".", ". y."]


def test_a_sentence_longer_than_the_limit_is_not_cut():
    assert split_text("z" * 100) == ["z" * 100 + "."]


def test_tag_blocks_count_as_their_placeholder_and_come_back():
    tagged = "<c>" + "x" * 100 + "</c>Hi."  # "@@0@@Hi." is 8 long: not split, not re-punctuated
    assert split_text(tagged) == [tagged]
    text = "<e>smile</e>Hello there. " + "y" * 70 + "."
    assert split_text(text) == ["<e>smile</e>Hello there.", "y" * 70 + "."]


def test_line_length_is_counted_in_utf16_units():
    """36 emoji are 72 units: a long line, so it goes through the sentence path and gains a point."""
    assert split_text("😀" * 36) == ["😀" * 36 + "."]
    assert split_text("😀" * 35) == ["😀" * 35]


def test_display_removes_movement_tags_first_and_sums_the_parts():
    assert display_parts("<m>Следовать за игроком</m>Hi") == ["Hi"]
    assert text_seconds("Hello!\nWorld?") == pytest.approx(2 * SHORT)
    line = "One two three four five six seven! Eight nine ten eleven twelve? Thirteen."
    assert text_seconds(line) == pytest.approx(4 * 1.05 + SHORT)  # 64 chars → 4 s, "Thirteen." → floor
    assert text_seconds("") == 0
