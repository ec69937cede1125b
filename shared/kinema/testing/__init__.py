"""Helpers for Kinema's own tests and benchmarks (they need the dev requirements, e.g. hypothesis)."""
