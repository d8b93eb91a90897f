"""The chunker core: invariants over generated replies, and one example per rule, in Russian and English."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from voxpipe.protocol import Chunk, Mark, TextMark
from voxpipe.stages.chunker.core import Chunker, ChunkerPolicy
from voxpipe.stages.tags import FORMATTING, VOID


def Policy(**overrides: object) -> ChunkerPolicy:
    """A policy whose chunks never depend on how the reply was split: first_at_delta_end, the one
    rule that reads where a delta ends, is off here and tested on its own at the end of this file."""
    return ChunkerPolicy(**{"first_at_delta_end": False, **overrides})  # type: ignore[arg-type]


DEFAULT = Policy()


def run(reply: str | list[str], policy: ChunkerPolicy = DEFAULT) -> tuple[str, list[Chunk]]:
    """Feeds the reply (one string, or its deltas) with no stall, then finishes it."""
    chunker = Chunker(policy)
    display, chunks = [], []
    for delta in [reply] if isinstance(reply, str) else reply:
        out = chunker.feed(delta, 0.0)
        display.append(out.display)
        chunks += out.chunks
    out = chunker.finish(0.0)
    return "".join(display) + out.display, chunks + list(out.chunks)


def texts(reply: str | list[str], policy: ChunkerPolicy = DEFAULT) -> list[str]:
    return [chunk.text for chunk in run(reply, policy)[1]]


def spoken(reply: str, policy: ChunkerPolicy = DEFAULT) -> str:
    return " ".join(" ".join(texts(reply, policy)).split())


def chars(reply: str) -> list[str]:
    return list(reply)


# --- invariants over generated replies ---------------------------------------------------

CODE_PHRASE = "Код на экране."
WORDS = ["Привет", "мир", "hello", "world", "дела", "Ёжик", "3.14", "2,5", "12:30", "30.11.2026", "v1.2.3",
         "e.g.", "i.e.", "т.е.", "т.к.", "и т.д.", "Dr.", "Mr.", "U.S.", "А. С. Пушкин", "г.", "ул.", "стр.",
         "me@example.org", "https://ex.com/a_b?x=1", "www.site.ru", "(скобки)", "«цитата»", '"quote"',
         "—", "что-то", "a < b", "x<y", "x<y>z", "<3", "2 > 1", "vector<int>", "1.", "2)", "100%", "C++", "OK",
         "Нет", "Yes", "каб. 305", "тел. +7 495 123-45-67", "(495) 123-45-67", "ок. 10 км", "No. 5", "Apt. 4B",
         "Ж.-П. Сартр", "J.-B. Say", "Пушкин А. С.", "J.R.R. Tolkien"]
SEPARATORS = [" ", " ", " ", ", ", ". ", "! ", "? ", "?! ", "... ", "… ", "; ", ": ", " — ",
              "\n", "\n\n", ".\n"]
BODIES = ["smile", "Подойти к игроку", "1,-2,0", "  wave  ", "happy|sad"]
# Names no configured tag has, so only the rule for any well-formed pair makes them tags.
OTHER_NAMES = ["bogus", "Z", "div", "x1", "snake_name", "Tag_ё", "+note", "#id", "-gone"]
OTHER_BODIES = [*BODIES, "x", "a < b", "две\nстроки", ""]

# A part of a reply: (raw, expected display, expected speech, expected marks).
Part = tuple[str, str, str, tuple[tuple[str, str], ...]]


def plain(word: str) -> Part:
    return word, word, word, ()


def formatting(name: str, word: str, form: str) -> Part:
    """HTML formatting around a word, paired or lone: the markup goes from display and speech, the word stays."""
    opening, closing = f"<{name}>", f"</{name.swapcase()}>"
    raw = {"pair": opening + word + closing, "opening": opening + word, "closing": word + closing}[form]
    return raw, word, word, ()


def other_tag(name: str, body: str, upper_closer: bool, short_closer: bool) -> Part:
    """`<name>body</name>` for a name no policy configures; an operator's tag may close without it."""
    closing = name[1:] if short_closer and name[0] in "+#-" else name
    closing = closing.upper() if upper_closer else closing
    return f"<{name}>{body}</{closing}>", "", "", ((name.lower(), body.strip()),)


words = st.sampled_from(WORDS).map(plain)
simple_words = st.sampled_from(["Привет", "world", "дела", "hello", "Ёжик"])
tags = st.tuples(st.sampled_from(DEFAULT.tags), st.sampled_from(BODIES)).map(
    lambda tb: (f"<{tb[0]}>{tb[1]}</{tb[0]}>", "", "", ((tb[0], tb[1].strip()),)))
other_tags = st.builds(other_tag, st.sampled_from(OTHER_NAMES), st.sampled_from(OTHER_BODIES), st.booleans(),
                       st.booleans())
formatted = st.builds(formatting, st.sampled_from(["b", "I", "strong", "EM", "span", "sup"]), simple_words,
                      st.sampled_from(["pair", "opening", "closing"]))
think = st.just(("<think>I should <e>smile</e> and say *hi* < 3</think>", "", "", ()))
emphasis = st.tuples(st.sampled_from(["**", "*", "_", "__", "`", "~~"]), simple_words).map(
    lambda mw: (f"{mw[0]}{mw[1]}{mw[0]}", f"{mw[0]}{mw[1]}{mw[0]}", mw[1], ()))
emoji = st.sampled_from(["😊", "👍🏽", "❤️", "🇷🇺"]).map(lambda e: (e, e, "", ()))
links = st.tuples(simple_words, simple_words).map(
    lambda ww: (f"[{ww[0]} {ww[1]}](https://ex.com/p_(x)?q=*)", f"[{ww[0]} {ww[1]}](https://ex.com/p_(x)?q=*)",
                f"{ww[0]} {ww[1]}", ()))
fence = st.sampled_from([
    ("\n```python\nx = 1 * 2  # <e>in code</e>\n```\n", "\n```python\nx = 1 * 2  # \n```\n", f"\n{CODE_PHRASE}\n",
     (("e", "in code"),)),
    ("\n~~~html\n<li>x</li> <T> a<b\n<bogus>y</bogus>\n~~~\n", "\n~~~html\n<li>x</li> <T> a<b\n<bogus>y</bogus>\n~~~\n",
     f"\n{CODE_PHRASE}\n", ()),
])
inline_code = st.just(("`<b>x</b>`", "`<b>x</b>`", "<b>x", ()))
line_markup = st.tuples(st.sampled_from(["## ", "# ", "- ", "* ", "+ ", "> ", "• "]), simple_words).map(
    lambda mw: (f"\n{mw[0]}{mw[1]}", f"\n{mw[0]}{mw[1]}", f"\n{mw[1]}", ()))
snake = st.just(("snake_case", "snake_case", "snake case", ()))
html = st.sampled_from([("<br/>", "<br/>", "\n", ()), ("<BR>", "<BR>", "\n", ()), ("<hr>", "<hr>", "", ()),
                        ("</bogus>", "</bogus>", "", ()), ("<bogus/>", "<bogus/>", "", ())])
parts = st.one_of(words, words, words, tags, other_tags, formatted, think, emphasis, emoji, links, fence, inline_code,
                  line_markup, snake, html)


@st.composite
def replies(draw: st.DrawFn) -> tuple[str, str, str, list[tuple[str, str]]]:
    """A reply as (raw, expected display, expected speech, expected marks)."""
    raw, display, speech, marks = [], [], [], []
    for part in draw(st.lists(st.tuples(parts, st.sampled_from(SEPARATORS)), max_size=40)):
        (r, d, s, m), sep = part
        raw.append(r + sep)
        display.append(d + sep)
        speech.append(s + sep)
        marks += m
    return "".join(raw), "".join(display), "".join(speech), marks


@st.composite
def policies(draw: st.DrawFn) -> ChunkerPolicy:
    min_chars = draw(st.integers(1, 60))
    min_first = draw(st.integers(1, 30))
    return Policy(min_first_chars=min_first, max_first_words=draw(st.integers(1, 15)),
                         min_chars=min_chars, max_chars=draw(st.integers(max(40, min_chars, min_first), 200)),
                         code_phrase=CODE_PHRASE)


def split(raw: str, cuts: list[int]) -> list[str]:
    points = sorted({0, len(raw), *(c % (len(raw) + 1) for c in cuts)})
    return [raw[a:b] for a, b in itertools.pairwise(points)]


# Markup that must never be spoken; a lone opening such as the <y> of x<y>z is text, so it is spoken.
MARKUP = re.compile(r"[*_`~#|\[\]]|</\w+>|<\w+/>|<think|[\U0001F000-\U0001FAFF\u2600-\u27BF\uFE0F\u200D]")
URL = re.compile(r"https?://\S+|www\.\S+")
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(replies(), policies(), st.lists(st.integers(0, 10_000), max_size=30))
def test_generated_replies_keep_every_invariant(reply, policy, cuts):
    raw, want_display, want_speech, want_marks = reply
    display, chunks = run(raw, policy)
    assert run(split(raw, cuts), policy) == (display, chunks), "another split gave other chunks"
    assert display == want_display
    assert " ".join(c.text for c in chunks).split() == want_speech.split()
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert [c.final for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert all(c.text for c in chunks[:-1]), "only the final chunk may be empty"
    for chunk in chunks:
        assert len(chunk.text) <= policy.max_chars
        assert chunk.text == " ".join(chunk.text.split())
        assert not MARKUP.search(URL.sub("", chunk.text)), chunk.text
        assert all(m.chunk == chunk.index and 0 <= m.offset <= len(chunk.text) for m in chunk.marks)
    assert [(m.tag, m.body) for c in chunks for m in c.marks] == want_marks


@FAST
@given(replies())
def test_feeding_one_character_at_a_time_changes_nothing(reply):
    raw = reply[0]
    assert run(chars(raw)) == run(raw)


@FAST
@given(st.text(alphabet=st.sampled_from("ab .,!?\n<>/e*_`~#[]()-—«»😊:3"), max_size=200),
       st.lists(st.integers(0, 10_000), max_size=20))
def test_arbitrary_text_is_split_the_same_way_and_within_max_chars(raw, cuts):
    policy = Policy(max_chars=20, min_chars=5, min_first_chars=3, tag_lookahead=20, tags=("e",))
    display, chunks = run(raw, policy)
    assert run(split(raw, cuts), policy) == (display, chunks)
    assert all(len(c.text) <= 20 for c in chunks)
    assert chunks[-1].final and not any(c.final for c in chunks[:-1])


# --- the first chunk ---------------------------------------------------------------------

def test_first_chunk_at_first_clause_boundary_long_enough():
    assert texts("Well, honestly, I think we should go now. It is late.")[0] == "Well, honestly,"
    assert texts("Да, конечно, я помогу тебе с этим прямо сейчас. Начнём.")[0] == "Да, конечно,"


def test_first_chunk_is_out_before_the_sentence_ends():
    chunker = Chunker()
    assert chunker.feed("Ну, хорошо, давай", 0.0).chunks[0].text == "Ну, хорошо,"


def test_first_chunk_after_max_first_words_without_punctuation():
    reply = "one two three four five six seven eight nine ten eleven twelve"
    assert texts(reply)[0] == "one two three four five six seven eight nine ten"
    policy = Policy(max_first_words=3)
    assert texts("раз два три четыре пять", policy)[0] == "раз два три"


def test_first_chunk_never_ends_inside_initials():
    assert texts("Это сделал А. С. Пушкин", Policy(max_first_words=4))[0] == "Это сделал А. С. Пушкин"


# --- later chunks --------------------------------------------------------------------------

def test_later_chunks_end_at_sentences_and_merge_short_ones():
    reply = "Sure, here it is. Yes. No. Maybe. This sentence is long enough to stand alone. End."
    assert texts(reply) == [
        "Sure, here it is.", "Yes. No. Maybe. This sentence is long enough to stand alone.", "End."]


def test_over_long_sentence_is_cut_at_the_best_clause_then_at_a_word():
    policy = Policy(max_chars=60, min_chars=20)
    reply = ("Начнём с простого. Это предложение очень длинное, в нём есть запятая; и точка с запятой, "
             "а потом оно тянется дальше без всяких знаков препинания до самого конца строки")
    got = texts(reply, policy)
    assert got[1] == "Это предложение очень длинное, в нём есть запятая;"
    assert all(len(text) <= 60 for text in got)
    assert " ".join(got).split() == reply.split()
    words_only = texts("a " + "слово " * 40, policy)
    assert all(len(text) <= 60 and not text.endswith("сло") for text in words_only)


def test_a_word_longer_than_max_chars_is_the_only_thing_cut_inside():
    url = "https://example.com/" + "x" * 80
    got = texts(f"См. {url} сейчас.", Policy(max_chars=40, min_chars=10))
    assert all(len(text) <= 40 for text in got)
    assert "".join(got).replace(" ", "") == f"См.{url}сейчас."


# --- Russian and English: what is not a boundary ----------------------------------------------

@pytest.mark.parametrize("sentence", [
    "Купи хлеб, молоко, т.е. всё для завтрака, т.к. утром некогда.",
    "Встреча в г. Москва на ул. Ленина, см. стр. 5 договора.",
    "Это написал А. С. Пушкин, а прочитал Л. Н. Толстой.",
    "Pi is 3.14 and e is about 2,71 today.",
    "Meet me at 12:30 on 30.11.2026 with version v1.2.3 installed.",
    "Write to me@example.org or open https://example.com/a.b?x=1 first.",
    "Dr. Smith and Mr. Jones met in the U.S. at noon, e.g. for lunch.",
    "Use tools, i.e. hammers, vs. bare hands, etc. and so on.",
    "Ну... я не знаю, что сказать.",
    "«Кто там?» — спросил он тихо у двери.",
    '"Who is there?" he asked the empty room.',
])
def test_no_cut_inside_abbreviations_numbers_urls_and_quoted_questions(sentence):
    policy = Policy(min_first_chars=200, max_first_words=100, max_chars=200)
    assert texts(sentence + " Next one.", policy)[0] == sentence + " Next one."
    later = texts(["This is the start. ", sentence, " Next sentence here."], Policy(min_chars=5))
    assert later[1] == sentence


@pytest.mark.parametrize("text, first", [
    ("Купи хлеб, молоко и т.д. Потом позвони мне обязательно.", "Купи хлеб, молоко и т.д."),
    ("Это было в 2026 г. Потом всё изменилось навсегда.", "Это было в 2026 г."),
    ("We bought apples, pears, etc. Then we went home together.", "We bought apples, pears, etc."),
    ("Он сказал: «Я приду.» Потом ушёл и больше не вернулся.", "Он сказал: «Я приду.»"),
    ("Really?! That is the best news of the whole week.", "Really?!"),
    ("Подожди… Ладно, давай попробуем ещё раз с начала.", "Подожди…"),
])
def test_sentence_ends_after_terminal_abbreviations_quotes_and_ellipses(text, first):
    assert texts("This is the start. " + text, Policy(min_chars=1))[1] == first


def test_dialogue_dashes_and_parentheses_are_clause_boundaries():
    policy = Policy(min_chars=1, max_chars=30)
    assert texts("— Привет, — сказал он. — Как дела?", Policy(min_first_chars=1, min_chars=1)) == [
        "— Привет,", "— сказал он.", "— Как дела?"]
    got = texts("Москва — столица России (и самый большой город страны по населению)", policy)
    assert got[0] == "Москва — столица России"


def test_lists_and_headings_are_cut_per_line_and_blank_lines_always_cut():
    reply = "Вот список:\n1. Молоко\n2) Хлеб\n- яйца\n\n## Рецепт\nСмешайте всё."
    assert texts(reply) == ["Вот список:", "1. Молоко", "2) Хлеб", "яйца", "Рецепт", "Смешайте всё."]
    assert texts("First paragraph here\n\nsecond one") == ["First paragraph here", "second one"]


# --- abbreviations before numbers, and initials in their rarer forms ------------------------------

def cut_points(chunks: list[str]) -> list[int]:
    """Where the chunks were cut, counted in non-space characters of the reply."""
    return list(itertools.accumulate(len("".join(text.split())) for text in chunks))[:-1]


def cuts_inside(reply: str, chunks: list[str], form: str) -> list[int]:
    """The cuts strictly inside any occurrence of `form` in the reply."""
    squeezed, target = "".join(reply.split()), "".join(form.split())
    spans = [(m.start(), m.end()) for m in re.finditer(re.escape(target), squeezed)]
    assert spans, f"{form!r} is not in {reply!r}"
    return [cut for cut in cut_points(chunks) for start, end in spans if start < cut < end]


def streamings(reply: str) -> list[list[str]]:
    """The whole reply, one character at a time, and every split into two deltas."""
    return [[reply], chars(reply), *([reply[:cut], reply[cut:]] for cut in range(1, len(reply)))]


def eager_policies(reply: str) -> list[ChunkerPolicy]:
    """Policies that cut as early as they may, the first chunk after 1, 2, … words: every gap of the
    reply is offered as a cut to the first-chunk rule, and every sentence end to the later-chunk rule."""
    return [Policy(min_first_chars=1, max_first_words=k, min_chars=1)
            for k in range(1, len(reply.split()) + 1)]


# (a sentence, the forms in it that must never be cut inside)
ABBREVIATED_NUMBERS = [
    ("Жду тебя в каб. 305 после обеда.", ["каб. 305"]),
    ("Она живёт в комн. 12 на третьем этаже.", ["комн. 12"]),
    ("Приходи в оф. 7 к обеду.", ["оф. 7"]),
    ("Звони по тел. +7 495 123-45-67 после шести.", ["тел. +7 495 123-45-67"]),
    ("Звони по тел. (495) 123-45-67 днём.", ["тел. (495) 123-45-67"]),
    ("Это рядом, д. 5 по той улице.", ["д. 5"]),
    ("Смотри стр. 2 в учебнике.", ["стр. 2"]),
    ("Мой адрес ул. Ленина, д. 5, кв. 12 на третьем этаже.", ["ул. Ленина", "д. 5", "кв. 12"]),
    ("Я живу в г. Москва уже давно.", ["г. Москва"]),
    ("Для игры нужно мин. 5 человек.", ["мин. 5"]),
    ("До дачи ок. 10 км по трассе.", ["ок. 10 км"]),
    ("Звоните по т. 8-800-555-35-35 бесплатно.", ["т. 8-800-555-35-35"]),
    ("Это было в 2026 г. 5 мая утром.", ["г. 5"]),
    ("Go to Rm. 305 on the third floor.", ["Rm. 305"]),
    ("She lives in Apt. 4B above the bakery.", ["Apt. 4B"]),
    ("The house is No. 5 on this street.", ["No. 5"]),
    ("Call Tel. +1 555 123 4567 after six.", ["Tel. +1 555 123 4567"]),
    ("Then dial Ext. 12 for the front desk.", ["Ext. 12"]),
    ("The lake is approx. 10 km from here.", ["approx. 10 km"]),
    ("The chart in Fig. 3 shows it well.", ["Fig. 3"]),
    ("Start with Vol. 2 of the series.", ["Vol. 2"]),
    ("The quote is on p. 17 of the book.", ["p. 17"]),
    ("The bus stops at St. 5 near the park.", ["St. 5"]),
]
RARE_INITIALS = [
    ("Это написал Ж.-П. Сартр в молодости.", ["Ж.-П. Сартр"]),
    ("Доклад делал А.-Б. Иванов из Казани.", ["А.-Б. Иванов"]),
    ("Стихи писал А.С.Пушкин всю жизнь.", ["А.С.Пушкин"]),
    ("Стихи писал А.С. Пушкин всю жизнь.", ["А.С. Пушкин"]),
    ("В списке первым стоит Пушкин А. С. и его стихи.", ["Пушкин А. С."]),
    ("В указателе дважды стоит Сартр Ж.-П. и его пьесы.", ["Сартр Ж.-П."]),
    ("This was written by J.-P. Sartre long ago.", ["J.-P. Sartre"]),
    ("The economist J.-B. Say said so.", ["J.-B. Say"]),
    ("My favourite author is J.R.R. Tolkien of course.", ["J.R.R. Tolkien"]),
    ("The catalogue lists Tolkien J. R. R. as the author.", ["Tolkien J. R. R."]),
    ("The index lists Sartre J.-P. twice.", ["Sartre J.-P."]),
]


@pytest.mark.parametrize("sentence, forms", ABBREVIATED_NUMBERS + RARE_INITIALS)
def test_abbreviations_before_numbers_and_rare_initials_are_never_cut_inside(sentence, forms):
    for reply, policies_ in ((sentence, [DEFAULT, *eager_policies(sentence)]),
                             ("Так. " + sentence + " Дальше.", [Policy(min_first_chars=1, min_chars=1)])):
        for policy in policies_:
            whole = texts(reply, policy)
            for form in forms:
                assert not cuts_inside(reply, whole, form), (form, whole, policy)
            for deltas in streamings(reply):
                assert texts(deltas, policy) == whole, (deltas, policy)


@pytest.mark.parametrize("text, first", [
    ("Он живёт в комн. 12. Потом ушёл.", "Он живёт в комн. 12."),
    ("Позвони мне по тел. +7 495 123-45-67. Я буду ждать.", "Позвони мне по тел. +7 495 123-45-67."),
    ("До дачи ок. 10 км. Поедем на машине.", "До дачи ок. 10 км."),
    ("Это написал Ж.-П. Сартр. Потом его читали все.", "Это написал Ж.-П. Сартр."),
    ("Мне нравится А.С.Пушкин. Его стихи прекрасны.", "Мне нравится А.С.Пушкин."),
    ("Я видел там много тел. Потом убежал.", "Я видел там много тел."),
    ("Подожди меня 5 мин. Я сейчас приду.", "Подожди меня 5 мин."),
    ("Go to Rm. 305. It is on the third floor.", "Go to Rm. 305."),
    ("She lives in Apt. 4B. Come and visit.", "She lives in Apt. 4B."),
    ("The economist was J.-B. Say. He wrote about markets.", "The economist was J.-B. Say."),
    ("My favourite is J.R.R. Tolkien. His books are great.", "My favourite is J.R.R. Tolkien."),
    ("That word is quite apt. Use it in the essay.", "That word is quite apt."),
    ("We waited for 10 min. Then the bus came.", "We waited for 10 min."),
])
def test_a_sentence_still_ends_right_after_these_words(text, first):
    assert texts(text)[0] == first
    assert texts("Так. " + text, Policy(min_first_chars=1, min_chars=1))[1] == first
    assert texts(chars("Так. " + text), Policy(min_first_chars=1, min_chars=1))[1] == first


@pytest.mark.parametrize("reply, chunk", [
    ("Ты спрашиваешь, правда ли это? No. It is not true at all.", "No."),
    ("Ты хочешь пойти гулять? Ок. Давай пойдём прямо сейчас.", "Ок."),
])
def test_an_abbreviation_that_is_also_a_word_ends_a_sentence_before_a_capital(reply, chunk):
    assert chunk in texts(reply, Policy(min_first_chars=1, min_chars=1))


def test_initials_never_end_a_chunk_even_at_the_end_of_a_sentence():
    """«Пушкин А. С. Потом» cannot be told from «в Москве А. С. Пушкин жил», so initials always bind."""
    got = texts("Так. Это написал Пушкин А. С. Потом его читали все.", Policy(min_first_chars=1, min_chars=1))
    assert got == ["Так.", "Это написал Пушкин А. С. Потом его читали все."]


@pytest.mark.parametrize("reply, decided_by", [
    ("Жду тебя в каб. 305 сегодня, приходи.", "Жду тебя в каб. 305 сегодня,"),
    ("Это написал Ж.-П. Сартр, я уверена.", "Это написал Ж.-П. Сартр,"),
    ("Call Tel. +1 555 123 4567 today, please.", "Call Tel. +1 555 123 4567 today,"),
    ("Call Tel. +1 555 123 4567, please.", "Call Tel. +1 555 123 4567, "),   # "4567,5" would be a decimal
    ("Я видел там много тел. Потом убежал.", "Я видел там много тел. П"),
    ("Позвони мне по тел. +7 495 123-45-67. Я жду.", "Позвони мне по тел. +7 495 123-45-67. Я"),
    ("one two three four five six seven eight nine Пушкин Алексей ушёл", "one two three four five six seven eight nine "
                                                                          "Пушкин Ал"),
    ("one two three four five six seven eight nine ten 10 человек", "one two three four five six seven eight nine "
                                                                     "ten 1"),
])
def test_the_first_chunk_waits_for_no_more_text_than_decides_it(reply, decided_by):
    """The rules read ahead only as far as they must: a comma after the form is cut on arrival, and a
    word that could start a binding form is held for the one character that tells."""
    chunker = Chunker()
    for n in range(1, len(reply) + 1):
        if chunker.feed(reply[n - 1], 0.0).chunks:
            assert reply[:n] == decided_by
            return
    pytest.fail("no first chunk before the end")


@pytest.mark.parametrize("fed, spoken_first", [
    ("Жду тебя в каб.", "Жду тебя в"),
    ("Позвони мне по тел.", "Позвони мне по"),
    ("Это написал Ж.-П.", "Это написал"),
    ("Это написал Пушкин А", "Это написал"),
])
def test_a_stall_flush_does_not_cut_after_an_abbreviation_or_before_initials(fed, spoken_first):
    chunker = Chunker()
    chunker.feed(fed, 0.0)
    assert [c.text for c in chunker.tick(1.0).chunks] == [spoken_first]


@pytest.mark.parametrize("form", ["Dr. Smithson", "д. 305555", "Ж.-П. Сартр", "тел. +7 495"])
def test_a_forced_cut_avoids_abbreviations_and_initials_while_another_gap_fits(form):
    """The chunk must be cut before it passes max_chars: a gap of a min_chars chunk inside the form
    loses to a shorter one outside it."""
    policy = Policy(min_first_chars=1, max_first_words=100, min_chars=35, max_chars=40)
    got = texts(f"Так. Раз два три четыре пять шесть семь {form} и ещё слова. Всё.", policy)
    assert got[:3] == ["Так.", "Раз два три четыре пять шесть семь", f"{form} и ещё слова. Всё."]


# Not "г. Москва": after a number, as in "каб. 305 г. Москва", «г.» reads as a year ending a sentence
# ("в 2026 г. Потом"), which is the older rule.
FORMS = [form for _, forms in ABBREVIATED_NUMBERS + RARE_INITIALS for form in forms
         if form not in ("г. 5", "г. Москва")]
FILLERS = ["и", "потом", "мы", "пошли", "домой", "Маша", "and", "then", "we", "went", "home", "Anna"]
FORM_SEPARATORS = [" ", " ", " ", ", ", ". ", "! ", "? ", " — ", "; ", ": ", "\n"]


@st.composite
def replies_with_forms(draw: st.DrawFn) -> tuple[str, list[tuple[int, int]]]:
    """A reply of filler words and forms, and where each form stands, in non-space characters."""
    raw: list[str] = []
    spans: list[tuple[int, int]] = []
    at = 0
    for is_form, sep in draw(st.lists(st.tuples(st.booleans(), st.sampled_from(FORM_SEPARATORS)), min_size=1,
                                      max_size=16)):
        word = draw(st.sampled_from(FORMS if is_form else FILLERS))
        size = len("".join(word.split()))
        if is_form:
            spans.append((at, at + size))
        raw.append(word + sep)
        at += size + len("".join(sep.split()))
    return "".join(raw), spans


@FAST
@given(replies_with_forms(), policies(), st.lists(st.integers(0, 10_000), max_size=20))
def test_no_streaming_split_and_no_policy_ever_cuts_inside_these_forms(reply, policy, cuts):
    raw, spans = reply
    whole = texts(raw, policy)
    assert texts(split(raw, cuts), policy) == whole
    assert "".join("".join(whole).split()) == "".join(raw.split())
    inside = [cut for cut in cut_points(whole) for start, end in spans if start < cut < end]
    assert not inside, (whole, inside)


SENTENCE_ENDING_FORMS = ["в комн. 12", "по тел. +7 495 123-45-67", "ок. 10 км", "у Ж.-П. Сартр", "А.С.Пушкин",
                         "много тел", "через 5 мин", "в Rm. 305", "Apt. 4B", "by J.-B. Say", "J.R.R. Tolkien",
                         "quite apt", "for 10 min", "is No. 5"]


@FAST
@given(st.lists(st.sampled_from(FILLERS), max_size=4), st.sampled_from(SENTENCE_ENDING_FORMS),
       st.lists(st.sampled_from(FILLERS), min_size=1, max_size=4), st.lists(st.integers(0, 10_000), max_size=20))
def test_a_sentence_ending_in_one_of_these_forms_is_still_cut_there(lead, form, tail, cuts):
    sentence = " ".join(["Вот", *lead, form]) + "."
    raw = f"Так. {sentence} {' '.join(tail).capitalize()} конец."
    got = texts(split(raw, cuts), Policy(min_first_chars=1, min_chars=1))
    assert got[1] == sentence, got


# --- never spoken ----------------------------------------------------------------------------

def test_tags_are_marks_never_speech_even_split_across_deltas():
    display, chunks = run(["<e>sm", "ile</e>Привет! Как <", "c>Подойти к игроку</", "c>дела?"])
    assert display == "Привет! Как дела?"
    assert [c.text for c in chunks] == ["Привет! Как дела?"]
    assert chunks[0].marks == (Mark(tag="e", body="smile", chunk=0, offset=0),
                               Mark(tag="c", body="Подойти к игроку", chunk=0, offset=12))


def test_display_marks_point_into_the_display_delta_they_came_with():
    chunker = Chunker()
    outputs = [chunker.feed(delta, 0.0) for delta in ["<e>sm", "ile</e>Привет! Как <", "c>Подойти</c>дела?"]]
    assert [out.display for out in outputs] == ["", "Привет! Как ", "дела?"]
    assert [out.display_marks for out in outputs] == [
        (), (TextMark(tag="e", body="smile", offset=0),), (TextMark(tag="c", body="Подойти", offset=0),)]


def test_marks_point_into_the_chunk_being_assembled():
    policy = Policy(min_first_chars=1, min_chars=1)
    _, chunks = run("Привет!<e>smile</e> Как дела? Отлично.<p>1,-2,0</p>", policy)
    assert [c.text for c in chunks] == ["Привет!", "Как дела?", "Отлично."]
    assert chunks[1].marks == (Mark(tag="e", body="smile", chunk=1, offset=0),)
    assert chunks[2].marks == (Mark(tag="p", body="1,-2,0", chunk=2, offset=8),) and chunks[2].final
    _, chunks = run("Hello there, my <E>wink</E>friend.")
    assert chunks[1].marks == (Mark(tag="e", body="wink", chunk=1, offset=3),) and chunks[1].text[3:] == "friend."


# --- what counts as a tag -------------------------------------------------------------------

def tag_oracle(text: str, lookahead: int) -> tuple[str, list[tuple[str, str]]]:
    """The tag rule, written plainly over a whole reply without code or configured tags: at a '<',
    the opening or closing tag of a formatting element such as <b> is dropped; a well-formed
    `<name>` (not a void element such as <br>) whose closing tag ends within `lookahead`
    characters of the '<' is a tag; everything else is text."""
    shown, marks, pos = [], [], 0
    while pos < len(text):
        markup = re.compile(r"</?([A-Za-z]\w{0,31})>").match(text, pos)
        if markup and markup.group(1).lower() in FORMATTING:
            pos = markup.end()
            continue
        opening = re.compile(r"<([+#\-]?[A-Za-z]\w{0,31})>").match(text, pos)
        if opening and opening.group(1).lower() not in VOID:
            name = opening.group(1).lower()
            names = [name, name[1:]] if name[0] in "+#-" else [name]
            closing = re.compile("|".join(f"</{re.escape(n)}>" for n in names), re.I)
            close = closing.search(text, opening.end(), pos + lookahead)
            if close:
                marks.append((name, text[opening.end():close.start()].strip()))
                pos = close.end()
                continue
        shown.append(text[pos])
        pos += 1
    return "".join(shown), marks


ANGLE_PIECES = ["<", ">", "</", "/>", "b", "B", "span", "bogus", "y", "x", "+", "-", "#", "_", "1", "ё", "br", " ",
                "\n", "Привет", "a < b", ".", ","]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(ANGLE_PIECES), max_size=60), st.integers(8, 60),
       st.lists(st.integers(0, 10_000), max_size=20))
def test_tags_are_exactly_the_well_formed_pairs_and_formatting_goes_however_the_reply_is_split(pieces, lookahead, cuts):
    raw = "".join(pieces)
    policy = Policy(tags=(), tag_lookahead=lookahead)
    display, chunks = run(raw, policy)
    want_display, want_marks = tag_oracle(raw, lookahead)
    assert display == want_display
    assert [(m.tag, m.body) for c in chunks for m in c.marks] == want_marks
    assert run(split(raw, cuts), policy) == (display, chunks)
    assert run(chars(raw), policy) == (display, chunks)


@pytest.mark.parametrize("reply, display, speech, marks", [
    ("Echo: <bogus>x</bogus>. Done.", "Echo: . Done.", "Echo: . Done.", [("bogus", "x")]),
    ("Ответ <мусор>нет</мусор>, а <bogus>икс</bogus> готов.", "Ответ <мусор>нет</мусор>, а  готов.",
     "Ответ <мусор>нет</мусор>, а готов.", [("bogus", "икс")]),
    ("<BOGUS>x</Bogus>Ok.", "Ok.", "Ok.", [("bogus", "x")]),
    ("A<+note>x</note>b<+note>y</+NOTE>c", "Abc", "Abc", [("+note", "x"), ("+note", "y")]),
    ("Hi <bogus>a <e>smile</e> b</bogus>!", "Hi !", "Hi !", [("bogus", "a <e>smile</e> b")]),
    ("<a1>x</a1><snake_case>y</snake_case><Tag_ё>z</tag_Ё>Да.", "Да.", "Да.",
     [("a1", "x"), ("snake_case", "y"), ("tag_ё", "z")]),
    ("Пусть a < b и x<y>z, 2<3>1.", "Пусть a < b и x<y>z, 2<3>1.", "Пусть a < b и x<y>z, 2<3>1.", []),
    ("Use vector<int> here.", "Use vector<int> here.", "Use vector<int> here.", []),
    ("a <bogus attr=1>x</bogus> b", "a <bogus attr=1>x</bogus> b", "a <bogus attr=1>x b", []),
    ("Line<br>break <bogus/> and </bogus> stay.", "Line<br>break <bogus/> and </bogus> stay.",
     "Line break and stay.", []),
    ("Hi <bogus>x", "Hi <bogus>x", "Hi <bogus>x", []),
    ("<b>Важно:</b> завтра", "Важно: завтра", "Важно: завтра", []),
    ("Это <STRONG>очень</strong> <i>важно, и</em> всё<u>.", "Это очень важно, и всё.", "Это очень важно, и всё.", []),
    ("<b><e>smile</e>Да</b>, <em>a <bogus>x</bogus> b</em>", "Да, a  b", "Да, a b", [("e", "smile"), ("bogus", "x")]),
    ("<+b>x</b> and <b/>", " and <b/>", "and", [("+b", "x")]),
])
def test_a_well_formed_pair_is_a_tag_whatever_its_name_and_nothing_else_is(reply, display, speech, marks):
    got_display, chunks = run(reply)
    assert got_display == display
    assert " ".join(c.text for c in chunks) == speech
    assert [(m.tag, m.body) for c in chunks for m in c.marks] == marks


@pytest.mark.parametrize("reply", ["Echo: <bogus>x</bogus>. Done <e>smile</e> here.",
                                   "Привет! <bogus>икс</bogus>Как дела? <Bogus>x</bogus>"])
def test_an_unknown_tag_split_anywhere_is_neither_shown_nor_spoken(reply):
    whole = run(reply)
    assert "x" not in whole[0] and "икс" not in whole[0] and "bogus" not in whole[0].lower()
    assert not any("x" in c.text or "икс" in c.text for c in whole[1])
    assert [m.tag for c in whole[1] for m in c.marks if m.tag != "e"] == ["bogus"] * reply.lower().count("<bogus>")
    assert run(chars(reply)) == whole
    for cut in range(len(reply) + 1):
        assert run([reply[:cut], reply[cut:]]) == whole, cut


def test_the_mark_of_an_unknown_tag_points_where_it_stood():
    _, chunks = run("Echo: <bogus>x</bogus>. Done.")
    assert chunks[0].marks == (Mark(tag="bogus", body="x", chunk=0, offset=6),)


def test_tag_like_code_stays_code():
    reply = "Пример:\n```html\n<li>x</li> <bogus>y</bogus>\n```\nИ `<b>x</b>` тоже."
    display, chunks = run(reply)
    assert display == reply
    assert [c.text for c in chunks] == ["Пример:", "И <b>x тоже."] and not any(c.marks for c in chunks)


def test_tags_count_again_after_code_ends():
    assert run("```\n<b>x</b>\n```\n<bogus>y</bogus>ok")[0] == "```\n<b>x</b>\n```\nok"
    assert run("a `b\n<bogus>y</bogus>ok")[0] == "a `b\nok"   # an inline span ends with its line
    assert run("a `b` <bogus>y</bogus>ok")[0] == "a `b` ok"
    assert run("a ``b` <bogus>y</bogus>`` c")[0] == "a ``b` <bogus>y</bogus>`` c"


def test_a_pair_longer_than_tag_lookahead_is_text():
    reply = "<bogus>" + "x" * 40 + "</bogus>"
    display, chunks = run(reply, Policy(tag_lookahead=30))
    assert display == reply and chunks[0].marks == ()


def test_only_a_possible_tag_is_held_back():
    chunker = Chunker()
    assert chunker.feed("a<br>b <3 a < b", 0).display == "a<br>b <3 a < b"   # a void element opens no pair
    assert chunker.feed(" x<y>z", 0).display == " x"                        # <y> may still be closed
    assert chunker.finish(0).display == "<y>z"
    chunker = Chunker(Policy(tags=("e",), tag_lookahead=20))
    assert chunker.feed("x<y>z more", 0).display == "x"
    assert chunker.feed(" more more more", 0).display == "<y>z more more more more"


def test_think_blocks_leave_neither_display_nor_speech():
    display, chunks = run(["<thi", "nk>Надо <e>улыбнуться</e>.</th", "ink>Ответ: да."])
    assert display == "Ответ: да."
    assert [c.text for c in chunks] == ["Ответ: да."] and chunks[0].marks == ()


def test_markdown_symbols_are_not_spoken_but_displayed():
    reply = "## Title\n**Bold**, _italic_, `code`, ~~gone~~ and snake_case.\n> quoted\n* item\n---\nEnd."
    display, _ = run(reply)
    assert display == reply
    assert spoken(reply) == "Title Bold, italic, code, gone and snake case. quoted item End."


def test_fenced_code_is_replaced_by_the_code_phrase():
    reply = "Пример:\n```python\nprint('<e>x</e>' * 2)\n```\nВот и всё."
    assert spoken(reply) == "Пример: Вот и всё."
    assert spoken(reply, Policy(code_phrase="Код на экране.")) == "Пример: Код на экране. Вот и всё."
    assert spoken("До\n~~~\nкод\n~~~~\nПосле") == "До После"
    assert spoken("Код:\n```\nне закрыт") == "Код:"


def test_text_before_a_code_block_is_spoken_while_the_code_streams():
    chunker = Chunker()
    assert [c.text for c in chunker.feed("Вот пример:\n```python\nprint(1)\n", 0.0).chunks] == ["Вот пример:"]


def test_emoji_are_dropped_from_speech_and_kept_in_display():
    display, chunks = run("Привет 😊! Класс 👍🏽 ❤️ 🇷🇺")
    assert display == "Привет 😊! Класс 👍🏽 ❤️ 🇷🇺"
    assert [c.text for c in chunks] == ["Привет ! Класс"]


def test_links_speak_their_text_not_their_url():
    assert spoken("Читай [документацию](https://ex.com/a_(b)) и ![схему](s.png) тут.") == \
        "Читай документацию и !схему тут."
    assert spoken("Bare https://ex.com/a_b~c#top stays whole.") == "Bare https://ex.com/a_b~c#top stays whole."


def test_lone_html_tags_are_shown_not_spoken_and_br_is_a_line_break():
    reply = "Это важно</div>, очень<br/>важно<hr> тоже<x/>."
    display, chunks = run(reply)
    assert display == reply and [c.text for c in chunks] == ["Это важно,", "очень", "важно тоже."]


def test_a_lone_angle_bracket_is_text():
    display, chunks = run(["a <", " b and c<", "e"])
    assert display == "a < b and c<e" and chunks[0].text == "a < b and c<e"
    chunker = Chunker()
    assert chunker.feed("x <", 0).display == "x "
    assert chunker.feed("e", 0).display == ""     # may become <e>
    assert chunker.feed("x", 0).display == ""     # may become <ex>
    assert chunker.feed(" ", 0).display == "<ex "


def test_a_configured_tag_longer_than_tag_lookahead_is_discarded_to_its_closing_tag_never_released():
    policy = Policy(tag_lookahead=30)
    chunker = Chunker(policy)
    assert chunker.feed("Смотри <e>это тег, хоть и длинный", 0).display == "Смотри "
    assert chunker.feed(" длиннее тридцати</e> а это", 0).display == " а это"
    display, chunks = run("Пока <e>smile", policy)
    assert display == "Пока " and [m.tag for c in chunks for m in c.marks] == ["e"]
    display, chunks = run("Пока <e>" + "никогда не закрыт " * 5, policy)   # the reply ends inside it
    assert display == "Пока " and [c.text for c in chunks] == ["Пока"]
    assert [(m.tag, m.body) for c in chunks for m in c.marks] == [("e", "никогда не закрыт никогда н")]


LONG_MEMORY = ("Хорошо, запомню. <+memory>high|" + "Игрок любит кошек и собак. " * 30 + "</memory> А ты? <e>smile</e>"
               "Пойдём гулять, 3 < 4.")


def test_a_long_memory_tag_is_never_spoken_nor_shown_however_the_reply_is_split():
    """The body of a configured tag past tag_lookahead goes, in display and speech alike, however the
    deltas fall; the text around it is all kept, in order, and the tag is a mark where it stood."""
    policy = Policy(tag_lookahead=100)
    display, chunks = run(LONG_MEMORY, policy)
    assert display == "Хорошо, запомню.  А ты? Пойдём гулять, 3 < 4."
    assert [c.text for c in chunks] == ["Хорошо, запомню.", "А ты? Пойдём гулять, 3 < 4."]
    assert [(m.tag, m.chunk, m.offset) for c in chunks for m in c.marks] == [("+memory", 1, 0), ("e", 1, 6)]
    assert all(len(m.body) < 100 for c in chunks for m in c.marks)
    assert run(chars(LONG_MEMORY), policy) == (display, chunks)
    for cut in range(len(LONG_MEMORY) + 1):
        assert run([LONG_MEMORY[:cut], LONG_MEMORY[cut:]], policy) == (display, chunks), cut


# --- stall flush and timing ----------------------------------------------------------------

def test_stall_flushes_up_to_the_last_complete_word():
    chunker = Chunker()
    assert chunker.feed("Hello wor", 10.0).chunks == ()
    assert chunker.next_flush_at == pytest.approx(10.6)
    assert chunker.tick(10.5).chunks == ()
    assert [c.text for c in chunker.tick(10.6).chunks] == ["Hello"]
    assert chunker.next_flush_at is None and chunker.tick(20.0).chunks == ()
    assert [c.text for c in chunker.feed("ld and all.", 20.0).chunks] == []
    assert [(c.text, c.final) for c in chunker.finish(21.0).chunks] == [("world and all.", True)]


def test_stall_flushes_a_word_ending_in_punctuation_but_not_a_half_word():
    chunker = Chunker()
    chunker.feed("Привет!", 0.0)
    assert [c.text for c in chunker.tick(1.0).chunks] == ["Привет!"]
    chunker = Chunker()
    chunker.feed("Прив", 0.0)
    assert chunker.tick(5.0).chunks == () and chunker.next_flush_at is None  # until more text comes
    chunker.feed("ет, как дела", 6.0)
    assert [c.text for c in chunker.tick(6.6).chunks] == ["Привет, как"]


def test_empty_deltas_do_not_postpone_a_stall_flush_and_zero_disables_it():
    chunker = Chunker()
    chunker.feed("Hello there", 1.0)
    chunker.feed("", 1.5)
    assert chunker.next_flush_at == pytest.approx(1.6)
    chunker = Chunker(Policy(flush_after_ms=0))
    chunker.feed("Hello there", 1.0)
    assert chunker.next_flush_at is None and chunker.tick(100.0).chunks == ()


def test_finish_always_ends_with_exactly_one_final_chunk():
    assert run("") == ("", [Chunk(text="", index=0, final=True, marks=())])
    smile = Mark(tag="e", body="smile", chunk=0, offset=0)
    assert run("<e>smile</e>") == ("", [Chunk(text="", index=0, final=True, marks=(smile,))])
    chunker = Chunker()
    chunker.finish(0.0)
    with pytest.raises(RuntimeError):
        chunker.feed("late", 0.0)
    assert chunker.tick(99.0).chunks == ()


# --- policy --------------------------------------------------------------------------------

def test_policy_from_mapping_accepts_config_and_environment_values():
    policy = ChunkerPolicy.from_mapping({"max_chars": "200", "tags": "e, c", "code_phrase": "Код."})
    assert (policy.max_chars, policy.tags, policy.code_phrase) == (200, ("e", "c"), "Код.")
    assert ChunkerPolicy.from_mapping({"tags": ["e", "music"]}).tags == ("e", "music")
    assert ChunkerPolicy.from_mapping({}) == ChunkerPolicy()


@pytest.mark.parametrize("data, key", [
    ({"max_char": 100}, "max_char"),
    ({"max_chars": 5}, "max_chars"),
    ({"min_chars": 300}, "max_chars"),
    ({"flush_after_ms": -1}, "flush_after_ms"),
    ({"min_first_chars": True}, "min_first_chars"),
    ({"max_first_words": "many"}, "max_first_words"),
    ({"tags": ["e", "bad tag"]}, "tags"),
    ({"tags": ["think"]}, "tags"),
    ({"tag_lookahead": 10}, "tag_lookahead"),
    ({"code_phrase": 3}, "code_phrase"),
])
def test_policy_errors_name_the_key_and_what_is_allowed(data, key):
    with pytest.raises(ValueError, match=rf"^{key}: (expected|unknown key; allowed: )"):
        ChunkerPolicy.from_mapping(data)


def test_memory_tags_close_the_way_the_companion_app_writes_them() -> None:
    chunker = Chunker(Policy())
    out = chunker.feed("Запомню. <+memory>high|Игрок любит кошек</memory> Хорошо!", 0.0)
    final = chunker.finish(1.0)
    chunks = [*out.chunks, *final.chunks]
    assert " ".join(c.text for c in chunks) == "Запомню. Хорошо!"
    assert [(m.tag, m.body) for c in chunks for m in c.marks] == [("+memory", "high|Игрок любит кошек")]
    assert "memory" not in out.display + final.display


def test_a_comma_after_a_word_ends_the_first_chunk_without_waiting_for_more() -> None:
    chunker = Chunker(Policy())
    assert chunker.feed("Привет! Я так ", 0.0).chunks == ()
    assert [c.text for c in chunker.feed("рада,", 0.1).chunks] == ["Привет! Я так рада,"]


def test_month_and_title_abbreviations_do_not_end_a_sentence() -> None:
    chunker = Chunker(Policy(min_first_chars=150, max_first_words=100))
    text = "It shipped on Oct. 19 and Capt. Miller signed it. Then it was done."
    chunks = [*chunker.feed(text, 0.0).chunks, *chunker.finish(1.0).chunks]
    assert all(not c.text.endswith(("Oct.", "Capt.")) for c in chunks)


# --- first_at_delta_end: the first chunk ends where a delta ends a sentence ----------------------

AT_ONCE = ChunkerPolicy()


def test_a_sentence_end_at_a_delta_end_cuts_the_first_chunk_at_once() -> None:
    chunker = Chunker(AT_ONCE)
    assert not chunker.feed("The capital of France", 0.0).chunks
    assert [c.text for c in chunker.feed(" is Paris.", 0.0).chunks] == ["The capital of France is Paris."]
    assert [c.text for c in chunker.feed(" It is", 0.0).chunks + chunker.feed(" big.", 0.0).chunks] == []
    assert [c.text for c in chunker.finish(0.0).chunks] == ["It is big."]


def test_a_sentence_end_and_its_space_at_a_delta_end_also_cut_at_once() -> None:
    """Tokenizers often put the space after the period ("r. " then "The"): the word is complete, and
    only whether the next sentence starts in lowercase is unknown, which the rule does not wait for."""
    chunker = Chunker(AT_ONCE)
    assert not chunker.feed("Sure, here is a short answ", 0.0).chunks
    assert [c.text for c in chunker.feed("er. ", 0.0).chunks] == ["Sure, here is a short answer."]
    assert not Chunker(Policy()).feed("Sure, here is a short answer. ", 0.0).chunks


@pytest.mark.parametrize("first, second", [
    ("Where is it located?", " Far"), ("What a surprise!", " Yes"), ('He said "hello."', " Then"),
    ("Привет, как твои дела?", " Хорошо"), ("Это было очень давно.", " Потом")])
def test_question_exclamation_and_quoted_ends_also_cut_at_once(first: str, second: str) -> None:
    chunker = Chunker(AT_ONCE)
    assert [c.text for c in chunker.feed(first, 0.0).chunks] == [first]


@pytest.mark.parametrize("first", [
    "Echo: the answer is 5.", "Meet me at the office of Dr.", "I was born in the U.S.", "Написал это А.",
    "Это было в 1999 г.", "Wait for it."[:10], "It was founded by Acme Inc.", "Find the showtimes at www."])
def test_numbers_abbreviations_and_initials_still_wait_for_the_next_character(first: str) -> None:
    chunker = Chunker(AT_ONCE)
    assert not chunker.feed(first, 0.0).chunks


def test_later_chunks_and_short_first_ones_wait_as_before() -> None:
    chunker = Chunker(AT_ONCE)
    assert not chunker.feed("Yes.", 0.0).chunks  # under min_first_chars
    assert [c.text for c in chunker.feed(" Of course, my friend.", 0.0).chunks] == ["Yes. Of course,"]
    assert not chunker.feed(" This is the second chunk here.", 0.0).chunks  # later: waits for the next character
    assert [c.text for c in chunker.feed(" And", 0.0).chunks] == ["my friend. This is the second chunk here."]


@FAST
@given(replies())
def test_a_reply_fed_whole_is_cut_exactly_as_without_the_rule(reply):
    """The same cuts; where the whole reply is one first chunk that ends a sentence, the delta's end
    cuts it there, and the reply's end adds an empty final chunk (the mark at its very end goes there)."""
    (shown, chunks), (plain_shown, plain) = run(reply[0], AT_ONCE), run(reply[0], DEFAULT)
    assert shown == plain_shown
    assert [c.text for c in chunks if c.text] == [c.text for c in plain if c.text]
    assert [(m.tag, m.body) for c in chunks for m in c.marks] == [(m.tag, m.body) for c in plain for m in c.marks]
    assert chunks[:-1] == plain[:-1] or (chunks[-1].text == "" and len(chunks) == len(plain) + 1)


@FAST
@given(replies(), st.lists(st.integers(0, 10_000), max_size=30))
def test_any_split_with_the_rule_loses_nothing_and_keeps_every_chunk_bounded(reply, cuts):
    raw, display, speech, _ = reply
    shown, chunks = run(split(raw, cuts), ChunkerPolicy(code_phrase=CODE_PHRASE))
    assert shown == display
    # every character in order; only the first cut may fall elsewhere ("case?" | "!" for "case?!")
    assert "".join("".join(c.text for c in chunks).split()) == "".join(speech.split())
    assert all(len(c.text) <= AT_ONCE.max_chars for c in chunks)
    assert [c.final for c in chunks] == [False] * (len(chunks) - 1) + [True]


def test_the_rule_can_be_turned_off_in_config() -> None:
    assert ChunkerPolicy.from_mapping({"first_at_delta_end": "false"}).first_at_delta_end is False
    assert ChunkerPolicy.from_mapping({"first_at_delta_end": True}).first_at_delta_end is True
    with pytest.raises(ValueError, match="first_at_delta_end: expected true or false"):
        ChunkerPolicy.from_mapping({"first_at_delta_end": "maybe"})
