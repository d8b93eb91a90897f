"""The `voxpipe` command line: run the daemon, run one stage, and the front-end commands.

Exit codes: 0 OK, 1 runtime failure (provider error, timeout, no bus), 2 bad usage or config
(ConfigError: also a runtime dir, key file or authorised key other users could use), 130 interrupted
with Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

from . import protocol
from .config import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, Config, ConfigError, load
from .frontends.terminal import printable
from .protocol import Body, Error, ErrorCode, Heartbeat, LlmDone, Message, Playback, Text
from .runtime import BusUnavailable, Connection, VoxpipeError, endpoints_for, logs
from .runtime.broker import BusError, Endpoints
from .runtime.instance import AlreadyRunning
from .runtime.shard import Shard
from .stages.llm.providers.base import ProviderError

EXIT_INTERRUPTED = 130
"""Ctrl-C (SIGINT): 128 + 2, the shell's convention."""


CONFIG_HELP = "TOML config file (default: $VOXPIPE_CONFIG, then ~/.config/voxpipe/config.toml)"
TAP_HIDDEN = ("heartbeat",)
"""Kinds `voxpipe tap` leaves out unless asked (--heartbeats, or naming them)."""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, got {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 1 to 65535, got {text}")
    return value


def _kind(text: str) -> str:
    if text not in protocol.KINDS:
        raise argparse.ArgumentTypeError(f"unknown message kind {text!r}; known: {', '.join(sorted(protocol.KINDS))}")
    return text


class _Help(argparse.HelpFormatter):
    """Shows an option's default where it says something: not for flags, empty strings or SUPPRESS."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" not in text and action.option_strings and action.default not in (None, "", False,
                                                                                          argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="voxpipe", description="A streaming voice pipeline daemon.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        """A subcommand whose --help starts with the same one-line summary the command list shows."""
        return subparsers.add_parser(name, help=summary)

    def front_end(sub: argparse.ArgumentParser, session: str) -> None:
        sub.add_argument("--session", default=session, help="the conversation to talk in")
        sub.add_argument("--profile", default="", help="LLM profile (empty: llm.profile)")
        sub.add_argument("--timeout", type=_seconds, default=120.0,
                         help="give up on a reply after this many seconds without any progress")

    command("run", "start the bus and all stages, and supervise them")

    stage = command("stage", "run one stage in the foreground (systemd units use this)")
    stage.add_argument("name", help="bus, llm, chunker, tts, player or history")
    stage.add_argument("--shard", default="0/1", help="I/N: handle only sessions in shard I of N")

    say = command("say", "ask once; print the reply as it streams, exit when spoken")
    say.add_argument("text", nargs="+", help="the message (several words are joined with spaces, as echo does)")
    front_end(say, "cli")
    say.add_argument("--no-stream", action="store_true", help="ask the provider for the whole reply at once")

    chat = command("chat", "talk to the daemon in the terminal; Ctrl-C interrupts a reply")
    front_end(chat, "chat")
    chat.add_argument("--no-stream", action="store_true", help="ask the provider for whole replies")

    gui = command("gui", "a Tk window: type, watch the reply grow, stop it")
    front_end(gui, "gui")
    gui.add_argument("--dump", metavar="FILE", help=argparse.SUPPRESS)  # test hook: the window's state as JSON

    web = command("web", "serve the browser front-end: a page and a WebSocket bridge to the bus")
    web.add_argument("--host", default=None, help="address to bind (default: web.host, 127.0.0.1); any "
                                                  "non-loopback address needs the access token it prints")
    web.add_argument("--port", type=_port, default=None, help="TCP port (default: web.port, 8765)")

    game = command("game", "the MiSide game link: the NeuroMita mod's protocol on 127.0.0.1:12345")
    game.add_argument("--port", type=_port, default=None, help="TCP port (default: game.port, 12345, the only "
                                                               "one an unchanged mod connects to)")

    tap = command("tap", "print live bus traffic, one line per message")
    tap.add_argument("kinds", nargs="*", type=_kind, metavar="KIND",
                     help="only these message kinds (default: all but heartbeats)")
    tap.add_argument("--heartbeats", action="store_true", help="also show the stages' heartbeats")

    command("status", "show every stage with pid, uptime and counters")
    stats = command("stats", "p50/p95 time to first token, audio and playback of recent replies")
    stats.add_argument("--last", type=_positive, default=200, help="how many recent replies")

    from .stages.history.cli import add_arguments as history_arguments
    history_arguments(command("history", "list, show, export, import or clear stored sessions"))

    command("chunk", 'split JSON lines {"delta": ...} on stdin into speakable chunks')
    command("doctor", "check what a first run needs: OK, or the fix, for each; exit 0 or 1")

    keys = command("keys", "CURVE keys for a bus on TCP")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    generate = keys_commands.add_parser("generate", help="make the server and client keypairs (secret files 0600)")
    generate.add_argument("--dir", default="", help="where to write them (default: bus.keys_dir)")
    generate.add_argument("--client", default="", metavar="NAME",
                          help="only a client keypair, for a machine that joins a bus running elsewhere")
    generate.add_argument("--force", action="store_true", help="replace existing keys")
    _config_everywhere(parser, top=True)
    return parser


def _config_everywhere(parser: argparse.ArgumentParser, top: bool = False) -> None:
    """--config on the top-level parser and on every subcommand at any depth, so it may come in any
    position (`voxpipe --config F history list` and `voxpipe history list --config F`). Subcommands
    default to SUPPRESS, so a value given before them is not overwritten. Every subcommand's --help
    also opens with its one-line summary from the command list."""
    if top:
        parser.add_argument("--config", help=CONFIG_HELP)
    else:
        parser.add_argument("--config", help=CONFIG_HELP, default=argparse.SUPPRESS)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            summaries = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                summary = summaries.get(name)
                if not sub.description and summary:
                    sub.description = summary[0].upper() + summary[1:] + "."
                sub.formatter_class = _Help
                _config_everywhere(sub)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "doctor":  # reports a broken config as one of its checks
        from .ops import doctor
        return doctor.run(args.config)
    try:
        config = load(args.config)
    except ConfigError as exc:
        print(f"voxpipe: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logs.configure(config["log"]["level"])
    try:
        return COMMANDS[args.command](args, config)
    except (BusUnavailable, BusError, ProviderError, VoxpipeError) as exc:
        print(f"voxpipe: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except (ConfigError, ValueError, AlreadyRunning) as exc:
        print(f"voxpipe: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def cmd_run(args: argparse.Namespace, config: Config) -> int:
    from .ops.supervisor import Supervisor
    return Supervisor(config).run()


def cmd_stage(args: argparse.Namespace, config: Config) -> int:
    from .runtime.registry import stage_class
    return stage_class(args.name)(config, Shard.parse(args.shard)).run()


def cmd_say(args: argparse.Namespace, config: Config) -> int:
    """Send one request and follow it until its audio has played (or it fails); Ctrl-C cancels it everywhere."""
    from .frontends.client import VoxpipeTimeout, connect  # the client library only for the commands that use it
    text = " ".join(args.text).strip()
    if not text:
        raise ConfigError("say needs a message: voxpipe say 'What is the capital of France?'")
    config.profile(args.profile)  # an unknown profile is a usage error (exit 2), found before anything is sent
    with connect(config, session=args.session, kinds=("text", "llm.done", "playback", "error"), name="say",
                 timeout=min(args.timeout, 10.0)) as client:
        reply = client.ask(text, stream=False if args.no_stream else None, profile=args.profile,
                           timeout=args.timeout)
        played: Playback | None = None
        shown: set[str] = set()
        try:
            for event in reply:
                match event.body:
                    case Text(delta=delta, final=final):
                        end = "\n" if final and (reply.text or delta) else ""
                        sys.stdout.write(printable(delta) + end)  # one code point per control: safe per piece
                        sys.stdout.flush()
                    case Error(code=code, message=message) if code != ErrorCode.STAGE_CRASHED:
                        shown.add(message)
                        print(printable(f"voxpipe: {code}: {message}"), file=sys.stderr)
                    case Playback(final=True) as playback:
                        played = playback
        except KeyboardInterrupt:
            client.cancel(args.session, reply.id, reason="interrupted in voxpipe say")
            print(("\n" if reply.text and not reply.text.endswith("\n") else "") + "[interrupted]", flush=True)
            return EXIT_INTERRUPTED
        except VoxpipeTimeout as exc:
            print(f"\nvoxpipe: {exc}", file=sys.stderr)
            return EXIT_FAILURE
    return _say_outcome(reply.crashed.body if reply.crashed else None, reply.done.body if reply.done else None,
                        played, shown)


def _say_outcome(crashed: Error | None, done: LlmDone | None, played: Playback | None, shown: set[str]) -> int:
    """The exit code of `say`, with one line on stderr for whatever went wrong (never twice).

    Every text here came over the bus, so it is printed through `printable`."""
    if crashed is not None:
        print(printable(f"voxpipe: {crashed.message}; this reply is lost, ask again"), file=sys.stderr)
        return EXIT_FAILURE
    if done is None or done.status == "error":
        reason = done.error if done else "no llm.done"
        if reason not in shown:
            print(printable(f"voxpipe: the reply failed: {reason}"), file=sys.stderr)
        return EXIT_FAILURE
    if done.guard:
        print(printable(f"[cut: {done.guard}]"), flush=True)
    if done.status == "interrupted":
        print("voxpipe: the reply was interrupted", file=sys.stderr)
        return EXIT_FAILURE
    if played is not None and played.path:
        print(printable(f"audio written to {played.path}"), file=sys.stderr)
    return EXIT_OK if played is not None and played.event == "finished" else EXIT_FAILURE


def cmd_chat(args: argparse.Namespace, config: Config) -> int:
    from .frontends.chat import run
    return run(config, session=args.session, profile=args.profile, stream=False if args.no_stream else None,
               timeout=args.timeout)


def cmd_gui(args: argparse.Namespace, config: Config) -> int:
    from .frontends.gui import run
    return run(config, session=args.session, profile=args.profile, timeout=args.timeout, dump=args.dump)


def cmd_web(args: argparse.Namespace, config: Config) -> int:
    from .frontends.web.gateway import run  # aiohttp only for this command
    return run(config, host=args.host, port=args.port)


def cmd_game(args: argparse.Namespace, config: Config) -> int:
    from .frontends.game.link import run
    return run(config, port=args.port)


def cmd_tap(args: argparse.Namespace, config: Config) -> int:
    """Print everything the broker forwards (from its capture socket), one line per message.

    Heartbeats are left out unless asked for. With no bus it fails at once, like every front-end.
    """
    import zmq
    from zmq.utils.monitor import recv_monitor_message

    endpoints: Endpoints = endpoints_for(config)
    Connection("tap", endpoints, []).require_bus()
    hidden = () if args.heartbeats or args.kinds else TAP_HIDDEN
    sock = endpoints.prepare(zmq.Context.instance().socket(zmq.SUB))
    sock.linger = 0
    sock.setsockopt(zmq.MAXMSGSIZE, protocol.BROKER_MAX_BYTES)
    for kind in args.kinds or [""]:
        sock.setsockopt(zmq.SUBSCRIBE, protocol.subscription(kind))
    sock.connect(endpoints.capture)
    skip = tuple(protocol.subscription(kind) for kind in hidden)
    # The broker's death (and its return under `voxpipe run`) is said the moment it happens (§3).
    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(monitor, zmq.POLLIN)
    connected = False
    try:
        while True:
            ready = dict(poller.poll())
            if monitor in ready:
                event = recv_monitor_message(monitor)["event"]
                if event == zmq.EVENT_DISCONNECTED:
                    print("[voxpipe tap: lost the bus; waiting for it to come back]", file=sys.stderr, flush=True)
                elif connected:
                    print("[voxpipe tap: the bus is back]", file=sys.stderr, flush=True)
                connected = True
            if sock not in ready:
                continue
            frame = sock.recv()
            if frame[:1] in (b"\x00", b"\x01") or (skip and frame.startswith(skip)):
                continue  # a subscription travelling upstream, or a hidden kind
            print(describe_frame(frame), flush=True)
    except KeyboardInterrupt:
        return EXIT_OK  # the way to stop tap
    finally:
        sock.disable_monitor()
        monitor.close()
        sock.close()


def describe_frame(frame: bytes) -> str:
    """One readable line for a frame; invalid frames are shown with the reason.

    Anyone on the bus chooses `src` and every text in a frame (and a reason may quote them), so
    the line goes through `printable`: it stays one line and cannot drive the terminal."""
    try:
        message = protocol.decode(frame)
    except protocol.ProtocolError as exc:
        return printable(f"INVALID {frame[:40]!r}: {exc}", one_line=True)
    stamp = time.strftime("%H:%M:%S", time.localtime(message.ts)) + f".{int(message.ts * 1000) % 1000:03d}"
    body = " ".join(f"{key}={_short(value)}" for key, value in message.body.to_wire().items())
    return printable(f"{stamp} {message.kind:<13} {message.session or '-'} {message.id or '-'} #{message.seq} "
                     f"{message.src} {body}", one_line=True)


def _short(value: Any) -> str:
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, tuple):
        value = list(value)  # shown as it travels: a msgpack array
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    """Collect heartbeats for a little over one interval and print one row per stage."""
    client = Connection("status", endpoints_for(config), [protocol.subscription("heartbeat")])
    client.require_bus()
    client.open(timeout=3.0)
    beats: dict[str, Message[Body]] = {}
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

    def field(beat: Message[Body], name: str) -> Any:
        """A heartbeat field as the protocol defines it: an optional one that is missing or nil is its default."""
        rule = Heartbeat.spec[name]
        value = getattr(beat.body, name, None)
        return rule.default if value is None and not rule.required else value

    def shown(value: Any, spec: str = "") -> str:
        """A value as the table shows it: `?` when it is missing, as it is when it has an odd type."""
        if value is None or value == "":
            return "?"
        try:
            return format(value, spec)
        except (TypeError, ValueError):
            return str(value)

    # Each row goes through `printable`: anyone on the bus chooses its src and counter names.
    print(f"{'STAGE':<12} {'PID':>7} {'STATE':<9} {'UPTIME':>9} SHARD COUNTERS")
    for src, beat in sorted(beats.items()):
        counters = field(beat, "counters")
        if isinstance(counters, dict):
            counters = " ".join(f"{key}={value}" for key, value in sorted(counters.items(), key=lambda kv: str(kv[0])))
        uptime = field(beat, "uptime")
        uptime = f"{shown(uptime, '.0f')}s" if isinstance(uptime, (int, float)) else shown(uptime)
        print(printable(f"{src:<12} {shown(field(beat, 'pid')):>7} {shown(field(beat, 'state')):<9} {uptime:>9} "
                        f"{shown(field(beat, 'shard') or '-'):<5} {counters}", one_line=True))
    # A stage that is down sends no heartbeat: `voxpipe run` says which, and why, in its own.
    launcher = beats.get("launcher")
    children = field(launcher, "children") if launcher is not None else {}
    for src, state in sorted(children.items() if isinstance(children, dict) else []):
        if src not in beats and isinstance(state, str) and state != "ready":
            print(printable(f"{src:<12} {'-':>7} {state.split(':')[0]:<9} {'-':>9} {'-':<5} "
                            f"{state.partition(': ')[2]}", one_line=True))
    return EXIT_OK


def cmd_keys(args: argparse.Namespace, config: Config) -> int:
    from .runtime.curve import command
    return command(args, config)


def cmd_chunk(args: argparse.Namespace, config: Config) -> int:
    from .stages.chunker.cli import run
    from .stages.chunker.core import ChunkerPolicy
    return run(sys.stdin, sys.stdout, ChunkerPolicy.from_mapping(config["chunker"]))


def cmd_stats(args: argparse.Namespace, config: Config) -> int:
    from .ops.stats import table
    from .stages.history.stage import default_db_path
    from .stages.history.store import HistoryStore
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
    from .stages.history.cli import run
    return run(args, config)


COMMANDS = {"run": cmd_run, "stage": cmd_stage, "say": cmd_say, "chat": cmd_chat, "gui": cmd_gui, "web": cmd_web,
            "game": cmd_game,
            "tap": cmd_tap, "status": cmd_status, "history": cmd_history, "stats": cmd_stats, "chunk": cmd_chunk,
            "keys": cmd_keys}
