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
import time

from tests.fakes import openai_server
from tests.fakes.openai_server import pieces
from tests.harness import fake_openai

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


def serve(delay: float):
    """Run this server in its own process; yields its base URL."""
    return fake_openai(delay, module="tests.bench.fake_llm")


if __name__ == "__main__":
    openai_server.main(Handler)
