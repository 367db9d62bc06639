"""Clients of the served cascade: HTTP and gRPC, single pages and the session replay."""
