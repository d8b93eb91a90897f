"""`voxpipe stage bus`: the broker as a stage, so it heartbeats and shows in `voxpipe status`."""

from __future__ import annotations

from .broker import Broker
from .stage import Stage


class BusStage(Stage):
    name = "bus"

    def prepare(self) -> None:
        self.broker = Broker.from_config(self.config)
        self.broker.start()
        self.log.info("bus listening on %s and %s%s", self.broker.endpoints.inbound, self.broker.endpoints.outbound,
                      " (CURVE)" if self.broker.curve else "")

    def shutdown(self) -> None:
        self.broker.stop()
