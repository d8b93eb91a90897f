"""`voxpipe gui` on a real X server (Xvfb), driven with real key presses and clicks (xdotool).

Needs the Debian packages xvfb, xdotool and x11-apps (xwd, for the screenshot).
The screenshots go to the test's tmp_path and to /tmp/voxpipe-gui*.png.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.openai_server import reply_for
from tests.harness import ROOT, Daemon, fake_openai, openai_settings
from tests.screenshot import screenshot
from voxpipe import protocol
from voxpipe.runtime import Connection, endpoints_for

KEY = {"FAKE_OPENAI_KEY": "test-key"}
SESSION = "gui1"
TOOLS = ("Xvfb", "xdotool", "xwd")

pytestmark = pytest.mark.skipif(not all(shutil.which(tool) for tool in TOOLS),
                                reason="needs the apt packages xvfb, xdotool and x11-apps")


@pytest.fixture()
def display() -> Iterator[str]:
    """A private Xvfb; -displayfd makes it pick a free display number and tell us."""
    read_end, write_end = os.pipe()
    xvfb = subprocess.Popen(["Xvfb", "-displayfd", str(write_end), "-screen", "0", "1024x640x24",
                             "-nolisten", "tcp"], pass_fds=(write_end,), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], 60)
        assert ready, "Xvfb did not report its display within 60 s"
        number = os.read(read_end, 64).decode().strip()
        assert number.isdigit(), f"Xvfb said {number!r}"
        yield f":{number}"
    finally:
        os.close(read_end)
        xvfb.terminate()
        xvfb.wait(15)


def spoken(reply: str) -> str:
    return reply.replace("<e>smile</e>", "")


class Gui:
    """The `voxpipe gui` process and the X tools that drive it."""

    def __init__(self, daemon: Daemon, display: str, tmp_path: Path) -> None:
        self.display = display
        self.env = {**daemon.env, "DISPLAY": display}
        self.dump = tmp_path / "gui-state.json"
        self.log = (tmp_path / "gui.log").open("w+")
        self.process = subprocess.Popen(daemon.cli("gui", "--session", SESSION, "--dump", str(self.dump)),
                                        cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        self.state = self.wait(lambda state: True, "the window to come up")

    def wait(self, condition: Callable[[dict[str, Any]], bool], what: str, timeout: float = 60.0,
             ask: bool = False) -> dict[str, Any]:
        """Poll the --dump file until `condition` holds for the state it holds; with `ask`, also ask
        for a fresh dump each time (for what changes after a reply ends, such as its commands)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ask and self.process.poll() is None:
                self.process.send_signal(signal.SIGUSR1)
            if self.dump.exists():
                state = json.loads(self.dump.read_text())
                if condition(state):
                    self.state = state
                    return state
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        self.log.seek(0)
        raise AssertionError(f"gave up waiting for {what}; gui exit code {self.process.poll()}, "
                             f"last state {self.dump.read_text() if self.dump.exists() else None}, "
                             f"log:\n{self.log.read()}")

    def snapshot(self) -> dict[str, Any]:
        """Ask the window for its state now (SIGUSR1) and wait for it."""
        before = self.state["dumps"]
        self.process.send_signal(signal.SIGUSR1)
        return self.wait(lambda state: state["dumps"] > before, "a state dump")

    def xdotool(self, *args: str) -> None:
        subprocess.run(["xdotool", *args], env=self.env, check=True, timeout=60)

    def click(self, widget: str) -> None:
        x, y, width, height = self.state["widgets"][widget]
        self.xdotool("mousemove", str(x + width // 2), str(y + height // 2), "click", "1")

    def type(self, text: str) -> None:
        self.xdotool("type", "--delay", "25", text)

    def resize(self, width: int, height: int) -> dict[str, Any]:
        """Resize the window from outside, as a window manager would, and wait until it has reflowed.
        Tk's wrapper window, the one to resize, is the one with the class name `voxpipe gui` gives it."""
        found = subprocess.run(["xdotool", "search", "--classname", "^voxpipe$"], env=self.env, capture_output=True,
                               text=True, timeout=60).stdout.split()
        assert len(found) == 1, found
        self.xdotool("windowsize", found[0], str(width), str(height))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            state = self.snapshot()
            if state["widgets"]["window"][2:] == [width, height]:
                return state
            time.sleep(0.2)
        raise AssertionError(f"the window did not become {width}x{height}: {self.state['widgets']['window']}")

    def screenshot(self, path: Path) -> Path:
        return screenshot(self.display, path, crop=tuple(self.state["widgets"]["window"]))

    def close(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode


def next_reply(watcher: Connection, seen: set[str], timeout: float = 60.0) -> str:
    """The id of the first text event of a reply not seen yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = watcher.receive(1.0)
        if message is not None and message.kind == "text" and message.id not in seen:
            seen.add(message.id)
            return message.id
    raise AssertionError("the GUI's reply did not start")


def follow(watcher: Connection, seen: set[str], timeout: float = 60.0) -> tuple[str, list[protocol.Message]]:
    """The next reply not seen yet: its id and its text, chunk and llm.done messages, up to its final chunk."""
    reply_id = ""
    messages: list[protocol.Message] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = watcher.receive(1.0)
        if message is not None and not reply_id and message.kind == "text" and message.id not in seen:
            reply_id = message.id
            seen.add(reply_id)
        if message is not None and message.id == reply_id:
            messages.append(message)
            if message.kind == "chunk" and message.body.final:
                return reply_id, messages
    raise AssertionError(f"no final chunk for {reply_id}")


def shows_whole(state: dict[str, Any], name: str) -> bool:
    """Whether a label is on screen, inside the window and as wide as its text asks."""
    wx, wy, ww, wh = state["widgets"]["window"]
    x, y, width, height = state["widgets"][name]
    return (height > 1 and width >= state["requested"][name][0] and wx <= x and x + width <= wx + ww
            and wy <= y and y + height <= wy + wh)


def wait_done(watcher: Connection, reply_id: str, timeout: float = 60.0) -> protocol.Message:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = watcher.receive(1.0)
        if message is not None and message.kind == "llm.done" and message.id == reply_id:
            return message
    raise AssertionError(f"no llm.done for {reply_id}")


def test_gui_streams_a_reply_shows_the_emotion_and_stops(display: str, tmp_path: Path) -> None:
    with fake_openai(delay=0.05) as url, Daemon(openai_settings(url), env=KEY) as daemon:
        watcher = Connection("test-watch", endpoints_for(daemon.config()),
                             [protocol.subscription(kind, SESSION) for kind in ("text", "llm.done")])
        watcher.open(timeout=30)
        gui = Gui(daemon, display, tmp_path)
        seen: set[str] = set()
        try:
            # 1. type into the entry, click Send; the reply grows in the window as tokens arrive
            # about 3 s of streaming (3-character pieces 50 ms apart), so a snapshot catches it mid-way
            question = ("Hello GUI, tell me about the sea, the ships, the harbour lights at night "
                        "and the sailors who come home late in the evening after a long day of work")
            gui.click("entry")
            gui.type(question)
            gui.click("send")
            first = next_reply(watcher, seen)
            partial = gui.snapshot()
            full = spoken(reply_for(question))
            assert partial["busy"] and full.startswith(partial["reply"]) and len(partial["reply"]) < len(full), \
                partial["reply"]
            shutil.copy(gui.screenshot(tmp_path / "voxpipe-gui-streaming.png"), "/tmp/voxpipe-gui-streaming.png")
            assert wait_done(watcher, first).body.status == "ok"
            state = gui.wait(lambda state: state["replies"] >= 1 and "smile" in state["emotion"],
                             "the first reply and its emotion", ask=True)
            assert state["reply"] == full
            assert f"You: {question}\nvoxpipe: {full}" in state["transcript"]
            assert state["emotion"] == "emotion: smile"
            shot = gui.screenshot(tmp_path / "voxpipe-gui.png")
            shutil.copy(shot, "/tmp/voxpipe-gui.png")
            assert shot.stat().st_size > 5000  # a real picture, not an empty frame

            # 2. a long reply, sent with Enter, cut short by the Stop button
            story = "Now a long story please " * 8
            gui.click("entry")
            gui.type(story.strip())
            gui.xdotool("key", "Return")
            second = next_reply(watcher, seen)
            gui.click("stop")
            assert wait_done(watcher, second).body.status == "interrupted"
            state = gui.wait(lambda state: state["replies"] >= 2, "the stopped reply to end")
            assert state["transcript"].rstrip().endswith("[stopped]")
            assert not state["busy"]
            assert "here." not in state["reply"]

            # 3. the focus went back to the input box: typing at once, with no click, lands there
            assert state["focus"] == "entry"
            gui.type("again")
            assert gui.wait(lambda state: state["input"] == "again", "the typed text in the input box",
                            ask=True)["focus"] == "entry"
            shutil.copy(gui.screenshot(tmp_path / "voxpipe-gui-stopped.png"), "/tmp/voxpipe-gui-stopped.png")
        finally:
            code = gui.close()
            watcher.close()
        assert code == 0
        assert json.loads(gui.dump.read_text())["replies"] == 2  # the dump on exit


def test_gui_hides_a_refused_tag_says_a_cut_reads_commands_in_words_and_fits_420px(display: str,
                                                                                   tmp_path: Path) -> None:
    with fake_openai(delay=0.01) as url, Daemon(openai_settings(url), env=KEY) as daemon:
        watcher = Connection("test-watch", endpoints_for(daemon.config()),
                             [protocol.subscription(kind, SESSION) for kind in ("text", "chunk", "llm.done")])
        watcher.open(timeout=30)
        gui = Gui(daemon, display, tmp_path)
        seen: set[str] = set()
        try:
            # 1. the reply carries a tag the allowlist refuses and an attitude command
            question = "<bogus>x</bogus> and <p>1,0,-1</p> please"
            gui.click("entry")
            gui.type(question)
            gui.xdotool("key", "Return")
            _, messages = follow(watcher, seen)
            state = gui.wait(lambda state: state["replies"] >= 1 and "attitude" in state["command"]
                             and "smile" in state["emotion"] and "refused" in state["transcript"],
                             "the reply and its commands", ask=True)
            shown = "".join(m.body.delta for m in messages if m.kind == "text")
            spoken = " ".join(m.body.text for m in messages if m.kind == "chunk")
            assert shown == state["reply"] == "Echo:  and  please. Done  here."
            assert spoken == "Echo: and please. Done here."
            assert [mark.tag for m in messages if m.kind == "chunk" for mark in m.body.marks] == ["bogus", "p", "e"]
            answer = state["transcript"].split("voxpipe: ", 1)[1]
            text, refused = answer.split("\n")[:2]
            assert text == shown and "x" not in text and "bogus" not in text
            assert refused.startswith("[refused command bogus: ")
            assert state["command"] == "attitude +1, boredom 0, stress \u22121"
            assert state["emotion"] == "emotion: smile"
            shutil.copy(gui.screenshot(tmp_path / "voxpipe-gui-commands.png"), "/tmp/voxpipe-gui-commands.png")

            # 2. a reply that repeats itself is cut by the guard, and the window says so
            gui.type("one two three four five six seven eight " * 3)
            gui.xdotool("key", "Return")
            assert wait_done(watcher, next_reply(watcher, seen)).body.guard == "repetition"
            state = gui.wait(lambda state: state["replies"] >= 2, "the cut reply to end")
            assert state["transcript"].rstrip().endswith("eight\n[cut: repetition]")

            # 3. at the narrowest the window goes, every label is still whole and inside it
            labels = ("emotion", "command", "status")
            wide = gui.snapshot()
            assert all(shows_whole(wide, name) for name in labels)
            assert wide["widgets"]["command"][1] == wide["widgets"]["status"][1]   # one line when it fits
            narrow = gui.resize(420, 480)
            assert narrow["status"] == "ready" and all(shows_whole(narrow, name) for name in labels), narrow

            # 4. a command too long to share the line gets one of its own, wrapped, below
            gui.click("entry")
            gui.type("<c>walk over to the player and sit down right next to them</c>")
            gui.xdotool("key", "Return")
            state = gui.wait(lambda state: state["replies"] >= 3 and "walk" in state["command"], "the long command",
                             ask=True)
            assert state["command"] == "command: walk over to the player and sit down right next to them"
            assert all(shows_whole(state, name) for name in labels), state
            assert state["widgets"]["command"][1] > state["widgets"]["status"][1]
            shutil.copy(gui.screenshot(tmp_path / "voxpipe-gui-420.png"), "/tmp/voxpipe-gui-420.png")
        finally:
            code = gui.close()
            watcher.close()
        assert code == 0


def test_gui_without_a_bus_fails_fast(display: str, tmp_path: Path) -> None:
    daemon = Daemon({})
    try:
        result = subprocess.run(daemon.cli("gui"), cwd=ROOT, env={**daemon.env, "DISPLAY": display},
                                capture_output=True, text=True, timeout=60)
    finally:
        daemon.close()
    assert result.returncode == 1
    assert "voxpipe run" in result.stderr
