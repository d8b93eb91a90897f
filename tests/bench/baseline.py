"""The daemon against the same parts in one process (issue 15, goal 1).

The baseline runs, in this process and with no bus, what the daemon's stages run: the llm profile's
provider (`LocalProvider` with llama.cpp and the bundled model, or `OpenAIProvider` against the fake
server), the think splitter and reply guard the llm stage applies, the chunker core with the
configured policy, the configured tts engine (espeak-ng), and the null player backend.  Every part is
built from the running daemon's own config, and the prompt is built by the llm stage's own
`chat_request` from the very `context` history sent the daemon for the same question, so both paths
ask the model the same text.

Threads as in the daemon's processes: this thread reads the provider and feeds the chunker (the llm
and chunker stages), a second one synthesises each chunk and hands its frames to the null backend
(the tts and player stages), so generation goes on while the first chunk is spoken.  Not modelled:
the chunker's stall flush (600 ms without a token, which neither configuration here produces).

Replies alternate daemon, baseline, daemon, baseline, ... each daemon reply in a new session.  The
daemon's timeline is read from the bus, all on the wall clock (`ts`, set by each message's sender):
the `request` the bench publishes, llm's `context.query` and history's `context`, and history's
`metrics` for the reply (first token as the llm stage timed it; first `chunk`, `audio` and
`playback` as their senders stamped them).  The baseline's is read on CLOCK_MONOTONIC at the same
points: the first reply text out of the guard, the first chunk out of the chunker, the first frame
out of the engine, and the frame handed to the backend.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.bench import fake_llm
from tests.bench.pipeline import BenchError
from tests.bench.stats import median, percentile
from tests.bench.system import LOCAL_PROFILE, PROMPTS
from tests.harness import Daemon, openai_settings
from voxpipe import protocol
from voxpipe.protocol import Chunk, Context, ContextQuery, Error, LlmDone, Message, Metrics, Request
from voxpipe.runtime import Connection, endpoints_for
from voxpipe.stages.chunker.core import Chunker, ChunkerOutput, ChunkerPolicy
from voxpipe.stages.llm.core import chat_request, sendable
from voxpipe.stages.llm.guards import GuardPolicy, ReplyGuard
from voxpipe.stages.llm.providers import create_provider
from voxpipe.stages.llm.providers.base import Provider
from voxpipe.stages.llm.stage import LlmStage
from voxpipe.stages.llm.think import ThinkSplitter
from voxpipe.stages.player.backends.null import NullBackend
from voxpipe.stages.tts.engines import create_engine
from voxpipe.stages.tts.normalize import spell_numbers

KEY = {"FAKE_OPENAI_KEY": "test-key"}
TOKEN_DELAY_S = 0.025
"""The fake server's pause after each SSE event: 40 tokens/s."""
TARGET_MS = 10.0
"""Goal 1: the daemon's TTFA at most this much over the baseline's, p50."""
TIMEOUT_S = 180.0
BOUNDARIES = ("token", "chunk", "audio", "playback")
"""request → first token → first chunk → first audio frame → first playback."""
LABELS = {"token": "first token", "chunk": "first chunk", "audio": "first audio frame",
          "playback": "first playback"}


@dataclass
class Reply:
    """One reply's milestones in ms from its request, and what only one path can tell."""

    path: str
    ms: dict[str, float] = field(default_factory=dict)
    text: str = ""
    extra: dict[str, float] = field(default_factory=dict)
    """daemon: `context.query` and `context` (ms from the request); baseline: `released` (when the
    tts stage would publish the first frame: the second frame or the engine's end), `waited` (ms the
    chunker held its first chunk for the token after its end, else absent)."""


# --- the baseline: the same parts in this process ----------------------------------------------

class Baseline:
    """The daemon's parts, built from its config, run in this process."""

    def __init__(self, config: Any, api_key: str = "") -> None:
        llm = config["llm"]
        self.profile = config.profile(llm["profile"])
        self.persona = LlmStage._persona(llm)
        self.history_budget = llm["history_token_budget"]
        self.provider: Provider = create_provider(self.profile)
        self.api_key = api_key
        self.policy = ChunkerPolicy.from_mapping(config["chunker"])
        tts = config["tts"]
        self.engine = create_engine(tts["engine"], tts.get(tts["engine"], {}))
        self.normalize = tuple(tts.get(tts["engine"], {}).get("normalize_numbers", ()))
        self.provider.load()

    def reply(self, text: str, context: Context | None) -> Reply:
        """One streamed reply, from the request to the last frame handed to the player."""
        start = time.monotonic()
        marks: dict[str, float] = {}
        chunks: queue.SimpleQueue[Chunk | None] = queue.SimpleQueue()
        speaker = threading.Thread(target=self._speak, args=(chunks, marks), name="baseline-tts", daemon=True)
        speaker.start()
        chat = chat_request(self.profile, Request(text=text, stream=True), context, self.persona,
                            self.history_budget)
        splitter = ThinkSplitter.from_profile(self.profile)
        guard = ReplyGuard(GuardPolicy.from_profile(self.profile))
        chunker = Chunker(self.policy)
        fed: list[tuple[float, str]] = []
        generation = self.provider.open(chat, self.api_key)

        def feed(piece: str, now: float) -> None:
            if not piece:
                return
            marks.setdefault("token", now)
            fed.append((now, piece))
            self._chunks(chunker.feed(piece, now), chunks, marks, fed)

        try:
            for delta in generation:
                split = splitter.push(sendable(delta.text), sendable(delta.reasoning))
                feed(guard.push(split.text), time.monotonic())
                if guard.fired:
                    generation.close()
                    break
            split = splitter.finish(generation.outcome.finish_reason)
            now = time.monotonic()
            feed(guard.push(split.text) + guard.finish(), now)
            self._chunks(chunker.finish(now), chunks, marks, fed)
        finally:
            chunks.put(None)
            speaker.join(TIMEOUT_S)
        if speaker.is_alive():
            raise BenchError("the baseline's tts thread did not finish")
        missing = [b for b in BOUNDARIES if b not in marks]
        if missing:
            raise BenchError(f"baseline reply reached no {', '.join(missing)}: {marks}")
        reply = Reply("baseline", {b: (marks[b] - start) * 1000 for b in BOUNDARIES}, "".join(p for _, p in fed))
        reply.extra["released"] = (marks["released"] - start) * 1000
        if "waited" in marks:
            reply.extra["waited"] = marks["waited"] * 1000
        return reply

    @staticmethod
    def _chunks(output: ChunkerOutput, chunks: queue.SimpleQueue[Chunk | None], marks: dict[str, float],
                fed: list[tuple[float, str]]) -> None:
        for chunk in output.chunks:
            if "chunk" not in marks:
                marks["chunk"] = time.monotonic()
                # Was the chunk's text complete before the delta that released it? Then the chunker
                # waited for that delta: the gap between the two deltas is what it cost.
                if len(fed) >= 2 and chunk.text.strip():
                    before = "".join(piece for _, piece in fed[:-1])
                    if " ".join(before.split()).endswith(" ".join(chunk.text.split())[-12:]):
                        marks["waited"] = fed[-1][0] - fed[-2][0]
            chunks.put(chunk)

    def _speak(self, chunks: queue.SimpleQueue[Chunk | None], marks: dict[str, float]) -> None:
        """The tts and player stages: each chunk's frames as the engine makes them, to the null backend."""
        backend = NullBackend()
        begun = False
        while (chunk := chunks.get()) is not None:
            text = spell_numbers(chunk.text, self.normalize) if self.normalize else chunk.text
            frames = 0
            for frame in self.engine.synthesize(text, lambda: False):
                frames += 1
                if frames == 2:
                    marks.setdefault("released", time.monotonic())
                marks.setdefault("audio", time.monotonic())
                if not begun:
                    backend.begin("baseline", "reply", frame.format)
                    begun = True
                backend.write(frame)
                marks.setdefault("playback", time.monotonic())
            if frames:
                marks.setdefault("released", time.monotonic())  # a one-frame chunk: released at the engine's end
        if begun:
            backend.end()


# --- the daemon: the same question over the bus -------------------------------------------------

KINDS = ("context.query", "context", "llm.done", "metrics", "error")


@dataclass
class Bus:
    """A front-end that sees each reply's timeline, not its tokens or frames (so it adds no wake-ups)."""

    connection: Connection
    errors: dict[str, int] = field(default_factory=dict)
    context: Context | None = None
    """The newest context history sent: the baseline asks with it."""

    @classmethod
    def attach(cls, daemon: Daemon) -> Bus:
        connection = Connection(f"bench.{uuid.uuid4().hex[:6]}", endpoints_for(daemon.config()),
                                [protocol.subscription(kind) for kind in KINDS])
        connection.open()
        return cls(connection)

    def reply(self, text: str) -> Reply:
        session, request_id = f"base-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex[:12]
        sent = self.connection.publish(session, request_id, Request(text=text, stream=True))
        deadline = time.monotonic() + TIMEOUT_S
        stamps: dict[str, float] = {}
        done: LlmDone | None = None
        while True:
            message: Message[Any] | None = self.connection.receive(max(0.0, deadline - time.monotonic()))
            if message is None:
                raise BenchError(f"no metrics within {TIMEOUT_S:g} s; reached {sorted(stamps)}")
            body = message.body
            if isinstance(body, Error):
                key = f"{message.src}: {body.code}: {body.message[:120]}"
                self.errors[key] = self.errors.get(key, 0) + 1
            if message.id != request_id:
                continue
            if isinstance(body, ContextQuery):
                stamps["context.query"] = message.ts
            elif isinstance(body, Context):
                stamps["context"] = message.ts
                self.context = body
            elif isinstance(body, LlmDone):
                done = body
            elif isinstance(body, Metrics):
                return self._timeline(sent.ts, stamps, body, done)

    @staticmethod
    def _timeline(request_ts: float, stamps: Mapping[str, float], metrics: Metrics, done: LlmDone | None) -> Reply:
        if done is None or done.status != "ok":
            raise BenchError(f"daemon reply ended {done.status if done else 'without llm.done'}: "
                                f"{done.error if done else ''}")
        values = {"chunk": metrics.first_chunk_ms, "audio": metrics.first_audio_ms,
                  "playback": metrics.first_playback_ms}
        if metrics.first_token_ms < 0 or min(values.values()) < 0:
            raise BenchError(f"daemon reply without a full timeline: {metrics}")
        # The llm stage times the first token from taking the request, which it answers at once with
        # the context query: on the wall clock the first token came first_token_ms after that query.
        # (With llm.history_limit = 0 there is no query; the request's hop to llm is then left out.)
        query = (stamps["context.query"] - request_ts) * 1000 if "context.query" in stamps else 0.0
        reply = Reply("daemon", {"token": query + metrics.first_token_ms, **values}, done.text)
        reply.extra = {name: (ts - request_ts) * 1000 for name, ts in stamps.items()}
        return reply

    def close(self) -> None:
        self.connection.close()


# --- one configuration ----------------------------------------------------------------------------

@dataclass
class Run:
    label: str
    daemon: list[Reply]
    baseline: list[Reply]
    warm: tuple[Reply, Reply]
    errors: dict[str, int]
    log: list[str]


def interleaved(settings: Mapping[str, Any], env: Mapping[str, str], api_key: str, prompts: Sequence[str],
                label: str) -> Run:
    """One untimed warm-up per path, then daemon, baseline, daemon, baseline, ... per prompt."""
    with Daemon(settings, env=env) as daemon:
        bus = Bus.attach(daemon)
        try:
            baseline = Baseline(daemon.config(), api_key)
            warm = (bus.reply("Hello!"), baseline.reply("Hello!", bus.context))
            ours: list[Reply] = []
            theirs: list[Reply] = []
            for prompt in prompts:
                ours.append(bus.reply(prompt))
                theirs.append(baseline.reply(prompt, bus.context))
        finally:
            bus.close()
        return Run(label, ours, theirs, warm, bus.errors, list(daemon.log))


def local_run(count: int) -> Run:
    settings = {**LOCAL_PROFILE, "tts": {"engine": "espeak"}, "player": {"backend": "null"}}
    return interleaved(settings, {}, "", PROMPTS[:count], "local model, espeak-ng")


def fake_run(count: int) -> Run:
    with fake_llm.serve(TOKEN_DELAY_S) as url:
        settings = {**openai_settings(url), "tts": {"engine": "espeak"}, "player": {"backend": "null"}}
        return interleaved(settings, KEY, KEY["FAKE_OPENAI_KEY"], PROMPTS[:count],
                           f"fake OpenAI server at {1 / TOKEN_DELAY_S:.0f} tokens/s, espeak-ng")


# --- the report ------------------------------------------------------------------------------------

def ms(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.1f}"


def _quantiles(values: Sequence[float]) -> tuple[float, float]:
    return median(values), percentile(values, .9)


def summary(run: Run) -> tuple[list[str], list[str], float]:
    """The run's table, its notes and the p50 TTFA difference (daemon − baseline)."""
    rows = [f"**{run.label}**: {len(run.daemon)} replies per path, interleaved. ms; a segment's quantiles are "
            f"those of its per-reply durations; a paired difference is daemon − baseline for the same prompt "
            f"(the two replies to one prompt have the same text, so this leaves out how long each prompt "
            f"takes the model).", "",
            "| from → to | daemon p50 | p90 | baseline p50 | p90 | difference of the p50s | paired difference "
            "p50 | paired p90 |",
            "|---|---|---|---|---|---|---|---|"]

    def row(label: str, ours: Sequence[float], theirs: Sequence[float], bold: bool = False) -> str:
        (a50, a90), (b50, b90) = _quantiles(ours), _quantiles(theirs)
        paired = [a - b for a, b in zip(ours, theirs, strict=True)]
        cells = [label, ms(a50), ms(a90), ms(b50), ms(b90), f"{a50 - b50:+.1f}", f"{median(paired):+.1f}",
                 f"{percentile(paired, .9):+.1f}"]
        if bold:
            cells = [f"**{cell}**" for cell in cells]
        return "| " + " | ".join(cells) + " |"

    previous = "request"
    for boundary in BOUNDARIES:
        ours = [r.ms[boundary] - (r.ms[previous] if previous != "request" else 0.0) for r in run.daemon]
        theirs = [r.ms[boundary] - (r.ms[previous] if previous != "request" else 0.0) for r in run.baseline]
        rows.append(row(f"{LABELS.get(previous, previous)} → {LABELS[boundary]}", ours, theirs))
        previous = boundary
    ttfa = ([r.ms["audio"] for r in run.daemon], [r.ms["audio"] for r in run.baseline])
    rows.append(row("request → first audio frame (TTFA)", *ttfa, bold=True))
    rows.append(row("request → first playback", [r.ms["playback"] for r in run.daemon],
                    [r.ms["playback"] for r in run.baseline]))
    difference = median(ttfa[0]) - median(ttfa[1])
    paired = median([a - b for a, b in zip(*ttfa, strict=True)])
    verdict = "PASS" if difference <= TARGET_MS else "FAIL"
    lines = [*rows, ""]
    query = [r.extra.get("context.query", float("nan")) for r in run.daemon]
    trip = [r.extra["context"] - r.extra["context.query"] for r in run.daemon if "context" in r.extra]
    after = [r.ms["token"] - r.extra["context"] for r in run.daemon if "context" in r.extra]
    released = [r.extra["released"] - r.ms["audio"] for r in run.baseline]
    waited = [r.extra["waited"] for r in run.baseline if "waited" in r.extra]
    lines.append(f"Inside the daemon's request → first token: request → llm's `context.query` "
                 f"{ms(median(query))} ms p50, → history's `context` {ms(median(trip)) if trip else '-'} ms, "
                 f"→ first token {ms(median(after)) if after else '-'} ms. In the baseline: the first frame's "
                 f"wait for the engine's second frame (what the tts stage holds it for) {ms(median(released))} ms "
                 f"p50 (p90 {ms(percentile(released, .9))}); the chunker held the first chunk for one more token "
                 f"in {len(waited)} of {len(run.baseline)} replies"
                 + (f", {ms(median(waited))} ms p50" if waited else "") + ".")
    lines += ["", f"**TTFA, daemon − baseline: {difference:+.1f} ms p50 "
                  f"({ms(median(ttfa[0]))} vs {ms(median(ttfa[1]))} ms; target ≤ {TARGET_MS:g}: {verdict}), "
                  f"{percentile(ttfa[0], .9) - percentile(ttfa[1], .9):+.1f} ms p90; paired, prompt by prompt: "
                  f"{paired:+.1f} ms p50.** Warm-ups (untimed): TTFA "
                  f"{ms(run.warm[0].ms['audio'])} ms daemon, {ms(run.warm[1].ms['audio'])} ms baseline."]
    notes = [f"{run.label}: error event ×{n}: {text}" for text, n in run.errors.items()]
    notes += [f"{run.label}: daemon log: `{line.strip()[:200]}`" for line in run.log
              if " WARNING " in line or " ERROR " in line][:5]
    differ = sum(a.text != b.text for a, b in zip(run.daemon, run.baseline, strict=True))
    if differ:
        notes.append(f"{run.label}: {differ} of {len(run.daemon)} prompts gave a different reply text in the "
                     f"daemon and the baseline")
    if verdict == "FAIL":
        notes.append(f"{run.label}: the daemon's TTFA is {difference:.1f} ms over the baseline's (target ≤ "
                     f"{TARGET_MS:g} ms)")
    return lines, notes, difference


def bench_baseline(quick: bool, count: int | None = None) -> tuple[list[str], list[str]]:
    local = local_run(count or (3 if quick else 12))
    fake = fake_run(count or (3 if quick else 12))
    lines = ["The same parts in one process, with no bus (tests/bench/baseline.py): the profile's provider, "
             "the llm stage's think splitter and reply guard, the chunker core and policy, espeak-ng and the "
             "null player backend, built from the running daemon's config and asked the same prompt from the "
             "same history `context`, streaming. Daemon milestones are the senders' `ts` (the bench's "
             "`request`, history's `metrics`); baseline milestones are taken in-process at the same points. "
             f"Player backend `null` in both. {os.cpu_count()} cores (see the machine table).", ""]
    notes: list[str] = []
    for run in (local, fake):
        run_lines, run_notes, _ = summary(run)
        lines += [*run_lines, ""]
        notes += run_notes
    return lines[:-1], notes


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(prog="python -m tests.bench.baseline")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--count", type=int, help="replies per path and configuration (a smoke run)")
    args = parser.parse_args()
    result_lines, result_notes = bench_baseline(args.quick, args.count)
    print("\n".join([*result_lines, "", *(f"- {note}" for note in result_notes)]))
