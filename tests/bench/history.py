"""History: write throughput of the store, and context-query latency through the real stage.

The context query sits on every reply's critical path (llm waits for it before calling the
model), so its latency with a realistically large database is what matters.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from tests.bench.stats import percentile
from tests.harness import connect, start_stage, stop_process, wait_ready
from voxpipe.protocol import ContextQuery
from voxpipe.stages.history.store import HistoryStore

STORED = 10_000


def fill(path: Path, count: int) -> float:
    """Store `count` messages one transaction each, as the stage does; returns messages/s."""
    store = HistoryStore(path)
    started = time.perf_counter()
    for number in range(count):
        session = f"s{number % 100}"
        store.add_message(session, f"r{number // 2}", ("user", "assistant")[number % 2],
                          f"Message number {number}, of a realistic length for a spoken reply. " * 2,
                          time.time())
    elapsed = time.perf_counter() - started
    store.close()
    return count / elapsed


def query_latency(path: Path, queries: int) -> list[float]:
    """Milliseconds from publishing context.query to receiving its context, via bus + history stage."""
    runtime = Path(tempfile.mkdtemp(prefix="vp-bh-")) / "run"
    bus = start_stage("bus", runtime)
    history = None
    try:
        connect(runtime, "probe").close()
        history = start_stage("history", runtime, VOXPIPE_HISTORY__DB_PATH=str(path))
        wait_ready(runtime, "history")
        client = connect(runtime, "bench-history", "context")
        samples = []
        for number in range(queries):
            sent = time.perf_counter()
            client.publish(f"s{number % 100}", f"q{number}", ContextQuery(limit=20))
            while (reply := client.receive(10)) is not None and reply.id != f"q{number}":
                pass
            if reply is None:
                raise RuntimeError("history stopped answering context queries")
            samples.append((time.perf_counter() - sent) * 1000)
        client.close()
        return samples
    finally:
        if history is not None:
            stop_process(history)
        stop_process(bus)


def run(quick: bool = False) -> str:
    path = Path(tempfile.mkdtemp(prefix="vp-bh-db-")) / "history.db"
    rate = fill(path, STORED if not quick else 2000)
    samples = query_latency(path, 1000 if not quick else 100)
    stored = STORED if not quick else 2000
    return "\n".join([
        "## History: writes and context queries",
        "",
        f"Store: {stored:,} messages written one transaction each (SQLite WAL, synchronous=NORMAL), as the "
        "stage writes them: "
        f"**{rate:,.0f} messages/s**.",
        "",
        f"Context query (last 20 turns of a session, plus memory and variables) against that database, "
        f"{len(samples):,} sequential queries from a bus client through the broker to the real history stage "
        "and back:",
        "",
        "| queries | p50 ms | p90 ms | p99 ms | max ms |",
        "|---|---|---|---|---|",
        f"| {len(samples):,} | {percentile(samples, 0.5):.2f} | {percentile(samples, 0.9):.2f} | "
        f"{percentile(samples, 0.99):.2f} | {max(samples):.2f} |",
        ""])


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
