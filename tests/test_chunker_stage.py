"""The chunker stage over real ZeroMQ: what it publishes when it keeps up, and when it falls behind."""

from __future__ import annotations

from typing import Any

import pytest

from tests.test_security_tags import chunker_alone, collect  # noqa: F401  (chunker_alone is a fixture)
from voxpipe.protocol import Chunk, LlmDone, Message, Text, Token
from voxpipe.runtime import Connection
from voxpipe.stages.chunker.core import Chunker

pytestmark = pytest.mark.integration

BOUND_S = 20.0
REPLY = ("Hello there, this is the first sentence. <e>smile</e>Then a second one follows, with a comma. "
         "A third <c>wave</c> sentence ends here! And the last one? Yes, done. ") * 4


def tokens_of(text: str, size: int = 3) -> list[str]:
    return [text[start:start + size] for start in range(0, len(text), size)]


def expected(deltas: list[str]) -> tuple[str, list[tuple[str, str, int]], list[tuple[str, int, bool]]]:
    """The display text, its marks at absolute offsets, and the chunks the core gives for these deltas."""
    chunker, display, marks, chunks = Chunker(), "", [], []
    for output in [*(chunker.feed(delta, 0.0) for delta in deltas), chunker.finish(0.0)]:
        marks += [(mark.tag, mark.body, len(display) + mark.offset) for mark in output.display_marks]
        display += output.display
        chunks += [(chunk.text, chunk.index, chunk.final) for chunk in output.chunks]
    return display, marks, chunks


def published(got: list[Message[Any]]) -> tuple[str, list[tuple[str, str, int]], list[tuple[str, int, bool]]]:
    display, marks, chunks = "", [], []
    for message in got:
        if isinstance(message.body, Text):
            marks += [(mark.tag, mark.body, len(display) + mark.offset) for mark in message.body.marks]
            display += message.body.delta
        elif isinstance(message.body, Chunk):
            chunks.append((message.body.text, message.body.index, message.body.final))
    return display, marks, chunks


def ask(client: Connection, session: str, deltas: list[str]) -> list[Message[Any]]:
    """Every token at once, then llm.done; what the chunker published, up to its final text and chunk."""
    for delta in deltas:
        client.publish(session, "r1", Token(text=delta))
    client.publish(session, "r1", LlmDone(status="ok", text="".join(deltas), tokens=len(deltas)))
    return collect(client, lambda seen: sum(isinstance(m.body, (Text, Chunk)) and m.body.final for m in seen) == 2,
                   BOUND_S)


def test_a_burst_is_published_in_fewer_texts_with_every_character_mark_and_chunk(chunker_alone: Connection) -> None:  # noqa: F811
    """200 tokens at once: the chunker falls behind and sends each run of queued tokens as one `text`,
    losing nothing: the same display text, marks at the same places, the same chunks, in order."""
    deltas = tokens_of(REPLY)[:200]
    got = ask(chunker_alone, "burst", deltas)
    texts = [m for m in got if isinstance(m.body, Text)]
    assert published(got) == expected(deltas)
    assert len(texts) < len(deltas) / 2, len(texts)
    assert all(not m.body.final for m in texts[:-1]) and texts[-1].body.final
    order = [m.kind for m in got]
    assert order.index("chunk") > order.index("text")  # a chunk never ahead of the text it speaks


def test_a_chunker_that_keeps_up_sends_a_text_per_token(chunker_alone: Connection) -> None:  # noqa: F811
    """Each token goes out once the previous one's text came back, so the chunker is never behind:
    it holds nothing, and every step with display text is a `text` of its own."""
    client, deltas, chunker = chunker_alone, tokens_of(REPLY[:120]), Chunker()
    steps = [chunker.feed(delta, 0.0) for delta in deltas]
    got: list[Message[Any]] = []
    for delta, step in zip(deltas, steps, strict=True):
        client.publish("trickle", "r1", Token(text=delta))
        if step.display or step.display_marks:
            got += collect(client, lambda seen: any(isinstance(m.body, Text) for m in seen), BOUND_S)
    client.publish("trickle", "r1", LlmDone(status="ok", text="".join(deltas), tokens=len(deltas)))
    got += collect(client, lambda seen: sum(isinstance(m.body, (Text, Chunk)) and m.body.final for m in seen) == 2,
                   BOUND_S)
    assert published(got) == expected(deltas)
    shown = [m for m in got if isinstance(m.body, Text) and not m.body.final]
    assert len(shown) == sum(bool(step.display or step.display_marks) for step in steps)
