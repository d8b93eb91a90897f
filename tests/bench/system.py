"""Whole-system figures (issue 7's benchmark): the overhead voxpipe adds over the models, idle memory
per stage, the time from `voxpipe run` to ready, and the headline streaming-on/off comparison with
the embedded local model and espeak-ng.

Each function returns (markdown lines, notes) for tests/bench/run.py's `measured(...)`.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections import Counter
from typing import Any

from tests.bench.pipeline import Client, Sample, time_reply
from tests.bench.stats import median, percentile
from tests.harness import ROOT, Daemon, base_env, fake_openai, openai_settings
from voxpipe import protocol
from voxpipe.protocol import Heartbeat
from voxpipe.runtime import Connection, endpoints_for

KEY = {"FAKE_OPENAI_KEY": "test-key"}
LOCAL_PROFILE = {"llm": {"profile": "local", "profiles": {"local": {"provider": "local", "temperature": 0.0}}}}
"""The product's defaults (max_tokens 200, the repetition guard on), made deterministic: without
streaming the user waits for the whole generation, which is what the headline measures."""
OVERHEAD_P50_MS, OVERHEAD_P99_MS = 2.0, 5.0
RSS_TARGET_MB = 120.0
"""Issue 15's goal for bus + llm + chunker + history, idle (VmRSS, so shared libraries count in each)."""
RSS_STAGES = ("bus", "llm", "chunker", "history")
TTFA_RATIO_TARGET = 5.0
PROMPTS = (
    "Tell me about Paris in three sentences.",
    "Why is the sky blue?",
    "Give me three tips for sleeping better.",
    "What is a black hole?",
    "How do bees make honey?",
    "Explain what a CPU does.",
    "What should I pack for a weekend hike?",
    "Describe the taste of a lemon.",
    "How does a rainbow form?",
    "What are the planets of the solar system?",
    "Tell me a fun fact about octopuses.",
    "How do I boil an egg?",
    "What is the capital of Japan and what is it known for?",
    "Why do cats purr?",
    "Suggest a name for a small bakery.",
    "What is photosynthesis?",
    "How far away is the Moon?",
    "Give me a short motivational quote.",
    "What is the difference between weather and climate?",
    "Describe a sunset over the sea.",
)


def ms(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _pf(ok: bool) -> str:
    return "**PASS**" if ok else "**FAIL**"


# --- overhead -------------------------------------------------------------------------------

def direct_first_token(base_url: str, text: str) -> tuple[float, float]:
    """A direct streamed chat request to the fake server, as the llm stage makes it (a new
    connection each time: the server closes it): ms to the first non-empty content delta and to
    the end of the body."""
    url = urllib.parse.urlsplit(base_url)
    body = json.dumps({"model": "fake-model", "stream": True, "messages": [
        {"role": "system", "content": "You are a friendly voice assistant. Answer briefly."},
        {"role": "user", "content": text}]})
    start = time.perf_counter()
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    try:
        connection.request("POST", url.path + "/chat/completions", body=body,
                           headers={"Authorization": "Bearer test-key", "Content-Type": "application/json"})
        response = connection.getresponse()
        first = None
        for line in response:
            if (first is None and line.startswith(b"data: {")
                    and json.loads(line[6:])["choices"][0]["delta"].get("content")):
                first = (time.perf_counter() - start) * 1000
        return first if first is not None else float("nan"), (time.perf_counter() - start) * 1000
    finally:
        connection.close()


def bench_overhead(quick: bool) -> tuple[list[str], list[str]]:
    count = 20 if quick else 100
    direct: list[float] = []
    direct_end: list[float] = []
    samples: list[Sample] = []
    with fake_openai(0.0) as url, Daemon({**openai_settings(url), "tts": {"engine": "null"},
                                          "player": {"backend": "null"}}, env=KEY) as daemon:
        client = Client.attach(daemon)
        watch = Connection(f"bench.{uuid.uuid4().hex[:6]}", endpoints_for(daemon.config()),
                           [protocol.subscription(kind) for kind in ("context.query", "context", "token")])
        watch.open()
        try:
            for _ in range(3):  # warm-up: imports, connections, caches
                direct_first_token(url, "warm up")
                time_reply(client, "warm up", True, 30)
            for number in range(count):  # interleaved: direct, voxpipe, direct, ...
                first, end = direct_first_token(url, f"question {number}")
                direct.append(first)
                direct_end.append(end)
                samples.append(time_reply(client, f"question {number}", True, 30))
                while (seen := watch.receive(0.0)) is not None:
                    if seen.session == samples[-1].session:
                        samples[-1].ts.setdefault(seen.kind, seen.ts)
        finally:
            client.close()
            watch.close()
    audio = [s.ms["audio"] for s in samples]
    text = [s.ms["text"] for s in samples]
    over50 = median(audio) - median(direct)
    over99 = percentile(audio, .99) - percentile(direct, .99)
    rows = ["| from the request to | p50 ms | p90 ms | p99 ms | max ms |", "|---|---|---|---|---|"]
    for label, values in (("fake server, direct HTTP: first content token", direct),
                          ("fake server, direct HTTP: end of the body", direct_end),
                          ("voxpipe: first `text`", text),
                          ("**voxpipe: first `audio`**", audio)):
        rows.append(f"| {label} | {ms(median(values))} | {ms(percentile(values, .9))} | "
                    f"{ms(percentile(values, .99))} | {ms(max(values))} |")
    lines = [f"`tests/fakes/openai_server.py` at zero delay (a one-sentence reply, all SSE events at once), "
             f"`tts.engine = \"null\"`, player backend `null`, streaming. {count} replies, each in a new "
             f"session, interleaved with {count} direct HTTP requests to the same server (`http.client`, a new "
             f"connection each, as the server closes it) after 3 untimed warm-ups of each. voxpipe's share "
             f"is the difference of the quantiles.", "", *rows, "",
             f"**Overhead (first `audio` − direct first token): p50 {over50:.2f} ms "
             f"(target ≤ {OVERHEAD_P50_MS:g}: {_pf(over50 <= OVERHEAD_P50_MS)}), p99 {over99:.2f} ms "
             f"(target ≤ {OVERHEAD_P99_MS:g}: {_pf(over99 <= OVERHEAD_P99_MS)}).**"]
    lines += ["", *hop_table(samples)]
    notes = [f"error event ×{n}: {t}" for t, n in client.errors.items()]
    if over50 > OVERHEAD_P50_MS or over99 > OVERHEAD_P99_MS:
        notes.append(f"overhead target missed: p50 {over50:.2f} ms, p99 {over99:.2f} ms")
    return lines, notes


HOPS = (("context.query", "llm asks history for context (`context.query`)"),
        ("context", "history answers (`context`)"),
        ("token", "llm publishes the first `token`"),
        ("text", "the chunker publishes the first `text`"),
        ("chunk", "the chunker publishes the first `chunk`"),
        ("audio", "tts publishes the first `audio`"))


def hop_table(samples: list[Sample]) -> list[str]:
    """Where voxpipe's share goes: each boundary's time after the request, by its sender's `ts`, and
    the step from the one before (medians of per-reply values)."""
    rows = ["| from the request until | by the sender's clock, p50 ms | p90 ms | step from the row above, p50 ms |",
            "|---|---|---|---|"]
    before = "request"
    for kind, label in HOPS:
        reached = [(s.ts[kind] - s.ts["request"]) * 1000 for s in samples if kind in s.ts]
        steps = [(s.ts[kind] - s.ts[before]) * 1000 for s in samples if kind in s.ts and before in s.ts]
        if reached:
            rows.append(f"| {label} | {ms(median(reached))} | {ms(percentile(reached, .9))} | {ms(median(steps))} |")
        before = kind
    arrived = [s.ms["audio"] - (s.ts["audio"] - s.ts["request"]) * 1000 for s in samples if "audio" in s.ts]
    rows.append(f"| the client receives it (one more hop) | | | {ms(median(arrived))} |")
    return rows


# --- idle memory --------------------------------------------------------------------------------

def stage_pids(daemon: Daemon, seconds: float = 2.5) -> dict[str, int]:
    """Each stage's pid, from its heartbeats."""
    client = Connection(f"bench.{uuid.uuid4().hex[:6]}", endpoints_for(daemon.config()),
                        [protocol.subscription("heartbeat")])
    client.open()
    pids: dict[str, int] = {}
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            beat = client.receive(max(0.0, deadline - time.monotonic()))
            if beat is not None and isinstance(beat.body, Heartbeat):
                pids[beat.src] = beat.body.pid
    finally:
        client.close()
    return pids


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


PROVIDER_COST = """
def rss():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))
import voxpipe.stages.llm.stage
before = rss()
import voxpipe.stages.llm.providers.openai_compat
print(rss() - before)
"""
"""What the llm stage's provider module (and its SDK) adds to a fresh interpreter that holds the stage."""


def provider_cost_mb() -> float:
    """MB of RSS the `openai` provider's import adds to the llm stage: the share of §7 no stage code sets."""
    done = subprocess.run([sys.executable, "-c", PROVIDER_COST], cwd=ROOT, env=base_env(), text=True,
                          capture_output=True, check=True)
    return float(done.stdout)


def bench_rss(quick: bool) -> tuple[list[str], list[str]]:
    notes: list[str] = []
    with fake_openai(0.0) as url, Daemon({**openai_settings(url), "player": {"backend": "auto"}},
                                         env=KEY) as daemon:
        time.sleep(2.0)
        pids = stage_pids(daemon)
        supervisor_pid = daemon.process.pid if daemon.process else -1
        rss = {src: rss_mb(pid) for src, pid in sorted(pids.items()) if pid != supervisor_pid}  # its own row
        supervisor = rss_mb(daemon.process.pid) if daemon.process else float("nan")
        backend = next((line.strip() for line in daemon.log if "backend" in line.lower()), "")
        http = {"llm": {"profile": "plain", "profiles": {"plain": {
            "provider": "http", "url": f"{url}/chat/completions", "wire": "openai-sse", "model": "fake-model",
            "api_key_env": "FAKE_OPENAI_KEY"}}}, "player": {"backend": "auto"}}
        with Daemon(http, env=KEY) as plain:  # the same server through the http provider: no SDK
            time.sleep(2.0)
            plain_rss = {src: rss_mb(pid) for src, pid in stage_pids(plain).items()}
    plain_llm = plain_rss.get("llm", float("nan"))
    plain_core = sum(plain_rss.get(s, 0.0) for s in RSS_STAGES)
    rows = ["| process | pid | VmRSS MB |", "|---|---|---|",
            *(f"| {src} | {pids[src]} | {value:.1f} |" for src, value in rss.items()),
            f"| (`voxpipe run` supervisor) | {daemon.process.pid if daemon.process else ''} | {supervisor:.1f} |"]
    missing = [s for s in RSS_STAGES if s not in rss]
    core = sum(rss.get(s, 0.0) for s in RSS_STAGES)
    everything = sum(rss.values())
    lines = ["A daemon with a remote profile (`openai` provider against the local fake server), the default "
             "tts (espeak-ng) and player backend `auto`, idle for 2 s after ready; VmRSS from "
             "/proc/<pid>/status, pids from the stages' heartbeats.", "", *rows, "",
             f"**bus + llm + chunker + history: {core:.1f} MB (target ≤ {RSS_TARGET_MB:g} MB: "
             f"{_pf(core <= RSS_TARGET_MB and not missing)}).** All stages: {everything:.1f} MB; with the "
             f"supervisor {everything + supervisor:.1f} MB. (RSS counts shared library pages in every "
             f"process, so the sum overstates the memory used.)", "",
             f"Of the llm's, {provider_cost_mb():.1f} MB are the `openai` provider module's import: the SDK "
             f"(pydantic, httpx2, aiohttp where installed), measured in a fresh interpreter holding the llm "
             f"stage. The stage imports it, and builds the client and its HTTP stack (httpcore2, h11, "
             f"truststore), before it is ready, so the first request does not wait for them.", "",
             f"The same server through the `http` provider (`wire = \"openai-sse\"`, no SDK), in a second "
             f"daemon: llm {plain_llm:.1f} MB, bus + llm + chunker + history {plain_core:.1f} MB "
             f"({_pf(plain_core <= RSS_TARGET_MB)} against the same target)."]
    if missing:
        notes.append(f"no heartbeat seen from {', '.join(missing)}")
    if backend:
        lines += ["", f"Player log line: `{backend[:160]}`"]
    return lines, notes


# --- startup ----------------------------------------------------------------------------------

def time_to_ready(settings: dict[str, Any], env: dict[str, str]) -> float:
    daemon = Daemon(settings, env=env)
    try:
        start = time.monotonic()
        daemon.start(timeout=180)
        return time.monotonic() - start
    finally:
        daemon.close()


def bench_startup(quick: bool) -> tuple[list[str], list[str]]:
    remote: list[float] = []
    with fake_openai(0.0) as url:
        for _ in range(3):
            remote.append(time_to_ready({**openai_settings(url), "player": {"backend": "null"}}, KEY))
    local = time_to_ready({**LOCAL_PROFILE, "player": {"backend": "null"}}, {})
    lines = ["From starting `voxpipe run` (a new process, private runtime dir) to its `voxpipe ready` "
             "line, default tts (espeak-ng), player backend `null`.", "",
             "| profile | runs | median s | each s |", "|---|---|---|---|",
             f"| remote (`openai` provider, fake server) | {len(remote)} | {median(remote):.2f} | "
             f"{', '.join(f'{v:.2f}' for v in remote)} |",
             f"| local (embedded Gemma 3 270M, llama.cpp) | 1 | {local:.2f} | {local:.2f} |"]
    return lines, []


# --- the headline -----------------------------------------------------------------------------

def bench_headline(quick: bool) -> tuple[list[str], list[str]]:
    prompts = PROMPTS[:3] if quick else PROMPTS
    settings = {**LOCAL_PROFILE, "tts": {"engine": "espeak"}, "player": {"backend": "null"}}
    samples: list[tuple[str, Sample]] = []
    with Daemon(settings) as daemon:
        client = Client.attach(daemon)
        try:
            warm = [time_reply(client, "Hello!", stream, 180) for stream in (True, False)]
            for index, prompt in enumerate(prompts):
                order = (True, False) if index % 2 == 0 else (False, True)
                for stream in order:
                    samples.append((prompt, time_reply(client, prompt, stream, 180)))
        finally:
            client.close()
        log = daemon.log
    on = [s for _, s in samples if s.stream]
    off = [s for _, s in samples if not s.stream]
    labels = {"text": "first `text`", "audio": "**first `audio` (TTFA)**",
              "playback.first": "**first `playback` (started)**", "llm.done": "`llm.done`",
              "playback": "final `playback`"}
    rows = ["| from `request` to | streaming p50 ms | p90 | non-streaming p50 ms | p90 | on / off |",
            "|---|---|---|---|---|---|"]
    for kind, label in labels.items():
        a, b = [s.ms[kind] for s in on], [s.ms[kind] for s in off]
        rows.append(f"| {label} | {ms(median(a))} | {ms(percentile(a, .9))} | {ms(median(b))} | "
                    f"{ms(percentile(b, .9))} | {median(a) / median(b):.2f} |")
    ttfa = median([s.ms["audio"] for s in off]) / median([s.ms["audio"] for s in on])
    ttfp = median([s.ms["playback.first"] for s in off]) / median([s.ms["playback.first"] for s in on])
    notes_text: list[str] = []
    per_prompt = [f"{prompt[:24]!r}: {ms(on_s.ms['audio'])}/{ms(off_s.ms['audio'])}"
                  for prompt in prompts
                  for on_s in [s for p, s in samples if p == prompt and s.stream]
                  for off_s in [s for p, s in samples if p == prompt and not s.stream]]
    lines = [f"The `local` profile with its defaults (bundled Gemma 3 270M, llama.cpp in the llm process, "
             f"`max_tokens = 200`, the repetition guard on), "
             f"`temperature = 0`), espeak-ng, player backend `null`. {len(prompts)} different prompts, each "
             f"asked once per mode in a new session, interleaved (the order alternating per prompt), after "
             f"one untimed warm-up per mode (cold: TTFA {ms(warm[0].ms['audio'])} ms streaming, "
             f"{ms(warm[1].ms['audio'])} ms non-streaming).", "", *rows, "",
             f"**TTFA non-streaming / streaming: {ttfa:.2f}× (target ≥ {TTFA_RATIO_TARGET:g}×: "
             f"{_pf(ttfa >= TTFA_RATIO_TARGET)}); first playback: {ttfp:.2f}×.**", "",
             "TTFA per prompt, streaming/non-streaming ms: " + "; ".join(per_prompt) + ".", "",
             "Replies ended by (`llm.done` finish_reason): " + "; ".join(
                 f"{'streaming' if mode else 'non-streaming'}: " + ", ".join(
                     f"{reason or 'none'} ×{n}" for reason, n in Counter(
                         s.finish for _, s in samples if s.stream == mode).items())
                 for mode in (True, False)) + f". Final text median length: streaming "
             f"{median([len(s.text) for s in on])} chars, non-streaming {median([len(s.text) for s in off])}."]
    for prompt in prompts:
        texts = {s.text for p, s in samples if p == prompt}
        if len(texts) > 1:
            notes_text.append(f"{prompt!r}: streaming and non-streaming gave different final texts "
                              f"(lengths {sorted(len(t) for t in texts)})")
    notes = notes_text + [f"error event ×{n}: {t}" for t, n in client.errors.items()]
    notes += [f"daemon log: `{line.strip()[:200]}`" for line in log if " WARNING " in line or " ERROR " in line][:5]
    if ttfa < TTFA_RATIO_TARGET:
        notes.append(f"the TTFA ratio {ttfa:.2f}× misses the {TTFA_RATIO_TARGET:g}× target")
    return lines, notes


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    for fn in (bench_overhead, bench_rss, bench_startup, bench_headline):
        lines, notes = fn(quick)
        print("\n".join(lines + [""] + [f"- {n}" for n in notes]))
