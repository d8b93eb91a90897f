"""Running voxpipe: the supervisor behind `voxpipe run`, `voxpipe doctor`, `voxpipe stats` and the
Prometheus endpoint."""
