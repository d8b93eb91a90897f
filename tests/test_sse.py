"""The SSE and NDJSON parsers: every line-ending and field rule, and independence from how the bytes are cut."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from voxpipe.stages.llm.sse import Event, LineSplitter, SSEParser, events, lines


def parse(*pieces: bytes | str) -> list[Event]:
    return list(events(pieces))


def test_one_event_per_blank_line() -> None:
    assert parse(b"data: a\n\ndata: b\n\n") == [Event("a"), Event("b")]


def test_multi_line_data_joins_with_newline() -> None:
    assert parse(b'data: {"a":\ndata: 1}\n\n') == [Event('{"a":\n1}')]


def test_every_line_ending() -> None:
    expected = [Event("a"), Event("b"), Event("c")]
    assert parse(b"data: a\r\n\r\ndata: b\n\ndata: c\r\r") == expected


def test_crlf_cut_between_pieces_is_one_line_ending() -> None:
    assert parse(b"data: a\r", b"\n\r", b"\ndata: b\r\n", b"\r\n") == [Event("a"), Event("b")]


def test_comments_are_keep_alives_not_events() -> None:
    assert parse(b": keep-alive\n\n:OPENROUTER PROCESSING\n\ndata: x\n: inside\n\n") == [Event("x")]


def test_value_loses_only_one_leading_space() -> None:
    assert parse(b"data:a\n\ndata:  b\n\ndata\n\ndata:\n\n") == [Event("a"), Event(" b"), Event(""), Event("")]


def test_event_name_and_id() -> None:
    got = parse(b"event: delta\nid: 7\ndata: x\n\ndata: y\n\n")
    assert got == [Event("x", "delta", "7"), Event("y", "message", "7")]  # the id persists, the name does not


def test_id_with_nul_is_ignored_and_unknown_fields_too() -> None:
    assert parse(b"id: 1\n\nid: a\0b\nretry: 5\nfoo: bar\ndata: x\n\n") == [Event("x", id="1")]


def test_blank_line_without_data_dispatches_nothing_and_resets_the_name() -> None:
    assert parse(b"event: ping\n\ndata: x\n\n") == [Event("x")]


def test_last_event_without_blank_line_is_flushed_at_eof() -> None:
    assert parse(b"data: a\n\ndata: [DONE]\n") == [Event("a"), Event("[DONE]")]
    assert parse(b"data: [DONE]") == [Event("[DONE]")]


def test_incremental_feed_returns_events_as_soon_as_complete() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\n") == []
    assert parser.feed(b"\nda") == [Event("a")]
    assert parser.feed(b"ta: b") == []
    assert parser.flush() == [Event("b")]


def test_text_pieces_and_utf8_cut_inside_a_character() -> None:
    encoded = "data: привет 🙂\n\n".encode()
    assert parse(*(encoded[i:i + 1] for i in range(len(encoded)))) == [Event("привет 🙂")]
    assert parse("data: é\n\n") == [Event("é")]


def test_byte_order_mark_is_dropped() -> None:
    assert parse(b"\xef\xbb\xbfdata: a\n\n") == [Event("a")]


def test_ndjson_lines_skip_blanks_and_keep_a_last_unterminated_line() -> None:
    assert list(lines([b'{"a": 1}\r\n\n  \n{"b"', b": 2}\n{\"c\": 3}"])) == ['{"a": 1}', '{"b": 2}', '{"c": 3}']


def test_line_splitter_flush_resets() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b"a\rb") == ["a"]
    assert splitter.flush() == ["b"]
    assert splitter.feed(b"\nc\n") == ["", "c"]  # a fresh stream: this LF is not the tail of the old CR


# --- property: the events do not depend on how the stream is cut ----------------------------------

line_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\ufeff"), max_size=12)
endings = st.sampled_from(["\n", "\r\n", "\r"])


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[Event]]:
    """A stream written with random line endings, spacing and comments, and the events it must give."""
    out: list[str] = []
    expected: list[Event] = []
    last_id = ""

    def line(text: str) -> None:
        ending = draw(endings)
        if not text and out and out[-1].endswith("\r") and ending == "\n":
            ending = "\r\n"  # CR then a bare LF would read as one CRLF, swallowing this blank line
        out.append(text + ending)

    def field(name: str, value: str) -> None:
        spaced = draw(st.booleans()) or value.startswith(" ")
        line(f"{name}: {value}" if spaced else f"{name}:{value}")

    for _ in range(draw(st.integers(0, 5))):
        if draw(st.booleans()):
            line(":" + draw(line_text))
        name = draw(st.sampled_from(["", "update", "message"]))
        if name:
            field("event", name)
        if draw(st.booleans()):
            last_id = draw(line_text.filter(lambda text: "\0" not in text))
            field("id", last_id)
        data = draw(st.lists(line_text, min_size=1, max_size=3))
        for part in data:
            field("data", part)
        line("")
        expected.append(Event("\n".join(data), name or "message", last_id))
    return "".join(out).encode(), expected


@settings(max_examples=300, deadline=None)
@given(streams(), st.lists(st.integers(0, 10_000), max_size=8))
def test_any_cutting_of_the_bytes_gives_the_same_events(stream: tuple[bytes, list[Event]], cuts: list[int]) -> None:
    data, expected = stream
    bounds = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    pieces = [data[start:end] for start, end in itertools.pairwise(bounds)]
    assert parse(data) == expected
    assert parse(*pieces) == expected


@settings(max_examples=200, deadline=None)
@given(st.lists(line_text.filter(str.strip), max_size=6), st.lists(endings, min_size=1), st.data())
def test_ndjson_lines_survive_any_cutting(texts: list[str], line_endings: list[str], data: st.DataObject) -> None:
    body = "".join(text + line_endings[index % len(line_endings)] for index, text in enumerate(texts)).encode()
    cut = data.draw(st.integers(0, len(body)))
    assert list(lines([body[:cut], body[cut:]])) == texts
