"""`voxpipe chat` on a real pseudo-terminal against a real daemon, typed at like a person."""

from __future__ import annotations

import time

from tests.harness import ROOT, Daemon, fake_openai, openai_settings
from tests.terminal import CTRL_C, CTRL_D, ENTER, Terminal
from voxpipe import protocol
from voxpipe.runtime import Connection, endpoints_for

KEY = {"FAKE_OPENAI_KEY": "test-key"}
PROMPT = r"you> "


def chat(daemon: Daemon, session: str) -> Terminal:
    return Terminal(daemon.cli("chat", "--session", session, "--timeout", "60"), env=daemon.env, cwd=ROOT)


def say_line(term: Terminal, text: str, delay: float = 0.03) -> int:
    """Type a line and press Enter; returns the screen position before the reply."""
    term.type(text, delay)
    position = term.mark()
    term.press(ENTER)
    return position


def test_chat_streams_replies_commands_and_slash_commands() -> None:
    with fake_openai() as url, Daemon(openai_settings(url), env=KEY) as daemon:
        term = chat(daemon, "tty1")
        try:
            term.expect(PROMPT)
            start = say_line(term, "Hello chat")
            term.expect(r"Echo: Hello chat\. Done \[e: smile\] here\.", after=start)  # where the tag stood
            term.expect(PROMPT, after=start)

            start = say_line(term, "/history")
            term.expect(r"you: Hello chat\n.*assistant: Echo: Hello chat\. Done <e>smile</e> here\.", after=start)
            term.expect(PROMPT, after=start)

            start = say_line(term, "/stream off")
            term.expect(r"\[streaming: off\].*" + PROMPT, after=start)
            start = say_line(term, "All at once")
            term.expect(r"Echo: All at once\. Done \[e: smile\] here\..*" + PROMPT, after=start)

            start = say_line(term, "/voice en-us")
            term.expect(r"\[voice: en-us\].*" + PROMPT, after=start)
            start = say_line(term, "/session other")
            term.expect(r"\[session: other\].*" + PROMPT, after=start)
            start = say_line(term, "/history")
            term.expect(r"no messages in session 'other'.*" + PROMPT, after=start)
            start = say_line(term, "/help")
            term.expect(r"/session NAME.*/stream on\|off.*" + PROMPT, after=start)

            term.press(CTRL_D)  # at the prompt: quit
            assert term.wait(30) == 0
        finally:
            term.close()


def test_ctrl_c_interrupts_a_reply_everywhere_and_then_quits() -> None:
    session = "tty2"
    with fake_openai(delay=0.05) as url, Daemon(openai_settings(url), env=KEY) as daemon:
        watcher = Connection("test-watch", endpoints_for(daemon.config()),
                             [protocol.subscription("llm.done", session)])
        watcher.open(timeout=30)
        term = chat(daemon, session)
        try:
            term.expect(PROMPT)
            # ~230 characters of reply in 3-character pieces 50 ms apart: about 4 s of streaming
            start = say_line(term, "please tell me a long story " * 7, delay=0.01)
            term.expect(r"Echo: please tell", after=start)
            interrupted_at = term.mark()
            term.press(CTRL_C)
            term.expect(r"\[interrupted\].*" + PROMPT, timeout=15, after=interrupted_at)

            done = None
            deadline = time.monotonic() + 30
            while done is None and time.monotonic() < deadline:
                done = watcher.receive(1.0)
            assert done is not None, "no llm.done after the interrupt"
            assert done.body.status == "interrupted", done.body
            assert "here." not in term.screen[start:], "the reply kept streaming after Ctrl-C"

            term.press(CTRL_C)  # at the prompt: quit
            assert term.wait(30) == 0
        finally:
            term.close()
            watcher.close()


def test_chat_without_a_bus_fails_fast() -> None:
    daemon = Daemon({})  # never started: there is no bus
    try:
        term = chat(daemon, "nobus")
        try:
            term.expect(r"no voxpipe bus.*voxpipe run", timeout=30)
            assert term.wait(30) == 1
        finally:
            term.close()
    finally:
        daemon.close()

