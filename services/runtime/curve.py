"""CURVE keys for a bus on TCP: where they live, how they are made, and how they are loaded safely.

Layout of `bus.keys_dir` (default ``$XDG_CONFIG_HOME/voxpipe/keys``)::

    server.key          the broker's public key (copy it to every participant machine)
    server.key_secret   the broker's secret key (mode 0600, stays on the bus host)
    client.key          this machine's participant public key (authorise it on the bus host)
    client.key_secret   this machine's participant secret key (mode 0600)
    authorized/*.key    on the bus host: the public keys of participants allowed in

A secret key file that another user owns, or that anyone but its owner may read, is refused, with the
chown or chmod to run. So is a file that decides whose key is trusted (the authorised directory, each
key in it, a participant's copy of server.key) when another user owns it or may write it. Both are
`files.exposure`, with the mode bits each must not have.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError
from ..files import OTHERS, OTHERS_WRITE, PRIVATE_DIR, PRIVATE_FILE, exposure

SERVER, CLIENT = "server", "client"
LOCAL_NAME = "local"
"""Under which name `voxpipe keys generate` authorises the bus host's own client key."""
PUBLIC_FILE = 0o644
"""A public key file's mode: anyone may read it, only its owner may change it."""


@dataclass(frozen=True)
class CurveKeys:
    """A keypair, plus the broker's public key when it is a participant's. The secret never shows in repr."""

    public: bytes
    secret: bytes = field(repr=False)
    server_public: bytes | None = None


def keys_dir(bus: Mapping[str, Any], env: Mapping[str, str] = os.environ) -> Path:
    """bus.keys_dir, else $XDG_CONFIG_HOME/voxpipe/keys, else ~/.config/voxpipe/keys."""
    if bus.get("keys_dir"):
        return Path(bus["keys_dir"]).expanduser()
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "voxpipe" / "keys"


def authorized_dir(bus: Mapping[str, Any], env: Mapping[str, str] = os.environ) -> Path:
    """bus.authorized_dir, else keys_dir/authorized."""
    if bus.get("authorized_dir"):
        return Path(bus["authorized_dir"]).expanduser()
    return keys_dir(bus, env) / "authorized"


def check_private_file(path: Path, what: str, hint: str = "") -> None:
    """Refuse a secret file that another user owns (they could read it, or put a key of their own in
    it) or that group or others may read or write (mode looser than 0600)."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist" + (f"; {hint}" if hint else "")) from None
    found = exposure(path, info, OTHERS, PRIVATE_FILE)
    if found is not None:
        raise ConfigError(f"{what} {path} {found.problem}; other users could read it. Run: {found.fix}")


def load_secret(path: Path, what: str, hint: str) -> tuple[bytes, bytes]:
    """(public, secret) from a `.key_secret` file of mode 0600."""
    import zmq.auth

    check_private_file(path, what, hint)
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what} {path} cannot be read ({exc}); {hint}") from None
    if not secret:
        raise ConfigError(f"{what} {path} holds no secret-key; {hint}")
    return public, secret


def load_public(path: Path, what: str, hint: str) -> bytes:
    import zmq.auth

    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what} {path} cannot be read ({exc}); {hint}") from None
    return public


def server_keys(bus: Mapping[str, Any]) -> CurveKeys:
    """The broker's keypair (bus.curve = true on the bus host)."""
    directory = keys_dir(bus)
    public, secret = load_secret(directory / f"{SERVER}.key_secret", "bus.curve = true: the server secret key",
                                 "run `voxpipe keys generate` on the bus host, or set bus.keys_dir")
    return CurveKeys(public, secret)


def client_keys(bus: Mapping[str, Any]) -> CurveKeys:
    """This participant's keypair and the broker's public key (bus.curve = true anywhere)."""
    directory = keys_dir(bus)
    public, secret = load_secret(directory / f"{CLIENT}.key_secret", "bus.curve = true: the client secret key",
                                 "run `voxpipe keys generate` (on a machine without the bus: "
                                 "`voxpipe keys generate --client NAME`), or set bus.keys_dir")
    server_public = load_public(directory / f"{SERVER}.key", "bus.curve = true: the bus's public key",
                                "copy server.key from the bus host's keys dir here")
    check_trusted(directory / f"{SERVER}.key", "the bus's public key", PUBLIC_FILE)
    return CurveKeys(public, secret, server_public)


def check_trusted(path: Path, what: str, mode: int) -> None:
    """Refuse a file or directory that decides whose key we trust when another user owns it, or group
    or others may write it: they could put their own key in it, and be let in (or pose as the bus).
    `stat` follows a symlink, so a link to a file someone else owns or may write is refused too.
    `mode` is what the chmod fix sets."""
    target = path.resolve() if path.is_symlink() else path
    found = exposure(target, path.stat(), OTHERS_WRITE, mode)
    if found is not None:
        where = f"{path} (a link to {target})" if target != path else str(path)
        raise ConfigError(f"{what} {where} {found.problem}; another user could put their own key there. "
                          f"Check its contents, then run: {found.fix}")


def check_authorized_dir(path: Path) -> list[Path]:
    """The authorised client keys; refuse a missing directory, or a directory or key file that another
    user owns or could write (check_trusted): the broker would let that user's key in."""
    if not path.is_dir():
        raise ConfigError(f"bus.curve = true but the authorised keys directory {path} does not exist; "
                          f"run `voxpipe keys generate` or set bus.authorized_dir")
    check_trusted(path, "authorised keys directory", PRIVATE_DIR)
    keys = sorted(path.glob("*.key"))  # what the ZAP authenticator loads (zmq.auth.load_certificates)
    for key in keys:
        check_trusted(key, "authorised key", PUBLIC_FILE)
    return keys


# --- `voxpipe keys generate` --------------------------------------------------

def _make_pair(directory: Path, name: str) -> tuple[Path, Path]:
    import zmq.auth

    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    for path in (public, secret):
        path.unlink(missing_ok=True)
    old = os.umask(OTHERS)  # the secret file is never readable by others, not even for a moment
    try:
        made_public, made_secret = zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(old)
    os.chmod(made_secret, PRIVATE_FILE)
    os.chmod(made_public, PUBLIC_FILE)
    return Path(made_public), Path(made_secret)


def generate(directory: Path, client_name: str = "", force: bool = False) -> list[str]:
    """Make the keys; returns the lines to print.

    Without a client name: the bus host's server keypair and its own client keypair, the latter
    authorised at once.  With one: only a client keypair, for a participant machine.
    """
    names = [CLIENT] if client_name else [SERVER, CLIENT]
    existing = [directory / f"{name}{suffix}" for name in names for suffix in (".key_secret", ".key")
                if (directory / f"{name}{suffix}").exists()]
    if existing and not force:
        raise ConfigError(f"{existing[0]} already exists; keep it, or pass --force to replace the keys "
                          f"(every machine holding an old public key must then get the new one)")
    directory.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    lines: list[str] = []
    if not client_name:
        public, secret = _make_pair(directory, SERVER)
        lines.append(f"server keypair: {public} (public) and {secret} (secret, mode 600)")
    public, secret = _make_pair(directory, CLIENT)
    lines.append(f"client keypair: {public} (public) and {secret} (secret, mode 600)")
    if not client_name:
        authorized = directory / "authorized"
        authorized.mkdir(mode=PRIVATE_DIR, exist_ok=True)
        shutil.copyfile(public, authorized / f"{LOCAL_NAME}.key")
        lines += [
            f"authorised this machine's client key as {authorized / (LOCAL_NAME + '.key')}",
            "",
            "To let another machine (say, a GPU box for tts) join this bus:",
            "  1. on it:   voxpipe keys generate --client NAME",
            f"  2. copy its client.key here as {authorized}/NAME.key",
            f"  3. copy {directory / 'server.key'} to its keys dir (the public key only, never server.key_secret)",
            "  4. restart the bus: authorised keys are read when it starts",
        ]
    else:
        host = socket.gethostname()
        lines += [
            "",
            f"To authorise this machine ({host}) on the bus host:",
            f"  1. copy {public} to the bus host's keys dir as authorized/{client_name}.key",
            f"  2. copy the bus host's server.key (public) here as {directory / 'server.key'}",
            "  3. restart the bus there: authorised keys are read when it starts",
        ]
    return lines


def command(args: argparse.Namespace, config: Config) -> int:
    """`voxpipe keys generate [--dir D] [--client NAME] [--force]`."""
    directory = Path(args.dir).expanduser() if args.dir else keys_dir(config["bus"])
    if args.client and ("/" in args.client or args.client.startswith(".")):
        raise ConfigError(f"--client {args.client!r}: use a plain name such as gpu1")
    for line in generate(directory, args.client or "", args.force):
        print(line)
    return 0
