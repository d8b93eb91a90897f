"""The history stage shell: stores requests and replies, answers context queries."""

from __future__ import annotations

import os
from pathlib import Path

from ..protocol import Message
from ..runtime import Stage
from .store import HistoryStore


def default_db_path(configured: str = "") -> Path:
    """history.db_path, else $XDG_DATA_HOME/voxpipe/history.db."""
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "voxpipe" / "history.db"


class HistoryStage(Stage):
    name = "history"
    kinds = ("request", "llm.done", "context.query")

    def prepare(self) -> None:
        self.store = HistoryStore(default_db_path(self.config["history"]["db_path"]))

    def handle(self, message: Message) -> None:
        if message.kind == "request":
            row = self.store.add_message(message.session, message.id, "user", message["text"], message.ts)
            self.bus.publish("history.saved", message.session, message.id, role="user", message_id=row)
        elif message.kind == "llm.done":
            row = self.store.add_message(
                message.session, message.id, "assistant", message["text"], message.ts,
                status=message["status"], error=message["error"], provider=message["provider"],
                model=message["model"], metrics=message["metrics"])
            self.bus.publish("history.saved", message.session, message.id, role="assistant", message_id=row)
        elif message.kind == "context.query":
            turns = self.store.context(message.session, message["limit"], exclude_request=message.id)
            self.bus.publish("context", message.session, message.id, messages=turns)

    def shutdown(self) -> None:
        self.store.close()
