"""A fake OpenAI server with realistic timing for both modes, for the TTFA benchmark.

tests/fakes/openai_server.py answers with one short sentence and returns a non-streamed
reply at once, so timing streaming against it would compare nothing.  Here the reply is a
few sentences (about 65 SSE content events) and a non-streamed reply is sent only after the
time that streaming the same events takes, as a real server that generates before it answers.

Run as a process: `python -m tests.bench.fake_llm DELAY` prints `PORT <n>`; DELAY is the
pause after each SSE event in seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from contextlib import contextmanager
from http.server import ThreadingHTTPServer
from typing import Iterator

from tests.fakes import openai_server
from tests.fakes.openai_server import pieces
from tests.harness import PYTHON, ROOT, base_env

REPLY = ("Sure, here is a short answer. The capital of France is Paris, a city on the Seine. "
         "It has been the capital for most of the last thousand years. <e>smile</e> "
         "Anything else you would like to know?")
EVENTS = len(pieces(REPLY)) + 2
"""SSE events per streamed reply: the role delta, the content pieces and the finish."""


class Handler(openai_server.Handler):
    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        if body.get("stream"):
            self._stream(body["model"], REPLY)
            return
        time.sleep(self.delay * EVENTS)
        self._json(200, {"id": "cmpl-1", "object": "chat.completion", "created": int(time.time()),
                         "model": body["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": REPLY}}]})


@contextmanager
def serve(delay: float) -> Iterator[str]:
    """Run this server in its own process; yields its base URL."""
    process = subprocess.Popen([PYTHON, "-m", "tests.bench.fake_llm", str(delay)], cwd=ROOT,
                               stdout=subprocess.PIPE, text=True, env=base_env())
    try:
        line = process.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"bench fake server did not start: {line!r}")
        yield f"http://127.0.0.1:{int(line.split()[1])}/v1"
    finally:
        process.kill()
        process.wait()


def main() -> None:
    Handler.delay = float(sys.argv[1])
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
