"""Real-time capacity (issue 15, goal 3): many sessions streaming at once, each at a model's pace.

Every session asks one question at the same moment; the fake OpenAI server (this module, run as its
own process) streams each reply as TOKENS content events RATE per second on a fixed schedule from the
request's arrival, so each stream lasts STREAM_S however loaded the machine is (a late event is sent
as soon as it can be, and the schedule does not slip). The daemon runs the `openai` provider, the null
tts and the null player. A reply's duration runs from the client's `request` to its `llm.done` and to
its final `playback`; the goal is that duration at most 1.2× the stream's, p99, with every reply's
text exact and no `error` (so no `gap`) event.

The clients run in processes of their own (`python -m tests.bench.capacity clients ...`), so their CPU
is counted apart from the daemon's; so is the fake server's. The CPU of each stage process comes from
/proc/<pid>/stat (utime + stime, threads included) over the run, pids from the stages' heartbeats.

    python -m tests.bench.capacity [--sessions 50 100 200] [--spy DIR]

`--spy DIR` samples every daemon process with py-spy during the largest run (tests/bench/spy.py's
parser and report) and prints where each stage's CPU goes; the sampling costs CPU of its own, so
those runs' times are not the bench's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.bench.machine import describe
from tests.bench.stats import median, percentile
from tests.bench.system import stage_pids
from tests.fakes import openai_server
from tests.fakes.openai_server import reply_for
from tests.harness import PYTHON, ROOT, Daemon, base_env, fake_openai, openai_settings

KEY = {"FAKE_OPENAI_KEY": "test-key"}
TOKENS = 31
RATE = 30.0
"""Content events per second of each stream."""
STREAM_S = (TOKENS - 1) / RATE
"""From a stream's first content event to its last: 1.0 s."""
TARGET_RATIO = 1.2
SESSIONS = (50, 100, 200)
QUICK_SESSIONS = (50,)
SESSIONS_PER_CLIENT = 100
"""Sessions one client process drives: 200 sessions are two client processes."""
TIMEOUT_S = 180.0
WARMUP_SESSIONS = 20


def question(session: str) -> str:
    """A question whose echoed reply (tests/fakes/openai_server.py) is exactly TOKENS pieces long."""
    base = f"{session} asks about the weather"
    length = 3 * TOKENS - len(reply_for(""))
    return (base + " and more" * 20)[:length] if len(base) < length else base[:length]


# --- the fake server ----------------------------------------------------------------------

class Handler(openai_server.Handler):
    """The echo server, streaming on a fixed schedule: content event k at arrival + k / RATE."""

    def pace(self, index: int, count: int) -> None:
        if 1 <= index < count - 1:  # content piece index - 1, at its time; the role and stop events at once
            time.sleep(max(0.0, self.arrival + (index - 1) / RATE - time.monotonic()))


# --- the clients (their own processes) ----------------------------------------------------

def run_clients(config_path: str, sessions: list[str], watch_errors: bool) -> None:
    """Connect, say READY, wait for GO on stdin, ask every session's question at once, and print one
    JSON line: per session the ms to llm.done and to the final playback and whether all was exact;
    the error events seen; this process's CPU seconds from GO to the end."""
    from voxpipe import protocol
    from voxpipe.config import load
    from voxpipe.protocol import Error, LlmDone, Playback, Request
    from voxpipe.runtime import Connection, endpoints_for

    kinds = ("llm.done", "playback", *(("error",) if watch_errors else ()))
    connection = Connection(f"bench.{uuid.uuid4().hex[:6]}", endpoints_for(load(config_path, env={})),
                            [protocol.subscription(kind, session) for kind in kinds[:2] for session in sessions]
                            + [protocol.subscription(kind) for kind in kinds[2:]])
    connection.open(timeout=30)
    print("READY", flush=True)
    sys.stdin.readline()
    cpu = os.times()
    asked: dict[str, tuple[str, float]] = {}
    for session in sessions:
        request_id = uuid.uuid4().hex[:12]
        asked[request_id] = (session, time.monotonic())
        connection.publish(session, request_id, Request(text=question(session), stream=True))
    results: dict[str, dict[str, Any]] = {}
    errors: list[str] = []
    deadline = time.monotonic() + TIMEOUT_S
    while sum("playback_ms" in r and "done_ms" in r for r in results.values()) < len(sessions):
        message = connection.receive(max(0.0, deadline - time.monotonic()))
        if message is None:
            break
        body, now = message.body, time.monotonic()
        if isinstance(body, Error):
            errors.append(f"{message.src}: {body.code}: {body.message[:160]}")
            continue
        if message.id not in asked:
            continue
        session, sent = asked[message.id]
        result = results.setdefault(session, {"ok": True})
        if isinstance(body, LlmDone):
            result["done_ms"] = (now - sent) * 1000
            result["ok"] &= body.status == "ok" and body.text == reply_for(question(session))
        elif isinstance(body, Playback) and body.final:
            result["playback_ms"] = (now - sent) * 1000
            result["ok"] &= body.event == "finished"
    after = os.times()
    connection.close()
    print(json.dumps({"results": results, "errors": errors, "missing": len(sessions) - len(results),
                      "cpu_s": after.user + after.system - cpu.user - cpu.system}), flush=True)


# --- CPU accounting -----------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far, its threads included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> tuple[float, float]:
    """CPU seconds the whole machine was busy and in all, from /proc/stat."""
    values = [int(v) / os.sysconf("SC_CLK_TCK") for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(values) - values[3] - values[4], sum(values)


def server_pid() -> int:
    """The fake server: this process's child running this module as the server."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and b"tests.bench.capacity" in argv and b"clients" not in argv:
            return int(entry.name)
    raise RuntimeError("fake server process not found")


# --- one run --------------------------------------------------------------------------------

@dataclass
class Run:
    sessions: int
    done_ms: list[float] = field(default_factory=list)
    playback_ms: list[float] = field(default_factory=list)
    exact: int = 0
    missing: int = 0
    errors: list[str] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)
    """CPU seconds over the run per process: each stage, `run` (the supervisor), `clients`, `server`."""
    seconds: float = 0.0
    busy: float = 0.0
    """Share of the machine's CPU time busy over the run, %."""


def start_clients(daemon: Daemon, sessions: list[str]) -> list[subprocess.Popen[str]]:
    groups = [sessions[i:i + SESSIONS_PER_CLIENT] for i in range(0, len(sessions), SESSIONS_PER_CLIENT)]
    clients = [subprocess.Popen([PYTHON, "-m", "tests.bench.capacity", "clients", str(daemon.config_path),
                                 "--watch-errors" if index == 0 else "--quiet", *group],
                                cwd=ROOT, env=base_env(), text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
               for index, group in enumerate(groups)]
    for client in clients:
        assert client.stdout is not None
        line = client.stdout.readline()
        assert line.strip() == "READY", f"a client did not start: {line!r}"
    return clients


def measure(daemon: Daemon, pids: dict[str, int], server: int, count: int, tag: str) -> Run:
    """One run of `count` sessions asking at once; the CPU of every process over it."""
    sessions = [f"cap{tag}-{index}" for index in range(count)]
    clients = start_clients(daemon, sessions)
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    before["server"] = cpu_seconds(server)
    busy_before, all_before = machine_busy()
    started = time.monotonic()
    for client in clients:
        assert client.stdin is not None
        client.stdin.write("GO\n")
        client.stdin.flush()
    outputs = [json.loads(client.communicate(timeout=TIMEOUT_S + 30)[0].strip().splitlines()[-1]) for client in clients]
    run = Run(count, seconds=time.monotonic() - started)
    busy_after, all_after = machine_busy()
    run.busy = (busy_after - busy_before) / max(1e-9, all_after - all_before) * 100
    run.cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    run.cpu["server"] = cpu_seconds(server) - before["server"]
    run.cpu["clients"] = sum(output["cpu_s"] for output in outputs)
    for output in outputs:
        run.errors += output["errors"]
        run.missing += output["missing"]
        for result in output["results"].values():
            if "done_ms" in result and "playback_ms" in result:
                run.done_ms.append(result["done_ms"])
                run.playback_ms.append(result["playback_ms"])
                run.exact += result["ok"]
            else:
                run.missing += 1
    return run


def daemon_settings(url: str) -> dict[str, Any]:
    settings = openai_settings(url)
    settings["llm"]["workers"] = 256
    return {**settings, "tts": {"engine": "null"}, "player": {"backend": "null"}}


def capacity(counts: tuple[int, ...], spy_dir: Path | None = None) -> tuple[list[Run], str]:
    """Each count of sessions in turn on one daemon, after a warm-up; py-spy's report of the last
    when `spy_dir` is given."""
    runs: list[Run] = []
    profile = ""
    with fake_openai(0.0, module="tests.bench.capacity") as url, Daemon(daemon_settings(url), env=KEY) as daemon:
        assert daemon.process is not None
        pids = stage_pids(daemon)
        pids["run"] = daemon.process.pid
        server = server_pid()
        measure(daemon, pids, server, WARMUP_SESSIONS, "warm")
        for count in counts:
            time.sleep(1.0)
            if spy_dir is not None and count == counts[-1]:
                run, profile = spied(daemon, pids, server, count, spy_dir)
            else:
                run = measure(daemon, pids, server, count, str(count))
            runs.append(run)
    return runs, profile


def spied(daemon: Daemon, pids: dict[str, int], server: int, count: int, spy_dir: Path) -> tuple[Run, str]:
    from tests.bench import spy
    assert daemon.process is not None
    spy_dir.mkdir(parents=True, exist_ok=True)
    raw = spy_dir / f"capacity-{count}.txt"
    rate = 100
    recorder = subprocess.Popen([shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"),
                                 "record", "--pid", str(daemon.process.pid), "--subprocesses", "--nonblocking",
                                 "--rate", str(rate), "--format", "raw", "-o", str(raw)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(2.0)
    run = measure(daemon, pids, server, count, f"spy{count}")
    recorder.send_signal(signal.SIGINT)
    recorder.communicate(timeout=60)
    names = {pid: name for name, pid in pids.items()}
    return run, "\n".join(spy.report(spy.parse(raw), names, rate, count))


# --- the report -----------------------------------------------------------------------------

def passed(run: Run) -> bool:
    """The goal: p99 of the ratio at most TARGET_RATIO, every reply exact, no error event."""
    ratio = [value / 1000 / STREAM_S for value in run.playback_ms]
    return bool(ratio) and percentile(ratio, .99) <= TARGET_RATIO and run.exact == run.sessions and not run.errors

STAGES = ("bus", "llm", "chunker", "tts", "player", "history", "run")


def render(runs: list[Run]) -> list[str]:
    cores = os.cpu_count() or 1
    lines = [f"The `openai` provider against a fake server (this module) that streams each reply as {TOKENS} "
             f"content events, {RATE:g} per second on a fixed schedule from the request's arrival: a "
             f"{STREAM_S:.2f} s stream. `llm.workers = 256`, `tts.engine = \"null\"`, player backend `null`. "
             f"Every session asks at the same moment, each in a new session, on one daemon after "
             f"{WARMUP_SESSIONS} warm-up sessions; the clients ({SESSIONS_PER_CLIENT} sessions per process) "
             f"and the fake server are processes of their own. Ratio: a reply's duration over its stream's.",
             "",
             "| sessions | tokens/s | exact | errors | request→`llm.done` p50 / p99 ms | request→final "
             "`playback` p50 / p99 ms | **ratio p50** | **ratio p99** | machine busy |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        ratio = [value / 1000 / STREAM_S for value in run.playback_ms] or [math.nan]
        done = run.done_ms or [math.nan]
        play = run.playback_ms or [math.nan]
        lines.append(f"| {run.sessions} | {run.sessions * RATE:,.0f} | {run.exact}/{run.sessions} | "
                     f"{len(run.errors)} | {median(done):,.0f} / {percentile(done, .99):,.0f} | "
                     f"{median(play):,.0f} / {percentile(play, .99):,.0f} | **{median(ratio):.2f}** | "
                     f"**{percentile(ratio, .99):.2f}** ({'PASS' if passed(run) else 'FAIL'}) "
                     f"| {run.busy:.0f} % of {cores} cores |")
    names = [*STAGES, "clients", "server"]
    lines += ["", "CPU seconds per process over each run (from the first request to the last reply), and µs of "
                  "CPU per token streamed:", "",
              "| sessions | seconds | " + " | ".join(names) + " | daemon total |",
              "|---|---|" + "---|" * (len(names) + 1)]
    for run in runs:
        daemon_total = sum(run.cpu.get(name, 0.0) for name in STAGES)
        lines.append(f"| {run.sessions} | {run.seconds:.1f} | "
                     + " | ".join(f"{run.cpu.get(name, math.nan):.2f}" for name in names)
                     + f" | **{daemon_total:.2f}** |")
    for run in runs:
        tokens = run.sessions * TOKENS
        daemon_total = sum(run.cpu.get(name, 0.0) for name in STAGES)
        lines.append(f"| µs/token at {run.sessions} | | "
                     + " | ".join(f"{run.cpu.get(name, math.nan) / tokens * 1e6:,.0f}" for name in names)
                     + f" | **{daemon_total / tokens * 1e6:,.0f}** |")
    if runs:
        last = runs[-1]
        per_token = sum(last.cpu.get(name, 0.0) for name in STAGES) / (last.sessions * TOKENS)
        lines += ["", f"At {last.sessions} sessions the daemon used {per_token * 1e6:,.0f} µs of CPU per token: "
                      f"{last.sessions * RATE:,.0f} tokens/s need {per_token * last.sessions * RATE:.2f} cores of "
                      f"the {cores} (the clients and the fake server take "
                      f"{(last.cpu.get('clients', 0) + last.cpu.get('server', 0)) / max(last.seconds, 1e-9):.2f} "
                      f"more); at this cost {cores / per_token:,.0f} tokens/s, {cores / per_token / RATE:,.0f} "
                      f"sessions at {RATE:g} tokens/s, would fill every core."]
    return lines


def notes(runs: list[Run]) -> list[str]:
    found = []
    for run in runs:
        if not passed(run):
            found.append(f"{run.sessions} sessions miss the goal (ratio p99 ≤ {TARGET_RATIO:g}, zero loss)")
        if run.exact != run.sessions or run.missing:
            found.append(f"{run.sessions} sessions: {run.exact} exact replies, {run.missing} incomplete")
        for text in sorted(set(run.errors))[:5]:
            found.append(f"{run.sessions} sessions: error event ×{run.errors.count(text)}: {text}")
    return found


def bench_capacity(quick: bool) -> tuple[list[str], list[str]]:
    """For tests/bench/run.py: (markdown lines, notes)."""
    runs, _ = capacity(QUICK_SESSIONS if quick else SESSIONS)
    return render(runs), notes(runs)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "clients":
        run_clients(argv[1], argv[3:], argv[2] == "--watch-errors")
        return 0
    if argv and not argv[0].startswith("-"):  # fake_openai's `DELAY`: serve
        openai_server.main(Handler)
        return 0
    parser = argparse.ArgumentParser(prog="python -m tests.bench.capacity", description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=list(SESSIONS))
    parser.add_argument("--spy", type=Path, metavar="DIR", help="profile the largest run with py-spy")
    args = parser.parse_args(argv)
    runs, profile = capacity(tuple(args.sessions), args.spy)
    print("\n".join(f"{key}: {value}" for key, value in describe().items()))
    print("\n".join(render(runs)))
    print("\n".join(f"- {note}" for note in notes(runs)))
    if profile:
        print("\n# py-spy, largest run\n\n" + profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
