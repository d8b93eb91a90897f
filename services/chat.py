"""`voxpipe chat`: an interactive terminal front-end on the client library.

The reply streams in as it arrives; the command tags of the reply show inline, dimmed, as
their chunks arrive (`[e: smile]`), and refused commands as history reports them. Ctrl-C
during a reply cancels it everywhere (LLM, TTS, player) and the prompt returns at once;
Ctrl-C or Ctrl-D at the prompt quits. Lines starting with `/` are chat commands (/help).
"""

from __future__ import annotations

import contextlib
import os
import sys
import termios
from typing import Callable, Iterator, TextIO

from . import protocol
from .client import (Chunk, Client, Command, Done, Error, Playback, Reasoning, Reply, TextDelta, VoxpipeError,
                     VoxpipeTimeout, connect)
from .config import Config

HISTORY_SHOWN = 20
"""How many of the session's last messages /history prints."""
CHAT_KINDS = ("text", "chunk", "command", "llm.done", "playback", "error")

HELP = """\
Type a message and press Enter; the reply streams in and is spoken.
  Ctrl-C        interrupt the reply (LLM, speech and playback stop); at the prompt: quit
  Ctrl-D        quit
  /session NAME switch to another conversation (now: {session})
  /history      show the last {shown} messages of this session
  /stream on|off  ask for a streamed reply or for the whole reply at once (now: {stream})
  /voice NAME   choose the TTS voice
  /help         this text
  /quit         quit"""


class Chat:
    """One terminal conversation: read a line, ask, show the reply as it streams."""

    def __init__(self, client: Client, config: Config, *, profile: str = "", stream: bool | None = None,
                 timeout: float = 120.0, out: TextIO = sys.stdout,
                 read: Callable[[str], str] = input) -> None:
        self.client = client
        self.config = config
        self.profile = profile
        self.stream = stream
        self.timeout = timeout
        self.out = out
        self.read = read
        color = out.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
        self._dim, self._reset = ("\x1b[2m", "\x1b[0m") if color else ("", "")
        self._column = 0
        self._last = "\n"

    @property
    def session(self) -> str:
        return self.client.session

    # --- output -------------------------------------------------------------------------

    def write(self, text: str) -> None:
        if not text:
            return
        self.out.write(text)
        self.out.flush()
        self._column = 0 if text.endswith("\n") else self._column + len(text)
        self._last = text[-1]

    def inline(self, text: str) -> None:
        """A dimmed note inside the reply's line, e.g. a command as it arrives."""
        space = " " if self._column and not self._last.isspace() else ""
        self.write(f"{space}{self._dim}{text}{self._reset}")

    def note(self, text: str) -> None:
        """A dimmed line of its own (starts a new line if the reply is mid-line)."""
        self.newline()
        self.write(f"{self._dim}{text}{self._reset}\n")

    def newline(self) -> None:
        if self._column:
            self.write("\n")

    # --- the loop -----------------------------------------------------------------------

    def run(self) -> int:
        self.note(f"voxpipe chat, session {self.session!r}. Ctrl-C interrupts a reply; /help lists commands.")
        while True:
            try:
                line = self.read("you> ")
            except (KeyboardInterrupt, EOFError):
                self.write("\n")
                return 0
            self._column = 0
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if self.command(line) == "quit":
                    return 0
                continue
            self.converse(line)

    def converse(self, text: str) -> None:
        """Ask and show the reply; Ctrl-C cancels it and returns at once."""
        try:
            with _no_echo(sys.stdin):
                self.follow(self.client.ask(text, stream=self.stream, profile=self.profile,
                                            timeout=self.timeout))
        except KeyboardInterrupt:
            self.client.cancel(self.session, reason="interrupted in voxpipe chat")
            self.note("[interrupted]")
        except VoxpipeTimeout as exc:
            self.note(f"[{exc}]")
        except VoxpipeError as exc:
            self.note(f"[voxpipe: {exc}]")

    def follow(self, reply: Reply) -> None:
        marks: list[tuple[str, int]] = []  # (tag, chunk) shown from chunk marks, not to repeat as commands
        for event in reply:
            if isinstance(event, TextDelta):
                self.write(event.delta)  # the line ends with the reply: later marks stay on it
            elif isinstance(event, Chunk):
                for mark in event.marks:
                    marks.append((mark.tag.lower(), mark.chunk))
                    self.inline(f"[{mark.tag}: {mark.body}]")
            elif isinstance(event, Command):
                if not event.accepted:
                    self.note(f"[refused command {event.name}: {event.reason}]")
                elif (event.name.lower(), event.chunk) in marks:
                    marks.remove((event.name.lower(), event.chunk))
                else:
                    self.inline(f"[{event.name}: {' '.join(event.args)}]")
            elif isinstance(event, Reasoning):
                continue
            elif isinstance(event, Error):
                if event.code == "stage_crashed":
                    self.note(f"[{event.message}; this reply is lost, ask again]")
                else:
                    self.note(f"[error {event.code}: {event.message}]")
            elif isinstance(event, Done):
                if event.status == "error":
                    self.note(f"[the reply failed: {event.error}]")
                elif event.status == "interrupted":
                    self.note("[interrupted]")
            elif isinstance(event, Playback) and event.final and event.path:
                self.note(f"[audio written to {event.path}]")
        self.newline()

    # --- slash commands -----------------------------------------------------------------

    def command(self, line: str) -> str | None:
        name, _, argument = line[1:].partition(" ")
        argument = argument.strip()
        if name in ("quit", "exit", "q"):
            return "quit"
        if name == "help":
            self.note(HELP.format(session=self.session, shown=HISTORY_SHOWN, stream=self._stream_name()))
        elif name == "session":
            self.switch_session(argument)
        elif name == "history":
            self.show_history()
        elif name == "stream":
            self.set_stream(argument)
        elif name == "voice":
            # The request has no voice field in protocol v1 and tts has no per-session voice.
            self.note("[/voice is not supported yet: set tts.espeak.voice in the config "
                      "(the protocol has no per-request voice)]")
        else:
            self.note(f"[unknown command /{name}; /help lists the commands]")
        return None

    def switch_session(self, name: str) -> None:
        if not name:
            self.note(f"[session: {self.session}]")
            return
        if not protocol.SESSION_PATTERN.fullmatch(name):
            self.note("[a session name is 1-64 of A-Z a-z 0-9 _ . : @ -]")
            return
        self.client.session = name
        self.note(f"[session: {name}]")

    def show_history(self) -> None:
        from .history.stage import default_db_path
        from .history.store import HistoryStore

        path = default_db_path(self.config["history"]["db_path"])
        if not path.exists():
            self.note(f"[no history yet ({path} does not exist)]")
            return
        store = HistoryStore(path)
        try:
            rows = store.messages(self.session)
        finally:
            store.close()
        if not rows:
            self.note(f"[no messages in session {self.session!r}]")
            return
        for row in rows[-HISTORY_SHOWN:]:
            who = "you" if row["role"] == "user" else "assistant"
            status = "" if row.get("status", "ok") == "ok" else f" ({row['status']})"
            self.note(f"{who}{status}: {row['content']}")

    def set_stream(self, argument: str) -> None:
        if argument in ("on", "off"):
            self.stream = argument == "on"
        elif argument:
            self.note("[use /stream on or /stream off]")
            return
        self.note(f"[streaming: {self._stream_name()}]")

    def _stream_name(self) -> str:
        return {None: "the profile's setting", True: "on", False: "off"}[self.stream]


@contextlib.contextmanager
def _no_echo(stream: TextIO) -> Iterator[None]:
    """While a reply streams, keys typed ahead are not echoed into it; they wait for the prompt."""
    try:
        fd = stream.fileno()
        saved = termios.tcgetattr(fd) if os.isatty(fd) else None
    except (OSError, ValueError, termios.error):
        saved = None
    if saved is None:
        yield
        return
    quiet = list(saved)
    quiet[3] &= ~termios.ECHO
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


def run(config: Config, *, session: str = "chat", profile: str = "", stream: bool | None = None,
        timeout: float = 120.0) -> int:
    """The `voxpipe chat` command: connect, then converse until Ctrl-C/Ctrl-D at the prompt."""
    try:
        import readline  # noqa: F401 - line editing and recall for input()
    except ImportError:
        pass
    with connect(config, session=session, kinds=CHAT_KINDS, name="chat") as client:
        return Chat(client, config, profile=profile, stream=stream, timeout=timeout).run()
