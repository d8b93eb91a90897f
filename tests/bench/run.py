"""`make bench`: measure voxpipe on real processes and write docs/bench.md.

Usage: python -m tests.bench.run [--quick] [--only NAME ...]

`--only` runs the named sections alone (by their key, e.g. `--only baseline`, or number) and
replaces just those sections in the existing docs/bench.md, keeping the rest of it.

Every comparison is measured side by side in one run (hops alternate between paths,
streaming and non-streaming replies alternate), because absolute times on a shared
machine move with its load; the ratios are what one run can be compared with another by.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tests.bench import baseline, capacity, engines, fake_llm, hop, system
from tests.bench.machine import CpuTimes, describe, load
from tests.bench.pipeline import MILESTONES, Client, Sample, compare_modes, throughput
from tests.bench.player import bench_player
from tests.bench.stats import median, percentile
from tests.harness import ROOT, Daemon, fake_openai, openai_settings

REPORT = ROOT / "docs" / "bench.md"
KEY = {"FAKE_OPENAI_KEY": "test-key"}
TOKEN_DELAY_S = 0.025
"""A pause after each SSE event: 40 tokens/s, a typical hosted model's pace."""
OTHERS_NOTE_PCT = 5.0
"""Above this share of CPU time taken by others (or stolen), a section's times are flagged."""
LABELS = {"text": "first `text`", "chunk": "first `chunk`", "audio": "**first `audio` (TTFA)**",
          "playback.first": "first `playback`", "llm.done": "`llm.done`", "playback": "final `playback`"}


@dataclass(frozen=True)
class Plan:
    """How much to measure: the full run fits in about 5 minutes, --quick in about one."""

    hops: int
    hop_rate: float
    fake_replies: int
    sessions: int
    replies: int


FULL = Plan(hops=10_000, hop_rate=2_000, fake_replies=20, sessions=20, replies=200)
QUICK = Plan(hops=1_000, hop_rate=2_000, fake_replies=3, sessions=5, replies=20)


@dataclass
class Section:
    title: str
    lines: list[str]
    notes: list[str]


Result = tuple[list[str], list[str]]
"""A section's markdown lines and its observations."""


def measured(title: str, run: Callable[[], Result]) -> Section:
    """Run one section and record how much of the machine others used meanwhile."""
    print(f"bench: {title} ...", file=sys.stderr, flush=True)
    before, started = CpuTimes.now(), time.monotonic()
    lines, notes = run()
    share = CpuTimes.now().since(before)
    lines += ["", f"_{time.monotonic() - started:.0f} s. Of all CPU time: {share['busy']:.0f} % busy, "
                  f"{share['others']:.0f} % used by processes outside this bench, {share['steal']:.0f} % "
                  f"stolen by the hypervisor. Load average after: {load()}._"]
    if share["others"] >= OTHERS_NOTE_PCT:
        notes.append(f"other processes used {share['others']:.0f} % of all CPU time, so absolute "
                     f"times here are inflated and noisier.")
    if share["steal"] >= OTHERS_NOTE_PCT:
        notes.append(f"the hypervisor took {share['steal']:.0f} % of all CPU time (steal in "
                     f"/proc/stat), so absolute times here are inflated.")
    return Section(title, lines, notes)


def ms(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


# --- 1. bus hop ---------------------------------------------------------------------------

def bench_hops(plan: Plan) -> Result:
    samples = hop.measure(plan.hops, plan.hop_rate)
    lines = [f"{plan.hops:,} `token` frames per path, {plan.hop_rate / 2:,.0f}/s per path, the paths "
             f"alternating message by message between one publisher and one subscriber process "
             f"(ipc transport). A hop runs from just before `protocol.encode` in the sender to just after "
             f"`protocol.decode` in the receiver, on CLOCK_MONOTONIC.", "",
             "| path | received | p50 µs | p90 µs | p99 µs | max µs |", "|---|---|---|---|---|---|"]
    for path, label in (("direct", "direct PUB→SUB (baseline)"), ("broker", "through the broker")):
        values = samples[path]
        lines.append(f"| {label} | {len(values):,} | " + " | ".join(
            f"{v:,.0f}" for v in (median(values), percentile(values, .9), percentile(values, .99), max(values))) + " |")
    ratio = {q: percentile(samples["broker"], q) / percentile(samples["direct"], q) for q in (.5, .9, .99)}
    lines.append(f"| **broker / direct** | | **{ratio[.5]:.2f}×** | {ratio[.9]:.2f}× | **{ratio[.99]:.2f}×** | |")
    lines += ["", f"Of each hop, {hop.codec_us():.0f} µs (median, in-process) is `make` + `encode` + `decode`; "
                  f"the rest is ZeroMQ, the kernel and waking the receiver."]
    notes = [f"the {path} path delivered {len(values)} of {plan.hops} messages"
             for path, values in samples.items() if len(values) != plan.hops]
    return lines, notes


# --- 2. time to first audio (3, the local-model headline, lives in tests/bench/system.py) ---

def bench_modes(settings: dict, env: dict[str, str], prompt: str, count: int, timeout: float) -> Result:
    with Daemon(settings, env=env) as daemon:
        client = Client.attach(daemon)
        try:
            warmups, samples = compare_modes(client, prompt, count, timeout)
        finally:
            client.close()
        log = daemon.log
    return mode_table(warmups, samples), mode_notes(warmups, samples, client.errors, log)


def mode_table(warmups: list[Sample], samples: list[Sample]) -> list[str]:
    on = [s for s in samples if s.stream]
    off = [s for s in samples if not s.stream]
    lines = [f"{len(on)} replies per mode, interleaved (on, off, on, ...), each in a new session, after "
             f"one untimed warm-up per mode. Milliseconds from the client's `request` publish.", "",
             "| from `request` to | streaming median | p90 | non-streaming median | p90 | streaming / non-streaming |",
             "|---|---|---|---|---|---|"]
    for kind in MILESTONES:
        a = [s.ms[kind] for s in on]
        b = [s.ms[kind] for s in off]
        lines.append(f"| {LABELS[kind]} | {ms(median(a))} | {ms(percentile(a, .9))} | {ms(median(b))} | "
                     f"{ms(percentile(b, .9))} | {median(a) / median(b):.2f} |")
    ratio = median([s.ms["audio"] for s in on]) / median([s.ms["audio"] for s in off])
    cold = {w.stream: w.ms["audio"] for w in warmups}
    lines += ["", f"**TTFA ratio, streaming / non-streaming: {ratio:.2f}** (the first sound comes "
                  f"{1 / ratio:.1f}× sooner with streaming). Warm-up replies (cold caches): TTFA "
                  f"{ms(cold[True])} ms streaming, {ms(cold[False])} ms non-streaming.", "",
              "Replies ended by (`llm.done` finish_reason): " + ", ".join(
                  f"{reason or 'none'} ×{n}" for reason, n in Counter(s.finish for s in samples).items()) + ".", "",
              "Each reply's `llm.done` in ms, in the order sent (spread here is the provider's, not the bus's): "
              f"streaming {', '.join(ms(s.ms['llm.done']) for s in on)}; "
              f"non-streaming {', '.join(ms(s.ms['llm.done']) for s in off)}."]
    return lines


def mode_notes(warmups: list[Sample], samples: list[Sample], errors: Counter[str], log: list[str]) -> list[str]:
    """Outliers, replies that differ between modes, error events and daemon warnings."""
    notes = text_variants([*warmups, *samples])
    for stream in (True, False):
        values = [s.ms["audio"] for s in samples if s.stream == stream]
        slow = [v for v in values if v > 2 * median(values)]
        if slow:
            notes.append(f"{'streaming' if stream else 'non-streaming'}: {len(slow)} of {len(values)} TTFA "
                         f"samples over twice the median {ms(median(values))} ms: "
                         + ", ".join(ms(v) for v in slow) + " ms")
    notes += [f"error event ×{n}: {text}" for text, n in errors.items()]
    return notes + daemon_warnings(log)


def text_variants(samples: list[Sample]) -> list[str]:
    """One note if the same prompt gave different final texts; both modes must give the same one."""
    variants: dict[str, Counter[str]] = {}
    for sample in samples:
        variants.setdefault(sample.text, Counter())["streaming" if sample.stream else "non-streaming"] += 1
    if len(variants) < 2:
        return []
    same = len(os.path.commonprefix(list(variants)))  # noqa: RUF071 - texts: a character prefix is wanted
    tails = "; ".join(f"{', '.join(f'{mode} ×{n}' for mode, n in modes.items())}: …{text[same:same + 80]!r}"
                      for text, modes in variants.items())
    return [f"the same prompt gave {len(variants)} different final texts over {len(samples)} replies "
            f"(warm-ups included), identical for the first {same} characters, then: {tails}"]


def daemon_warnings(log: list[str]) -> list[str]:
    """The daemon's warning and error log lines, counted with ids and pids blanked."""
    counts: Counter[str] = Counter()
    for line in log:
        if " WARNING " in line or " ERROR " in line:
            text = re.sub(r"^\S+ \S+ ", "", line.strip())
            counts[re.sub(r"\[\d+\]|[0-9a-f]{8,}", "…", text)] += 1
    return [f"daemon log ×{n}: `{text[:200]}`" for text, n in counts.items()]


def bench_fake(plan: Plan) -> Result:
    with fake_llm.serve(TOKEN_DELAY_S) as url:
        settings = {**openai_settings(url), "player": {"backend": "null"}}
        lines, notes = bench_modes(settings, KEY, "Tell me about Paris.", plan.fake_replies, timeout=60)
    return [f"`tests/bench/fake_llm.py`: a {len(fake_llm.REPLY)}-character reply in {fake_llm.EVENTS} SSE "
            f"events, {TOKEN_DELAY_S * 1000:.0f} ms apart (40 tokens/s); without streaming the whole "
            f"reply is sent after the same {fake_llm.EVENTS * TOKEN_DELAY_S:.2f} s. Player backend `null`.",
            "", *lines], notes


# --- 4. throughput ------------------------------------------------------------------------

def bench_throughput(plan: Plan) -> Result:
    with fake_openai() as url, Daemon({**openai_settings(url), "player": {"backend": "null"}}, env=KEY) as daemon:
        client = Client.attach(daemon)
        try:
            result = throughput(client, plan.sessions, plan.replies, timeout=240)
        finally:
            client.close()
        log = daemon.log
    latency = result.latencies_ms
    lines = ["`tests/fakes/openai_server.py` at zero delay (a one-sentence reply with a tag), streaming, "
             "player backend `null`. Each session keeps one reply in flight and asks again when its "
             "final `playback` arrives.", "",
             "| sessions | replies | stopped | seconds | **replies/s** | request→final playback p50 ms | p90 ms "
             "| max ms |",
             "|---|---|---|---|---|---|---|---|",
             f"| {result.sessions} | {result.replies} | {result.stopped} | {result.seconds:.1f} "
             f"| **{result.replies / result.seconds:.1f}** "
             f"| {ms(median(latency))} | {ms(percentile(latency, .9))} | {ms(max(latency))} |"]
    notes = [f"error event ×{n}: {text}" for text, n in client.errors.items()]
    return lines, notes + daemon_warnings(log)


# --- modules that render their own section -------------------------------------------------

def module_section(name: str, quick: bool) -> Callable[[], Result]:
    """A `tests.bench.NAME` module whose `run(quick)` returns markdown under a `## ` heading:
    the heading is dropped (run.py titles the section) and the rest are its lines."""
    def run() -> Result:
        text = importlib.import_module(f"tests.bench.{name}").run(quick)
        lines = text.strip("\n").split("\n")
        if lines and lines[0].startswith("## "):
            lines = lines[1:]
        while lines and not lines[0].strip():
            lines = lines[1:]
        return lines, []
    return run


# --- the report -----------------------------------------------------------------------------

def render(sections: list[Section], command: str, started: datetime.datetime, load_before: str) -> str:
    machine = describe()
    lines = ["# voxpipe benchmark", "",
             f"Generated {started:%Y-%m-%d %H:%M} UTC by `{command}` (`make bench` runs it without "
             "`--quick`); every run rewrites this file.", "",
             "Timings move with the machine's load and, on a VM, with its neighbours (see the CPU shares "
             "under each section). **The ratios are the comparable figures**: each one is measured side "
             "by side within one run. Absolute times are context.", "",
             "| machine | |", "|---|---|", *(f"| {key} | {value} |" for key, value in machine.items()),
             f"| load average (1/5/15 min) before | {load_before} |", ""]
    for section in sections:
        lines += [f"## {section.title}", "", *section.lines, ""]
    notes = [f"- §{section.title.split('.')[0]}: {note}" for section in sections for note in section.notes]
    if float(load_before.split()[0]) > 0.5 * (os.cpu_count() or 1):
        notes.insert(0, f"- The machine was already busy when the bench started (load average {load_before}).")
    lines += ["## Observations", "", *(notes or ["- none"])]
    return "\n".join(lines) + "\n"


def sections(plan: Plan, quick: bool) -> list[tuple[str, str, Callable[[], Result]]]:
    """(key, title, run) of every section, in the report's order; the title starts with its number."""
    return [("hops", "1. Bus hop latency", lambda: bench_hops(plan)),
            ("fake", "2. Time to first audio: fake OpenAI server at 40 tokens/s", lambda: bench_fake(plan)),
            ("headline", "3. Headline: time to first audio and playback, embedded local model and espeak-ng",
             lambda: system.bench_headline(quick)),
            ("throughput", "4. Throughput", lambda: bench_throughput(plan)),
            ("player", "5. Player: gaps between frames, cancel to silence",
             lambda: bench_player(replies=5 if quick else 20)),
            ("overhead", "6. Overhead over the models: instant fake LLM, null tts and player",
             lambda: system.bench_overhead(quick)),
            ("rss", "7. Idle memory per stage", lambda: system.bench_rss(quick)),
            ("startup", "8. Time from `voxpipe run` to ready", lambda: system.bench_startup(quick)),
            ("engines", "9. TTS engines", engines.bench_engines),
            ("intake", "10. Token intake with a slow tts", lambda: engines.bench_intake(quick)),
            ("llm_latency", "11. LLM stage: token latency", module_section("llm_latency", quick)),
            ("history", "12. History: writes and context queries", module_section("history", quick)),
            ("chunking", "13. Chunking: voxpipe vs stream2sentence", module_section("chunking", quick)),
            ("llama_cpu", "14. llama.cpp on this CPU: weight repacking, portable and native builds",
             module_section("llama_cpu", quick)),
            ("prompt_style", "15. Prompt style for the bundled base model: dialogue vs chat template",
             module_section("prompt_style", quick)),
            ("messages", "16. Message cost: encode and decode per token and per audio frame, typed kinds vs "
                         "the dict protocol", module_section("messages", quick)),
            ("baseline", "17. The daemon against the same parts in one process: time to first audio by stage "
                         "boundary", lambda: baseline.bench_baseline(quick)),
            ("capacity", "18. Real-time capacity: 50, 100 and 200 sessions at 30 tokens/s, CPU per stage and "
                         "per token", lambda: capacity.bench_capacity(quick)),
            ("web", "19. Browser: time to the first rendered sample through `voxpipe web`",
             module_section("web", quick)),
            ("game", "20. Game link: time to the first voiced line in MiSide, phrase by phrase vs the whole reply",
             module_section("game", quick))]


def splice(report: str, chosen: list[Section]) -> str:
    """The existing report with the chosen sections put in (each replacing its own, by number, or
    going before the observations), their observations added under their own heading."""
    blocks = re.split(r"(?m)^(?=## )", report)
    for section in chosen:
        number = section.title.split(".")[0]
        notes = [f"- {note}" for note in section.notes]
        text = "\n".join([f"## {section.title}", "", *section.lines, "",
                          *(["_Observations of this run (`--only`):_", "", *notes, ""] if notes else [])]) + "\n"
        index = next((i for i, block in enumerate(blocks) if block.startswith(f"## {number}. ")), None)
        if index is None:
            index = next((i for i, block in enumerate(blocks) if block.startswith("## Observations")), len(blocks))
            blocks.insert(index, text)
        else:
            blocks[index] = text
    return "".join(blocks)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run with small counts (about a minute)")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="run only these sections (key or number) and replace them in docs/bench.md")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    started = datetime.datetime.now(datetime.UTC)
    load_before = load()
    every = sections(plan, args.quick)
    if args.only:
        unknown = set(args.only) - {key for key, _, _ in every} - {title.split(".")[0] for _, title, _ in every}
        if unknown:
            parser.error(f"no section {', '.join(sorted(unknown))}; sections: {', '.join(k for k, _, _ in every)}")
        every = [entry for entry in every if entry[0] in args.only or entry[1].split(".")[0] in args.only]
    done = [measured(title, run) for _, title, run in every]
    command = "python -m tests.bench.run" + (" --quick" if args.quick else "")
    if args.only and REPORT.exists():
        report = splice(REPORT.read_text(), done)
        print(render(done, command + " --only " + " ".join(args.only), started, load_before))
    else:
        report = render(done, command, started, load_before)
        print(report)
    REPORT.write_text(report)
    print(f"bench: wrote {REPORT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
