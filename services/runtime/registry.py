"""The stage registry: `voxpipe stage NAME` and the supervisor look stages up here."""

from __future__ import annotations

from ..plugins import load_class
from .stage import Stage

STAGES = {
    "bus": "voxpipe.runtime.broker_stage:BusStage",
    "llm": "voxpipe.stages.llm.stage:LlmStage",
    "chunker": "voxpipe.stages.chunker.stage:ChunkerStage",
    "tts": "voxpipe.stages.tts.stage:TtsStage",
    "player": "voxpipe.stages.player.stage:PlayerStage",
    "history": "voxpipe.stages.history.stage:HistoryStage",
}


def stage_class(name: str) -> type[Stage]:
    """The Stage subclass for a name; ValueError lists the names that exist."""
    return load_class(STAGES, name, "stage")
