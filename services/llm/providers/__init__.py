"""Provider registry: the profile's `provider` name picks the module.

Adding a provider means adding one module and one line here.
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping

from .base import Provider

PROVIDERS = {
    "local": "services.llm.providers.local:LocalProvider",
    "openai": "services.llm.providers.openai_compat:OpenAIProvider",
}


def create_provider(profile: Mapping[str, Any]) -> Provider:
    """Instantiate the provider a profile names (imports it only when used)."""
    name = profile["provider"]
    if name not in PROVIDERS:
        raise ValueError(f"unknown provider {name!r}; allowed: {', '.join(sorted(PROVIDERS))}")
    module_name, class_name = PROVIDERS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)(profile)
