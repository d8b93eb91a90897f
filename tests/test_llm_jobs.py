"""The llm job core in-process, at chosen instants: busy policies, context, every timeout, every
retry path, cancel before and after the first token, routing, llm.done and the replay journal."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from voxpipe import protocol
from voxpipe.config import PROFILE_DEFAULTS, ConfigError
from voxpipe.protocol import (
    Body,
    Context,
    ErrorCode,
    LlmDone,
    Message,
    Reasoning,
    Replay,
    ReplayDone,
    ReplayQuery,
    Request,
    Token,
)
from voxpipe.secrets import KeyRing
from voxpipe.stages.llm.jobs import (
    CANCEL_GRACE_S,
    Close,
    Done,
    Effect,
    Job,
    Jobs,
    Journal,
    Log,
    Publish,
    Report,
    Retry,
    Settings,
    Start,
)
from voxpipe.stages.llm.providers.base import Delta, Outcome, ProviderError

S = "s1"


def message(body: Body, id: str = "r1", session: str = S, ts: float = 1000.0) -> Message[Any]:
    return Message(body, session, id, 0, ts, "test")


def request(id: str = "r1", session: str = S, ts: float = 1000.0, **fields: Any) -> Message[Request]:
    return message(Request(**{"text": "hi", **fields}), id, session, ts)


def context(id: str = "r1", session: str = S) -> Message[Context]:
    return message(Context(messages=()), id, session)


def profile(**overrides: Any) -> dict[str, Any]:
    return {"name": "p", **PROFILE_DEFAULTS, "provider": "openai", "api_key_env": "KEY",
            "first_token_timeout_s": 1.5, "idle_timeout_s": 1.0, "retries": 2, "backoff_s": 0.5,
            "backoff_max_s": 8.0, **overrides}


@dataclass
class Call:
    """The core only reads a generation's outcome; closing and iterating it is the shell's."""

    outcome: Outcome = field(default_factory=lambda: Outcome("m1", "stop", {"total_tokens": 5}))

    def close(self) -> None:
        raise AssertionError("the core never closes a call itself")


def describe(effect: Effect) -> str:
    """One line per effect, for tables of expected effects."""
    match effect:
        case Publish(session, id, Token(text=text) | Reasoning(text=text)):
            return f"{effect.kind} {session}/{id} {text!r}"
        case Publish(session, id, body):
            return f"{effect.kind} {session}/{id} {body.to_wire()}"
        case Report(code, _, session, id, ref_kind):
            assert isinstance(code, ErrorCode)
            return f"report {code} {session}/{id} {ref_kind}"
        case Log(level, _, _):
            return f"log {level} {effect.message}"
        case Start(job, context):
            return f"start {job.request.id}" + (" with context" if context else "")
        case Close():
            return "close"
        case Done(request, body):
            return f"done {request.session}/{request.id} {body.status}"
    raise AssertionError(effect)


def kinds(effects: list[Effect]) -> list[str]:
    return [describe(effect).split(" ")[0] for effect in effects]


def dones(effects: list[Effect]) -> list[LlmDone]:
    return [effect.body for effect in effects if isinstance(effect, Done)]


def jobs(on_busy: str = "cancel", history_limit: int = 20, context_timeout_ms: int = 500) -> Jobs:
    return Jobs(Settings("p", on_busy, history_limit, context_timeout_ms))


def running(core: Jobs, id: str = "r1", now: float = 0.0, **config: Any) -> tuple[Job, Call]:
    """A job whose worker has started and opened its call at `now`."""
    core.request(request(id), now)
    core.context(context(id))
    job = core.jobs[S]
    job.configure(profile(**config))
    call = Call()
    assert job.begin_attempt(now) and job.opened(call) == []
    return job, call


def worker_end(core: Jobs, job: Job, error: Exception | None, now: float) -> list[Effect]:
    """What the shell's worker does once its attempts are over."""
    return job.end(now) + core.worker_done(job, error, now)


# --- requests and the busy policies ----------------------------------------------------------------

def test_a_request_asks_history_for_context_or_starts_at_once_without_history() -> None:
    """The query names the request's persona: history answers with that persona's memories."""
    assert [describe(e) for e in jobs().request(request(text="hi", persona="Crazy"), 0.0)] == [
        "log 20 s1/r1: request (profile p)", "context.query s1/r1 {'limit': 20, 'persona': 'Crazy'}"]
    core = jobs(history_limit=0)
    effects = core.request(request(text="hi", profile="other"), 0.0)
    assert [describe(e) for e in effects] == ["log 20 s1/r1: request (profile other)", "start r1"]
    assert core.jobs[S].started and core.jobs[S].profile == "other"


@pytest.mark.parametrize("started", [False, True])
def test_barge_in_cancels_the_old_reply_everywhere_and_begins_the_new_one(started: bool) -> None:
    core = jobs()
    if started:
        old, _ = running(core)
    else:
        core.request(request(text="hi"), 0.0)
        old = core.jobs[S]
    effects = core.request(request("r2", text="again"), 2.0)
    assert [describe(e) for e in effects] == [
        "cancel s1/r1 {'reason': 'barge-in: a new request arrived'}",
        *(["close"] if started else ["start r1"]),  # a job still waiting for context starts, so its worker ends it
        "log 20 cancelled s1/r1: barge-in: a new request arrived",
        "log 20 s1/r2: request (profile p)", "context.query s1/r2 {'limit': 20, 'persona': ''}"]
    assert old.cancelled and core.jobs[S].request.id == "r2"


def test_queue_keeps_requests_in_order_behind_the_running_reply() -> None:
    core = jobs("queue", history_limit=0)
    first, _ = running(core)
    assert core.request(request("r2", text="2"), 1.0) == []
    assert core.request(request("r3", text="3"), 1.0) == []
    assert [describe(e) for e in worker_end(core, first, None, 2.0)] == [
        "done s1/r1 ok", "log 20 s1/r1: ok after 0 tokens, first token - ms", "log 20 s1/r2: request (profile p)",
        "start r2"]
    second = core.jobs[S]
    assert second.request.id == "r2" and [m.id for m in core.waiting[S]] == ["r3"]
    effects = worker_end(core, second, None, 3.0)
    assert [describe(e) for e in effects][-2:] == ["log 20 s1/r3: request (profile p)", "start r3"]
    assert S not in core.waiting  # no empty queue is left behind


def test_a_session_cancel_drops_its_queue_and_a_reply_cancel_keeps_it() -> None:
    core = jobs("queue", history_limit=0)
    running(core)
    core.request(request("r2", text="2"), 1.0)
    core.cancel(S, "r1", "test", 1.5)
    assert [m.id for m in core.waiting[S]] == ["r2"]
    effects = core.cancel(S, "", "test", 1.6)
    assert S not in core.waiting
    ends = [e for e in effects if getattr(e, "kind", "") == "llm.done"]
    assert [(e.id, e.body.status, e.body.text) for e in ends] == [("r2", "interrupted", "")]


def test_a_cancel_naming_a_queued_request_ends_only_that_one() -> None:
    core = jobs("queue", history_limit=0)
    running(core)
    for number in (2, 3):
        core.request(request(f"r{number}", text=str(number)), 1.0)
    effects = core.cancel(S, "r2", "test", 1.5)
    assert [(e.id, e.body.status) for e in effects if getattr(e, "kind", "") == "llm.done"] == [
        ("r2", "interrupted")]
    assert [m.id for m in core.waiting[S]] == ["r3"] and not core.jobs[S].cancelled


@pytest.mark.parametrize("named", ["", "other"])
def test_reject_answers_busy_with_an_error_and_leaves_the_running_reply(named: str) -> None:
    core = jobs("reject")
    first, _ = running(core)
    effects = core.request(request("r2", text="again", profile=named), 5.0)
    assert kinds(effects) == ["report", "llm.done"]
    assert effects[0].text == "session s1 is still answering r1; llm.on_busy = reject"
    body = effects[1].body
    assert (body.status, body.error, body.profile, body.text, body.tokens) == (
        "error", "session busy: the previous reply is still being generated", named or "p", "", 0)
    assert body.metrics == {"total_ms": 0.0}
    protocol.encode(Message(body, S, "r2"))  # a valid message
    assert core.jobs[S] is first and not first.cancelled


# --- history's context --------------------------------------------------------------------------------

def test_context_starts_only_the_job_it_was_asked_for_and_only_once() -> None:
    core = jobs()
    core.request(request(text="hi"), 0.0)
    answer = context()
    assert core.context(context("other")) == []
    assert core.context(context(session="s2")) == []
    assert [describe(e) for e in core.context(answer)] == ["start r1 with context"]
    assert core.context(answer) == []


def test_without_an_answer_from_history_the_job_goes_ahead_at_the_deadline() -> None:
    core = jobs(context_timeout_ms=300)
    core.request(request(text="hi"), 10.0)
    assert core.next_tick() == pytest.approx(10.3)
    assert core.tick(10.29) == []
    assert [describe(e) for e in core.tick(core.next_tick())] == [
        "log 30 history did not answer within 300 ms for s1/r1; replying without history", "start r1"]
    assert core.next_tick() is None  # started, no call open yet: nothing to watch
    assert core.context(context()) == []  # too late


# --- the watchdog: every timeout -------------------------------------------------------------------

def test_a_call_without_a_first_token_is_closed_and_retried() -> None:
    core = jobs()
    job, call = running(core, now=100.0)
    assert core.next_tick() == 101.5
    assert core.tick(101.4) == []
    effects = core.tick(101.5)
    assert effects == [Close(call)] and job.timed_out == "first_token" and job.attempt_over
    assert core.next_tick() == 130.0 and core.tick(129.9) == []  # closed once; first_token_total_s still runs
    assert job.arrived(Delta("late"), 101.6) == []  # what the closed call still yields is dropped
    step = job.after_attempt(None, KeyRing(["k"]), 0.0, 101.5)
    assert isinstance(step, Retry) and step.delay == 0.25
    assert step.log.message == "attempt 1 failed (no first token within 1.5 s); retrying in 0.25 s"
    assert job.begin_attempt(102.0) and not job.timed_out and not job.attempt_over
    assert job.due() == 103.5  # the new attempt's deadline, even before its call is open


def test_a_stall_after_the_first_token_is_an_idle_timeout_that_ends_the_reply() -> None:
    core = jobs()
    job, call = running(core, now=0.0)
    assert [describe(e) for e in job.arrived(Delta("partial"), 0.4)] == ["token s1/r1 'partial'"]
    assert core.next_tick() == 1.4  # idle counts from the last delta
    assert job.arrived(Delta(" more"), 0.9) and core.next_tick() == 1.9
    assert core.tick(1.89) == [] and core.tick(1.9) == [Close(call)] and job.timed_out == "idle"
    error = job.after_attempt(None, KeyRing(["k"]), 0.0, 1.9)
    assert isinstance(error, ProviderError) and str(error) == "no token for 1 s; the reply was cut off"
    done = dones(worker_end(core, job, error, 2.0))[0]
    assert (done.status, done.text, done.error) == ("error", "partial more", str(error))


def test_a_cancelled_call_that_does_not_stop_is_abandoned_after_the_grace() -> None:
    core = jobs()
    job, _ = running(core, now=0.0)
    job.arrived(Delta("Hello"), 0.2)
    assert [describe(e) for e in core.cancel(S, "r1", "test", 1.0)] == ["close", "log 20 cancelled s1/r1: test"]
    assert core.next_tick() == 1.0 + CANCEL_GRACE_S
    assert core.tick(1.0 + CANCEL_GRACE_S / 2) == []
    effects = core.tick(1.0 + CANCEL_GRACE_S)
    assert [describe(e) for e in effects] == ["done s1/r1 interrupted",
                                              "log 20 s1/r1: interrupted after 1 tokens, first token 200 ms"]
    assert dones(effects)[0].text == "Hello" and S not in core.jobs
    assert worker_end(core, job, None, 5.0) == []  # the worker, unstuck at last, sends nothing more


def test_the_watchdog_wakes_at_the_earliest_deadline_of_all_sessions() -> None:
    core = jobs(context_timeout_ms=2000)
    core.request(request(session="a", text="hi"), 0.0)
    core.request(request(session="b", text="hi"), 1.0)
    core.cancel("b", "", "test", 1.5)
    assert core.next_tick() == pytest.approx(1.5 + CANCEL_GRACE_S)
    assert [describe(e) for e in core.tick(1.7)][-2:] == ["done b/r1 interrupted",
                                                          "log 20 b/r1: interrupted after 0 tokens, first token - ms"]
    assert core.next_tick() == 2.0


# --- retries and key rotation ----------------------------------------------------------------------

def failure(code: str, status: int | None = None, retry_after: float | None = None) -> ProviderError:
    return ProviderError(f"{code} failure", code=code, status=status, retry_after=retry_after)


@pytest.mark.parametrize(("errors", "keys", "expected"), [
    # server errors back off twice (retries = 2, 0.5 s doubling, jitter 0 halves it), then give up
    (["server", "server", "server"], 1, ["retry 0.25", "retry 0.5", "give up"]),
    (["connect", "timeout"], 1, ["retry 0.25", "retry 0.5"]),
    # a refused or throttled key moves to the next key at once, then follows the retry rules
    (["rate_limited", "rate_limited", "rate_limited", "rate_limited"], 2,
     ["rotate 1", "retry 0.25", "retry 0.5", "give up"]),
    (["auth", "auth"], 3, ["rotate 1", "rotate 2"]),
    (["auth", "auth", "auth"], 3, ["rotate 1", "rotate 2", "give up"]),
    (["auth"], 1, ["give up"]),
    (["bad_request"], 2, ["give up"]),
    (["blocked"], 1, ["give up"]),
    (["protocol"], 1, ["give up"]),
])
def test_retry_paths_before_the_first_token(errors: list[str], keys: int, expected: list[str]) -> None:
    job, _ = running(jobs())
    ring = KeyRing([f"k{n}" for n in range(keys)])
    steps = []
    for code in errors:
        step = job.after_attempt(failure(code), ring, 0.0, 1.0)
        if isinstance(step, Retry):
            steps.append(f"retry {step.delay:g}" if step.delay else f"rotate {ring.index}")
        else:
            assert isinstance(step, ProviderError) and step.code == code
            steps.append("give up")
    assert steps == expected


def test_retry_logs_name_the_attempt_or_the_key() -> None:
    job, _ = running(jobs())
    ring = KeyRing(["a", "b"])
    rotate = job.after_attempt(failure("rate_limited", 429, retry_after=3.0), ring, 0.0, 1.0)
    assert isinstance(rotate, Retry) and rotate.delay == 0.0
    assert rotate.log.message == "key 1 of profile p refused (rate_limited); trying the next key"
    wait = job.after_attempt(failure("rate_limited", 429, retry_after=3.0), ring, 0.0, 1.0)
    assert isinstance(wait, Retry) and wait.delay == 3.0  # Retry-After beats a shorter backoff
    assert wait.log.message == "attempt 1 failed (rate_limited failure); retrying in 3.00 s"
    assert job.after_attempt(failure("rate_limited", 429, retry_after=61.0), ring, 0.0, 1.0).code == "rate_limited"


def test_the_key_ring_is_shared_and_sticks_to_the_key_that_worked() -> None:
    ring = KeyRing(["a", "b"])
    first, _ = running(jobs())
    first.after_attempt(failure("auth", 401), ring, 0.0, 1.0)
    assert ring.current == "b"
    second, _ = running(jobs())
    assert second.after_attempt(failure("auth", 401), ring, 0.0, 1.0).delay == 0.0 and ring.current == "a"


def test_nothing_is_retried_after_the_first_token() -> None:
    job, _ = running(jobs())
    job.arrived(Delta(reasoning="thinking"), 0.1)  # reasoning commits too: a retry would repeat it
    error = failure("server")
    assert job.after_attempt(error, KeyRing(["k"]), 0.0, 1.0) is error


@pytest.mark.parametrize(("error", "timed_out", "cancelled", "expected"), [
    (None, "", False, None),                       # the call ended: the reply ends as it stands
    (None, "", True, None),
    (None, "first_token", True, None),             # cancelled: never retried
    (failure("server"), "", True, None),
    (TypeError("bug"), "", False, "TypeError"),    # a provider bug ends the reply with it
    (TypeError("bug"), "", True, None),
    (TypeError("bug"), "first_token", False, "timeout"),  # a watchdog close, however the call failed
    (TypeError("bug"), "first_token", True, "timeout"),
    (TypeError("bug"), "idle", False, "timeout"),
])
def test_how_an_attempt_ends(error: Exception | None, timed_out: str, cancelled: bool, expected: str | None) -> None:
    core = jobs()
    job, _ = running(core)
    job.timed_out = timed_out
    if cancelled:
        core.cancel(S, "", "test", 1.0)
    step = job.after_attempt(error, KeyRing(["k"]), 0.0, 1.0)
    if expected is None:
        assert step is None
    elif expected == "timeout":
        assert isinstance(step, ProviderError) and step.code == "timeout"
    else:
        assert step is error


@given(st.lists(st.sampled_from(["auth", "rate_limited", "server", "connect", "timeout", "bad_request"]),
                min_size=1, max_size=12),
       st.integers(1, 4), st.integers(0, 3), st.floats(0, 0.999), st.integers(0, 12))
def test_retries_and_rotations_stay_within_the_policy_and_the_ring(codes: list[str], keys: int, retries: int,
                                                                   jitter: float, commit_at: int) -> None:
    job, _ = running(jobs(), retries=retries)
    ring = KeyRing([f"k{n}" for n in range(keys)])
    retried = rotated = 0
    for attempt, code in enumerate(codes):
        if attempt == commit_at:
            job.arrived(Delta("text"), 1.0)
        step = job.after_attempt(failure(code), ring, jitter, 1.0)
        if not isinstance(step, Retry):
            assert isinstance(step, ProviderError)
            break
        assert not job.committed
        if step.delay == 0.0 and code in ("auth", "rate_limited"):
            rotated += 1
        else:
            retried += 1
            assert 0 < step.delay <= 8.0
    assert retried <= retries and rotated <= keys - 1


# --- first_token_total_s: one bound on the silence before the first token, over every attempt -------------

TOTAL = "llm.profiles.p.first_token_total_s"


def total_ended(effects: list[Effect], closed: bool) -> LlmDone:
    """The watchdog's end of a reply that ran out of first_token_total_s: its call closed (when one
    is open), an error event and llm.done status error with the same text, no text."""
    assert [describe(e) for e in effects][:-1] == [*(["close"] if closed else []),
                                                   "report provider_error s1/r1 request", "done s1/r1 error"]
    report = next(e for e in effects if isinstance(e, Report))
    done = dones(effects)[0]
    assert (done.status, done.text, done.tokens, done.error) == ("error", "", 0, report.text)
    return done


def test_the_total_passes_during_the_first_attempt() -> None:
    core = jobs()
    job, call = running(core, now=100.0, first_token_timeout_s=60.0, first_token_total_s=30.0)
    assert core.next_tick() == 130.0  # the total comes before the attempt's own 160.0
    assert core.tick(129.9) == []
    effects = core.tick(130.0)
    assert effects[0] == Close(call)
    done = total_ended(effects, closed=True)
    assert done.error == f"no first token within 30 s over 1 attempt ({TOTAL})"
    assert done.metrics["total_ms"] == 30000.0 and "ttft_ms" not in done.metrics
    assert effects[-1].message == "s1/r1: error after 0 tokens, first token - ms"
    assert S not in core.jobs and core.next_tick() is None and job.timed_out == "first_token_total"
    # the worker's call ends later (a call cut before its headers may wait for its read timeout):
    # no retry, and nothing more goes out
    step = job.after_attempt(None, KeyRing(["k"]), 0.0, 131.0)
    assert isinstance(step, ProviderError) and str(step) == done.error and step.code == "timeout"
    again = job.after_attempt(failure("server"), KeyRing(["k"]), 0.0, 131.0)  # whatever the closed call raised
    assert isinstance(again, ProviderError) and str(again) == done.error
    assert not job.begin_attempt(131.0)
    assert worker_end(core, job, step, 131.0) == []


def test_the_total_passes_during_a_later_attempt() -> None:
    """The issue's case: 10 s per attempt and two retries were 31 s of silence; now 30 s at most."""
    core = jobs()
    ring = KeyRing(["k"])
    job, call = running(core, now=0.0, first_token_timeout_s=10.0, first_token_total_s=30.0)
    for number, (opened_at, retry_at, delay) in enumerate([(0.0, 10.0, 0.25), (10.25, 20.25, 0.5)], 1):
        assert core.next_tick() == opened_at + 10.0 and core.tick(opened_at + 10.0) == [Close(call)]
        step = job.after_attempt(None, ring, 0.0, retry_at)
        assert isinstance(step, Retry) and step.delay == delay
        assert step.log.message == f"attempt {number} failed (no first token within 10 s); retrying in {delay:.2f} s"
        assert core.next_tick() == 30.0  # waiting out the delay, the total still runs
        call = Call()
        assert job.begin_attempt(retry_at + delay) and job.opened(call) == []
    assert core.next_tick() == 30.0  # not the third attempt's 30.75
    effects = core.tick(30.0)
    assert effects[0] == Close(call)
    assert total_ended(effects, closed=True).error == (
        f"no first token within 30 s over 3 attempts ({TOTAL}); attempt 2 failed: no first token within 10 s")
    assert worker_end(core, job, job.after_attempt(None, ring, 0.0, 30.1), 30.1) == []


def test_a_retry_delay_that_would_end_after_the_total_is_not_started() -> None:
    core = jobs()
    ring = KeyRing(["k"])
    job, _ = running(core, now=0.0, first_token_timeout_s=25.0, first_token_total_s=30.0, retries=5,
                     backoff_s=4.0, backoff_max_s=8.0)
    first = job.after_attempt(failure("server"), ring, 0.0, 1.0)
    assert isinstance(first, Retry) and first.delay == 2.0
    assert job.begin_attempt(3.0) and job.opened(Call()) == []
    # the second attempt fails at 27 s: its 4 s backoff would end at 31 s, after the total
    error = job.after_attempt(failure("server"), ring, 0.0, 27.0)
    assert isinstance(error, ProviderError) and error.code == "timeout"
    assert str(error) == (f"no first token after 27.0 s over 2 attempts, and a retry in 4.00 s would pass the 30 s "
                          f"bound ({TOTAL}); attempt 2 failed: server failure")
    assert job.retries == 1  # the refused retry is not counted, nor waited for
    effects = worker_end(core, job, error, 27.0)
    assert [describe(e) for e in effects][:2] == ["report provider_error s1/r1 request", "done s1/r1 error"]
    assert dones(effects)[0].error == str(error) == effects[0].text


@pytest.mark.parametrize(("error", "keys", "now", "expected"), [
    # a Retry-After that reaches past the total is not waited for
    (failure("rate_limited", 429, retry_after=40.0), 1, 1.0,
     f"no first token after 1.0 s over 1 attempt, and a retry in 40.00 s would pass the 30 s bound ({TOTAL}); "
     f"attempt 1 failed: rate_limited failure"),
    # a delay that would end exactly at the deadline would leave the next attempt no time at all
    (failure("server"), 1, 29.75,
     f"no first token after 29.8 s over 1 attempt, and a retry in 0.25 s would pass the 30 s bound ({TOTAL}); "
     f"attempt 1 failed: server failure"),
    # at or past the deadline (the watchdog not yet ticked) not even the next key is tried
    (failure("auth", 401), 2, 30.0,
     f"no first token within 30 s over 1 attempt ({TOTAL}); attempt 1 failed: auth failure"),
    (failure("server"), 1, 31.0,
     f"no first token within 30 s over 1 attempt ({TOTAL}); attempt 1 failed: server failure"),
])
def test_no_retry_ends_at_or_after_the_total(error: ProviderError, keys: int, now: float, expected: str) -> None:
    job, _ = running(jobs(), now=0.0, first_token_total_s=30.0)
    ring = KeyRing([f"k{n}" for n in range(keys)])
    step = job.after_attempt(error, ring, 0.0, now)
    assert isinstance(step, ProviderError) and str(step) == expected and ring.index == 0


def test_an_error_that_is_never_retried_keeps_its_own_text_after_the_total() -> None:
    job, _ = running(jobs(), now=0.0, first_token_total_s=30.0)
    error = failure("bad_request", 400)
    assert job.after_attempt(error, KeyRing(["k"]), 0.0, 31.0) is error


def test_the_total_passes_during_a_retry_delay() -> None:
    """A delay is only started when it ends before the total; a worker that wakes late from it finds
    the reply ended by the watchdog and starts no attempt."""
    core = jobs()
    job, _ = running(core, now=0.0, first_token_timeout_s=29.0, first_token_total_s=30.0)
    step = job.after_attempt(failure("server"), KeyRing(["k"]), 0.0, 29.0)
    assert isinstance(step, Retry) and step.delay == 0.25
    assert core.next_tick() == 30.0
    effects = core.tick(30.0)  # no call is open: nothing to close
    assert total_ended(effects, closed=False).error == (
        f"no first token within 30 s over 1 attempt ({TOTAL}); attempt 1 failed: server failure")
    assert not job.begin_attempt(30.5)
    assert worker_end(core, job, None, 30.5) == []


def test_the_total_passes_while_the_call_is_opening() -> None:
    """An attempt's deadlines run from its start: a call that opens after one passed is closed at once."""
    core = jobs()
    job, _ = running(core, now=0.0, first_token_timeout_s=20.0, first_token_total_s=30.0)
    job.after_attempt(failure("server"), KeyRing(["k"]), 0.0, 20.0)
    assert job.begin_attempt(20.25)  # the provider is slow to open the call (a model loading)
    total_ended(core.tick(30.0), closed=False)
    call = Call()
    assert job.opened(call) == [Close(call)]


def test_a_call_that_opens_after_its_own_deadline_is_closed_at_once() -> None:
    core = jobs()
    job, _ = running(core, now=0.0)
    assert job.begin_attempt(1.0) and core.next_tick() == 2.5
    assert core.tick(2.5) == [] and job.timed_out == "first_token"  # no call to close yet
    call = Call()
    assert job.opened(call) == [Close(call)]
    assert isinstance(job.after_attempt(None, KeyRing(["k"]), 0.0, 3.0), Retry)


@pytest.mark.parametrize("first", [Delta("Hi"), Delta(reasoning="thinking")])
def test_a_first_token_before_the_total_lifts_the_bound(first: Delta) -> None:
    core = jobs()
    job, _ = running(core, now=0.0, first_token_timeout_s=60.0, first_token_total_s=30.0, idle_timeout_s=40.0)
    assert core.next_tick() == 30.0
    job.arrived(first, 29.0)
    assert core.next_tick() == 69.0  # only the idle deadline from here on
    assert core.tick(30.0) == [] and core.tick(68.9) == []
    job.arrived(Delta(" there"), 60.0)
    effects = worker_end(core, job, job.after_attempt(None, KeyRing(["k"]), 0.0, 90.0), 90.0)
    assert dones(effects)[0].status == "ok"


def test_the_total_counts_from_the_request_not_from_the_first_attempt() -> None:
    """The wait for history's context is silence too, as llm.done's ttft_ms counts it."""
    core = jobs(context_timeout_ms=500)
    core.request(request(text="hi"), 10.0)
    core.tick(10.5)
    job = core.jobs[S]
    assert core.next_tick() is None  # the profile (and so the total) is not known yet
    job.configure(profile(first_token_total_s=5.0, first_token_timeout_s=60.0))
    assert core.next_tick() == 15.0
    assert job.begin_attempt(10.6) and job.opened(Call()) == [] and core.next_tick() == 15.0


# --- cancel before and after the first token -----------------------------------------------------------

def test_cancel_while_waiting_for_context_starts_the_job_so_its_worker_ends_it() -> None:
    core = jobs()
    core.request(request(text="hi"), 0.0)
    assert [describe(e) for e in core.cancel(S, "", "", 0.1)] == ["start r1", "log 20 cancelled s1/r1: "]
    job = core.jobs[S]
    job.configure(profile())
    assert not job.begin_attempt(0.2)  # the worker makes no call at all
    effects = worker_end(core, job, None, 0.3)
    assert [describe(e) for e in effects] == ["done s1/r1 interrupted",
                                              "log 20 s1/r1: interrupted after 0 tokens, first token - ms"]
    assert dones(effects)[0].text == ""


def test_cancel_while_the_call_is_opening_closes_it_as_soon_as_it_is_open() -> None:
    core = jobs(history_limit=0)
    core.request(request(text="hi"), 0.0)
    job = core.jobs[S]
    assert job.begin_attempt(0.0)
    assert [describe(e) for e in core.cancel(S, "r1", "test", 0.1)] == ["log 20 cancelled s1/r1: test"]  # no call yet
    call = Call()
    assert job.opened(call) == [Close(call)]


def test_cancel_before_the_first_token_ends_with_no_text() -> None:
    core = jobs()
    job, call = running(core)
    assert core.cancel(S, "r1", "user", 0.5)[0] == Close(call)
    assert job.arrived(Delta("too late"), 0.6) == [] and job.attempt_over and not job.committed
    assert job.after_attempt(None, KeyRing(["k"]), 0.0, 1.0) is None
    done = dones(worker_end(core, job, None, 0.7))[0]
    assert (done.status, done.text, done.tokens, done.error) == ("interrupted", "", 0, "")


def test_cancel_after_the_first_token_keeps_the_partial_text_and_publishes_nothing_more() -> None:
    core = jobs()
    job, _ = running(core)
    assert [describe(e) for e in job.arrived(Delta("One "), 0.2)] == ["token s1/r1 'One '"]
    core.cancel(S, "", "user", 0.3)
    assert job.arrived(Delta("two"), 0.4) == []
    assert job.after_attempt(failure("connect"), KeyRing(["k"]), 0.0, 1.0) is None  # the closed call's error
    effects = worker_end(core, job, failure("connect"), 0.5)
    assert [describe(e) for e in effects] == ["done s1/r1 interrupted",
                                              "log 20 s1/r1: interrupted after 1 tokens, first token 200 ms"]
    assert (dones(effects)[0].text, dones(effects)[0].error) == ("One ", "")


def test_a_cancel_for_another_reply_or_session_changes_nothing() -> None:
    core = jobs()
    job, _ = running(core)
    assert core.cancel(S, "r0", "old", 1.0) == [] and core.cancel("s2", "", "x", 1.0) == []
    assert not job.cancelled


def test_stopping_cancels_every_session() -> None:
    core = jobs()
    running(core)
    core.request(request(session="s2", text="hi"), 0.0)
    assert [describe(e) for e in core.stop(1.0)] == [
        "close", "log 20 cancelled s1/r1: stage stopping", "start r1", "log 20 cancelled s2/r1: stage stopping"]


# --- routing, guards and llm.done ---------------------------------------------------------------------

def test_reasoning_is_published_apart_and_only_the_reply_text_is_spoken() -> None:
    core = jobs()
    job, _ = running(core)
    routed = [describe(e) for e in job.arrived(Delta("Hi <thi", reasoning="plan. "), 0.1)]
    routed += [describe(e) for e in job.arrived(Delta("nk>inner</think>there"), 0.2)]
    routed += [describe(e) for e in job.arrived(Delta(""), 0.3)]  # an empty delta is no token
    routed += [describe(e) for e in worker_end(core, job, None, 0.4)]
    assert routed == ["reasoning s1/r1 'plan. '", "token s1/r1 'Hi '", "reasoning s1/r1 'inner'",
                      "token s1/r1 'there'", "done s1/r1 ok", "log 20 s1/r1: ok after 2 tokens, first token 100 ms"]


def test_a_guard_stop_closes_the_call_and_ends_the_reply_as_it_stands() -> None:
    core = jobs()
    job, call = running(core, stop_strings=["<END>"])
    effects = job.arrived(Delta("Fine. <EN"), 0.1)
    assert [describe(e) for e in effects] == ["token s1/r1 'Fine. '"] and not job.attempt_over
    assert job.arrived(Delta("D> leaked"), 0.2) == [Close(call)] and job.attempt_over
    job.timed_out = "idle"  # a watchdog close racing the guard's changes nothing
    assert job.after_attempt(None, KeyRing(["k"]), 0.0, 1.0) is None
    effects = worker_end(core, job, None, 0.3)
    done = dones(effects)[0]
    assert (done.status, done.text, done.guard, done.finish_reason) == ("ok", "Fine. ", "stop_string",
                                                                                   "guard")
    assert effects[-1].message == "s1/r1: ok after 1 tokens, first token 100 ms, stopped by stop_string"


def test_llm_done_carries_the_outcome_the_metrics_and_the_profile() -> None:
    core = jobs()
    job, _ = running(core, now=10.0)
    job.arrived(Delta("a"), 10.25)
    job.arrived(Delta("b"), 10.75)
    done = dones(worker_end(core, job, None, 11.0))[0]
    assert {key: getattr(done, key) for key in ("status", "text", "tokens", "provider", "model", "finish_reason",
                                                "profile", "reasoning", "guard", "error")} == {
        "status": "ok", "text": "ab", "tokens": 2, "provider": "openai", "model": "m1", "finish_reason": "stop",
        "profile": "p", "reasoning": "", "guard": "", "error": ""}
    assert done.metrics == {"total_ms": 1000.0, "ttft_ms": 250.0, "tokens_per_s": pytest.approx(1 / 0.75),
                            "usage_total_tokens": 5}
    protocol.encode(Message(done, S, "r1"))  # a valid message


def test_a_job_that_never_opened_a_call_reports_no_outcome() -> None:
    core = jobs(history_limit=0)
    core.request(request(text="hi", profile="missing"), 0.0)
    job = core.jobs[S]
    effects = core.worker_done(job, ConfigError("unknown profile 'missing'"), 0.5)
    assert [describe(e) for e in effects] == ["report provider_error s1/r1 request", "done s1/r1 error",
                                              "log 20 s1/r1: error after 0 tokens, first token - ms"]
    done = dones(effects)[0]
    assert (done.provider, done.model, done.finish_reason, done.profile) == ("", "", "", "missing")


@pytest.mark.parametrize(("error", "cancelled", "key_env", "expected"), [
    (None, False, "KEY", ("ok", "")),
    (None, True, "KEY", ("interrupted", "")),
    (ProviderError("HTTP 500", code="server"), False, "KEY", ("error", "HTTP 500")),
    (ProviderError("HTTP 401", code="auth"), False, "KEY",
     ("error", "HTTP 401; check the key in $KEY (or reserve_key_envs)")),
    (ProviderError("HTTP 401", code="auth"), False, "", ("error", "HTTP 401")),
    (ProviderError("HTTP 401", code="auth"), True, "KEY", ("interrupted", "")),
    (ConfigError("unknown profile 'x'"), False, "", ("error", "unknown profile 'x'")),
    (ValueError("bad image"), True, "", ("error", "bad image")),
    (KeyError("model"), False, "", ("error", "the llm stage failed (KeyError: 'model'); its log has the details")),
])
def test_the_status_and_error_of_llm_done(error: Exception | None, cancelled: bool, key_env: str,
                                          expected: tuple[str, str]) -> None:
    core = jobs()
    job, _ = running(core, api_key_env=key_env)
    if cancelled:
        core.cancel(S, "", "test", 1.0)
    assert job.ending(error) == expected


def test_a_long_error_is_cut_to_what_the_protocol_allows() -> None:
    core = jobs()
    job, _ = running(core)
    done = dones(core.finish(job, "error", "x" * 5000, 1.0))[0]
    assert len(done.error) == 2000


# --- the replay journal ------------------------------------------------------------------------------

def test_replay_resends_the_replies_newer_than_since_and_says_whether_any_was_dropped() -> None:
    journal = Journal(size=3)
    assert [describe(e) for e in journal.replay(message(ReplayQuery(since=0.0), "q", session=""))] == [
        "replay.done /q {'since': 0.0, 'count': 0, 'complete': True, 'oldest': 0.0}"]
    for n in range(1, 5):
        asked = request(f"r{n}", ts=float(n), text=f"question {n}", persona="Mila" if n == 4 else "")
        journal.add(asked, LlmDone(status="ok", text=f"answer {n}", tokens=n), 10.0 + n)
    effects = journal.replay(message(ReplayQuery(since=12.5), "q", session=""))
    assert [e.body for e in effects] == [  # with the request's persona, whose memories the reply's commands change
        Replay(request_text="question 3", request_ts=3.0, done_ts=13.0, status="ok", text="answer 3", tokens=3),
        Replay(request_text="question 4", request_ts=4.0, done_ts=14.0, status="ok", text="answer 4", tokens=4,
               request_persona="Mila"),
        ReplayDone(since=12.5, count=2, complete=True, oldest=12.0)]
    assert [e.id for e in effects] == ["r3", "r4", "q"]
    for replay in effects[:-1]:
        protocol.encode(Message(replay.body, S, replay.id))  # a valid message
    assert journal.replay(message(ReplayQuery(since=10.5), "q", session=""))[-1].body == ReplayDone(
        since=10.5, count=3, complete=False, oldest=12.0)  # r1 (11.0) was dropped
    assert journal.replay(message(ReplayQuery(since=11.0), "q", session=""))[-1].body.complete


def test_settings_come_from_the_llm_section() -> None:
    llm = {"profile": "x", "on_busy": "queue", "history_limit": 3, "context_timeout_ms": 40, "workers": 2}
    assert Settings.from_config(llm) == Settings("x", "queue", 3, 40)


# --- any course of events --------------------------------------------------------------------------

steps = st.lists(st.one_of(
    st.tuples(st.just("delta"), st.sampled_from(["a ", "b", "<think>x</think>", "<END> z", ""])),
    st.tuples(st.just("wait"), st.sampled_from([0.05, 0.1, 0.5, 1.0, 2.0])),
    st.tuples(st.just("fail"), st.sampled_from(["server", "auth", "rate_limited", "bad_request", "bug"])),
    st.tuples(st.just("end"), st.none()),
    st.tuples(st.just("cancel"), st.none()),
), max_size=25)


@given(steps)
def test_any_course_of_events_ends_in_one_llm_done_that_follows_all_its_tokens(script: list[tuple[str, Any]]) -> None:
    """The worker as the shell runs it, against a call that yields, fails or ends (a closed call only
    stops at the next "end" or "fail"), with the watchdog ticking and a cancel at any point.  No
    attempt starts, and no retry delay ends, once first_token_total_s has passed without a token."""
    core = jobs(history_limit=0)
    core.request(request(text="hi"), 0.0)
    job = core.jobs[S]
    job.configure(profile(stop_strings=["<END>"], first_token_total_s=3.0))
    ring = KeyRing(["k0", "k1"])
    effects: list[Effect] = []
    state: dict[str, Any] = {"now": 0.0, "call": None, "retried_after_a_token": False}

    def tokens() -> str:
        return "".join(e.body.text for e in effects if isinstance(e, Publish) and e.kind == "token")

    def attempt() -> None:
        if not job.begin_attempt(state["now"]):
            return finish(None)
        assert job.committed or state["now"] < job.first_token_by
        state["call"] = Call()
        effects.extend(job.opened(state["call"]))

    def attempt_ended(error: Exception | None) -> None:
        state["call"] = None
        step = job.after_attempt(error, ring, 0.5, state["now"])
        if not isinstance(step, Retry):
            return finish(step)
        state["retried_after_a_token"] |= bool(tokens())
        state["now"] += step.delay
        assert state["now"] < job.first_token_by
        effects.extend(core.tick(state["now"]))
        return finish(None) if job.cancelled else attempt()

    def finish(error: Exception | None) -> None:
        effects.extend(job.end(state["now"]) + core.worker_done(job, error, state["now"]))

    attempt()
    for action, value in script:
        if action == "wait":
            state["now"] += value
            effects.extend(core.tick(state["now"]))
        elif action == "cancel":
            effects.extend(core.cancel(S, "", "test", state["now"]))
        elif state["call"] is None:
            continue  # the worker has finished
        elif action == "delta":
            effects.extend(job.arrived(Delta(value), state["now"]))
            if job.attempt_over:
                attempt_ended(None)
        elif action == "fail":
            attempt_ended(TypeError("bug") if value == "bug" else failure(value))
        else:
            attempt_ended(None)
    while state["call"] is not None:  # the call ends by itself (a retry opens another)
        attempt_ended(None)

    done = [e for e in effects if isinstance(e, Done)]
    assert len(done) == 1
    after = effects[effects.index(done[0]):]
    assert not [e for e in after if isinstance(e, Publish) and e.kind in ("token", "reasoning")]
    body = done[0].body
    assert body.text == tokens() and "<END>" not in body.text
    assert (body.status == "interrupted") == job.cancelled
    assert not state["retried_after_a_token"]
