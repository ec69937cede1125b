"""Serving the networks: one numpy-level implementation per network, run by Triton or in process."""
