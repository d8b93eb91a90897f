"""The error codes an `error` message carries: one enum, so a publisher cannot misspell one and a
reader finds every code in one place (`docs/protocol.md` §5.17 says when each is sent)."""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """The `code` of an `error` message. A StrEnum, so it travels as its plain string."""

    INVALID_MESSAGE = "invalid_message"
    """A frame failed validation, or the player got audio that is not whole samples."""
    GAP = "gap"
    """Lost messages were detected in a stream."""
    INTERNAL = "internal"
    """A handler raised; the stage goes on."""
    PROVIDER_ERROR = "provider_error"
    """The LLM provider failed after any retries, or the request cannot be served."""
    BUSY = "busy"
    """llm.on_busy = reject and the session is still answering."""
    TEXT_MISMATCH = "text_mismatch"
    """The tokens differ from the llm.done text beyond a missing tail."""
    TTS_FAILED = "tts_failed"
    """The TTS engine failed on a chunk."""
    UNKNOWN_VOICE = "unknown_voice"
    """The engine cannot use the request's voice; the configured one speaks."""
    PLAYBACK_FAILED = "playback_failed"
    """The audio backend failed."""
    STAGE_CRASHED = "stage_crashed"
    """A stage process exited and will be restarted."""
    STAGE_DOWN = "stage_down"
    """A request came while a stage its reply needs was down (restarting): it fails at once."""
    DUPLICATE_STAGE = "duplicate_stage"
    """Two processes run one stage and shard on one bus; the younger stops."""
    HISTORY_GAP = "history_gap"
    """After a restart, replies in a window may be missing from history."""
