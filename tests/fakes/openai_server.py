"""A local HTTP server speaking OpenAI's chat-completions wire format (SSE and JSON).

Run as a real process: `python -m tests.fakes.openai_server` prints `PORT <n>`.
The reply is a pure function of the last user message, so tests know exactly
what text must arrive:  "Echo: <message>. Done <e>smile</e> here."
"""

from __future__ import annotations

import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def reply_for(user_text: str) -> str:
    return f"Echo: {user_text}. Done <e>smile</e> here."


def pieces(text: str) -> list[str]:
    """Split like a tokenizer would: short pieces, a tag cut in the middle."""
    return [text[index:index + 3] for index in range(0, len(text), 3)]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    delay = 0.0
    arrival = 0.0
    """When the request being answered arrived (time.monotonic)."""

    def log_message(self, *args: object) -> None:
        """Quiet: tests read the pipeline's output, not this server's access log."""

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = json.loads(self.rfile.read(length))
        if not self.path.endswith("/chat/completions"):
            self._json(404, {"error": {"message": f"no route {self.path}"}})
            return
        if self.headers.get("Authorization") != "Bearer test-key":
            self._json(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}})
            return
        text = self.reply_text(body)
        if body.get("stream"):
            self._stream(body["model"], text)
        else:
            self._json(200, {"id": "cmpl-1", "object": "chat.completion", "created": int(time.time()),
                             "model": body["model"],
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": text}}],
                             "usage": {"prompt_tokens": 5, "completion_tokens": len(pieces(text)),
                                       "total_tokens": 5 + len(pieces(text))}})

    def reply_text(self, body: dict) -> str:
        """The reply to a request `body`: `reply_for` its last user message's last line."""
        user = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
        return reply_for(user.split("\n")[-1])

    def pace(self, index: int, count: int) -> None:
        """Wait before SSE event `index` of `count` (the role event, the content pieces, the stop):
        this server sends each at once and pauses `delay` after it; a subclass may keep a schedule."""

    def _json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, model: str, text: str) -> None:
        self.arrival = time.monotonic()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        base = {"id": "cmpl-1", "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
        events = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None}]}]
        events += [{**base, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                   for piece in pieces(text)]
        events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        try:
            for index, event in enumerate(events):
                self.pace(index, len(events))
                self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                self.wfile.flush()
                if self.delay:
                    time.sleep(self.delay)
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.close_connection = True


def main(handler: type[Handler] = Handler) -> None:
    """Serve on a free port, print `PORT <n>`; argv[1] is the pause after each SSE event."""
    handler.delay = float(sys.argv[1]) if len(sys.argv) > 1 else 0.0
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.socket.listen(1024)  # not socketserver's 5: a SYN the full backlog drops is retried only after 1 s
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
