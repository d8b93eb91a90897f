"""API keys: where they come from, which one is in use, and keeping them out of every message.

The one home for secrets: every plugin that calls an API (the llm providers through their
profile, the openai-speech engine through [tts.openai-speech]) gets its keys here. A plugin's
settings name where its keys are, never the keys themselves (config.key_settings declares them):

- `api_key_file`: a file with one key per line (the first is the primary, the others are
  reserves; blank lines and lines starting with `#` are skipped).  It must be mode 0600 or
  stricter, or it is refused with the chmod to run (`voxpipe run` checks every one before it starts
  anything: `check_key_files`).
- `api_key_env`, then `reserve_key_envs`: environment variables.

The keys are read when the plugin is first used, and returned in that order (file first),
without blanks or repeats.  Nothing here logs, prints or publishes a key; error messages name
the file or variable only, and `scrub` takes a key out of any text a server sent back.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .config import Config, ConfigError
from .runtime.curve import check_private_file


def read_key(settings: Mapping[str, Any], env: Mapping[str, str] = os.environ, table: str = "") -> list[str]:
    """The keys `settings` name, primary first, then reserves. `table` is where the settings live, for
    messages; "" means the profile `settings["name"]`."""
    keys: list[str] = []
    table = table or f"llm.profiles.{settings.get('name', '?')}"
    path = key_file(settings, table)
    if path is not None:
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


def key_file(settings: Mapping[str, Any], table: str) -> Path | None:
    """The `api_key_file` that `settings` (the table `table`) names, refused (ConfigError) unless it
    exists with mode 0600 or stricter; None when they name none."""
    if not settings.get("api_key_file"):
        return None
    path = Path(settings["api_key_file"]).expanduser()
    check_private_file(path, f"key {table}.api_key_file:", "create it with mode 600, one key per line")
    return path


def check_key_files(config: Config, stages: Iterable[str]) -> None:
    """Refuse now, before any of `stages` starts, a key file that one of them would refuse later:
    every llm profile's (llm reads one at start, the others on first use) and the tts engine's.
    `voxpipe run` calls this, so a bad mode is one clear exit 2, not a stage's crash loop."""
    tables: dict[str, Mapping[str, Any]] = {}
    if "llm" in stages:
        tables.update({f"llm.profiles.{name}": config.profile(name) for name in config["llm"]["profiles"]})
    if "tts" in stages:
        engine = config["tts"]["engine"]
        tables[f"tts.{engine}"] = config["tts"].get(engine, {})
    for table, settings in tables.items():
        key_file(settings, table)


CUT_KEY_MIN = 4
"""The shortest start of a key that `scrub` takes off the end of a text as a cut-off key."""


def scrub(text: str, secret: str) -> str:
    """Remove a secret from a message: the whole key; a key cut off at the end of the text (a server's
    body read only in part), down to CUT_KEY_MIN characters; and the 8-character prefix some servers
    echo back (for keys like `sk-proj-...` that prefix is fixed, so it is not what keeps a key secret)."""
    if not secret:
        return text
    text = text.replace(secret, "***")
    for size in range(min(len(secret) - 1, len(text)), CUT_KEY_MIN - 1, -1):
        if text.endswith(secret[:size]):
            text = text[:-size] + "***"
            break
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
