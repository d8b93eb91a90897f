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
    return job.end(now) + core.finish(job, *job.ending(error), now)


# --- requests and the busy policies ----------------------------------------------------------------

def test_a_request_asks_history_for_context_or_starts_at_once_without_history() -> None:
    assert [describe(e) for e in jobs().request(request(text="hi"), 0.0)] == [
        "log 20 s1/r1: request (profile p)", "context.query s1/r1 {'limit': 20}"]
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
        "log 20 s1/r2: request (profile p)", "context.query s1/r2 {'limit': 20}"]
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
    assert core.next_tick() is None and core.tick(200.0) == []  # closed once
    assert job.arrived(Delta("late"), 101.6) == []  # what the closed call still yields is dropped
    step = job.after_attempt(None, KeyRing(["k"]), 0.0)
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
    error = job.after_attempt(None, KeyRing(["k"]), 0.0)
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
        step = job.after_attempt(failure(code), ring, 0.0)
        if isinstance(step, Retry):
            steps.append(f"retry {step.delay:g}" if step.delay else f"rotate {ring.index}")
        else:
            assert isinstance(step, ProviderError) and step.code == code
            steps.append("give up")
    assert steps == expected


def test_retry_logs_name_the_attempt_or_the_key() -> None:
    job, _ = running(jobs())
    ring = KeyRing(["a", "b"])
    rotate = job.after_attempt(failure("rate_limited", 429, retry_after=3.0), ring, 0.0)
    assert isinstance(rotate, Retry) and rotate.delay == 0.0
    assert rotate.log.message == "key 1 of profile p refused (rate_limited); trying the next key"
    wait = job.after_attempt(failure("rate_limited", 429, retry_after=3.0), ring, 0.0)
    assert isinstance(wait, Retry) and wait.delay == 3.0  # Retry-After beats a shorter backoff
    assert wait.log.message == "attempt 1 failed (rate_limited failure); retrying in 3.00 s"
    assert job.after_attempt(failure("rate_limited", 429, retry_after=61.0), ring, 0.0).code == "rate_limited"


def test_the_key_ring_is_shared_and_sticks_to_the_key_that_worked() -> None:
    ring = KeyRing(["a", "b"])
    first, _ = running(jobs())
    first.after_attempt(failure("auth", 401), ring, 0.0)
    assert ring.current == "b"
    second, _ = running(jobs())
    assert second.after_attempt(failure("auth", 401), ring, 0.0).delay == 0.0 and ring.current == "a"


def test_nothing_is_retried_after_the_first_token() -> None:
    job, _ = running(jobs())
    job.arrived(Delta(reasoning="thinking"), 0.1)  # reasoning commits too: a retry would repeat it
    error = failure("server")
    assert job.after_attempt(error, KeyRing(["k"]), 0.0) is error


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
    step = job.after_attempt(error, KeyRing(["k"]), 0.0)
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
        step = job.after_attempt(failure(code), ring, jitter)
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
    assert job.after_attempt(None, KeyRing(["k"]), 0.0) is None
    done = dones(worker_end(core, job, None, 0.7))[0]
    assert (done.status, done.text, done.tokens, done.error) == ("interrupted", "", 0, "")


def test_cancel_after_the_first_token_keeps_the_partial_text_and_publishes_nothing_more() -> None:
    core = jobs()
    job, _ = running(core)
    assert [describe(e) for e in job.arrived(Delta("One "), 0.2)] == ["token s1/r1 'One '"]
    core.cancel(S, "", "user", 0.3)
    assert job.arrived(Delta("two"), 0.4) == []
    assert job.after_attempt(failure("connect"), KeyRing(["k"]), 0.0) is None  # the closed call's error
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
    assert job.after_attempt(None, KeyRing(["k"]), 0.0) is None
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
    effects = core.finish(job, *job.ending(ConfigError("unknown profile 'missing'")), 0.5)
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
    (KeyError("model"), False, "", ("error", "KeyError: 'model'")),
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
        asked = request(f"r{n}", ts=float(n), text=f"question {n}")
        journal.add(asked, LlmDone(status="ok", text=f"answer {n}", tokens=n), 10.0 + n)
    effects = journal.replay(message(ReplayQuery(since=12.5), "q", session=""))
    assert [e.body for e in effects] == [
        Replay(request_text="question 3", request_ts=3.0, done_ts=13.0, status="ok", text="answer 3", tokens=3),
        Replay(request_text="question 4", request_ts=4.0, done_ts=14.0, status="ok", text="answer 4", tokens=4),
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
    stops at the next "end" or "fail"), with the watchdog ticking and a cancel at any point."""
    core = jobs(history_limit=0)
    core.request(request(text="hi"), 0.0)
    job = core.jobs[S]
    job.configure(profile(stop_strings=["<END>"]))
    ring = KeyRing(["k0", "k1"])
    effects: list[Effect] = []
    state: dict[str, Any] = {"now": 0.0, "call": None, "retried_after_a_token": False}

    def tokens() -> str:
        return "".join(e.body.text for e in effects if isinstance(e, Publish) and e.kind == "token")

    def attempt() -> None:
        if not job.begin_attempt(state["now"]):
            return finish(None)
        state["call"] = Call()
        effects.extend(job.opened(state["call"]))

    def attempt_ended(error: Exception | None) -> None:
        state["call"] = None
        step = job.after_attempt(error, ring, 0.5)
        if not isinstance(step, Retry):
            return finish(step)
        state["retried_after_a_token"] |= bool(tokens())
        state["now"] += step.delay
        effects.extend(core.tick(state["now"]))
        return finish(None) if job.cancelled else attempt()

    def finish(error: Exception | None) -> None:
        effects.extend(job.end(state["now"]) + core.finish(job, *job.ending(error), state["now"]))

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
