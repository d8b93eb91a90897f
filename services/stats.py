"""`voxpipe stats`: latency percentiles of recent replies, per provider and TTS engine.

Reads the timelines the history stage stores with each reply (the `metrics` kind).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Iterable, Sequence

MEASURES = (("first_token_ms", "first token"), ("first_audio_ms", "first audio"),
            ("first_playback_ms", "first playback"))


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank q-quantile (0 < q <= 1): always a measured sample, never an interpolation."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else float("nan")


def table(timelines: Iterable[dict[str, Any]]) -> list[str]:
    """Rows of p50/p95 per (provider, engine) for each measure, over replies that reached it."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for timeline in timelines:
        groups[(str(timeline.get("provider", "")), str(timeline.get("engine", "")))].append(timeline)
    lines = [f"{'PROVIDER':<10} {'ENGINE':<14} {'REPLIES':>7}  " +
             "  ".join(f"{label + ' p50/p95 ms':>28}" for _, label in MEASURES)]
    for (provider, engine), rows in sorted(groups.items()):
        cells = []
        for key, _ in MEASURES:
            values = [float(row[key]) for row in rows if float(row.get(key, -1)) >= 0]
            cells.append(f"{percentile(values, 0.5):>13.0f} / {percentile(values, 0.95):<12.0f}" if values
                         else f"{'-':>28}")
        lines.append(f"{provider or '-':<10} {engine or '-':<14} {len(rows):>7}  " + "  ".join(cells))
    return lines
