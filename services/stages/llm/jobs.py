"""The llm stage's job core: every request from arrival to its one llm.done, as pure decisions.

The shell feeds it what happens (a request, history's context, a cancel, a watchdog tick, an
attempt's opening, deltas and end) with the time it happened, and carries out the effects it
returns: messages to publish, errors to report, lines to log, a job to start on a worker, a
generation to close.  It reads no clock and touches no socket or thread, so every timeout, retry
path, cancel and busy policy can be driven at chosen instants in-process.

It is not thread-safe: the shell makes every call, and carries out its effects, under one lock.
That lock is also what keeps a reply's tokens ahead of its llm.done: a delta is routed only while
the job has not ended, and the job ends under the same lock.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ...config import ConfigError
from ...protocol import (
    Body,
    Cancel,
    Context,
    ContextQuery,
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
from ...protocol.kinds import TEXT
from ...runtime.replies import cancels
from ...secrets import KeyRing
from .core import Reply, profile_timeouts, sendable
from .guards import GuardPolicy, ReplyGuard
from .providers.base import Delta, Generation, ProviderError, Timeouts
from .retry import RetryPolicy, next_step
from .think import ThinkSplitter

JOURNAL_SIZE = 2000
"""Finished replies kept for replay, so a restarted history stage can catch up on what it missed."""
CANCEL_GRACE_S = 0.1
"""A call that has not stopped this long after a cancel is abandoned: llm.done goes out anyway."""
BARGE_IN = "barge-in: a new request arrived"
TOTAL = "first_token_total"
"""Job.timed_out once the profile's first_token_total_s passed with no token: the watchdog ended the reply."""
FAILURES = (ProviderError, ConfigError, ValueError)
"""What a reply can fail with and say why in words; anything else is a bug, logged with its traceback."""
STAGE_FAILED = "the llm stage failed"
"""How llm.done's error opens when the reply failed on a bug rather than a provider: its log has the traceback."""


# --- effects: what the shell carries out, in order ---------------------------------------------

@dataclass(frozen=True)
class Publish:
    """Publish `body` as a message of the reply (session, id)."""

    session: str
    id: str
    body: Body

    @property
    def kind(self) -> str:
        return self.body.kind


@dataclass(frozen=True)
class Report:
    """An error event, logged and counted (Connection.report)."""

    code: ErrorCode
    text: str
    session: str
    id: str
    ref_kind: str


@dataclass(frozen=True)
class Log:
    """A line for the stage's log, as logging's format and arguments."""

    level: int
    text: str
    args: tuple[Any, ...] = ()

    @property
    def message(self) -> str:
        return self.text % self.args


@dataclass(frozen=True)
class Start:
    """Run the job's generation on a worker, with history's context (None: without)."""

    job: Job
    context: Message[Context] | None


@dataclass(frozen=True)
class Close:
    """Close a generation: the server stops generating, and a worker blocked on it wakes."""

    generation: Generation


@dataclass(frozen=True)
class Done:
    """Publish the reply's llm.done, then journal it with the ts it went out with."""

    request: Message[Request]
    body: LlmDone


Effect = Publish | Report | Log | Start | Close | Done


@dataclass(frozen=True)
class Retry:
    """Try again after `delay` seconds (the key ring has already moved on when the key was refused)."""

    delay: float
    log: Log


# --- one job -------------------------------------------------------------------------------------

@dataclass(eq=False)
class Job:
    """A request from arrival to llm.done: the worker's attempts and the watchdog both act on it."""

    request: Message[Request]
    profile: str
    """The profile llm.done names: the request's, else the default one."""
    deadline: float
    """When to stop waiting for history's context and go ahead without it."""
    reply: Reply
    started: bool = False
    cancelled_at: float | None = None
    ended: bool = False
    # from the profile, once the worker has it
    provider: str = ""
    api_key_env: str = ""
    timeouts: Timeouts = field(default_factory=Timeouts)
    first_token_total: float = math.inf
    """The profile's first_token_total_s: from the request to the first token, over every attempt."""
    setting: str = ""
    """Where first_token_total is set, for the error that names it."""
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    guard: ReplyGuard = field(default_factory=lambda: ReplyGuard(GuardPolicy()))
    splitter: ThinkSplitter = field(default_factory=ThinkSplitter)
    reasoning: list[str] = field(default_factory=list)
    # the attempts
    generation: Generation | None = None
    """The newest attempt's call (kept once it is over: llm.done reports its outcome)."""
    attempts: int = 0
    in_attempt: bool = False
    """Between begin_attempt and after_attempt: the attempt's own deadlines apply."""
    call_open: bool = False
    """The current attempt's call is open (`generation`), so the watchdog can close it."""
    attempt_started: float = 0.0
    last_delta: float = 0.0
    committed: bool = False
    """A token (or reasoning) came: from here on nothing is retried, since that would repeat speech."""
    timed_out: str = ""
    """"first_token" or "idle" once the watchdog closed the current attempt; TOTAL once it ended the reply."""
    retries: int = 0
    rotations: int = 0
    last_failure: str = ""
    """Which attempt was last retried and why, for the error of a reply that runs out of first_token_total."""

    @property
    def cancelled(self) -> bool:
        return self.cancelled_at is not None

    @property
    def fired(self) -> str | None:
        """The guard that stopped the reply, if one did."""
        return self.guard.fired

    @property
    def attempt_over(self) -> bool:
        """Cancelled, closed by the watchdog or stopped by a guard: no further delta is read."""
        return self.cancelled or bool(self.timed_out) or self.fired is not None

    def configure(self, profile: Mapping[str, Any]) -> None:
        """Take what the profile sets for this reply; done first, so even a provider that cannot
        load is named in llm.done."""
        self.provider = profile["provider"]
        self.api_key_env = profile.get("api_key_env", "")
        self.guard = ReplyGuard(GuardPolicy.from_profile(profile))
        self.splitter = ThinkSplitter.from_profile(profile)
        self.timeouts = profile_timeouts(profile)
        self.first_token_total = profile["first_token_total_s"]
        self.setting = f"llm.profiles.{profile['name']}.first_token_total_s"
        self.policy = RetryPolicy.from_profile(profile)

    # --- the watchdog ------------------------------------------------------------------------

    @property
    def first_token_by(self) -> float:
        """When the reply runs out of first_token_total_s (inf until the profile is known)."""
        return self.reply.started + self.first_token_total

    def due(self) -> float | None:
        """When the watchdog next has to act on this job, if ever: the attempt's own deadline, and
        before the first token the reply's first_token_total_s, in a retry delay too."""
        if self.cancelled_at is not None:
            return self.cancelled_at + CANCEL_GRACE_S
        if not self.started:
            return self.deadline
        deadlines = [] if self.committed else [self.first_token_by]
        if self.in_attempt and not self.timed_out:
            deadlines.append(self.last_delta + self.timeouts.idle if self.committed
                             else self.attempt_started + self.timeouts.first_token)
        due = min(deadlines, default=math.inf)
        return due if math.isfinite(due) else None

    def total_error(self, now: float, failure: ProviderError | None = None,
                    delay: float | None = None) -> ProviderError:
        """The error of a reply that ran out of first_token_total_s before its first token: at the
        deadline, or at an attempt's end when the retry's `delay` would pass it.  It names the
        setting, the time waited and the attempts made, and the latest failure."""
        attempts = f"{self.attempts} attempt{'' if self.attempts == 1 else 's'}"
        if delay is None or now >= self.first_token_by:
            text = f"no first token within {self.first_token_total:g} s over {attempts} ({self.setting})"
        else:
            text = (f"no first token after {now - self.reply.started:.1f} s over {attempts}, and a retry in "
                    f"{delay:.2f} s would pass the {self.first_token_total:g} s bound ({self.setting})")
        last = f"attempt {self.attempts} failed: {failure}" if failure is not None else self.last_failure
        return ProviderError(f"{text}; {last}" if last else text, code="timeout")

    def timeout_error(self) -> ProviderError | None:
        """The error a watchdog close stands for (TOTAL: see total_error; the watchdog has sent it)."""
        if self.timed_out == "first_token":
            return ProviderError(f"no first token within {self.timeouts.first_token:g} s", code="timeout")
        if self.timed_out == "idle":
            return ProviderError(f"no token for {self.timeouts.idle:g} s; the reply was cut off", code="timeout")
        return None

    # --- the worker's attempts ---------------------------------------------------------------

    def begin_attempt(self, now: float) -> bool:
        """An attempt starts now; False when the job was cancelled or has ended (the watchdog ended
        it at first_token_total_s), so none does."""
        if self.cancelled or self.ended:
            return False
        self.timed_out = ""
        self.attempt_started = now
        self.attempts += 1
        self.in_attempt = True
        self.call_open = False
        return True

    def opened(self, generation: Generation) -> list[Effect]:
        """The attempt's call is open; if a cancel or the watchdog came while it was opening, it is
        closed at once."""
        self.generation = generation
        self.call_open = True
        return [Close(generation)] if self.cancelled or self.timed_out else []

    def arrived(self, delta: Delta, now: float) -> list[Effect]:
        """A delta of the open call: its first text or reasoning commits the reply; a guard that fires
        closes the call.  Ignored once the attempt is over."""
        if self.attempt_over or not (delta.text or delta.reasoning):
            return []
        self.committed = True
        self.last_delta = now
        text, reasoning = sendable(delta.text), sendable(delta.reasoning)
        effects = self._route(self.splitter.push(text, reasoning), reasoning, now)
        if self.fired and self.generation is not None:
            effects.append(Close(self.generation))
        return effects

    def after_attempt(self, error: Exception | None, ring: KeyRing, jitter: float,
                      now: float) -> Retry | Exception | None:
        """How the reply goes on after an attempt that ended with `error` (None: the call ended) at
        `now`: a Retry; an exception that ends the reply; or None, the reply ends as it stands.

        A watchdog close stands for a timeout.  A provider error (a timeout among them) before the
        first token is retried, to the next key at once when the key was refused, else after a
        backoff; after the first token never.  `jitter` in [0, 1) spreads the backoffs of clients.
        No retry starts that would end at or after first_token_total_s: the reply fails at once.
        """
        self.in_attempt = self.call_open = False
        if self.timed_out == TOTAL:  # the watchdog has ended the reply with this error already
            return self.total_error(now)
        if not isinstance(error, ProviderError):
            timeout = self.timeout_error()
            if error is not None:  # a provider bug: a watchdog close still means a timeout, not retried
                return timeout or (None if self.cancelled else error)
            if timeout is None or self.fired:
                return None
            error = timeout
        if self.cancelled:
            return None
        if self.committed:
            return error
        step = next_step(error, self.retries, len(ring.keys) - 1 - self.rotations, self.policy, jitter)
        if step is None:
            return error
        if now + step.delay >= self.first_token_by:
            return self.total_error(now, error, step.delay)
        self.last_failure = f"attempt {self.attempts} failed: {error}"
        if step.rotate:
            self.rotations += 1
            ring.rotate()
            return Retry(step.delay, Log(logging.WARNING, "key %d of profile %s refused (%s); trying the next key",
                                         (ring.index, self.profile, error.code)))
        self.retries += 1
        return Retry(step.delay, Log(logging.WARNING, "attempt %d failed (%s); retrying in %.2f s",
                                     (self.retries, error, step.delay)))

    def end(self, now: float) -> list[Effect]:
        """The attempts are over: release what the think splitter and the guard held back."""
        reason = self.generation.outcome.finish_reason if self.generation is not None else ""
        return self._route(self.splitter.finish(reason), "", now, end=True)

    def ending(self, error: Exception | None) -> tuple[str, str]:
        """llm.done's status and error text for a worker that ended with `error` (None: it ran through).
        A bug says so, naming the exception."""
        if error is None or (isinstance(error, ProviderError) and self.cancelled):
            return ("interrupted" if self.cancelled else "ok"), ""
        if isinstance(error, ProviderError):
            hint = (f"; check the key in ${self.api_key_env} (or reserve_key_envs)"
                    if error.code == "auth" and self.api_key_env else "")
            return "error", f"{error}{hint}"
        if isinstance(error, FAILURES):
            return "error", str(error)
        return "error", f"{STAGE_FAILED} ({type(error).__name__}: {error}); its log has the details"

    def _route(self, split: Delta, provider_reasoning: str, now: float, end: bool = False) -> list[Effect]:
        """Reasoning apart, and reply text only as far as the guard releases it; nothing once the
        job has ended or was cancelled."""
        text = self.guard.push(split.text) + (self.guard.finish() if end else "")
        if self.ended or self.cancelled:
            return []
        effects: list[Effect] = []
        for part in (provider_reasoning, split.reasoning):
            part = self.guard.reasoning(part) if part else ""
            if part:
                self.reasoning.append(part)
                effects += [Publish(self.request.session, self.request.id, Reasoning(text=piece))
                            for piece in _pieces(part)]
        for piece in _pieces(text):
            self.reply.add(piece, now)
            effects.append(Publish(self.request.session, self.request.id, Token(text=piece)))
        return effects


def _pieces(text: str) -> list[str]:
    """Text in pieces of at most TEXT characters, what one token or reasoning message carries: a
    provider may hand over a whole reply at once (not streaming), up to the guard's size limit."""
    return [text[start:start + TEXT] for start in range(0, len(text), TEXT)]


# --- every session's jobs --------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    """The [llm] keys the job core follows."""

    profile: str = "local"
    on_busy: str = "cancel"
    history_limit: int = 20
    context_timeout_ms: int = 500

    @classmethod
    def from_config(cls, llm: Mapping[str, Any]) -> Settings:
        return cls(llm["profile"], llm["on_busy"], llm["history_limit"], llm["context_timeout_ms"])


Entry = tuple[Message[Request], LlmDone, float]


class Journal:
    """The newest finished replies with the ts their llm.done went out with, so that a history stage
    that restarted can ask for what it missed (replay.query) and learn whether that is complete."""

    def __init__(self, size: int = JOURNAL_SIZE) -> None:
        self.size = size
        self.entries: deque[Entry] = deque()
        self.dropped_until = 0.0

    def add(self, request: Message[Request], done: LlmDone, ts: float) -> None:
        self.entries.append((request, done, ts))
        if len(self.entries) > self.size:
            self.dropped_until = self.entries.popleft()[2]

    def replay(self, query: Message[ReplayQuery]) -> list[Publish]:
        """A replay of each reply newer than `since`, then replay.done saying whether none was dropped."""
        since = query.body.since
        entries = [entry for entry in self.entries if entry[2] > since]
        replays = [Publish(request.session, request.id, Replay(
                       **vars(done), request_text=request.body.text, request_ts=request.ts, done_ts=done_ts,
                       request_persona=request.body.persona))
                   for request, done, done_ts in entries]
        return [*replays, Publish("", query.id, ReplayDone(
            since=since, count=len(entries), complete=self.dropped_until <= since,
            oldest=self.entries[0][2] if self.entries else 0.0))]


class Jobs:
    """The job of each session, the requests queued behind it (llm.on_busy = queue), and the journal."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.jobs: dict[str, Job] = {}
        self.waiting: dict[str, deque[Message[Request]]] = {}
        self.journal = Journal()

    def request(self, request: Message[Request], now: float) -> list[Effect]:
        """Begin a request; while its session is still answering, llm.on_busy decides: queue it,
        reject it, or cancel the old reply (barge-in)."""
        busy = self.jobs.get(request.session)
        if busy is None:
            return self._begin(request, now)
        if self.settings.on_busy == "queue":
            self.waiting.setdefault(request.session, deque()).append(request)
            return []
        if self.settings.on_busy == "reject":
            done = Reply(request.session, request.id, now).done(
                "error", now, error="session busy: the previous reply is still being generated",
                profile=request.body.profile or self.settings.profile)
            return [Report(ErrorCode.BUSY, f"session {request.session} is still answering {busy.request.id}; "
                           f"llm.on_busy = reject", request.session, request.id, "request"),
                    Publish(request.session, request.id, done)]
        # Barge-in: every stage drops the old reply, not just this one.
        return [Publish(request.session, busy.request.id, Cancel(reason=BARGE_IN)),
                *self.cancel(request.session, busy.request.id, BARGE_IN, now), *self._begin(request, now)]

    def context(self, context: Message[Context]) -> list[Effect]:
        """History's answer starts the job it was asked for, unless the job went ahead without it."""
        job = self.jobs.get(context.session)
        if job is None or job.request.id != context.id or job.started:
            return []
        return self._start(job, context)

    def cancel(self, session: str, id: str, reason: str, now: float) -> list[Effect]:
        """Cancel the session's job if it is `id` (empty: whichever it is, and the queued ones too;
        a queued request named by `id` is dropped from the queue).

        A job still waiting for context starts anyway, so that its worker ends it; a running call is
        closed, and if it does not stop within CANCEL_GRACE_S the watchdog ends the job itself."""
        dropped = self._drop_waiting(session, id, now)
        job = self.jobs.get(session)
        if job is None or not cancels((session, job.request.id), session, id):
            return dropped
        job.cancelled_at = now
        effects: list[Effect] = [Close(job.generation)] if job.generation is not None else []
        if not job.started:
            effects += self._start(job, None)
        return [*dropped, *effects, Log(logging.INFO, "cancelled %s/%s: %s", (session, job.request.id, reason))]

    def _drop_waiting(self, session: str, id: str, now: float) -> list[Effect]:
        """Queued requests (llm.on_busy = queue) a cancel names (`cancels`: all of the session's for an
        empty id): each still gets its one llm.done, interrupted with no text, so no front-end waits on it."""
        queue = self.waiting.get(session)
        if not queue:
            return []
        dropped = [request for request in queue if cancels((request.session, request.id), session, id)]
        kept = deque(request for request in queue if request not in dropped)
        if kept:
            self.waiting[session] = kept
        else:
            del self.waiting[session]
        return [Publish(request.session, request.id,
                        Reply(request.session, request.id, now).done(
                            "interrupted", now, profile=request.body.profile or self.settings.profile))
                for request in dropped]

    def stop(self, now: float, reason: str = "stage stopping") -> list[Effect]:
        """The stage is stopping, or the bus was lost: cancel every job, so that each still ends with
        its llm.done (which history gets once a bus is back)."""
        return [effect for session in list(self.jobs) for effect in self.cancel(session, "", reason, now)]

    def next_tick(self) -> float | None:
        return min((due for job in self.jobs.values() if (due := job.due()) is not None), default=None)

    def tick(self, now: float) -> list[Effect]:
        """The watchdog: end a cancelled job whose call did not stop, go ahead without a late
        context, end a reply that had no first token within first_token_total_s (closing its call:
        no retry follows), close a call that missed its first-token or idle deadline."""
        effects: list[Effect] = []
        for job in list(self.jobs.values()):
            due = job.due()
            if due is None or due > now:
                continue
            if job.cancelled:
                effects += self.finish(job, "interrupted", "", now)
            elif not job.started:
                effects.append(Log(logging.WARNING, "history did not answer within %d ms for %s/%s; replying "
                                   "without history", (self.settings.context_timeout_ms, job.request.session,
                                                       job.request.id)))
                effects += self._start(job, None)
            elif not job.committed and now >= job.first_token_by:
                # The worker may stay blocked until its read timeout (a call cut before the response
                # headers): the reply ends now, and what the worker does later changes nothing.
                job.timed_out = TOTAL
                effects += [Close(job.generation)] if job.call_open and job.generation is not None else []
                effects += self.finish(job, "error", str(job.total_error(now)), now)
            elif job.in_attempt:
                job.timed_out = "idle" if job.committed else "first_token"
                if job.call_open and job.generation is not None:
                    effects.append(Close(job.generation))
        return effects

    def worker_done(self, job: Job, failure: Exception | None, now: float) -> list[Effect]:
        """The worker is through with `job`, which ended in `failure` (None: it ran through): its llm.done."""
        return self.finish(job, *job.ending(failure), now)

    def finish(self, job: Job, status: str, error: str, now: float) -> list[Effect]:
        """The job's one llm.done (from its worker, or from the watchdog after a cancel), then the
        session's next queued request.  The session is idle before llm.done goes out, so a request
        sent on seeing it is not taken for a busy one."""
        if job.ended:
            return []
        job.ended = True
        request = job.request
        if self.jobs.get(request.session) is job:
            del self.jobs[request.session]
        waiting = self.waiting.get(request.session)
        queued = waiting.popleft() if waiting else None
        if waiting is not None and not waiting:
            del self.waiting[request.session]  # no empty queue left behind per session
        outcome = job.generation.outcome if job.generation is not None else None
        guard = job.fired
        done = job.reply.done(
            status, now, error=error, provider=job.provider, model=outcome.model if outcome else "",
            finish_reason="guard" if guard else (outcome.finish_reason if outcome else ""),
            usage=outcome.usage if outcome else None, guard=guard or "", reasoning="".join(job.reasoning),
            profile=job.profile)
        ttft = f"{done.metrics['ttft_ms']:.0f}" if "ttft_ms" in done.metrics else "-"
        effects: list[Effect] = [
            *([Report(ErrorCode.PROVIDER_ERROR, error, request.session, request.id, "request")] if error else []),
            Done(request, done),
            Log(logging.INFO, "%s/%s: %s after %d tokens, first token %s ms%s",
                (request.session, request.id, status, done.tokens, ttft, f", stopped by {guard}" if guard else ""))]
        return effects + (self._begin(queued, now) if queued is not None else [])

    def _begin(self, request: Message[Request], now: float) -> list[Effect]:
        """Register the job, then ask history for context (with the memories and variables of the
        request's persona), or start at once when none is wanted."""
        profile = request.body.profile or self.settings.profile
        job = Job(request, profile, deadline=now + self.settings.context_timeout_ms / 1000,
                  reply=Reply(request.session, request.id, started=now))
        self.jobs[request.session] = job
        effects: list[Effect] = [Log(logging.INFO, "%s/%s: request (profile %s)",
                                     (request.session, request.id, profile))]
        if self.settings.history_limit == 0:
            return effects + self._start(job, None)
        query = ContextQuery(limit=self.settings.history_limit, persona=request.body.persona)
        return [*effects, Publish(request.session, request.id, query)]

    @staticmethod
    def _start(job: Job, context: Message[Context] | None) -> list[Effect]:
        job.started = True
        return [Start(job, context)]
