"""The shared tag grammar, its stripper, and the words front-ends show for a command."""

from __future__ import annotations

import tracemalloc

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
    # a configured tag that does not close within the lookahead is still one: its body is discarded
    # to the reply's end (or its closing tag), and only the start that fitted is reported
    assert strip([reply + " " + "x" * 40])[1][-1:] == [
        Tag("+memory", "high|cats " + "x" * 21, 19, closed=False, oversize=True)]
    assert strip([reply], lookahead=15) == (   # neither pair closes within 15 characters of its '<'
        "Hi , bold <bogus> x </bogus><br>done ",
        [Tag("e", "smile", 3), Tag("+memory", "high|c", 37, closed=False, oversize=True)])


def test_the_stripper_keeps_code_and_drops_reasoning():
    assert strip(["`<b>x</b> <bogus>y</bogus>` <think>hm <e>x</e></think>ok <e>smile</e>"]) == (
        "`<b>x</b> <bogus>y</bogus>` ok ", [Tag("e", "smile", 31)])


# --- a configured tag longer than the lookahead (issue 14, item 6) ---------------------------------

OVERSIZE = "Да. <+memory>high|" + "кошки " * 10 + "</MEMORY> Ну <e>smile</e>, 3 < 4 и x<y>z."
"""A memory tag of 78 characters, for a lookahead of 40, amid prose with a stray '<' and a lone opening."""
OVERSIZE_WANT = ("Да.  Ну , 3 < 4 и x<y>z.", [Tag("+memory", "high|кошки кошки кошки кошки ко", 4, oversize=True),
                                              Tag("e", "smile", 8)])


def test_an_oversize_configured_tag_is_hidden_to_its_closing_tag_however_the_reply_is_split():
    """Only the start that fitted the lookahead is kept, for history to refuse; the text after the closing
    tag, and the prose '<'s, are kept in order."""
    assert strip([OVERSIZE]) == OVERSIZE_WANT
    assert strip(list(OVERSIZE)) == OVERSIZE_WANT
    for cut in range(len(OVERSIZE) + 1):
        assert strip([OVERSIZE[:cut], OVERSIZE[cut:]]) == OVERSIZE_WANT, cut
    for first in range(0, len(OVERSIZE), 5):
        for second in range(first, len(OVERSIZE), 7):
            pieces = [OVERSIZE[:first], OVERSIZE[first:second], OVERSIZE[second:]]
            assert strip(pieces) == OVERSIZE_WANT, (first, second)


@pytest.mark.parametrize("closing", ["</memory>", "</+memory>", "</Memory>"])
@pytest.mark.parametrize("body", [33, 34, 40, 41, 200])
def test_a_closing_tag_at_any_place_past_the_lookahead_ends_the_oversize_tag(body: int, closing: str):
    """Around the lookahead's edge the closing tag may fall inside the window, across it, or after it."""
    reply = "<+memory>" + "x" * body + closing + "after"
    display, tags = strip([reply])
    assert display == "after" and [(t.name, t.closed) for t in tags] == [("+memory", True)]
    assert tags[0].oversize == (len("<+memory>") + body + len(closing) > 40)
    assert all(strip([reply[:cut], reply[cut:]]) == (display, tags) for cut in range(len(reply) + 1))


def test_an_oversize_tag_the_reply_ends_inside_is_hidden_and_reported_unclosed():
    """A model that never closes its memory dump must not have it read aloud: the rest of the reply is
    its body. Prose is not at risk: only an exact `<name>` of a configured name opens a tag."""
    reply = "Хорошо. <e>" + "длинный текст " * 10
    want = ("Хорошо. ", [Tag("e", ("длинный текст " * 3)[:37].strip(), 8, closed=False, oversize=True)])
    assert strip([reply]) == want and strip(list(reply)) == want
    prose = "Если 3 < 4, а <bogus>" + "y" * 60 + "</bogus> и <3, то x<y>z, <e >, <E"
    assert strip([prose]) == (prose, [])


def test_an_unknown_name_longer_than_the_lookahead_stays_text():
    reply = "<bogus>" + "x" * 40 + "</bogus>"
    assert strip([reply]) == (reply, [])


def test_an_oversize_body_is_discarded_as_it_streams_not_held():
    """A 4 MB body fed in 4 kB deltas: what the stripper holds stays within the lookahead, whatever the
    body's size (traced allocations stay far below one delta's worth of the body)."""
    stripper = TagStripper(DEFAULT_TAGS, 600)
    assert stripper.push("Да. <+memory>high|", False) == ("Да. ", [])
    delta = "кошки и собаки " * 273
    tracemalloc.start()
    try:
        for _ in range(1000):
            assert stripper.push(delta, False) == ("", [])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 200_000, peak
    display, tags = stripper.push("</memory> Всё.", True)
    assert display == " Всё." and len(tags) == 1 and tags[0].oversize and len(tags[0].body) < 600
