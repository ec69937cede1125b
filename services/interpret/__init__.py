"""kinema.interpret.v1.Interpret: named factors of images and latents (IIN), edits, net2net translation."""
