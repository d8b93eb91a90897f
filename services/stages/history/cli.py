"""`voxpipe history list | show SESSION | export SESSION | import FILE | clear SESSION`.

Works on the SQLite store directly (WAL lets it run beside the history stage).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ...config import Config
from .stage import default_db_path
from .store import HistoryStore


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
    store = HistoryStore(default_db_path(config["history"]["db_path"]))
    persona = config["history"]["persona"]
    try:
        if args.action == "list":
            for row in store.sessions():
                last = time.strftime("%Y-%m-%d %H:%M", time.localtime(row["last"])) if row["last"] else "-"
                print(f"{row['id']:<24} {row['messages']:>6} messages   last {last}")
        elif args.action == "show":
            return _show(store, args.session)
        elif args.action == "export":
            text = json.dumps(store.export_companion(args.session, persona), ensure_ascii=False, indent=2)
            if args.out:
                Path(args.out).write_text(text + "\n", encoding="utf-8")
            else:
                print(text)
        elif args.action == "import":
            data = json.loads(Path(args.file).read_text(encoding="utf-8"))
            session = args.session or Path(args.file).stem
            count = store.import_companion(session, persona, data, time.time())
            print(f"imported {count} messages into session {session}")
        elif args.action == "clear":
            print(f"deleted {store.clear(args.session)} messages of session {args.session}")
    except KeyError as exc:
        print(f"voxpipe: no session {exc.args[0]!r}; `voxpipe history list` shows them", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"voxpipe: {exc}", file=sys.stderr)
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
        text = f": {message['content']}" if message["content"] else ""
        print(f"[{stamp}] {message['role']}{outcome(message)}{text}")
        if message["interrupted"] and message["spoken"] is not None:
            print(f"    heard: {message['spoken']}")
        for command in store.commands(message["id"]):
            mark = "✓" if command["accepted"] else f"refused: {command['reason']}"
            print(f"    <{command['name']}> {', '.join(command['args'])}  {mark}")
    return 0


def outcome(message: dict[str, Any]) -> str:
    """How a reply ended, each fact once: ` (error: <the stored reason>)`, ` (interrupted)`, or nothing.

    A reply cut off while generating has status `interrupted` and the interrupted flag; one cut off
    while speaking has the flag only. Either way it is one fact, said once.
    """
    facts = []
    if message["status"] not in ("ok", "interrupted"):
        facts.append(f"{message['status']}: {message['error']}" if message["error"] else message["status"])
    if message["interrupted"] or message["status"] == "interrupted":
        facts.append("interrupted")
    return f" ({', '.join(facts)})" if facts else ""
