"""`voxpipe stage bus`: the broker as a stage, so it heartbeats and shows in `voxpipe status`."""

from __future__ import annotations

from .bus import Broker, runtime_dir
from .runtime import Stage


class BusStage(Stage):
    name = "bus"

    def prepare(self) -> None:
        self.broker = Broker(runtime_dir(self.config["bus"]["runtime_dir"]))
        self.broker.start()
        self.log.info("bus listening in %s", self.broker.directory)

    def shutdown(self) -> None:
        self.broker.stop()
