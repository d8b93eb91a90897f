"""What the llm stage adds: from a token leaving the HTTP server to its `token` message at a subscriber.

A local server streams OpenAI SSE whose every token carries the CLOCK_MONOTONIC time it was
written; a subscriber in this process reads it back on arrival. The span includes the loopback
socket, the openai library's parsing, the stage, and one bus hop through the broker.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.bench.stats import percentile
from tests.harness import Daemon
from voxpipe import protocol
from voxpipe.protocol import Request, Token
from voxpipe.runtime import Connection, endpoints_for

TOKENS_PER_REPLY = 1000
TOKEN_INTERVAL_S = 0.001


class _Stamped(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        """Quiet."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        base = {"id": "b", "object": "chat.completion.chunk", "created": 1, "model": "bench"}
        for _ in range(TOKENS_PER_REPLY):
            delta = {"content": f"{time.monotonic_ns()} "}
            event = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
            self.wfile.flush()
            time.sleep(TOKEN_INTERVAL_S)
        self.wfile.write(b"data: [DONE]\n\n")
        self.close_connection = True


def measure(replies: int) -> list[float]:
    """Microseconds from server write to subscriber receipt, one sample per token."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stamped)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings = {"llm": {"profile": "bench", "history_limit": 0, "profiles": {"bench": {
        "provider": "openai", "base_url": f"http://127.0.0.1:{server.server_address[1]}/v1", "model": "bench",
        "api_key_env": "", "repeat_ngram": 0, "user_turn_prefixes": []}}},
        "run": {"stages": ["llm"]}, "log": {"level": "warning"}}
    samples: list[float] = []
    try:
        with Daemon(settings) as daemon:
            client = Connection("bench-llm", endpoints_for(daemon.config()),
                                [protocol.subscription(kind) for kind in ("token", "llm.done")])
            client.open()
            for number in range(replies):
                client.publish("bench", f"r{number}", Request(text="go"))
                while True:
                    message = client.receive(30)
                    if message is None:
                        raise RuntimeError("the llm stage stopped answering")
                    now = time.monotonic_ns()
                    if not isinstance(message.body, Token):
                        break  # llm.done
                    samples += [(now - int(part)) / 1000 for part in message.body.text.split()]
            client.close()
    finally:
        server.shutdown()
    return samples


def run(quick: bool = False) -> str:
    replies = 1 if quick else 10
    samples = measure(replies)
    return "\n".join([
        "## LLM stage: token latency",
        "",
        f"{len(samples):,} tokens in {replies} streamed replies, one every {TOKEN_INTERVAL_S * 1000:g} ms, from a "
        "local SSE server whose tokens carry the CLOCK_MONOTONIC time they were written, to a subscriber on the "
        "bus. The span is what voxpipe adds on top of the model: loopback HTTP, the openai library's parsing, "
        "the llm stage (guards, `<think>` routing, validation) and one hop through the broker.",
        "",
        "| tokens | p50 µs | p90 µs | p99 µs | max µs |",
        "|---|---|---|---|---|",
        f"| {len(samples):,} | {percentile(samples, 0.5):,.0f} | {percentile(samples, 0.9):,.0f} | "
        f"{percentile(samples, 0.99):,.0f} | {max(samples):,.0f} |",
        ""])


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
