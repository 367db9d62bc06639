"""Serving helpers: start/stop the embedded Triton server and the latency-floor model repository."""
