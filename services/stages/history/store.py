"""The history store: sessions and messages in SQLite (WAL), with versioned migrations.

Pure storage, no bus (of the protocol it knows only the records it stores and gives back: `command`
events and the `ChatMessage` turns of a context): the stage shell and the `voxpipe history` CLI share it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from ...protocol import ChatMessage, Command

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
    """
    ALTER TABLE messages ADD COLUMN shown TEXT;
    ALTER TABLE messages ADD COLUMN spoken TEXT;
    ALTER TABLE messages ADD COLUMN interrupted INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE messages ADD COLUMN reasoning TEXT NOT NULL DEFAULT '';
    CREATE TABLE commands (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        name TEXT NOT NULL,
        args TEXT NOT NULL,
        accepted INTEGER NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        chunk INTEGER NOT NULL DEFAULT -1,
        offset INTEGER NOT NULL DEFAULT -1
    );
    CREATE INDEX commands_by_message ON commands(message_id, position);
    CREATE TABLE memories (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        persona TEXT NOT NULL,
        priority TEXT NOT NULL,
        text TEXT NOT NULL,
        created REAL NOT NULL,
        updated REAL NOT NULL
    );
    CREATE TABLE variables (
        persona TEXT NOT NULL,
        name TEXT NOT NULL,
        value REAL NOT NULL,
        PRIMARY KEY (persona, name)
    );
    """,
    """
    ALTER TABLE sessions ADD COLUMN meta TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE messages ADD COLUMN meta TEXT NOT NULL DEFAULT '{}';
    """,
)
VARIABLE_DEFAULT = 50.0
VARIABLE_RANGE = (0.0, 100.0)
ATTITUDE_VARIABLES = ("attitude", "boredom", "stress")
"""What `<p>attitude,boredom,stress</p>` changes, in that order, clamped to VARIABLE_RANGE."""
IMPORT_PREFIX = "import-"
"""The request id of an imported message: `import-` and its position in the file."""
DAY_FIRST_FORMATS = ("%d.%m.%Y %H:%M:%S", "%d.%m.%Y %H:%M")
"""Companion times besides ISO 8601: the day-first dates that Russian locales write."""


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
        self.db.execute("PRAGMA foreign_keys=ON")
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
                    metrics: Mapping[str, float] | None = None, reasoning: str = "",
                    interrupted: bool = False) -> int:
        """Store one message; a repeat of the same (session, request, role) replaces it."""
        with self.db:
            self.db.execute("INSERT OR IGNORE INTO sessions(id, created) VALUES (?, ?)", (session, ts))
            cursor = self.db.execute(
                "INSERT INTO messages(session, request_id, role, content, status, error, provider, model,"
                " metrics, ts, reasoning, interrupted) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT(session, request_id, role) DO UPDATE SET content=excluded.content,"
                " status=excluded.status, error=excluded.error, provider=excluded.provider,"
                " model=excluded.model, metrics=excluded.metrics, ts=excluded.ts,"
                " reasoning=excluded.reasoning, interrupted=MAX(interrupted, excluded.interrupted) RETURNING id",
                (session, request_id, role, content, status, error, provider, model,
                 json.dumps(dict(metrics or {})), ts, reasoning, int(interrupted)))
            return int(cursor.fetchone()[0])

    def set_shown(self, session: str, request_id: str, shown: str) -> None:
        with self.db:
            self.db.execute("UPDATE messages SET shown=? WHERE session=? AND request_id=? AND role='assistant'",
                            (shown, session, request_id))

    def set_spoken(self, session: str, request_id: str, spoken: str, interrupted: bool) -> None:
        """What the user actually heard; an interrupted reply's next context uses it."""
        with self.db:
            self.db.execute("UPDATE messages SET spoken=?, interrupted=MAX(interrupted, ?) WHERE session=?"
                            " AND request_id=? AND role='assistant'", (spoken, int(interrupted), session, request_id))

    def add_metrics(self, session: str, request_id: str, metrics: Mapping[str, Any]) -> None:
        """Merge a reply's pipeline timeline into its stored metrics."""
        with self.db:
            row = self.db.execute("SELECT id, metrics FROM messages WHERE session=? AND request_id=?"
                                  " AND role='assistant'", (session, request_id)).fetchone()
            if row is not None:
                merged = {**json.loads(row["metrics"]), **metrics}
                self.db.execute("UPDATE messages SET metrics=? WHERE id=?", (json.dumps(merged), row["id"]))

    def recent_metrics(self, limit: int) -> list[dict[str, Any]]:
        """The metrics of the last `limit` replies that have a pipeline timeline."""
        rows = self.db.execute("SELECT metrics FROM messages WHERE role='assistant' AND metrics LIKE '%first_chunk_ms%'"
                               " ORDER BY id DESC LIMIT ?", (limit,))
        return [json.loads(row["metrics"]) for row in rows]

    def add_commands(self, message_id: int, commands: Sequence[Command]) -> None:
        """A reply's `command` events, in order, as the stage published them (replacing earlier ones)."""
        with self.db:
            self.db.execute("DELETE FROM commands WHERE message_id=?", (message_id,))
            self.db.executemany(
                "INSERT INTO commands(message_id, position, name, args, accepted, reason, chunk, offset)"
                " VALUES (?,?,?,?,?,?,?,?)",
                [(message_id, number, c.name, json.dumps(list(c.args), ensure_ascii=False), int(c.accepted),
                  c.reason, c.chunk, c.offset) for number, c in enumerate(commands)])

    def commands(self, message_id: int) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM commands WHERE message_id=? ORDER BY position", (message_id,))
        return [{**dict(row), "args": json.loads(row["args"]), "accepted": bool(row["accepted"])} for row in rows]

    def context(self, session: str, limit: int, exclude_request: str = "") -> list[ChatMessage]:
        """The last `limit` turns of a session for the next prompt, oldest first, each reply after its request.

        What each exchange contributes:
        - a reply that ended in an error before any text contributes nothing, and neither does its
          request: the model never answered it, and a user who asks again must not have the question
          sent twice (or once per failed attempt);
        - an interrupted reply contributes what the user heard, not what was generated, and its
          request stays (nothing heard: the request alone);
        - a reply that failed after some text keeps that text, which the user saw.
        """
        rows = self.db.execute(
            "SELECT role, text FROM (SELECT role, MIN(id) OVER (PARTITION BY request_id) AS turn,"
            " CASE WHEN interrupted AND spoken IS NOT NULL THEN spoken ELSE content END AS text"
            " FROM messages m WHERE session=? AND request_id<>? AND NOT EXISTS (SELECT 1 FROM messages f"
            " WHERE f.session=m.session AND f.request_id=m.request_id AND f.role='assistant'"
            " AND f.status='error' AND f.content=''))"
            " WHERE text<>'' ORDER BY turn DESC, role='user' LIMIT ?",
            (session, exclude_request, limit)).fetchall()
        return [ChatMessage(role=row["role"], content=row["text"]) for row in reversed(rows)]

    # --- memory and variables, per persona ---------------------------------------------------

    def add_memory(self, persona: str, priority: str, text: str, ts: float) -> int:
        with self.db:
            cursor = self.db.execute("INSERT INTO memories(persona, priority, text, created, updated)"
                                     " VALUES (?,?,?,?,?)", (persona, priority, text, ts, ts))
            row_id = cursor.lastrowid
            assert row_id is not None, "sqlite sets lastrowid on every INSERT"
            return row_id

    def edit_memory(self, persona: str, memory_id: int, priority: str, text: str, ts: float) -> bool:
        with self.db:
            cursor = self.db.execute("UPDATE memories SET priority=?, text=?, updated=? WHERE persona=? AND id=?",
                                     (priority, text, ts, persona, memory_id))
            return cursor.rowcount > 0

    def delete_memories(self, persona: str, ids: list[int]) -> int:
        with self.db:
            cursor = self.db.executemany("DELETE FROM memories WHERE persona=? AND id=?",
                                         [(persona, memory_id) for memory_id in ids])
            return cursor.rowcount

    def memories(self, persona: str) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM memories WHERE persona=? ORDER BY id", (persona,))
        return [dict(row) for row in rows]

    def memory_block(self, persona: str) -> str:
        """The memories as the model sees them; the numbers are what `#memory`/`-memory` refer to."""
        return "\n".join(f"{m['id']}. [{m['priority']}] {m['text']}" for m in self.memories(persona))

    def variables(self, persona: str) -> dict[str, float]:
        values = dict.fromkeys(ATTITUDE_VARIABLES, VARIABLE_DEFAULT)
        rows = self.db.execute("SELECT name, value FROM variables WHERE persona=?", (persona,))
        values.update({row["name"]: row["value"] for row in rows})
        return values

    def set_variables(self, persona: str, values: Mapping[str, float]) -> None:
        with self.db:
            self.db.executemany("INSERT INTO variables(persona, name, value) VALUES (?,?,?)"
                                " ON CONFLICT(persona, name) DO UPDATE SET value=excluded.value",
                                [(persona, name, float(value)) for name, value in values.items()])

    def add_variable_deltas(self, persona: str, deltas: Mapping[str, float]) -> dict[str, float]:
        low, high = VARIABLE_RANGE
        current = self.variables(persona)
        updated = {name: min(high, max(low, current.get(name, VARIABLE_DEFAULT) + delta))
                   for name, delta in deltas.items()}
        self.set_variables(persona, updated)
        return {**current, **updated}

    # --- import and export in the companion app's format ---------------------------------------

    def import_companion(self, session: str, persona: str, data: Mapping[str, Any], ts: float) -> int:
        """Load `{"fixed_parts", "messages": [{role, content, time}], "temp_context", "variables"}`.

        Each message keeps the file's `time` (a message without one gets `ts`, the import time).
        The whole file is checked before anything is written, and written in one transaction:
        a bad file changes nothing.
        """
        messages = data.get("messages")
        if not isinstance(messages, list):
            raise ValueError("not a companion history: it needs a \"messages\" list")
        rows = []
        for number, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ("user", "assistant") \
                    or not isinstance(message.get("content"), str):
                raise ValueError(f"message {number}: needs role user|assistant and a string content")
            extra = {key: value for key, value in message.items() if key not in ("role", "content")}
            stamp = _parse_time(number, message["time"]) if "time" in message else ts + number * 1e-3
            rows.append((session, f"{IMPORT_PREFIX}{number:06d}", message["role"], message["content"], stamp,
                         json.dumps(extra, ensure_ascii=False)))
        meta = {key: data.get(key, []) for key in ("fixed_parts", "temp_context")}
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("INSERT INTO sessions(id, created, meta) VALUES (?,?,?) ON CONFLICT(id) DO UPDATE"
                            " SET meta=excluded.meta", (session, min((row[4] for row in rows), default=ts),
                                                        json.dumps(meta, ensure_ascii=False)))
            self.db.executemany(
                "INSERT INTO messages(session, request_id, role, content, ts, meta) VALUES (?,?,?,?,?,?)"
                " ON CONFLICT(session, request_id, role) DO UPDATE SET content=excluded.content,"
                " ts=excluded.ts, meta=excluded.meta", rows)
        variables = {name: value for name, value in (data.get("variables") or {}).items()
                     if isinstance(value, (int, float)) and not isinstance(value, bool)}
        if variables:
            self.set_variables(persona, variables)
        return len(messages)

    def export_companion(self, session: str, persona: str) -> dict[str, Any]:
        row = self.db.execute("SELECT meta FROM sessions WHERE id=?", (session,)).fetchone()
        if row is None:
            raise KeyError(session)
        meta = json.loads(row["meta"])
        messages = []
        for message in self.messages(session):
            extra = json.loads(message["meta"])
            content = message["content"]
            messages.append({"role": message["role"], "content": content,
                             "time": extra.pop("time", _iso(message["ts"])), **extra})
        return {"fixed_parts": meta.get("fixed_parts", []), "messages": messages,
                "temp_context": meta.get("temp_context", []), "variables": self.variables(persona)}

    def clear(self, session: str) -> int:
        with self.db:
            cursor = self.db.execute("DELETE FROM messages WHERE session=?", (session,))
            self.db.execute("DELETE FROM sessions WHERE id=?", (session,))
            return cursor.rowcount

    def has_reply(self, session: str, request_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM messages WHERE session=? AND request_id=? AND role='assistant'",
                               (session, request_id)).fetchone() is not None

    def last_ts(self) -> float:
        """The newest time of a message that went through llm (0 when none): where a catch-up replay starts.

        Imported messages are left out: their times come from a file and may lie anywhere.
        """
        row = self.db.execute("SELECT MAX(ts) FROM messages WHERE request_id NOT LIKE ?",
                              (IMPORT_PREFIX + "%",)).fetchone()
        return float(row[0] or 0.0)

    def messages(self, session: str) -> list[dict[str, Any]]:
        """A session's messages in conversation order: each request's message, then its reply.

        Storage order is not that order: after a barge-in the new request is stored before the
        interrupted reply it cut off.
        """
        rows = self.db.execute("SELECT * FROM messages WHERE session=?"
                               " ORDER BY MIN(id) OVER (PARTITION BY request_id), role<>'user'", (session,)).fetchall()
        return [{**dict(row), "metrics": json.loads(row["metrics"]), "interrupted": bool(row["interrupted"])}
                for row in rows]

    def sessions(self) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT s.id, s.created, COUNT(m.id) AS messages, MAX(m.ts) AS last FROM sessions s"
            " LEFT JOIN messages m ON m.session = s.id GROUP BY s.id ORDER BY last DESC").fetchall()
        return [dict(row) for row in rows]

    def integrity(self) -> str:
        return str(self.db.execute("PRAGMA integrity_check").fetchone()[0])

    def close(self) -> None:
        self.db.close()


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _parse_time(number: int, value: Any) -> float:
    """A companion message's `time` as epoch seconds; naive times are local, as `_iso` writes them."""
    text = value.strip() if isinstance(value, str) else ""
    for form in DAY_FIRST_FORMATS:
        try:
            return datetime.strptime(text, form).timestamp()
        except ValueError:
            continue
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ValueError(f"message {number}: time {value!r} is not a date like \"2024-05-01 12:00:00\" or "
                         f"\"01.05.2024 12:00\"; correct it, or delete the \"time\" field to give the message "
                         f"the time of import") from None
