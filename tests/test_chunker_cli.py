"""`voxpipe chunk`: the JSON-lines protocol around the chunker core, driven in-process."""

from __future__ import annotations

import io
import json

import pytest

from voxpipe.stages.chunker.cli import run
from voxpipe.stages.chunker.core import ChunkerPolicy


def chunk_cli(*lines: object, policy: ChunkerPolicy = ChunkerPolicy()) -> tuple[int, list[dict], str]:
    """Runs the CLI on the given lines (dicts are JSON-encoded); returns code, output objects, stderr."""
    text = "".join((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n"
                   for line in lines)
    stdout, stderr = io.StringIO(), io.StringIO()
    code = run(io.StringIO(text), stdout, policy, stderr=stderr)
    return code, [json.loads(line) for line in stdout.getvalue().splitlines()], stderr.getvalue()


def test_ready_then_one_line_per_chunk_then_end_at_eof():
    code, out, err = chunk_cli({"delta": "<e>smile</e>Привет! Как "}, {"delta": "дела? Всё хорошо, спасибо."})
    assert (code, err) == (0, "")
    assert out == [
        {"ready": True},
        {"text": "Привет! Как дела?", "index": 0, "final": False,
         "marks": [{"tag": "e", "body": "smile", "chunk": 0, "offset": 0}]},
        {"text": "Всё хорошо, спасибо.", "index": 1, "final": True, "marks": []},
        {"end": True},
    ]


def test_each_chunk_is_flushed_as_soon_as_it_is_decided():
    class Recorder(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.flushed: list[str] = []

        def flush(self) -> None:
            self.flushed.append(self.getvalue())

    stdout = Recorder()
    lines = io.StringIO('{"delta": "Well, honestly, I"}\n{"delta": " think so."}\n')
    assert run(lines, stdout, ChunkerPolicy()) == 0
    assert [text.count("\n") for text in stdout.flushed] == [1, 2, 3, 4]
    assert '"Well, honestly,"' in stdout.flushed[1]


def test_end_lines_separate_replies_with_fresh_state():
    code, out, _ = chunk_cli({"delta": "Один, два."}, {"end": True}, {"delta": "Three"}, {"end": True},
                             {"end": True})
    assert code == 0
    assert [(o.get("text"), o.get("index"), o.get("final"), o.get("end")) for o in out[1:]] == [
        ("Один, два.", 0, False, None), ("", 1, True, None), (None, None, None, True),  # first_at_delta_end
        ("Three", 0, True, None), (None, None, None, True),
        ("", 0, True, None), (None, None, None, True),
    ]


def test_delta_and_end_on_one_line_and_no_reply_at_eof_without_deltas():
    assert chunk_cli({"delta": "Hi.", "end": True})[1][1:] == [
        {"text": "Hi.", "index": 0, "final": True, "marks": []}, {"end": True}]
    assert chunk_cli()[1] == [{"ready": True}]
    assert chunk_cli({"delta": "x"}, {"end": True}, "   ")[1][-1] == {"end": True}


def test_stall_flush_uses_t_and_nothing_else():
    _, out, _ = chunk_cli({"delta": "Hello wor", "t": 1.0}, {"delta": "ld again", "t": 2.0})
    assert [o["text"] for o in out if "text" in o] == ["Hello", "world again"]
    _, out, _ = chunk_cli({"delta": "Hello wor"}, {"delta": "ld again"})
    assert [o["text"] for o in out if "text" in o] == ["Hello world again"]
    _, out, _ = chunk_cli({"delta": "Hello wor", "t": 1.0}, {"delta": "ld again", "t": 1.5})
    assert [o["text"] for o in out if "text" in o] == ["Hello world again"]


@pytest.mark.parametrize("line, message", [
    ("not json", "line 2: expected a JSON object such as {\"delta\": \"text\"}, got invalid JSON"),
    ("[1, 2]", "line 2: expected a JSON object such as {\"delta\": \"text\"}, got list"),
    ({"text": "hi"}, "line 2: unknown key 'text'; allowed keys: delta, end, t"),
    ({"delta": 5}, "line 2: \"delta\" must be a string, got 5"),
    ({"end": False}, "line 2: \"end\" must be true, got False"),
    ({}, "line 2: expected \"delta\" (a string) or \"end\": true"),
    ({"delta": "x", "t": "soon"}, "line 2: \"t\" must be a number of seconds, got 'soon'"),
    ({"delta": "x", "t": 0.5}, "line 2: \"t\" must not go back in time: 0.5 after 1.0"),
])
def test_a_bad_line_exits_2_naming_the_line_and_keeps_what_was_printed(line, message):
    code, out, err = chunk_cli({"delta": "Well, honestly, this is it", "t": 1.0}, line, {"delta": "never read"})
    assert code == 2
    assert err.startswith(f"voxpipe chunk: {message}") and err.count("\n") == 1
    assert out == [{"ready": True}, {"text": "Well, honestly,", "index": 0, "final": False, "marks": []}]


def test_output_keeps_unicode_readable():
    stdout = io.StringIO()
    run(io.StringIO('{"delta": "Привет"}\n'), stdout, ChunkerPolicy())
    assert "Привет" in stdout.getvalue()


def test_an_unknown_tag_is_a_mark_never_text():
    code, out, _ = chunk_cli({"delta": "Echo: <bog"}, {"delta": "us>x</bo"}, {"delta": "gus>. Done."})
    assert code == 0
    assert out[1:] == [{"text": "Echo: . Done.", "index": 0, "final": False,  # first_at_delta_end
                        "marks": [{"tag": "bogus", "body": "x", "chunk": 0, "offset": 6}]},
                       {"text": "", "index": 1, "final": True, "marks": []}, {"end": True}]
