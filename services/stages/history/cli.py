"""`voxpipe history list | show SESSION | export SESSION | import FILE | clear SESSION`.

Works on the SQLite store directly (WAL lets it run beside the history stage). What it prints of the
store is untrusted (model text, provider errors, imported names), so every field goes through
`printable`; an export written to a file is private (0600, new directories 0700).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...config import Config
from ...files import open_private, private_dirs
from ...frontends.terminal import printable, printable_json

if TYPE_CHECKING:
    from .store import HistoryStore

IMPORT_LIMIT = 16 * 1024 * 1024
"""The largest file `history import` reads: years of daily conversation, and still a few seconds and
a few hundred MB to check; a larger file is refused before it is parsed."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", help="sessions with their message counts")
    show = actions.add_parser("show", help="a session's messages, with commands and what was heard")
    show.add_argument("session")
    export = actions.add_parser("export", help="a session as JSON in the companion app's format")
    export.add_argument("session")
    export.add_argument("--out", help="write to this file instead of stdout")
    imported = actions.add_parser("import", help="load a companion-format JSON history file")
    imported.add_argument("file")
    imported.add_argument("--session", help="session to import into (default: the file name)")
    clear = actions.add_parser("clear", help="delete a session's messages")
    clear.add_argument("session")


def run(args: argparse.Namespace, config: Config) -> int:
    from .stage import default_db_path  # the store (sqlite3) only for this command: every process parses argv
    from .store import HistoryStore

    store = HistoryStore(default_db_path(config["history"]["db_path"]))
    persona = config["history"]["persona"]
    try:
        if args.action == "list":
            for row in store.sessions():
                last = time.strftime("%Y-%m-%d %H:%M", time.localtime(row["last"])) if row["last"] else "-"
                print(f"{printable(row['id'], one_line=True):<24} {row['messages']:>6} messages   last {last}")
        elif args.action == "show":
            return _show(store, args.session)
        elif args.action == "export":
            text = printable_json(store.export_companion(args.session, persona))
            if args.out:
                _write_private(Path(args.out), text + "\n")
            else:
                print(text)
        elif args.action == "import":
            data = _read_import(Path(args.file))
            session = args.session or Path(args.file).stem
            count = store.import_companion(session, persona, data, time.time())
            print(f"imported {count} messages into session {session}")
        elif args.action == "clear":
            print(f"deleted {store.clear(args.session)} messages of session {args.session}")
    except KeyError as exc:
        print(f"voxpipe: no session {exc.args[0]!r}; `voxpipe history list` shows them", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:  # the text may quote the file: printable
        print(f"voxpipe: {printable(str(exc), one_line=True)}", file=sys.stderr)
        return 2
    finally:
        store.close()
    return 0


def _show(store: HistoryStore, session: str) -> int:
    messages = store.messages(session)
    if not messages:
        print(f"voxpipe: no messages in session {session!r}", file=sys.stderr)
        return 1
    for message in messages:
        stamp = time.strftime("%H:%M:%S", time.localtime(message["ts"]))
        text = f": {printable(message['content'])}" if message["content"] else ""
        print(f"[{stamp}] {message['role']}{outcome(message)}{text}")
        if message["interrupted"] and message["spoken"] is not None:
            print(f"    heard: {printable(message['spoken'])}")
        for command in store.commands(message["id"]):
            mark = "✓" if command["accepted"] else f"refused: {command['reason']}"
            line = f"<{command['name']}> {', '.join(command['args'])}  {mark}"
            print(f"    {printable(line, one_line=True)}")
    return 0


def outcome(message: dict[str, Any]) -> str:
    """How a reply ended, each fact once: ` (error: <the stored reason>)`, ` (interrupted)`, or nothing.

    A reply cut off while generating has status `interrupted` and the interrupted flag; one cut off
    while speaking has the flag only. Either way it is one fact, said once.
    """
    facts = []
    if message["status"] not in ("ok", "interrupted"):
        error = printable(message["error"], one_line=True)
        facts.append(f"{message['status']}: {error}" if error else message["status"])
    if message["interrupted"] or message["status"] == "interrupted":
        facts.append("interrupted")
    return f" ({', '.join(facts)})" if facts else ""


def _read_import(path: Path) -> Any:
    """The parsed JSON of a file to import, read no further than IMPORT_LIMIT (a pipe or a device has
    no size to look at first); ValueError, naming the file and the fix, for anything else."""
    with open(path, "rb") as handle:
        raw = handle.read(IMPORT_LIMIT + 1)
    if len(raw) > IMPORT_LIMIT:
        raise ValueError(f"{path} is larger than {IMPORT_LIMIT // 2**20} MiB, the most `history import` reads; "
                         f"remove old messages from it, or split it into files imported as separate sessions "
                         f"(--session NAME)")
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    except RecursionError:
        raise ValueError(f"{path} nests arrays or objects too deeply to be a companion history") from None


def _write_private(path: Path, text: str) -> None:
    """Write an export readable by its owner alone, in directories made 0700 if they are new."""
    private_dirs(path.parent)
    with os.fdopen(open_private(path, os.O_WRONLY | os.O_TRUNC), "w", encoding="utf-8") as handle:
        handle.write(text)
