"""The llm stage shell: requests in; tokens, reasoning and llm.done out.

A request first asks the history stage for context (bounded wait, then it goes
ahead without), then runs on a worker thread so a slow provider never delays
another session.  The main loop is the watchdog: it closes a call that misses
its first-token or idle deadline.  Before the first token a failure is retried
(rotating keys, backing off); after it, never, because that would repeat speech.
"""

from __future__ import annotations

import collections
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..protocol import Message
from ..runtime import Stage
from ..secrets import read_key
from .core import Reply, build_messages, render_dialogue, render_persona, resolve_prompt_style, trim_history
from .guards import GuardPolicy, ReplyGuard
from .providers import create_provider
from .providers.base import (ChatRequest, Delta, Generation, Image, Params, Provider, ProviderError,
                             Timeouts)
from .retry import KeyRing, RetryPolicy, next_step
from .think import ThinkSplitter


JOURNAL_SIZE = 2000
"""Finished replies kept for replay, so a restarted history stage can catch up on what it missed."""
CANCEL_GRACE_S = 0.1
"""A call that has not stopped this long after a cancel is abandoned: llm.done goes out anyway."""


@dataclass
class Job:
    """A request from arrival to llm.done; the worker writes it, the watchdog reads it."""

    request: Message
    deadline: float
    cancelled: threading.Event = field(default_factory=threading.Event)
    generation: Generation | None = None
    started: bool = False
    attempt_started: float = 0.0
    last_delta: float = 0.0
    committed: bool = False
    timed_out: str = ""
    timeouts: Timeouts = Timeouts()
    cancelled_at: float = 0.0
    ended: bool = False
    reply: Reply | None = None
    reasoning: list[str] = field(default_factory=list)
    provider: str = ""
    profile: str = ""


class LlmStage(Stage):
    name = "llm"
    kinds = ("request", "cancel", "context", "replay.query")

    def prepare(self) -> None:
        llm = self.config["llm"]
        self.persona = self._persona(llm)
        self.providers: dict[str, Provider] = {}
        self.keyrings: dict[str, KeyRing] = {}
        self.provider_lock = threading.Lock()
        self._provider(llm["profile"]).load()
        self.pool = ThreadPoolExecutor(max_workers=llm["workers"], thread_name_prefix="llm")
        self.jobs: dict[str, Job] = {}
        self.waiting: dict[str, collections.deque[Message]] = collections.defaultdict(collections.deque)
        self.lock = threading.Lock()
        self.journal: collections.deque[tuple[Message, dict[str, Any], float]] = collections.deque()
        self.journal_dropped_until = 0.0

    @staticmethod
    def _persona(llm: dict[str, Any]) -> str:
        """The system prompt: llm.persona_file when set, else llm.system_prompt."""
        if not llm["persona_file"]:
            return llm["system_prompt"]
        try:
            return Path(llm["persona_file"]).expanduser().read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"key llm.persona_file = {llm['persona_file']!r} cannot be read: "
                              f"{exc.strerror}") from None

    def _provider(self, name: str) -> Provider:
        profile = self.config.profile(name)
        with self.provider_lock:
            if profile["name"] not in self.providers:
                self.providers[profile["name"]] = create_provider(profile)
                self.keyrings[profile["name"]] = KeyRing(read_key(profile))
            return self.providers[profile["name"]]

    # --- requests, context and cancel (main thread) -----------------------------------------

    def handle(self, message: Message) -> None:
        if message.kind == "request":
            self._on_request(message)
        elif message.kind == "cancel":
            self._cancel(message.session, message.id, message["reason"] or "cancelled")
        elif message.kind == "context":
            with self.lock:
                job = self.jobs.get(message.session)
            if job and job.request.id == message.id and not job.started:
                self._start(job, message)
        elif message.kind == "replay.query":
            self._replay(message)

    def _replay(self, query: Message) -> None:
        """Re-send the finished replies newer than `since` from the journal, then say how complete it was."""
        with self.lock:
            entries = [entry for entry in self.journal if entry[2] > query["since"]]
            complete = self.journal_dropped_until <= query["since"]
            oldest = self.journal[0][2] if self.journal else 0.0
        for request, done, done_ts in entries:
            self.bus.publish("replay", request.session, request.id, request_text=request["text"],
                             request_ts=request.ts, done_ts=done_ts, **done)
        self.bus.publish("replay.done", "", query.id, since=query["since"], count=len(entries),
                         complete=complete, oldest=oldest)

    def _on_request(self, request: Message) -> None:
        with self.lock:
            busy = self.jobs.get(request.session)
            policy = self.config["llm"]["on_busy"]
            if busy is not None and policy == "queue":
                self.waiting[request.session].append(request)
                return
        if busy is not None and policy == "reject":
            self.bus.report("busy", f"session {request.session} is still answering {busy.request.id}; "
                            f"llm.on_busy = reject", request.session, request.id, "request")
            self.bus.publish("llm.done", request.session, request.id, **Reply(
                request.session, request.id, time.monotonic()).done_fields(
                "error", time.monotonic(), error="session busy: the previous reply is still being generated"),
                profile=request["profile"] or self.config["llm"]["profile"])
            return
        if busy is not None:
            # Barge-in: every stage drops the old reply, not just this one.
            self.bus.publish("cancel", request.session, busy.request.id, reason="barge-in: a new request arrived")
            self._cancel(request.session, busy.request.id, "barge-in: a new request arrived")
        self._begin(request)

    def _begin(self, request: Message) -> None:
        """Register the job and ask history for context (any thread)."""
        llm = self.config["llm"]
        job = Job(request, deadline=time.monotonic() + llm["context_timeout_ms"] / 1000,
                  reply=Reply(request.session, request.id, started=time.monotonic()),
                  profile=request["profile"] or llm["profile"])
        with self.lock:
            self.jobs[request.session] = job
        self.log.info("%s/%s: request (profile %s)", request.session, request.id,
                      request["profile"] or llm["profile"])
        if llm["history_limit"] == 0:
            self._start(job, None)
        else:
            self.bus.publish("context.query", request.session, request.id, limit=llm["history_limit"])

    def _start(self, job: Job, context: Message | None) -> None:
        job.started = True
        self.pool.submit(self._run, job, context)

    def _cancel(self, session: str, id: str, reason: str) -> None:
        with self.lock:
            job = self.jobs.get(session)
            if not id:
                self.waiting.pop(session, None)
        if job is None or (id and job.request.id != id):
            return
        job.cancelled_at = time.monotonic()
        job.cancelled.set()
        if job.generation is not None:
            job.generation.close()
        if not job.started:
            self._start(job, None)
        self.log.info("cancelled %s/%s: %s", session, job.request.id, reason)

    # --- the watchdog (main thread) ---------------------------------------------------------

    def next_tick(self) -> float | None:
        with self.lock:
            jobs = list(self.jobs.values())
        due = []
        for job in jobs:
            if job.cancelled.is_set():
                due.append(job.cancelled_at + CANCEL_GRACE_S)
            elif not job.started:
                due.append(job.deadline)
            elif job.generation is not None and not job.timed_out:
                due.append(self._deadline(job))
        return min(due) if due else None

    @staticmethod
    def _deadline(job: Job) -> float:
        if job.committed:
            return job.last_delta + job.timeouts.idle
        return job.attempt_started + job.timeouts.first_token

    def tick(self, now: float) -> None:
        with self.lock:
            jobs = list(self.jobs.values())
        for job in jobs:
            if job.cancelled.is_set():
                if job.cancelled_at + CANCEL_GRACE_S <= now:
                    self._finish(job, "interrupted", "", None)
            elif not job.started and job.deadline <= now:
                self.log.warning("history did not answer within %d ms for %s/%s; replying without history",
                                 self.config["llm"]["context_timeout_ms"], job.request.session, job.request.id)
                self._start(job, None)
            elif job.generation is not None and not job.timed_out and self._deadline(job) <= now:
                job.timed_out = "idle" if job.committed else "first_token"
                job.generation.close()

    # --- generation (worker thread) ---------------------------------------------------------

    def _run(self, job: Job, context: Message | None) -> None:
        """Generate one reply and end it with llm.done (unless the watchdog already did)."""
        request = job.request
        splitter = ThinkSplitter()
        status, error, guard, profile = "ok", "", None, {}
        try:
            profile = self.config.profile(request["profile"])
            job.provider = profile["provider"]
            guard = ReplyGuard(GuardPolicy.from_profile(profile))
            provider = self._provider(profile["name"])
            chat = self._chat_request(profile, request, context)
            if chat.has_images and not provider.accepts_images:
                raise ProviderError(f"provider {profile['provider']} (profile {profile['name']}) does not accept "
                                    f"images; send them to a vision-capable profile", code="unsupported")
            job.timeouts = chat.timeouts
            for delta in self._attempts(job, provider, chat, profile):
                self._route(job, guard, splitter.push(delta.text), delta.reasoning)
                if guard.fired and job.generation is not None:
                    job.generation.close()
                    break
            self._route(job, guard, splitter.finish(), "", end=True)
            if job.cancelled.is_set():
                status = "interrupted"
        except ProviderError as exc:
            status, error = ("interrupted", "") if job.cancelled.is_set() else ("error", str(exc))
            if exc.code == "auth" and profile.get("api_key_env"):
                error += f"; check the key in ${profile['api_key_env']} (or reserve_key_envs)"
        except (ConfigError, ValueError) as exc:
            status, error = "error", str(exc)
        except Exception as exc:  # a provider bug must still end the reply
            self.log.exception("provider failed")
            status, error = "error", f"{type(exc).__name__}: {exc}"
        self._finish(job, status, error, guard.fired if guard else None)

    def _chat_request(self, profile: dict[str, Any], request: Message, context: Message | None) -> ChatRequest:
        stream = profile["stream"] if request["stream"] is None else request["stream"]
        images = [Image(image["data"], image["mime"]) for image in request["images"]]
        history = trim_history(context["messages"] if context else [], self.config["llm"]["history_token_budget"])
        persona = render_persona(self.persona, context["memory"] if context else "",
                                 context["variables"] if context else None)
        params = Params(
            max_tokens=profile["max_tokens"], temperature=profile["temperature"],
            top_p=profile["top_p"] or None, top_k=profile["top_k"] or None,
            presence_penalty=profile["presence_penalty"] or None, stop=tuple(profile["stop"]),
            reasoning_budget=None if profile["reasoning_budget"] < 0 else profile["reasoning_budget"])
        timeouts = Timeouts(profile["connect_timeout_s"], profile["first_token_timeout_s"], profile["idle_timeout_s"])
        messages = build_messages(persona, history, request["text"], images)
        if resolve_prompt_style(profile) == "chat":
            return ChatRequest(messages, stream=stream, params=params, timeouts=timeouts)
        prompt, stops = render_dialogue(persona, history, request["text"], profile["assistant_name"])
        params = replace(params, stop=(*params.stop, *stops))
        return ChatRequest(messages, stream=stream, params=params, timeouts=timeouts, prompt=prompt)

    def _attempts(self, job: Job, provider: Provider, chat: ChatRequest, profile: dict[str, Any]):
        """Yield the deltas of the first attempt that produces any; retry only before that."""
        ring = self.keyrings[profile["name"]]
        policy = RetryPolicy.from_profile(profile)
        retries = rotations = 0
        while not job.cancelled.is_set():
            job.timed_out = ""
            job.attempt_started = time.monotonic()
            try:
                job.generation = provider.open(chat, ring.current)
                if job.cancelled.is_set():
                    job.generation.close()
                for delta in job.generation:
                    if job.cancelled.is_set() or job.timed_out:
                        break
                    if delta.text or delta.reasoning:
                        job.committed = True
                        job.last_delta = time.monotonic()
                        yield delta
                self._raise_timeout(job)
                return
            except ProviderError as error:
                if job.cancelled.is_set():
                    return
                if job.committed:
                    raise
                step = next_step(error, retries, len(ring.keys) - 1 - rotations, policy, random.random())
                if step is None:
                    raise
                if step.rotate:
                    rotations += 1
                    ring.rotate()
                    self.log.warning("key %d of profile %s refused (%s); trying the next key",
                                     ring.index, profile["name"], error.code)
                else:
                    retries += 1
                    self.log.warning("attempt %d failed (%s); retrying in %.2f s", retries, error, step.delay)
                if job.cancelled.wait(step.delay):
                    return
            except Exception:
                self._raise_timeout(job)
                if not job.cancelled.is_set():
                    raise
                return

    @staticmethod
    def _raise_timeout(job: Job) -> None:
        """Turn a watchdog close into the error it stands for."""
        if job.timed_out == "first_token":
            raise ProviderError(f"no first token within {job.timeouts.first_token:g} s", code="timeout")
        if job.timed_out == "idle":
            raise ProviderError(f"no token for {job.timeouts.idle:g} s; the reply was cut off", code="timeout")

    def _route(self, job: Job, guard: ReplyGuard, delta: Delta, provider_reasoning: str, end: bool = False) -> None:
        """Publish reasoning apart, and reply text only as far as the guard releases it."""
        request = job.request
        text = guard.push(delta.text) + (guard.finish() if end else "")
        with self.lock:  # the watchdog may end the job concurrently; nothing goes out after llm.done
            if job.ended or job.cancelled.is_set():
                return
            for part in (provider_reasoning, delta.reasoning):
                if part:
                    job.reasoning.append(part)
                    self.bus.publish("reasoning", request.session, request.id, text=part)
            if text:
                job.reply.add(text, time.monotonic())
                self.bus.publish("token", request.session, request.id, text=text)

    def _finish(self, job: Job, status: str, error: str, guard: str | None) -> None:
        """Publish the reply's one llm.done (from the worker, or the watchdog after a cancel)."""
        request = job.request
        generation = job.generation
        with self.lock:  # before llm.done, so a request sent on seeing it finds the session idle
            if job.ended:
                return
            job.ended = True
            if self.jobs.get(request.session) is job:
                self.jobs.pop(request.session, None)
            waiting = self.waiting.get(request.session)
            queued = waiting.popleft() if waiting else None
            if waiting is not None and not waiting:
                del self.waiting[request.session]   # no empty queue left behind per session
            if error:
                self.bus.report("provider_error", error, request.session, request.id, "request")
            outcome = generation.outcome if generation else None
            done = job.reply.done_fields(
                status, time.monotonic(), error=error, provider=job.provider,
                model=outcome.model if outcome else "",
                finish_reason="guard" if guard else (outcome.finish_reason if outcome else ""),
                usage=outcome.usage if outcome else None, guard=guard or "", reasoning="".join(job.reasoning))
            done["profile"] = job.profile
            sent = self.bus.publish("llm.done", request.session, request.id, **done)
            self.log.info("%s/%s: %s after %d tokens, first token %s ms%s", request.session, request.id, status,
                          done["tokens"], f"{done['metrics']['ttft_ms']:.0f}" if "ttft_ms" in done["metrics"]
                          else "-", f", stopped by {guard}" if guard else "")
            self.journal.append((request, done, sent.ts))
            if len(self.journal) > JOURNAL_SIZE:
                self.journal_dropped_until = self.journal.popleft()[2]
        if queued is not None:
            self._begin(queued)

    def shutdown(self) -> None:
        with self.lock:
            sessions = list(self.jobs)
        for session in sessions:
            self._cancel(session, "", "stage stopping")
        self.pool.shutdown(wait=True, cancel_futures=False)
