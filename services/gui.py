"""`voxpipe gui`: a small Tk front-end, like the companion app voxpipe grew from.

Type a message and press Enter or Send; the reply text grows in the window as tokens arrive,
the current emotion (`<e>` marks) and the last command show above it, and Stop interrupts
the reply everywhere (LLM, TTS, player).

Threads: a worker thread follows replies with its own Client (connected before the window
opens, so a missing bus fails at once, then used only by the worker) and puts every event into a
`queue.Queue`; the Tk main thread polls that queue with `after()` and is the only thread
that touches Tk. The Tk thread never receives; it only calls `Client.cancel()`, the one
Client method documented as safe from any thread.

`--dump FILE` (a test and debug hook) writes the window's state as JSON to FILE once the
window is up, after every reply, on SIGUSR1 and on exit: the transcript, the current reply,
emotion, command, status, and where the window, entry and buttons are on screen.
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
from tkinter import ttk
from typing import Any

from .client import (Chunk, Client, Command, Done, Error, Playback, TextDelta, VoxpipeError, VoxpipeTimeout,
                     connect)
from .config import Config

GUI_KINDS = ("text", "chunk", "command", "llm.done", "playback", "error")
POLL_MS = 30
EMOTION_TAGS = ("e", "emotion")


class Worker(threading.Thread):
    """Owns the Client: asks what the Tk thread queues and queues every event back."""

    def __init__(self, client: Client, events: "queue.Queue[Any]", *, profile: str, timeout: float) -> None:
        super().__init__(name="voxpipe-gui-worker", daemon=True)
        self.client = client
        self.events = events
        self.asks: "queue.Queue[str | None]" = queue.Queue()
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
            self.events.put(("end", reply_id, "timeout", str(exc)))
            return
        except Exception as exc:  # the worker must survive to take the next message
            text = str(exc) if isinstance(exc, VoxpipeError) else f"{type(exc).__name__}: {exc}"
            self.events.put(("end", reply_id, "error", text))
            return
        if reply.cancelled:
            outcome, detail = "stopped", ""
        elif reply.crashed is not None:
            outcome, detail = "error", f"{reply.crashed.message}; this reply is lost, ask again"
        elif reply.done is not None and reply.done.status != "ok":
            outcome, detail = reply.done.status, reply.done.error
        else:
            outcome, detail = "done", ""
        self.events.put(("end", reply.id, outcome, detail))


class App:
    """The window. Every method runs on the Tk main thread."""

    def __init__(self, root: tk.Tk, client: Client, *, profile: str = "", timeout: float = 120.0,
                 dump: str | None = None) -> None:
        self.root = root
        self.client = client
        self.session = client.session
        self.dump_path = Path(dump) if dump else None
        self.events: "queue.Queue[Any]" = queue.Queue()
        self.worker = Worker(client, self.events, profile=profile, timeout=timeout)
        self.busy = False
        self.current: str | None = None  # the reply shown: "" while its request is on the way
        self.pending = 0
        self.replies = 0
        self.reply_text = ""
        self.quitting = False
        self.dump_requested = False
        self.dumps = 0
        self._build()
        self.worker.start()
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

        top = ttk.Frame(root, padding=(8, 6))
        top.grid(row=0, column=0, sticky="ew")
        self.emotion = tk.StringVar(value="emotion: –")
        self.command = tk.StringVar(value="command: –")
        self.status = tk.StringVar(value="ready")
        ttk.Label(top, textvariable=self.emotion, width=22).pack(side="left")
        ttk.Label(top, textvariable=self.command, width=30).pack(side="left", padx=(8, 0))
        ttk.Label(top, textvariable=self.status, anchor="e").pack(side="right")

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

    def _append(self, text: str, *tags: str) -> None:
        self.text.configure(state="normal")
        self.text.insert("end", text, tags)
        self.text.configure(state="disabled")
        self.text.see("end")

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
        self.current = ""
        self._append("You: ", "who", "user")
        self._append(text + "\n", "user")
        self.pending += 1
        self.worker.asks.put(text)
        self._set_busy(True, "thinking…")

    def stop(self) -> None:
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
        self.worker.join(timeout=2.0)
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
                self._append("voxpipe: ", "who")
            elif item[0] == "end":
                self.finish(*item[1:])
            return
        if item.id != self.current and not (isinstance(item, Error) and not item.id):
            return  # a reply the user has already moved on from
        if isinstance(item, TextDelta):
            self.reply_text += item.delta
            self._append(item.delta)
            if self.status.get() == "thinking…":
                self.status.set("answering…")
        elif isinstance(item, Chunk):
            for mark in item.marks:
                self.show_command(mark.tag, mark.body)
        elif isinstance(item, Command):
            if item.accepted:
                self.show_command(item.name, " ".join(item.args))
            else:
                self._append(f"\n[refused command {item.name}: {item.reason}]", "note")
        elif isinstance(item, Playback):
            if item.event == "started" and self.busy:
                self.status.set("speaking…")
        elif isinstance(item, Error):
            self._append(f"\n[{item.code}: {item.message}]", "note")
        elif isinstance(item, Done) and item.status == "error":
            self._append(f"\n[the reply failed: {item.error}]", "note")

    def show_command(self, name: str, argument: str) -> None:
        if name.lower() in EMOTION_TAGS:
            self.emotion.set(f"emotion: {argument}")
        else:
            self.command.set(f"command: {name} {argument}".strip())

    def finish(self, reply_id: str, outcome: str, detail: str) -> None:
        self.pending -= 1
        if reply_id == self.current:
            if outcome in ("stopped", "interrupted"):
                self._append(" [stopped]", "note")
            elif outcome != "done" and detail:
                self._append(f"\n[{detail}]", "note")
            self._append("\n\n")
            self.replies += 1
            self.current = None
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

        self.dumps += 1
        state = {
            "dumps": self.dumps, "pid": os.getpid(), "session": self.session,
            "transcript": self.text.get("1.0", "end-1c"), "reply": self.reply_text,
            "replies": self.replies, "busy": self.busy, "status": self.status.get(),
            "emotion": self.emotion.get(), "command": self.command.get(),
            "widgets": {"window": place(self.root), "entry": place(self.entry), "send": place(self.send_button), "stop": place(self.stop_button)},
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
    except BaseException:
        root.destroy()
        raise
    App(root, client, profile=profile, timeout=timeout, dump=dump)
    root.mainloop()
    return 0
