"""kinema.autoencoder.v1.Autoencoder: images <-> normalised latents (LDM)."""
