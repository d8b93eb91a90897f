"""`voxpipe web` (docs/protocol.md §8) as a real process over a real daemon, driven by aiohttp's WebSocket
client as a browser tab would: the reply's frames in order, its audio only on the asking tab, cancel,
the Origin and token checks, and the limits. The page itself is tested in a browser elsewhere."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.fakes.openai_server import reply_for
from tests.harness import ROOT, Daemon, fake_openai, free_port, heartbeat_pids, openai_settings, stop_process
from tests.harness import connect as bus_connect
from voxpipe.config import ConfigError
from voxpipe.frontends.web.access import access_token
from voxpipe.protocol import Audio

KEY = {"FAKE_OPENAI_KEY": "test-key"}


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    with fake_openai(delay=0.05) as url, Daemon(openai_settings(url), env=KEY) as running:
        yield running


@dataclass
class Web:
    """A running `voxpipe web` and the link it printed."""

    process: subprocess.Popen[str]
    link: str
    port: int
    printed: list[str] = field(default_factory=list)

    def url(self, path: str, token: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}" + (f"{'&' if '?' in path else '?'}token={token}" if token else "")

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token(self) -> str:
        return self.link.partition("?token=")[2]


@contextlib.contextmanager
def gateway(daemon: Daemon, *args: str) -> Iterator[Web]:
    port = free_port()
    process = subprocess.Popen(daemon.cli("web", "--port", str(port), *args), cwd=ROOT, env=daemon.env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None
    printed = []
    try:
        while not printed or "voxpipe web: open " not in printed[-1]:
            line = process.stdout.readline()
            assert line, f"voxpipe web exited: {process.wait()} {process.stderr.read() if process.stderr else ''}"
            printed.append(line)
        yield Web(process, printed[-1].split("open ", 1)[1].strip(), port, printed)
    finally:
        code, err = stop_process(process)
        assert code == 0, err


@pytest.fixture()
def web(daemon: Daemon) -> Iterator[Web]:
    with gateway(daemon) as running:
        yield running


@dataclass
class Tab:
    """What one WebSocket received: JSON frames and binary audio frames (header, PCM)."""

    ws: aiohttp.ClientWebSocketResponse
    frames: list[dict[str, Any]] = field(default_factory=list)
    audio: list[tuple[dict[str, Any], bytes]] = field(default_factory=list)

    async def send(self, **frame: Any) -> None:
        await self.ws.send_str(json.dumps(frame))

    async def until(self, done: Any, timeout: float = 30.0) -> None:
        """Read frames until done(self) holds."""
        deadline = time.monotonic() + timeout
        while not done(self):
            message = await self.ws.receive(timeout=max(0.01, deadline - time.monotonic()))
            if message.type == aiohttp.WSMsgType.TEXT:
                self.frames.append(json.loads(message.data))
            elif message.type == aiohttp.WSMsgType.BINARY:
                size = struct.unpack("<I", message.data[:4])[0]
                self.audio.append((json.loads(message.data[4:4 + size]), message.data[4 + size:]))
            else:
                raise AssertionError(f"the socket ended: {message}")

    async def drain(self, seconds: float) -> None:
        """Read whatever comes within `seconds`."""
        with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
            await self.until(lambda _: False, timeout=seconds)

    def of(self, kind: str, id: str = "") -> list[dict[str, Any]]:
        return [frame for frame in self.frames if frame["type"] == kind and (not id or frame.get("id") == id)]


def open_tab(http: aiohttp.ClientSession, web: Web, session: str, token: str = "", origin: str = "") -> Any:
    return http.ws_connect(web.url(f"/ws?session={session}", token), origin=origin or web.origin)


def samples(audio: list[tuple[dict[str, Any], bytes]]) -> int:
    return sum(len(pcm) // (header["width"] * header["channels"]) for header, pcm in audio)


def reply_over(tab: Tab, id: str, audio: bool) -> bool:
    """The reply's text, its llm.done, its one command (history sends it after both) and, with `audio`,
    its final audio frame have come."""
    texts = tab.of("text", id)
    ended = bool(tab.of("llm.done", id)) and bool(texts) and texts[-1]["final"] and bool(tab.of("command", id))
    return ended and (not audio or any(header["final"] and header["last"] for header, _ in tab.audio))


def test_the_reply_streams_to_every_tab_and_its_audio_only_to_the_asking_one(daemon: Daemon, web: Web) -> None:
    probe = bus_connect(daemon.runtime_dir, "test-audio", "audio")

    async def main() -> tuple[Tab, Tab]:
        async with aiohttp.ClientSession() as http, open_tab(http, web, "w1") as ws1, open_tab(http, web, "w1") as ws2:
            asker, other = Tab(ws1), Tab(ws2)
            for tab in (asker, other):
                await tab.until(lambda tab: bool(tab.frames))
            await asker.send(type="request", id="r1", text="Hello web", profile="", stream=None, playback="client")
            await asker.until(lambda tab: reply_over(tab, "r1", audio=True))
            await other.until(lambda tab: reply_over(tab, "r1", audio=False))
            await other.drain(0.5)
            return asker, other

    try:
        asker, other = asyncio.run(main())
        bus_audio = []
        while not (bus_audio and bus_audio[-1].final and bus_audio[-1].last):
            message = probe.receive(5.0)
            assert message is not None, "the bus carried no final audio frame"
            if message.id == "r1" and isinstance(message.body, Audio):
                bus_audio.append(message.body)
    finally:
        probe.close()
    hello = asker.frames[0]
    assert hello["type"] == "hello" and hello["session"] == "w1" and hello["default_profile"] == "fake"
    assert hello["limits"] == {"max_frame_bytes": 65536, "messages_per_s": 20}
    for tab in (asker, other):
        texts = tab.of("text", "r1")
        assert [frame["seq"] for frame in texts] == sorted(frame["seq"] for frame in texts)
        done = tab.of("llm.done", "r1")
        assert len(done) == 1 and done[0]["status"] == "ok" and done[0]["text"] == reply_for("Hello web")
        assert "".join(frame["delta"] for frame in texts) == reply_for("Hello web").replace("<e>smile</e>", "")
        assert [(frame["name"], frame["session"]) for frame in tab.of("command", "r1")] == [("e", "w1")]
    assert other.audio == []
    assert samples(asker.audio) == sum(len(frame.pcm) // (frame.width * frame.channels) for frame in bus_audio)
    header = asker.audio[0][0]
    assert set(header) == {"id", "chunk", "seq", "rate", "channels", "width", "last", "final", "chars"}
    assert header["id"] == "r1" and header["width"] == 2 and header["rate"] > 0


def test_cancel_ends_the_reply_as_interrupted(web: Web) -> None:
    async def main() -> Tab:
        async with aiohttp.ClientSession() as http, open_tab(http, web, "w2") as ws:
            tab = Tab(ws)
            await tab.send(type="request", id="long", text="Tell me a long story " * 20, playback="client")
            await tab.until(lambda tab: bool(tab.of("text", "long")))
            await tab.send(type="cancel", id="")
            await tab.until(lambda tab: bool(tab.of("llm.done", "long")))
            return tab

    done = asyncio.run(main()).of("llm.done", "long")
    assert done[0]["status"] == "interrupted"


def test_the_tabs_playback_reports_go_on_the_bus_for_its_own_client_replies_only(daemon: Daemon, web: Web) -> None:
    probe = bus_connect(daemon.runtime_dir, "test-playback", "playback")

    async def main() -> Tab:
        async with aiohttp.ClientSession() as http, open_tab(http, web, "w9") as ws1, open_tab(http, web, "w9") as ws2:
            asker, other = Tab(ws1), Tab(ws2)
            await asker.send(type="request", id="p1", text="Hello", playback="client")
            await asker.until(lambda tab: bool(tab.of("llm.done", "p1")))
            await other.send(type="playback", id="p1", event="started", chunk=0)  # not the asking tab
            await other.until(lambda tab: bool(tab.of("refused")))
            await asker.send(type="playback", id="p1", event="started", chunk=0)
            await asker.send(type="playback", id="p1", event="stopped", chunk=0, final=True, heard=0.5,
                             heard_chars=4)
            await other.until(lambda tab: len(tab.of("playback", "p1")) == 2)
            return other

    try:
        other = asyncio.run(main())
        started = probe.receive(5.0)
        seen = probe.receive(5.0)
    finally:
        probe.close()
    assert "is no reply this tab asked" in other.of("refused")[0]["reason"]
    # the gateway stamps `started` with its chunk's first audio, as the player does: history's TTFA holds
    assert started is not None and started.body.event == "started" and 0 < started.body.audio_ts <= time.time()
    assert seen is not None and seen.src == "web" and (seen.session, seen.id) == ("w9", "p1")
    assert (seen.body.event, seen.body.final, seen.body.heard, seen.body.heard_chars) == ("stopped", True, 0.5, 4)
    echoed = other.of("playback", "p1")[1]
    assert (echoed["event"], echoed["heard"], echoed["session"]) == ("stopped", 0.5, "w9")


def test_at_most_16_tabs_at_once(web: Web) -> None:
    async def main() -> int:
        async with aiohttp.ClientSession() as http, contextlib.AsyncExitStack() as stack:
            for _ in range(16):
                await stack.enter_async_context(open_tab(http, web, "w10"))
            try:
                async with open_tab(http, web, "w10"):
                    return 101
            except aiohttp.WSServerHandshakeError as exc:
                return exc.status

    assert asyncio.run(main()) == 503


def test_history_comes_back_for_the_tabs_session(daemon: Daemon, web: Web) -> None:
    assert daemon.say("Remember the web", "--session", "w3").returncode == 0

    async def main() -> Tab:
        async with aiohttp.ClientSession() as http, open_tab(http, web, "w3") as ws:
            tab = Tab(ws)
            await tab.send(type="history", limit=10)
            await tab.until(lambda tab: bool(tab.of("history")))
            return tab

    messages = asyncio.run(main()).of("history")[0]["messages"]
    assert {"role": "user", "content": "Remember the web"} in messages
    assert any(turn["role"] == "assistant" and "Echo: Remember the web." in turn["content"] for turn in messages)


def test_a_foreign_origin_or_none_is_refused(web: Web) -> None:
    async def status(origin: str | None) -> int:
        headers = {} if origin is None else {"Origin": origin}
        async with aiohttp.ClientSession(skip_auto_headers=["Origin"]) as http:
            try:
                async with http.ws_connect(web.url("/ws?session=w4"), headers=headers):
                    return 101
            except aiohttp.WSServerHandshakeError as exc:
                return exc.status

    assert asyncio.run(status("http://evil.example")) == 403
    assert asyncio.run(status(f"http://localhost:{web.port}")) == 403  # not the Host the tab asked
    assert asyncio.run(status(None)) == 403
    assert asyncio.run(status(web.origin)) == 101


def test_without_a_token_only_a_loopback_host_is_served(web: Web) -> None:
    """A DNS-rebinding page reaches 127.0.0.1 under its own name: its Host is not loopback."""
    async def status(host: str) -> int:
        async with aiohttp.ClientSession() as http, http.get(web.url("/static/none.js"),
                                                             headers={"Host": host}) as response:
            return response.status

    assert asyncio.run(status(f"evil.example:{web.port}")) == 403
    assert asyncio.run(status(f"localhost:{web.port}")) == 404


def test_the_page_is_served_with_headers_that_keep_it_to_itself(web: Web) -> None:
    async def main() -> tuple[int, Any, str]:
        async with aiohttp.ClientSession() as http, http.get(web.url("/")) as response:
            return response.status, response.headers, await response.text()

    status, headers, page = asyncio.run(main())
    assert status == 200 and "<html" in page.lower()
    assert headers["Content-Security-Policy"].startswith("default-src 'self'")
    assert headers["X-Frame-Options"] == "DENY" and headers["Referrer-Policy"] == "no-referrer"


def test_stopping_closes_the_open_tabs_as_going_away(daemon: Daemon) -> None:
    async def main(web: Web) -> Any:
        async with aiohttp.ClientSession() as http, open_tab(http, web, "w8") as ws:
            tab = Tab(ws)
            await tab.until(lambda tab: bool(tab.frames))
            web.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(AssertionError):
                await tab.until(lambda _: False, timeout=10)
            return ws.close_code

    with gateway(daemon) as web:  # the context checks that it then exits 0
        assert asyncio.run(main(web)) == 1001


def test_a_non_loopback_bind_needs_the_printed_token(daemon: Daemon) -> None:
    with gateway(daemon, "--host", "0.0.0.0") as web:
        assert web.token and "not a loopback address" in "".join(web.printed)

        async def main() -> tuple[int, int, int, str]:
            async with aiohttp.ClientSession() as http:
                async with http.get(web.url("/")) as bare, http.get(web.url("/", "wrong")) as wrong, \
                        http.get(web.url("/static/none.js", web.token)) as good:
                    codes = bare.status, wrong.status, good.status
                async with http.get(web.url("/", web.token)) as page:
                    assets = re.findall(r'(?:src|href)="(static/[^"]+)"', await page.text())
                assert assets and all(asset.endswith(f"?token={web.token}") for asset in assets), assets
                for asset in assets:  # the page's own links carry the token
                    async with http.get(web.url(f"/{asset}")) as response:
                        assert response.status == 200, asset
                try:
                    async with open_tab(http, web, "w5"):
                        pass
                except aiohttp.WSServerHandshakeError as exc:
                    refused = exc.status
                async with open_tab(http, web, "w5", web.token) as ws:
                    tab = Tab(ws)
                    await tab.until(lambda tab: bool(tab.frames))
                    return (*codes, refused, tab.frames[0]["type"])

        bare, wrong, good, refused, first = asyncio.run(main())
        assert (bare, wrong, refused) == (403, 403, 403)
        assert good == 404 and first == "hello"  # past the check: no such file, and the socket opens


def test_an_oversize_frame_is_refused_and_the_tab_goes_on(web: Web) -> None:
    async def main() -> Tab:
        async with aiohttp.ClientSession() as http, open_tab(http, web, "w6") as ws:
            tab = Tab(ws)
            await tab.ws.send_str(json.dumps({"type": "request", "id": "big", "text": "x" * 100_000}))
            await tab.send(type="nonsense")
            await tab.ws.send_str("{not json")
            await tab.send(type="history", limit=1)
            await tab.until(lambda tab: bool(tab.of("history")))
            return tab

    reasons = [frame["reason"] for frame in asyncio.run(main()).of("refused")]
    assert len(reasons) == 3 and reasons[0].startswith("too big") and "unknown type" in reasons[1]
    assert reasons[2].startswith("not JSON")


def test_a_flood_is_refused_then_closed_with_1008(web: Web) -> None:
    async def main() -> tuple[Tab, Any]:
        async with aiohttp.ClientSession() as http, open_tab(http, web, "w7") as ws:
            tab = Tab(ws)
            for _ in range(200):
                await tab.send(type="history", limit=0)
            with contextlib.suppress(AssertionError):
                await tab.until(lambda _: False, timeout=10)
            return tab, ws.close_code

    tab, code = asyncio.run(main())
    assert code == 1008
    assert any(frame["reason"].startswith("too fast") for frame in tab.of("refused"))


def test_a_port_in_use_exits_2_naming_it(daemon: Daemon) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(daemon.cli("web", "--port", str(port)), cwd=ROOT, env=daemon.env, text=True,
                                capture_output=True, timeout=30)
    assert result.returncode == 2 and f"port {port}" in result.stderr and "in use" in result.stderr


def test_a_token_file_must_be_private_and_then_is_the_token(daemon: Daemon, tmp_path: Path) -> None:
    token = tmp_path / "web-token"
    token.write_text("a-token-of-the-users-own-0123456789\n")
    token.chmod(0o644)
    env = {**daemon.env, "VOXPIPE_WEB__TOKEN_FILE": str(token)}
    result = subprocess.run(daemon.cli("web", "--port", str(free_port())), cwd=ROOT, env=env, text=True,
                            capture_output=True, timeout=30)
    assert result.returncode == 2 and f"chmod 600 {token}" in result.stderr
    token.chmod(0o600)
    assert access_token("127.0.0.1", str(token)) == "a-token-of-the-users-own-0123456789"
    token.write_text("short\n")
    with pytest.raises(ConfigError, match="16 to 512 URL-safe characters"):
        access_token("127.0.0.1", str(token))


def test_run_starts_and_supervises_the_gateway_when_web_is_enabled() -> None:
    port = free_port()
    with Daemon({"run": {"stages": ["history"]}, "web": {"enabled": True, "port": port}}) as daemon:
        assert f"voxpipe web: open http://127.0.0.1:{port}/\n" in "".join(daemon.log)  # before `voxpipe ready`
        assert "web" in heartbeat_pids(daemon.runtime_dir, "web")
        status = daemon.run_cli("status")
        assert status.returncode == 0 and "\nweb " in status.stdout
