"""Provider registry: the profile's `provider` name picks the module.

Adding a provider means adding one module and one line here.
"""

from __future__ import annotations

from typing import Any, Mapping

from ...plugins import load_plugin
from .base import Provider

PROVIDERS = {
    "local": "services.llm.providers.local:LocalProvider",
    "openai": "services.llm.providers.openai_compat:OpenAIProvider",
    "gemini": "services.llm.providers.gemini:GeminiProvider",
    "http": "services.llm.providers.http:HttpProvider",
    "g4f": "services.llm.providers.g4f:G4fProvider",
}


def create_provider(profile: Mapping[str, Any]) -> Provider:
    """Instantiate the provider a profile names (imported only when used)."""
    return load_plugin(PROVIDERS, profile["provider"], "provider", {"profile": profile})
