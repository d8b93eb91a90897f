"""What every plugin registry shares (providers, TTS engines, player backends, stages): its entries,
and building the plugin a config table chooses.

A registry maps each name to a `Plugin` entry: where the plugin's class is, and the settings it
declares (names, rules, defaults, what they are for). The entry is the one place both are written:
config validation reads the settings from it, and every plugin, provider, engine or backend alike,
is built from the config table it is configured by (a profile, [tts.<name>], [player]) and takes
the keys it declares from it. So adding a plugin is its module plus one registry entry.

The entry sits in the registry module, not in the plugin's module, because every process loads
the config (`voxpipe say` included) and a plugin module may import openai, requests, torch or a
sound library: the registries import nothing but this module and services/config.py.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from .config import Setting, defaults


class Plugin(str):
    """A registry entry: the plugin's class as "module:Class", carrying the settings the plugin declares.

    It is that string itself, as registry entries always were, so code that finds a plugin's module
    from its entry keeps working. The class is imported only when the plugin is built, so an
    uninstalled optional dependency matters only when its plugin is chosen.
    """

    settings: Mapping[str, Setting]

    def __new__(cls, code: str, settings: Mapping[str, Setting] | None = None) -> Plugin:
        entry = super().__new__(cls, code)
        entry.settings = settings or {}
        return entry

    def resolve(self, table: Mapping[str, Any] | None, given: Mapping[str, Any], where: str) -> dict[str, Any]:
        """The plugin's settings: the keys it declares taken from `table` (which may hold other keys: the
        one that chose the plugin, or other plugins' in a shared table), then `given` over them (keys
        set one by one, in code or tests: an undeclared one is a mistake), each checked, and the rest
        filled with their defaults. A plugin's constructor starts with this, so it gets what load()
        would give it however it was built. A ValueError names the key, under `where` (the table's
        place in the config), and what is allowed."""
        for key in given:
            if key not in self.settings:
                raise ValueError(f"unknown key {where}.{key}; allowed: {', '.join(sorted(self.settings))}")
        chosen = {**{key: value for key, value in (table or {}).items() if key in self.settings}, **given}
        for key, value in chosen.items():
            if not self.settings[key].rule.accepts(value):
                raise ValueError(self.settings[key].rule.refusal(f"{where}.{key}", value))
        return {**defaults(self.settings), **chosen}


def build(registry: Mapping[str, Plugin], name: str, kind: str, table: Mapping[str, Any],
          auto: Callable[[], str] | None = None) -> Any:
    """Build plugin `name` of `registry` from `table`, the config table it is configured by. With
    `auto`, the name "auto" is allowed too and means the name `auto()` returns."""
    if name == "auto" and auto:
        name = auto()
    return load_class(registry, name, kind, extra=("auto",) if auto else ())(table)


def load_class(registry: Mapping[str, str], name: str, kind: str, extra: tuple[str, ...] = ()) -> Any:
    """Import the class registered as `name`; an unknown name lists the allowed ones."""
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; allowed: {', '.join([*registry, *extra])}")
    module_name, _, class_name = registry[name].partition(":")
    return getattr(importlib.import_module(module_name), class_name)
