"""The `triton` and `services` fixtures (real processes on loopback) live in tests/conftest.py, shared with
tests/orchestrator."""
