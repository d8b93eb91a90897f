"""voxpipe: a streaming voice pipeline of ZeroMQ stages."""
