"""Kinema's gRPC services: thin adapters from protos to the `kinema` library."""
