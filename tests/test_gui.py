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
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from services import protocol
from services.runtime import Connection, endpoints_for
from tests.fakes.openai_server import reply_for
from tests.harness import ROOT, Daemon, fake_openai, openai_settings
from tests.screenshot import screenshot

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

    def wait(self, condition: Callable[[dict[str, Any]], bool], what: str, timeout: float = 60.0) -> dict[str, Any]:
        """Poll the --dump file until `condition` holds for the state it holds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
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
            assert wait_done(watcher, first)["status"] == "ok"
            state = gui.wait(lambda state: state["replies"] >= 1, "the first reply to finish")
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
            assert wait_done(watcher, second)["status"] == "interrupted"
            state = gui.wait(lambda state: state["replies"] >= 2, "the stopped reply to end")
            assert state["transcript"].rstrip().endswith("[stopped]")
            assert not state["busy"]
            assert "here." not in state["reply"]
            shutil.copy(gui.screenshot(tmp_path / "voxpipe-gui-stopped.png"), "/tmp/voxpipe-gui-stopped.png")
        finally:
            code = gui.close()
            watcher.close()
        assert code == 0
        assert json.loads(gui.dump.read_text())["replies"] == 2  # the dump on exit


def test_gui_without_a_bus_fails_fast(display: str, tmp_path: Path) -> None:
    daemon = Daemon({})
    try:
        result = subprocess.run(daemon.cli("gui"), cwd=ROOT, env={**daemon.env, "DISPLAY": display},
                                capture_output=True, text=True, timeout=60)
    finally:
        daemon.close()
    assert result.returncode == 1
    assert "voxpipe run" in result.stderr
