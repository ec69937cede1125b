"""What the orchestrator composes: its settings, the pipeline registry and the remote capabilities it runs them on."""
