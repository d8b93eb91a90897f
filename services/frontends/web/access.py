"""Who may use `voxpipe web`: the loopback rule and the access token. Kept apart from the gateway (and
aiohttp), so `voxpipe run` checks a token file before it starts anything."""

from __future__ import annotations

import ipaddress
import re
import secrets
from pathlib import Path

from ...config import ConfigError
from ...files import OTHERS, PRIVATE_FILE, exposure

TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_.~-]{16,512}")
"""What a token file may hold: URL-safe characters (it travels as ?token=), enough of them to guess none."""


def is_loopback(host: str) -> bool:
    """Whether `host` (a bind address or a Host header's name) can only be reached from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_token_file(token_file: str) -> str:
    """The token in `web.token_file`. It is checked before it is read: it must be the user's own and
    closed to everyone else (0600), or anyone who can read it drives the daemon, and anyone who can
    write it chooses the token."""
    path = Path(token_file).expanduser()
    try:
        problem = exposure(path, path.stat(), OTHERS, PRIVATE_FILE)
        if problem is not None:
            raise ConfigError(f"web.token_file {path} {problem.problem}, so other users could read or change "
                              f"the access token; run: {problem.fix}")
        text = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"web.token_file {path} cannot be read: {exc.strerror}") from None
    if not TOKEN_PATTERN.fullmatch(text):
        raise ConfigError(f"web.token_file {path} must hold one token of 16 to 512 URL-safe characters "
                          f"(A-Z a-z 0-9 _ . ~ -); make one with: python3 -c 'import secrets; "
                          f"print(secrets.token_urlsafe(32))' > {path}")
    return text


def access_token(host: str, token_file: str) -> str:
    """The token every request must carry: the token file's when one is set, else a new one when `host`
    is not loopback, else "" (none needed)."""
    if token_file:
        return read_token_file(token_file)
    return "" if is_loopback(host) else secrets.token_urlsafe(32)
