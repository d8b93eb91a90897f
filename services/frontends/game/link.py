"""`voxpipe game`: the MiSide mod's TCP protocol on 127.0.0.1:12345, bridged to the bus.

The shell around `core.Link`: it accepts the mod's connections, reads one JSON object from each
(never waiting for an end of file: the mod does not close its side, NetworkController.cs), hands it
to the core, and carries out the effects: answers written in one piece and the connection closed,
messages published, voice files written and deleted. A thread reads the bus and hands each message
to the loop, as `voxpipe web` does; the WAV conversion runs in one worker thread, in order.

Only the user's own programs are served: on Linux a connection from another user's process (found in
/proc/net/tcp) is refused, since loopback is open to every local user and the protocol has no
authentication. Each connection's cost is bounded: `read_timeout_s` to send a whole request (slow-loris), at most
`max_request_bytes`, at most `max_connections` open at once. Non-JSON is closed without an answer;
a complete but malformed request gets a well-typed empty answer. Loopback only: the protocol has no
authentication, so any other address is refused at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import json
import logging
import os
import re
import secrets
import signal
import socket
import stat
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import zmq

from ... import protocol
from ...config import EXIT_OK, EXIT_USAGE, Config, ConfigError
from ...files import PRIVATE_DIR, exposure, open_private, private_dirs
from ...protocol import Audio, Body, Cancel, Chunk, Heartbeat, LlmDone, Message, ProtocolError
from ...runtime import BusUnavailable, Connection, endpoints_for, sdnotify
from ...runtime.broker import runtime_dir
from ...runtime.instance import InstanceLock
from ...runtime.loop_feed import feed_loop, serve_attached
from ...stages.audio import AudioFormat
from ..web.access import is_loopback
from . import core, dialect_b
from .wav import game_duration_s, silent_wav, to_game_wav
from .wire import BadFrame, Malformed, ObjectScanner, detect, parse_a

log = logging.getLogger("voxpipe.game")

HEARTBEAT_S = 1.0
TICK_S = 0.05
LINGER_S = 2.0
"""After an answer, how long to read what the peer may still send before closing: closing a socket
with unread input sends a reset, which can make Windows drop the answer before the mod reads it."""
VOICE_NAME = re.compile(r"[0-9a-f]{32}\.wav")
MAX_SILENT = 2
B_SILENCE_S = 0.5
"""A connection silent this long is taken for a dialect-B client waiting for the settings the app
pushes on connect (notes §1); the mod of dialect A sends its request as soon as it connects."""
SUBSCRIBED = ("chunk", "audio", "llm.done", "cancel")


def game_path(path: Path, style: str, environ: dict[str, str] | os._Environ[str] = os.environ) -> str:
    """The voice file's path as the game sees it. MiSide is a Windows program: on Linux it runs under
    Wine or Proton, where the host's root is drive Z: (design §7.2)."""
    if style == "auto":
        style = "windows" if sys.platform == "win32" else "wine"
    if style == "wine":
        return "Z:" + str(path).replace("/", "\\")
    if style == "wsl":  # the Linux side of WSL, seen from Windows: \\wsl.localhost\<distro>\home\...
        return "\\\\wsl.localhost\\" + environ.get("WSL_DISTRO_NAME", "Ubuntu") + str(path).replace("/", "\\")
    return str(path)


def voice_dir(setting: str, environ: dict[str, str] | os._Environ[str] = os.environ) -> Path:
    if setting:
        return Path(setting).expanduser()
    cache = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "voxpipe" / "game-voice"


def peer_uid(peer: tuple[str, int], local: tuple[str, int], table: str) -> int | None:
    """The uid owning the socket at the other end of a loopback TCP connection, from the text of
    /proc/net/tcp (or tcp6): its row has the peer's address as `local_address` and ours as
    `rem_address`. None when no row matches (the peer is gone, or not on this machine)."""
    def address(host: str, port: int) -> str:
        packed = socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        words = [packed[at:at + 4][::-1].hex().upper() for at in range(0, len(packed), 4)]
        return f"{''.join(words)}:{port:04X}"

    wanted = (address(*peer[:2]), address(*local[:2]))
    for row in table.splitlines()[1:]:
        fields = row.split()
        if len(fields) > 7 and (fields[1], fields[2]) == wanted:
            return int(fields[7])
    return None


def same_user(peer: tuple[str, int], local: tuple[str, int]) -> bool | None:
    """Whether the peer runs as this user (Linux); None where that cannot be told (no /proc)."""
    name = "/proc/net/tcp6" if ":" in peer[0] else "/proc/net/tcp"
    try:
        table = Path(name).read_text(encoding="ascii")
    except OSError:
        return None
    uid = peer_uid(peer, local, table)
    return None if uid is None else uid == os.getuid()


class GameLink:
    """The listener, the bus connection and the core; `run()` serves until SIGTERM or SIGINT."""

    def __init__(self, config: Config, host: str, port: int) -> None:
        self.config = config
        self.settings = config["game"]
        self.host, self.port = host, port
        self.core = core.Link(core.Settings.from_config(self.settings), secrets.token_hex(5))
        self.b = dialect_b.Tasks(self.core.settings, self.core.id_prefix, time.time() - time.monotonic())
        self.bus = Connection("game", endpoints_for(config), [protocol.subscription(kind) for kind in SUBSCRIBED])
        self.voices = voice_dir(self.settings["voice_dir"])
        self.file_prefix = f"voxpipe-game-{port}-"
        """The names of this link's voice files: a link on another port, or the user's own files in a
        `voice_dir` they share, are never touched."""
        self.answers: dict[int, asyncio.Future[bytes]] = {}
        """Connection number -> the future its answer is set on (held requests wait on it)."""
        self.streams: dict[int, asyncio.StreamWriter] = {}
        """Dialect-B connections, which stay open: number -> writer."""
        self.numbers = itertools.count(1)
        self.open = 0
        self.silent = 0
        """Connections taken for silent dialect-B clients, at most MAX_SILENT."""
        self.loop: asyncio.AbstractEventLoop | None = None
        self.converter = ThreadPoolExecutor(1, thread_name_prefix="game-wav")
        self.stop = asyncio.Event()
        self.stopped = threading.Event()
        self.started_at = time.monotonic()
        self.lock = InstanceLock(runtime_dir(config["bus"]["runtime_dir"]), f"game-{port}")

    # --- the mod's connections -------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.open >= self.settings["max_connections"]:
            self.core.counters["refused"] += 1
            log.warning("refused a connection: %d are open already (game.max_connections)", self.open)
            writer.close()
            return
        if same_user(writer.get_extra_info("peername"), writer.get_extra_info("sockname")) is False:
            self.core.counters["refused"] += 1
            log.warning("refused a connection from another user's program: the game runs as you")
            writer.close()
            return
        self.open += 1
        number = next(self.numbers)
        self.core.counters["connections"] += 1
        try:
            await self._exchange(number, reader, writer)
        except (ConnectionError, OSError) as exc:
            log.info("connection %d: %s", number, exc)
        finally:
            self._apply(self.core.closed(number))  # a held request whose connection failed: polls take it on
            self.open -= 1
            self.answers.pop(number, None)
            self.streams.pop(number, None)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _exchange(self, number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        scanner = ObjectScanner(self.settings["max_request_bytes"])
        reading = asyncio.ensure_future(self._next_objects(reader, scanner))
        pushed = False
        try:
            started, _ = await asyncio.wait({reading}, timeout=B_SILENCE_S)
            if not started and not scanner.pending and self.silent < MAX_SILENT:
                pushed = True  # not a byte yet: a dialect-B client waiting for the settings (few at once: a
                self.silent += 1  # silent connection is held IDLE_TIMEOUT_S, not read_timeout_s)
                self.streams[number] = writer
                self._apply(self.b.connected(number))
                objects = await asyncio.wait_for(reading, dialect_b.IDLE_TIMEOUT_S)
            else:
                objects = await asyncio.wait_for(reading, self.settings["read_timeout_s"] - B_SILENCE_S)
        except TimeoutError:
            return self._refused(number, f"no whole request within {self.settings['read_timeout_s']:g} s "
                                         f"(game.read_timeout_s)")
        except BadFrame as exc:
            return self._refused(number, str(exc))
        finally:
            reading.cancel()
            self.silent -= pushed
        if not objects:
            return None
        try:
            request = json.loads(objects[0])
        except ValueError:
            return self._refused(number, "not valid JSON")
        if detect(request) == "B":
            return await self._stream(number, request, objects[1:], reader, writer, scanner, pushed)
        if pushed:  # a dialect-A mod after all, only slow to send: its one read would take the settings too
            return self._late_a(number, request)
        answer = asyncio.get_running_loop().create_future()
        self.answers[number] = answer
        parsed = parse_a(request)
        if isinstance(parsed, Malformed):
            log.warning("connection %d: a malformed request (%s); answered empty", number, parsed.reason)
            self._apply(self.core.refuse(number, parsed.id))
        else:
            self._apply(self.core.request(number, parsed, time.monotonic()))
        gone = asyncio.ensure_future(reader.read(65536))
        try:
            while True:
                done, _ = await asyncio.wait((answer, gone), return_when=asyncio.FIRST_COMPLETED)
                if answer in done:
                    break
                if gone.result():  # more than the one request the mod sends: ignored, within the size bound
                    try:
                        scanner.feed(gone.result())
                    except BadFrame as exc:
                        self._apply(self.core.closed(number))
                        return self._refused(number, str(exc))
                    gone = asyncio.ensure_future(reader.read(65536))
                    continue
                self._apply(self.core.closed(number))  # the mod went away while its request was held
                answer.cancel()
                return None
            writer.write(answer.result())
            await writer.drain()
            with contextlib.suppress(OSError):
                writer.write_eof()
            with contextlib.suppress(TimeoutError, OSError):
                await asyncio.wait_for(self._drain_input(reader, gone), LINGER_S)
            return None
        finally:
            gone.cancel()

    def _late_a(self, number: int, request: Any) -> None:
        """A dialect-A request on a connection that already got the settings push: an answer there would
        be read with the push and fail to parse (R1, R2). So it goes unanswered: a poll is left for the
        next one; player text or an event (already taken from the game, A16) still gets its reply, which
        the next polls deliver."""
        self.streams.pop(number, None)
        parsed = parse_a(request)
        log.warning("connection %d: a request came after %g s of silence; not answered on it", number, B_SILENCE_S)
        if not isinstance(parsed, Malformed) and parsed.kind != "poll":
            self._apply(self.core.request(number, parsed, time.monotonic()))
            self._apply(self.core.closed(number))

    @staticmethod
    async def _next_objects(reader: asyncio.StreamReader, scanner: ObjectScanner) -> list[bytes]:
        """The objects of the first read that completes one: A uses the first, B all of them."""
        while True:
            data = await reader.read(65536)
            if not data:
                if scanner.pending:
                    raise BadFrame("the connection closed in the middle of a request")
                return []
            objects = scanner.feed(data)
            if objects:
                return objects

    @staticmethod
    async def _drain_input(reader: asyncio.StreamReader, first: asyncio.Future[bytes]) -> None:
        if await first:
            while await reader.read(65536):
                pass

    def _refused(self, number: int, why: str) -> None:
        self.core.counters["refused"] += 1
        log.warning("connection %d refused: %s", number, why)

    # --- dialect B: one connection, objects both ways --------------------------------------

    async def _stream(self, number: int, first: Any, rest: list[bytes], reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, scanner: ObjectScanner, pushed: bool) -> None:
        self.streams[number] = writer
        if not pushed:
            self._apply(self.b.connected(number))
        pending = list(rest)
        request: Any = first
        while True:
            self._apply(self.b.action(number, request, time.monotonic()))
            await writer.drain()
            while not pending:
                try:
                    data = await asyncio.wait_for(reader.read(65536), dialect_b.IDLE_TIMEOUT_S)
                    pending += scanner.feed(data) if data else []
                except (TimeoutError, BadFrame) as exc:
                    return self._refused(number, str(exc) or "idle too long")
                if not data:
                    return None
            try:
                request = json.loads(pending.pop(0))
            except ValueError:
                return self._refused(number, "not valid JSON")

    # --- effects ---------------------------------------------------------------------------

    def _apply(self, effects: list[core.Effect]) -> None:
        for effect in effects:
            if isinstance(effect, core.Answer):
                if effect.conn in self.streams:
                    self.streams[effect.conn].write(effect.data)
                elif (future := self.answers.get(effect.conn)) is not None and not future.done():
                    future.set_result(effect.data)
            elif isinstance(effect, core.Publish):
                self._publish(effect.session, effect.id, effect.body)
            elif isinstance(effect, core.MakeWav):
                self._make_wav(effect)
            elif isinstance(effect, core.Delete):
                try:
                    os.unlink(effect.path)
                except FileNotFoundError:  # the mod deletes what it loads (F6)
                    pass
                except OSError as exc:
                    log.warning("cannot delete the voice file %s: %s", effect.path, exc)
            else:
                log.log(effect.level, "%s", effect.text)

    def _publish(self, session: str, id: str, body: Body) -> None:
        try:
            self.bus.publish(session, id, body)
        except (BusUnavailable, zmq.ZMQError, ProtocolError) as exc:
            log.warning("not sent to the bus (%s): %s for %s", exc, body.kind, session)

    def _make_wav(self, effect: core.MakeWav) -> None:
        loop = self.loop
        assert loop is not None
        path = self.voices / f"{self.file_prefix}{secrets.token_hex(16)}.wav"

        def write() -> float:
            data = to_game_wav(effect.pieces) if effect.pieces else silent_wav()
            descriptor = open_private(path, os.O_WRONLY | os.O_EXCL)
            with os.fdopen(descriptor, "wb") as file:
                file.write(data)
            return game_duration_s(data)

        def written(future: Any) -> None:
            owner = self.b if self.b.owns(effect.session, effect.id) else self.core
            try:
                duration = future.result()
            except Exception as exc:  # any failure: the reply must not wait for this file
                self._apply(owner.wav_failed(effect.session, effect.id, f"{self.voices}: {exc}", time.monotonic()))
                return
            shown = game_path(path, self.settings["path_style"])
            self._apply(owner.wav_ready(effect.session, effect.id, effect.index, str(path), shown, duration,
                                        time.monotonic()))

        self.converter.submit(write).add_done_callback(lambda future: loop.call_soon_threadsafe(written, future))

    # --- from the bus ----------------------------------------------------------------------

    def _listen(self) -> None:
        loop = self.loop
        assert loop is not None
        feed_loop(self.bus, loop, self._deliver, self.stopped,
                  lambda message: message.session.startswith(core.SESSION_PREFIX))

    def _deliver(self, message: Message[Body]) -> None:
        try:
            self._take(message)
        except Exception:  # a bug must not lose the rest of the bus's messages; it is logged and counted
            self.core.counters["failures"] += 1
            log.exception("the game link failed on a %s message", message.kind)

    def _take(self, message: Message[Body]) -> None:
        now, body = time.monotonic(), message.body
        if isinstance(body, Chunk):
            effects = self.core.chunk(message.session, message.id, body, now)
        elif isinstance(body, Audio):
            form = AudioFormat(body.rate, body.channels, body.width)
            effects = self.core.audio(message.session, message.id, body.chunk, body.pcm, form, body.last,
                                      message.ts, now)
        elif isinstance(body, LlmDone):
            effects = self.core.done(message.session, message.id, body, now)
        elif isinstance(body, Cancel):
            effects = self.core.cancelled(message.session, message.id, now)
        else:
            return
        self._apply(effects + self.b.bus(message, now))

    # --- running ---------------------------------------------------------------------------

    def _heartbeat(self, state: str) -> None:
        counters = {**self.bus.counters, **self.core.counters, **self.b.counters}
        with contextlib.suppress(BusUnavailable, zmq.ZMQError, ProtocolError):
            self.bus.publish("", "", Heartbeat(pid=os.getpid(), uptime=time.monotonic() - self.started_at,
                                               state=state, counters=counters, streams=self.bus.take_recent_streams()))

    async def _beat(self) -> None:
        """Heartbeats for `voxpipe status` and `voxpipe run`, and systemd's watchdog, from the loop;
        the core's timers between them."""
        beat_at = 0.0
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            try:
                self._apply(self.core.tick(now) + self.b.tick(now))
            except Exception:  # a bug must not stop the timers and the heartbeats (the watchdog)
                self.core.counters["failures"] += 1
                log.exception("the game link's timers failed")
            if now >= beat_at:
                beat_at = now + HEARTBEAT_S
                self._heartbeat("ready")
                sdnotify.notify("WATCHDOG=1")

    def _empty_voice_dir(self) -> None:
        """This link's voice files left by an earlier run that stopped abruptly: nobody will load them."""
        for leftover in self.voices.glob(f"{self.file_prefix}*.wav"):
            if VOICE_NAME.fullmatch(leftover.name[len(self.file_prefix):]):
                with contextlib.suppress(OSError):
                    leftover.unlink()

    async def serve(self) -> int:
        self.loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(signum, self.stop.set)
        try:
            server = await asyncio.start_server(self._connection, self.host, self.port, backlog=64)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                print(f"voxpipe game: {self.host}:{self.port} is in use, by another voxpipe game or by the "
                      f"NeuroMita app itself; the mod connects to port 12345 only, so stop the other program "
                      f"first", file=sys.stderr)
            else:
                print(f"voxpipe game: cannot listen on {self.host}:{self.port}: {exc.strerror}", file=sys.stderr)
            return EXIT_USAGE
        if self.port != 12345:
            log.warning("listening on port %d: an unchanged MiSide mod connects to 12345 only", self.port)
        reader = threading.Thread(target=self._listen, name="game-bus", daemon=True)
        reader.start()
        beat = asyncio.create_task(self._beat())
        self._heartbeat("ready")
        sdnotify.notify("READY=1")
        print(f"voxpipe game: listening on {self.host}:{self.port}; voice files in {self.voices}\n", end="",
              flush=True)
        try:
            await self.stop.wait()
        finally:
            sdnotify.notify("STOPPING=1")
            beat.cancel()
            server.close()
            self._apply(self.core.stop() + self.b.stop())
            for future in self.answers.values():  # held answers the stop could not give
                if not future.done():
                    future.cancel()
            self.converter.shutdown(wait=True)
            self._empty_voice_dir()
            self.stopped.set()
            reader.join()
            self._heartbeat("stopping")
        return EXIT_OK

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT; raises AlreadyRunning when a `voxpipe game` serves this port
        already, BusUnavailable when no bus answers."""
        return serve_attached(self.lock, f"voxpipe game on port {self.port}", self.bus, self.serve,
                              self._prepare_voice_dir)

    def _prepare_voice_dir(self) -> None:
        """The voice directory, made 0700 (the files in it are 0600): one another user owns, or a
        symlink, is refused, since they could read the voices or swap the files the game loads."""
        private_dirs(self.voices)
        info = os.lstat(self.voices)
        if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
            raise ConfigError(f"game.voice_dir {self.voices} is not a directory of its own (a symlink?); "
                              f"name a real directory")
        found = exposure(self.voices, info, 0, PRIVATE_DIR)
        if found is not None and found.foreign:
            raise ConfigError(f"game.voice_dir {self.voices} {found.problem}; set game.voice_dir to a "
                              f"directory of yours")
        os.chmod(self.voices, PRIVATE_DIR)
        self._empty_voice_dir()

def run(config: Config, port: int | None = None) -> int:
    """`voxpipe game`: the command line's --port, else the [game] section's."""
    settings = config["game"]
    host = settings["host"]
    if not is_loopback(host):
        print(f"voxpipe game: game.host = {host!r} is not a loopback address; the mod's protocol has no "
              f"authentication, so the game link listens on loopback only (use 127.0.0.1)", file=sys.stderr)
        return EXIT_USAGE
    return GameLink(config, host, settings["port"] if port is None else port).run()
