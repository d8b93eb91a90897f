"""The history store: sessions and messages in SQLite (WAL), with versioned migrations.

Pure storage, no bus (of the protocol it knows only the records it stores and gives back: `command`
events and the `ChatMessage` turns of a context): the stage shell and the `voxpipe history` CLI share it.

The database holds conversations, so it is private (services/files.py): its directory is made 0700
and the database 0600, which SQLite's -wal and -shm files inherit. What the model and imports put in
it is untrusted and bounded: memories per persona (MEMORY_LIMIT, MEMORY_CHARS), variables (names,
finite values in VARIABLE_RANGE), an import's messages (each checked before any is written).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import sqlite3
import stat
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from ...config import ConfigError
from ...files import OTHERS_WRITE, PRIVATE_DIR, PRIVATE_FILE, exposure, private_dirs, warn_if_open
from ...protocol import SESSION_PATTERN, ChatMessage, Command
from ...protocol.kinds import REPLY
from ...runtime.curve import check_private_file
from .commands import PRIORITIES

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
VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,31}")
"""A variable's name: a word, since the system prompt shows it ("Your current state: boredom 50")."""
MAX_VARIABLES = 32
"""Variables per persona an import may set (the three attitude variables and the file's others)."""
MEMORY_LIMIT = 100
"""Memories a persona keeps; past it (or past MEMORY_CHARS) the lowest-priority, oldest ones go."""
MEMORY_CHARS = 32_000
"""The characters of memory text a persona keeps: about 8k tokens of every prompt at most."""
MEMORY_BYTES = 256 * 1024
"""The memory block of a context, in UTF-8: what MEMORY_CHARS renders to, quoted, in any script,
fits; only a database written before the caps existed can be trimmed by it."""
CONTEXT_BYTES = 1024 * 1024
"""The text of a context reply (its turns and its memory block, in UTF-8): a quarter of a frame
(protocol.MAX_MESSAGE_BYTES), so the reply fits with its envelope whatever the database holds."""
IMPORT_PREFIX = "import-"
"""The request id of an imported message: `import-` and its position in the file."""
DAY_FIRST_FORMATS = ("%d.%m.%Y %H:%M:%S", "%d.%m.%Y %H:%M")
"""Companion times besides ISO 8601: the day-first dates that Russian locales write."""


log = logging.getLogger("voxpipe.history")


class MemoryRefused(ValueError):
    """A memory command that stores nothing; the text says why, for the command's refusal."""


class HistoryStore:
    """One SQLite database; every write is its own transaction so a crash loses nothing committed
    (several writes that belong together share one: `transaction()`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        _make_private(self.path)
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

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Writes that are stored together or not at all: committed when the block ends, rolled back if
        it raises. Inside another transaction it is part of that one, undone alone if it raises."""
        if self.db.in_transaction:  # a savepoint: this part alone is undone if it raises
            self.db.execute("SAVEPOINT part")
            try:
                yield
            except BaseException:
                self.db.execute("ROLLBACK TO part")
                raise
            finally:
                self.db.execute("RELEASE part")
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.rollback()
            raise
        self.db.commit()

    def add_message(self, session: str, request_id: str, role: str, content: str, ts: float, *,
                    status: str = "ok", error: str = "", provider: str = "", model: str = "",
                    metrics: Mapping[str, float] | None = None, reasoning: str = "",
                    interrupted: bool = False, shown: str | None = None) -> int:
        """Store one message; a repeat of the same (session, request, role) replaces it. `shown`: a
        reply's display text (None keeps what is stored)."""
        with self.transaction():
            self.db.execute("INSERT OR IGNORE INTO sessions(id, created) VALUES (?, ?)", (session, ts))
            cursor = self.db.execute(
                "INSERT INTO messages(session, request_id, role, content, status, error, provider, model,"
                " metrics, ts, reasoning, interrupted, shown) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT(session, request_id, role) DO UPDATE SET content=excluded.content,"
                " status=excluded.status, error=excluded.error, provider=excluded.provider,"
                " model=excluded.model, metrics=excluded.metrics, ts=excluded.ts,"
                " reasoning=excluded.reasoning, interrupted=MAX(interrupted, excluded.interrupted),"
                " shown=COALESCE(excluded.shown, shown) RETURNING id",
                (session, request_id, role, content, status, error, provider, model,
                 json.dumps(dict(metrics or {})), ts, reasoning, int(interrupted), shown))
            return int(cursor.fetchone()[0])

    def set_spoken(self, session: str, request_id: str, spoken: str, interrupted: bool) -> None:
        """What the user actually heard; an interrupted reply's next context uses it."""
        with self.transaction():
            self.db.execute("UPDATE messages SET spoken=?, interrupted=MAX(interrupted, ?) WHERE session=?"
                            " AND request_id=? AND role='assistant'", (spoken, int(interrupted), session, request_id))

    def add_metrics(self, session: str, request_id: str, metrics: Mapping[str, Any]) -> None:
        """Merge a reply's pipeline timeline into its stored metrics."""
        with self.transaction():
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
        with self.transaction():
            self.db.execute("DELETE FROM commands WHERE message_id=?", (message_id,))
            self.db.executemany(
                "INSERT INTO commands(message_id, position, name, args, accepted, reason, chunk, offset)"
                " VALUES (?,?,?,?,?,?,?,?)",
                [(message_id, number, c.name, json.dumps(list(c.args), ensure_ascii=False), int(c.accepted),
                  c.reason, c.chunk, c.offset) for number, c in enumerate(commands)])

    def commands(self, message_id: int) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM commands WHERE message_id=? ORDER BY position", (message_id,))
        return [{**dict(row), "args": json.loads(row["args"]), "accepted": bool(row["accepted"])} for row in rows]

    def context(self, session: str, limit: int, exclude_request: str = "",
                budget: int = CONTEXT_BYTES) -> list[ChatMessage]:
        """The last `limit` turns of a session for the next prompt, oldest first, each reply after its request.

        What each exchange contributes:
        - a reply that ended in an error before any text contributes nothing, and neither does its
          request: the model never answered it, and a user who asks again must not have the question
          sent twice (or once per failed attempt);
        - an interrupted reply contributes what the user heard, not what was generated, and its
          request stays (nothing heard: the request alone);
        - a reply that failed after some text keeps that text, which the user saw.

        The turns fit `budget` bytes of UTF-8 and the protocol's limit of a turn by construction, so a
        context is never refused for its size: the oldest turns are left out first, and a newest turn
        too long on its own is cut (its start kept). Rows are read newest first and no further than
        the budget reaches.
        """
        rows = self.db.execute(
            "SELECT role, text FROM (SELECT role, MIN(id) OVER (PARTITION BY request_id) AS turn,"
            " CASE WHEN interrupted AND spoken IS NOT NULL THEN spoken ELSE content END AS text"
            " FROM messages m WHERE session=? AND request_id<>? AND NOT EXISTS (SELECT 1 FROM messages f"
            " WHERE f.session=m.session AND f.request_id=m.request_id AND f.role='assistant'"
            " AND f.status='error' AND f.content=''))"
            " WHERE text<>'' ORDER BY turn DESC, role='user' LIMIT ?",
            (session, exclude_request, limit))
        turns: list[ChatMessage] = []
        for row in rows:
            text = _clip(row["text"], budget)
            if not text or (turns and text != row["text"]):
                break
            budget -= len(text.encode())
            turns.append(ChatMessage(role=row["role"], content=text))
        return turns[::-1]

    # --- memory and variables, per persona ---------------------------------------------------

    def add_memory(self, persona: str, priority: str, text: str, ts: float) -> int:
        """Store a memory, its text and priority made one line (one_line); the persona's memory then
        keeps to its caps (_evict). Raises MemoryRefused, storing nothing, when the text is empty
        once made one line, or when the new memory would be the one to go."""
        text = _memory_text(text)
        with self.transaction():
            cursor = self.db.execute("INSERT INTO memories(persona, priority, text, created, updated)"
                                     " VALUES (?,?,?,?,?)", (persona, one_line(priority).lower(), text, ts, ts))
            row_id = cursor.lastrowid
            assert row_id is not None, "sqlite sets lastrowid on every INSERT"
            if row_id in self._evict(persona):
                raise MemoryRefused(_FULL)
        return row_id

    def edit_memory(self, persona: str, memory_id: int, priority: str, text: str, ts: float) -> None:
        """Change a memory as add_memory stores one; raises MemoryRefused, changing nothing, when there
        is no such memory, the text is empty, or the changed memory would be the one to go."""
        text = _memory_text(text)
        with self.transaction():
            cursor = self.db.execute("UPDATE memories SET priority=?, text=?, updated=? WHERE persona=? AND id=?",
                                     (one_line(priority).lower(), text, ts, persona, memory_id))
            if cursor.rowcount == 0:
                raise MemoryRefused(f"there is no memory {memory_id}")
            if memory_id in self._evict(persona):
                raise MemoryRefused(_FULL)

    def delete_memories(self, persona: str, ids: list[int]) -> int:
        with self.transaction():
            cursor = self.db.executemany("DELETE FROM memories WHERE persona=? AND id=?",
                                         [(persona, memory_id) for memory_id in ids])
            return cursor.rowcount

    def memories(self, persona: str) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM memories WHERE persona=? ORDER BY id", (persona,))
        return [dict(row) for row in rows]

    def _ranked(self, persona: str) -> list[sqlite3.Row]:
        """The persona's memories in the order they are kept: higher priority first, then the newest
        (last stored or changed) first. The cap and the context both keep from the front."""
        return self.db.execute(f"SELECT * FROM memories WHERE persona=? ORDER BY {_PRIORITY_RANK} DESC,"
                               " updated DESC, id DESC", (persona,)).fetchall()

    def _evict(self, persona: str) -> set[int]:
        """Delete the memories past the caps, MEMORY_LIMIT memories and MEMORY_CHARS characters of text,
        the lowest-priority and oldest first; returns their ids. A memory too long for the room left is
        passed over for shorter ones behind it, so a cap costs no more memories than it must."""
        ranked = self._ranked(persona)
        kept = {row["id"] for row in _keep(ranked, MEMORY_LIMIT, MEMORY_CHARS, lambda row: len(row["text"]))}
        evicted = [row["id"] for row in ranked if row["id"] not in kept]
        if evicted:
            self.db.executemany("DELETE FROM memories WHERE id=?", [(memory_id,) for memory_id in evicted])
            log.debug("persona %s: memory full, forgot %d memories (lowest priority, oldest): %s",
                      persona, len(evicted), evicted[:20])
        return set(evicted)

    def memory_block(self, persona: str, budget: int = MEMORY_BYTES) -> str:
        """The memories as the model sees them, one line each, `N. [priority] "text"`: the numbers are
        what `#memory`/`-memory` refer to; the text is one line, quoted, so no memory can pose as
        another item or as an instruction of the prompt around it. At most `budget` bytes (UTF-8), kept
        in the cap's order, so a database that holds more than the caps allow still fits a context."""
        lines = {row["id"]: f"{row['id']}. [{one_line(row['priority'])}] "
                 f"{json.dumps(one_line(row['text']), ensure_ascii=False)}" for row in self._ranked(persona)}
        kept = _keep(list(lines.items()), len(lines), budget, lambda item: len(item[1].encode()) + 1)
        return "\n".join(line for _, line in sorted(kept))

    def variables(self, persona: str) -> dict[str, float]:
        """The persona's variables, each a name (VARIABLE_NAME) and a finite number in VARIABLE_RANGE:
        rows a database written before those checks holds otherwise are left out or clamped, so a
        context or an export is never refused for them."""
        values = dict.fromkeys(ATTITUDE_VARIABLES, VARIABLE_DEFAULT)
        low, high = VARIABLE_RANGE
        rows = self.db.execute("SELECT name, value FROM variables WHERE persona=? ORDER BY name", (persona,))
        for name, value in rows:
            if VARIABLE_NAME.fullmatch(name) and isinstance(value, (int, float)) and math.isfinite(value) \
                    and (name in values or len(values) < MAX_VARIABLES):
                values[name] = min(high, max(low, float(value)))
        return values

    def set_variables(self, persona: str, values: Mapping[str, float]) -> None:
        with self.transaction():
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

    def import_companion(self, session: str, persona: str, data: Any, ts: float) -> int:
        """Load `{"fixed_parts", "messages": [{role, content, time}], "temp_context", "variables"}`.

        Each message keeps the file's `time` (a message without one gets `ts`, the import time).
        The whole file is checked before anything is written (_checked_import), and written in one
        transaction: a bad file changes nothing, and the error names the place in it.
        """
        rows, meta, variables = _checked_import(session, data, ts)
        with self.transaction():
            self.db.execute("INSERT INTO sessions(id, created, meta) VALUES (?,?,?) ON CONFLICT(id) DO UPDATE"
                            " SET meta=excluded.meta", (session, min((row[4] for row in rows), default=ts),
                                                        json.dumps(meta, ensure_ascii=False)))
            self.db.executemany(
                "INSERT INTO messages(session, request_id, role, content, ts, meta) VALUES (?,?,?,?,?,?)"
                " ON CONFLICT(session, request_id, role) DO UPDATE SET content=excluded.content,"
                " ts=excluded.ts, meta=excluded.meta", rows)
            self.set_variables(persona, variables)
        return len(rows)

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
        with self.transaction():
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


def _make_private(path: Path) -> None:
    """Make the database's directory (0700) and the database (0600) if they are new, then check them
    (check_database)."""
    private_dirs(path.parent)
    check_database(path)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, PRIVATE_FILE))


def check_database(path: Path) -> None:
    """Refuse (ConfigError, with the fix) what other users could read or swap: a database, -wal or
    -shm file that is not the user's or is open to others, and a directory others may write to (they
    could plant a -wal file of their own before SQLite makes one). A directory others may only read
    gets a warning: the files in it are still private. Nothing is deleted or changed; the user
    decides. Also a check to run before any stage starts: it creates nothing."""
    directory = path.parent
    with contextlib.suppress(FileNotFoundError):
        info = directory.stat()
        if exposure(directory, info, OTHERS_WRITE, PRIVATE_DIR) is not None:
            raise ConfigError(f"history database directory {directory} (owner uid {info.st_uid}, mode "
                              f"{stat.S_IMODE(info.st_mode):o}) lets other users replace or plant files in it; "
                              f"use a directory of your own. Run: chown {os.getuid()} {directory}; "
                              f"chmod 700 {directory}")
        warn_if_open(directory, log, "history database directory")
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if file.exists():  # SQLite makes the -wal and -shm files when it first writes
            check_private_file(file, "history database file")


def one_line(text: str) -> str:
    """`text` as one line: line breaks and other whitespace runs become one space, other control
    characters go. What a model puts in a memory reaches every later system prompt, where a line
    break would let it start a line of its own (`2. [critical] SYSTEM: ...`)."""
    return " ".join("".join(char for char in text if char.isspace() or unicodedata.category(char) != "Cc").split())


def _memory_text(text: str) -> str:
    """A memory's text as stored (one_line); MemoryRefused when nothing is left."""
    text = one_line(text)
    if not text:
        raise MemoryRefused("the text is empty once line breaks and control characters are removed")
    return text


_FULL = (f"the memory is full ({MEMORY_LIMIT} memories, {MEMORY_CHARS} characters) of memories of higher "
         f"priority or newer; it keeps the highest priority, then the newest")
_PRIORITY_RANK = ("CASE priority " + " ".join(f"WHEN '{name}' THEN {rank}" for rank, name in enumerate(PRIORITIES))
                  + " ELSE -1 END")
"""A memory's priority as a number (an unknown one, from a commands file, ranks lowest)."""


T = TypeVar("T")


def _keep(ranked: Iterable[T], limit: int, budget: int, size: Callable[[T], int]) -> list[T]:
    """The items of `ranked` kept, in order, when at most `limit` items of `budget` in all may stay:
    each one that still fits, an item too big for the room left passed over for smaller ones after it."""
    kept: list[T] = []
    for item in ranked:
        if len(kept) >= limit:
            break
        if size(item) <= budget:
            kept.append(item)
            budget -= size(item)
    return kept


def _clip(text: str, size: int) -> str:
    """`text` cut to at most REPLY characters (a context turn's limit) and `size` bytes of UTF-8,
    at a character boundary."""
    text = text[:REPLY]
    encoded = text.encode()
    return text if len(encoded) <= size else encoded[:max(size, 0)].decode(errors="ignore")


# --- checking an import -------------------------------------------------------------------

def _checked_import(session: str, data: Any, ts: float) -> tuple[list[tuple[Any, ...]], dict[str, Any],
                                                                  dict[str, float]]:
    """The rows, session meta and variables of a companion file, or ValueError naming the first
    problem by its place in the file (`messages[3].role`) and the fix."""
    if not SESSION_PATTERN.fullmatch(session) or not session:
        raise ValueError(f"session name {session[:80]!r} is not 1-64 of A-Z a-z 0-9 _ . : @ -; "
                         f"choose one with --session NAME")
    if not isinstance(data, dict):
        raise ValueError(f"the file holds a JSON {_json_type(data)}; a companion history is an object: "
                         f'{{"messages": [{{"role": "user", "content": "..."}}], "variables": {{}}, ...}}')
    where = _non_finite(data)
    if where:
        raise ValueError(f"{where} is NaN or Infinity, which JSON has no place for; make it a number")
    messages = data.get("messages")
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list of {{\"role\", \"content\", \"time\"}} objects, "
                         f"got {_json_type(messages)}")
    rows = []
    for number, message in enumerate(messages):
        where = f"messages[{number}]"
        if not isinstance(message, dict):
            raise ValueError(f"{where} must be an object with role and content, got {_json_type(message)}")
        if message.get("role") not in ("user", "assistant"):
            raise ValueError(f'{where}.role must be "user" or "assistant", got {_shown(message.get("role"))}')
        content = message.get("content")
        if not isinstance(content, str):
            raise ValueError(f"{where}.content must be a string, got {_json_type(content)}")
        if len(content) > REPLY:
            raise ValueError(f"{where}.content is {len(content)} characters; a message holds at most {REPLY}")
        extra = {key: value for key, value in message.items() if key not in ("role", "content")}
        stamp = _parse_time(f"{where}.time", message["time"]) if "time" in message else ts + number * 1e-3
        rows.append((session, f"{IMPORT_PREFIX}{number:06d}", message["role"], content, stamp,
                     json.dumps(extra, ensure_ascii=False)))
    meta = {key: data.get(key, []) for key in ("fixed_parts", "temp_context")}
    return rows, meta, _checked_variables(data.get("variables"))


def _checked_variables(value: Any) -> dict[str, float]:
    """An import's `variables`: at most MAX_VARIABLES, each a word and a number in VARIABLE_RANGE."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f'variables must be an object like {{"attitude": 60}}, got {_json_type(value)}')
    if len(value) > MAX_VARIABLES:
        raise ValueError(f"variables has {len(value)} entries; at most {MAX_VARIABLES}")
    low, high = VARIABLE_RANGE
    for name, number in value.items():
        if not VARIABLE_NAME.fullmatch(name):
            raise ValueError(f"variables: the name {_shown(name)} is not a word (a letter or _, then up to 31 "
                             f"letters, digits or _)")
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not low <= number <= high:
            raise ValueError(f"variables.{name} is {_shown(number)}; a variable is a number from {low:g} to {high:g}")
    return {name: float(number) for name, number in value.items()}


def _non_finite(data: Any) -> str | None:
    """Where the first NaN or ±Infinity of a parsed JSON document is (Python's json reads them),
    walked without recursion so that no nesting depth can overflow the stack."""
    stack: list[tuple[str, Any]] = [("the file", data)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return where
        if isinstance(value, dict):
            stack.extend(reversed([(_member(where, key), item) for key, item in value.items()]))
        elif isinstance(value, list):
            stack.extend(reversed([(f"{where}[{index}]", item) for index, item in enumerate(value)]))
    return None


def _member(where: str, key: str) -> str:
    """The place of `key` in the object at `where`: `messages[3].time`, `variables["a b"]`."""
    prefix = "" if where == "the file" else where
    if re.fullmatch(r"[A-Za-z_]\w{0,63}", key):
        return f"{prefix}.{key}" if prefix else key
    return f"{prefix}[{json.dumps(key[:64], ensure_ascii=False)}]"


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for an error about it."""
    for kind, name in ((bool, "boolean"), (dict, "object"), (list, "array"), (str, "string"), ((int, float), "number")):
        if isinstance(value, kind):
            return name
    return "null"


def _shown(value: Any) -> str:
    """A value as an error quotes it: its start, so a huge one makes a short message."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:40] + "…"


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _parse_time(where: str, value: Any) -> float:
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
        raise ValueError(f"{where} {_shown(value)} is not a date like \"2024-05-01 12:00:00\" or "
                         f"\"01.05.2024 12:00\"; correct it, or delete the \"time\" field to give the message "
                         f"the time of import") from None
