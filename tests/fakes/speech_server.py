"""A local OpenAI-compatible `/v1/audio/speech` server that speaks at a steady pace.

Run as a real process: `python -m tests.fakes.speech_server MS_PER_CHAR` prints `PORT <n>`.
Each request gets `pcm` (24 kHz, 16-bit mono, non-zero samples) lasting MS_PER_CHAR ms per
character of its `input`, sent in 100 ms pieces at real time, as a streaming synthesiser
(Coqui XTTS, a hosted voice) delivers it. A pipeline that writes audio as fast as it comes (the
wav and null players) can then be cut in the middle of a chunk, which a synthesiser faster than
real time (espeak-ng) never allows.
"""

from __future__ import annotations

import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RATE = 24000
PIECE_MS = 100


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # the body ends when the connection closes: no length to know up front
    ms_per_char = 60.0

    def log_message(self, *args: object) -> None:
        """Quiet: tests read the pipeline's output, not this server's access log."""

    def do_POST(self) -> None:
        text = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))["input"]
        samples = int(len(text) * self.ms_per_char * RATE / 1000)
        piece = RATE * PIECE_MS // 1000
        self.send_response(200)
        self.send_header("Content-Type", "audio/pcm")
        self.end_headers()
        try:
            for start in range(0, samples, piece):
                self.wfile.write(bytes([1, 2]) * min(piece, samples - start))
                self.wfile.flush()
                time.sleep(PIECE_MS / 1000)
        except (BrokenPipeError, ConnectionResetError):
            return  # the tts stage hung up: its chunk was cancelled


def main() -> None:
    Handler.ms_per_char = float(sys.argv[1]) if len(sys.argv) > 1 else Handler.ms_per_char
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
