"""API keys: from environment variables or from a file of mode 0600, read when a profile is first used.

A profile names where its keys are, never the keys themselves:

- `api_key_file`: a file with one key per line (the first is the primary, the others are
  reserves; blank lines and lines starting with `#` are skipped).  It must be mode 0600 or
  stricter, or it is refused with the chmod to run.
- `api_key_env`, then `reserve_key_envs`: environment variables.

The keys are returned in that order (file first), without blanks or repeats.  Nothing here
logs, prints or publishes a key; error messages name the file or variable only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from .config import ConfigError
from .keys import check_private_file


def read_key(profile: Mapping[str, Any], env: Mapping[str, str] = os.environ) -> list[str]:
    """The keys of a profile, primary first, then reserves."""
    keys: list[str] = []
    name = profile.get("name", "?")
    if profile.get("api_key_file"):
        path = Path(profile["api_key_file"]).expanduser()
        check_private_file(path, f"key llm.profiles.{name}.api_key_file:",
                           "create it with mode 600, one key per line")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(f"key llm.profiles.{name}.api_key_file: {path} cannot be read: {reason}") from None
        keys += [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    for variable in [profile.get("api_key_env", ""), *profile.get("reserve_key_envs", [])]:
        if variable:
            keys.append(env.get(variable, "").strip())
    return list(dict.fromkeys(key for key in keys if key))
