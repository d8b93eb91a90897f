"""`voxpipe chat`: an interactive terminal front-end on the client library.

The reply streams in as it arrives; the command tags of the reply show inline, dimmed, exactly
where they stood in the text (`[e: smile]`, from the marks of the `text` messages), and refused
commands only as history's refusal notes (they are never spoken either), which the prompt waits
for: they can come after the reply's final playback. Ctrl-C
during a reply cancels it everywhere (LLM, TTS, player) and the prompt returns at once;
Ctrl-C or Ctrl-D at the prompt quits. Lines starting with `/` are chat commands (/help).

Everything of the reply, and every note quoting the bus or history (errors, refusals, paths), is
shown through `printable`, so the model cannot drive the terminal; chat's own dim colours are
added around the escaped text.
"""

from __future__ import annotations

import contextlib
import os
import sys
import termios
import time
from collections.abc import Callable, Iterator
from typing import TextIO

from .. import protocol
from ..config import Config, ConfigError
from ..protocol import Body, Command, Error, ErrorCode, LlmDone, Message, Playback, Text
from ..runtime import BusLost
from ..stages.chunker.core import ChunkerPolicy
from ..stages.history.commands import Allowlist, load_allowlist, parse_reply
from .client import Client, Reply, VoxpipeError, VoxpipeTimeout, connect
from .terminal import printable

HISTORY_SHOWN = 20
"""How many of the session's last messages /history prints."""
PROBE_S = 2.0
"""Silence before the first event of a reply after which chat checks that the daemon is still there."""
RETRY_S = 0.5
"""How often chat looks whether an unreachable daemon is back."""
HEARTBEAT_WAIT_S = 2.5
"""How long a probe waits for the llm stage's ready heartbeat (stages send one every second)."""
CHAT_KINDS = ("text", "command", "llm.done", "playback", "error")

HELP = """\
Type a message and press Enter; the reply streams in and is spoken.
  Ctrl-C        interrupt the reply (LLM, speech and playback stop); at the prompt: quit
  Ctrl-D        quit
  /session NAME switch to another conversation (now: {session})
  /history      show the last {shown} messages of this session
  /stream on|off  ask for a streamed reply or for the whole reply at once (now: {stream})
  /voice NAME   speak this session's replies with that voice (espeak-ng: en, ru, en-us, en+f3, ...;
                /voice alone: back to the configured voice; now: {voice})
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
        self.voice = ""
        self.allowlist = _allowlist(config)
        self.commands = frozenset(name.lower() for name in self.allowlist.specs)
        """The tags history accepts, to show inline."""
        self._commands_due = 0
        """The reply's `command` events still to come: one per tag of llm.done's text, less those seen."""
        self._space_due = False
        self._errors_shown: set[str] = set()
        self._cut = ""
        self._waiting = False
        self._color = bool(color)

    @property
    def session(self) -> str:
        return self.client.session

    # --- output -------------------------------------------------------------------------

    def write(self, text: str) -> None:
        if not text:
            return
        if self._space_due and not text[0].isspace():
            text = " " + text
        self._space_due = False
        self.out.write(text)
        self.out.flush()
        self._column = 0 if text.endswith("\n") else self._column + len(text)
        self._last = text[-1]

    def inline(self, text: str) -> None:
        """A dimmed note inside the reply's line, e.g. a command where it stood; set off by spaces."""
        space = " " if self._column and not self._last.isspace() else ""
        self.write(f"{space}{self._dim}{printable(text, one_line=True)}{self._reset}")
        self._space_due = True

    def note(self, text: str) -> None:
        """A dimmed line of its own (starts a new line if the reply is mid-line)."""
        self.newline()
        self.write(f"{self._dim}{printable(text)}{self._reset}\n")

    def newline(self) -> None:
        if self._column:
            self.write("\n")

    def waiting(self, text: str) -> None:
        """A dimmed placeholder on the reply's line until its first text (only on a terminal)."""
        if self._color:
            self.out.write(f"{self._dim}{text}{self._reset}")
            self.out.flush()
            self._waiting = True

    def stop_waiting(self) -> None:
        if self._waiting:
            self.out.write("\r\x1b[K")
            self.out.flush()
            self._waiting = False

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
        """Ask and show the reply; Ctrl-C cancels it and returns at once.

        While nothing of the reply has come, the bus is probed every PROBE_S: when the daemon is
        down (restarting, or stopped) that is said at once, and the question is asked again when
        it is back; a live but slow daemon is simply waited for. Either way within `timeout`.
        """
        deadline = time.monotonic() + self.timeout
        try:
            with _no_echo(sys.stdin):
                while not self.follow(self.ask(text), deadline):
                    if not self.wait_for_daemon(deadline):
                        return
        except KeyboardInterrupt:
            self.stop_waiting()
            self.client.cancel(self.session, reason="interrupted in voxpipe chat")
            self.note("[interrupted]")
        except VoxpipeError as exc:  # VoxpipeTimeout included
            self.stop_waiting()
            self.note(f"[{exc}]" if isinstance(exc, VoxpipeTimeout) else f"[voxpipe: {exc}]")

    def ask(self, text: str) -> Reply:
        reply = self.client.ask(text, stream=self.stream, profile=self.profile, voice=self.voice,
                                timeout=min(PROBE_S, self.timeout))
        self.waiting("…")
        return reply

    def follow(self, reply: Reply, deadline: float) -> bool:
        """Show the reply's events; False if the daemon went away before any of it came."""
        events = iter(reply)
        started, last = False, time.monotonic()
        self._cut = ""
        self._commands_due = 0
        self._errors_shown = set()
        while True:
            try:
                event = next(events)
            except StopIteration:
                break
            except BusLost:
                if not started:
                    return False  # as for a daemon that is not reachable: ask again once it is back
                raise
            except VoxpipeTimeout:
                now = time.monotonic()
                if not started and not self.client.reachable():
                    return False
                if now - last >= self.timeout or (not started and now >= deadline):
                    raise VoxpipeTimeout(f"no progress on the reply for {self.timeout:g} s; check that every "
                                         f"stage runs: `voxpipe status`") from None
                continue
            started, last = True, time.monotonic()
            self.stop_waiting()
            self.show(event)
        if self._commands_due > 0 and reply.crashed is None and reply.done is not None \
                and reply.done.body.status != "interrupted":
            self.await_commands(reply)
        if self._cut:
            self.inline(f"[cut: {self._cut}]")
        self.newline()
        return True

    def await_commands(self, reply: Reply) -> None:
        """Show the reply's commands that come after it ended, before the prompt: history publishes them
        once it has both llm.done and the final chunk, which with a quick player can be after the final
        playback, and a refusal is shown nowhere else. A slow history is waited for (up to `timeout`
        without any of them); one whose heartbeat does not come within HEARTBEAT_WAIT_S is not."""
        last = time.monotonic()
        while self._commands_due > 0:
            event = reply.late(PROBE_S)
            if event is not None:
                last = time.monotonic()
                self.show(event)
            elif time.monotonic() - last >= self.timeout or not self.client.reachable("history", HEARTBEAT_WAIT_S):
                self.note(f"[history sent no word on {self._commands_due} command(s) of this reply; check that it "
                          f"runs: `voxpipe status`]")
                return

    def wait_for_daemon(self, deadline: float) -> bool:
        """The daemon is unreachable: say so, and True once it is back (reconnected), False when given up."""
        self.stop_waiting()
        self.note("[the daemon is not reachable (restarting, or not running?); asking again when it is back]")
        while time.monotonic() < deadline:
            time.sleep(RETRY_S)
            if self.client.reachable("llm", timeout=HEARTBEAT_WAIT_S):
                self.client.reconnect()
                self.note("[the daemon is back; asking again]")
                return True
        self.note(f"[gave up after {self.timeout:g} s: the daemon did not come back; start it with `voxpipe run`]")
        return False

    def show(self, event: Message[Body]) -> None:
        """One event of the reply on the terminal."""
        match event.body:
            case Text(delta=delta, marks=marks):
                # Each command tag shows where it stood in the text, as the text streams; a tag history
                # will refuse (not on its allowlist) shows only as the refusal note, as it is never spoken.
                position = 0
                for mark in marks:
                    self.write(printable(delta[position:mark.offset]))
                    position = mark.offset
                    if mark.tag.lower() in self.commands:
                        self.inline(f"[{mark.tag}: {mark.body}]")
                self.write(printable(delta[position:]))
            case Command(accepted=accepted, name=name, reason=reason):
                self._commands_due -= 1
                if not accepted:
                    self.note(f"[refused command {name}: {reason}]")
            case Error(code=code, message=message):
                self._errors_shown.add(message)
                if code == ErrorCode.STAGE_CRASHED:
                    self.note(f"[{message}; this reply is lost, ask again]")
                else:
                    self.note(f"[error {code}: {message}]")
            case LlmDone() as done:
                self._commands_due += len(parse_reply(done.text, self.allowlist))  # history sends one per tag
                self._cut = done.guard  # said after the text, which may still be arriving (streaming off)
                if done.status == "error" and done.error not in self._errors_shown:
                    self.note(f"[the reply failed: {done.error}]")  # unless its error event said it
                elif done.status == "interrupted":
                    self.note("[interrupted]")
            case Playback(final=True, path=path) if path:
                self.note(f"[audio written to {path}]")

    # --- slash commands -----------------------------------------------------------------

    def command(self, line: str) -> str | None:
        name, _, argument = line[1:].partition(" ")
        argument = argument.strip()
        if name in ("quit", "exit", "q"):
            return "quit"
        if name == "help":
            self.note(HELP.format(session=self.session, shown=HISTORY_SHOWN, stream=self._stream_name(),
                                  voice=self.voice or "the configured voice"))
        elif name == "session":
            self.switch_session(argument)
        elif name == "history":
            self.show_history()
        elif name == "stream":
            self.set_stream(argument)
        elif name == "voice":
            self.voice = argument
            self.note(f"[voice: {argument or 'the configured voice'}]")
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
        from ..stages.history.stage import default_db_path
        from ..stages.history.store import HistoryStore

        path = default_db_path(self.config["history"]["db_path"])
        if not path.exists():
            self.note(f"[no history yet ({path} does not exist)]")
            return
        try:
            store = HistoryStore(path)
        except ConfigError as exc:  # a database open to other users: history refuses it, with the chmod
            self.note(f"[{exc}]")
            return
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


def _allowlist(config: Config) -> Allowlist:
    """History's allowlist (with history.commands_file) and tag grammar (the chunker's), loaded as history
    loads them: the tags to show inline, and how many `command` events a reply's text brings."""
    history, chunker = config["history"], ChunkerPolicy.from_mapping(config["chunker"])
    try:
        return load_allowlist(history["commands_file"], history["max_commands_per_reply"], chunker.tags,
                              chunker.tag_lookahead)
    except (OSError, ValueError):  # history reports a broken commands_file; chat shows the built-in tags
        return Allowlist(max_per_reply=history["max_commands_per_reply"], tags=chunker.tags,
                         lookahead=chunker.tag_lookahead)


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
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401 - line editing and recall for input()
    with connect(config, session=session, kinds=CHAT_KINDS, name="chat") as client:
        return Chat(client, config, profile=profile, stream=stream, timeout=timeout).run()
