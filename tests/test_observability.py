"""Per-reply metrics, `voxpipe stats`, the optional Prometheus endpoint and the event log lines."""

from __future__ import annotations

import time
import urllib.request

from tests.harness import Daemon, fake_openai, free_port, openai_settings

KEY = {"FAKE_OPENAI_KEY": "test-key"}


def test_metrics_stats_prometheus_and_logs() -> None:
    port = free_port()
    with fake_openai() as url, Daemon({**openai_settings(url), "metrics": {"prometheus_port": port}},
                                      env=KEY) as daemon:
        for n in range(3):
            assert daemon.say(f"hello {n}", "--session", "obs").returncode == 0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            stats = daemon.run_cli("stats")
            if stats.returncode == 0 and " 3 " in stats.stdout:
                break
            time.sleep(0.5)
        assert stats.returncode == 0, stats.stderr
        header, row = stats.stdout.splitlines()[:2]
        assert "first audio p50/p95 ms" in header and row.split()[:5] == ["fake", "openai", "espeak", "3", "0"]
        expected = [*(f'voxpipe_stage_up{{stage="{stage}"}} 1'
                      for stage in ("bus", "llm", "chunker", "tts", "player", "history")),
                    'voxpipe_stage_events_total{stage="llm",counter="published"}',
                    'voxpipe_reply_latency_ms_count{measure="first_audio"} 3']
        deadline = time.monotonic() + 5  # stage counters come with heartbeats, a second apart
        while True:
            page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            if all(line in page for line in expected) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        log = "".join(daemon.log)
    for line in expected:
        assert line in page
    assert "obs/" in log and ": request (profile fake)" in log and ": ok after " in log
    assert ": playback finished at chunk" in log


def test_stats_without_replies_says_what_to_do() -> None:
    daemon = Daemon({})
    try:
        result = daemon.run_cli("stats")
    finally:
        daemon.close()
    assert result.returncode == 1 and "voxpipe say" in result.stderr


def test_prometheus_escapes_names_from_the_bus_and_keeps_a_bounded_set_of_stages() -> None:
    """A heartbeat's `src` and counter names come from the bus: a quote or a newline in them must not
    close the label and plant a metric, and made-up sources must not grow the exposition."""
    from voxpipe.ops.prometheus import STAGES, Exposition
    from voxpipe.protocol import Heartbeat, Message

    exposition = Exposition()
    hostile = 'x"} 1\nvoxpipe_stage_up{stage="forged'
    beat = Heartbeat(pid=1, uptime=1.0, state="ready", counters={hostile: 3})
    exposition.observe(Message(beat, session="", id="", src=hostile), now=0.0)
    text = exposition.render(now=1.0)
    assert 'stage="forged"' not in text and "\nvoxpipe_stage_up{stage=\"forged" not in text
    assert 'voxpipe_stage_up{stage="x\\"} 1\\nvoxpipe_stage_up{stage=\\"forged"} 1' in text
    for n in range(STAGES * 4):
        exposition.observe(Message(beat, session="", id="", src=f"made-up-{n}"), now=2.0)
    rows = exposition.render(now=2.5).splitlines()
    assert sum(row.startswith("voxpipe_stage_up{") for row in rows) == STAGES
