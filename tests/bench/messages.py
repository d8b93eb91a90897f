"""Per-message cost on the hot paths: encode (validate and serialise) and decode (parse, validate and
build the typed message), per token and per audio frame, for the typed kinds of today's
`voxpipe.protocol` and for the dict-based protocol module they replaced, side by side.

The old module is read from git (`git show BASELINE:services/protocol.py`) and loaded as a module of
its own, so no copy of it lives in the tree; without git history the section says so and measures
today's code alone. Rounds alternate between the two, and the best round of each is quoted (the
least disturbed by the rest of the machine).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from tests.harness import ROOT
from voxpipe import protocol

BASELINE = "179549b"
"""The last commit with the dict-based protocol (one services/protocol.py, `make()` and `message["x"]`)."""
PCM = bytes(range(256)) * 9  # 2304 bytes: a 52 ms frame of 22050 Hz int16 mono, espeak-ng's size
TOKEN_TEXT = " the"
ENVELOPE = {"session": "bench", "id": "r1", "seq": 7, "ts": 1796032063.145, "src": "bench"}


def baseline() -> ModuleType | None:
    """The dict-based protocol module of BASELINE, or None when git or the commit is not there."""
    try:
        source = subprocess.run(["git", "show", f"{BASELINE}:services/protocol.py"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(tempfile.mkdtemp(prefix="voxpipe-bench-")) / "protocol_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("protocol_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["protocol_baseline"] = module
    spec.loader.exec_module(module)
    return module


AUDIO = {"chunk": 3, "frame": 11, "rate": 22050, "channels": 1, "width": 2, "pcm": PCM, "last": False,
         "final": False, "chars": 42}


def today_cases() -> dict[str, Callable[[], Any]]:
    """What a publisher and a receiver do per message with the typed kinds."""
    token_frame = protocol.encode(protocol.Message(protocol.Token(text=TOKEN_TEXT), **ENVELOPE))
    audio_frame = protocol.encode(protocol.Message(protocol.Audio(**AUDIO), **ENVELOPE))
    return {
        "token encode": lambda: protocol.encode(protocol.Message(protocol.Token(text=TOKEN_TEXT), **ENVELOPE)),
        "token decode": lambda: protocol.decode(token_frame).body.text,
        "audio encode": lambda: protocol.encode(protocol.Message(protocol.Audio(**AUDIO), **ENVELOPE)),
        "audio decode": lambda: protocol.decode(audio_frame).body.pcm,
    }


def baseline_cases(old: ModuleType) -> dict[str, Callable[[], Any]]:
    """The same work with the dict-based module: make() validated, encode() serialised."""
    token_frame = old.encode(old.make("token", **ENVELOPE, text=TOKEN_TEXT))
    audio_frame = old.encode(old.make("audio", **ENVELOPE, **AUDIO))
    return {
        "token encode": lambda: old.encode(old.make("token", **ENVELOPE, text=TOKEN_TEXT)),
        "token decode": lambda: old.decode(token_frame)["text"],
        "audio encode": lambda: old.encode(old.make("audio", **ENVELOPE, **AUDIO)),
        "audio decode": lambda: old.decode(audio_frame)["pcm"],
    }


def per_call_us(work: Callable[[], Any], count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        work()
    return (time.perf_counter() - start) / count * 1e6


def run(quick: bool = False) -> str:
    count, rounds = (2000, 5) if quick else (10000, 15)
    old = baseline()
    variants = {"typed kinds (today)": today_cases()}
    if old is not None:
        variants["dict protocol (" + BASELINE + ")"] = baseline_cases(old)
    best: dict[tuple[str, str], float] = {}
    for _ in range(rounds):
        for variant, cases in variants.items():
            for case, work in cases.items():
                cost = per_call_us(work, count)
                best[(variant, case)] = min(best.get((variant, case), cost), cost)
    cases = list(today_cases())
    names = list(variants)
    lines = ["## Message cost", "",
             f"Best of {rounds} interleaved rounds of {count} calls each, µs per message. `encode` is what a "
             f"publisher pays (validate and serialise), `decode` what a receiver pays (parse, validate, build the "
             f"message). The audio frame holds {len(PCM)} bytes of PCM.", "",
             "| | " + " | ".join(names) + (" | today / before |" if old else " |"),
             "|---|" + "---|" * (len(names) + (1 if old else 0))]
    for case in cases:
        row = [f"{best[(name, case)]:.2f}" for name in names]
        if old is not None:
            row.append(f"{best[(names[0], case)] / best[(names[1], case)]:.2f}×")
        lines.append(f"| {case} | " + " | ".join(row) + " |")
    if old is None:
        lines += ["", f"(No git history with {BASELINE} here, so only today's code was measured.)"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
