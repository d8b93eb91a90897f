"""The stage registry: `voxpipe stage NAME` and the supervisor look stages up here."""

from __future__ import annotations

from .plugins import load_class
from .runtime import Stage

STAGES = {
    "bus": "voxpipe.bus_stage:BusStage",
    "llm": "voxpipe.llm.stage:LlmStage",
    "chunker": "voxpipe.chunker.stage:ChunkerStage",
    "tts": "voxpipe.tts.stage:TtsStage",
    "player": "voxpipe.player.stage:PlayerStage",
    "history": "voxpipe.history.stage:HistoryStage",
}


def stage_class(name: str) -> type[Stage]:
    """The Stage subclass for a name; ValueError lists the names that exist."""
    return load_class(STAGES, name, "stage")
