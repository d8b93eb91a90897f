"""The llm stage shell: requests in; tokens, reasoning and llm.done out.

The decisions are the job core's (jobs.py): the busy policy, the wait for history's context, cancel,
the watchdog's deadlines, retries and key rotation, routing and the journal.  This shell feeds it
the bus messages, the provider's deltas and the time, and carries out what it returns.  Each reply
runs on a worker thread, so a slow provider never delays another session; the main loop ticks the
watchdog.  Every call into the core, and its effects, happen under one lock.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from ...protocol import Cancel, Context, ErrorCode, LlmDone, Message, ProtocolError, ReplayQuery, Request
from ...runtime import Stage, handles
from ...secrets import KeyRing, read_key
from .core import chat_request, fit
from .jobs import FAILURES, STAGE_FAILED, Close, Done, Effect, Job, Jobs, Log, Publish, Report, Retry, Settings, Start
from .persona import Personas
from .providers import create_provider
from .providers.base import ChatRequest, Provider, ProviderError


class LlmStage(Stage):
    name = "llm"

    def prepare(self) -> None:
        llm = self.config["llm"]
        self.personas = Personas.load(llm)
        self.providers: dict[str, Provider] = {}
        self.keyrings: dict[str, KeyRing] = {}
        self.provider_lock = threading.Lock()
        provider = self._provider(llm["profile"])
        provider.load()
        provider.warm(self.keyrings[llm["profile"]].current)
        self.pool = ThreadPoolExecutor(max_workers=llm["workers"], thread_name_prefix="llm")
        self.lock = threading.Condition()
        """Held for every call into the core; a worker waiting out a retry delay waits on it for a cancel."""
        self.core = Jobs(Settings.from_config(llm))

    def _provider(self, name: str) -> Provider:
        profile = self.config.profile(name)
        with self.provider_lock:
            if profile["name"] not in self.providers:
                self.providers[profile["name"]] = create_provider(profile)
                self.keyrings[profile["name"]] = KeyRing(read_key(profile))
            return self.providers[profile["name"]]

    # --- the main thread ------------------------------------------------------------------------

    @handles(Request)
    def on_request(self, message: Message[Request]) -> None:
        with self.lock:
            self._apply(self.core.request(message, time.monotonic()))
            self.lock.notify_all()  # a barge-in's cancel ends a worker's retry delay at once

    @handles(Cancel)
    def on_cancel(self, message: Message[Cancel]) -> None:
        with self.lock:
            self._apply(self.core.cancel(message.session, message.id, message.body.reason or "cancelled",
                                         time.monotonic()))
            self.lock.notify_all()  # a cancel ends a worker's retry delay at once

    @handles(Context)
    def on_context(self, message: Message[Context]) -> None:
        with self.lock:
            self._apply(self.core.context(message))

    @handles(ReplayQuery)
    def on_replay_query(self, message: Message[ReplayQuery]) -> None:
        with self.lock:
            replay = self.core.journal.replay(message)
        self._apply(replay)  # outside the lock: a long replay must not hold up the replies being generated

    def next_tick(self) -> float | None:
        with self.lock:
            return self.core.next_tick()

    def tick(self, now: float) -> None:
        with self.lock:
            self._apply(self.core.tick(now))

    def bus_lost(self) -> None:
        with self.lock:
            self._apply(self.core.stop(time.monotonic(), "bus lost"))
            self.lock.notify_all()

    def shutdown(self) -> None:
        with self.lock:
            self._apply(self.core.stop(time.monotonic()))
            self.lock.notify_all()
        self.pool.shutdown(wait=True, cancel_futures=False)

    def _apply(self, effects: Iterable[Effect]) -> None:
        """Carry out the core's effects in order (under the lock, but for a replay's publishes)."""
        for effect in effects:
            match effect:
                case Publish(session, id, body):
                    self.bus.publish(session, id, body)
                case Report(code, text, session, id, ref_kind):
                    self.bus.report(code, text, session, id, ref_kind)
                case Log(level, text, args):
                    self.log.log(level, text, *args)
                case Start(job, context):
                    self.pool.submit(self._run, job, context)
                case Close(generation):
                    generation.close()
                case Done(request, body):
                    self._done(request, body)

    def _done(self, request: Message[Request], body: LlmDone) -> None:
        """Publish a reply's llm.done and journal it.  One the protocol refuses (a bug: the core fits
        every field) still ends the reply: as an error that says why, with the text (which went out as
        tokens already) and without what the provider reported besides it."""
        try:
            sent = self.bus.publish(request.session, request.id, body)
        except ProtocolError as exc:
            self.log.error("llm.done of %s/%s refused by the protocol (%s); sending it as an error",
                           request.session, request.id, exc)
            error = fit(LlmDone, "error", "; ".join(filter(None, [f"{STAGE_FAILED}: its llm.done was refused ({exc})",
                                                                  body.error])))
            body = replace(body, status="error", error=error, model="", finish_reason="", metrics={}, reasoning="")
            self.bus.report(ErrorCode.INTERNAL, error, request.session, request.id, "request")
            sent = self.bus.publish(request.session, request.id, body)
        self.core.journal.add(request, body, sent.ts)

    # --- a worker thread ------------------------------------------------------------------------

    def _run(self, job: Job, context: Message[Context] | None) -> None:
        """Generate one reply and end it with llm.done (unless the watchdog already did).

        Every failure ends the reply, this the one place for that: one on the way is the reply's error,
        one in ending it is logged with its traceback, as the pool would keep it unseen."""
        try:
            failure = self._generate(job, context)
            with self.lock:
                self._apply(self.core.worker_done(job, failure, time.monotonic()))
        except Exception:
            self.log.exception("ending %s/%s failed", job.request.session, job.request.id)

    def _generate(self, job: Job, context: Message[Context] | None) -> Exception | None:
        """The reply's attempts, then its end; what failed on the way (None: nothing)."""
        try:
            profile = self.config.profile(job.request.body.profile)
            with self.lock:
                job.configure(profile)
            provider = self._provider(profile["name"])
            persona = self.personas.text(job.request.body.persona)
            chat = chat_request(profile, job.request.body, context.body if context else None, persona,
                                self.config["llm"]["history_token_budget"])
            if chat.has_images and not provider.accepts_images:
                raise ProviderError(f"provider {profile['provider']} (profile {profile['name']}) does not accept "
                                    f"images; send them to a vision-capable profile", code="unsupported")
            self._attempts(job, provider, chat, self.keyrings[profile["name"]])
            with self.lock:
                self._apply(job.end(time.monotonic()))
        except Exception as exc:  # a provider bug must still end the reply
            if not isinstance(exc, FAILURES):
                self.log.exception("%s/%s failed", job.request.session, job.request.id)
            return exc
        return None

    def _attempts(self, job: Job, provider: Provider, chat: ChatRequest, ring: KeyRing) -> None:
        """Call the provider until an attempt ends the reply; the core decides on each retry."""
        while True:
            with self.lock:
                if not job.begin_attempt(time.monotonic()):
                    return
            error: Exception | None = None
            try:
                generation = provider.open(chat, ring.current)
                with self.lock:
                    self._apply(job.opened(generation))
                for delta in generation:
                    with self.lock:
                        self._apply(job.arrived(delta, time.monotonic()))
                        if job.attempt_over:
                            break
            except Exception as exc:  # what any failure means is the core's decision
                error = exc
            with self.lock:
                step = job.after_attempt(error, ring, random.random(), time.monotonic())
                if isinstance(step, Retry):
                    self._apply([step.log])
                    if self.lock.wait_for(lambda: job.cancelled or job.ended, step.delay):
                        return
                    continue
            if step is not None:
                raise step
            return
