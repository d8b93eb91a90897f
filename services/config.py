"""The voxpipe configuration: defaults, the TOML file, environment overrides and validation.

This module is the only place that knows config keys.  The value is resolved in
three layers: the embedded defaults (which work offline), the TOML file, then
``VOXPIPE_<SECTION>__<KEY>`` environment variables (for systemd drop-ins and
tests).  Every error names where the bad value came from, the key, and what is
allowed.
"""

from __future__ import annotations

import copy
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

ENV_PREFIX = "VOXPIPE_"
PROVIDERS = ("local", "openai", "gemini", "http", "g4f")
TTS_ENGINES = ("espeak", "coqui", "openai-speech", "null")
PLAYER_BACKENDS = ("auto", "simpleaudio", "sounddevice", "wav", "null")
STAGES = ("llm", "chunker", "tts", "player", "history")


class ConfigError(ValueError):
    """A config problem; the message names the source, the key and what is allowed."""


# --- leaf rules -------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    """How one key is checked and how an environment string is turned into its value."""

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


def _text() -> Rule:
    return Rule(str, "a string")


def _choice(*choices: str) -> Rule:
    return Rule(str, f"one of: {', '.join(choices)}", lambda value: value in choices)


def _flag() -> Rule:
    return Rule(bool, "true or false")


def _count(low: int, high: int) -> Rule:
    return Rule(int, f"an integer from {low} to {high}", lambda value: low <= value <= high)


def _real(low: float, high: float) -> Rule:
    return Rule(float, f"a number from {low} to {high}", lambda value: low <= value <= high)


def _strings() -> Rule:
    return Rule(list, "a list of strings", lambda value: all(isinstance(item, str) for item in value))


def _languages() -> Rule:
    return Rule(list, "a list drawn from: ru, en", lambda value: all(item in ("ru", "en") for item in value))


def _names(allowed: tuple[str, ...]) -> Rule:
    return Rule(list, f"a list drawn from: {', '.join(allowed)}",
                lambda value: all(item in allowed for item in value))


# --- the schema -------------------------------------------------------------

PROFILE_SCHEMA: dict[str, Any] = {
    "provider": _choice(*PROVIDERS),
    "stream": _flag(),
    "model": _text(),
    "model_path": _text(),
    "base_url": _text(),
    "url": _text(),
    "wire": _choice("openai-sse", "ndjson"),
    "api_key_env": _text(),
    "api_key_file": _text(),
    "reserve_key_envs": _strings(),
    "max_tokens": _count(1, 1_000_000),
    "temperature": _real(0.0, 2.0),
    "top_p": _real(0.0, 1.0),
    "top_k": _count(0, 100_000),
    "presence_penalty": _real(-2.0, 2.0),
    "stop": _strings(),
    "reasoning_budget": _count(-1, 1_000_000),
    "n_threads": _count(0, 1024),
    "n_ctx": _count(128, 1_048_576),
    "chat_format": _text(),
    "prompt_style": _choice("auto", "chat", "dialogue"),
    "assistant_name": _text(),
    "repack": _choice("auto", "on", "off"),
    "connect_timeout_s": _real(0.1, 600.0),
    "first_token_timeout_s": _real(0.1, 3600.0),
    "idle_timeout_s": _real(0.1, 3600.0),
    "retries": _count(0, 20),
    "backoff_s": _real(0.0, 60.0),
    "backoff_max_s": _real(0.0, 600.0),
    "stop_strings": _strings(),
    "max_reply_chars": _count(0, 10_000_000),
    "max_reply_sentences": _count(0, 100_000),
    "repeat_ngram": _count(0, 1000),
    "repeat_count": _count(2, 1000),
    "user_turn_prefixes": _strings(),
    "extra": "free",
}
PROFILE_DEFAULTS: dict[str, Any] = {
    "stream": True, "model": "", "model_path": "", "base_url": "", "url": "", "wire": "openai-sse",
    "api_key_env": "", "api_key_file": "", "reserve_key_envs": [],
    "max_tokens": 200, "temperature": 0.7, "top_p": 0.0, "top_k": 0, "presence_penalty": 0.0, "stop": [],
    "reasoning_budget": -1, "n_threads": 0, "n_ctx": 2048, "chat_format": "gemma",
    "prompt_style": "auto", "assistant_name": "Assistant", "repack": "auto",
    "connect_timeout_s": 10.0, "first_token_timeout_s": 60.0, "idle_timeout_s": 30.0,
    "retries": 2, "backoff_s": 0.5, "backoff_max_s": 8.0,
    "stop_strings": [], "max_reply_chars": 0, "max_reply_sentences": 0, "repeat_ngram": 8, "repeat_count": 3,
    "user_turn_prefixes": ["User:", "Пользователь:"], "extra": {},
}
"""top_p, top_k and presence_penalty of 0 and reasoning_budget of -1 mean "not sent"."""

SCHEMA: dict[str, Any] = {
    "bus": {"runtime_dir": _text(), "transport": _choice("ipc", "tcp"), "tcp_bind": _text(),
            "tcp_port": _count(1, 65533), "connect_host": _text(), "curve": _flag(), "keys_dir": _text(),
            "authorized_dir": _text()},
    "llm": {
        "profile": _text(),
        "on_busy": _choice("cancel", "queue", "reject"),
        "persona_file": _text(),
        "history_token_budget": _count(0, 10_000_000),
        "system_prompt": _text(),
        "history_limit": _count(0, 1000),
        "context_timeout_ms": _count(0, 60_000),
        "workers": _count(1, 256),
        "profiles": "profiles",
    },
    "chunker": "chunker",
    "tts": {
        "engine": _choice(*TTS_ENGINES),
        "espeak": {"voice": _text(), "rate": _count(80, 500), "pitch": _count(0, 99),
                   "volume": _count(0, 200), "normalize_numbers": _languages()},
        "coqui": {"model_name": _text(), "model_path": _text(), "config_path": _text(),
                  "device": _choice("cpu", "cuda"), "speaker": _text(), "language": _text(),
                  "speaker_wav": _text(), "max_frame_ms": _count(10, 1000), "normalize_numbers": _languages()},
        "openai-speech": {"base_url": _text(), "model": _text(), "voice": _text(), "api_key_env": _text(),
                          "response_format": _choice("pcm", "wav"), "speed": _real(0.25, 4.0),
                          "sample_rate": _count(8000, 384000), "timeout_s": _real(0.1, 600.0),
                          "max_frame_ms": _count(10, 1000), "normalize_numbers": _languages()},
        "null": {"frame_ms": _count(1, 200), "normalize_numbers": _languages()},
    },
    "player": {"backend": _choice(*PLAYER_BACKENDS), "wav_dir": _text()},
    "history": {"db_path": _text(), "persona": _text(), "commands_file": _text(),
                "max_commands_per_reply": _count(0, 10_000), "marks_wait_ms": _count(0, 60_000)},
    "log": {"level": _choice("debug", "info", "warning", "error")},
    "metrics": {"prometheus_port": _count(0, 65535), "prometheus_bind": _text()},
    "run": {
        "stages": _names(STAGES),
        "instances": {name: _count(1, 64) for name in STAGES},
        "ready_timeout_s": _real(1.0, 600.0),
        "restart_limit": _count(0, 1000),
        "restart_window_s": _real(1.0, 3600.0),
    },
}

DEFAULTS: dict[str, Any] = {
    "bus": {"runtime_dir": "", "transport": "ipc", "tcp_bind": "127.0.0.1", "tcp_port": 7600, "connect_host": "",
            "curve": False, "keys_dir": "", "authorized_dir": ""},
    "llm": {
        "profile": "local",
        "on_busy": "cancel",
        "persona_file": "",
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
    "tts": {"engine": "espeak", "espeak": {"voice": "auto", "rate": 175, "pitch": 50, "volume": 100,
                                           "normalize_numbers": []},
            "coqui": {"model_name": "", "model_path": "", "config_path": "", "device": "cpu", "speaker": "",
                      "language": "", "speaker_wav": "", "max_frame_ms": 200, "normalize_numbers": ["ru", "en"]},
            "openai-speech": {"base_url": "https://api.openai.com/v1", "model": "tts-1", "voice": "alloy",
                              "api_key_env": "OPENAI_API_KEY", "response_format": "pcm", "speed": 1.0,
                              "sample_rate": 24000, "timeout_s": 30.0, "max_frame_ms": 200,
                              "normalize_numbers": []},
            "null": {"frame_ms": 10, "normalize_numbers": []}},
    "player": {"backend": "auto", "wav_dir": ""},
    "history": {"db_path": "", "persona": "default", "commands_file": "", "max_commands_per_reply": 30,
                "marks_wait_ms": 2000},
    "log": {"level": "info"},
    "metrics": {"prometheus_port": 0, "prometheus_bind": "127.0.0.1"},
    "run": {
        "stages": list(STAGES),
        "instances": {name: 1 for name in STAGES},
        "ready_timeout_s": 120.0,
        "restart_limit": 5,
        "restart_window_s": 60.0,
    },
}


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
        return {"name": chosen, **PROFILE_DEFAULTS, **profiles[chosen]}


def default_path(env: Mapping[str, str] = os.environ) -> Path:
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "voxpipe" / "config.toml"


def load(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] = os.environ) -> Config:
    """Resolve the config: `path`, else $VOXPIPE_CONFIG, else the default path if it exists."""
    explicit = path or env.get("VOXPIPE_CONFIG")
    # Absolute once, here: `voxpipe run` hands this path to stages that start in another directory.
    file = Path(explicit).expanduser().absolute() if explicit else default_path(env)
    data = copy.deepcopy(DEFAULTS)
    origins: dict[tuple[str, ...], str] = {}
    used: Path | None = None
    if explicit or file.exists():
        used = file
        _merge(data, _read_toml(file), (), str(file), origins)
    for name, text in sorted(env.items()):
        if name.startswith(ENV_PREFIX) and "__" in name:
            _apply_env(data, name, text, origins)
    _validate(data, SCHEMA, (), origins, str(used) if used else "defaults")
    _check_references(data, origins)
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


def _apply_env(data: dict[str, Any], name: str, text: str, origins: dict[tuple[str, ...], str]) -> None:
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
    node[path[-1]] = rule.parse_env(text) if rule else text
    origins[path] = f"environment variable {name}"


def _dashed(table: Mapping[str, Any], part: str) -> str:
    """Shells and systemd cannot put '-' in a variable name: OPENAI_SPEECH names the table
    openai-speech when there is one."""
    dashed = part.replace("_", "-")
    return dashed if part not in table and dashed in table else part


def _rule_for(path: tuple[str, ...]) -> Rule | None:
    node: Any = SCHEMA
    for part in path:
        if node == "profiles":
            node = PROFILE_SCHEMA
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
    if schema == "free":
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: key {'.'.join(path)} must be a table")
        return
    if schema == "profiles":
        if not isinstance(data, dict) or not data:
            raise ConfigError(f"{where}: key {'.'.join(path)} must be a table of named profiles")
        for name, profile in data.items():
            _validate(profile, PROFILE_SCHEMA, (*path, name), origins, fallback)
            if "provider" not in profile:
                raise ConfigError(f"{_where((*path, name), origins, fallback)}: profile "
                                  f"{'.'.join((*path, name))} needs provider = one of: {', '.join(PROVIDERS)}")
        return
    if isinstance(schema, Rule):
        if not schema.accepts(data):
            raise ConfigError(f"{where}: key {'.'.join(path)} = {data!r} is not allowed; "
                              f"expected {schema.describe}")
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
    """The chunker's keys live with its policy (services/chunker/core.py); check them there."""
    from .chunker.core import ChunkerPolicy

    if not isinstance(data, dict):
        raise ConfigError(f"{_where(path, origins, fallback)}: key chunker must be a table")
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


def _where(path: tuple[str, ...], origins: Mapping[tuple[str, ...], str], fallback: str) -> str:
    """The source of the value at path (or its closest table), for error messages."""
    for length in range(len(path), 0, -1):
        if path[:length] in origins:
            return f"config error in {origins[path[:length]]}"
    return f"config error in {fallback}"
