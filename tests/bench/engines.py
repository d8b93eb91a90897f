"""TTS engines side by side, and token intake with a slow tts (issue 5's benchmark).

1. The same five sentences (ru and en) through each engine's API (`create_engine(...)` and
   `synthesize(text, should_stop)`), in-process: time to the first frame of each chunk and the
   real-time factor (synthesis time / audio duration). Engines: espeak-ng, the tiny random VITS of
   tests/test_tts_coqui.py, and a VITS of the default `VitsArgs` sizes with random weights, built
   offline by the same builder (a cost estimate of a real VITS; its audio is noise).
2. The daemon with tests/bench/fake_llm.py streaming a reply, once with `tts.engine = "null"` and
   once with `openai-speech` against a local server that streams 24 kHz pcm at one tenth of real
   time: the rate of `text` messages (chars/s, first to last) and when the chunker's last `chunk`
   follows the last `text`. A ratio of about 1 means the tts never holds back token intake.
"""

from __future__ import annotations

import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.bench import fake_llm
from tests.bench.stats import median
from tests.fakes.wire_server import Script, WireServer
from tests.harness import Daemon, openai_settings
from voxpipe import protocol
from voxpipe.protocol import Request
from voxpipe.runtime import Connection, endpoints_for
from voxpipe.stages.tts.engines import create_engine

SENTENCES = (
    "Привет! Сегодня в Москве солнечно, а вечером обещают небольшой дождь и лёгкий ветер.",
    "The quick brown fox jumps over the lazy dog, and then it runs back into the forest.",
    "Поезд отправляется с третьего пути ровно в восемь часов, не опаздывайте, пожалуйста.",
    "Please remember to water the plants on Tuesday, because I will be away until Friday.",
    "Мы встретимся у входа в библиотеку после обеда и вместе пойдём в парк гулять.",
)
NEVER: Callable[[], bool] = lambda: False  # noqa: E731
KEY = {"FAKE_OPENAI_KEY": "test-key"}
TOKEN_DELAY_S = 0.025
SPEECH_RATE = 24000
SLOWDOWN = 10
"""The slow tts server streams audio at 1/SLOWDOWN of real time."""


# --- 1. engines side by side ----------------------------------------------------------------

def time_engine(engine: Any) -> tuple[list[float], float, float]:
    """(first-frame ms per sentence, total synthesis s, total audio s), after one untimed warm-up."""
    for _ in engine.synthesize(SENTENCES[0], NEVER):
        pass
    firsts, busy, audio = [], 0.0, 0.0
    for text in SENTENCES:
        start = time.perf_counter()
        first = None
        for frame in engine.synthesize(text, NEVER):
            if first is None:
                first = time.perf_counter() - start
            audio += frame.duration_ms / 1000
        busy += time.perf_counter() - start
        firsts.append((first if first is not None else float("nan")) * 1000)
    return firsts, busy, audio


@contextmanager
def _full_size_args() -> Iterator[None]:
    """Make the tiny builder build a default-sized VITS: its VitsArgs(...) call gets the defaults."""
    import TTS.tts.models.vits as vits
    original = vits.VitsArgs
    vits.VitsArgs = lambda **_: original(init_discriminator=False)  # type: ignore[assignment]
    try:
        yield
    finally:
        vits.VitsArgs = original  # type: ignore[assignment]


def coqui_engines(directory: Path) -> list[tuple[str, Callable[[], Any]]]:
    from tests.test_tts_coqui import build_tiny_vits
    (directory / "tiny").mkdir()
    (directory / "full").mkdir()
    tiny = build_tiny_vits(directory / "tiny")
    with _full_size_args():
        full = build_tiny_vits(directory / "full")
    import torch
    params = {}
    for name, (checkpoint, _) in (("tiny", tiny), ("full", full)):
        state = torch.load(checkpoint, map_location="cpu")["model"]
        params[name] = sum(t.numel() for t in state.values())

    def make(files: tuple[Path, Path]) -> Callable[[], Any]:
        return lambda: create_engine("coqui", {"model_path": str(files[0]), "config_path": str(files[1])})

    return [(f"Coqui VITS, tiny random ({params['tiny'] / 1e3:,.0f}k parameters, 16 kHz)", make(tiny)),
            (f"Coqui VITS, default `VitsArgs` sizes, random weights ({params['full'] / 1e6:,.1f}M "
             f"parameters, 16 kHz)", make(full))]


def bench_engines() -> tuple[list[str], list[str]]:
    notes: list[str] = []
    rows = ["| engine | first frame per chunk, median ms | min | max | synthesis s | audio s | **RTF** |",
            "|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="vp-engines-") as tmp:
        engines: list[tuple[str, Callable[[], Any]]] = [
            ("espeak-ng (voice auto, rate 175)", lambda: create_engine("espeak", {}))]
        try:
            import TTS  # noqa: F401
            engines += coqui_engines(Path(tmp))
        except BaseException as exc:  # ImportError, or pytest's Skipped from importorskip
            if isinstance(exc, KeyboardInterrupt):
                raise
            notes.append(f"Coqui rows skipped: TTS is not importable ({type(exc).__name__}: {exc})")
        for label, make in engines:
            engine = make()
            try:
                firsts, busy, audio = time_engine(engine)
            finally:
                engine.close()
            rows.append(f"| {label} | {median(firsts):,.1f} | {min(firsts):,.1f} | {max(firsts):,.1f} | "
                        f"{busy:.2f} | {audio:.2f} | **{busy / audio:.3f}** |")
    lines = [f"{len(SENTENCES)} sentences (3 ru, 2 en, {min(map(len, SENTENCES))}–{max(map(len, SENTENCES))} "
             "characters), each one chunk, through `create_engine(...).synthesize(text, should_stop)` in "
             "this process, after one untimed warm-up sentence per engine. First frame: from the call to "
             "the first `PcmFrame`. RTF: synthesis time over audio duration (below 1 is faster than real "
             "time). VITS synthesises a chunk whole, so its first frame comes when the chunk is done; the "
             "random-weight models' durations are random, so their audio lengths are not speech-like.",
             "", *rows]
    return lines, notes


# --- 2. token intake with a slow tts --------------------------------------------------------

def slow_speech_script(chunk_audio_s: float = 1.0, piece_s: float = 0.1) -> Script:
    """A speech response: `chunk_audio_s` of silence as 24 kHz s16 pcm, in pieces of `piece_s`
    each written `piece_s * SLOWDOWN` after the last: one tenth of real time."""
    piece = b"\x00\x00" * int(SPEECH_RATE * piece_s)
    pieces = int(chunk_audio_s / piece_s)
    return Script(headers={"Content-Type": "audio/pcm"}, writes=[(piece_s * SLOWDOWN, piece)] * pieces)


def intake(daemon: Daemon, replies: int, timeout: float = 60.0) -> list[dict[str, float]]:
    """Per reply: chars and seconds from the first to the last `text`, and the last `chunk` after it."""
    client = Connection(f"bench.{uuid.uuid4().hex[:6]}", endpoints_for(daemon.config()),
                        [protocol.subscription(kind) for kind in ("text", "chunk", "llm.done")])
    client.open()
    results = []
    try:
        for number in range(replies):
            request_id = uuid.uuid4().hex[:12]
            client.publish(f"intake-{number}-{uuid.uuid4().hex[:6]}", request_id,
                           Request(text="Tell me about Paris.", stream=True))
            texts: list[float] = []
            chunks: list[float] = []
            chars, done = 0, None
            deadline = time.monotonic() + timeout
            while done is None or time.monotonic() < done + 0.5:
                message = client.receive(max(0.01, min(deadline, (done or deadline) + 0.5) - time.monotonic()))
                if time.monotonic() > deadline:
                    raise RuntimeError(f"reply {number}: no llm.done within {timeout} s")
                if message is None or message.id != request_id:
                    continue
                now = time.monotonic()
                if message.kind == "text" and message.body.delta:
                    texts.append(now)
                    chars += len(message.body.delta)
                elif message.kind == "chunk":
                    chunks.append(now)
                elif message.kind == "llm.done":
                    done = now
            span = texts[-1] - texts[0]
            results.append({"chars": chars, "messages": len(texts), "span": span,
                            "rate": chars / span if span else float("nan"),
                            "chunk_lag_ms": ((chunks[-1] - texts[-1]) * 1000) if chunks else float("nan"),
                            "chunks": len(chunks)})
    finally:
        client.close()
    return results


def bench_intake(quick: bool) -> tuple[list[str], list[str]]:
    replies = 2 if quick else 5
    found: dict[str, list[dict[str, float]]] = {}
    with fake_llm.serve(TOKEN_DELAY_S) as url, WireServer() as speech:
        speech.route("/v1/audio/speech", slow_speech_script())
        base = {**openai_settings(url), "player": {"backend": "null"}}
        slow = {"engine": "openai-speech", "openai-speech": {
            "base_url": speech.url("/v1"), "api_key_env": "FAKE_OPENAI_KEY", "response_format": "pcm",
            "sample_rate": SPEECH_RATE, "timeout_s": 600.0}}
        for label, tts in (("idle (`null` engine)", {"engine": "null"}),
                           (f"{SLOWDOWN}× slower than real time (`openai-speech`)", slow)):
            with Daemon({**base, "tts": tts}, env=KEY) as daemon:
                intake(daemon, 1)  # warm-up
                found[label] = intake(daemon, replies)
        speech_requests = len(speech.records)
    rows = ["| tts | replies | chars per reply | `text` messages | first→last `text` s | **chars/s** median "
            "| last `chunk` after last `text`, median ms |", "|---|---|---|---|---|---|---|"]
    for label, results in found.items():
        rows.append(f"| {label} | {len(results)} | {median([r['chars'] for r in results]):.0f} | "
                    f"{median([r['messages'] for r in results]):.0f} | {median([r['span'] for r in results]):.2f} "
                    f"| **{median([r['rate'] for r in results]):.1f}** | "
                    f"{median([r['chunk_lag_ms'] for r in results]):.1f} |")
    idle, slow_rate = (median([r["rate"] for r in results]) for results in found.values())
    lines = [f"`tests/bench/fake_llm.py` streams a {len(fake_llm.REPLY)}-character reply in {fake_llm.EVENTS} "
             f"SSE events {TOKEN_DELAY_S * 1000:.0f} ms apart; each daemon answers one untimed warm-up and "
             f"then {replies} replies, each in a new session, one after the other. The slow tts is the "
             f"`openai-speech` engine against a local `tests/fakes/wire_server.py` that answers every "
             f"chunk with 1 s of 24 kHz pcm in 100 ms pieces written {SLOWDOWN * 100} ms apart "
             f"({SLOWDOWN}× slower than real time), so the tts stage is still busy with the first chunks "
             f"while later replies stream. Measured on a bus subscriber: the `text` messages the chunker "
             f"consumes, and the chunker's `chunk` output.", "", *rows, "",
             f"**Token intake ratio, slow tts / idle tts: {slow_rate / idle:.2f}** (about 1: the tts does "
             f"not hold back token intake). The speech server got {speech_requests} requests."]
    notes = []
    if abs(slow_rate / idle - 1) > 0.1:
        notes.append(f"token intake with the slow tts differs from idle by {abs(slow_rate / idle - 1):.0%}")
    return lines, notes


def run(quick: bool = False) -> str:
    lines, notes = bench_engines()
    more, more_notes = bench_intake(quick)
    return "\n".join(["## TTS engines", "", *lines, "", "### Token intake with a slow tts", "", *more, "",
                      *(f"- {note}" for note in notes + more_notes)])


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
