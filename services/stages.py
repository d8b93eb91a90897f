"""The stage registry: `voxpipe stage NAME` and the supervisor look stages up here."""

from __future__ import annotations

import importlib

from .runtime import Stage

STAGES = {
    "bus": "services.bus_stage:BusStage",
    "llm": "services.llm.stage:LlmStage",
    "chunker": "services.chunker.stage:ChunkerStage",
    "tts": "services.tts.stage:TtsStage",
    "player": "services.player.stage:PlayerStage",
    "history": "services.history.stage:HistoryStage",
}


def stage_class(name: str) -> type[Stage]:
    """The Stage subclass for a name; ValueError lists the names that exist."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    module_name, class_name = STAGES[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)
