"""`voxpipe stats`: latency percentiles of recent replies, per LLM profile and TTS engine.

Reads the timelines the history stage stores with each reply (the `metrics` kind).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from ..frontends.terminal import printable

MEASURES = (("first_token_ms", "first token"), ("first_audio_ms", "first audio"),
            ("first_playback_ms", "first playback"))


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank q-quantile (0 < q <= 1): always a measured sample, never an interpolation."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else float("nan")


def table(timelines: Iterable[dict[str, Any]]) -> list[str]:
    """Rows of p50/p95 per (profile, engine) for each measure, over the replies that reached it.

    A profile, not a provider, is what the user picks: two profiles on one provider (two models,
    two servers) are told apart.  The provider column names the profile's provider; a request that
    failed before it reached one (an unknown profile, a busy session) still counts in its profile's
    row, under FAILED, and gives no latency.  Timelines stored before profiles were recorded show
    profile `-`.

    Profile, provider and engine names come from the bus (the `metrics` kind), so they are shown
    through `printable`: a name cannot break its row or drive the terminal.
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for timeline in timelines:
        groups[(str(timeline.get("profile", "")), str(timeline.get("engine", "")))].append(timeline)
    rows = [["PROFILE", "PROVIDER", "ENGINE", "REPLIES", "FAILED",
             *(f"{label + ' p50/p95 ms':>28}" for _, label in MEASURES)]]
    for (profile, engine), replies in sorted(groups.items()):
        providers = sorted({str(reply["provider"]) for reply in replies if reply.get("provider")})
        failed = sum(reply.get("status") == "error" for reply in replies)
        names = [profile or "-", ",".join(providers) or "-", engine or "-"]
        row = [*(printable(name, one_line=True) for name in names), str(len(replies)), str(failed)]
        for key, _ in MEASURES:
            values = [float(reply[key]) for reply in replies if float(reply.get(key, -1)) >= 0]
            row.append(f"{percentile(values, 0.5):>13.0f} / {percentile(values, 0.95):<12.0f}" if values
                       else f"{'-':>28}")
        rows.append(row)
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    return [" ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True))
            + f" {row[3]:>7} {row[4]:>6}  " + "  ".join(row[5:]) for row in rows]
