"""Common parts of every Kinema gRPC service: settings, tensor codec, status mapping, metrics, logs, server."""
