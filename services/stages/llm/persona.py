"""Which persona answers a request: its system prompt by name (`Request.persona`).

"" is the configured persona (llm.persona_file, else llm.system_prompt), as before personas had
names. A name is looked up in `[llm.personas]` (name = a persona file), then among the persona
files shipped in the package (personas/<name>.md: the MiSide characters the game link names by the
mod's characterType, docs/design/game-link.md §4.2 and A8). Every file is read once, when the stage
starts, as llm.persona_file always was: an edit takes a restart, and a file that cannot be read stops
the stage with the key that names it rather than failing replies one by one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...config import ConfigError
from ...protocol.kinds import PERSONA_PATTERN

BUILT_IN = Path(__file__).resolve().parent / "personas"
"""The persona files shipped in the package (pyproject.toml's package-data), one per name."""


def read_persona(path: str, key: str) -> str:
    """A persona file's text; one that cannot be read is a config error naming `key`."""
    try:
        return Path(path).expanduser().read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"key {key} = {path!r} cannot be read: {exc.strerror}") from None


def built_in() -> dict[str, str]:
    """Every persona shipped in the package, by name (its file's stem)."""
    return {file.stem: read_persona(str(file), f"built-in persona {file.stem}")
            for file in sorted(BUILT_IN.glob("*.md"))}


@dataclass(frozen=True)
class Personas:
    """The configured persona and every named one, read at start."""

    default: str
    named: Mapping[str, str]
    configured: frozenset[str] = frozenset()
    """The names `[llm.personas]` sets, for the error of an unknown one."""

    @classmethod
    def load(cls, llm: Mapping[str, Any]) -> Personas:
        """The personas of the [llm] section; `[llm.personas]` overrides a built-in of the same name.
        A name no request could send (PERSONA_PATTERN) or a path that is not a string is refused here,
        where the key is known."""
        default = read_persona(llm["persona_file"], "llm.persona_file") if llm["persona_file"] else llm["system_prompt"]
        named = built_in()
        for name, path in llm["personas"].items():
            key = f"llm.personas.{name}"
            if not name or not PERSONA_PATTERN.fullmatch(name):
                raise ConfigError(f"key {key}: a persona name is 1 to 64 of A-Z a-z 0-9 _ . -")
            if not isinstance(path, str):
                raise ConfigError(f"key {key} = {path!r} is not allowed; expected the path of a persona file")
            named[name] = read_persona(path, key)
        return cls(default, named, frozenset(llm["personas"]))

    def text(self, name: str) -> str:
        """The system prompt of persona `name` ("" for the configured one). An unknown name is a config
        error, as an unknown profile is: the reply ends with llm.done status error, saying how to add it."""
        if not name:
            return self.default
        if name in self.named:
            return self.named[name]
        built = sorted(set(self.named) - self.configured)
        raise ConfigError(f"unknown persona {name!r}; add [llm.personas] {name} = \"/path/file\" to the config "
                          f"(configured: {', '.join(sorted(self.configured)) or 'none'}; "
                          f"built in: {', '.join(built) or 'none'})")
