"""The plugin loader every registry shares: providers, TTS engines, player backends, stages."""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Mapping


def load_plugin(registry: Mapping[str, str], name: str, kind: str, options: Mapping[str, Any],
                auto: Callable[[], str] | None = None) -> Any:
    """Import and build the plugin `name` of `registry` ("module:Class" strings, imported lazily so an
    uninstalled optional dependency only matters when chosen). With `auto`, the name "auto" is
    allowed too and means the registry name `auto()` returns.

    `options` may be a whole config section shared by several plugins: each plugin receives only the
    keys its constructor names.
    """
    if name == "auto" and auto:
        name = auto()
    cls = load_class(registry, name, kind, extra=("auto",) if auto else ())
    accepted = inspect.signature(cls).parameters
    return cls(**{key: value for key, value in options.items() if key in accepted})


def load_class(registry: Mapping[str, str], name: str, kind: str, extra: tuple[str, ...] = ()) -> Any:
    """Import the class registered as `name`; an unknown name lists the allowed ones."""
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; allowed: {', '.join([*registry, *extra])}")
    module_name, _, class_name = registry[name].partition(":")
    return getattr(importlib.import_module(module_name), class_name)
