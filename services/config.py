"""The voxpipe configuration: defaults, the TOML file, environment overrides and validation.

This module knows the config's own keys, and the vocabulary (`Rule`, `Setting`) every key is
declared in.  Each plugin declares its own keys in its registry entry (services/plugins.py:
providers, TTS engines, player backends), and the chunker with its policy; `load()` reads
them there, so no plugin name or key is written twice.  The value is resolved in three
layers: the embedded defaults (which work offline), the TOML file, then
``VOXPIPE_<SECTION>__<KEY>`` environment variables (for systemd drop-ins and tests).  Every
error names where the bad value came from, the key, and what is allowed.
"""

from __future__ import annotations

import copy
import functools
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from .plugins import Plugin

ENV_PREFIX = "VOXPIPE_"
STAGES = ("llm", "chunker", "tts", "player", "history")
"""The stages `voxpipe run` can start. Their classes are registered in services/runtime/registry.py, which
imports the bus runtime, too heavy for every config load; tests/test_plugins.py keeps the two equal."""


class ConfigError(ValueError):
    """A config problem; the message names the source, the key and what is allowed."""


EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
"""Every voxpipe process's exit codes. EXIT_USAGE is a ConfigError or a bad command line: something only
the user can fix, so `voxpipe run` and systemd (RestartPreventExitStatus=2) do not restart on it."""


# --- rules and settings ------------------------------------------------------

class Rule(NamedTuple):
    """How one key is checked and how an environment string is turned into its value. (Named tuples, not
    dataclasses: every process imports this module, and defining a dataclass costs about 0.5 ms.)"""

    kind: type | tuple[type, ...]
    describe: str
    check: Callable[[Any], bool] = lambda value: True

    def parse_env(self, text: str) -> Any:
        if self.kind is str:
            return text
        if self.kind is bool:
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            return text
        if self.kind is list:
            return [item.strip() for item in text.split(",") if item.strip()]
        for convert in (int, float):
            try:
                return convert(text)
            except ValueError:
                continue
        return text

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool) and self.kind is not bool:
            return False
        if self.kind is float and isinstance(value, int):
            return self.check(value)
        return isinstance(value, self.kind) and self.check(value)

    def refusal(self, key: str, value: Any) -> str:
        """What is wrong with `value` at `key` (a dotted path); said the same by load() and by a plugin built
        without it."""
        if self.kind is dict:
            return f"key {key} must be a table"
        return f"key {key} = {value!r} is not allowed; expected {self.describe}"


class Setting(NamedTuple):
    """One declared key: its default, its rule, and what it is for (deploy/voxpipe.example.toml says it
    to users, and tests/test_plugins.py checks that it does)."""

    default: Any
    rule: Rule
    doc: str


def rules(settings: Mapping[str, Setting]) -> dict[str, Rule]:
    return {key: setting.rule for key, setting in settings.items()}


def defaults(settings: Mapping[str, Setting]) -> dict[str, Any]:
    """Fresh copies, so no table shares a mutable default with another."""
    return {key: copy.deepcopy(setting.default) for key, setting in settings.items()}


def text() -> Rule:
    return Rule(str, "a string")


def choice(*choices: str) -> Rule:
    return Rule(str, f"one of: {', '.join(choices)}", lambda value: value in choices)


def flag() -> Rule:
    return Rule(bool, "true or false")


def count(low: int, high: int) -> Rule:
    return Rule(int, f"an integer from {low} to {high}", lambda value: low <= value <= high)


def real(low: float, high: float) -> Rule:
    return Rule(float, f"a number from {low} to {high}", lambda value: low <= value <= high)


def strings() -> Rule:
    return Rule(list, "a list of strings", lambda value: all(isinstance(item, str) for item in value))


def languages() -> Rule:
    return Rule(list, "a list drawn from: ru, en", lambda value: all(item in ("ru", "en") for item in value))


def names(allowed: tuple[str, ...]) -> Rule:
    return Rule(list, f"a list drawn from: {', '.join(allowed)}",
                lambda value: all(item in allowed for item in value))


def table() -> Rule:
    """A table of any keys, passed through as it is (a profile's `extra`)."""
    return Rule(dict, "a table")


# --- the schema -------------------------------------------------------------
# The config's own keys. The tables plugins fill ([tts], [player] and every profile) get their
# plugins' keys from the registries in `full_schema()`.

def key_settings(env: str) -> dict[str, Setting]:
    """Where a plugin's API keys are, never the keys themselves: a profile's keys, and openai-speech's,
    whose variable defaults to `env`. services/secrets.py reads them."""
    return {
        "api_key_env": Setting(env, text(), "the environment variable holding the API key"),
        "api_key_file": Setting("", text(), "a file of mode 0600 (refused if looser), one key per line: the first "
                                            "the primary, the rest reserves; tried before the variables"),
        "reserve_key_envs": Setting([], strings(), "more key variables, tried in turn when a key is refused "
                                                   "(401, 402, 403) or throttled (429)"),
    }


PROFILE_SCHEMA: dict[str, Any] = {
    "stream": flag(),
    **rules(key_settings("")),
    "max_tokens": count(1, 1_000_000),
    "temperature": real(0.0, 2.0),
    "top_p": real(0.0, 1.0),
    "top_k": count(0, 100_000),
    "presence_penalty": real(-2.0, 2.0),
    "stop": strings(),
    "reasoning_budget": count(-1, 1_000_000),
    "reasoning_start": choice("tag", "open"),
    "prompt_style": choice("auto", "chat", "dialogue"),
    "assistant_name": text(),
    "connect_timeout_s": real(0.1, 600.0),
    "first_token_timeout_s": real(0.1, 3600.0),
    "first_token_total_s": real(0.1, 3600.0),
    "idle_timeout_s": real(0.1, 3600.0),
    "retries": count(0, 20),
    "backoff_s": real(0.0, 60.0),
    "backoff_max_s": real(0.0, 600.0),
    "stop_strings": strings(),
    "max_reply_chars": count(0, 10_000_000),
    "max_reply_sentences": count(0, 100_000),
    "repeat_ngram": count(0, 1000),
    "repeat_count": count(2, 1000),
    "user_turn_prefixes": strings(),
}
"""The keys of a profile that the llm stage reads; its provider's keys come from the provider registry."""
PROFILE_DEFAULTS: dict[str, Any] = {
    "stream": True, **defaults(key_settings("")),
    "max_tokens": 200, "temperature": 0.7, "top_p": 0.0, "top_k": 0, "presence_penalty": 0.0, "stop": [],
    "reasoning_budget": -1, "reasoning_start": "tag", "prompt_style": "auto", "assistant_name": "Assistant",
    "connect_timeout_s": 10.0, "first_token_timeout_s": 60.0, "first_token_total_s": 30.0, "idle_timeout_s": 30.0,
    "retries": 2, "backoff_s": 0.5, "backoff_max_s": 8.0,
    "stop_strings": [], "max_reply_chars": 0, "max_reply_sentences": 0, "repeat_ngram": 8, "repeat_count": 3,
    "user_turn_prefixes": ["User:", "Пользователь:"],
}
"""top_p, top_k and presence_penalty of 0 and reasoning_budget of -1 mean "not sent"."""

SCHEMA: dict[str, Any] = {
    "bus": {"runtime_dir": text(), "transport": choice("ipc", "tcp"), "tcp_bind": text(),
            "tcp_port": count(1, 65533), "connect_host": text(), "curve": flag(), "keys_dir": text(),
            "authorized_dir": text()},
    "llm": {
        "profile": text(),
        "on_busy": choice("cancel", "queue", "reject"),
        "persona_file": text(),
        "personas": table(),  # name = persona file; names and paths are checked by stages/llm/persona.py
        "history_token_budget": count(0, 10_000_000),
        "system_prompt": text(),
        "history_limit": count(0, 1000),
        "context_timeout_ms": count(0, 60_000),
        "workers": count(1, 256),
        "profiles": "profiles",
    },
    "chunker": "chunker",
    "history": {"db_path": text(), "persona": text(), "commands_file": text(),
                "max_commands_per_reply": count(0, 10_000), "marks_wait_ms": count(0, 60_000)},
    "log": {"level": choice("debug", "info", "warning", "error")},
    "metrics": {"prometheus_port": count(0, 65535), "prometheus_bind": text()},
    "web": {"enabled": flag(), "host": text(), "port": count(1, 65535), "token_file": text()},
    "game": {
        "enabled": flag(), "host": text(), "port": count(1, 65535), "delivery": choice("phrases", "whole"),
        "multi_character": choice("whole", "phrases"), "multi_window_s": real(0.0, 86400.0), "voice": flag(),
        "voice_dir": text(), "path_style": choice("auto", "wine", "posix", "windows", "wsl"),
        "file_ttl_s": real(1.0, 86400.0), "first_phrase_timeout_s": real(1.0, 3600.0), "load_ms": count(0, 5000),
        "tags": strings(), "event_label": text(), "read_timeout_s": real(0.1, 600.0),
        "max_request_bytes": count(1024, 64 * 1024 * 1024), "max_connections": count(1, 1024),
        "language": text(), "text_wait_time": count(1, 3600), "voice_wait_time": count(1, 3600),
        "mitas_menu": flag(), "emotion_menu": flag(), "gm_on": flag(), "gm_read": flag(), "gm_voice": flag(),
        "gm_repeat": count(0, 1000), "cc_limit_mod": count(0, 100000),
        "characters": Rule(dict, "a table of [game.characters.<Name>] tables of strings: persona, voice, profile",
                           lambda value: all(isinstance(one, dict) and set(one) <= {"persona", "voice", "profile"}
                                             and all(isinstance(item, str) for item in one.values())
                                             for one in value.values())),
    },
    "run": {
        "stages": names(STAGES),
        "instances": {name: count(1, 64) for name in STAGES},
        "ready_timeout_s": real(1.0, 600.0),
        "restart_limit": count(0, 1000),
        "restart_window_s": real(1.0, 3600.0),
    },
}

DEFAULTS: dict[str, Any] = {
    "bus": {"runtime_dir": "", "transport": "ipc", "tcp_bind": "127.0.0.1", "tcp_port": 7600, "connect_host": "",
            "curve": False, "keys_dir": "", "authorized_dir": ""},
    "llm": {
        "profile": "local",
        "on_busy": "cancel",
        "persona_file": "",
        "personas": {},
        "history_token_budget": 0,
        "system_prompt": "You are a friendly voice assistant. Answer briefly.",
        "history_limit": 20,
        "context_timeout_ms": 500,
        "workers": 16,
        "profiles": {
            "local": {"provider": "local"},
            "openai": {"provider": "openai", "base_url": "https://api.openai.com/v1",
                       "model": "gpt-4o-mini", "api_key_env": "OPENAI_API_KEY"},
            "gemini": {"provider": "gemini", "base_url": "https://generativelanguage.googleapis.com/v1beta",
                       "model": "gemini-2.0-flash", "api_key_env": "GEMINI_API_KEY"},
        },
    },
    "chunker": {},
    "tts": {"engine": "espeak"},
    "player": {"backend": "auto"},
    "history": {"db_path": "", "persona": "default", "commands_file": "", "max_commands_per_reply": 30,
                "marks_wait_ms": 2000},
    "log": {"level": "info"},
    "metrics": {"prometheus_port": 0, "prometheus_bind": "127.0.0.1"},
    "web": {"enabled": False, "host": "127.0.0.1", "port": 8765, "token_file": ""},
    "game": {
        "enabled": False, "host": "127.0.0.1", "port": 12345, "delivery": "phrases", "multi_character": "whole",
        "multi_window_s": 120.0, "voice": True, "voice_dir": "", "path_style": "auto", "file_ttl_s": 300.0,
        "first_phrase_timeout_s": 30.0, "load_ms": 200,
        "tags": ["e", "c", "a", "m", "f", "v", "music", "hint", "clothes", "interaction"], "event_label": "",
        "read_timeout_s": 5.0, "max_request_bytes": 4 * 1024 * 1024, "max_connections": 32,
        "language": "RU", "text_wait_time": 40, "voice_wait_time": 40, "mitas_menu": False, "emotion_menu": False,
        "gm_on": False, "gm_read": False, "gm_voice": False, "gm_repeat": 2, "cc_limit_mod": 100,
        "characters": {},
    },
    "run": {
        "stages": list(STAGES),
        "instances": dict.fromkeys(STAGES, 1),
        "ready_timeout_s": 120.0,
        "restart_limit": 5,
        "restart_window_s": 60.0,
    },
}


class FullSchema(NamedTuple):
    """The schema and defaults with every plugin's keys: a profile takes the keys of every provider (so
    changing its provider needs no other edit, and a default profile stays valid under any), [player]
    those of every backend, and [tts] a table per engine."""

    schema: dict[str, Any]
    defaults: dict[str, Any]
    profile: dict[str, Any]
    profile_defaults: dict[str, Any]
    providers: tuple[str, ...]


@functools.cache
def full_schema() -> FullSchema:
    """Read from the registries on first use: they declare their keys with this module's rules, so
    they import it, and cannot be imported at its top."""
    from .stages.llm.providers import PROVIDERS
    from .stages.player.backends import BACKENDS
    from .stages.tts.engines import ENGINES

    provider_keys = _merged(PROVIDERS)
    backend_keys = _merged(BACKENDS)
    return FullSchema(
        schema={**SCHEMA,
                "tts": {"engine": choice(*ENGINES), **{name: rules(e.settings) for name, e in ENGINES.items()}},
                "player": {"backend": choice("auto", *BACKENDS), **rules(backend_keys)}},
        defaults={**DEFAULTS,
                  "tts": {**DEFAULTS["tts"], **{name: defaults(e.settings) for name, e in ENGINES.items()}},
                  "player": {**DEFAULTS["player"], **defaults(backend_keys)}},
        profile={"provider": choice(*PROVIDERS), **PROFILE_SCHEMA, **rules(provider_keys)},
        profile_defaults={**PROFILE_DEFAULTS, **defaults(provider_keys)},
        providers=tuple(PROVIDERS))


def _merged(registry: Mapping[str, Plugin]) -> dict[str, Setting]:
    """The keys every plugin of a registry declares, for a table they share (a key several plugins
    take is declared once, in the registry, and shared by them: tests/test_plugins.py checks)."""
    return {key: setting for entry in registry.values() for key, setting in entry.settings.items()}


# --- loading ----------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    """The resolved configuration; `path` is the file it came from (None: defaults only)."""

    data: Mapping[str, Any]
    path: Path | None

    def __getitem__(self, section: str) -> Any:
        return self.data[section]

    def profile(self, name: str = "") -> dict[str, Any]:
        """A named LLM profile with its defaults filled in (the default profile for "")."""
        chosen = name or self.data["llm"]["profile"]
        profiles = self.data["llm"]["profiles"]
        if chosen not in profiles:
            raise ConfigError(f"unknown profile {chosen!r}; configured profiles: {', '.join(sorted(profiles))}")
        return {"name": chosen, **full_schema().profile_defaults, **profiles[chosen]}


def default_path(env: Mapping[str, str] = os.environ) -> Path:
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "voxpipe" / "config.toml"


def load(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] = os.environ) -> Config:
    """Resolve the config: `path`, else $VOXPIPE_CONFIG, else the default path if it exists."""
    explicit = path or env.get("VOXPIPE_CONFIG")
    # Absolute once, here: `voxpipe run` hands this path to stages that start in another directory.
    file = Path(explicit).expanduser().absolute() if explicit else default_path(env)
    full = full_schema()
    data = copy.deepcopy(full.defaults)
    origins: dict[tuple[str, ...], str] = {}
    used: Path | None = None
    if explicit or file.exists():
        used = file
        _merge(data, _read_toml(file), (), str(file), origins)
    for name, value in sorted(env.items()):
        if name.startswith(ENV_PREFIX) and "__" in name:
            _apply_env(data, name, value, origins)
    _validate(data, full.schema, (), origins, str(used) if used else "defaults")
    _check_references(data, origins)
    _check_game(data, origins)
    return Config(data=data, path=used)


def _read_toml(file: Path) -> dict[str, Any]:
    try:
        with open(file, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {file} does not exist; create it from "
                          f"deploy/voxpipe.example.toml or drop --config") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {file} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"config file {file} cannot be read: {exc.strerror}") from None


def _merge(target: dict[str, Any], source: Mapping[str, Any], prefix: tuple[str, ...],
           origin: str, origins: dict[tuple[str, ...], str]) -> None:
    for key, value in source.items():
        path = (*prefix, key)
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value, path, origin, origins)
        else:
            target[key] = copy.deepcopy(value)
        origins[path] = origin


def _apply_env(data: dict[str, Any], name: str, value: str, origins: dict[tuple[str, ...], str]) -> None:
    path = tuple(part.lower() for part in name[len(ENV_PREFIX):].split("__"))
    if not all(path):
        raise ConfigError(f"environment variable {name}: empty key part; use VOXPIPE_SECTION__KEY")
    node: dict[str, Any] = data
    tables: list[str] = []
    for part in path[:-1]:
        tables.append(_dashed(node, part))
        child = node.setdefault(tables[-1], {})
        if not isinstance(child, dict):
            raise ConfigError(f"environment variable {name}: {'.'.join(path)} is not a table key")
        node = child
    path = (*tables, path[-1])
    rule = _rule_for(path)
    node[path[-1]] = rule.parse_env(value) if rule else value
    origins[path] = f"environment variable {name}"


def _dashed(node: Mapping[str, Any], part: str) -> str:
    """Shells and systemd cannot put '-' in a variable name: OPENAI_SPEECH names the table
    openai-speech when there is one."""
    dashed = part.replace("_", "-")
    return dashed if part not in node and dashed in node else part


def _rule_for(path: tuple[str, ...]) -> Rule | None:
    node: Any = full_schema().schema
    for part in path:
        if node == "profiles":
            node = full_schema().profile
            continue
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node if isinstance(node, Rule) else None


def _validate(data: Any, schema: Any, path: tuple[str, ...], origins: dict[tuple[str, ...], str],
              fallback: str) -> None:
    where = _where(path, origins, fallback)
    if schema == "chunker":
        _validate_chunker(data, path, origins, fallback)
        return
    if schema == "profiles":
        if not isinstance(data, dict) or not data:
            raise ConfigError(f"{where}: key {'.'.join(path)} must be a table of named profiles")
        full = full_schema()
        for name, profile in data.items():
            _validate(profile, full.profile, (*path, name), origins, fallback)
            if "provider" not in profile:
                raise ConfigError(f"{_where((*path, name), origins, fallback)}: profile "
                                  f"{'.'.join((*path, name))} needs provider = one of: {', '.join(full.providers)}")
        return
    if isinstance(schema, Rule):
        if not schema.accepts(data):
            raise ConfigError(f"{where}: {schema.refusal('.'.join(path), data)}")
        return
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: key {'.'.join(path)} must be a table")
    for key, value in data.items():
        if key not in schema:
            raise ConfigError(f"{_where((*path, key), origins, fallback)}: unknown key "
                              f"{'.'.join((*path, key))}; allowed: {', '.join(sorted(schema))}")
        _validate(value, schema[key], (*path, key), origins, fallback)


def _validate_chunker(data: Any, path: tuple[str, ...], origins: dict[tuple[str, ...], str],
                      fallback: str) -> None:
    """The chunker's keys live with its policy (services/stages/chunker/core.py); check them there. An empty
    table is the policy's defaults, valid by construction, so the chunker (slow to import, for its
    patterns) is imported only to check keys that were set."""
    if not isinstance(data, dict):
        raise ConfigError(f"{_where(path, origins, fallback)}: key chunker must be a table")
    if not data:
        return
    from .stages.chunker.core import ChunkerPolicy

    try:
        ChunkerPolicy.from_mapping(data)
    except (ValueError, TypeError) as exc:
        key = str(exc).split(":", 1)[0]
        raise ConfigError(f"{_where((*path, key), origins, fallback)}: key chunker.{exc}") from None


def _check_references(data: Mapping[str, Any], origins: dict[tuple[str, ...], str]) -> None:
    profile = data["llm"]["profile"]
    if profile not in data["llm"]["profiles"]:
        where = _where(("llm", "profile"), origins, "defaults")
        raise ConfigError(f"{where}: key llm.profile = {profile!r} names no profile; "
                          f"configured: {', '.join(sorted(data['llm']['profiles']))}")
    for name, settings in data["llm"]["profiles"].items():
        if settings.get("prompt_style") == "dialogue" and settings.get("provider") != "local":
            where = _where(("llm", "profiles", name, "prompt_style"), origins, "defaults")
            raise ConfigError(f"{where}: key llm.profiles.{name}.prompt_style = 'dialogue' needs a raw-completion "
                              f"provider (local); use 'chat' or 'auto' for provider {settings.get('provider')!r}")


def _check_game(data: Mapping[str, Any], origins: dict[tuple[str, ...], str]) -> None:
    """The mod gives up on a reply after its TEXT_WAIT_TIME (which every answer sets, R4): the link
    must answer a held request well before, or the player sees "Too long waited for text" (A29)."""
    game = data["game"]
    if game["first_phrase_timeout_s"] > game["text_wait_time"] - 5:
        where = _where(("game", "first_phrase_timeout_s"), origins, "defaults")
        raise ConfigError(f"{where}: key game.first_phrase_timeout_s = {game['first_phrase_timeout_s']:g} must be at "
                          f"most game.text_wait_time - 5 = {game['text_wait_time'] - 5}: the mod stops waiting "
                          f"for a reply after text_wait_time seconds")


def _where(path: tuple[str, ...], origins: Mapping[tuple[str, ...], str], fallback: str) -> str:
    """The source of the value at path (or its closest table), for error messages."""
    for length in range(len(path), 0, -1):
        if path[:length] in origins:
            return f"config error in {origins[path[:length]]}"
    return f"config error in {fallback}"
