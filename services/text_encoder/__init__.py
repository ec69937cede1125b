"""kinema.text_encoder.v1.TextEncoder: prompts -> per-token states, mask and pooled vectors."""
