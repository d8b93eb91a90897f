"""runtime.deadlines: the heap behind a stage's next_tick, moved, cleared and taken as a scan would."""

from __future__ import annotations

import random

from voxpipe.runtime.deadlines import Deadlines


def test_the_earliest_live_deadline_comes_first_whatever_moved_or_was_cleared() -> None:
    deadlines: Deadlines[str] = Deadlines()
    assert deadlines.next() is None and deadlines.due(1e9) == []
    deadlines.set("a", 5.0)
    deadlines.set("b", 3.0)
    deadlines.set("c", 4.0)
    deadlines.set("b", 6.0)  # moved later: its old 3.0 is skipped
    deadlines.clear("c")
    assert deadlines.next() == 5.0
    assert deadlines.due(4.9) == []
    assert deadlines.due(6.0) == ["a", "b"]
    assert deadlines.next() is None and len(deadlines) == 0
    deadlines.set("a", 1.0)
    deadlines.clear("a")
    deadlines.set("a", 1.0)  # set again at the same time after a clear: due once
    assert deadlines.due(2.0) == ["a"] and deadlines.due(2.0) == []


def test_it_agrees_with_a_scan_over_many_changes_and_stays_small() -> None:
    rng = random.Random(15)
    deadlines: Deadlines[int] = Deadlines()
    truth: dict[int, float] = {}
    now = 0.0
    for _ in range(20_000):
        key = rng.randrange(300)
        action = rng.random()
        if action < 0.6:
            at = now + rng.uniform(0, 10)
            deadlines.set(key, at)
            truth[key] = at
        elif action < 0.8:
            deadlines.clear(key)
            truth.pop(key, None)
        else:
            now += rng.uniform(0, 2)
            expected = sorted((at, key) for key, at in truth.items() if at <= now)
            assert deadlines.due(now) == [key for _, key in expected]
            for _, key in expected:
                del truth[key]
        assert deadlines.next() == (min(truth.values()) if truth else None)
        assert len(deadlines._heap) <= 2 * len(truth) + 65
