"""What every process shares: the broker, the bus connection, the stage loop and its bookkeeping.

- `broker`: the XSUB/XPUB proxy every participant connects to (`voxpipe stage bus` runs it, as
  `broker_stage`); `curve`: its CURVE keys for a bus on TCP.
- `connection`: `Connection`, one participant's sockets: handshake, numbering, validation, gap checks.
- `stage`: `Stage`, the main loop every stage runs, and `@handles`, how a stage declares what it
  consumes; `registry` names the stages.
- `replies`: the one cancel rule and the bounded registry of replies every stage keeps.
- `shard` splits sessions between instances of a stage; `sdnotify` speaks to systemd.
"""

from .connection import BusLost, BusUnavailable, Connection, VoxpipeError, endpoints_for
from .stage import Stage, handles

__all__ = ["Connection", "BusUnavailable", "BusLost", "VoxpipeError", "endpoints_for", "Stage", "handles"]
