"""`voxpipe game`: the link between the MiSide NeuroMita mod and the bus (docs/design/game-link.md)."""
