"""kinema.orchestrator.v1.Orchestrator: runs named pipelines over the model services and stores their outputs."""
