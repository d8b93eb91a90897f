"""Where the daemon's CPU goes while it answers: py-spy on every stage process (issue 15's profiling).

    python -m tests.bench.spy [local|fake|instant] [--replies N] [--rate HZ] [--raw DIR]

Starts a daemon (local: the bundled model and espeak-ng; fake: the fake OpenAI server at 40 tokens/s
and espeak-ng; instant: the zero-delay fake server with the null tts), asks one untimed warm-up, then
samples every process of `voxpipe run` with `py-spy record --subprocesses --nonblocking` (on-CPU
stacks only) while it asks N questions one after another, and prints, per process, the CPU time per
reply, the share of it in each part of interest (inclusive: a frame anywhere in the stack), and the
functions that use it themselves. py-spy is in the dev extra. Not part of `make bench`: sampling five
processes costs CPU of its own, so the times here are for finding where the time goes, not for
comparing with the bench's.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

from tests.bench import fake_llm
from tests.bench.baseline import KEY, TOKEN_DELAY_S, Bus
from tests.bench.stats import median
from tests.bench.system import LOCAL_PROFILE, PROMPTS, stage_pids
from tests.harness import Daemon, fake_openai, openai_settings

PARTS = (
    ("llama.cpp (provider)", ("(llama_cpp/",)),
    ("espeak-ng synthesis", ("espeak.py",)),
    ("openai SDK", ("(openai/",)),
    ("pydantic", ("(pydantic",)),
    ("httpx / httpcore", ("(httpx", "(httpcore")),
    ("bus: receive (zmq poll included)", ("Connection.receive",)),
    ("zmq poll", ("Poller.poll",)),
    ("protocol decode", ("decode (services/protocol/wire.py",)),
    ("bus: publish", ("Connection.publish",)),
    ("protocol encode", ("encode (services/protocol/wire.py",)),
    ("msgpack", ("(msgpack",)),
    ("zmq", ("(zmq/",)),
    ("logging", ("(logging/",)),
    ("heartbeat", ("_heartbeat",)),
    ("chunker core", ("chunker/core.py", "stages/tags.py")),
    ("history store (sqlite)", ("history/store.py",)),
    ("llm job core", ("llm/jobs.py", "llm/guards.py", "llm/think.py")),
    ("player backend / convert", ("player/backends", "player/convert.py")),
    ("broker", ("runtime/broker.py",)),
)


def settings_for(config: str, url: str) -> tuple[dict, dict[str, str]]:
    if config == "local":
        return {**LOCAL_PROFILE, "tts": {"engine": "espeak"}, "player": {"backend": "null"}}, {}
    if config == "fake":
        return {**openai_settings(url), "tts": {"engine": "espeak"}, "player": {"backend": "null"}}, KEY
    return {**openai_settings(url), "tts": {"engine": "null"}, "player": {"backend": "null"}}, KEY


def parse(path: Path) -> dict[int, Counter[str]]:
    """py-spy's raw output, `process PID:"cmd";[process PID:"cmd";]frame;...;frame COUNT` per line (a
    child's stacks under its parent's process frame) -> the innermost pid -> its stack -> count."""
    stacks: dict[int, Counter[str]] = defaultdict(Counter)
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        processes = [i for i, frame in enumerate(frames) if re.match(r"process \d+:", frame)]
        if not processes or not count.isdigit():
            continue
        pid = int(frames[processes[-1]].split()[1].split(":")[0])
        stacks[pid][";".join(frames[processes[-1] + 1:])] += int(count)
    return stacks


def counters(pid: int) -> tuple[float, int, int]:
    """CPU seconds (user + system), voluntary and involuntary context switches of a process so far,
    its threads included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    voluntary = involuntary = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches"):
                voluntary += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches"):
                involuntary += int(line.split()[1])
    return cpu, voluntary, involuntary


def report(stacks: dict[int, Counter[str]], names: dict[int, str], rate: int, replies: int) -> list[str]:
    lines = []
    for pid, counter in sorted(stacks.items(), key=lambda item: -sum(item[1].values())):
        total = sum(counter.values())
        name = names.get(pid, f"pid {pid}")
        lines.append(f"## {name}: {total / rate * 1000 / replies:.1f} ms CPU per reply ({total} samples)")
        parts = Counter({label: sum(n for stack, n in counter.items() if any(key in stack for key in keys))
                         for label, keys in PARTS})
        lines += [f"  {label:28} {n / total * 100:5.1f} %  {n / rate * 1000 / replies:7.1f} ms/reply"
                  for label, n in parts.most_common() if n]
        leaves: Counter[str] = Counter()
        for stack, n in counter.items():
            leaves[stack.rsplit(";", 1)[-1]] += n
        lines.append("  self time:")
        lines += [f"    {n / total * 100:5.1f} %  {leaf[:150]}" for leaf, n in leaves.most_common(12)]
        lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.spy", description=__doc__.split("\n")[0])
    parser.add_argument("config", choices=("local", "fake", "instant"), nargs="?", default="local")
    parser.add_argument("--replies", type=int, default=10)
    parser.add_argument("--rate", type=int, default=100)
    parser.add_argument("--raw", type=Path, help="keep py-spy's raw output in this directory")
    args = parser.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out_dir = args.raw or Path(tempfile.mkdtemp(prefix="vp-spy-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / f"{args.config}.txt"
    server = (fake_llm.serve(TOKEN_DELAY_S) if args.config == "fake" else fake_openai(0.0))
    with server as url:
        settings, env = settings_for(args.config, url)
        with Daemon(settings, env=env) as daemon:
            names = {pid: src for src, pid in stage_pids(daemon).items()}
            assert daemon.process is not None
            names[daemon.process.pid] = "voxpipe run (supervisor)"
            bus = Bus.attach(daemon)
            try:
                bus.reply("Hello!")
                before = {pid: counters(pid) for pid in names}
                recorder = subprocess.Popen([spy, "record", "--pid", str(daemon.process.pid), "--subprocesses",
                                             "--nonblocking", "--rate", str(args.rate), "--format", "raw",
                                             "-o", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                time.sleep(2.0)
                ttfa = [bus.reply(PROMPTS[i % len(PROMPTS)]).ms["audio"] for i in range(args.replies)]
                after = {pid: counters(pid) for pid in names}
                recorder.send_signal(signal.SIGINT)
                _, err = recorder.communicate(timeout=60)
            finally:
                bus.close()
    if not raw.exists():
        print(f"py-spy wrote nothing: {err.decode()[-500:]}", file=sys.stderr)
        return 1
    print(f"# {args.config}: {args.replies} replies, TTFA p50 {median(ttfa):.0f} ms under py-spy at {args.rate} Hz; "
          f"raw stacks in {raw}\n")
    print("| process | CPU ms / reply (/proc) | voluntary switches / reply | involuntary / reply |")
    print("|---|---|---|---|")
    for pid, name in sorted(names.items(), key=lambda item: item[1]):
        cpu, vol, inv = (b - a for a, b in zip(before[pid], after[pid], strict=True))
        print(f"| {name} | {cpu * 1000 / args.replies:.1f} | {vol / args.replies:.0f} | {inv / args.replies:.0f} |")
    print()
    print("\n".join(report(parse(raw), names, args.rate, args.replies)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
