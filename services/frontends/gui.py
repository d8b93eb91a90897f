"""`voxpipe gui`: a small Tk front-end, like the companion app voxpipe grew from.

Type a message and press Enter or Send; the reply text grows in the window as tokens arrive,
the current emotion and the last command (in words: "attitude +1, boredom 0, stress −1") show
above it, and Stop interrupts the reply everywhere (LLM, TTS, player) and gives the input box
the focus back. Only commands history accepted are shown there; a refused one is a note in the
transcript, and its tag is in neither the text nor the speech (the chunker drops every tag). A
reply an early-stop guard cut ends with a note such as "[cut: repetition]".

Threads: a worker thread follows replies with its own Client (connected before the window
opens, so a missing bus fails at once, then used only by the worker) and puts every event (a
protocol `Message`) into a `queue.Queue`; a second thread does the same with the session's
`command` events, on a connection of its own (see CommandListener). The Tk main thread polls
that queue with `after()` and is the only thread that touches Tk. The Tk thread never receives;
it only calls `Client.cancel()`, the one Client method documented as safe from any thread.

`--dump FILE` (a test and debug hook) writes the window's state as JSON to FILE once the
window is up, after every reply, on SIGUSR1 and on exit: the transcript, the current reply,
emotion, command, status, the input box's text, the focused widget, and where the window, the
labels, the entry and the buttons are on screen (with the labels' requested sizes).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import sys
import threading
import tkinter as tk
from pathlib import Path
from tkinter import font as tkfont
from tkinter import ttk
from typing import Any

from .. import protocol
from ..config import Config
from ..protocol import Command, Error, LlmDone, Playback, Text
from ..runtime import BusLost, Connection, endpoints_for
from ..stages.tags import describe
from .client import Client, VoxpipeError, VoxpipeTimeout, connect

GUI_KINDS = ("text", "llm.done", "playback", "error")
"""No `chunk`: a chunk's marks are tags met, not judged, and showing them would show refused ones;
no `command`: CommandListener follows those."""
POLL_MS = 30
EMOTION_TAGS = ("e", "emotion")
LABEL_GAP = 8


class Worker(threading.Thread):
    """Owns the Client: asks what the Tk thread queues and queues every event back."""

    def __init__(self, client: Client, events: queue.Queue[Any], *, profile: str, timeout: float) -> None:
        super().__init__(name="voxpipe-gui-worker", daemon=True)
        self.client = client
        self.events = events
        self.asks: queue.Queue[str | None] = queue.Queue()
        self.profile = profile
        self.timeout = timeout

    def run(self) -> None:
        try:
            while (text := self.asks.get()) is not None:
                self.follow(text)
        finally:
            self.client.close()

    def follow(self, text: str) -> None:
        reply_id = ""
        try:
            reply = self.client.ask(text, profile=self.profile, timeout=self.timeout)
            reply_id = reply.id
            self.events.put(("asked", reply_id))
            for event in reply:
                self.events.put(event)
        except VoxpipeTimeout as exc:
            self.events.put(("end", reply_id, "timeout", str(exc), ""))
            return
        except Exception as exc:  # the worker must survive to take the next message
            text = str(exc) if isinstance(exc, VoxpipeError) else f"{type(exc).__name__}: {exc}"
            self.events.put(("end", reply_id, "error", text, ""))
            return
        if reply.cancelled:
            outcome, detail = "stopped", ""
        elif reply.crashed is not None:
            outcome, detail = "error", f"{reply.crashed.body.message}; this reply is lost, ask again"
        elif reply.done is not None and reply.done.body.status != "ok":
            outcome, detail = reply.done.body.status, reply.done.body.error
        else:
            outcome, detail = "done", ""
        self.events.put(("end", reply.id, outcome, detail, reply.done.body.guard if reply.done is not None else ""))


class CommandListener(threading.Thread):
    """Queues every `command` event of the session, from a connection of its own.

    History publishes a reply's commands once it has both llm.done and the final chunk; with a
    fast player that can be after the final playback, where the Worker's Reply has already
    ended, so the Worker would lose them (the emotion, the refused-command note)."""

    def __init__(self, config: Config, session: str) -> None:
        super().__init__(name="voxpipe-gui-commands", daemon=True)
        self.connection = Connection(f"gui-commands.{os.getpid()}", endpoints_for(config),
                                     [protocol.subscription("command", session)])
        self.connection.require_bus()
        self.connection.open()
        self.events: queue.Queue[Any] = queue.Queue()
        self.stopping = threading.Event()

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                try:
                    message = self.connection.receive(0.2)
                except BusLost:
                    continue  # the reply's own Client reports it; receive() handshakes again when it is back
                if message is not None:
                    self.events.put(message)
        finally:
            self.connection.close()


class App:
    """The window. Every method runs on the Tk main thread."""

    def __init__(self, root: tk.Tk, client: Client, commands: CommandListener, *, profile: str = "",
                 timeout: float = 120.0, dump: str | None = None) -> None:
        self.root = root
        self.client = client
        self.session = client.session
        self.dump_path = Path(dump) if dump else None
        self.commands = commands
        self.events = commands.events   # one queue: the worker puts the rest of each reply in it too
        self.worker = Worker(client, self.events, profile=profile, timeout=timeout)
        self.busy = False
        self.current: str | None = None  # the reply shown: "" while its request is on the way
        self.finished: str | None = None  # the reply shown last, whose commands may still come
        self.pending = 0
        self.replies = 0
        self.reply_text = ""
        self.errors_shown: set[str] = set()
        self.quitting = False
        self.dump_requested = False
        self.dumps = 0
        self._build()
        self.worker.start()
        commands.start()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: setattr(self, "quitting", True))
        if self.dump_path is not None:
            signal.signal(signal.SIGUSR1, lambda *_: setattr(self, "dump_requested", True))
        self.root.after(POLL_MS, self.poll)
        self.root.after(50, self._ready)

    # --- layout ---------------------------------------------------------------------------

    def _build(self) -> None:
        root = self.root
        root.title(f"voxpipe — session {self.session}")
        root.geometry("760x480")
        root.minsize(420, 260)
        root.protocol("WM_DELETE_WINDOW", self.quit)
        root.bind("<Control-q>", lambda _: self.quit())
        root.bind("<Escape>", lambda _: self.stop())
        root.columnconfigure(0, weight=1)
        root.rowconfigure(1, weight=1)

        self.top = top = ttk.Frame(root, padding=(LABEL_GAP, 6))
        top.grid(row=0, column=0, sticky="ew")
        top.columnconfigure(1, weight=1)
        self.emotion = tk.StringVar(value="emotion: –")
        self.command = tk.StringVar(value="command: –")
        self.status = tk.StringVar(value="ready")
        self.emotion_label = ttk.Label(top, textvariable=self.emotion)
        self.command_label = ttk.Label(top, textvariable=self.command)
        self.status_label = ttk.Label(top, textvariable=self.status, anchor="e")
        self.emotion_label.grid(row=0, column=0, sticky="w")
        self.status_label.grid(row=0, column=2, sticky="e", padx=(LABEL_GAP, 0))
        top.bind("<Configure>", self._reflow)
        for variable in (self.emotion, self.command, self.status):
            variable.trace_add("write", self._reflow)

        body = ttk.Frame(root, padding=(8, 0))
        body.grid(row=1, column=0, sticky="nsew")
        body.columnconfigure(0, weight=1)
        body.rowconfigure(0, weight=1)
        self.text = tk.Text(body, wrap="word", height=16, font=("DejaVu Sans", 12), padx=8, pady=6,
                            state="disabled", relief="flat", background="#fbfbf8")
        scroll = ttk.Scrollbar(body, command=self.text.yview)
        self.text.configure(yscrollcommand=scroll.set)
        self.text.grid(row=0, column=0, sticky="nsew")
        scroll.grid(row=0, column=1, sticky="ns")
        self.text.tag_configure("who", font=("DejaVu Sans", 12, "bold"))
        self.text.tag_configure("user", foreground="#1f4e8c")
        self.text.tag_configure("note", foreground="#888888", font=("DejaVu Sans", 10, "italic"))

        bottom = ttk.Frame(root, padding=8)
        bottom.grid(row=2, column=0, sticky="ew")
        bottom.columnconfigure(0, weight=1)
        self.entry = ttk.Entry(bottom, font=("DejaVu Sans", 12))
        self.entry.grid(row=0, column=0, sticky="ew")
        self.entry.bind("<Return>", lambda _: self.send())
        self.send_button = ttk.Button(bottom, text="Send", command=self.send)
        self.send_button.grid(row=0, column=1, padx=(8, 0))
        self.stop_button = ttk.Button(bottom, text="Stop", command=self.stop, state="disabled")
        self.stop_button.grid(row=0, column=2, padx=(8, 0))
        self.entry.focus_set()

    def _reflow(self, *_: Any) -> None:
        """The emotion, the command and the status share one line when they fit; otherwise the
        command moves to a line of its own, wrapped to the window's width, so a narrow window
        (420 px) still shows all three instead of pushing the status off the edge."""
        if self.top.winfo_width() <= 1:
            return   # not laid out yet: its first <Configure> comes with the real width
        font = tkfont.nametofont("TkDefaultFont")   # ttk labels' font
        width = self.top.winfo_width() - 2 * LABEL_GAP
        needed = sum(font.measure(variable.get()) for variable in (self.emotion, self.command, self.status))
        if needed + 2 * LABEL_GAP <= width:
            self.command_label.grid(row=0, column=1, columnspan=1, sticky="w", padx=(LABEL_GAP, 0))
            self.command_label.configure(wraplength=0)
        else:
            self.command_label.grid(row=1, column=0, columnspan=3, sticky="w", padx=0)
            self.command_label.configure(wraplength=max(width, 1))

    def _append(self, text: str, *tags: str, at: str = "end") -> None:
        self.text.configure(state="normal")
        self.text.insert(at, text, tags)
        self.text.configure(state="disabled")
        self.text.see("end")

    def _note(self, reply_id: str, text: str) -> None:
        """A note about a reply goes at the reply's end, even once the next one is under way."""
        self._append(text, "note", at=self._reply_end(reply_id))

    def _reply_end(self, reply_id: str) -> str:
        """The Tk text mark at the end of a reply, where its notes go; made at the end of the text
        for a reply that failed before it began."""
        mark = f"notes-{reply_id}"
        if mark not in self.text.mark_names():
            self.text.mark_set(mark, "end-1c")   # right gravity: it follows the text inserted at it
        return mark

    # --- actions ----------------------------------------------------------------------------

    def send(self) -> None:
        text = self.entry.get().strip()
        if not text:
            return
        self.entry.delete(0, "end")
        if self.busy:
            self.stop()  # a new message interrupts the reply in progress (barge-in)
            if self.current:
                self._append(" [stopped]\n\n", "note")
        self.entry.focus_set()   # Send clicked with the mouse: typing goes on in the box
        self.current = ""
        self._append("You: ", "who", "user")
        self._append(text + "\n", "user")
        self.pending += 1
        self.worker.asks.put(text)
        self._set_busy(True, "thinking…")

    def stop(self) -> None:
        """Stop the reply; the input box gets the focus back (from the Stop button a click gave
        it, and which is about to be disabled), so the person can type again at once."""
        self.entry.focus_set()
        if not self.busy:
            return
        try:
            self.client.cancel(self.session, reason="Stop pressed in voxpipe gui")
        except VoxpipeError as exc:
            self.status.set(f"cannot stop: {exc}")
            return
        self.status.set("stopping…")

    def quit(self) -> None:
        if self.busy:
            self.stop()
        self.worker.asks.put(None)
        self.commands.stopping.set()
        self.worker.join(timeout=2.0)
        self.commands.join(timeout=2.0)
        self.write_dump()
        self.root.destroy()

    def _set_busy(self, busy: bool, status: str) -> None:
        self.busy = busy
        self.stop_button.configure(state="normal" if busy else "disabled")
        self.status.set(status)

    # --- events from the worker ------------------------------------------------------------

    def poll(self) -> None:
        if self.quitting:
            self.quit()
            return
        try:
            while True:
                self.handle(self.events.get_nowait())
        except queue.Empty:
            pass
        if self.dump_requested:
            self.dump_requested = False
            self.root.update_idletasks()
            self.write_dump()
        self.root.after(POLL_MS, self.poll)

    def handle(self, item: Any) -> None:
        if isinstance(item, tuple):
            if item[0] == "asked" and self.current == "":
                self.current = item[1]
                self.reply_text = ""
                self.errors_shown = set()
                self._append("voxpipe: ", "who")
                self._reply_end(self.current)
            elif item[0] == "end":
                self.finish(*item[1:])
            return
        body = item.body
        if isinstance(body, Command):
            if item.id and item.id in (self.current, self.finished):
                self.take_command(item.id, body)
            return
        if item.id != self.current and not (isinstance(body, Error) and not item.id):
            return  # a reply the user has already moved on from
        match body:
            case Text(delta=delta):
                self.reply_text += delta
                self._append(delta)
                if self.status.get() == "thinking…":
                    self.status.set("answering…")
            case Playback(event="started") if self.busy:
                self.status.set("speaking…")
            case Error(code=code, message=message):
                self.errors_shown.add(message)
                self._append(f"\n[{code}: {message}]", "note")
            case LlmDone(status="error", error=error) if error not in self.errors_shown:
                self._append(f"\n[the reply failed: {error}]", "note")  # unless its error event said it

    def take_command(self, reply_id: str, command: Command) -> None:
        """An accepted command shows in words above the text; a refused one only as a note."""
        if not command.accepted:
            self._note(reply_id, f"\n[refused command {command.name}: {command.reason}]")
        elif command.name.lower() in EMOTION_TAGS:
            self.emotion.set(f"emotion: {' '.join(command.args)}")
        else:
            self.command.set(describe(command.name, command.args))

    def finish(self, reply_id: str, outcome: str, detail: str, guard: str) -> None:
        """The reply ended: say how, if not by itself (stopped, failed, or cut by a guard, which
        would otherwise look like a reply that simply stops mid-sentence)."""
        self.pending -= 1
        if reply_id == self.current:
            if outcome in ("stopped", "interrupted"):
                self._note(reply_id, " [stopped]")
            elif outcome != "done" and detail:
                self._note(reply_id, f"\n[{detail}]")
            if guard:
                self._note(reply_id, f"\n[cut: {guard}]")
            mark = self._reply_end(reply_id)
            self.text.mark_gravity(mark, "left")   # the blank line goes after the notes still to come
            self._append("\n\n")
            self.text.mark_gravity(mark, "right")
            if self.finished is not None:
                self.text.mark_unset(self._reply_end(self.finished))
            self.replies += 1
            self.current, self.finished = None, reply_id
        else:
            self.text.mark_unset(self._reply_end(reply_id))   # superseded: its notes are not wanted
        if self.pending <= 0:
            self._set_busy(False, {"done": "ready"}.get(outcome, outcome))
        else:
            self.status.set("thinking…")
        self.root.update_idletasks()
        self.write_dump()

    # --- the test/debug hook ------------------------------------------------------------------

    def _ready(self) -> None:
        if not self.root.winfo_ismapped():
            self.root.after(50, self._ready)
            return
        self.root.update_idletasks()
        self.write_dump()

    def write_dump(self) -> None:
        if self.dump_path is None:
            return

        def place(widget: tk.Misc) -> list[int]:
            return [widget.winfo_rootx(), widget.winfo_rooty(), widget.winfo_width(), widget.winfo_height()]

        widgets = {"window": self.root, "emotion": self.emotion_label, "command": self.command_label,
                   "status": self.status_label, "text": self.text, "entry": self.entry, "send": self.send_button,
                   "stop": self.stop_button}
        names = {str(widget): name for name, widget in widgets.items()}
        focus = self.root.focus_get()
        self.dumps += 1
        state = {
            "dumps": self.dumps, "pid": os.getpid(), "session": self.session,
            "transcript": self.text.get("1.0", "end-1c"), "reply": self.reply_text,
            "replies": self.replies, "busy": self.busy, "status": self.status.get(),
            "emotion": self.emotion.get(), "command": self.command.get(), "input": self.entry.get(),
            "focus": None if focus is None else names.get(str(focus), str(focus)),
            "widgets": {name: place(widget) for name, widget in widgets.items()},
            "requested": {name: [widgets[name].winfo_reqwidth(), widgets[name].winfo_reqheight()]
                          for name in ("emotion", "command", "status")},
        }
        temporary = self.dump_path.with_name(self.dump_path.name + ".tmp")
        temporary.write_text(json.dumps(state, ensure_ascii=False, indent=1))
        os.replace(temporary, self.dump_path)


def run(config: Config, *, session: str = "gui", profile: str = "", timeout: float = 120.0,
        dump: str | None = None) -> int:
    """The `voxpipe gui` command: connect (failing fast without a bus), then show the window."""
    try:
        root = tk.Tk(className="voxpipe")
    except tk.TclError as exc:
        print(f"voxpipe: cannot open a window ({exc}); is DISPLAY set?", file=sys.stderr)
        return 1
    try:
        client = connect(config, session=session, kinds=GUI_KINDS, name="gui")
        try:
            commands = CommandListener(client.config, client.session)
        except BaseException:
            client.close()
            raise
    except BaseException:
        root.destroy()
        raise
    App(root, client, commands, profile=profile, timeout=timeout, dump=dump)
    root.mainloop()
    return 0
