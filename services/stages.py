"""The stage registry: `voxpipe stage NAME` and the supervisor look stages up here."""

from __future__ import annotations

from .plugins import load_class
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
    return load_class(STAGES, name, "stage")
