"""Reasoning routing (services/stages/llm/think.py): `<think>` spans, and a stream that starts inside
reasoning (reasoning_start = "open"), whatever the deltas' boundaries."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voxpipe.config import PROFILE_DEFAULTS, PROFILE_SCHEMA
from voxpipe.protocol import Message, Reasoning, Request, Token
from voxpipe.stages.llm.jobs import Done, Jobs, Publish, Settings
from voxpipe.stages.llm.providers.base import Delta, Outcome
from voxpipe.stages.llm.think import CLOSE, OPEN, OPEN_LIMIT, REASONING_STARTS, STOPPED, ThinkSplitter


def run(pieces: Iterable[str], start: str = "tag", limit: int = OPEN_LIMIT,
        finish_reason: str = "stop") -> tuple[str, str]:
    """(text, reasoning) of a whole stream."""
    splitter = ThinkSplitter(start, limit)
    deltas = [splitter.push(piece) for piece in pieces] + [splitter.finish(finish_reason)]
    return "".join(d.text for d in deltas), "".join(d.reasoning for d in deltas)


def steps(pieces: Iterable[str], start: str = "open", limit: int = OPEN_LIMIT) -> list[Delta]:
    """What each push returns, then what finish() does."""
    splitter = ThinkSplitter(start, limit)
    return [splitter.push(piece) for piece in pieces] + [splitter.finish()]


def compositions(text: str) -> Iterator[list[str]]:
    """Every way to cut `text` into deltas (2 ** (len - 1) of them)."""
    for cuts in itertools.product((False, True), repeat=len(text) - 1):
        pieces, start = [], 0
        for index, cut in enumerate(cuts, 1):
            if cut:
                pieces.append(text[start:index])
                start = index
        yield [*pieces, text[start:]]


REPLIES = st.lists(st.sampled_from([" ", "\n", "a", "b", "<", ">", "/", "t", OPEN, CLOSE, "<thi", "nk>", "</th"]),
                   max_size=14).map("".join)
"""Replies made of tags, pieces of tags and text, so that tags in every position come up."""


def splits(text: str, cuts: list[int]) -> list[str]:
    points = sorted({min(cut, len(text)) for cut in cuts})
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]


# --- every split of a tag across deltas -----------------------------------------------------------

def test_every_split_of_a_bare_closing_tag_in_open_mode() -> None:
    """All 2 ** 11 ways to stream "ab</think>cd": the reasoning is "ab", the text "cd", and no push
    releases text before the whole "</think>" has come."""
    text = "ab</think>cd"
    for pieces in compositions(text):
        assert run(pieces, "open") == ("cd", "ab"), pieces
        seen = 0
        for piece, delta in zip(pieces, steps(pieces), strict=False):
            seen += len(piece)
            assert not delta.text or seen >= len("ab</think>"), pieces


def test_every_split_of_each_tag_in_tag_mode() -> None:
    """Every way to stream "<think>a" before a whole "</think>b", and "<think>a" whole before every
    way to stream "</think>b": the same routing, in "tag" and in "open" alike."""
    head, tail = "<think>a", "</think>b"
    for pieces in [*([*cut, tail] for cut in compositions(head)), *([head, *cut] for cut in compositions(tail))]:
        assert run(pieces) == ("b", "a"), pieces
        assert run(pieces, "open") == ("b", "a"), pieces


def test_every_split_of_a_closing_tag_that_comes_too_late() -> None:
    """A "</think>" ending past the limit is no end of reasoning: all of it is text, however split."""
    text = "abc</think>d"
    for pieces in compositions(text):
        assert run(pieces, "open", limit=10) == (text, ""), pieces
        assert run(pieces, "open", limit=11) == ("d", "abc"), pieces


@pytest.mark.parametrize("cut", range(1, len(CLOSE)))
def test_a_bare_closing_tag_split_in_two_in_tag_mode_is_text(cut: int) -> None:
    """Today's behaviour, kept as the default: without "open", a bare </think> is text (which the
    chunker then drops as a stray tag), and the reasoning before it is reply text."""
    assert run(["plan" + CLOSE[:cut], CLOSE[cut:] + "Hi"]) == ("plan</think>Hi", "")


# --- open: the stream starts inside reasoning ------------------------------------------------------

def test_open_everything_up_to_the_first_closing_tag_is_reasoning() -> None:
    assert run(["Okay, the user", " greets me.</th", "ink>\n\nHello", " there!"], "open") == (
        "\n\nHello there!", "Okay, the user greets me.")


def test_open_reasoning_goes_out_at_its_closing_tag_and_the_reply_then_streams() -> None:
    deltas = steps(["Let me", " think.", "</think>", "Hi", " there", "!"])
    assert deltas == [Delta(), Delta(), Delta(reasoning="Let me think."), Delta("Hi"), Delta(" there"),
                      Delta("!"), Delta()]


def test_open_only_the_first_closing_tag_ends_it_and_later_think_blocks_route_as_tags() -> None:
    assert run(["plan</think>A <think>more</think>B </think> C"], "open") == ("A B </think> C", "planmore")


def test_open_a_reply_that_opens_think_itself_streams_its_reasoning_at_once() -> None:
    """A model (or template) that writes its own <think> needs no hold: its reasoning streams live."""
    deltas = steps(["\n<th", "ink>step one", ", step two", "</think>Answer"])
    assert deltas == [Delta(), Delta("\n", "step one"), Delta(reasoning=", step two"), Delta("Answer"), Delta()]


def test_open_without_closing_tag_the_reply_the_model_ended_is_text_in_order() -> None:
    deltas = steps(["Hello", " there.", " How", " are you?"])
    assert deltas[:-1] == [Delta()] * 4       # held: it may still turn out to be reasoning
    assert deltas[-1] == Delta("Hello there. How are you?")


@pytest.mark.parametrize("reason", sorted(STOPPED))
def test_open_every_finish_reason_of_a_model_that_ended_its_turn_releases_text(reason: str) -> None:
    assert run(["Hello."], "open", finish_reason=reason) == ("Hello.", "")


@pytest.mark.parametrize("reason", ["length", "max_tokens", "content_filter", "safety", "blocked", ""])
def test_open_a_reply_cut_off_before_its_closing_tag_is_reasoning_never_spoken(reason: str) -> None:
    """max_tokens reached mid-reasoning must not speak it: it goes out as reasoning, whole."""
    assert run(["Okay, so the user", " wants"], "open", finish_reason=reason) == ("", "Okay, so the user wants")


def test_open_a_held_partial_tag_at_the_end_is_released_with_the_rest() -> None:
    assert run(["Fine </thi"], "open") == ("Fine </thi", "")
    assert run(["  <thi"], "open") == ("  <thi", "")
    assert run(["plan</think>Hi <thi"], "open") == ("Hi <thi", "plan")


def test_open_a_think_block_cut_off_stays_reasoning() -> None:
    assert run(["<think>unfinished"], "open", finish_reason="length") == ("", "unfinished")
    assert run(["<think>unfinished"], "open") == ("", "unfinished")


def test_open_reasoning_the_server_sends_apart_means_the_text_is_the_reply_unheld() -> None:
    """llama-server, vLLM and Ollama parse a template-opened <think> themselves when asked to: the
    reasoning comes as reasoning_content, the content is the reply, and holding it would only delay it."""
    splitter = ThinkSplitter("open")
    assert splitter.push("", provider_reasoning="The user says hi.") == Delta()
    assert not splitter.holding
    assert splitter.push("Hello") == Delta("Hello")
    assert splitter.push(" there.</think>") == Delta(" there.</think>")
    assert splitter.finish() == Delta()


def test_open_reasoning_apart_after_blank_text_still_releases_the_blanks() -> None:
    splitter = ThinkSplitter("open")
    assert splitter.push("\n") == Delta()
    assert splitter.push("", provider_reasoning="why") == Delta("\n")
    assert splitter.push("Hi") == Delta("Hi")


def test_open_reasoning_apart_after_text_changes_nothing() -> None:
    splitter = ThinkSplitter("open")
    assert splitter.push("plan") == Delta()
    assert splitter.push("", provider_reasoning="x") == Delta()
    assert splitter.holding
    assert splitter.push("</think>Hi") == Delta("Hi", "plan")


# --- the limit -------------------------------------------------------------------------------------

def test_the_limit_releases_everything_held_as_text_on_the_delta_that_reaches_it() -> None:
    deltas = steps(["abcd", "efgh", "ij", "kl</think>m"], limit=10)
    assert deltas == [Delta(), Delta(), Delta("abcdefghij"), Delta("kl</think>m"), Delta()]


@pytest.mark.parametrize("limit, expected", [
    (len("abc</think>") - 1, ("abc</think>d", "")),   # ends one past the limit: text
    (len("abc</think>"), ("d", "abc")),               # ends exactly at it: reasoning
    (len("abc</think>") + 1, ("d", "abc")),
])
def test_the_closing_tag_must_end_within_the_limit(limit: int, expected: tuple[str, str]) -> None:
    assert run(["abc</think>d"], "open", limit=limit) == expected


def test_the_default_limit_is_documented_and_fits_one_reasoning_message() -> None:
    reasoning = "x" * (OPEN_LIMIT - len(CLOSE))
    assert run([reasoning[:1000], reasoning[1000:] + CLOSE + "Hi"], "open") == ("Hi", reasoning)
    too_long = reasoning + "y"
    assert run([too_long + CLOSE + "Hi"], "open") == (too_long + CLOSE + "Hi", "")
    assert OPEN_LIMIT <= 65_536 // 2   # the protocol's cap on one reasoning message (docs/protocol.md §5.16)


def test_past_the_limit_without_a_closing_tag_text_streams_again() -> None:
    splitter = ThinkSplitter("open", limit=8)
    assert splitter.push("12345") == Delta()
    assert splitter.push("6789") == Delta("123456789")
    assert not splitter.holding
    assert splitter.push(" more") == Delta(" more")


def test_the_limit_bounds_the_wait_for_a_think_tag_too() -> None:
    """Blanks, or the start of a <think>, are held only as far as the limit too."""
    assert steps([" " * 5, " " * 4], limit=8) == [Delta(), Delta(" " * 9), Delta()]
    assert steps(["  ", "  <thi"], limit=8) == [Delta(), Delta("    "), Delta("<thi")]


def test_a_non_streamed_reply_is_one_delta() -> None:
    assert run(["plan</think>Answer."], "open") == ("Answer.", "plan")
    assert run(["Answer."], "open") == ("Answer.", "")


# --- the same, whatever the boundaries ---------------------------------------------------------------

def reference(text: str, limit: int, stopped: bool) -> tuple[str, str]:
    """What "open" means, on the whole reply at once."""
    if text.lstrip().startswith(OPEN):
        return run([text])
    close = text.find(CLOSE, 0, limit)
    if close >= 0:
        after = run([text[close + len(CLOSE):]])
        return after[0], text[:close] + after[1]
    if len(text) >= limit or stopped:
        return run([text])
    return "", text


@settings(max_examples=400, deadline=None)
@given(REPLIES, st.lists(st.integers(0, 60), max_size=8), st.integers(len(CLOSE), 40),
       st.sampled_from(["stop", "length"]))
def test_open_routing_does_not_depend_on_delta_boundaries(text: str, cuts: list[int], limit: int,
                                                          reason: str) -> None:
    routed = run(splits(text, cuts), "open", limit, reason)
    assert routed == run([text], "open", limit, reason) == reference(text, limit, reason == "stop")


def subsequence(part: str, whole: str) -> bool:
    rest = iter(whole)
    return all(char in rest for char in part)


@settings(max_examples=400, deadline=None)
@given(REPLIES, st.lists(st.integers(0, 60), max_size=8), st.integers(len(CLOSE), 40),
       st.sampled_from(["stop", "length"]))
def test_open_loses_nothing_but_the_tags_it_read(text: str, cuts: list[int], limit: int, reason: str) -> None:
    """Each character comes out once, as text or as reasoning, each in the reply's order; what is
    missing is whole <think> and </think> tags."""
    out, reasoning = run(splits(text, cuts), "open", limit, reason)
    assert subsequence(out, text) and subsequence(reasoning, text)
    missing = Counter(text)
    missing.subtract(Counter(out + reasoning))
    closes = missing["/"]
    opens = missing["<"] - closes
    tags = Counter(OPEN * opens + CLOSE * closes)
    assert opens >= 0 and +missing == tags and not -missing


# --- the setting ------------------------------------------------------------------------------------

def test_the_profile_names_the_start_and_tag_is_todays_behaviour() -> None:
    assert ThinkSplitter.from_profile({"reasoning_start": "open"}).holding
    assert not ThinkSplitter.from_profile({"reasoning_start": "tag"}).holding
    assert REASONING_STARTS == ("tag", "open")
    with pytest.raises(ValueError, match="reasoning_start must be one of tag, open, not 'auto'"):
        ThinkSplitter("auto")
    with pytest.raises(ValueError, match="limit"):
        ThinkSplitter("open", limit=3)


def test_the_config_takes_exactly_the_starts_the_splitter_knows_and_defaults_to_tag() -> None:
    rule = PROFILE_SCHEMA["reasoning_start"]
    assert all(rule.check(start) for start in REASONING_STARTS) and not rule.check("auto")
    assert PROFILE_DEFAULTS["reasoning_start"] == "tag"


# --- through the job core ---------------------------------------------------------------------------

@dataclass
class Call:
    outcome: Outcome = field(default_factory=lambda: Outcome("m1", "stop"))

    def close(self) -> None:
        raise AssertionError("not closed here")


def test_open_reasoning_is_published_as_reasoning_and_in_llm_done_never_as_a_token() -> None:
    core = Jobs(Settings("p", "cancel", 0, 500))
    core.request(Message(Request(text="hi"), "s1", "r1", 0, 1000.0, "test"), 0.0)
    job = core.jobs["s1"]
    job.configure({"name": "p", **PROFILE_DEFAULTS, "provider": "openai", "reasoning_start": "open"})
    job.splitter = ThinkSplitter("open")   # what configure makes of reasoning_start once jobs.py reads it
    assert job.begin_attempt(0.0) and job.opened(Call()) == []
    effects = [effect for delta in ("Okay, the user", " says hi.</th", "ink>Hello", " there!")
               for effect in job.arrived(Delta(delta), 0.1)]
    effects += job.end(0.2) + core.finish(job, "ok", "", 0.2)
    published = [(effect.kind, effect.body.text) for effect in effects
                 if isinstance(effect, Publish) and isinstance(effect.body, Token | Reasoning)]
    assert published == [("reasoning", "Okay, the user says hi."), ("token", "Hello"), ("token", " there!")]
    done = next(effect.body for effect in effects if isinstance(effect, Done))
    assert (done.text, done.reasoning, done.status) == ("Hello there!", "Okay, the user says hi.", "ok")
