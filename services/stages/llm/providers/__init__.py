"""Provider registry: the profile's `provider` name picks the module.

Adding a provider means adding one module and one entry here, which declares the profile keys
the provider reads (config validation takes them from here). Every profile may hold any
provider's keys, so a key several providers read is declared once, below, and shared.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ....config import Setting, choice, count, table, text
from ....plugins import Plugin, build

if TYPE_CHECKING:
    from .base import Provider

BASE_URL = Setting("", text(), "the API's base URL; empty: the provider's own")
MODEL = Setting("", text(), "the model, by the name the server knows it")
EXTRA = Setting({}, table(), "request-body fields, laid over what voxpipe sends (nested tables merge key by key)")

PROVIDERS = {
    "local": Plugin("voxpipe.stages.llm.providers.local:LocalProvider", {
        "model_path": Setting("", text(), "a .gguf model file; empty: the bundled Gemma 3 270M (the local extra)"),
        "n_threads": Setting(0, count(0, 1024), "llama.cpp threads; 0: one per CPU core"),
        "n_ctx": Setting(2048, count(128, 1_048_576), "the context window, in tokens"),
        "chat_format": Setting("gemma", text(), "llama-cpp-python's chat format, for the chat prompt style"),
        "repack": Setting("auto", choice("auto", "on", "off"),
                          "llama.cpp weight repacking; auto: on, except on CPUs with AMX (see llama_runtime)"),
    }),
    "openai": Plugin("voxpipe.stages.llm.providers.openai_compat:OpenAIProvider",
                     {"base_url": BASE_URL, "model": MODEL, "extra": EXTRA}),
    "gemini": Plugin("voxpipe.stages.llm.providers.gemini:GeminiProvider",
                     {"base_url": BASE_URL, "model": MODEL, "extra": EXTRA}),
    "http": Plugin("voxpipe.stages.llm.providers.http:HttpProvider", {
        "url": Setting("", text(), "the full endpoint, http://host:port/path"),
        "wire": Setting("openai-sse", choice("openai-sse", "ndjson"),
                        "the endpoint's format: OpenAI chat completions with SSE, or Ollama's /api/chat NDJSON"),
        "model": MODEL,
        "extra": EXTRA,
    }),
    "g4f": Plugin("voxpipe.stages.llm.providers.g4f:G4fProvider",
                  {"base_url": BASE_URL, "model": MODEL, "extra": EXTRA}),
}


def create_provider(profile: Mapping[str, Any]) -> Provider:
    """Build the provider a profile names (imported only when used) from the profile. What it refuses
    names the profile."""
    try:
        return build(PROVIDERS, profile["provider"], "provider", profile)
    except ValueError as exc:
        raise ValueError(f"profile {profile.get('name', '?')!r}: {exc}") from None


def provider_settings(name: str, profile: Mapping[str, Any] | None, given: Mapping[str, Any]) -> dict[str, Any]:
    """Provider `name`'s settings from a profile and keys given one by one (see Plugin.resolve)."""
    where = f"llm.profiles.{(profile or {}).get('name', '<profile>')}"
    return PROVIDERS[name].resolve(profile, given, where)
