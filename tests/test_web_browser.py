"""The page of `voxpipe web` in a real browser: Debian's chromium, headless, driven by selenium through
Debian's chromedriver, against a real daemon (the fake OpenAI server, espeak-ng) and a real gateway.

The page's test hook (`window.voxpipeTest`, services/frontends/web/static/app.js) counts the samples its
AudioWorklet actually rendered, as the worklet reports them, and the time to first audio of each reply.
Chromium plays into ALSA's null device (tests/alsa_null.conf): no sound card is needed, and the
audio thread runs at the device's pace as it would on a speaker.

Needs the apt packages chromium and chromium-driver (the Makefile installs them) and selenium (dev extra).
The screenshots, mid-reply and at a phone's width, go to the test's tmp_path and to
/tmp/voxpipe-web-reply.png and /tmp/voxpipe-web-phone.png.
"""

from __future__ import annotations

import shutil
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.openai_server import reply_for
from tests.harness import ROOT, Daemon, fake_openai, free_port, openai_settings
from voxpipe import protocol
from voxpipe.protocol import Message
from voxpipe.runtime import Connection, endpoints_for

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
KEY = {"FAKE_OPENAI_KEY": "test-key"}

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the dev extra) drives the browser")
pytestmark = pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                                reason="needs the apt packages chromium and chromium-driver")


def spoken(reply: str) -> str:
    """The display text of a fake reply: its one tag removed."""
    return reply.replace("<e>smile</e>", "")


def lan_address() -> str | None:
    """This machine's address on its network (the route out; nothing is sent), or None without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if address.startswith("127.") else address


class Gateway:
    """`voxpipe web --port P [args]` as a real process on the daemon's bus; `url` is the link it printed."""

    def __init__(self, daemon: Daemon, *args: str) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(daemon.cli("web", "--port", str(self.port), *args), cwd=ROOT,
                                        env=daemon.env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.output: list[str] = []
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            if line.startswith("voxpipe web: open "):
                self.url = line.split("open ", 1)[1].strip()
                break
        else:
            raise AssertionError(f"voxpipe web did not start:\n{''.join(self.output)}")
        threading.Thread(target=lambda: self.output.extend(self.process.stdout or ()), daemon=True).start()

    def close(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


class Browser:
    """Headless chromium on the page; `hook(name, ...)` calls the page's window.voxpipeTest."""

    def __init__(self, env: dict[str, str]) -> None:
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
        options = Options()
        options.binary_location = str(CHROMIUM)
        for argument in ("--headless=new", "--no-sandbox", "--autoplay-policy=no-user-gesture-required",
                         "--window-size=1000,760", "--disable-dev-shm-usage", "--lang=en-US"):
            options.add_argument(argument)
        # chromedriver starts chromium with its own environment: ALSA's null device plays the sound.
        self.driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER), env=env), options=options)
        self.driver.set_script_timeout(30)

    def open(self, url: str) -> None:
        self.driver.get(url)
        self.wait(lambda: self.hook("connected"), "the page's WebSocket to open")

    def hook(self, name: str, *args: Any) -> Any:
        return self.driver.execute_script(f"return window.voxpipeTest && window.voxpipeTest.{name}(...arguments)",
                                          *args)

    def wait(self, condition: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(0.02)
        logs = self.driver.get_log("browser") if hasattr(self.driver, "get_log") else []
        raise AssertionError(f"gave up waiting for {what}; browser log: {logs}")

    def texts(self, selector: str) -> list[str]:
        """The text of each element the CSS selector finds, read at once inside the page."""
        return list(self.driver.execute_script(
            "return [...document.querySelectorAll(arguments[0])].map((node) => node.textContent)", selector))

    def ask(self, text: str) -> str:
        """Type into the text box and press Enter (a user gesture: it also starts the audio); the reply id."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys
        before = self.hook("reply")
        box = self.driver.find_element(By.ID, "text")
        box.send_keys(text, Keys.ENTER)
        reply = self.wait(lambda: (lambda now: now if now and now != before else None)(self.hook("reply")),
                          "the request to go out")
        return str(reply["id"])

    def close(self) -> None:
        self.driver.quit()


class Watch:
    """The test's view of a session on the bus: every message, with the wall time it came."""

    KINDS = ("text", "audio", "llm.done", "playback")

    def __init__(self, daemon: Daemon, session: str) -> None:
        self.client = Connection("web-test", endpoints_for(daemon.config()),
                                 [protocol.subscription(kind, session) for kind in self.KINDS])
        self.client.open(timeout=30)
        self.seen: list[tuple[float, Message]] = []

    def until(self, what: str, test: Callable[[Message], bool], timeout: float = 60.0) -> Message:
        deadline = time.monotonic() + timeout
        while True:
            found = next((message for _, message in self.seen if test(message)), None)
            if found is not None:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout} s; seen: {[m.kind for _, m in self.seen]}")
            message = self.client.receive(0.05)
            if message is not None:
                self.seen.append((time.time(), message))

    def drain(self) -> None:
        while (message := self.client.receive(0.0)) is not None:
            self.seen.append((time.time(), message))

    def audio_seconds(self, id: str) -> float:
        return sum(len(m.body.pcm) / (m.body.channels * m.body.width) / m.body.rate for _, m in self.seen
                   if m.kind == "audio" and m.id == id)

    def first_audio_at(self, id: str) -> float:
        return next(at for at, m in self.seen if m.kind == "audio" and m.id == id)

    def close(self) -> None:
        self.client.close()


@contextmanager
def web_stack(delay: float, *gateway_args: str) -> Iterator[tuple[Daemon, Gateway, Browser]]:
    """A daemon (fake OpenAI server with `delay` between tokens, espeak-ng), its gateway, and a browser."""
    with fake_openai(delay=delay) as url, Daemon({**openai_settings(url), "tts": {"engine": "espeak"}},
                                                  env=KEY) as daemon:
        gateway = Gateway(daemon, *gateway_args)
        browser = None
        try:
            browser = Browser(daemon.env)
            yield daemon, gateway, browser
        finally:
            if browser is not None:
                browser.close()
            gateway.close()


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[Daemon, Gateway, Browser]]:
    with web_stack(delay=0.05) as running:
        yield running


def stored(db: Path, session: str, id: str, timeout: float = 10.0) -> tuple[str, str, int]:
    """(content, spoken, interrupted) of the reply once history has stored what was heard."""
    deadline = time.monotonic() + timeout
    while True:
        with sqlite3.connect(db) as database:
            row = database.execute("SELECT content, spoken, interrupted FROM messages WHERE session=? AND request_id=?"
                                   " AND role='assistant'", (session, id)).fetchone()
        if (row is not None and row[1] is not None) or time.monotonic() > deadline:
            assert row is not None and row[1] is not None, f"no heard text stored for {id}: {row}"
            return row
        time.sleep(0.1)


def test_the_page_shows_the_reply_as_it_grows_and_plays_all_of_its_audio(stack: tuple[Daemon, Gateway, Browser]
                                                                        ) -> None:
    daemon, gateway, browser = stack
    session = "web-play"
    watch = Watch(daemon, session)
    try:
        browser.open(f"{gateway.url}?session={session}")
        question = "Hello browser, tell me about the sea and the ships"
        rendered_before = browser.hook("renderedSamples")
        id = browser.ask(question)
        # the reply grows: its text is read while the tokens still come (3 characters every 50 ms)
        shown: list[str] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and browser.hook("reply", id)["status"] is None:
            text = browser.hook("reply", id)["text"]
            if text and (not shown or text != shown[-1]):
                shown.append(text)
            time.sleep(0.03)
        whole = spoken(reply_for(question))
        done = watch.until("llm.done", lambda m: m.kind == "llm.done" and m.id == id)
        assert done.body.status == "ok"
        assert browser.hook("reply", id)["text"] == whole
        assert len(shown) >= 5 and all(whole.startswith(part) for part in shown), shown
        assert shown == sorted(shown, key=len)
        from selenium.webdriver.common.by import By
        assert browser.driver.find_element(By.CSS_SELECTOR, ".reply.mine .assistant").text == whole
        assert browser.driver.find_element(By.ID, "emotion").text == "smile"
        # every sample of the reply's audio is rendered: the page reports the final `finished`
        watch.until("the page's final playback", lambda m: m.kind == "playback" and m.id == id and m.body.final)
        finished = [m for _, m in watch.seen if m.kind == "playback" and m.id == id]
        assert finished[-1].body.event == "finished" and finished[-1].src == "web"
        assert {m.body.event for m in finished} == {"started", "finished"}
        browser.wait(lambda: browser.hook("reply", id)["reported"], "the reply to play out")
        watch.until("the final audio", lambda m: m.kind == "audio" and m.id == id and m.body.final and m.body.last)
        rendered = (browser.hook("renderedSamples") - rendered_before) / browser.hook("sampleRate")
        assert rendered == pytest.approx(watch.audio_seconds(id), rel=0.10)
        assert browser.hook("reply", id)["gaps"] == 0  # gapless: never ran dry before the reply's end
        ttfa = browser.hook("lastTtfaMs")
        assert 0 < ttfa < 10_000
        meta = browser.driver.find_element(By.CSS_SELECTOR, ".reply.mine .meta").text
        assert f"first audio {round(ttfa)} ms" in meta
    finally:
        watch.close()


def test_stop_silences_the_page_at_once_ends_the_reply_and_history_keeps_what_was_heard(
        stack: tuple[Daemon, Gateway, Browser], tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    daemon, gateway, browser = stack
    session = "web-stop"
    watch = Watch(daemon, session)
    try:
        browser.open(f"{gateway.url}?session={session}")
        id = browser.ask("Now a long story please " * 8)
        # mid-reply: the first chunk sounds while the model is still writing
        browser.wait(lambda: browser.hook("reply", id)["firstRenderWall"], "the first sample to be rendered")
        time.sleep(0.3)
        shot = tmp_path / "voxpipe-web-reply.png"
        assert browser.driver.save_screenshot(str(shot)) and shot.stat().st_size > 5000
        shutil.copy(shot, "/tmp/voxpipe-web-reply.png")
        assert browser.hook("reply", id)["status"] is None, "the reply ended before Stop: make it longer"
        # Stop, then the count of rendered samples is read 100 ms and 600 ms later, inside the page
        at_100, at_600, latency = browser.driver.execute_async_script("""
            const done = arguments[arguments.length - 1];
            const hook = window.voxpipeTest;
            document.getElementById("stop").click();
            setTimeout(() => {
              const early = hook.renderedSamples();
              setTimeout(() => done([early, hook.renderedSamples(), hook.stopLatencyMs()]), 500);
            }, 100);
        """)
        assert at_100 == at_600, "the worklet went on rendering after Stop"
        assert 0 <= latency < 100
        done = watch.until("llm.done", lambda m: m.kind == "llm.done" and m.id == id)
        assert done.body.status == "interrupted"
        stopped = watch.until("the page's stopped report",
                              lambda m: m.kind == "playback" and m.id == id and m.body.final)
        assert stopped.src == "web" and stopped.body.event == "stopped" and stopped.body.chunk == 0
        assert 0 < stopped.body.heard < 1 and stopped.body.heard_chars > 0, stopped.body  # 0.3 s of chunk 0
        content, heard, interrupted = stored(daemon.db_path, session, id)
        assert interrupted == 1 and heard and spoken(content).startswith(heard) and len(heard) < len(content), \
            (heard, content)
        browser.wait(lambda: browser.hook("reply", id)["status"] == "interrupted", "the page to show the cut")
        # the history panel shows the session as history tells it: what was asked, and what was heard
        browser.driver.find_element(By.ID, "history-panel").click()
        browser.driver.find_element(By.ID, "history-refresh").click()
        browser.wait(lambda: browser.texts("#history li.assistant") == [heard],
                     "the history panel to show the heard text")
        assert browser.texts("#history li.user")[0].startswith("Now a long story")
    finally:
        watch.close()


def test_a_second_tab_on_the_session_sees_the_reply_and_only_the_asking_tab_plays(
        stack: tuple[Daemon, Gateway, Browser], tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    daemon, gateway, browser = stack
    session = "web-tabs"
    watch = Watch(daemon, f"{session}-2")
    url = f"{gateway.url}?session={session}"
    browser.open(url)
    asking = browser.driver.current_window_handle
    browser.driver.switch_to.new_window("tab")
    browser.open(url)
    browser.driver.find_element(By.TAG_NAME, "main").click()  # a gesture: this tab could play too
    other = browser.driver.current_window_handle
    try:
        browser.driver.switch_to.window(asking)
        question = "Two tabs are open"
        id = browser.ask(question)
        browser.wait(lambda: browser.hook("reply", id)["reported"], "the asking tab to play the reply")
        assert browser.hook("renderedSamples") > 0
        browser.driver.switch_to.window(other)
        browser.wait(lambda: (browser.hook("reply", id) or {}).get("status") == "ok", "the other tab to see the reply")
        assert browser.hook("reply", id)["text"] == spoken(reply_for(question))
        assert browser.hook("renderedSamples") == 0 and browser.hook("reply", id)["sourceSamples"] == 0
        # the page speaks Russian too: the switch relabels it at once
        browser.driver.find_element(By.CSS_SELECTOR, "[data-lang=ru]").click()
        assert browser.driver.find_element(By.ID, "stop").text == "Стоп"
        assert browser.driver.find_element(By.ID, "connection").text == "подключено"
        browser.driver.find_element(By.CSS_SELECTOR, "[data-lang=en]").click()
        assert browser.driver.find_element(By.ID, "stop").text == "Stop"
        # the session picker reconnects the tab to another session, which the first tab does not see
        browser.driver.switch_to.window(asking)
        browser.driver.execute_script("const box = document.getElementById('session'); box.value = arguments[0];"
                                      "box.dispatchEvent(new Event('change'))", f"{session}-2")
        browser.wait(lambda: browser.hook("connected"), "the tab to reconnect")
        elsewhere = browser.ask("In another session")
        watch.until("the reply in the other session", lambda m: m.kind == "llm.done" and m.id == elsewhere)
        browser.wait(lambda: browser.hook("reply", elsewhere)["status"] == "ok", "the reply on the page")
        browser.driver.switch_to.window(other)
        assert browser.hook("reply", elsewhere) is None
        # on a phone's width the page fits: nothing runs off to the side
        browser.driver.set_window_size(390, 844)
        assert browser.driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        shot = tmp_path / "voxpipe-web-phone.png"
        assert browser.driver.save_screenshot(str(shot))
        shutil.copy(shot, "/tmp/voxpipe-web-phone.png")
        browser.driver.set_window_size(1000, 760)
    finally:
        watch.close()
        browser.driver.switch_to.window(other)
        browser.driver.close()
        browser.driver.switch_to.window(asking)


def test_from_another_device_the_page_needs_the_token_and_plays_without_an_audio_worklet() -> None:
    """A phone on the LAN: a non-loopback address, so the token; and plain http:// from there is no secure
    context, so the browser has no AudioWorklet and the page runs the same processor on its main thread."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    address = lan_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to open the page on")
    with web_stack(0.02, "--host", "0.0.0.0") as (daemon, gateway, browser):
        token = gateway.url.partition("?token=")[2]
        assert token, gateway.url
        page = f"http://{address}:{gateway.port}/"
        browser.driver.get(f"{page}?session=web-lan")
        assert "?token=" in browser.driver.find_element(By.TAG_NAME, "body").text  # refused: no token
        browser.driver.get(f"{page}?session=web-lan&token=wrong-{token}")
        assert "?token=" in browser.driver.find_element(By.TAG_NAME, "body").text
        watch = Watch(daemon, "web-lan")
        try:
            browser.open(f"{page}?token={token}&session=web-lan")
            assert browser.driver.execute_script("return window.isSecureContext") is False
            id = browser.ask("Hello from the phone")
            browser.wait(lambda: browser.hook("reply", id)["reported"], "the reply to play out")
            watch.until("the final audio", lambda m: m.kind == "audio" and m.id == id and m.body.final and m.body.last)
            rendered = browser.hook("renderedSamples") / browser.hook("sampleRate")
            assert rendered == pytest.approx(watch.audio_seconds(id), rel=0.10)
            assert browser.hook("reply", id)["text"] == spoken(reply_for("Hello from the phone"))
            # Escape is Stop as well: mid-reply, the main-thread player falls silent and the reply ends
            id = browser.ask("Now a long story please " * 8)
            browser.wait(lambda: browser.hook("reply", id)["firstRenderWall"], "the first sample to be rendered")
            browser.driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
            stopped = watch.until("the page's stopped report", lambda m: m.kind == "playback" and m.id == id
                                  and m.body.final)
            assert stopped.body.event == "stopped" and stopped.body.heard < 1
            assert watch.until("llm.done", lambda m: m.kind == "llm.done" and m.id == id).body.status == "interrupted"
            rendered = browser.hook("renderedSamples")
            time.sleep(0.3)
            assert browser.hook("renderedSamples") == rendered
        finally:
            watch.close()
