"""`make bench`: latency and throughput of voxpipe on real processes and real ZeroMQ."""
