"""Issue 14, items 13 and 6: hostile tags in a model's reply, attacked on the parsing core and on real
processes. Tag parsing costs time linear in the reply whatever its shape, so a flood of unclosed tags
cannot stall history while another session waits for its context; and a configured tag too long for
the chunker's lookahead is never spoken nor shown, however long it is and whether or not it closes."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.wire_server import WireServer, sse_script
from tests.harness import Daemon, connect, start_stage, stop_process, wait_ready
from voxpipe.protocol import Chunk, LlmDone, Message, Request, Text, Token
from voxpipe.runtime import Connection
from voxpipe.stages.chunker.core import Chunker
from voxpipe.stages.tags import DEFAULT_TAGS, LOOKAHEAD, TagStripper

# --- item 13: the cost of parsing grows linearly in the reply, whatever its shape -------------------

SHAPES: dict[str, Callable[[int], str]] = {
    "unclosed configured openers": lambda n: "<a>" * (n // 3),
    "unclosed memory openers": lambda n: "<+memory>" * (n // 9),
    "unclosed unknown openers": lambda n: "<bogus>" * (n // 7),
    "'<' without a name": lambda n: "< " * (n // 2),
    "'<' alone": lambda n: "<" * n,
    "'</' alone": lambda n: "</" * (n // 2),
    "a long unterminated tag": lambda n: "<" + "a" * n,
    "a long memory body": lambda n: "<+memory>high|" + "x" * n + "</memory> ok.",
    "deep nesting": lambda n: "<x>" * (n // 7) + "</x>" * (n // 7),
    "stray closers": lambda n: "</a>" * (n // 4),
    "closed tags": lambda n: "<e>smile</e> hi " * (n // 16),
    "formatting": lambda n: "<b>x" * (n // 4),
    "fences": lambda n: "```\n<a>\n" * (n // 8),
    "an open fence": lambda n: "```\n" + "<a>" * (n // 3),
    "reasoning": lambda n: "<think>" + "<" * n,
    "prose": lambda n: "Word, word. " * (n // 12),
    "one word": lambda n: "x" * n,
    "blanks": lambda n: "a" + " " * n + "b",
}


def strip_whole(text: str) -> None:
    """History's way: the whole reply at once."""
    TagStripper(DEFAULT_TAGS, LOOKAHEAD).push(text, at_end=True)


def strip_streamed(text: str) -> None:
    """The chunker's way, in the smallest deltas: one character each."""
    stripper = TagStripper(DEFAULT_TAGS, LOOKAHEAD)
    for char in text:
        stripper.push(char, at_end=False)
    stripper.push("", at_end=True)


def chunk_whole(text: str) -> None:
    """One huge delta: a whole reply recovered from llm.done."""
    chunker = Chunker()
    chunker.feed(text, 0.0)
    chunker.finish(0.0)


def chunk_streamed(text: str) -> None:
    """Token-sized deltas of three characters (the chunker does far more per delta than the stripper)."""
    chunker = Chunker()
    for start in range(0, len(text), 3):
        chunker.feed(text[start:start + 3], 0.0)
    chunker.finish(0.0)


WAYS: dict[str, tuple[Callable[[str], None], int]] = {
    "stripper, whole": (strip_whole, 40_000), "stripper, 1-char deltas": (strip_streamed, 10_000),
    "chunker, whole": (chunk_whole, 8_000), "chunker, 3-char deltas": (chunk_streamed, 2_000)}
"""Each way of parsing, and the smaller size it is timed at (then at 4 times that)."""


def cpu_seconds(parse: Callable[[str], None], text: str) -> float:
    """The least CPU time of this process over three runs: other processes on the machine cost
    wall time, not this process's CPU time, and the least of three drops a stray hiccup."""
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        parse(text)
        best = min(best, time.process_time() - started)
    return best


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("shape", SHAPES)
def test_parsing_time_grows_linearly_in_the_reply_for_every_hostile_shape(shape: str, way: str) -> None:
    """Four times the text may cost about four times the time: linear gives 4, quadratic 16. The bound,
    10, leaves room for noise and still catches quadratic growth; tiny times count as 5 ms."""
    parse, size = WAYS[way]
    small, large = (cpu_seconds(parse, SHAPES[shape](n)) for n in (size, 4 * size))
    assert large <= 10 * max(small, 0.005), f"{shape}, {way}: {small:.4f} s for {size} characters, " \
                                             f"{large:.4f} s for {4 * size}: quadratic"


# --- the attacks on real processes -----------------------------------------------------------------

FLOOD = "<a>" * 60_000
"""The review's reply: 60k unclosed `<a>` tags (180 kB), which stalled history for 14 s."""
BOUND_S = 60.0
"""Generous: the flood now takes well under a second; this only catches a stall."""
CONTEXT_WAIT_S = 10.0
"""How long llm waits for history's context here: ten times what history needs on a loaded machine,
less than the review's 14 s stall."""
PROFILE = {"provider": "openai", "model": "scripted", "api_key_env": "WIRE_KEY", "first_token_timeout_s": 30,
           "idle_timeout_s": 30, "retries": 0, "repeat_ngram": 0}
"""The repetition guard is off, as a user may set it: it would cut this flood, but not one whose tags
differ (`<a>1<a>2…`), so parsing must hold without it."""


def events(*pieces: str) -> list[Any]:
    """An OpenAI chat-completions stream of `pieces`."""
    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "scripted",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return [*(chunk({"content": piece}) for piece in pieces), chunk({}, "stop"), "[DONE]"]


def collect(client: Connection, until: Callable[[list[Message[Any]]], bool], timeout: float) -> list[Message[Any]]:
    got: list[Message[Any]] = []
    deadline = time.monotonic() + timeout
    while not until(got) and time.monotonic() < deadline:
        message = client.receive(0.2)
        if message is not None:
            got.append(message)
    return got


def done_of(messages: list[Message[Any]], session: str) -> LlmDone | None:
    return next((m.body for m in messages if m.session == session and isinstance(m.body, LlmDone)), None)


def test_a_flood_of_unclosed_tags_neither_stalls_history_nor_costs_another_session_its_context() -> None:
    """Session A's reply is the flood; session B asks the moment it ends, while history stores it. B's
    request must reach the provider with its earlier exchange: llm waits for history's context up to
    context_timeout_ms, here CONTEXT_WAIT_S, which catches the review's 14 s stall and nothing less.
    A's flood, one configured tag that never closes, is neither shown nor spoken."""
    with WireServer() as wire:
        settings = {"llm": {"profile": "wire", "context_timeout_ms": int(CONTEXT_WAIT_S * 1000),
                            "profiles": {"wire": {**PROFILE, "base_url": wire.url("/v1")}}}}
        with Daemon(settings, env={"WIRE_KEY": "sk-test-wire"}) as daemon:
            client = connect(daemon.runtime_dir, "attack", "llm.done", "history.saved", "chunk", "text")
            wire.enqueue(sse_script(events("I remember ", "you, B.")))
            client.publish("b", "b1", Request(text="Remember me: I am B."))
            collect(client, lambda got: any(m.id == "b1" and m.kind == "history.saved" and m.body.role == "assistant"
                                            for m in got), BOUND_S)

            flood = [FLOOD[start:start + 3] for start in range(0, len(FLOOD), 3)]   # 60k token-sized pieces
            wire.enqueue(sse_script(events("Sure. ", *flood)), sse_script(events("Still me, B.")))
            started = time.monotonic()
            client.publish("a", "a1", Request(text="Flood."))
            seen = collect(client, lambda got: done_of(got, "a") is not None, BOUND_S)
            asked = time.monotonic()
            client.publish("b", "b2", Request(text="Who am I?"))   # while history stores the flood
            seen += collect(client, lambda got: done_of(got, "b") is not None
                            and any(m.session == "a" and isinstance(m.body, Chunk) and m.body.final for m in got),
                            BOUND_S)
            elapsed, answered = time.monotonic() - started, time.monotonic() - asked
            client.close()

    flood_done, b_done = done_of(seen, "a"), done_of(seen, "b")
    assert flood_done is not None and flood_done.status == "ok" and flood_done.text.endswith(FLOOD)
    assert b_done is not None and b_done.status == "ok", b_done
    assert elapsed < BOUND_S and answered < BOUND_S, (elapsed, answered)
    prompt = [message["content"] for message in wire.records[-1].json["messages"]]
    assert "Remember me: I am B." in prompt and "I remember you, B." in prompt, prompt   # B's context came
    spoken = " ".join(m.body.text for m in seen if m.session == "a" and isinstance(m.body, Chunk))
    shown = "".join(m.body.delta for m in seen if m.session == "a" and isinstance(m.body, Text))
    assert (spoken, shown) == ("Sure.", "Sure. ")   # one tag, oversize and never closed: never spoken


MEMORY_BODY = "high|" + "Игрок рассказал о себе всё. " * 4000   # 112 kB, far past the 600-character lookahead


@pytest.fixture()
def chunker_alone() -> Iterator[Connection]:
    """A bus and a chunker stage as real processes, and a client watching what the chunker publishes."""
    runtime = Path(tempfile.mkdtemp(prefix="vp-tags-")) / "run"
    bus = start_stage("bus", runtime)
    try:
        connect(runtime, "probe").close()
        chunker = start_stage("chunker", runtime)
        try:
            wait_ready(runtime, "chunker")
            client = connect(runtime, "model", "chunk", "text")
            yield client
            client.close()
        finally:
            stop_process(chunker)
    finally:
        stop_process(bus)


@pytest.mark.parametrize("closed", [True, False], ids=["closed", "never closed"])
def test_a_memory_tag_longer_than_the_lookahead_is_never_spoken_nor_shown(chunker_alone: Connection,
                                                                          closed: bool) -> None:
    """The review's 100 kB `<+memory>`, streamed in tokens: no character of its body reaches a
    `chunk` or display `text`, and the text around it is spoken and shown whole, in order."""
    client = chunker_alone
    after = " А потом <e>smile</e> мы пошли гулять." if closed else ""
    reply = "Запомню. <+memory>" + MEMORY_BODY + ("</memory>" if closed else "") + after
    session = f"mem-{closed}"
    for start in range(0, len(reply), 97):   # 1200 tokens: the closing tag falls across two
        client.publish(session, "r1", Token(text=reply[start:start + 97]))
        time.sleep(0.002)   # at a model's pace: a burst past the bus's high-water mark would lose tokens
    client.publish(session, "r1", LlmDone(status="ok", text=reply, tokens=len(reply) // 97))
    got = collect(client, lambda seen: any(isinstance(m.body, Chunk) and m.body.final for m in seen), BOUND_S)

    chunks = [m.body for m in got if isinstance(m.body, Chunk)]
    shown = "".join(m.body.delta for m in got if isinstance(m.body, Text))
    assert chunks and chunks[-1].final, got
    spoken = " ".join(chunk.text for chunk in chunks if chunk.text)
    for text in (spoken, shown):
        assert "Игрок" not in text and "high|" not in text and "memory" not in text
    assert spoken == ("Запомню. А потом мы пошли гулять." if closed else "Запомню.")
    assert shown == ("Запомню.  А потом  мы пошли гулять." if closed else "Запомню. ")
    marks = [(mark.tag, len(mark.body)) for chunk in chunks for mark in chunk.marks]
    assert [tag for tag, _ in marks] == (["+memory", "e"] if closed else ["+memory"])
    assert all(size <= LOOKAHEAD for _, size in marks)   # only the start that fitted travels
