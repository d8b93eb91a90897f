"""API keys: where they come from, which one is in use, and keeping them out of every message.

The one home for secrets: every plugin that calls an API (the llm providers through their
profile, the openai-speech engine through [tts.openai-speech]) gets its keys here. A plugin's
settings name where its keys are, never the keys themselves (config.key_settings declares them):

- `api_key_file`: a file with one key per line (the first is the primary, the others are
  reserves; blank lines and lines starting with `#` are skipped).  It must be mode 0600 or
  stricter, or it is refused with the chmod to run.
- `api_key_env`, then `reserve_key_envs`: environment variables.

The keys are read when the plugin is first used, and returned in that order (file first),
without blanks or repeats.  Nothing here logs, prints or publishes a key; error messages name
the file or variable only, and `scrub` takes a key out of any text a server sent back.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import ConfigError
from .runtime.curve import check_private_file


def read_key(settings: Mapping[str, Any], env: Mapping[str, str] = os.environ, table: str = "") -> list[str]:
    """The keys `settings` name, primary first, then reserves. `table` is where the settings live, for
    messages; "" means the profile `settings["name"]`."""
    keys: list[str] = []
    table = table or f"llm.profiles.{settings.get('name', '?')}"
    if settings.get("api_key_file"):
        path = Path(settings["api_key_file"]).expanduser()
        check_private_file(path, f"key {table}.api_key_file:", "create it with mode 600, one key per line")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(f"key {table}.api_key_file: {path} cannot be read: {reason}") from None
        keys += [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    for variable in [settings.get("api_key_env", ""), *settings.get("reserve_key_envs", [])]:
        if variable:
            keys.append(env.get(variable, "").strip())
    return list(dict.fromkeys(key for key in keys if key))


def scrub(text: str, secret: str) -> str:
    """Remove a secret (and the prefix of it some servers echo back) from a message."""
    if secret:
        text = text.replace(secret, "***")
        if len(secret) > 8:
            text = text.replace(secret[:8], "***")
    return text


class KeyRing:
    """A plugin's API keys in order; sticks to the key that last worked."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys or [""]
        self.index = 0

    @property
    def current(self) -> str:
        return self.keys[self.index]

    def rotate(self) -> None:
        self.index = (self.index + 1) % len(self.keys)
