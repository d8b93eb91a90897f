"""The `voxpipe` command line: run the daemon, run one stage, and the front-end commands.

Exit codes: 0 OK, 1 runtime failure (provider error, timeout, no bus), 2 bad usage or config.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import TYPE_CHECKING, Any, Sequence

from . import protocol
from .bus import BusError, Endpoints
from .config import Config, ConfigError, load
from .llm.providers.base import ProviderError
from .protocol import Message
from .runtime import BusUnavailable, Connection, VoxpipeError, endpoints_for
from .shard import Shard

if TYPE_CHECKING:  # the client library is imported only by the commands that use it
    from .client import Done, Error, Playback

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    config_help = "TOML config file (default: $VOXPIPE_CONFIG, then ~/.config/voxpipe/config.toml)"
    parser = argparse.ArgumentParser(prog="voxpipe", description="A streaming voice pipeline daemon.")
    parser.add_argument("--config", help=config_help)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, help=config_help)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    class Commands:
        """Every subcommand also takes --config, so `voxpipe run --config F` works too."""

        @staticmethod
        def add_parser(name: str, **kwargs: Any) -> argparse.ArgumentParser:
            return subparsers.add_parser(name, parents=[common], **kwargs)

    commands = Commands

    commands.add_parser("run", help="start the bus and all stages, and supervise them")

    stage = commands.add_parser("stage", help="run one stage in the foreground (systemd units use this)")
    stage.add_argument("name", help="bus, llm, chunker, tts, player or history")
    stage.add_argument("--shard", default="0/1", help="I/N: handle only sessions in shard I of N")

    say = commands.add_parser("say", help="ask once; print the reply as it streams, exit when spoken")
    say.add_argument("text")
    say.add_argument("--session", default="cli")
    say.add_argument("--profile", default="", help="LLM profile (default: llm.profile)")
    say.add_argument("--no-stream", action="store_true", help="ask the provider for the whole reply at once")
    say.add_argument("--timeout", type=float, default=120.0,
                     help="give up after this many seconds without any progress (default 120)")

    chat = commands.add_parser("chat", help="talk to the daemon in the terminal; Ctrl-C interrupts a reply")
    chat.add_argument("--session", default="chat")
    chat.add_argument("--profile", default="", help="LLM profile (default: llm.profile)")
    chat.add_argument("--no-stream", action="store_true", help="ask the provider for whole replies")
    chat.add_argument("--timeout", type=float, default=120.0,
                      help="give up on a reply after this many seconds without progress (default 120)")

    gui = commands.add_parser("gui", help="a Tk window: type, watch the reply grow, stop it")
    gui.add_argument("--session", default="gui")
    gui.add_argument("--profile", default="", help="LLM profile (default: llm.profile)")
    gui.add_argument("--timeout", type=float, default=120.0,
                     help="give up on a reply after this many seconds without progress (default 120)")
    gui.add_argument("--dump", metavar="FILE", help=argparse.SUPPRESS)  # test hook: the window's state as JSON

    tap = commands.add_parser("tap", help="print live bus traffic, one line per message")
    tap.add_argument("kinds", nargs="*", metavar="KIND", help="only these kinds (default: all)")

    commands.add_parser("status", help="show every stage with pid, uptime and counters")
    stats = commands.add_parser("stats", help="p50/p95 time to first token, audio and playback of recent replies")
    stats.add_argument("--last", type=int, default=200, help="how many recent replies (default 200)")

    from .history.cli import add_arguments as history_arguments
    history_arguments(commands.add_parser("history", help="list, show, export, import or clear stored sessions"))

    commands.add_parser("chunk", help='split JSON lines {"delta": ...} on stdin into speakable chunks')
    commands.add_parser("doctor", help="check what a first run needs: OK, or the fix, for each; exit 0 or 1")

    keys = commands.add_parser("keys", help="CURVE keys for a bus on TCP")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    generate = keys_commands.add_parser("generate", parents=[common],
                                        help="make the server and client keypairs (secret files 0600)")
    generate.add_argument("--dir", default="", help="where to write them (default: bus.keys_dir)")
    generate.add_argument("--client", default="", metavar="NAME",
                          help="only a client keypair, for a machine that joins a bus running elsewhere")
    generate.add_argument("--force", action="store_true", help="replace existing keys")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "doctor":  # reports a broken config as one of its checks
        from . import doctor
        return doctor.run(args.config)
    try:
        config = load(args.config)
    except ConfigError as exc:
        print(f"voxpipe: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=config["log"]["level"].upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s")
    try:
        return COMMANDS[args.command](args, config)
    except (BusUnavailable, BusError, ProviderError, VoxpipeError) as exc:
        print(f"voxpipe: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except (ConfigError, ValueError) as exc:
        print(f"voxpipe: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK


def cmd_run(args: argparse.Namespace, config: Config) -> int:
    from .supervisor import Supervisor
    return Supervisor(config).run()


def cmd_stage(args: argparse.Namespace, config: Config) -> int:
    from .stages import stage_class
    return stage_class(args.name)(config, Shard.parse(args.shard)).run()


def cmd_say(args: argparse.Namespace, config: Config) -> int:
    """Send one request and follow it until its audio has played (or it fails)."""
    from .client import Error, Playback, TextDelta, VoxpipeTimeout, connect
    with connect(config, session=args.session, kinds=("text", "llm.done", "playback", "error"), name="say",
                 timeout=min(args.timeout, 10.0)) as client:
        reply = client.ask(args.text, stream=False if args.no_stream else None, profile=args.profile,
                           timeout=args.timeout)
        played: Playback | None = None
        try:
            for event in reply:
                if isinstance(event, TextDelta):
                    sys.stdout.write(event.delta + ("\n" if event.final else ""))
                    sys.stdout.flush()
                elif isinstance(event, Error) and event.code != "stage_crashed":
                    print(f"voxpipe: {event.code}: {event.message}", file=sys.stderr)
                elif isinstance(event, Playback) and event.final:
                    played = event
        except VoxpipeTimeout as exc:
            print(f"\nvoxpipe: {exc}", file=sys.stderr)
            return EXIT_FAILURE
    return _say_outcome(reply.crashed, reply.done, played)


def _say_outcome(crashed: Error | None, done: Done | None, played: Playback | None) -> int:
    if crashed is not None:
        print(f"\nvoxpipe: {crashed.message}; this reply is lost, ask again", file=sys.stderr)
        return EXIT_FAILURE
    if done is None or done.status == "error":
        print(f"\nvoxpipe: the reply failed: {done.error if done else 'no llm.done'}", file=sys.stderr)
        return EXIT_FAILURE
    if done.status == "interrupted":
        print("\nvoxpipe: the reply was interrupted", file=sys.stderr)
        return EXIT_FAILURE
    if played is not None and played.path:
        print(f"audio written to {played.path}", file=sys.stderr)
    return EXIT_OK if played is not None and played.event == "finished" else EXIT_FAILURE


def cmd_chat(args: argparse.Namespace, config: Config) -> int:
    from .chat import run
    return run(config, session=args.session, profile=args.profile, stream=False if args.no_stream else None,
               timeout=args.timeout)


def cmd_gui(args: argparse.Namespace, config: Config) -> int:
    from .gui import run
    return run(config, session=args.session, profile=args.profile, timeout=args.timeout, dump=args.dump)


def cmd_tap(args: argparse.Namespace, config: Config) -> int:
    """Print everything the broker forwards (from its capture socket), one line per message."""
    import zmq

    endpoints: Endpoints = endpoints_for(config)
    sock = endpoints.prepare(zmq.Context.instance().socket(zmq.SUB))
    sock.linger = 0
    sock.setsockopt(zmq.MAXMSGSIZE, protocol.BROKER_MAX_BYTES)
    for kind in args.kinds or [""]:
        sock.setsockopt(zmq.SUBSCRIBE, protocol.subscription(kind))
    sock.connect(endpoints.capture)
    try:
        while True:
            frame = sock.recv()
            if frame[:1] in (b"\x00", b"\x01"):
                continue  # a subscription travelling upstream, not a message
            print(describe_frame(frame), flush=True)
    finally:
        sock.close()


def describe_frame(frame: bytes) -> str:
    """One readable line for a frame; invalid frames are shown with the reason."""
    try:
        message = protocol.decode(frame)
    except protocol.ProtocolError as exc:
        return f"INVALID {frame[:40]!r}: {exc}"
    stamp = time.strftime("%H:%M:%S", time.localtime(message.ts)) + f".{int(message.ts * 1000) % 1000:03d}"
    body = " ".join(f"{key}={_short(value)}" for key, value in message.body.items())
    return f"{stamp} {message.kind:<13} {message.session or '-'} {message.id or '-'} #{message.seq} " \
           f"{message.src} {body}"


def _short(value: Any) -> str:
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    """Collect heartbeats for a little over one interval and print one row per stage."""
    client = Connection("status", endpoints_for(config), [protocol.subscription("heartbeat")])
    client.require_bus()
    client.open(timeout=3.0)
    beats: dict[str, Message] = {}
    deadline = time.monotonic() + 1.5
    try:
        while time.monotonic() < deadline:
            message = client.receive(max(0.0, deadline - time.monotonic()))
            if message is not None:
                beats[message.src] = message
    finally:
        client.close()
    if not beats:
        print("voxpipe: the bus is up but no stage sent a heartbeat", file=sys.stderr)
        return EXIT_FAILURE
    print(f"{'STAGE':<12} {'PID':>7} {'STATE':<9} {'UPTIME':>9} SHARD COUNTERS")
    for src, beat in sorted(beats.items()):
        counters = " ".join(f"{key}={value}" for key, value in sorted(beat["counters"].items()))
        print(f"{src:<12} {beat['pid']:>7} {beat['state']:<9} {beat['uptime']:>8.0f}s {beat['shard']:<5} {counters}")
    return EXIT_OK


def cmd_keys(args: argparse.Namespace, config: Config) -> int:
    from .keys import command
    return command(args, config)


def cmd_chunk(args: argparse.Namespace, config: Config) -> int:
    from .chunker.cli import run
    from .chunker.core import ChunkerPolicy
    return run(sys.stdin, sys.stdout, ChunkerPolicy.from_mapping(config["chunker"]))


def cmd_stats(args: argparse.Namespace, config: Config) -> int:
    from .history.stage import default_db_path
    from .history.store import HistoryStore
    from .stats import table
    store = HistoryStore(default_db_path(config["history"]["db_path"]))
    try:
        timelines = store.recent_metrics(args.last)
    finally:
        store.close()
    if not timelines:
        print("voxpipe: no replies with timings yet; ask something with `voxpipe say`", file=sys.stderr)
        return EXIT_FAILURE
    print("\n".join(table(timelines)))
    return EXIT_OK


def cmd_history(args: argparse.Namespace, config: Config) -> int:
    from .history.cli import run
    return run(args, config)


COMMANDS = {"run": cmd_run, "stage": cmd_stage, "say": cmd_say, "chat": cmd_chat, "gui": cmd_gui,
            "tap": cmd_tap, "status": cmd_status, "history": cmd_history, "stats": cmd_stats, "chunk": cmd_chunk, "keys": cmd_keys}
