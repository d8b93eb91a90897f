"""The game link: when the MiSide player hears the first voiced line, phrase by phrase vs the whole reply.

One run, side by side: one daemon (tests/bench/fake_llm.py, its 194-character reply at 40 tokens/s,
espeak-ng, player null) and two `voxpipe game` processes on the same bus, one per `game.delivery`, each
played by its own MiSide mod test double on the mod's timing (poll loop A26/A27, the blocking voice load
F7).  The prompts alternate between the two (the order flips every round), after one warm-up each.  The
two doubles play different characters, so the two links' replies are separate sessions.  Times are the
double's: from the player's Enter (say) to when its voice starts, as the game would play it
(docs/design/game-link.md §11).
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass

from tests.bench import fake_llm
from tests.bench.stats import percentile
from tests.fakes.miside_mod import ModDouble, ShownLine
from tests.harness import Daemon, openai_settings
from tests.test_game_link import KEY, game_link

TOKEN_DELAY_S = 0.025
"""40 tokens/s, as in §2."""
QUIET_S = 1.5
"""A reply is over when its last voice has ended and no new line came for this long (three polls)."""
OVERLAP_S = 0.05
"""A next voice starting more than this before the previous one ends is an overlap the player hears
(less is masked by the mod's 50 ms fade-in, F4)."""
MODES = {"phrases": "Crazy", "whole": "Kind"}
"""game.delivery -> the character its double plays."""


@dataclass
class Sample:
    first_voice_s: float  # Enter → the first voiced line's audio starts (the headline)
    first_reply_s: float  # Enter → the reply to the player's request received
    last_end_s: float  # Enter → the last voice ends
    phrases: int  # voiced lines = main-thread hitches of ~100 ms or more (F7)
    gaps: list[float]  # between consecutive voices: next start − previous end
    dots: int  # "..." bubbles the player saw while the request was held (A28)


def one_reply(mod: ModDouble, prompt: str, timeout: float = 120.0) -> Sample:
    """Say `prompt` and wait until its reply has played out."""
    mod.wait_for(mod.can_type, timeout=timeout)
    last = max((request.sent_at for request in mod.requests() if request.kind == "player"), default=-math.inf)
    time.sleep(max(0.0, last + 2.1 - time.monotonic()))  # text within the mod's 2 s cooldown is lost (A18)
    before, dots = len(mod.lines()), mod.log.dots
    entered = time.monotonic()
    assert mod.say(prompt)

    def over() -> list[ShownLine]:
        lines = mod.lines()[before:]
        now = time.monotonic()
        return lines if lines and not mod.dialog_active and all(
            line.audio_end is not None and line.audio_end < now - QUIET_S and line.queued_at < now - QUIET_S
            for line in lines) else []

    lines = mod.wait_for(over, timeout=timeout)
    request = next(r for r in mod.requests() if r.kind == "player" and r.sent_at >= entered)
    reply = next(r for r in mod.replies() if r.request_id == request.id)
    voiced = [line for line in lines if line.audio_start is not None]
    starts = [line.audio_start for line in voiced if line.audio_start is not None]
    ends = [line.audio_end for line in voiced if line.audio_end is not None]
    assert voiced and reply.received_at is not None, f"no voice for {prompt!r}: {mod.log.failures()}"
    return Sample(first_voice_s=starts[0] - entered, first_reply_s=reply.received_at - entered,
                  last_end_s=max(ends) - entered, phrases=len(voiced),
                  gaps=[start - end for start, end in zip(starts[1:], ends, strict=False)],
                  dots=mod.log.dots - dots)


def measure(prompts: int) -> tuple[dict[str, list[Sample]], list[str]]:
    """Samples per mode (warm-ups dropped) and the doubles' failures."""
    samples: dict[str, list[Sample]] = {mode: [] for mode in MODES}
    failures: list[str] = []
    with fake_llm.serve(TOKEN_DELAY_S) as url, \
            Daemon({**openai_settings(url), "player": {"backend": "null"}}, env=KEY) as daemon, ExitStack() as stack:
        mods = {mode: stack.enter_context(ModDouble(stack.enter_context(game_link(daemon, delivery=mode)).port,
                                                    character=character))
                for mode, character in MODES.items()}
        for number in range(prompts + 1):
            order = list(MODES) if number % 2 == 0 else list(reversed(MODES))
            for mode in order:
                sample = one_reply(mods[mode], f"Tell me about Paris, {number}.")
                if number:
                    samples[mode].append(sample)
        for mode, mod in mods.items():
            failures += [f"{mode}: {failure}" for failure in mod.log.failures()]
    return samples, failures


def run(quick: bool = False) -> str:
    samples, failures = measure(3 if quick else 20)

    def cell(mode: str, key: str) -> str:
        values = [getattr(sample, key) for sample in samples[mode]]
        return " | ".join(f"{value:.2f}" if isinstance(value, float) else str(value)
                          for value in (percentile(values, .5), percentile(values, .95)))

    def gap_cell(mode: str) -> str:
        gaps = [gap for sample in samples[mode] for gap in sample.gaps]
        if not gaps:
            return "– | – | – | 0"
        overlaps = sum(gap < -OVERLAP_S for gap in gaps)
        return f"{percentile(gaps, .5):.2f} | {percentile(gaps, .95):.2f} | {max(gaps):.2f} | {overlaps}"

    first = {mode: percentile([sample.first_voice_s for sample in samples[mode]], .5) for mode in MODES}
    rows = [("first_voice_s", "**Enter → first voiced line starts**"), ("first_reply_s", "Enter → reply received"),
            ("last_end_s", "Enter → last voice ends"), ("phrases", "voiced lines (≈100 ms main-thread hitch each)"),
            ("dots", "\"...\" bubbles while the request was held")]
    return "\n".join([
        "## Game",
        "",
        f"{len(samples['phrases'])} prompts per mode (after one warm-up each), alternating, through two `voxpipe "
        f"game` processes on one daemon that differ only in `game.delivery`: `tests/bench/fake_llm.py` "
        f"({len(fake_llm.REPLY)} characters at {1 / TOKEN_DELAY_S:.0f} tokens/s), espeak-ng, player `null`. "
        "The player is the MiSide mod test double on the mod's own timing (a poll 0.35 s after the last ends, "
        "replies noticed on a 0.1 s tick, each voice file loaded, deleted after 100 ms, then played). Seconds "
        "from the player's Enter.",
        "",
        "| s | phrases p50 | p95 | whole p50 | p95 |",
        "|---|---|---|---|---|",
        *(f"| {label} | {cell('phrases', key)} | {cell('whole', key)} |" for key, label in rows),
        "",
        "| between consecutive voices of a reply, s | p50 | p95 | max | overlaps > 50 ms |",
        "|---|---|---|---|---|",
        f"| phrases | {gap_cell('phrases')} |",
        f"| whole | {gap_cell('whole')} |",
        "",
        f"**Phrase by phrase, the first voice starts {first['whole'] / first['phrases']:.1f}× sooner** "
        f"({first['phrases']:.2f} s against {first['whole']:.2f} s at p50). A negative gap is an overlap; a "
        "positive one is the pause the mod's poll period adds between phrases (§2.4 paces each phrase by the "
        "previous one's audio).",
        "",
        "The doubles saw " + ("no failure (every reply well-typed and read in one recv, every file a "
                              "canonical 44.1 kHz stereo WAV)." if not failures else
                              f"{len(failures)} failures: " + "; ".join(failures[:5])),
        ""])


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
