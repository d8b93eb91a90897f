"""The history store: sessions and messages in SQLite (WAL), with versioned migrations.

Pure storage, no bus: the stage shell and the `voxpipe history` CLI share it.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any, Mapping

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        created REAL NOT NULL
    );
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        session TEXT NOT NULL REFERENCES sessions(id),
        request_id TEXT NOT NULL,
        role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
        content TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'ok',
        error TEXT NOT NULL DEFAULT '',
        provider TEXT NOT NULL DEFAULT '',
        model TEXT NOT NULL DEFAULT '',
        metrics TEXT NOT NULL DEFAULT '{}',
        ts REAL NOT NULL,
        UNIQUE (session, request_id, role)
    );
    CREATE INDEX messages_by_session ON messages(session, id);
    """,
)


class HistoryStore:
    """One SQLite database; every write is its own transaction so a crash loses nothing committed."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA busy_timeout=5000")
        self._migrate()

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise RuntimeError(f"history database {self.path} has schema {version}, newer than this "
                               f"voxpipe ({len(MIGRATIONS)}); upgrade voxpipe")
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            self.db.executescript(f"BEGIN; {script}; PRAGMA user_version={number}; COMMIT;")

    def add_message(self, session: str, request_id: str, role: str, content: str, ts: float, *,
                    status: str = "ok", error: str = "", provider: str = "", model: str = "",
                    metrics: Mapping[str, float] | None = None) -> int:
        """Store one message; a repeat of the same (session, request, role) replaces it."""
        with self.db:
            self.db.execute("INSERT OR IGNORE INTO sessions(id, created) VALUES (?, ?)", (session, ts))
            cursor = self.db.execute(
                "INSERT INTO messages(session, request_id, role, content, status, error, provider, model,"
                " metrics, ts) VALUES (?,?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT(session, request_id, role) DO UPDATE SET content=excluded.content,"
                " status=excluded.status, error=excluded.error, provider=excluded.provider,"
                " model=excluded.model, metrics=excluded.metrics, ts=excluded.ts RETURNING id",
                (session, request_id, role, content, status, error, provider, model,
                 json.dumps(dict(metrics or {})), ts))
            return int(cursor.fetchone()[0])

    def context(self, session: str, limit: int, exclude_request: str = "") -> list[dict[str, str]]:
        """The last `limit` turns of a session, oldest first, for the next prompt."""
        rows = self.db.execute(
            "SELECT role, content FROM messages WHERE session=? AND request_id<>? AND content<>''"
            " ORDER BY id DESC LIMIT ?", (session, exclude_request, limit)).fetchall()
        return [{"role": row["role"], "content": row["content"]} for row in reversed(rows)]

    def messages(self, session: str) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM messages WHERE session=? ORDER BY id", (session,)).fetchall()
        return [{**dict(row), "metrics": json.loads(row["metrics"])} for row in rows]

    def sessions(self) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT s.id, s.created, COUNT(m.id) AS messages, MAX(m.ts) AS last FROM sessions s"
            " LEFT JOIN messages m ON m.session = s.id GROUP BY s.id ORDER BY last DESC").fetchall()
        return [dict(row) for row in rows]

    def integrity(self) -> str:
        return str(self.db.execute("PRAGMA integrity_check").fetchone()[0])

    def close(self) -> None:
        self.db.close()
