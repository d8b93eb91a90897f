"""voxpipe: a streaming voice pipeline of ZeroMQ stages.

    import voxpipe

    with voxpipe.connect() as vp:                     # or: from voxpipe import connect
        for event in vp.ask("Hello!", session="me"):  # protocol Messages with typed bodies
            if isinstance(event.body, voxpipe.Text):
                print(event.body.delta, end="", flush=True)

The source folder is `services/`; it installs as the package `voxpipe`. The client library's
names (with the protocol types it hands out, the same classes as in `voxpipe.protocol`) are loaded
on first use, so importing one module of the package (a stage, the config) does not import the client.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "connect", "Client", "Reply", "VoxpipeError", "VoxpipeTimeout", "Message", "Text", "TextMark", "Chunk", "Mark",
    "Audio", "Command", "Reasoning", "Playback", "LlmDone", "Error", "ErrorCode", "REPLY_TYPES", "REPLY_KINDS",
    "REPLY_STAGES",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from .frontends import client
        return getattr(client, name)
    raise AttributeError(f"module 'voxpipe' has no attribute {name!r}")
