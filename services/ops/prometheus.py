"""An optional Prometheus text endpoint, served by `voxpipe run` (off unless metrics.prometheus_port).

Everything it shows already travels on the bus: stage heartbeats (state, uptime, counters) and the
per-reply `metrics` timelines; the supervisor just keeps the latest of each.
"""

from __future__ import annotations

import collections
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..protocol import Body, Heartbeat, Message, Metrics
from ..runtime.replies import Recent
from .stats import percentile

STALE_S = 5.0
"""A stage whose last heartbeat is older than this is reported down."""
LATENCIES = ("first_token_ms", "first_audio_ms", "first_playback_ms", "end_ms")
STAGES = 256
"""Heartbeat sources kept: a daemon has a handful of stages and shards; a flood of heartbeats with
made-up `src` names evicts the oldest instead of growing the exposition without bound."""


def label(value: str) -> str:
    """A label value in the text format's escaping (backslash, double quote, newline), so a `src` or
    counter name from the bus cannot close its label and plant a metric of its own."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Exposition:
    """The latest heartbeat per stage and recent reply timelines, rendered in the text format."""

    def __init__(self, window: int = 500) -> None:
        self._beats: Recent[str, tuple[float, Heartbeat]] = Recent(STAGES)
        self._timelines: collections.deque[dict[str, float]] = collections.deque(maxlen=window)
        self._lock = threading.Lock()

    def observe(self, message: Message[Body], now: float) -> None:
        """Keep a heartbeat as its stage's latest, a `metrics` timeline among the recent ones."""
        body = message.body
        with self._lock:
            if isinstance(body, Heartbeat):
                self._beats[message.src] = (now, body)
            elif isinstance(body, Metrics):
                self._timelines.append({key: float(getattr(body, key)) for key in LATENCIES})

    def render(self, now: float) -> str:
        with self._lock:
            beats, timelines = dict(self._beats.items()), list(self._timelines)
        lines = ["# HELP voxpipe_stage_up 1 while the stage sends heartbeats.", "# TYPE voxpipe_stage_up gauge"]
        lines += [f'voxpipe_stage_up{{stage="{label(src)}"}} {int(now - seen < STALE_S and beat.state == "ready")}'
                  for src, (seen, beat) in sorted(beats.items())]
        lines += ["# HELP voxpipe_stage_uptime_seconds Seconds since the stage started.",
                  "# TYPE voxpipe_stage_uptime_seconds gauge"]
        lines += [f'voxpipe_stage_uptime_seconds{{stage="{label(src)}"}} {beat.uptime:.1f}'
                  for src, (_, beat) in sorted(beats.items())]
        lines += ["# HELP voxpipe_stage_events_total A stage's counters: received, published, invalid, gaps, ...",
                  "# TYPE voxpipe_stage_events_total counter"]
        lines += [f'voxpipe_stage_events_total{{stage="{label(src)}",counter="{label(name)}"}} {value}'
                  for src, (_, beat) in sorted(beats.items()) for name, value in sorted(beat.counters.items())]
        lines += ["# HELP voxpipe_reply_latency_ms Recent replies: milliseconds from the request.",
                  "# TYPE voxpipe_reply_latency_ms summary"]
        for measure in LATENCIES:
            values = [timeline[measure] for timeline in timelines if timeline[measure] >= 0]
            for quantile in (0.5, 0.95):
                if values:
                    lines.append(f'voxpipe_reply_latency_ms{{measure="{measure[:-3]}",quantile="{quantile}"}} '
                                 f"{percentile(values, quantile):.1f}")
            lines.append(f'voxpipe_reply_latency_ms_count{{measure="{measure[:-3]}"}} {len(values)}')
        return "\n".join(lines) + "\n"


def serve(exposition: Exposition, bind: str, port: int) -> ThreadingHTTPServer:
    """Serve GET /metrics in a daemon thread; the caller shuts the server down."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/metrics":
                self.send_error(404, "only /metrics is served")
                return
            body = exposition.render(time.monotonic()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            """Scrapes every few seconds would flood the journal."""

    server = ThreadingHTTPServer((bind, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="prometheus", daemon=True).start()
    return server
