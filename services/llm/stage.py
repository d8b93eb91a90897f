"""The llm stage shell: requests in, tokens and llm.done out.

A request first asks the history stage for context (bounded wait, then it goes
ahead without), then runs on a worker thread so a slow provider never delays
another session.  A new request in a busy session cancels the old one (barge-in).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigError
from ..protocol import Message
from ..runtime import Stage
from .core import Reply, build_messages
from .providers import create_provider
from .providers.base import ChatRequest, Generation, Provider, ProviderError


@dataclass
class Job:
    """A request from arrival to llm.done."""

    request: Message
    deadline: float
    cancelled: threading.Event = field(default_factory=threading.Event)
    generation: Generation | None = None
    started: bool = False


class LlmStage(Stage):
    name = "llm"
    kinds = ("request", "cancel", "context")

    def prepare(self) -> None:
        llm = self.config["llm"]
        self.providers: dict[str, Provider] = {}
        self.provider_lock = threading.Lock()
        default = self._provider(llm["profile"])
        default.load()
        self.pool = ThreadPoolExecutor(max_workers=llm["workers"], thread_name_prefix="llm")
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()

    def _provider(self, name: str) -> Provider:
        profile = self.config.profile(name)
        with self.provider_lock:
            if profile["name"] not in self.providers:
                self.providers[profile["name"]] = create_provider(profile)
            return self.providers[profile["name"]]

    def handle(self, message: Message) -> None:
        if message.kind == "request":
            self._on_request(message)
        elif message.kind == "cancel":
            self._cancel(message.session, message.id, message["reason"] or "cancelled")
        elif message.kind == "context":
            job = self.jobs.get(message.session)
            if job and job.request.id == message.id and not job.started:
                self._start(job, message["messages"])

    def _on_request(self, request: Message) -> None:
        with self.lock:
            busy = self.jobs.get(request.session)
        if busy is not None:
            # Barge-in: every stage drops the old reply, not just this one.
            self.bus.publish("cancel", request.session, busy.request.id, reason="barge-in: a new request arrived")
            self._cancel(request.session, busy.request.id, "barge-in: a new request arrived")
        llm = self.config["llm"]
        job = Job(request, deadline=time.monotonic() + llm["context_timeout_ms"] / 1000)
        with self.lock:
            self.jobs[request.session] = job
        if llm["history_limit"] == 0:
            self._start(job, [])
            return
        self.bus.publish("context.query", request.session, request.id, limit=llm["history_limit"])

    def next_tick(self) -> float | None:
        waiting = [job.deadline for job in self.jobs.values() if not job.started]
        return min(waiting) if waiting else None

    def tick(self, now: float) -> None:
        for job in list(self.jobs.values()):
            if not job.started and job.deadline <= now:
                self.log.warning("history did not answer within %d ms for %s/%s; replying without history",
                                 self.config["llm"]["context_timeout_ms"], job.request.session, job.request.id)
                self._start(job, [])

    def _start(self, job: Job, history: list[dict[str, str]]) -> None:
        job.started = True
        self.pool.submit(self._generate, job, history)

    def _cancel(self, session: str, id: str, reason: str) -> None:
        job = self.jobs.get(session)
        if job is None or (id and job.request.id != id):
            return
        job.cancelled.set()
        if job.generation is not None:
            job.generation.close()
        if not job.started:
            job.started = True
            self.pool.submit(self._generate, job, [])
        self.log.info("cancelled %s/%s: %s", session, job.request.id, reason)

    def _generate(self, job: Job, history: list[dict[str, str]]) -> None:
        """Worker thread: run the provider, publish each delta, end with llm.done."""
        request = job.request
        reply = Reply(request.session, request.id, started=time.monotonic())
        status, error, provider_name, outcome = "ok", "", "", None
        try:
            profile = self.config.profile(request["profile"])
            provider_name = profile["provider"]
            stream = profile["stream"] if request["stream"] is None else request["stream"]
            if job.cancelled.is_set():
                raise _Cancelled
            chat = ChatRequest(build_messages(self.config["llm"]["system_prompt"], history, request["text"]),
                               stream=stream, max_tokens=profile["max_tokens"], temperature=profile["temperature"])
            job.generation = self._provider(profile["name"]).open(chat)
            outcome = job.generation.outcome
            if job.cancelled.is_set():
                job.generation.close()
            for text in job.generation:
                if job.cancelled.is_set():
                    break
                reply.add(text, time.monotonic())
                self.bus.publish("token", request.session, request.id, text=text)
            if job.cancelled.is_set():
                status = "interrupted"
        except _Cancelled:
            status = "interrupted"
        except (ProviderError, ConfigError, ValueError) as exc:
            status, error = ("interrupted", "") if job.cancelled.is_set() else ("error", str(exc))
        except Exception as exc:  # a provider bug must still end the reply
            self.log.exception("provider failed")
            status, error = "error", f"{type(exc).__name__}: {exc}"
        with self.lock:  # before llm.done, so a request sent on seeing it finds the session idle
            if self.jobs.get(request.session) is job:
                self.jobs.pop(request.session, None)
        error = error[:2000]
        if error:
            self.bus.report("provider_error", error, request.session, request.id, "request")
        self.bus.publish("llm.done", request.session, request.id, **reply.done_fields(
            status, time.monotonic(), error=error, provider=provider_name,
            model=outcome.model if outcome else "", finish_reason=outcome.finish_reason if outcome else "",
            usage=outcome.usage if outcome else None))

    def shutdown(self) -> None:
        for session in list(self.jobs):
            self._cancel(session, "", "stage stopping")
        self.pool.shutdown(wait=True, cancel_futures=False)


class _Cancelled(Exception):
    """Cancelled before the provider was called."""
